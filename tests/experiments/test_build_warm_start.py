"""experiments/build_warm_start.py: the same command, seed and commit rebuild the same file (what lets the repository
ship a warm start), and the metadata records how it was made."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import build_warm_start


def _miniature(monkeypatch):
    """The builder's config with a miniature world and batch, so two builds fit in a test."""
    original = build_warm_start.warm_start_config

    def small(sft_steps: int, seed: int):
        config = original(sft_steps, seed)
        config.data.shapes_world.num_train = 16
        config.data.shapes_world.num_eval = 8
        config.data.prompts_per_batch = 8  # batches divide over the suite's 8 fake devices (fsdp=-1)
        config.sampling.group_size = 2
        config.sampling.max_new_tokens = 8
        config.train.sft_batch_size = 8
        config.eval.batch_size = 8
        return config

    monkeypatch.setattr(build_warm_start, "warm_start_config", small)


def test_the_builder_config_starts_from_random_weights_and_runs_sft_only():
    config = build_warm_start.warm_start_config(7, 3)
    assert (config.train.sft_steps, config.train.rl_steps, config.train.init_from, config.seed) == (7, 0, "", 3)
    with pytest.raises(ValueError, match="--sft_steps=0"):
        build_warm_start.warm_start_config(0, 0)


@pytest.mark.slow
def test_two_builds_with_one_command_are_identical(tmp_path, monkeypatch):
    _miniature(monkeypatch)
    metas = []
    for name in ("a", "b"):
        meta = build_warm_start.build(str(tmp_path / name / "ws"), sft_steps=3, seed=5,
                                      workdir=str(tmp_path / f"run_{name}"), command="CMD")
        metas.append(meta)
    with np.load(tmp_path / "a" / "ws.npz") as a, np.load(tmp_path / "b" / "ws.npz") as b:
        assert a.files == b.files and len(a.files) > 10
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    record = json.loads((tmp_path / "a" / "ws.json").read_text())
    assert record["command"] == "CMD" and record["seed"] == 5 and record["sft_steps"] == 3
    assert record["vocab_tokenizer_ids"] == json.loads((tmp_path / "b" / "ws.json").read_text())["vocab_tokenizer_ids"]
    assert metas[0]["held_out_greedy"] == metas[1]["held_out_greedy"]
