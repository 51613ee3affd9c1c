"""The ShapesWorld offline judge (balcap_jax/rewards/shapes_world/components.py): exact scores on hand-made
captions, references score 1, robustness to anything a policy may write, and the RewardComponent contract."""

import asyncio
import inspect
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balcap_jax.data import shapes_world as W
from balcap_jax.data import shapes_world_grammar as G
from balcap_jax.rewards.shapes_world import components as J
from balcap_jax.rewards.types import RewardItem

# red circle (small, top left), blue square (large, center), green triangle (small, bottom right)
SCENE = W.SceneGraph(
    (
        W.SceneObject("circle", "red", "small", 0, 0, (18.0, 18.0), 8.0),
        W.SceneObject("square", "blue", "large", 1, 1, (56.0, 56.0), 15.0),
        W.SceneObject("triangle", "green", "small", 2, 2, (93.0, 93.0), 8.0),
    ),
    112,
)
NUM_FACTS = 1 + 3 * 3 + 2


def q(kind, truth, choices, **query):
    return {"question": kind, "choices": choices, "answer": choices.index(truth), "query": {"kind": kind, **query}}


QUESTIONS = [
    q("count", "3", ["1", "2", "3", "4", "5"]),
    q("colour", "green", list(W.COLOURS), shape="triangle"),
    q("size", "large", ["small", "large"], colour="blue", shape="square"),
    q("region", "top left", ["top left", "center", "bottom right"], colour="red", shape="circle"),
    q("exists", "no", ["yes", "no"], colour="purple", shape="diamond"),
    q("relation", "yes", ["yes", "no"], subject=["red", "circle"], relation="left of", object=["green", "triangle"]),
]


def score(component, captions, metadata=None):
    metadata = {"scene_graph": SCENE.to_dict(), "questions": QUESTIONS} if metadata is None else metadata
    items = [RewardItem("img", c, ("ref",), metadata=metadata) for c in captions]
    return asyncio.run(component.score(items))


def values(component, captions):
    return [s.value for s in score(component, captions)]


@pytest.mark.parametrize(
    "caption, precision, recall",
    [
        ("There is a small red circle in the top left.", 1.0, 3 / NUM_FACTS),
        ("There is a large red circle in the center.", 1 / 3, 1 / NUM_FACTS),
        ("There is a black star in the top left.", 0.0, 0.0),
        ("The blue square is to the right of the red circle.", 1.0, 3 / NUM_FACTS),
        ("The red circle is below the blue square.", 0.0, 0.0),
        ("There are three shapes in the image. The sky is blue.", 0.5, 1 / NUM_FACTS),
        ("There is a small red circle in the top left. There is a small red circle in the top left.", 1.0,
         3 / NUM_FACTS),
        ("", 0.0, 0.0),
    ],
)
def test_precision_and_recall_of_hand_made_captions(caption, precision, recall):
    assert values(J.ShapesWorldPrecision(), [caption]) == [pytest.approx(precision)]
    assert values(J.ShapesWorldRecall(), [caption]) == [pytest.approx(recall)]


def test_hallucinated_objects_are_not_pointable():
    (s,) = score(J.ShapesWorldPrecision(), ["There is a black star. There is a red circle."])
    assert [(c["pointable"], c["correct"]) for c in s.record["claims"]] == [(False, False), (True, True)]


def test_generic_mentions_earn_no_credit():
    (s,) = score(J.ShapesWorldPrecision(), ["There is a shape in the top left. There is a small object."])
    assert s.value == 0.0 and not any(c["pointable"] for c in s.record["claims"])
    assert values(J.ShapesWorldPrecision(), ["The red circle is to the left of an object."]) == [0.0]
    assert values(J.ShapesWorldPrecision(), ["There are three objects."]) == [1.0]  # counts are about the image


def test_paraphrases_and_zero_counts_earn_nothing():
    padded = ("There is a small red circle in the top left. The circle is red. The red circle is red. "
              "The red circle is to the left of the blue square. The blue square is to the right of the red circle.")
    (s,) = score(J.ShapesWorldPrecision(), [padded + " There is a black star."])
    counted = [c for c in s.record["claims"] if not c["duplicate"]]
    assert [c["claim"] for c in s.record["claims"] if c["duplicate"]] == [
        "the circle is red", "the red circle is red", "the blue square is right of the red circle"]
    assert s.value == pytest.approx(4 / 5) and len(counted) == 5
    assert values(J.ShapesWorldPrecision(), ["There are zero black stars. There are no pink ovals."]) == [0.0]


def test_ambiguous_mentions_do_not_cover_facts():
    two_circles = W.SceneGraph(
        (W.SceneObject("circle", "red", "small", 0, 0, (18.0, 18.0), 8.0),
         W.SceneObject("circle", "blue", "large", 0, 2, (93.0, 18.0), 15.0)), 112)
    caption = "The circle is in the top left."
    verdicts = J.precision(G.parse_caption(caption), two_circles)[1]
    assert verdicts[0].correct  # true of one of the circles...
    assert not any(f[0] == "region" for f in J.covered_facts(verdicts, two_circles))  # ...but which one?


