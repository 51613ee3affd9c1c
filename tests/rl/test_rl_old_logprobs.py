"""The update step's π_old (rl/update.py `old_logprobs`), `make_batch_logprobs`, and TIS inside the step: the ratio
is taken against the trainer's own log-probs, never the sampler's, and the sampler's only weight and diagnose."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from balcap_jax.rl import losses
from balcap_jax.rl.losses import LossConfig
from balcap_jax.rl.policy_logprobs import TRAINER_LOGPROBS, make_log_prob_fn, model_inputs
from balcap_jax.rl.update import (
    OptimizerConfig,
    TrainState,
    make_batch_logprobs,
    make_optimizer,
    make_update_step,
)
from tests.rl.rl_toy_lm import ToyCausalLM

VOCAB, DIM, SIZE, LENGTH, SCORED = 16, 8, 8, 6, 3
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=0.05, max_grad_norm=None))


@functools.cache
def _toy():
    graphdef, params = nnx.split(ToyCausalLM(VOCAB, DIM, 8, rngs=nnx.Rngs(0)))
    return graphdef, params, make_log_prob_fn(graphdef, chunk_size=5)


def _state():
    return TrainState.create(_toy()[1], OPTIMIZER)


def _sampled_batch(sampler_noise: float, seed: int = 0):
    """A batch whose "old_logprobs" are the trainer's own plus N(0, sampler_noise): a mismatched sampler.

    Returns (batch, trainer log-probs float32[B, T_c] at the initial params)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    batch = {
        "input_ids": jax.random.randint(keys[0], (SIZE, LENGTH), 0, VOCAB),
        "attention_mask": jnp.ones((SIZE, LENGTH), bool),
        "positions": jnp.broadcast_to(jnp.arange(LENGTH), (SIZE, LENGTH)),
        "completion_mask": (jax.random.uniform(keys[1], (SIZE, SCORED)) < 0.8).at[:, 0].set(True),
        "advantages": jax.random.normal(keys[2], (SIZE,)),
    }
    trainer, _ = _toy()[2](_toy()[1], batch)
    sampler = trainer + sampler_noise * jax.random.normal(keys[3], trainer.shape)
    return {**batch, "old_logprobs": sampler}, np.asarray(trainer)


@functools.cache
def _step(old_logprobs: str, tis_cap: float = 0.0):
    config = LossConfig(eps_low=0.2, eps_high=0.2, tis_cap=tis_cap)
    return make_update_step(_toy()[2], OPTIMIZER, config, donate=False, old_logprobs=old_logprobs)


def _masked(values, batch):
    return np.asarray(values, np.float64)[np.asarray(batch["completion_mask"])]


