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
    # The loop's mechanics from random weights: the shipped warm start's 12-token captions score alike within a
    # group, so its updates would barely move the policy (KL, ratio and resume tests need a moving policy).
    "train.init_from": "",
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
    assert set(reference.eval_end) == {"precision", "recall", "linguistic", "total", "b_capscore"}
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
    for step in (3, 4):  # sampled steps with images: the same rollouts, rewards, advantages and losses
        assert all(mesh[step][f"reward/{k}_nan_count"] == 0 for k in ("precision", "recall", "linguistic"))
        compared = [k for k in one[step] if k.startswith(("reward/", "advantages_", "loss/", "length/"))]
        assert len(compared) > 30
        for key in compared:
            assert mesh[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)
    restored = sorted(int(p.name) for p in (tmp_path / "mesh" / "checkpoints").iterdir() if p.name.isdigit())
    assert restored[-1] == 4


@pytest.mark.slow
def test_the_embedded_default_runs_on_eight_local_devices_like_on_one(tmp_path):
    """The README's first command on a TPU VM or an 8-GPU box: the default mesh (fsdp=-1) takes every device."""
    config = mini_config(str(tmp_path / "data"))
    config.data.prompts_per_batch = 8  # rows of every batch must divide over 8 devices
    config.train.sft_batch_size = 8
    config.train.rl_steps = 2
    config.data.shapes_world.num_eval = 32
    assert config.mesh.fsdp == -1
    run(config, tmp_path / "one", echo=lambda *_: None, devices=jax.devices()[:1])
    env = dict(os.environ)  # the suite's 8 fake devices (conftest)
    flags = [f"--config.{k}={v}" for k, v in {**MINI, "data.prompts_per_batch": 8, "train.sft_batch_size": 8,
                                              "train.rl_steps": 2, "data.shapes_world.num_eval": 32}.items()]
    done = subprocess.run([sys.executable, "-m", "balcap_jax.train", f"--workdir={tmp_path / 'eight'}", *flags,
                           f"--config.data.records_dir={tmp_path / 'data'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("reward_gain total=")
    one, eight = _metrics(tmp_path / "one"), _metrics(tmp_path / "eight")
    assert sorted(one) == sorted(eight)
    for step in one:
        for key, value in one[step].items():
            if key.startswith(("sft/nll", "reward/", "advantages_", "loss/", "eval_end/")) and "sft/learning" not in key:
                assert eight[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.slow
def test_sft_loss_is_at_temperature_one_whatever_the_sampling_temperature(tmp_path):
    """Supervised cross-entropy is the model's own distribution; the sampler's temperature must not leak into it."""
    nll = {}
    for temperature in (1.0, 0.5):
        config = mini_config(str(tmp_path / "data"))
        config.train.rl_steps = 0
        config.sampling.temperature = temperature
        run(config, tmp_path / f"t{temperature}", echo=lambda *_: None, devices=jax.devices()[:1])
        nll[temperature] = [row["sft/nll"] for row in _metrics(tmp_path / f"t{temperature}").values() if "sft/nll" in row]
    assert len(nll[1.0]) == 2
    assert nll[0.5] == pytest.approx(nll[1.0], rel=1e-6)


@pytest.mark.slow
def test_kl_to_a_frozen_reference_and_exact_first_ratio(tmp_path):
    """loss.kl_coef > 0: the reference is the policy as RL starts, so the KL is 0 at the first RL step and
    positive once the policy has moved; with one update per batch the ratio is exactly 1 at every update."""
    config = mini_config(str(tmp_path / "data"))
    config.loss.kl_coef = 0.1
    config.train.rl_steps = 3
    config.optim.lr = 3e-3
    run(config, tmp_path / "kl", echo=lambda *_: None, devices=jax.devices()[:1])
    rows = _metrics(tmp_path / "kl")
    rl_steps = [rows[s] for s in (3, 4, 5)]
    assert rl_steps[0]["loss/kl"] == pytest.approx(0.0, abs=1e-6)
    assert rl_steps[-1]["loss/kl"] > 1e-6
    for row in rl_steps:
        assert row["loss/ratio_min"] == row["loss/ratio_max"] == 1.0 and row["loss/clip_fraction"] == 0.0


def test_a_wrong_config_field_fails_fast_with_its_name(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "balcap_jax.train", f"--workdir={tmp_path}", "--config.sampling.group_size=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_single_device_env(),
    )
    assert result.returncode == 2
    assert "group_size" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