def test_linguistic_rules():
    fluent = "There are three shapes in the image. There is a small red circle in the top left."
    repeated = "There is a small red circle in the top left. There is a small red circle in the top left."
    captions = [fluent, repeated, "there is a red circle", "A an the the.", "",
                "There is a red circle floating gracefully. There is a blue square."]
    got = values(J.ShapesWorldLinguistic(scale="exact"), captions)
    assert got == pytest.approx([1.0, 0.25, 0.5, 0.0, 0.0, 0.5])
    # The default rates clarity, fluency, coherence on 1..10 like an LLM judge; (mean - 1) / 9. The repeat keeps
    # clarity and fluency 10 and gets coherence 1 + round(9 * 1/2 * 1/2) = 3; the lower-case fragment-free
    # sentence is not well formed (clarity 1); the floating circle: half the sentences grammatical (fluency
    # 1 + round(4.5) = 5, Python rounds half to even); the word salad makes no claim (every axis 1).
    rated = values(J.ShapesWorldLinguistic(), captions)
    assert rated == pytest.approx([1.0, (10 + 10 + 3 - 3) / 27, (1 + 10 + 10 - 3) / 27, 0.0, 0.0,
                                   (10 + 5 + 10 - 3) / 27])
    with pytest.raises(ValueError, match="ShapesWorldLinguistic.scale"):
        J.ShapesWorldLinguistic(scale="likert")


def test_qa_answers_from_the_caption_alone():
    partial = ("There are three shapes in the image. There is a small red circle in the top left. "
               "There is a large blue square in the center.")
    full = (partial + " There is a small green triangle in the bottom right. "
            "The red circle is to the left of the blue square. The blue square is to the left of the green triangle.")
    wrong = "There are two shapes in the image. The blue square is small. The triangle is red."
    assert values(J.ShapesWorldQA(), [full, partial, wrong, ""]) == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert values(J.ShapesWorldQA(cannot_answer_credit=0.25), [partial]) == pytest.approx([(3 + 3 * 0.25) / 6])
    with pytest.raises(ValueError, match="cannot_answer_credit"):
        J.ShapesWorldQA(cannot_answer_credit=2.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 10_000))
def test_references_score_one_on_every_component(seed, index):
    example = W.generate_example(seed, index)
    items = [RewardItem(example.image_id, r, example.references, metadata=example.metadata())
             for r in example.references]
    for component in J.shapes_world_components(with_qa=True):
        for s in asyncio.run(component.score(items)):
            assert s.value == 1.0, (component.name, s.record)


def test_dropping_a_sentence_loses_exactly_its_facts():
    example = W.generate_example(11, 4, W.WorldConfig(min_objects=4, max_objects=4))
    scene, reference = example.scene, example.references[0]
    sentences = [s.strip() + "." for s in reference.split(".") if s.strip()]
    for k in range(len(sentences)):
        shorter = " ".join(sentences[:k] + sentences[k + 1 :])
        p, verdicts = J.precision(G.parse_caption(shorter), scene)
        assert p == 1.0
        lost = set(W.scene_facts(scene)) - J.covered_facts(verdicts, scene)
        assert 1 <= len(lost) <= 3, (sentences[k], lost)


def test_missing_ground_truth_is_unscorable_not_zero():
    item = RewardItem("img-7", "There is a red circle.", ("ref",), metadata={})
    for component in (J.ShapesWorldPrecision(), J.ShapesWorldRecall(), J.ShapesWorldQA()):
        (s,) = asyncio.run(component.score([item]))
        assert math.isnan(s.value) and not s.scored and "img-7" in s.record["error"]
    (s,) = asyncio.run(J.ShapesWorldLinguistic().score([item]))  # text only: needs no ground truth
    assert s.value == 1.0
    (s,) = score(J.ShapesWorldPrecision(), ["x"], metadata={"scene_graph": {"objects": [{"shape": "circle"}]}})
    assert math.isnan(s.value) and "objects[0]" in s.record["error"]


def test_components_follow_the_reward_component_contract():
    for component in J.shapes_world_components(with_qa=True):
        assert isinstance(component.name, str)
        assert inspect.iscoroutinefunction(component.score)
    assert [c.name for c in J.shapes_world_components()] == ["precision", "recall", "linguistic"]
    assert score(J.ShapesWorldPrecision(), []) == []


JUNK_WORDS = sorted(G.LEXICON) + ["zebra", "ü", "🙂", "42", "not", "\n"]


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(JUNK_WORDS), max_size=80).map(" ".join)))
def test_any_caption_scores_in_unit_interval(caption):
    for component in J.shapes_world_components(with_qa=True):
        (s,) = score(component, [caption])
        assert 0.0 <= s.value <= 1.0, (component.name, caption)
