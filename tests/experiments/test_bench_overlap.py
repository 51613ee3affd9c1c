"""experiments/bench_overlap.py: its latency calibration and step bookkeeping (the race itself is the script's run)."""

import json
from pathlib import Path

import pytest

from tests.experiments.script_module import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench_overlap.py"


@pytest.fixture(scope="module")
def bench():
    with script_module(SCRIPT, "bench_overlap") as module:
        yield module


def test_the_calibrated_latency_makes_judging_as_long_as_sampling_and_update(bench):
    rows = [{"time/reward_s": 0.4 * k, "time/sample_s": 1.0, "time/old_logprobs_s": 0.2, "time/update_s": 0.8}
            for k in (1, 1, 2)]
    # judges: 0.4 s per step at 0.2 s per request; sampling + behaviour log-probs + update: 2.0 s.
    assert bench.calibrated_latency(rows, 0.2) == pytest.approx(0.2 * 2.0 / 0.4)
    with pytest.raises(ValueError, match="probe_s=0.2"):
        bench.calibrated_latency([{**rows[0], "time/reward_s": 0.0}], 0.2)


def test_step_rows_skip_the_first_step_and_merge_the_evaluation_rows(bench, tmp_path):
    lines = [{"step": 0, "eval_start/total": 0.25}, {"step": 1, "time/step_wall_s": 9.0}, {"step": 2, "time/step_wall_s": 1.5},
             {"step": 3, "time/step_wall_s": 1.25}, {"step": 3, "eval_end/total": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = bench.step_rows(tmp_path)
    assert [r["time/step_wall_s"] for r in rows] == [1.5, 1.25]
    assert rows[-1]["eval_end/total"] == 0.5


def test_the_bench_config_is_the_production_loop_with_http_judges(bench):
    config = bench.bench_config("one_step_off", "http://127.0.0.1:1/v1", rl_steps=3, data_dir="/tmp/x")
    assert config.train.overlap == "one_step_off" and config.train.rl_steps == 3
    assert config.rewards.judge.backend == "openai" and config.rewards.judge.vlm_url == "http://127.0.0.1:1/v1"
