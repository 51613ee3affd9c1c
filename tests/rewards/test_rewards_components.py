"""Reward components against the deterministic scripted judge: exact values, empty/no-claim captions, NaN and
counted errors on judge failure, re-asks on unusable answers, per-image reference caching, CapRL QA draws."""

import asyncio
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balcap_jax.rewards.caprl_qa import CapRLQAConfig, CapRLQAReward, chosen_index, draw_questions, parse_questions
from balcap_jax.rewards.json_output import JudgeOutputError
from balcap_jax.rewards.judges.protocol import ImagePart, JudgeUnavailable
from balcap_jax.rewards.judges.scripted import RuleBasedResponder, ScriptedJudge, tagged_section
from balcap_jax.rewards.linguistic import LinguisticReward
from balcap_jax.rewards.precision import PrecisionConfig, PrecisionReward
from balcap_jax.rewards.recall import RecallReward
from balcap_jax.rewards.types import RewardItem
from tests.rewards.conftest import png_bytes

IMAGE = png_bytes()


def item(caption, reference="A red ball lies on the floor.", image_id="img0", **kw):
    return RewardItem(image_id, caption, (reference,), kw.pop("image", IMAGE), **kw)


def run(component, items):
    return asyncio.run(component.score(items))


class FailingJudge:
    model, multimodal = "down", True

    def __init__(self):
        self.calls = 0

    async def generate(self, request):
        self.calls += 1
        raise JudgeUnavailable("server down")


def test_precision_counts_correct_and_pointable_claims():
    judge = ScriptedJudge(RuleBasedResponder())
    [score] = run(PrecisionReward(judge, judge), [item("A red ball. A purple cube. The mood is peaceful.")])
    assert score.value == pytest.approx(1 / 3)
    assert [(c["claim"], c["correct"], c["pointable"]) for c in score.record["claims"]] == [
        ("A red ball", True, True), ("A purple cube", False, True), ("The mood is peaceful", True, False)
    ]  # fmt: skip
    assert score.errors == 0 and score.record["judge_calls"] == 2
    [lenient] = run(
        PrecisionReward(judge, judge, PrecisionConfig(require_pointable=False)),
        [item("A red ball. A purple cube. The mood is peaceful.")],
    )
    assert lenient.value == pytest.approx(2 / 3)


def test_precision_sends_text_to_the_llm_and_the_image_to_the_vlm():
    text_judge = ScriptedJudge(RuleBasedResponder(), multimodal=False)
    visual_judge = ScriptedJudge(RuleBasedResponder())
    run(PrecisionReward(text_judge, visual_judge), [item("A red ball. A blue cube.")])
    [decompose] = text_judge.requests
    [verify] = visual_judge.requests
    assert not decompose.has_images
    assert "<description>\nA red ball. A blue cube.\n</description>" in decompose.messages[0].text
    assert verify.messages[0].images == (ImagePart(IMAGE),)
    claims = [json.loads(line) for line in tagged_section(verify.messages[0].text, "claims").splitlines()]
    assert claims == [{"id": "c1", "claim": "A red ball"}, {"id": "c2", "claim": "A blue cube"}]
    with pytest.raises(ValueError, match="multimodal"):
        PrecisionReward(text_judge, text_judge)


def test_precision_splits_long_captions_over_verification_calls():
    judge = ScriptedJudge(RuleBasedResponder())
    caption = " ".join(f"Object {i} is red." for i in range(7)) + " A purple thing."
    [score] = run(PrecisionReward(judge, judge, PrecisionConfig(claims_per_call=3)), [item(caption)])
    assert score.value == pytest.approx(7 / 8)
    assert len(judge.requests) == 1 + 3


@pytest.mark.parametrize("caption", ["", "   \n", "...!?"])
def test_precision_gives_zero_to_captions_without_claims(caption):
    judge = ScriptedJudge(RuleBasedResponder())
    [score] = run(PrecisionReward(judge, judge), [item(caption)])
    assert score.value == 0.0 and score.errors == 0 and score.record["claims"] == []


def test_judge_failure_is_nan_and_counted_never_zero():
    judge = FailingJudge()
    items = [item("A red ball.")]
    for component in (PrecisionReward(judge, judge), RecallReward(judge), LinguisticReward(judge)):
        [score] = run(component, items)
        assert math.isnan(score.value) and score.errors == 1, component.name
        assert "server down" in score.record["failures"][0]


