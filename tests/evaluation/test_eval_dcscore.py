"""DCScore-style metric on hand-computed examples, the benchmark file format, and judging with the scripted judge."""

import asyncio
import json
import math

import pytest

from balcap_jax.evaluation import dcscore
from balcap_jax.evaluation.dcscore import OracleFact, Unit, precision_recall, sample_scores
from balcap_jax.evaluation.judging import EvalJudges, majority_bool, majority_choice
from balcap_jax.evaluation.scripted_judge import scripted_eval_judge
from tests.evaluation.eval_fixtures import write_png

FACTS = (OracleFact("f1", "there is a dog"), OracleFact("f2", "the dog is brown"), OracleFact("f3", "a ball is red"))


def test_hand_computed_example_all_and_descriptive():
    units = [
        Unit("there is a dog", True, "f1", True),
        Unit("a dog is present", True, "f1", True),  # duplicate of f1: shares f1's single credit
        Unit("the dog is purple", True, "f2", False),
        Unit("there is a red ball", True, None, True),  # correct and novel
        Unit("the scene seems peaceful", False, None, False),
    ]
    scores = sample_scores(units, FACTS)
    # groups: f1 (1 credit), f2 (0), "there is a red ball" (1), "the scene seems peaceful" (0) -> 2 / 4
    assert scores["precision"] == pytest.approx(0.5)
    # covered: f1; novel: 1 -> (1 + 1) / (3 + 1)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.5)
    # descriptive units only: groups f1 (1), f2 (0), red ball (1) -> 2 / 3; recall unchanged
    assert scores["precision_descriptive"] == pytest.approx(2 / 3)
    assert scores["recall_descriptive"] == pytest.approx(0.5)
    assert scores["f1_descriptive"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_duplicates_share_one_credit():
    correct = Unit("there is a dog", True, "f1", True)
    wrong = Unit("the dog is purple", True, "f2", False)
    p_once, r_once = precision_recall([correct, wrong], FACTS)
    p_many, r_many = precision_recall([correct, correct, correct, wrong], FACTS)
    assert p_once == p_many == pytest.approx(0.5)  # without sharing, the repeats would give 3/4
    assert r_once == r_many == pytest.approx(1 / 3)
    # unmatched units with the same text (up to case and punctuation) are duplicates too
    novel = Unit("A red ball.", True, None, True)
    novel_again = Unit("a red ball", True, None, True)
    p, r = precision_recall([novel, novel_again, wrong], FACTS)
    assert p == pytest.approx(0.5)
    assert r == pytest.approx((0 + 1) / (3 + 1))


def test_correct_novel_facts_add_to_numerator_and_denominator():
    covered = Unit("there is a dog", True, "f1", True)
    assert precision_recall([covered], FACTS)[1] == pytest.approx(1 / 3)
    novel = Unit("a cat sleeps", True, None, True)
    assert precision_recall([covered, novel], FACTS)[1] == pytest.approx(2 / 4)
    wrong_novel = Unit("a dragon flies", True, None, False)
    precision, recall = precision_recall([covered, novel, wrong_novel], FACTS)
    assert recall == pytest.approx(2 / 4)  # a wrong novel fact earns no recall credit
    assert precision == pytest.approx(2 / 3)


def test_a_wrong_unit_matching_a_fact_does_not_cover_it():
    assert precision_recall([Unit("the dog is purple", True, "f2", False)], FACTS) == (0.0, 0.0)


def test_empty_caption_scores_zero_and_nothing_to_recall_is_nan():
    assert sample_scores([], FACTS) == {k: 0.0 for k in dcscore.METRICS}
    non_descriptive = (OracleFact("f1", "it feels calm", descriptive=False),)
    scores = sample_scores([], non_descriptive)
    assert math.isnan(scores["recall_descriptive"]) and math.isnan(scores["f1_descriptive"])


def test_descriptive_unit_matched_to_a_non_descriptive_fact_is_novel_in_the_descriptive_variant():
    facts = (OracleFact("f1", "there is a dog"), OracleFact("f2", "the dog looks happy", descriptive=False))
    units = [Unit("the dog smiles", True, "f2", True)]
    scores = sample_scores(units, facts)
    assert scores["recall"] == pytest.approx(1 / 2)  # covers f2 among {f1, f2}
    assert scores["recall_descriptive"] == pytest.approx((0 + 1) / (1 + 1))  # novel among {f1}


def test_aggregate_excludes_unscored_and_nan_and_scales_by_100():
    a = {k: 0.5 for k in dcscore.METRICS}
    b = {k: 1.0 for k in dcscore.METRICS} | {"recall_descriptive": math.nan}
    out = dcscore.aggregate_scores([a, b, None])
    assert out["num_items"] == 3 and out["num_scored"] == 2
    assert out["precision"] == pytest.approx(75.0)
    assert out["recall_descriptive"] == pytest.approx(50.0)


def test_majority_votes():
    assert majority_bool([True, True, False]) and not majority_bool([True, False])
    assert majority_choice(["f1", "f1", "none"], "none") == "f1"
    assert majority_choice(["f1", "f2", "none"], "none") == "none"
    with pytest.raises(ValueError):
        majority_bool([])


def _benchmark(tmp_path, rows):
    path = tmp_path / "decap.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_benchmark_file_format_and_errors(tmp_path):
    write_png(tmp_path / "a.png")
    path = _benchmark(tmp_path, [{"image_id": "a", "image": "a.png", "reference": "A dog.",
                                  "oracle_facts": ["there is a dog", {"fact": "it is happy", "descriptive": False}]},
                                 {"image_id": "b", "image": "a.png", "reference": "A cat."}])
    items = dcscore.load_items(path)
    assert items[0].oracle_facts == (OracleFact("f1", "there is a dog"), OracleFact("f2", "it is happy", False))
    assert items[1].oracle_facts is None
    bad = _benchmark(tmp_path, [{"image_id": "a", "image": "missing.png", "reference": "x"}])
    with pytest.raises(ValueError, match=r"decap.jsonl:1: 'image' file 'missing.png' not found"):
        dcscore.load_items(bad)
    bad = _benchmark(tmp_path, [{"image_id": "a", "image": "a.png", "reference": "x", "oracle_facts": [3]}])
    with pytest.raises(ValueError, match=r"oracle_facts\[0\]"):
        dcscore.load_items(bad)


def test_judged_with_the_scripted_judge(tmp_path):
    write_png(tmp_path / "a.png")
    path = _benchmark(tmp_path, [{"image_id": "a", "image": "a.png",
                                  "reference": "A brown dog sits. A ball is red. The grass is green."}])
    judge = scripted_eval_judge()
    protocol = dcscore.DCScore(dcscore.load_items(path), EvalJudges(judge, judge), dcscore.DCScoreConfig(votes=3))
    caption = "A brown dog sits on grass. A purple dragon flies. The sky seems peaceful. A brown dog sits on grass."
    result = asyncio.run(protocol.judge_item(protocol.items[0], caption))
    # reference decomposed into 3 facts; units: dog (matches f1, twice), dragon (wrong, novel), sky (novel,
    # non-descriptive, correct under the rules)
    assert [f["text"] for f in result["oracle_facts"]] == ["A brown dog sits", "A ball is red", "The grass is green"]
    assert [u["match"] for u in result["units"]] == ["f1", None, None, "f1"]
    assert [u["correct"] for u in result["units"]] == [True, False, True, True]
    scores = result["scores"]
    assert scores["precision"] == pytest.approx(2 / 3)  # groups: f1 (1), dragon (0), sky (1)
    assert scores["recall"] == pytest.approx((1 + 1) / (3 + 1))
    assert scores["precision_descriptive"] == pytest.approx(1 / 2)
    assert scores["recall_descriptive"] == pytest.approx(1 / 3)
    # 1 + 1 decompositions, 3 match votes, 3 verification votes with the image, the votes sampled with seeds 0..2
    assert result["judge_calls"] == 8
    verify = [r for r in judge.requests if r.has_images]
    assert sorted(r.seed for r in verify) == [0, 1, 2] and all(r.temperature == 0.7 for r in verify)

