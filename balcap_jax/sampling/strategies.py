"""Token-selection strategies: greedy, temperature (optionally top-k) and nucleus (top-p).

Each strategy is a frozen, hashable dataclass (it is part of the jit-static `SamplerConfig`) with two pure
functions of fp32 logits [N, V]:

  * `select(logits, key) -> int32[N]`: the token to emit.
  * `temperature`: the temperature of the distribution log-probs are reported under.

Log-probs are always taken under the *full* tempered distribution, log_softmax(logits / temperature) over the
whole vocabulary — the distribution the trainer recomputes from a plain forward. Top-k and top-p only change
which tokens can be *drawn* (they sample from the truncated, renormalised distribution); they do not change the
reported log-prob of the drawn token. So with top-p < 1 the importance ratio the trainer forms is relative to
the untruncated tempered policy — what TRL's GRPO trainer recomputes too (logits / temperature, no truncation).
Greedy reports log-probs at temperature 1. `SamplerConfig.blocked_ids` restricts the draw the same way.

Order of operations (HF's): divide by temperature, then top-k, then top-p on the tempered, top-k-masked
distribution.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(
            f"temperature={temperature!r} must be a positive float; use Greedy() for deterministic argmax decoding"
        )


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k={top_k!r} must be a positive int, or None to keep the whole vocabulary")


def mask_outside_top_k(logits: Array, top_k: int) -> Array:
    """logits [N, V] with every logit below the k-th largest of its row set to -inf (ties at the k-th kept)."""
    k = min(top_k, logits.shape[-1])
    kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth_largest, -jnp.inf, logits)


def mask_outside_nucleus(logits: Array, top_p: float) -> Array:
    """logits [N, V] with every token outside the nucleus set to -inf.

    The nucleus is the smallest set of most-probable tokens whose probability mass reaches `top_p`: a token is
    kept when the mass of the tokens ranked strictly above it is < top_p, so the most probable token is always
    kept. Tokens tied with the least probable kept token are kept too (the cut is a logit threshold).
    """
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.sum(mass_above < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


# Tokens per block of the two-level inverse-CDF search in `sample_categorical`.
CDF_BLOCK = 256


def sample_categorical(key: Array, logits: Array) -> Array:
    """One draw per row from softmax(logits): logits fp32 [N, V] (-inf = excluded) -> int32[N].

    Inverts the cumulative distribution with one uniform per row, instead of the V Gumbel variates per row of
    `jax.random.categorical`: generating random bits dominates a decode step of a small model on CPU. The
    inversion is two-level: a cumulative sum over the V / CDF_BLOCK block masses picks the block, then one over
    that block's CDF_BLOCK tokens picks the token. A cumulative sum over the whole vocabulary (XLA lowers it as a
    windowed reduction) cost more than the rest of sampling together: 8x slower for [32, 32000] on CPU. Exact
    up to fp32 rounding of the sums. Zero-probability tokens and blocks are taken out of the search, so an
    excluded token can never be drawn, whatever the rounding.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    rows, vocab = probs.shape
    blocks = -(-vocab // CDF_BLOCK)
    probs = jnp.pad(probs, ((0, 0), (0, blocks * CDF_BLOCK - vocab))).reshape(rows, blocks, CDF_BLOCK)
    mass = probs.sum(-1)  # [N, blocks]
    block_cdf = jnp.where(mass > 0, jnp.cumsum(mass, axis=-1), -1.0)
    threshold = jax.random.uniform(key, (rows, 1), dtype=block_cdf.dtype) * jnp.max(block_cdf, -1, keepdims=True)
    block = jnp.argmax(block_cdf > threshold, axis=-1)  # the max is > threshold, so a positive block is found
    mass_before = jnp.take_along_axis(block_cdf - mass, block[:, None], axis=-1)
    inner = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [N, CDF_BLOCK]
    inner_cdf = jnp.where(inner > 0, jnp.cumsum(inner, axis=-1), -1.0)
    hit = inner_cdf > threshold - mass_before
    # Rounding can leave the threshold at or above the block's own sum: then its last positive token is drawn.
    token = jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), jnp.argmax(inner_cdf, axis=-1))
    return (block * CDF_BLOCK + token).astype(jnp.int32)


def tempered_log_probs(logits: Array, tokens: Array, temperature: float) -> Array:
    """log_softmax(logits / temperature)[tokens]: logits fp32 [N, V], tokens int32[N] -> fp32 [N]."""
    scaled = logits.astype(jnp.float32) / temperature
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return chosen - jax.nn.logsumexp(scaled, axis=-1)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax decoding (ties go to the lowest token id). Log-probs are reported at temperature 1."""

    @property
    def temperature(self) -> float:
        return 1.0

    def select(self, logits: Array, key: Array) -> Array:
        del key
        chex.assert_rank(logits, 2)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Ancestral sampling from softmax(logits / temperature), optionally restricted to the top-k tokens."""

    temperature: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        _check_temperature(self.temperature)
        _check_top_k(self.top_k)

    def select(self, logits: Array, key: Array) -> Array:
        chex.assert_rank(logits, 2)
        scaled = logits.astype(jnp.float32) / self.temperature
        if self.top_k is not None:
            scaled = mask_outside_top_k(scaled, self.top_k)
        return sample_categorical(key, scaled)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: draw from the smallest top set of tokens with tempered probability mass >= top_p.

    Sorting the full vocabulary each step is the cost of top-p; setting `top_k` as well (e.g. 1024) first
    cuts the candidates with `lax.top_k`, which is much cheaper for 150k-token vocabularies.
    """

    top_p: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; 1.0 keeps the whole distribution")
        _check_temperature(self.temperature)
        _check_top_k(self.top_k)

    def select(self, logits: Array, key: Array) -> Array:
        chex.assert_rank(logits, 2)
        scaled = logits.astype(jnp.float32) / self.temperature
        if self.top_k is not None:
            k = min(self.top_k, scaled.shape[-1])
            candidate_logits, candidate_ids = jax.lax.top_k(scaled, k)
            kept = mask_outside_nucleus(candidate_logits, self.top_p)
            choice = sample_categorical(key, kept)
            return jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        if self.top_p < 1.0:
            scaled = mask_outside_nucleus(scaled, self.top_p)
        return sample_categorical(key, scaled)


Strategy = Union[Greedy, Temperature, TopP]
STRATEGIES = (Greedy, Temperature, TopP)