def test_unusable_answers_are_reasked_with_new_seeds_then_nan():
    judge = ScriptedJudge(lambda request: "Sorry, I cannot rate this caption.")
    [score] = run(LinguisticReward(judge), [item("A red ball.")])
    assert math.isnan(score.value) and score.errors == 1 and score.record["reasks"] == 2
    assert [r.seed for r in judge.requests] == [None, 1, 2]
    assert [r.temperature for r in judge.requests] == [0.0, 0.7, 0.7]


def test_verdicts_missing_a_claim_are_reasked():
    rules = RuleBasedResponder()

    def forgetful(request):
        answer = rules(request)
        if tagged_section(request.messages[0].text, "claims") is not None and request.seed is None:
            verdicts = json.loads(answer)["verdicts"][:-1]  # drop the last claim's verdict on the first ask
            return json.dumps({"verdicts": verdicts})
        return answer

    judge = ScriptedJudge(forgetful)
    [score] = run(PrecisionReward(judge, judge), [item("A red ball. A purple cube.")])
    assert score.value == 0.5 and score.errors == 0 and score.record["reasks"] == 1


def test_recall_fraction_of_reference_claims_covered():
    judge = ScriptedJudge(RuleBasedResponder())
    reference = "A brown dog lies on green grass. A wooden fence stands behind."
    scores = run(
        RecallReward(judge),
        [item("A brown dog lies on the green grass.", reference), item("", reference), item("A cat.", reference)],
    )
    assert [s.value for s in scores] == [0.5, 0.0, 0.0]
    assert [c["covered"] for c in scores[0].record["reference_claims"]] == [True, False]


def test_recall_decomposes_each_reference_once_across_captions_and_batches():
    judge = ScriptedJudge(RuleBasedResponder(), latency_s=0.01)
    recall = RecallReward(judge)
    items = [item(f"A red ball {g}.", image_id=f"img{p}") for p in range(3) for g in range(4)]
    run(recall, items)
    decompositions = [r for r in judge.requests if tagged_section(r.messages[0].text, "description") is not None]
    assert len(decompositions) == 3
    run(recall, items)  # a new batch (and a new event loop) reuses the in-memory decompositions
    decompositions = [r for r in judge.requests if tagged_section(r.messages[0].text, "description") is not None]
    assert len(decompositions) == 3


def test_recall_unscorable_cases_are_nan():
    judge = FailingJudge()
    recall = RecallReward(judge)
    [failed] = run(recall, [item("A red ball.")])
    [again] = run(recall, [item("A red ball.")])
    assert math.isnan(failed.value) and failed.errors == 1 and judge.calls == 2  # failures are not cached
    assert math.isnan(again.value)
    rules = ScriptedJudge(RuleBasedResponder())
    [no_reference] = run(RecallReward(rules), [RewardItem("i", "A ball.", ("  ",), IMAGE)])
    [no_claims] = run(RecallReward(rules), [item("A ball.", reference="...")])
    assert math.isnan(no_reference.value) and math.isnan(no_claims.value)
    assert no_reference.errors == no_claims.errors == 0


def test_linguistic_mean_of_three_scores_scaled_to_unit_interval():
    judge = ScriptedJudge(RuleBasedResponder())
    fluent, stutter, empty = run(LinguisticReward(judge), [item("A red ball."), item("A red red ball."), item("")])
    assert fluent.value == pytest.approx((24 / 3 - 1) / 9)
    assert stutter.value == pytest.approx((18 / 3 - 1) / 9)
    assert empty.value == 0.0 and fluent.record["scores"] == {"clarity": 7.0, "fluency": 9.0, "coherence": 8.0}


QUESTIONS = [
    {"question": "What colour is the ball?", "options": ["red", "blue", "green"], "answer": 0},
    {"question": "Where is the ball?", "options": ["on the floor", "in the air"], "answer": "on the floor"},
    {"question": "How many balls?", "options": ["one", "two", "three", "four"], "answer": 0},
]


def qa_item(caption, image_id="img0"):
    return RewardItem(image_id, caption, ("ref",), None, {"questions": QUESTIONS})