def test_one_update_per_batch_takes_the_ratio_against_its_own_logprobs():
    batch, trainer = _sampled_batch(sampler_noise=0.5)
    # The sampler's log-probs are far enough off that a ratio against them would clip tokens.
    sampler_ratio = np.exp(trainer - np.asarray(batch["old_logprobs"]))
    assert np.any(np.abs(_masked(sampler_ratio, batch) - 1) > 0.2)

    _, metrics = make_update_step(_toy()[2], OPTIMIZER, LossConfig(), donate=False)(_state(), batch)

    assert float(metrics["ratio_min"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["kl_to_old"]) == 0.0
    # The mismatch is measured, not acted on: mean and max |trainer − sampler| over completion tokens.
    diff = _masked(np.abs(trainer - np.asarray(batch["old_logprobs"])), batch)
    np.testing.assert_allclose(metrics["sampler_logprob_diff_mean"], diff.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["sampler_logprob_diff_max"], diff.max(), rtol=1e-5)
    # ... and the step is the plain policy gradient −Σ A·∇log π / N, untouched by the sampler's numbers.
    mask = batch["completion_mask"]

    def vanilla(params):
        logprobs, _ = _toy()[2](params, batch)
        return -jnp.sum(jnp.where(mask, batch["advantages"][:, None] * logprobs, 0.0)) / jnp.sum(mask)

    expected = optax.global_norm(jax.grad(vanilla)(_toy()[1]))
    np.testing.assert_allclose(metrics["grad_norm"], expected, rtol=1e-5)


def test_batch_logprobs_are_the_update_log_prob_fn_in_batch_order_with_micro_batches():
    batch, trainer = _sampled_batch(sampler_noise=0.0)
    whole = make_batch_logprobs(_toy()[2])(_toy()[1], batch)
    split = make_batch_logprobs(_toy()[2], micro_batches=4)(_toy()[1], batch)
    np.testing.assert_allclose(whole, trainer, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(split, trainer, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="micro_batches"):
        make_batch_logprobs(_toy()[2], micro_batches=0)


def test_several_updates_per_batch_keep_the_ratio_against_the_recomputed_logprobs():
    batch, _ = _sampled_batch(sampler_noise=0.5)
    state = _state()
    batch = {**batch, TRAINER_LOGPROBS: make_batch_logprobs(_toy()[2])(state.params, batch)}
    step = _step("batch")

    moved, first = step(state, batch)
    np.testing.assert_allclose([first["ratio_min"], first["ratio_max"]], 1.0, atol=1e-6)
    assert float(first["clip_fraction"]) == 0.0

    _, second = step(moved, batch)
    # By hand: the second update's ratio is π_moved / π_old with π_old fixed at the recomputed log-probs.
    old = np.asarray(batch[TRAINER_LOGPROBS])
    now, _ = _toy()[2](moved.params, batch)
    ratio = _masked(np.exp(np.asarray(now, np.float64) - old), batch)
    _, clipped, _ = losses.clipped_surrogate(now, old, batch["advantages"], eps_low=0.2, eps_high=0.2)
    assert ratio.max() > 1.2 or ratio.min() < 0.8, "the policy must have moved past the clip range"
    np.testing.assert_allclose(second["ratio_mean"], ratio.mean(), rtol=1e-5)
    np.testing.assert_allclose([second["ratio_min"], second["ratio_max"]], [ratio.min(), ratio.max()], rtol=1e-5)
    np.testing.assert_allclose(second["clip_fraction"], _masked(clipped, batch).mean(), rtol=1e-6)
    assert float(second["clip_fraction"]) > 0 and float(second["kl_to_old"]) > 0
    # The mismatch diagnostic compares the sampler with π_old, so it does not drift as the policy moves.
    np.testing.assert_allclose(second["sampler_logprob_diff_mean"], first["sampler_logprob_diff_mean"], rtol=1e-6)


def test_tis_weights_the_policy_gradient_by_the_capped_trainer_over_sampler_ratio():
    cap = 2.0
    batch, trainer = _sampled_batch(sampler_noise=1.0, seed=1)
    _, metrics = _step("current", tis_cap=cap)(_state(), batch)

    weights = np.minimum(np.exp(trainer.astype(np.float64) - np.asarray(batch["old_logprobs"])), cap)
    mask = np.asarray(batch["completion_mask"])
    assert np.any(weights[mask] == cap) and np.any(weights[mask] < cap)
    advantages = np.asarray(batch["advantages"], np.float64)[:, None]
    expected = np.sum(np.where(mask, -advantages * weights, 0.0)) / mask.sum()  # token-mean at ratio 1
    np.testing.assert_allclose(metrics["policy_loss"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["tis_weight_mean"], weights[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["tis_capped_fraction"], (weights[mask] == cap).mean(), rtol=1e-6)


def test_old_logprobs_mode_and_its_batch_key_are_validated():
    batch, _ = _sampled_batch(sampler_noise=0.0)
    with pytest.raises(ValueError, match="trainer_logprobs.*make_batch_logprobs"):
        _step("batch")(_state(), batch)
    with pytest.raises(ValueError, match=r"batch\['trainer_logprobs'\] has shape \(8, 2\)"):
        _step("batch")(_state(), {**batch, TRAINER_LOGPROBS: jnp.zeros((SIZE, 2))})
    with pytest.raises(ValueError, match="old_logprobs must be one of"):
        make_update_step(_toy()[2], OPTIMIZER, LossConfig(), old_logprobs="sampler")


def test_trainer_logprobs_are_a_loss_key_not_a_model_input():
    batch, trainer = _sampled_batch(sampler_noise=0.0)
    inputs = model_inputs({**batch, "trainer_logprobs": trainer})
    assert "trainer_logprobs" not in inputs and "old_logprobs" not in inputs
    assert TRAINER_LOGPROBS == "trainer_logprobs"
