"""Robust judge-output parsing: fences, prose, key order and case, scalar coercions, schema errors, and
adversarial (hypothesis) inputs that must fail cleanly and fast."""

import json
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balcap_jax.rewards.json_output import JudgeOutputError, OneOf, Range, extract_json, parse_judge_json, validate

CLAIMS = {"claims": [{"element": str, "claim": str}]}
SCORES = {"clarity": Range(1, 10), "fluency": Range(1, 10), "coherence": Range(1, 10)}


@pytest.mark.parametrize(
    "text",
    [
        '{"clarity": 7, "fluency": 8, "coherence": 9}',
        '```json\n{"coherence": 9, "clarity": 7, "fluency": 8}\n```',
        'Here is my rating:\n```\n{"Fluency": "8", "CLARITY": 7.0, "coherence": 9}\n``` Let me know!',
        'Thinking... {"note": "draft"} final answer: {"clarity": 7, "fluency": 8, "coherence": 9, "extra": 1} done {',
    ],
)
def test_scores_parse_despite_fences_prose_order_and_case(text):
    assert parse_judge_json(text, SCORES) == {"clarity": 7.0, "fluency": 8.0, "coherence": 9.0}


def test_bare_list_accepted_for_single_list_key_schema():
    text = 'Claims: [{"claim": "dog_0 is brown", "element": "dog_0", "id": 3}] (end)'
    assert parse_judge_json(text, CLAIMS) == {"claims": [{"element": "dog_0", "claim": "dog_0 is brown"}]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("no json here", "no JSON"),
        ('{"clarity": 7, "fluency": 8}', "missing key 'coherence'"),
        ('{"clarity": 11, "fluency": 8, "coherence": 9}', r"\$\.clarity: 11.0 is outside \[1, 10\]"),
        ('{"clarity": "seven", "fluency": 8, "coherence": 9}', "expected a number"),
        ('{"clarity": true, "fluency": 8, "coherence": 9}', "boolean"),
        ('{"clarity": NaN, "fluency": 8, "coherence": 9}', "finite"),
    ],
)
def test_schema_violations_raise_with_the_path(text, message):
    with pytest.raises(JudgeOutputError, match=message):
        parse_judge_json(text, SCORES)


def test_validate_coerces_harmless_variants_only():
    schema = {"ok": bool, "n": int, "v": OneOf("Yes", "No"), "xs": [float]}
    assert validate({"OK": "yes", "n": "3", "v": " YES ", "xs": ["1.5", 2]}, schema) == {
        "ok": True, "n": 3, "v": "yes", "xs": [1.5, 2.0]
    }  # fmt: skip
    for bad in ({"ok": "maybe", "n": 1, "v": "yes", "xs": []}, {"ok": 1, "n": 1.5, "v": "yes", "xs": []},
                {"ok": 1, "n": 1, "v": "perhaps", "xs": []}, {"ok": 1, "n": 1, "v": "no", "xs": {}}):  # fmt: skip
        with pytest.raises(JudgeOutputError):
            validate(bad, schema)


def test_extract_json_kinds():
    assert extract_json("x [1, 2] {\"a\": 1}", kind="object") == {"a": 1}
    assert extract_json("x [1, 2] {\"a\": 1}", kind="array") == [1, 2]
    assert extract_json("x [1, 2] {\"a\": 1}", kind="any") == [1, 2]
    with pytest.raises(ValueError, match="kind must be"):
        extract_json("{}", kind="dict")


@pytest.mark.parametrize("text", ["{" * 100_000, '{"a": ' * 30_000, "[" * 100_000, '"' * 100_000 + "{}"])
@pytest.mark.parametrize("recursion_limit", [None, 200_000])
def test_pathological_inputs_are_bounded_in_time(text, recursion_limit):
    # Other libraries in the process (hypothesis, torch) raise the recursion limit; the bound must hold then too.
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(recursion_limit or previous)
    try:
        start = time.perf_counter()
        with pytest.raises(JudgeOutputError):
            parse_judge_json(text, SCORES)
        # ~0.02 s alone; the bound leaves room for a loaded 2-core machine (1.8 s seen in the full suite) and
        # still catches a quadratic scan of 100k characters, which takes minutes.
        assert time.perf_counter() - start < 5.0
    finally:
        sys.setrecursionlimit(previous)


def test_a_long_run_of_openers_does_not_hide_the_json_after_it():
    assert parse_judge_json("[" * 5000 + ' then {"clarity": 3, "fluency": 4, "coherence": 5}', SCORES) == {
        "clarity": 3, "fluency": 4, "coherence": 5}
    assert extract_json('[{"a": 1}') == {"a": 1}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
garbage = st.one_of(
    st.text(max_size=400),
    json_values.map(json.dumps),
    st.tuples(st.text(max_size=50), json_values.map(json.dumps), st.text(max_size=50)).map("".join),
    st.tuples(st.sampled_from(["```json\n", "```", ""]), st.text(max_size=200)).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(garbage)
def test_garbage_either_parses_to_the_schema_or_raises_judge_output_error(text):
    for schema in (SCORES, CLAIMS, {"answer": str}, [{"id": str}]):
        try:
            value = parse_judge_json(text, schema)
        except JudgeOutputError:
            continue
        assert validate(value, schema) == value  # whatever parses is already normalised to the schema
