"""metrics: JSONL/TensorBoard writers (flushed, resumable), summaries, timers, compile counts, progress/ETA."""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balcap_jax import metrics


def _events(workdir):
    """Scalar events as {(tag, step): value}, read with TensorBoard's own reader (tensorboardX ships protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted((workdir / metrics.TENSORBOARD_DIR).iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset : offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out[(value.tag, event.step)] = value.simple_value
    return out


def test_scalars_and_samples_land_in_jsonl_and_tensorboard(tmp_path):
    with metrics.MetricsWriter(tmp_path) as writer:
        writer.write_scalars(1, {"loss": jnp.float32(0.5), "reward/precision_mean": np.float64(0.25), "nan": float("nan")})
        writer.write_samples(1, [{"image_id": "img0", "caption": "a red | circle", "rewards": {"precision": 1.0}}])
    lines = [json.loads(line) for line in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[0]["loss"] == 0.5 and lines[0]["nan"] is None
    sample = json.loads((tmp_path / metrics.SAMPLES_FILE).read_text())
    assert sample == {"step": 1, "image_id": "img0", "caption": "a red | circle", "rewards": {"precision": 1.0}}
    events = _events(tmp_path)
    assert events[("loss", 1)] == 0.5 and events[("reward/precision_mean", 1)] == 0.25


def test_nothing_is_lost_on_kill_9(tmp_path):
    script = (
        "import os, signal, sys\n"
        "from balcap_jax.metrics import MetricsWriter\n"
        "w = MetricsWriter(sys.argv[1], tensorboard=False)\n"
        "for step in range(5): w.write_scalars(step, {'x': step})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9
    steps = [json.loads(line)["step"] for line in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]


def test_resume_drops_what_a_killed_run_logged_after_the_checkpoint(tmp_path):
    with metrics.MetricsWriter(tmp_path) as writer:
        for step in range(1, 7):
            writer.write_scalars(step, {"x": step})
            writer.write_samples(step, [{"caption": f"c{step}"}])
    with open(tmp_path / metrics.METRICS_FILE, "a") as f:
        f.write('{"step": 7, "x"')  # torn line from a kill mid-write
    with metrics.MetricsWriter(tmp_path, resume_step=4) as writer:
        writer.write_scalars(5, {"x": 50})
    steps = [json.loads(line)["step"] for line in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    samples = [json.loads(line)["step"] for line in (tmp_path / metrics.SAMPLES_FILE).read_text().splitlines()]
    assert samples == [1, 2, 3, 4]
    assert _events(tmp_path)[("x", 5)] == 50  # TensorBoard purged the old step 5


def test_disabled_writer_writes_nothing(tmp_path):
    with metrics.MetricsWriter(tmp_path / "run", enabled=False) as writer:
        writer.write_scalars(1, {"x": 1})
    assert not (tmp_path / "run").exists()


def test_reward_component_stats_excludes_nan():
    rewards = np.array([[[1.0, np.nan, 0.5], [0.0, np.nan, 0.5]], [[1.0, 0.2, np.nan], [0.0, 0.4, 0.5]]])
    stats = metrics.reward_component_stats(rewards, ["precision", "recall", "linguistic"])
    assert stats["reward/precision_mean"] == 0.5 and stats["reward/precision_std"] == 0.5
    assert stats["reward/precision_nan_count"] == 0
    assert stats["reward/recall_mean"] == pytest.approx(0.3) and stats["reward/recall_nan_count"] == 2
    assert stats["reward/linguistic_mean"] == 0.5 and stats["reward/linguistic_std"] == 0.0
    with pytest.raises(ValueError, match=r"\[P, G, K=2\]"):
        metrics.reward_component_stats(rewards, ["a", "b"])


def test_array_stats_with_mask():
    stats = metrics.array_stats("length", [3, 5, 100], mask=[True, True, False])
    assert stats == {"length_mean": 4.0, "length_std": 1.0, "length_min": 3.0, "length_max": 5.0}
    assert np.isnan(metrics.array_stats("a", [1.0], mask=[False])["a_mean"])


def test_phase_timer_accumulates_per_phase():
    ticks = iter([0.0, 1.0, 1.0, 3.5, 4.0, 4.5])
    timer = metrics.PhaseTimer(clock=lambda: next(ticks))
    with timer.phase("sample"):
        pass
    with timer.phase("update"):
        pass
    assert timer.run("sample", lambda: jnp.ones(2)).shape == (2,)
    assert timer.summary() == {"time/sample_s": 1.5, "time/update_s": 2.5, "time/total_s": 4.0}
    assert timer.summary() == {"time/total_s": 0}


def test_compile_counter_sees_recompiles_for_new_shapes():
    @jax.jit
    def double(x):
        return x * 2

    with metrics.CompileCounter() as counter:
        double(jnp.ones(3))
        double(jnp.ones(3))
        double(jnp.ones(4))
    assert counter.counts["double"] == 2
    assert counter.summary()["compile/count"] >= 2


def test_progress_line_and_eta():
    line = metrics.progress_line(40, 100, seconds_per_step=1.5, metrics={"loss": np.float32(0.125), "n": 3})
    assert line == "step 40/100 [########............]  40% 1.50 s/step ETA 1m30s | loss=0.125 n=3"
    assert metrics.format_duration(3725) == "1h02m05s" and metrics.format_duration(float("nan")) == "?"

    now = [100.0]
    stream = io.StringIO()
    progress = metrics.ConsoleProgress(10, every=2, stream=stream, clock=lambda: now[0], enabled=True)
    progress.update(1)  # first step: compile time, not counted in the rate
    now[0] = 130.0
    assert progress.update(3) is None  # not a reporting step
    now[0] = 106.0  # steps 1 -> 4 took 6 s: 2 s/step
    line = progress.update(4, {"reward": 0.5})
    assert "2.00 s/step ETA 12s" in line and stream.getvalue().endswith(line + "\n")


def test_samples_markdown_escapes_cells():
    table = metrics.samples_markdown([{"caption": "a|b\nc", "rewards": {"p": 0.123456}}])
    assert table.splitlines() == ["| caption | rewards.p |", "|---|---|", "| a\\|b c | 0.1235 |"]
