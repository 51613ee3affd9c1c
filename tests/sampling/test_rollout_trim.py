"""Completion trimming: the update sees only the columns some row generated into, and its loss does not change."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from balcap_jax.rl import losses as losses_lib
from balcap_jax.rl import update as update_lib
from balcap_jax.rl.policy_logprobs import make_log_prob_fn
from balcap_jax.sampling.rollout import Rollout, build_training_batch, completion_bucket, trim_rollout
from tests.sampling.toy_lm import make_toy
from tests.sampling.toy_prompts import EOS, FIRST_TEXT_TOKEN, PAD, tile_toy_vision, toy_prompts

T_NEW = 40
GROUP = 2


def padded_rollout(lengths: list[int], starts: np.ndarray, *, seed: int = 0) -> Rollout:
    """A rollout as the sampler leaves it: `lengths[n]` tokens (the last one EOS), pad and zeros after."""
    rng = np.random.default_rng(seed)
    rows = len(lengths)
    tokens = np.full((rows, T_NEW), PAD, np.int32)
    logprobs = np.zeros((rows, T_NEW), np.float32)
    mask = np.zeros((rows, T_NEW), bool)
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.integers(FIRST_TEXT_TOKEN, 64, size=length)
        tokens[row, length - 1] = EOS
        logprobs[row, :length] = -rng.uniform(0.1, 3.0, size=length)
        mask[row, :length] = True
    return Rollout(tokens=tokens, logprobs=logprobs, completion_mask=mask, lengths=np.asarray(lengths, np.int32),
                   finish_reason=np.zeros((rows,), np.int32), start_positions=starts.astype(np.int32),
                   decode_steps=np.asarray(max(lengths), np.int32))


def test_bucket_is_the_next_power_of_two_above_the_floor_capped_at_the_buffer():
    for longest in range(T_NEW + 1):
        bucket = completion_bucket(longest, T_NEW)
        assert longest <= bucket <= T_NEW
        if bucket < T_NEW:  # a power of two no smaller than the floor, and the smallest one that fits
            assert bucket & (bucket - 1) == 0 and bucket >= 16
            assert bucket // 2 < max(longest, 16)
    assert completion_bucket(17, 512) == 32 and completion_bucket(3, 512) == 16 and completion_bucket(300, 400) == 400


def test_the_number_of_distinct_update_widths_stays_logarithmic():
    widths = {completion_bucket(longest, 512) for longest in range(513)}
    assert len(widths) <= math.log2(512 / 16) + 2
    assert sorted(widths) == [16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize("bad", [-1, T_NEW + 1])
def test_a_longest_length_outside_the_buffer_is_rejected_with_the_fix(bad):
    with pytest.raises(ValueError, match="longest="):
        completion_bucket(bad, T_NEW)


def test_trimming_below_a_generated_token_is_refused():
    rollout = padded_rollout([5, 21], np.zeros(2))
    with pytest.raises(ValueError, match="columns=16.*longest row 21"):
        trim_rollout(rollout, 16)
    assert trim_rollout(rollout, T_NEW) is rollout


def _batches(lengths: list[int]):
    prompts = toy_prompts((9, 5), images=2, dim=32)
    starts = np.repeat(np.asarray(prompts["positions"])[0].max(axis=-1) + 1, GROUP)
    rollout = padded_rollout(lengths, starts)
    width = completion_bucket(max(lengths), T_NEW)
    full = build_training_batch(prompts, rollout, GROUP, tile_vision=tile_toy_vision)
    trimmed = build_training_batch(prompts, trim_rollout(rollout, width), GROUP, tile_vision=tile_toy_vision)
    advantages = np.linspace(-1.0, 1.0, len(lengths)).astype(np.float32)
    return ({**full, "advantages": advantages}, {**trimmed, "advantages": advantages}, width)


def test_the_trimmed_batch_is_the_untrimmed_one_without_its_padded_columns():
    full, trimmed, width = _batches([6, 11, 3, 14])
    assert width == 16 and trimmed["completion_ids"].shape == (4, 16)
    prompt_columns = full["input_ids"].shape[1] - T_NEW
    for key in ("input_ids", "attention_mask", "positions"):
        np.testing.assert_array_equal(np.asarray(trimmed[key]), np.asarray(full[key])[..., : prompt_columns + width])
        assert not np.asarray(full["attention_mask"])[:, prompt_columns + width:].any()
    for key in ("completion_ids", "completion_mask", "old_logprobs"):
        np.testing.assert_array_equal(np.asarray(trimmed[key]), np.asarray(full[key])[:, :width])


@pytest.mark.parametrize("aggregation", losses_lib.AGGREGATIONS)
def test_every_aggregation_ignores_the_trimmed_columns(aggregation):
    """Per-token losses on the kept columns give the same scalar as on the full buffer (the columns cut off are
    off the mask), provided the Dr. GRPO constant is the buffer length rather than the batch's width."""
    full, trimmed, width = _batches([6, 11, 3, 14])
    per_token = np.random.default_rng(1).normal(size=full["completion_mask"].shape).astype(np.float32)
    mask = np.asarray(full["completion_mask"])
    assert not mask[:, width:].any()
    whole = losses_lib.aggregate_loss(per_token, mask, aggregation, norm_length=T_NEW)
    kept = losses_lib.aggregate_loss(per_token[:, :width], np.asarray(trimmed["completion_mask"]), aggregation,
                                     norm_length=T_NEW)
    assert float(kept) == pytest.approx(float(whole), rel=1e-6)


@pytest.mark.slow
def test_trimming_keeps_the_update(highest_precision):
    """Same tokens, fewer padded columns: the loss, its diagnostics and the updated weights are unchanged
    (Dr. GRPO aggregation, whose constant is the one place a column count could enter)."""
    full, trimmed, _ = _batches([6, 11, 3, 14])
    graphdef, params = nnx.split(make_toy())
    loss_config = losses_lib.LossConfig(aggregation="seq-mean-token-sum-norm", norm_length=T_NEW, tis_cap=2.0)
    optimizer = optax.sgd(1.0)  # the new weights are the old minus the gradient (Adam would rescale noise)
    update = update_lib.make_update_step(make_log_prob_fn(graphdef), optimizer, loss_config, donate=False)
    state = update_lib.TrainState.create(params, optimizer)
    (full_state, full_metrics), (trim_state, trim_metrics) = update(state, full), update(state, trimmed)
    assert float(full_metrics["loss"]) != 0.0
    for key, value in full_metrics.items():
        np.testing.assert_allclose(float(trim_metrics[key]), float(value), rtol=1e-5, atol=1e-7, err_msg=key)
    for a, b in zip(jax.tree.leaves(trim_state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
