"""CapArena-style battles: outcomes, recorded seeded order, per-baseline scores, scripted-judge run."""

import asyncio

import pytest

from balcap_jax.evaluation import caparena
from balcap_jax.evaluation.caparena import aggregate_scores, battle_outcome, model_is_a
from balcap_jax.evaluation.judging import EvalJudges
from balcap_jax.evaluation.scripted_judge import scripted_eval_judge
from tests.evaluation.eval_fixtures import write_jsonl, write_png


def test_battle_outcome_follows_the_shown_order():
    assert battle_outcome("a", model_is_a=True) == 1
    assert battle_outcome("A", model_is_a=False) == -1
    assert battle_outcome("b", model_is_a=False) == 1
    assert battle_outcome("b", model_is_a=True) == -1
    assert battle_outcome("tie", model_is_a=True) == 0
    with pytest.raises(ValueError):
        battle_outcome("both", True)


def test_order_is_seeded_reproducible_and_balanced():
    draws = [model_is_a(f"img{i}", "gpt-4o", seed=0) for i in range(200)]
    assert draws == [model_is_a(f"img{i}", "gpt-4o", seed=0) for i in range(200)]
    assert 70 < sum(draws) < 130
    assert draws != [model_is_a(f"img{i}", "gpt-4o", seed=1) for i in range(200)]


def test_per_baseline_score_is_half_wins_minus_losses_and_the_mean_over_baselines():
    outcomes = [{"x": 1, "y": -1}, {"x": 1, "y": -1}, {"x": -1, "y": None}, {"x": 0, "y": 0}]
    out = aggregate_scores(outcomes)
    assert out["per_baseline"]["x"] == {"wins": 2, "losses": 1, "ties": 1, "unscored": 0, "score": 0.5}
    assert out["per_baseline"]["y"] == {"wins": 0, "losses": 2, "ties": 1, "unscored": 1, "score": -1.0}
    assert out["score"] == pytest.approx(-0.25)


def test_benchmark_needs_the_same_baselines_on_every_line(tmp_path):
    write_png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "arena.jsonl", [
        {"image_id": "a", "image": "a.png", "reference": "r", "baselines": {"x": "c"}},
        {"image_id": "b", "image": "a.png", "reference": "r", "baselines": {"y": "c"}}])  # fmt: skip
    with pytest.raises(ValueError, match="same baselines"):
        caparena.load_items(path)


def test_judged_with_the_scripted_judge(tmp_path):
    write_png(tmp_path / "a.png")
    rows = [{"image_id": f"i{n}", "image": "a.png", "reference": "A red bus.",
             "baselines": {"short": "A bus.", "wrong": "A purple bus. A dragon."}} for n in range(6)]
    path = write_jsonl(tmp_path / "arena.jsonl", rows)
    judge = scripted_eval_judge()
    protocol = caparena.CapArena(caparena.load_items(path), EvalJudges(judge, judge), caparena.CapArenaConfig(seed=3))
    caption = "A red bus. It has wheels."
    results = [asyncio.run(protocol.judge_item(item, caption)) for item in protocol.items]
    # the model's caption (2 correct sentences) beats both baselines wherever it is shown
    assert all(b["outcome"] == 1 for r in results for b in r["battles"])
    orders = [b["model_is_a"] for r in results for b in r["battles"]]
    assert orders == [model_is_a(f"i{n}", name, 3) for n in range(6) for name in ("short", "wrong")]
    assert len(set(orders)) == 2, "both orders occur"
    for request, shown_first in zip(judge.requests, orders):
        assert request.has_images
        first = request.messages[-1].text.split("<caption_a>")[1].split("</caption_a>")[0].strip()
        assert (first == caption) == shown_first
    out = protocol.aggregate(results)
    assert out["per_baseline"]["short"]["score"] == 3.0 and out["score"] == 3.0 and out["order_seed"] == 3
