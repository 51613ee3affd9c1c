"""The ShapesWorld caption parser: claims extracted from known sentences, each grammar rule, and totality."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balcap_jax.data import shapes_world_grammar as G
from balcap_jax.data.shapes_world_grammar import Claim, Mention, parse_caption

RED_CIRCLE = Mention("red", "circle")
BLUE_SQUARE = Mention("blue", "square")


def claims(text):
    return list(parse_caption(text).claims)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("There is a small red circle in the top left.",
         [Claim("exists", RED_CIRCLE), Claim("size", RED_CIRCLE, "small"), Claim("region", RED_CIRCLE, "top left")]),
        ("In the middle right, there is a large blue square.",
         [Claim("exists", BLUE_SQUARE), Claim("size", BLUE_SQUARE, "large"), Claim("region", BLUE_SQUARE, "right")]),
        ("A big blue square sits in the center.",
         [Claim("exists", BLUE_SQUARE), Claim("size", BLUE_SQUARE, "large"), Claim("region", BLUE_SQUARE, "center")]),
        ("The red circle is to the left of the blue square.", [Claim("relation", RED_CIRCLE, "left of", BLUE_SQUARE)]),
        ("The red circle appears above the blue square.", [Claim("relation", RED_CIRCLE, "above", BLUE_SQUARE)]),
        ("There are three shapes in the image.", [Claim("count", Mention(), 3)]),
        ("The picture contains a single shape.", [Claim("count", Mention(), 1)]),
        ("There are 2 circles.", [Claim("count", Mention(shape="circle"), 2)]),
        ("The circle is red.", [Claim("colour", Mention(shape="circle"), "red")]),
        ("The red circle is small and is in the bottom middle.",
         [Claim("size", RED_CIRCLE, "small"), Claim("region", RED_CIRCLE, "bottom")]),
        ("The red circle is on the left side of the image.", [Claim("region", RED_CIRCLE, "left")]),
        ("The red circle, which is small, sits in the top left.",
         [Claim("size", RED_CIRCLE, "small"), Claim("region", RED_CIRCLE, "top left")]),
        ("Below the red circle is a blue square.",
         [Claim("exists", BLUE_SQUARE), Claim("relation", BLUE_SQUARE, "below", RED_CIRCLE)]),
        ("There is a red circle. It is small.", [Claim("exists", RED_CIRCLE), Claim("size", RED_CIRCLE, "small")]),
        ("The image shows a red circle and a blue square.", [Claim("exists", RED_CIRCLE), Claim("exists", BLUE_SQUARE)]),
        # without a colour, the size identifies the object
        ("A small circle is in the top right.",
         [Claim("exists", Mention(None, "circle", "small")), Claim("region", Mention(None, "circle", "small"), "top right")]),
        # a definite mention identifies by everything it states
        ("The small red circle is above the blue square.",
         [Claim("relation", Mention("red", "circle", "small"), "above", BLUE_SQUARE)]),
    ],
)
def test_claims_of_known_sentences(text, expected):
    assert claims(text) == expected
    assert all(s.grammatical and s.well_formed for s in parse_caption(text).sentences)


@pytest.mark.parametrize(
    "text",
    ["There is no red circle.", "The sky is blue.", "Circles are pretty.", "The red circle is left of."],
)
def test_uncheckable_statements_become_unverifiable_claims(text):
    assert any(c.kind == "unverifiable" for c in claims(text))


@pytest.mark.parametrize(
    "text, rule",
    [
        ("There is a red circle floating gracefully.", "G1"),
        ("There is.", "G2"),
        ("In the top left.", "G2"),
        ("There is red circle.", "G3"),
        ("There is an red circle.", "G3"),
        ("There is a red small circle.", "G4"),
        ("There is a red red circle.", "G4"),
        ("There is a a red circle.", "G5"),
        ("A red circle.", "G6"),
    ],
)
def test_each_grammar_rule_is_enforced(text, rule):
    (sentence,) = parse_caption(text).sentences
    assert not sentence.grammatical
    assert any(v.startswith(rule) for v in sentence.violations), sentence.violations


@pytest.mark.parametrize(
    "text, well_formed",
    [("There is a red circle.", True), ("there is a red circle.", False), ("There is a red circle", False),
     ("A circle!", False), ("There is " + "a red circle and " * 12 + "a square.", False)],
)
def test_well_formedness(text, well_formed):
    assert parse_caption(text).sentences[0].well_formed is well_formed


def test_empty_and_punctuation_only_captions():
    assert parse_caption("").claims == () and parse_caption("").sentences == ()
    assert parse_caption("   ").sentences == ()
    parsed = parse_caption("... !!")
    assert parsed.claims == () and not any(s.grammatical for s in parsed.sentences)


def test_non_ascii_words_are_single_unknown_tokens():
    assert G.tokenize("Ünïcödé circle") == ["ünïcödé", "circle"]
    assert parse_caption("Ünïcödé 🙂 circle.").unknown_words == ("ünïcödé", "🙂")


WORDS = sorted(G.LEXICON) + ["zebra", "ü", "🙂", "42", "-", "'", "\n", "\x00"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(WORDS), max_size=60).map(" ".join)))
def test_parser_is_total(text):
    parsed = parse_caption(text)
    for claim in parsed.claims:
        assert claim.kind in {"exists", "size", "colour", "region", "relation", "count", "unverifiable"}
        claim.describe()
    for sentence in parsed.sentences:
        assert isinstance(sentence.grammatical, bool) and isinstance(sentence.well_formed, bool)


def test_non_string_input_is_converted():
    assert parse_caption(None).claims == parse_caption("None").claims
