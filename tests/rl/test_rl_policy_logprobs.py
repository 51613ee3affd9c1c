"""Tests for balcap_jax/rl/policy_logprobs.py on a tiny NNX causal LM."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from balcap_jax.rl import losses
from balcap_jax.rl.policy_logprobs import make_log_prob_fn, model_inputs
from tests.rl.rl_toy_lm import ToyCausalLM

VOCAB, DIM, B, T = 23, 8, 3, 9


def _model_and_batch(scored: int, with_vision: bool = False):
    model = ToyCausalLM(VOCAB, DIM, 16, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
    attention = jnp.arange(T)[None, :] >= jnp.array([[0], [2], [1]])  # left padding on rows 1 and 2
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "positions": jnp.maximum(jnp.cumsum(attention, axis=1) - 1, 0),
        "completion_mask": jnp.ones((B, scored), bool),
        "old_logprobs": jnp.zeros((B, scored)),
        "advantages": jnp.ones((B,)),
    }
    if with_vision:
        batch["vision"] = jax.random.normal(jax.random.key(2), (B, DIM))
    return model, batch


def _reference(model, batch, temperature):
    """Full-vocabulary log-probs of every token t >= 1 from the logits at t - 1, [B, T - 1]."""
    logits = model.logits(model.hidden_states(model_inputs(batch)))
    return losses.token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:], temperature)


class LogProbFnTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((T, 1.0), (4, 0.7), (1, 1.0))
    def test_scores_the_trailing_window_aligned_with_input_ids(self, scored, temperature):
        model, batch = _model_and_batch(scored, with_vision=True)
        graphdef, state = nnx.split(model)
        log_prob_fn = make_log_prob_fn(graphdef, temperature=temperature, chunk_size=5)
        with jax.default_matmul_precision("highest"):
            logprobs, entropy = self.variant(log_prob_fn)(state, batch)
            ref_logprobs, ref_entropy = _reference(model, batch, temperature)
        chex.assert_shape([logprobs, entropy], (B, scored))
        window = slice(T - 1 - scored, None) if scored < T else slice(0, None)
        expected_lp, expected_ent = ref_logprobs[:, window], ref_entropy[:, window]
        if scored == T:  # the first token has no context: padded with 0
            np.testing.assert_array_equal(logprobs[:, 0], 0.0)
            np.testing.assert_array_equal(entropy[:, 0], 0.0)
            logprobs, entropy = logprobs[:, 1:], entropy[:, 1:]
        np.testing.assert_allclose(logprobs, expected_lp, atol=1e-5)
        np.testing.assert_allclose(entropy, expected_ent, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_extra_inputs_pass_through_to_the_model(self):
        model, batch = _model_and_batch(4, with_vision=True)
        graphdef, state = nnx.split(model)
        log_prob_fn = self.variant(make_log_prob_fn(graphdef))
        with_vision = log_prob_fn(state, batch)[0]
        without = log_prob_fn(state, {k: v for k, v in batch.items() if k != "vision"})[0]
        assert np.max(np.abs(np.asarray(with_vision) - np.asarray(without))) > 1e-3

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_matches_full_logits_and_frozen_state_is_constant(self):
        model, batch = _model_and_batch(5)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        log_prob_fn = make_log_prob_fn(graphdef, frozen_state=rest, chunk_size=4)
        probe = jax.random.normal(jax.random.key(3), (B, 5))

        def chunked_objective(params):
            return jnp.sum(probe * log_prob_fn(params, batch)[0])

        def full_objective(params):
            return jnp.sum(probe * _reference(nnx.merge(graphdef, params, rest), batch, 1.0)[0][:, -5:])

        with jax.default_matmul_precision("highest"):
            got = self.variant(jax.grad(chunked_objective))(params)
            expected = jax.grad(full_objective)(params)
        chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)

    def test_rejects_inconsistent_batches(self):
        model, batch = _model_and_batch(T)
        graphdef, state = nnx.split(model)
        log_prob_fn = make_log_prob_fn(graphdef)
        with pytest.raises(ValueError, match="completion_mask has"):
            log_prob_fn(state, {**batch, "completion_mask": jnp.ones((B, T + 1), bool)})
        with pytest.raises(ValueError, match="missing model inputs"):
            log_prob_fn(state, {k: v for k, v in batch.items() if k != "positions"})
        with pytest.raises(ValueError, match="temperature"):
            make_log_prob_fn(graphdef, temperature=0.0)


def test_bfloat16_model_gives_float32_logprobs_close_to_float32_model():
    model, batch = _model_and_batch(4)
    graphdef, state = nnx.split(model)
    log_prob_fn = jax.jit(make_log_prob_fn(graphdef, chunk_size=8))
    full = log_prob_fn(state, batch)[0]
    half_state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    half = log_prob_fn(half_state, batch)[0]
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=0.1)
