"""The contract between policy models and the rest of the pipeline (sampler, log-probs, update).

Every policy (Qwen2.5-VL, LLaVA-1.5, test toys) is a Flax NNX module exposing the methods of `CausalLM`.
Callers never keep the module across a jit boundary: they `nnx.split(model)` into `(graphdef, state)` and
`nnx.merge(graphdef, state)` inside the jitted function, so every step is a pure function of `state`.

Batches are plain dicts of arrays (pytrees), built on the host:

  SequenceInputs (training forward, prefill):
    "input_ids":      int32[B, T]   token ids, image placeholder tokens included, padding anywhere masked out.
    "attention_mask": bool[B, T]    True on real tokens.
    "positions":      int32[B, T] (1-D RoPE) or int32[3, B, T] (M-RoPE: temporal, height, width).
    "vision":         model-specific pytree of host-prepared image inputs, or absent for text-only batches.

The KV cache has one slot per sequence position. Prefill writes slots [0, T) of a prompt batch (left padding
allowed: `valid` marks the real slots); decode step i writes slot `index` for every row at once, so a single
`dynamic_update_slice` serves the whole batch. Attention reads the slots where `valid` is True and slot <= the
query's own slot.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
SequenceInputs = dict[str, Any]


@struct.dataclass
class KVCache:
    """Per-layer keys/values for autoregressive decoding.

    k, v:   [L, B, S, H_kv, D_head] (bf16 by default; fp32 in parity tests). Stacked like the decoder's layers:
            prefill's layer scan carries the whole buffer and layer l writes k[l] / v[l] in place; a decode step's
            scan only reads it, and the step writes all layers' new slot after the scan.
    valid:  bool[B, S] — slots holding a real token (False for left padding and not-yet-written slots)
    index:  int32[] — the next slot to write during decode (== prompt bucket length after prefill)
    """

    k: Array
    v: Array
    valid: Array
    index: Array

    @classmethod
    def zeros(
        cls, *, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16
    ) -> "KVCache":
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a sampler needs to allocate a cache for a model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class CausalLM(Protocol):
    """Methods every policy module provides (see module docstring for the batch layout)."""

    def cache_spec(self) -> CacheSpec: ...

    def hidden_states(self, inputs: SequenceInputs) -> Array:
        """Final-norm hidden states [B, T, D] of a full sequence (no cache): the training forward."""

    def prefill(self, inputs: SequenceInputs, cache: KVCache) -> tuple[Array, KVCache]:
        """Run the prompt (vision tower included) into `cache`; returns hidden states [B, T, D] and the cache
        with slots [0, T) written, `valid` = attention_mask on them and `index` = T."""

    def decode(self, tokens: Array, positions: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """One decode step. tokens int32[B], positions int32[B] (the text position of this token; M-RoPE models
        use it on all three axes). Returns hidden states [B, D] and the cache with slot `index` written and
        `index` + 1."""

    def output_embedding(self) -> Array:
        """The unembedding matrix [D, V] (the tied input embedding, transposed, when tied)."""

    def stored_output_embedding(self) -> tuple[Array, int]:
        """The unembedding in its stored layout and its vocabulary axis ([D, V], 1 or the tied [V, D], 0): log-prob
        code chunks over V with it instead of materialising [B, T, V] logits, and never transposes it."""

    def logits(self, hidden: Array) -> Array:
        """hidden [..., D] -> logits [..., V] in fp32."""


def next_text_positions(positions: Array, attention_mask: Array) -> Array:
    """The position of the first generated token per row: 1 + the largest position used by the prompt.

    positions: int32[B, T] or int32[3, B, T]; attention_mask: bool[B, T]. Returns int32[B].
    For M-RoPE this reproduces HF's `rope_deltas` arithmetic: text after the prompt continues from the max over
    all three axes.
    """
    pos = positions if positions.ndim == 3 else positions[None]
    masked = jnp.where(attention_mask[None], pos, jnp.iinfo(jnp.int32).min)
    return (jnp.max(masked, axis=(0, 2)) + 1).astype(jnp.int32)
