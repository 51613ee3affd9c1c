"""The protocol runner: items judged once, judge outages not cached (retried next run), missing captions listed."""

import asyncio

from balcap_jax.evaluation import caparena
from balcap_jax.evaluation.judging import EvalJudges
from balcap_jax.evaluation.results_store import ResultsStore
from balcap_jax.evaluation.runner import run_protocol
from balcap_jax.evaluation.scripted_judge import EvalRuleResponder
from balcap_jax.rewards.judges.protocol import JudgeReply, JudgeUnavailable
from balcap_jax.rewards.structured_call import AskPolicy
from tests.evaluation.eval_fixtures import write_jsonl, write_png


class OutageJudge:
    """The scripted rules, except that requests mentioning `down_for` fail as if the server were unreachable."""

    model = "scripted-eval-rules"
    multimodal = True

    def __init__(self, down_for: str | None):
        self.down_for = down_for
        self.responder = EvalRuleResponder()
        self.calls = 0

    async def generate(self, request):
        self.calls += 1
        if self.down_for and any(self.down_for in m.text for m in request.messages):
            raise JudgeUnavailable("connection refused")
        return JudgeReply(self.responder(request))


def _arena(tmp_path, judge):
    write_png(tmp_path / "a.png")
    rows = [{"image_id": f"i{n}", "image": "a.png", "reference": "A red bus.", "baselines": {"b": "A bus."}}
            for n in range(4)]
    protocol = caparena.CapArena(caparena.load_items(write_jsonl(tmp_path / "arena.jsonl", rows)),
                                 EvalJudges(judge, judge))  # fmt: skip
    protocol.ask_policy = AskPolicy(parse_attempts=1)
    return protocol


def test_judge_outages_are_not_cached_and_are_retried_next_run(tmp_path):
    captions = {"i0": "A red bus. It is big.", "i1": "A red bus. It is big.", "i2": "Flaky caption.", "i4": "x"}
    store_path = tmp_path / "caparena.items.jsonl"
    with ResultsStore(store_path) as store:
        first = asyncio.run(run_protocol(_arena(tmp_path, OutageJudge("Flaky")), captions, store))
    assert first.judged == 3 and first.not_stored == 1 and first.missing_captions == ["i3"]
    assert first.metrics["per_baseline"]["b"]["unscored"] == 1  # i2 failed; i3 (no caption) is listed, not scored
    healthy = OutageJudge(None)
    with ResultsStore(store_path) as store:
        second = asyncio.run(run_protocol(_arena(tmp_path, healthy), captions, store))
    assert second.resumed == 2 and second.judged == 1 and healthy.calls == 1
    assert second.metrics["per_baseline"]["b"]["unscored"] == 0
    assert [r["image_id"] for r in second.results] == ["i0", "i1", "i2"]
