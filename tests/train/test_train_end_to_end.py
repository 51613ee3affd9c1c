"""The training entry point end to end on a miniature recipe: outputs, exact resume after kill -9, bad config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from balcap_jax import default_config
from balcap_jax.trainer.loop import run

ROOT = Path(__file__).resolve().parents[2]

MINI = {
    "data.shapes_world.num_train": 24,
    "data.shapes_world.num_eval": 8,
    "data.prompts_per_batch": 2,
    "sampling.group_size": 4,
    "sampling.max_new_tokens": 12,
    "train.sft_steps": 2,
    "train.sft_batch_size": 4,
    "train.rl_steps": 6,
    "checkpoint.every_steps": 2,
    "checkpoint.keep": 10,
    "checkpoint.export_hf": False,
}
# Wall-clock measurements differ between runs; everything else must match exactly after a resume.
NONDETERMINISTIC = ("time/", "wall_time", "latency", "compile", "sampler/", "tokens_per_s")


def mini_config(data_dir: str):
    config = default_config.get_config()
    for path, value in MINI.items():
        node = config
        *parents, leaf = path.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    config.data.records_dir = data_dir
    return config


def _flags(data_dir: str) -> list[str]:
    return [f"--config.{k}={v}" for k, v in MINI.items()] + [f"--config.data.records_dir={data_dir}"]


def _single_device_env() -> dict[str, str]:
    """The child runs like a user's run: one CPU device (the suite's 8 fake devices would not match the recipe's
    1x1x1 mesh, which the validator rightly rejects)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def _metrics(workdir: Path) -> dict[int, dict]:
    rows = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        # the final evaluation writes a second row at the last step: merge rows per step
        rows.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if not any(tag in k for tag in NONDETERMINISTIC)}
        )
    return rows


@pytest.mark.slow
def test_kill_minus_nine_then_resume_matches_an_uninterrupted_run(tmp_path):
    data_dir = str(tmp_path / "data")
    reference = run(mini_config(data_dir), tmp_path / "uninterrupted", echo=lambda *_: None,
                    devices=jax.devices()[:1])
    assert reference.final_step == 8 and not reference.stopped_early
    assert set(reference.eval_end) == {"precision", "recall", "linguistic", "total"}
    assert (tmp_path / "uninterrupted" / "samples.jsonl").exists()

    workdir = tmp_path / "killed"
    command = [sys.executable, "-m", "balcap_jax.train", f"--workdir={workdir}", *_flags(data_dir)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=_single_device_env())
    deadline = time.monotonic() + 600
    try:
        while not (workdir / "checkpoints" / "4").is_dir():  # orbax renames a step dir into place when complete
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 4 within 10 minutes"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    completed = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert completed and completed[-1] < 8, f"the run finished before it was killed: {completed}"

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_single_device_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {completed[-1]}" in resumed.stdout
    assert "reward_gain total=" in resumed.stdout.splitlines()[-1]

    expected, actual = _metrics(tmp_path / "uninterrupted"), _metrics(workdir)
    assert sorted(actual) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6, nan_ok=True), step


@pytest.mark.slow
def test_the_loop_runs_sharded_on_a_2x2x2_mesh_and_matches_one_device(tmp_path):
    data_dir = str(tmp_path / "data")
    config = mini_config(data_dir)
    config.train.rl_steps = 2
    single = run(config, tmp_path / "one", echo=lambda *_: None, devices=jax.devices()[:1])
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    sharded = run(config, tmp_path / "mesh", echo=lambda *_: None)
    assert sharded.final_step == single.final_step == 4
    one, mesh = _metrics(tmp_path / "one"), _metrics(tmp_path / "mesh")
    for step in (1, 2):  # teacher-forced steps see identical inputs: only reduction order may differ
        for key in ("sft/nll", "sft/grad_norm"):
            assert mesh[step][key] == pytest.approx(one[step][key], rel=1e-4), (step, key)
    for step in (3, 4):  # sampled steps: every component judged, finite rewards and losses
        assert all(mesh[step][f"reward/{k}_nan_count"] == 0 for k in ("precision", "recall", "linguistic"))
        assert all(v == v for k, v in mesh[step].items() if k.startswith("loss/"))
    restored = sorted(int(p.name) for p in (tmp_path / "mesh" / "checkpoints").iterdir() if p.name.isdigit())
    assert restored[-1] == 4


def test_a_wrong_config_field_fails_fast_with_its_name(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "balcap_jax.train", f"--workdir={tmp_path}", "--config.sampling.group_size=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_single_device_env(),
    )
    assert result.returncode == 2
    assert "group_size" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
