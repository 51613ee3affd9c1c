"""The ShapesWorld evaluation reports b-CapScore and rates linguistic quality as the training judge does."""

import math

import pytest

from balcap_jax.data import shapes_world as W
from balcap_jax.evaluation import shapes_world_eval as E
from balcap_jax.rewards.shapes_world import rating as R
from balcap_jax.data.shapes_world_grammar import parse_caption


def test_b_capscore_is_the_harmonic_mean_of_the_three_rewards():
    example = W.generate_example(0, 3, W.WorldConfig(min_objects=2, max_objects=2))
    scene = example.scene
    first = scene.objects[0]
    caption = f"There is {'an' if first.size[0] in 'aeiou' else 'a'} {first.size} {first.colour} {first.shape}."
    scores = E.score_caption(caption, scene.to_dict(), example.questions)
    p, r, l = scores["precision"], scores["recall"], scores["linguistic"]
    assert 0 < r < 1 and p == 1.0
    assert scores["b_capscore"] == pytest.approx(3 / (1 / p + 1 / r + 1 / l))
    assert scores["linguistic"] == pytest.approx(R.rated_linguistic(parse_caption(caption))[0])
    assert E.score_caption("", scene.to_dict(), example.questions)["b_capscore"] == 0.0


def test_aggregate_reports_b_capscore_and_tolerates_rows_without_it():
    rows = [{"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "linguistic": 1.0, "b_capscore": 0.75, "qa": 0.5,
             "words": 4},
            {"precision": 0.5, "recall": 0.5, "f1": 0.5, "linguistic": 0.0, "qa": 0.25, "words": 8}]
    out = E.aggregate_scores(rows)
    assert out["b_capscore"] == pytest.approx(75.0)
    assert "b_capscore" in E.METRICS and not math.isnan(out["precision"])