def test_caprl_draws_are_deterministic_shuffled_and_end_with_cannot_answer():
    config = CapRLQAConfig()
    questions = parse_questions(qa_item("x"))
    draws = draw_questions(questions, "img0", config)
    assert len(draws) == 8 and draws == draw_questions(questions, "img0", config)
    assert draws != draw_questions(questions, "img1", config)
    assert len({d.question for d in draws}) < 8  # with replacement: 8 draws from 3 questions repeat
    orders = set()
    for draw in draws:
        source = next(q for q in questions if q.question == draw.question)
        assert draw.options[:-1] != () and sorted(draw.options[:-1]) == sorted(source.options)
        assert draw.options[draw.correct] == source.options[source.answer]
        assert draw.options[-1] == config.cannot_answer_text and draw.cannot_answer == len(draw.options) - 1
        orders.add(draw.options[:-1])
    assert len(orders) > len(questions)  # options really are shuffled


def test_caprl_accuracy_from_caption_alone():
    judge = ScriptedJudge(RuleBasedResponder())
    reward = CapRLQAReward(judge)
    items = [qa_item("One red ball lies on the floor."), qa_item("A red ball."), qa_item("")]
    full, partial, empty = run(reward, items)
    assert full.value == 1.0 and full.errors == 0 and len(full.record["draws"]) == 8
    draws = partial.record["draws"]
    expected = sum(d["options"][d["correct"]] == "red" for d in draws) / 8
    assert partial.value == pytest.approx(expected) and 0 < expected < 1
    assert all(d["chosen"] in (d["correct"], len(d["options"]) - 1) for d in draws)
    assert empty.value == 0.0
    half = CapRLQAReward(judge, CapRLQAConfig(cannot_answer_credit=0.5))
    [credited] = run(half, [qa_item("A red ball.")])
    assert credited.value == pytest.approx(expected + (1 - expected) * 0.5)


def test_caprl_answer_parsing_and_question_validation():
    options = ("red", "blue", "cannot answer")
    assert [chosen_index(a, options) for a in ("B", "(b)", "C.", " Blue ")] == [1, 1, 2, 1]
    with pytest.raises(JudgeOutputError):
        chosen_index("D", options)
    with pytest.raises(ValueError, match=r"metadata\['questions'\]"):
        asyncio.run(CapRLQAReward(ScriptedJudge(RuleBasedResponder())).score([item("x")]))
    bad = RewardItem("i", "c", ("r",), None, {"questions": [{"question": "q", "options": ["a", "b"], "answer": 5}]})
    with pytest.raises(ValueError, match=r"\['answer'\]"):
        parse_questions(bad)


def components_with(judge):
    return [PrecisionReward(judge, judge), RecallReward(judge), LinguisticReward(judge), CapRLQAReward(judge)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=200) | st.sampled_from(['{"claims": []}', '{"verdicts": [{"id": "c1"}]}',
                                                          '{"clarity": 99}', '```json\n{"answer": "Z"}\n```']),
                min_size=1, max_size=6))  # fmt: skip
def test_adversarial_judge_outputs_never_raise_out_of_components(replies):
    counter = iter(range(10**9))
    judge = ScriptedJudge(lambda request: replies[next(counter) % len(replies)])
    items = [qa_item("A red ball lies on the floor.")]
    items = [RewardItem(i.image_id, i.caption, ("A red ball. A floor.",), IMAGE, i.metadata) for i in items]
    for component in components_with(judge):
        [score] = run(component, items)
        assert score.errors >= 0
        if math.isnan(score.value):
            assert score.errors >= 1 or "reason" in score.record, (component.name, score.record)
        else:
            assert 0.0 <= score.value <= 1.0


def test_prompts_are_versioned_files_with_checked_fields():
    from balcap_jax.rewards.prompt_templates import available_prompts, render_prompt

    names = ("caption_qa", "coverage", "decompose_claims", "linguistic", "verify_claims")
    assert available_prompts() == {name: (1,) for name in names}
    text = render_prompt("linguistic", 1, caption="A $5 {ball}.")
    assert "<caption>\nA $5 {ball}.\n</caption>" in text  # user text is data, never re-interpreted
    with pytest.raises(ValueError, match=r"missing \['caption'\], unknown \['captoin'\]"):
        render_prompt("linguistic", 1, captoin="x")
    with pytest.raises(ValueError, match="no prompt 'linguistic' version 7"):
        render_prompt("linguistic", 7, caption="x")
