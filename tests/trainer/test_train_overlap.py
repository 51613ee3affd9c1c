"""train.overlap="one_step_off": batch t+1 is sampled while batch t is judged; staleness logged, pi_old from the
weights that sampled, completion columns trimmed, and a resume from a checkpoint holding the batch sampled one
step ahead equals the uninterrupted run."""

import json
import math
import shutil
import subprocess
import sys

import jax
import pytest

from balcap_jax import config as config_lib
from balcap_jax.checkpoint import Checkpointer
from balcap_jax.trainer.loop import run
from balcap_jax.trainer.rl_step import overlap_mode
from tests.trainer.test_train_end_to_end import MINI, ROOT, _metrics, _single_device_env, mini_config


def overlap_config(data_dir: str, **overrides):
    config = mini_config(data_dir)
    config.train.overlap = "one_step_off"
    config.optim.lr = 3e-3  # the policy moves visibly in one update (no warm-up from lr 0), so a stale
    config.optim.warmup_steps = 0  # batch's ratio is visibly not 1
    for path, value in overrides.items():
        section, leaf = path.split(".")
        config[section][leaf] = value
    return config


def test_an_unknown_overlap_mode_is_rejected_with_the_field_and_the_choices():
    config = mini_config("/nonexistent")
    config.train.overlap = "two_steps_off"
    with pytest.raises(ValueError, match=r"config\.train\.overlap='two_steps_off'.*'one_step_off'"):
        overlap_mode(config)
    with pytest.raises(config_lib.ConfigError, match=r"config\.train\.overlap.*allowed values: 'none', 'one_step_off'"):
        config_lib.validate(config, device_count=1, process_count=1, check_paths=False)


@pytest.mark.slow
def test_one_step_off_logs_staleness_and_takes_the_ratio_against_the_sampling_weights(tmp_path):
    config = overlap_config(str(tmp_path / "data"), **{"train.rl_steps": 3, "train.sft_steps": 1})
    run(config, tmp_path / "run", echo=lambda *_: None, devices=jax.devices()[:1])
    rows = _metrics(tmp_path / "run")
    rl = [rows[s] for s in (2, 3, 4)]
    # Step 1 updates on the batch its own weights sampled; every later one on the previous weights' batch.
    assert [row["overlap/staleness"] for row in rl] == [0.0, 1.0, 1.0]
    assert rl[0]["loss/ratio_min"] == pytest.approx(1.0, abs=1e-4) and rl[0]["loss/clip_fraction"] == 0.0
    for row in rl[1:]:  # pi_old is the sampling weights', not the update's own pass (that ratio would be 1)
        assert row["loss/ratio_max"] - row["loss/ratio_min"] > 1e-3
    max_new = int(config.sampling.max_new_tokens)
    for row in rl:
        assert row["length/tokens_max"] <= row["update/completion_columns"] <= max_new
    raw = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    widths = [row["update/compiled_widths"] for row in raw if "update/compiled_widths" in row]
    assert len(widths) == 3 and widths[-1] <= math.log2(max_new / 16) + 2  # one compiled update per width
    for row in rl:
        assert all(row[f"reward/{k}_nan_count"] == 0 for k in ("precision", "recall", "linguistic"))


@pytest.mark.slow
def test_resume_with_a_pending_batch_equals_the_uninterrupted_run(tmp_path):
    """A checkpoint of an overlapped run holds the batch sampled one step ahead: restored, rejudged, updated on
    exactly as the uninterrupted run did (the checkpoint at step 4 is what a run killed after it leaves)."""
    config = overlap_config(str(tmp_path / "data"))
    reference = run(config, tmp_path / "uninterrupted", echo=lambda *_: None, devices=jax.devices()[:1])
    assert reference.final_step == 8
    workdir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "uninterrupted", workdir)
    for later in ("6", "8"):
        shutil.rmtree(workdir / "checkpoints" / later)
    with Checkpointer(workdir) as checkpointer:
        data_state = checkpointer.restore_data_state(4)
    assert data_state["rl_pending_version"] == 1  # sampled by the weights after RL update 1, updated on at step 5

    with pytest.raises(ValueError, match="train.overlap"):  # the pending batch is never silently dropped
        run(mini_config(str(tmp_path / "data")), workdir, echo=lambda *_: None, devices=jax.devices()[:1])
    said = []
    resumed = run(config, workdir, echo=said.append, devices=jax.devices()[:1])
    assert resumed.final_step == 8 and "resumed from step 4" in said[0]
    expected, actual = _metrics(tmp_path / "uninterrupted"), _metrics(workdir)
    assert sorted(actual) == sorted(expected) == list(range(1, 9))
    for step in range(5, 9):
        assert actual[step]["overlap/staleness"] == 1.0
        assert actual[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6, nan_ok=True), step
    assert resumed.eval_end == pytest.approx(reference.eval_end, rel=1e-5)


@pytest.mark.slow
def test_the_embedded_default_runs_with_one_step_off_from_the_command_line(tmp_path):
    flags = [f"--config.{k}={v}" for k, v in {**MINI, "train.rl_steps": 3}.items()]
    done = subprocess.run([sys.executable, "-m", "balcap_jax.train", f"--workdir={tmp_path / 'run'}", *flags,
                           f"--config.data.records_dir={tmp_path / 'data'}", "--config.train.overlap=one_step_off"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=_single_device_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("reward_gain total=")
    rows = _metrics(tmp_path / "run")
    assert [rows[s]["overlap/staleness"] for s in (3, 4, 5)] == [0.0, 1.0, 1.0]
