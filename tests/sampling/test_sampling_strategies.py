"""Strategies and config: truncation masks against a numpy reference, log-probs, validation messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balcap_jax.sampling import Greedy, SamplerConfig, Temperature, TopP, tempered_log_probs
from balcap_jax.sampling.strategies import mask_outside_nucleus, mask_outside_top_k, sample_categorical


def nucleus_reference(logits: np.ndarray, top_p: float) -> np.ndarray:
    """bool[V]: smallest most-probable set with mass >= top_p (plus ties at the cut)."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-logits, kind="stable")
    mass_above = np.cumsum(probs[order]) - probs[order]
    kept_sorted = mass_above < top_p
    threshold = logits[order][kept_sorted].min()
    return logits >= threshold


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), top_p=st.floats(0.05, 1.0))
def test_nucleus_mask_matches_reference(seed, top_p):
    logits = np.random.default_rng(seed).normal(size=(3, 17)).astype(np.float32) * 2
    masked = np.asarray(mask_outside_nucleus(jnp.asarray(logits), top_p))
    for row in range(3):
        np.testing.assert_array_equal(np.isfinite(masked[row]), nucleus_reference(logits[row], top_p))
        assert np.isfinite(masked[row]).any()


def test_top_k_mask_keeps_k_largest():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = np.isfinite(np.asarray(mask_outside_top_k(logits, 2)))
    np.testing.assert_array_equal(kept, [[False, True, False, True, False]])


def test_sampled_tokens_stay_inside_nucleus_and_top_k():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(512, 40)).astype(np.float32) * 3)
    nucleus = np.isfinite(np.asarray(mask_outside_nucleus(logits / 0.8, 0.6)))
    tokens = np.asarray(TopP(top_p=0.6, temperature=0.8).select(logits, jax.random.key(0)))
    assert nucleus[np.arange(512), tokens].all()
    top3 = np.isfinite(np.asarray(mask_outside_top_k(logits, 3)))
    tokens = np.asarray(Temperature(top_k=3).select(logits, jax.random.key(1)))
    assert top3[np.arange(512), tokens].all()
    tokens = np.asarray(TopP(top_p=0.6, temperature=0.8, top_k=5).select(logits, jax.random.key(2)))
    assert (nucleus & np.isfinite(np.asarray(mask_outside_top_k(logits, 5))))[np.arange(512), tokens].all()


def test_temperature_sampling_frequencies_follow_softmax():
    logits = jnp.asarray([[0.0, 1.0, 2.0]])
    draws = jax.vmap(lambda k: Temperature(temperature=2.0).select(logits, k)[0])(
        jax.random.split(jax.random.key(0), 20_000)
    )
    freq = np.bincount(np.asarray(draws), minlength=3) / 20_000
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0] / 2.0)), atol=0.015)


def test_greedy_and_tempered_logprobs():
    logits = jnp.asarray([[0.3, -1.0, 2.5], [4.0, 4.5, 0.0]])
    tokens = Greedy().select(logits, jax.random.key(0))
    np.testing.assert_array_equal(tokens, [2, 1])
    expected = jax.nn.log_softmax(logits / 0.5)[jnp.arange(2), tokens]
    np.testing.assert_allclose(tempered_log_probs(logits, tokens, 0.5), expected, atol=1e-6)
    assert Greedy().temperature == 1.0 and TopP(0.9, temperature=0.7).temperature == 0.7


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: Temperature(temperature=0.0), "temperature"),
        (lambda: TopP(top_p=1.5), "top_p"),
        (lambda: Temperature(top_k=0), "top_k"),
        (lambda: SamplerConfig(max_new_tokens=0, eos_ids=(), pad_id=0), "max_new_tokens"),
        (lambda: SamplerConfig(max_new_tokens=4, eos_ids=[2], pad_id=0), "eos_ids"),
        (lambda: SamplerConfig(max_new_tokens=4, eos_ids=(), pad_id=0, group_size=0), "group_size"),
        (lambda: SamplerConfig(max_new_tokens=4, eos_ids=(), pad_id=0, prompt_buckets=(64, 32)), "prompt_buckets"),
        (lambda: SamplerConfig(max_new_tokens=4, eos_ids=(), pad_id=0, strategy="greedy"), "strategy"),
        (lambda: SamplerConfig(max_new_tokens=4, eos_ids=(), pad_id=0, cache_dtype="bf17"), "cache_dtype"),
    ],
)
def test_invalid_settings_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_config_is_hashable_and_buckets():
    a = SamplerConfig(max_new_tokens=4, eos_ids=(2,), pad_id=0, strategy=TopP(0.9), prompt_buckets=(8, 16))
    b = SamplerConfig(max_new_tokens=4, eos_ids=(2,), pad_id=0, strategy=TopP(0.9), prompt_buckets=(8, 16))
    assert hash(a) == hash(b) and a == b
    assert a.bucket_for(1) == 8 and a.bucket_for(8) == 8 and a.bucket_for(9) == 16
    with pytest.raises(ValueError, match="prompt_buckets"):
        a.bucket_for(17)


def test_inverse_cdf_sampler_matches_distribution_and_never_draws_excluded_tokens():
    logits = jnp.asarray([[1.0, -jnp.inf, 0.0, 2.0, -jnp.inf], [-jnp.inf, -jnp.inf, 3.0, -jnp.inf, -jnp.inf]])
    keys = jax.random.split(jax.random.key(3), 20_000)
    draws = np.asarray(jax.vmap(lambda k: sample_categorical(k, logits))(keys))
    assert (draws[:, 1] == 2).all()
    freq = np.bincount(draws[:, 0], minlength=5) / len(draws)
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0])), atol=0.012)
