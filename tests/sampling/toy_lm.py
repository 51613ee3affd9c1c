"""A tiny NNX decoder implementing the `CausalLM` contract, for developing and testing the sampler.

GQA attention with a KV cache, RMSNorm, a gated MLP, tied embeddings, rotary positions that accept either 1-D
positions [B, T] or M-RoPE positions [3, B, T] (frequency sections rotated by t/h/w), and optional fake "vision":
`{"features": [B, K, D]}` whose k-th row replaces the k-th `IMAGE_TOKEN` of each prompt row. It is independent of
the real models so sampler tests do not depend on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models.interface import CacheSpec, KVCache, SequenceInputs

IMAGE_TOKEN = 3
_MASKED = -1e30


def _rotate(x: jax.Array, positions: jax.Array, sections: tuple[int, int, int]) -> jax.Array:
    """x [B, T, H, Dh]; positions int32[3, B, T]; frequency section i is rotated by positions[i]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    axis_of_freq = jnp.repeat(jnp.arange(3), jnp.asarray(sections), total_repeat_length=half)
    pos = positions.astype(jnp.float32)[axis_of_freq]  # [half, B, T]
    angles = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, T, half]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _as_mrope(positions: jax.Array) -> jax.Array:
    return positions if positions.ndim == 3 else jnp.broadcast_to(positions[None], (3, *positions.shape))


class _Norm(nnx.Module):
    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,)))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6) * self.scale[...]).astype(x.dtype)


class _Block(nnx.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, sections, *, rngs: nnx.Rngs):
        self.heads, self.kv_heads, self.head_dim, self.sections = heads, kv_heads, head_dim, sections
        self.attn_norm, self.mlp_norm = _Norm(dim), _Norm(dim)
        self.q = nnx.Linear(dim, heads * head_dim, use_bias=True, rngs=rngs)
        self.k = nnx.Linear(dim, kv_heads * head_dim, use_bias=True, rngs=rngs)
        self.v = nnx.Linear(dim, kv_heads * head_dim, use_bias=True, rngs=rngs)
        self.o = nnx.Linear(heads * head_dim, dim, use_bias=False, rngs=rngs)
        self.gate = nnx.Linear(dim, 2 * dim, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(dim, 2 * dim, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, use_bias=False, rngs=rngs)

    def project_kv(self, x, positions):
        b, t, _ = x.shape
        h = self.attn_norm(x)
        k = self.k(h).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v(h).reshape(b, t, self.kv_heads, self.head_dim)
        return _rotate(k, positions, self.sections), v

    def attend(self, x, positions, k, v, mask):
        """x [B, Tq, D]; k/v [B, S, Hkv, Dh]; mask bool[B, Tq, S]."""
        b, t, _ = x.shape
        q = _rotate(self.q(self.attn_norm(x)).reshape(b, t, self.heads, self.head_dim), positions, self.sections)
        k = jnp.repeat(k.astype(x.dtype), self.heads // self.kv_heads, axis=2)
        v = jnp.repeat(v.astype(x.dtype), self.heads // self.kv_heads, axis=2)
        scores = jnp.einsum("bqhd,bshd->bhqs", q, k) / jnp.sqrt(self.head_dim).astype(x.dtype)
        scores = jnp.where(mask[:, None], scores.astype(jnp.float32), _MASKED)
        out = jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(scores, -1).astype(x.dtype), v)
        x = x + self.o(out.reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class ToyLM(nnx.Module):
    def __init__(
        self,
        *,
        vocab: int = 64,
        dim: int = 32,
        layers: int = 2,
        heads: int = 4,
        kv_heads: int = 2,
        head_dim: int = 8,
        sections: tuple[int, int, int] = (2, 1, 1),
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([_Block(dim, heads, kv_heads, head_dim, sections, rngs=rngs) for _ in range(layers)])
        self.norm = _Norm(dim)
        self.spec = CacheSpec(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim)

    def cache_spec(self) -> CacheSpec:
        return self.spec

    def _embed(self, inputs: SequenceInputs) -> jax.Array:
        ids = inputs["input_ids"]
        x = self.embed(ids)
        vision = inputs.get("vision")
        if vision is not None:
            is_image = ids == IMAGE_TOKEN
            slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, vision["features"].shape[1] - 1)
            features = jnp.take_along_axis(vision["features"], slot[..., None], axis=1)
            x = jnp.where(is_image[..., None], features.astype(x.dtype), x)
        return x

    def _prompt_mask(self, attention_mask):
        t = attention_mask.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        return causal[None] & attention_mask[:, None, :]

    def hidden_states(self, inputs: SequenceInputs) -> jax.Array:
        x, positions = self._embed(inputs), _as_mrope(inputs["positions"])
        mask = self._prompt_mask(inputs["attention_mask"])
        for block in self.blocks:
            k, v = block.project_kv(x, positions)
            x = block.attend(x, positions, k, v, mask)
        return self.norm(x)

    def prefill(self, inputs: SequenceInputs, cache: KVCache) -> tuple[jax.Array, KVCache]:
        x, positions = self._embed(inputs), _as_mrope(inputs["positions"])
        t = x.shape[1]
        mask = self._prompt_mask(inputs["attention_mask"])
        ks, vs = [], []
        for block in self.blocks:
            k, v = block.project_kv(x, positions)
            k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
            ks.append(k)
            vs.append(v)
            x = block.attend(x, positions, k, v, mask)
        new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, jnp.stack(ks), 0, axis=2)
        new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, jnp.stack(vs), 0, axis=2)
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, inputs["attention_mask"].astype(bool), 0, axis=1)
        return self.norm(x), KVCache(k=new_k, v=new_v, valid=valid, index=jnp.asarray(t, jnp.int32))

    def decode(self, tokens, positions, cache: KVCache) -> tuple[jax.Array, KVCache]:
        x = self.embed(tokens[:, None])
        pos = jnp.broadcast_to(positions[None, :, None], (3, tokens.shape[0], 1))
        slot = cache.index
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, jnp.ones((tokens.shape[0], 1), bool), slot, axis=1)
        mask = (valid & (jnp.arange(cache.max_len) <= slot)[None])[:, None, :]
        all_k, all_v = cache.k, cache.v
        for layer, block in enumerate(self.blocks):
            k, v = block.project_kv(x, pos)
            layer_k = jax.lax.dynamic_update_slice_in_dim(all_k[layer], k.astype(all_k.dtype), slot, axis=1)
            layer_v = jax.lax.dynamic_update_slice_in_dim(all_v[layer], v.astype(all_v.dtype), slot, axis=1)
            all_k, all_v = all_k.at[layer].set(layer_k), all_v.at[layer].set(layer_v)
            x = block.attend(x, pos, layer_k, layer_v, mask)
        return self.norm(x)[:, 0], KVCache(k=all_k, v=all_v, valid=valid, index=slot + 1)

    def output_embedding(self) -> jax.Array:
        return self.embed.embedding[...].T

    def stored_output_embedding(self) -> tuple[jax.Array, int]:
        return self.embed.embedding[...], 0

    def logits(self, hidden: jax.Array) -> jax.Array:
        return (hidden.astype(jnp.float32) @ self.output_embedding().astype(jnp.float32)).astype(jnp.float32)


def make_toy(seed: int = 0, **kwargs) -> ToyLM:
    return ToyLM(rngs=nnx.Rngs(seed), **kwargs)
