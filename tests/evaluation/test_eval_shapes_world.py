"""ShapesWorld exact metrics: references score 100, a false claim and a silent caption score less."""

import math

import pytest

from balcap_jax.data import shapes_world as world
from balcap_jax.evaluation import shapes_world_eval


def _example(index=0):
    return world.generate_example(seed=0, index=index, config=world.WorldConfig(max_objects=3))


def test_a_reference_caption_is_perfect():
    example = _example()
    scores = shapes_world_eval.score_caption(example.references[0], example.scene.to_dict(), example.questions)
    assert scores["precision"] == scores["recall"] == scores["f1"] == scores["linguistic"] == 1.0
    assert scores["qa"] == 1.0 and scores["words"] == len(example.references[0].split())


def test_a_false_claim_lowers_precision_and_an_empty_caption_scores_zero():
    example = _example()
    obj = example.scene.objects[0]
    wrong_colour = next(c for c in world.COLOURS if all(o.colour != c for o in example.scene.objects))
    caption = f"There is a {obj.colour} {obj.shape}. There is a {wrong_colour} {obj.shape}."
    scores = shapes_world_eval.score_caption(caption, example.scene.to_dict(), example.questions)
    assert scores["precision"] == pytest.approx(0.5)
    empty = shapes_world_eval.score_caption("", example.scene.to_dict(), example.questions)
    assert empty["precision"] == empty["recall"] == empty["f1"] == empty["linguistic"] == 0.0


def test_aggregate_means_times_100_and_nan_qa_excluded():
    rows = [{"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "linguistic": 1.0, "qa": math.nan, "words": 4},
            {"precision": 0.5, "recall": 0.5, "f1": 0.5, "linguistic": 0.0, "qa": 0.25, "words": 8}]
    out = shapes_world_eval.aggregate_scores(rows)
    assert out["precision"] == pytest.approx(75.0) and out["qa"] == pytest.approx(25.0)
    assert out["words_mean"] == 6.0 and out["num_items"] == 2
