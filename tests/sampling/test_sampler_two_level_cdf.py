"""The sampler's two-level inverse-CDF draw (balcap_jax/sampling/strategies.py), the fix bench_sampling's decode
profile asked for: exact over block boundaries, and no cumulative sum over the whole vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np

from balcap_jax.sampling.strategies import sample_categorical


def _equations(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (pjit, custom_jvp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_inverse_cdf_sampler_is_exact_across_blocks_and_never_scans_the_whole_vocabulary():
    block = 256  # strategies.CDF_BLOCK
    vocab = 3 * block + 5  # a ragged last block
    probs = np.zeros(vocab)
    probs[[3, block - 1, block, 2 * block + 7, vocab - 1]] = [0.1, 0.2, 0.3, 0.15, 0.25]
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    keys = jax.random.split(jax.random.key(5), 20_000)
    draws = np.asarray(jax.vmap(lambda k: sample_categorical(k, logits)[0])(keys))
    np.testing.assert_allclose(np.bincount(draws, minlength=vocab) / len(draws), probs, atol=0.012)
    # Why it is fast: no cumulative sum runs over the full vocabulary axis (it cost more than all the rest).
    jaxpr = jax.make_jaxpr(sample_categorical)(jax.random.key(0), jnp.zeros((4, vocab)))
    scans = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "cumsum"]
    assert scans and all(e.invars[0].aval.shape[-1] < vocab for e in scans), [e.invars[0].aval for e in scans]
