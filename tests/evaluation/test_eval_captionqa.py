"""CaptionQA-style metric: scores (incl. cannot-answer), seeded shuffles, aggregation, scripted-judge run."""

import asyncio

import numpy as np
import pytest

from balcap_jax.evaluation import captionqa
from balcap_jax.evaluation.captionqa import CANNOT_ANSWER, Question, present_question, question_score
from balcap_jax.evaluation.judging import EvalJudges
from balcap_jax.evaluation.scripted_judge import scripted_eval_judge
from tests.evaluation.eval_fixtures import write_jsonl, write_png

COLOUR = Question("What colour is the bus?", ("red", "blue", "green"), 0)
YES_NO = Question("Is there a dog?", ("yes", "no"), 1)


def test_scores_correct_wrong_and_cannot_answer():
    presented = present_question(COLOUR, "img", 0)
    assert presented.options[-1] == CANNOT_ANSWER and presented.cannot_answer == 3
    assert presented.options[presented.correct] == "red"
    wrong = next(i for i in range(3) if i != presented.correct)
    assert question_score(presented, presented.correct) == 1.0
    assert question_score(presented, wrong) == 0.0
    assert question_score(presented, presented.cannot_answer) == pytest.approx(1 / 3 + 0.05)
    four = present_question(Question("q", ("a", "b", "c", "d"), 2), "img", 1)
    assert question_score(four, four.cannot_answer) == pytest.approx(0.25 + 0.05)


def test_yes_no_questions_get_no_cannot_answer_option():
    presented = present_question(YES_NO, "img", 0)
    assert sorted(presented.options) == ["no", "yes"] and presented.cannot_answer is None
    assert presented.options[presented.correct] == "no"


def test_shuffle_is_seeded_per_question_and_tracks_the_answer():
    questions = [Question(f"q{i}", tuple("abcdef"), i % 6) for i in range(40)]
    orders = [present_question(q, "img", i, seed=0).options[:-1] for i, q in enumerate(questions)]
    assert orders == [present_question(q, "img", i, seed=0).options[:-1] for i, q in enumerate(questions)]
    assert len(set(orders)) > 10, "options are shuffled, differently per question"
    assert orders != [present_question(q, "img", i, seed=1).options[:-1] for i, q in enumerate(questions)]
    for i, q in enumerate(questions):
        presented = present_question(q, "img", i)
        assert sorted(presented.options[:-1]) == list("abcdef")
        assert presented.options[presented.correct] == q.options[q.answer]


def test_aggregate_per_domain_overall_and_macro():
    out = captionqa.aggregate_scores([("natural", [1.0, 0.0]), ("natural", [1.0, None]), ("document", [0.3])])
    assert out["per_domain"] == {"document": pytest.approx(30.0), "natural": pytest.approx(200 / 3)}
    assert out["overall"] == pytest.approx((1 + 0 + 1 + 0.3) / 4 * 100)
    assert out["macro_over_domains"] == pytest.approx((30.0 + 200 / 3) / 2)
    assert out["num_questions_scored"] == 4 and out["num_questions_unscored"] == 1


def test_chosen_index_reads_letters_and_option_text():
    options = ("red", "blue", CANNOT_ANSWER)
    assert captionqa.chosen_index("(b)", options) == 1
    assert captionqa.chosen_index("Red", options) == 0
    with pytest.raises(ValueError):
        captionqa.chosen_index("Z", options)


def test_benchmark_errors_name_the_line_and_field(tmp_path):
    write_png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "qa.jsonl", [{"image_id": "a", "image": "a.png",
                                                "questions": [{"question": "q", "options": ["x"], "answer": 0}]}])
    with pytest.raises(ValueError, match=r"qa.jsonl:1: questions\[0\]\['options'\] must be a list of >= 2"):
        captionqa.load_items(path)


def test_judged_with_the_scripted_judge(tmp_path):
    write_png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "qa.jsonl", [{"image_id": "a", "image": "a.png", "domain": "natural", "questions": [
        {"question": "What colour is the bus?", "options": ["red", "blue", "green"], "answer": "red"},
        {"question": "What animal is there?", "options": ["cat", "horse"], "answer": 0},
        {"question": "How many wheels?", "options": ["four", "six", "eight"], "answer": 0},
        {"question": "Is it raining?", "options": ["yes", "no"], "answer": 1}]}])  # fmt: skip
    judge = scripted_eval_judge()
    protocol = captionqa.CaptionQA(captionqa.load_items(path), EvalJudges(judge, judge))
    result = asyncio.run(protocol.judge_item(protocol.items[0], "A red bus with six wheels next to a horse."))
    # red: correct (1); horse: wrong (0); six: wrong (0); rain: neither option in the caption -> "A" (yes/no has no
    # cannot-answer option), right or wrong depending on the seeded order
    scores = [q["score"] for q in result["questions"]]
    rain = result["questions"][3]
    assert scores[:3] == [1.0, 0.0, 0.0]
    assert scores[3] == (1.0 if rain["options"][0] == "no" else 0.0)
    caption_silent = asyncio.run(protocol.judge_item(protocol.items[0], "A vehicle."))
    silent_scores = [q["score"] for q in caption_silent["questions"]]
    assert silent_scores[:3] == pytest.approx([1 / 3 + 0.05, 1 / 2 + 0.05, 1 / 3 + 0.05])
    assert all(r.temperature == 0.0 for r in judge.requests)
    out = protocol.aggregate([result, caption_silent])
    assert out["per_domain"]["natural"] == pytest.approx(np.mean(scores + silent_scores) * 100)
