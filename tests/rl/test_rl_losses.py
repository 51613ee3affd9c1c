"""Tests for balcap_jax/rl/losses.py: chunked log-probs (values, gradients, memory), the clipped loss, KL,
aggregation and diagnostics."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from balcap_jax.rl import losses

B, T, D, V = 2, 5, 8, 37


def _inputs(seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (B, T, D), dtype)
    unembed = (jax.random.normal(k2, (D, V), dtype) * 0.7).astype(dtype)
    targets = jax.random.randint(k3, (B, T), 0, V)
    return hidden, unembed, targets


def _reference_logprobs(logits, targets, temperature):
    """float64 numpy log-softmax and entropy."""
    scaled = np.asarray(logits, np.float64) / temperature
    scaled = scaled - scaled.max(-1, keepdims=True)
    log_probs = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    return picked, -(np.exp(log_probs) * log_probs).sum(-1)


class TokenLogprobsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1.0, 0.6)
    def test_full_logits_match_float64_reference(self, temperature):
        hidden, unembed, targets = _inputs()
        logits = hidden @ unembed
        logprobs, entropy = self.variant(functools.partial(losses.token_logprobs, temperature=temperature))(
            logits, targets
        )
        ref_logprobs, ref_entropy = _reference_logprobs(logits, targets, temperature)
        np.testing.assert_allclose(logprobs, ref_logprobs, atol=1e-5)
        np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1, 1.0), (7, 0.6), (64, 1.3))  # one column, a ragged last chunk, chunk > V
    def test_chunked_matches_full(self, chunk_size, temperature):
        hidden, unembed, targets = _inputs(seed=chunk_size)
        with jax.default_matmul_precision("highest"):
            chunked = self.variant(
                functools.partial(losses.token_logprobs_from_hidden, temperature=temperature, chunk_size=chunk_size)
            )(hidden, unembed, targets)
            full = losses.token_logprobs(hidden @ unembed, targets, temperature)
        np.testing.assert_allclose(chunked[0], full[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(chunked[1], full[1], rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_chunked_gradients_match_full(self):
        hidden, unembed, targets = _inputs(seed=3)
        probe_lp, probe_ent = jax.random.normal(jax.random.key(9), (2, B, T))

        def objective(fn, hidden, unembed):
            logprobs, entropy = fn(hidden, unembed)
            return jnp.sum(probe_lp * logprobs + probe_ent * entropy)

        chunked = functools.partial(losses.token_logprobs_from_hidden, targets=targets, temperature=0.7, chunk_size=8)
        full = lambda h, u: losses.token_logprobs(h @ u, targets, 0.7)  # noqa: E731
        with jax.default_matmul_precision("highest"):
            grad_chunked = self.variant(jax.grad(functools.partial(objective, chunked), argnums=(0, 1)))(
                hidden, unembed
            )
            grad_full = jax.grad(functools.partial(objective, full), argnums=(0, 1))(hidden, unembed)
        for got, expected in zip(grad_chunked, grad_full):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_a_vocabulary_major_unembedding_gives_the_same_values_and_gradients(self):
        """vocab_axis=0 reads a tied [V, D] embedding as stored: the same log-probs, entropies and gradients
        (the embedding's gradient in its own [V, D] layout) as the [D, V] matrix."""
        hidden, unembed, targets = _inputs(seed=5)
        probe = jax.random.normal(jax.random.key(3), (2, B, T))

        def objective(hidden, matrix, vocab_axis):
            logprobs, entropy = losses.token_logprobs_from_hidden(
                hidden, matrix, targets, temperature=0.7, chunk_size=7, vocab_axis=vocab_axis
            )
            return jnp.sum(probe[0] * logprobs + probe[1] * entropy)

        with jax.default_matmul_precision("highest"):
            value_dv, grad_dv = jax.value_and_grad(objective, argnums=(0, 1))(hidden, unembed, 1)
            value_vd, grad_vd = self.variant(jax.value_and_grad(objective, argnums=(0, 1)), static_argnums=2)(
                hidden, unembed.T, 0
            )
        np.testing.assert_allclose(value_vd, value_dv, rtol=1e-6)
        np.testing.assert_allclose(grad_vd[0], grad_dv[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad_vd[1], grad_dv[1].T, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match=r"unembed must be \[V, D\]"):
            losses.token_logprobs_from_hidden(hidden, unembed, targets, vocab_axis=0)
        with pytest.raises(ValueError, match="vocab_axis"):
            losses.token_logprobs_from_hidden(hidden, unembed, targets, vocab_axis=2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bfloat16_inputs_accumulate_in_float32(self):
        hidden, unembed, targets = _inputs(seed=4, dtype=jnp.bfloat16)
        logprobs, entropy = self.variant(functools.partial(losses.token_logprobs_from_hidden, chunk_size=10))(
            hidden, unembed, targets
        )
        chex.assert_type([logprobs, entropy], jnp.float32)
        logits = jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32)
        expected = losses.token_logprobs(logits, targets)
        np.testing.assert_allclose(logprobs, expected[0], atol=1e-4)
        np.testing.assert_allclose(entropy, expected[1], atol=1e-4)

    def test_validates_arguments(self):
        hidden, unembed, targets = _inputs()
        with pytest.raises(ValueError, match="temperature"):
            losses.token_logprobs_from_hidden(hidden, unembed, targets, temperature=0.0)
        with pytest.raises(ValueError, match="unembed must be"):
            losses.token_logprobs_from_hidden(hidden, unembed.T, targets)
        with pytest.raises(ValueError, match="chunk_size"):
            losses.token_logprobs_from_hidden(hidden, unembed, targets, chunk_size=0)


def _largest_intermediate(fn, *args) -> int:
    """Number of elements of the largest array any equation of fn's jaxpr (sub-jaxprs included) produces."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)

    return max(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_chunked_log_probs_never_build_full_logits_forward_or_backward():
    batch, length, dim, vocab, chunk = 2, 6, 4, 1000, 64
    hidden = jnp.ones((batch, length, dim))
    unembed = jnp.ones((dim, vocab))
    targets = jnp.zeros((batch, length), jnp.int32)

    def loss(fn, hidden, unembed):
        logprobs, entropy = fn(hidden, unembed)
        return jnp.sum(logprobs) + jnp.sum(entropy)

    chunked = functools.partial(losses.token_logprobs_from_hidden, targets=targets, chunk_size=chunk)
    full = lambda h, u: losses.token_logprobs(h @ u, targets)  # noqa: E731
    full_size = batch * length * vocab
    # The check itself sees full logits when they exist...
    assert _largest_intermediate(jax.grad(functools.partial(loss, full), argnums=(0, 1)), hidden, unembed) >= full_size
    # ...and the chunked version's largest array is the unembedding (or one [B, T, chunk] block), forward and back.
    largest = _largest_intermediate(jax.grad(functools.partial(loss, chunked), argnums=(0, 1)), hidden, unembed)
    assert largest <= max(dim * (vocab + chunk), batch * length * chunk), largest
    assert largest < full_size


class SurrogateTest(chex.TestCase):
    def _case(self):
        rng = np.random.default_rng(0)
        logprobs = rng.normal(-2.0, 0.5, (4, 6)).astype(np.float32)
        old = (logprobs + rng.normal(0, 0.4, (4, 6))).astype(np.float32)
        advantages = np.array([1.5, -0.7, 0.0, -2.0], np.float32)
        mask = rng.uniform(size=(4, 6)) < 0.7
        mask[3] = False  # a sequence without completion tokens
        return logprobs, old, advantages, mask

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 1.4))
    def test_clipped_surrogate_matches_formula(self, eps_low, eps_high, dual_clip):
        logprobs, old, advantages, _ = self._case()
        loss, clipped, dual = self.variant(
            functools.partial(losses.clipped_surrogate, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
        )(logprobs, old, advantages)
        ratio = np.exp(logprobs.astype(np.float64) - old)
        a = advantages[:, None].astype(np.float64)
        expected = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps_low, 1 + eps_high))
        np.testing.assert_array_equal(clipped, -a * np.clip(ratio, 1 - eps_low, 1 + eps_high) > -a * ratio)
        if dual_clip is not None:
            capped = (a < 0) & (expected > -dual_clip * a)
            expected = np.where(capped, -dual_clip * a, expected)
            np.testing.assert_array_equal(dual, capped)
            assert np.asarray(dual).any(), "the case must exercise the dual clip"
        np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-6)
        assert np.asarray(clipped).any() and not np.asarray(clipped).all()

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_is_zero_exactly_where_clipped(self):
        logprobs, old, advantages, _ = self._case()
        grad_fn = jax.grad(lambda lp: jnp.sum(losses.clipped_surrogate(lp, old, advantages)[0]))
        grads = np.asarray(self.variant(grad_fn)(logprobs))
        _, clipped, _ = losses.clipped_surrogate(logprobs, old, advantages)
        ratio = np.exp(logprobs - old)
        np.testing.assert_array_equal(grads[np.asarray(clipped)], 0.0)
        unclipped = ~np.asarray(clipped)
        expected = -(advantages[:, None] * ratio)
        np.testing.assert_allclose(grads[unclipped], np.broadcast_to(expected, grads.shape)[unclipped], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_k3_kl(self):
        logprobs, old, _, _ = self._case()
        kl = self.variant(losses.k3_kl)(logprobs, old)
        log_ratio = old.astype(np.float64) - logprobs
        np.testing.assert_allclose(kl, np.exp(log_ratio) - log_ratio - 1, rtol=1e-5, atol=1e-7)
        assert np.all(np.asarray(kl) >= 0)
        np.testing.assert_array_equal(self.variant(losses.k3_kl)(logprobs, logprobs), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*losses.AGGREGATIONS)
    def test_aggregation_modes(self, aggregation):
        per_token, _, _, mask = self._case()
        got = self.variant(functools.partial(losses.aggregate_loss, aggregation=aggregation))(per_token, mask)
        m = mask.astype(np.float64)
        sums, counts = (per_token * m).sum(-1), m.sum(-1)
        nonempty = counts > 0
        if aggregation == "token-mean":
            expected = sums.sum() / counts.sum()
        elif aggregation == "seq-mean-token-mean":
            expected = (sums[nonempty] / counts[nonempty]).mean()
        else:
            expected = (sums[nonempty] / mask.shape[1]).mean()  # norm_length defaults to T
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        np.testing.assert_array_equal(
            self.variant(functools.partial(losses.aggregate_loss, aggregation=aggregation))(
                per_token, np.zeros_like(mask)
            ),
            0.0,
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*losses.AGGREGATIONS)
    def test_micro_batches_with_global_normaliser_sum_to_full_batch(self, aggregation):
        per_token, _, _, mask = self._case()
        normaliser = self.variant(losses.LossNormaliser.from_mask)(mask)
        aggregate = self.variant(
            functools.partial(losses.aggregate_loss, aggregation=aggregation, norm_length=10)
        )
        halves = sum(aggregate(per_token[i::2], mask[i::2], normaliser=normaliser) for i in range(2))
        np.testing.assert_allclose(halves, aggregate(per_token, mask), rtol=1e-6)


class PolicyLossTest(chex.TestCase):
    def _case(self):
        logprobs, old, advantages, mask = SurrogateTest._case(None)
        ref = (logprobs + np.random.default_rng(1).normal(0, 0.3, logprobs.shape)).astype(np.float32)
        entropy = np.random.default_rng(2).uniform(0.5, 3.0, logprobs.shape).astype(np.float32)
        return logprobs, old, advantages, mask, ref, entropy

    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_terms_and_diagnostics(self):
        logprobs, old, advantages, mask, ref, entropy = self._case()
        config = losses.LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01,
                                   aggregation="seq-mean-token-mean")
        loss, diag = self.variant(functools.partial(losses.policy_loss, config=config))(
            logprobs, old, advantages, mask, ref_logprobs=ref, entropy=entropy
        )
        per_token, clipped, dual = losses.clipped_surrogate(logprobs, old, advantages, eps_low=0.2, eps_high=0.28,
                                                            dual_clip=3.0)
        agg = functools.partial(losses.aggregate_loss, mask=mask, aggregation="seq-mean-token-mean")
        kl = losses.k3_kl(logprobs, ref)
        np.testing.assert_allclose(loss, agg(per_token) + 0.05 * agg(kl) - 0.01 * agg(entropy), rtol=1e-6)
        summary = diag.summary()
        ratio = np.exp(logprobs - old)[mask]
        np.testing.assert_allclose(summary["completion_tokens"], mask.sum())
        np.testing.assert_allclose(summary["clip_fraction"], np.asarray(clipped)[mask].mean(), rtol=1e-6)
        np.testing.assert_allclose(summary["dual_clip_fraction"], np.asarray(dual)[mask].mean(), rtol=1e-6)
        np.testing.assert_allclose(summary["ratio_min"], ratio.min(), rtol=1e-6)
        np.testing.assert_allclose(summary["ratio_max"], ratio.max(), rtol=1e-6)
        np.testing.assert_allclose(summary["ratio_mean"], ratio.mean(), rtol=1e-6)
        np.testing.assert_allclose(summary["kl"], np.asarray(kl)[mask].mean(), rtol=1e-6)
        np.testing.assert_allclose(summary["kl_to_old"], np.asarray(losses.k3_kl(logprobs, old))[mask].mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(summary["entropy"], entropy[mask].mean(), rtol=1e-6)
        np.testing.assert_allclose(summary["policy_loss"], agg(per_token), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_at_ratio_one_is_minus_advantage_over_tokens(self):
        logprobs, _, advantages, mask, _, _ = self._case()
        grad_fn = jax.grad(lambda lp: losses.policy_loss(lp, logprobs, advantages, mask, losses.LossConfig())[0])
        grads = self.variant(grad_fn)(logprobs)
        expected = np.where(mask, -advantages[:, None] / mask.sum(), 0.0)
        np.testing.assert_allclose(grads, expected, rtol=1e-6, atol=1e-8)

    def test_diagnostics_merge_equals_full_batch(self):
        logprobs, old, advantages, mask, ref, entropy = self._case()
        sampler = TisTest._sampler(old)
        config = losses.LossConfig(kl_coef=0.1, tis_cap=1.5)
        normaliser = losses.LossNormaliser.from_mask(mask)
        parts = [
            losses.policy_loss(logprobs[i::2], old[i::2], advantages[i::2], mask[i::2], config,
                               ref_logprobs=ref[i::2], entropy=entropy[i::2], normaliser=normaliser,
                               sampler_logprobs=sampler[i::2])
            for i in range(2)
        ]
        full_loss, full = losses.policy_loss(logprobs, old, advantages, mask, config, ref_logprobs=ref,
                                             entropy=entropy, sampler_logprobs=sampler)
        merged = parts[0][1].merge(parts[1][1])
        np.testing.assert_allclose(parts[0][0] + parts[1][0], full_loss, rtol=1e-6)
        for key, value in full.summary().items():
            np.testing.assert_allclose(merged.summary()[key], value, rtol=1e-5, err_msg=key)

    def test_empty_mask_gives_finite_metrics(self):
        logprobs, old, advantages, mask, _, entropy = self._case()
        loss, diag = losses.policy_loss(logprobs, old, advantages, np.zeros_like(mask), losses.LossConfig(),
                                        entropy=entropy)
        assert float(loss) == 0.0
        assert all(np.isfinite(v) for v in diag.summary().values())

    def test_requires_reference_and_entropy_when_weighted(self):
        logprobs, old, advantages, mask, _, _ = self._case()
        with pytest.raises(ValueError, match="ref_logprobs"):
            losses.policy_loss(logprobs, old, advantages, mask, losses.LossConfig(kl_coef=0.1))
        with pytest.raises(ValueError, match="entropy"):
            losses.policy_loss(logprobs, old, advantages, mask, losses.LossConfig(entropy_coef=0.1))
        with pytest.raises(ValueError, match="tis_cap > 0 needs the sampler's log-probs"):
            losses.policy_loss(logprobs, old, advantages, mask, losses.LossConfig(tis_cap=2.0))

    @parameterized.parameters(
        dict(eps_low=1.0), dict(eps_high=-0.1), dict(dual_clip=0.5), dict(kl_coef=-1.0),
        dict(aggregation="mean"), dict(norm_length=0), dict(tis_cap=0.5), dict(tis_cap=-1.0),
        dict(tis_cap=float("nan")),
    )
    def test_config_validation_names_the_field(self, **kwargs):
        with pytest.raises(ValueError, match=f"LossConfig.{next(iter(kwargs))}"):
            losses.LossConfig(**kwargs)


class TisTest(chex.TestCase):
    """Truncated importance sampling: weights min(π_old / π_sampler, C) on the policy-gradient term."""

    CAP = 1.5

    @staticmethod
    def _sampler(old):
        """The sampler's log-probs: the trainer's (old) off by a bf16-sized-and-worse error, 0 where it pads."""
        noise = np.random.default_rng(3).normal(0, 0.6, old.shape)
        return (old + noise).astype(np.float32)

    def _case(self):
        logprobs, old, advantages, mask, ref, entropy = PolicyLossTest._case(None)
        return logprobs, old, self._sampler(old), advantages, mask

    def _hand_weights(self, old, sampler, mask):
        weights = np.where(mask, np.minimum(np.exp(old.astype(np.float64) - sampler), self.CAP), 0.0)
        capped, uncapped = mask & (weights == self.CAP), mask & (weights < self.CAP)
        assert capped.any() and uncapped.any(), "the case must exercise both sides of the cap"
        return weights

    @chex.variants(with_jit=True, without_jit=True)
    def test_weights_match_hand_computation(self):
        _, old, sampler, _, mask = self._case()
        weights = self.variant(functools.partial(losses.tis_weights, cap=self.CAP))(old, sampler, mask)
        np.testing.assert_allclose(weights, self._hand_weights(old, sampler, mask), rtol=1e-6)
        with pytest.raises(ValueError, match="tis_cap"):
            losses.tis_weights(old, sampler, mask, cap=0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_weighted_loss_and_gradient_at_ratio_one(self):
        # As the update's old_logprobs="current" calls it: π_old = stop_gradient(π), so r = 1 and the gradient of
        # token t is −A · w_t / N with w_t = min(exp(lp − sampler), C), the weight carrying no gradient itself.
        logprobs, _, sampler, advantages, mask = self._case()
        config = losses.LossConfig(tis_cap=self.CAP)

        def loss_fn(lp):
            return losses.policy_loss(lp, jax.lax.stop_gradient(lp), advantages, mask, config,
                                      sampler_logprobs=sampler)

        (loss, diag), grads = self.variant(jax.value_and_grad(loss_fn, has_aux=True))(logprobs)
        weights = self._hand_weights(logprobs, sampler, mask)
        tokens = mask.sum()
        np.testing.assert_allclose(loss, np.sum(-advantages[:, None] * weights) / tokens, rtol=1e-5)
        np.testing.assert_allclose(grads, -advantages[:, None] * weights / tokens, rtol=1e-6, atol=1e-9)
        summary = diag.summary()
        np.testing.assert_allclose(summary["tis_weight_mean"], weights[mask].mean(), rtol=1e-6)
        np.testing.assert_allclose(summary["tis_capped_fraction"], (weights[mask] == self.CAP).mean(), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_weights_multiply_the_clipped_surrogate_and_diagnostics_measure_the_mismatch(self):
        logprobs, old, sampler, advantages, mask = self._case()
        config = losses.LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, tis_cap=self.CAP)
        loss, diag = self.variant(functools.partial(losses.policy_loss, config=config))(
            logprobs, old, advantages, mask, sampler_logprobs=sampler
        )
        ratio = np.exp(logprobs.astype(np.float64) - old)
        a = advantages[:, None].astype(np.float64)
        surrogate = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.28))
        surrogate = np.where((a < 0) & (surrogate > -3.0 * a), -3.0 * a, surrogate)
        weights = self._hand_weights(old, sampler, mask)
        np.testing.assert_allclose(loss, np.sum(np.where(mask, surrogate * weights, 0.0)) / mask.sum(), rtol=1e-5)
        diff = np.abs(old.astype(np.float64) - sampler)[mask]
        summary = diag.summary()
        np.testing.assert_allclose(summary["sampler_logprob_diff_mean"], diff.mean(), rtol=1e-6)
        np.testing.assert_allclose(summary["sampler_logprob_diff_max"], diff.max(), rtol=1e-6)
        # Without TIS the same mismatch is still reported and the loss is the plain surrogate.
        plain_loss, plain = losses.policy_loss(logprobs, old, advantages, mask, losses.LossConfig(
            eps_low=0.2, eps_high=0.28, dual_clip=3.0), sampler_logprobs=sampler)
        np.testing.assert_allclose(plain_loss, np.sum(np.where(mask, surrogate, 0.0)) / mask.sum(), rtol=1e-5)
        np.testing.assert_allclose(plain.summary()["sampler_logprob_diff_max"], diff.max(), rtol=1e-6)
        np.testing.assert_allclose(plain.summary()["tis_weight_mean"], 1.0)

    def test_nan_sampler_logprobs_poison_only_the_tokens_they_are_on(self):
        logprobs, old, sampler, advantages, mask = self._case()
        config = losses.LossConfig(tis_cap=self.CAP)
        grad_fn = jax.jit(jax.value_and_grad(
            lambda lp, s: losses.policy_loss(lp, old, advantages, mask, config, sampler_logprobs=s)[0]
        ))
        padded = np.where(mask, sampler, np.nan).astype(np.float32)
        loss, grads = grad_fn(logprobs, padded)
        assert np.isfinite(loss) and np.all(np.isfinite(grads)), "NaN padding must not reach the loss or gradient"
        np.testing.assert_allclose(loss, grad_fn(logprobs, sampler)[0], rtol=1e-6)
        scored = np.argwhere(mask)[0]
        unscorable = sampler.copy()
        unscorable[tuple(scored)] = np.nan
        assert np.isnan(grad_fn(logprobs, unscorable)[0]), "a NaN log-prob on a completion token is never a 0 weight"
