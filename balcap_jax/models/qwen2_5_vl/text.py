"""The Qwen2 text decoder (GQA with q/k/v bias, RMSNorm, SwiGLU, 1-D RoPE or M-RoPE), also serving Llama.

Module attribute names mirror HF's `Qwen2_5_VLTextModel` / `LlamaModel` (`embed_tokens`, `layers.self_attn.
q_proj`, `layers.mlp.gate_proj`, `norm`, ...) so checkpoint conversion is rule-based (see params.py). The decoder
layers are one layer stack (`layer_stack.py`: parameters [L, ...], one `lax.scan`); HF's per-layer keys
`layers.{i}.*` map onto its layer axis.

Three entry points share one layer implementation:
  * `__call__`  full sequence, no cache (training forward / log-probs);
  * `prefill`   full prompt, writes cache slots [0, T);
  * `decode`    one token per row at cache slot `cache.index`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models.attention import (
    DecodeMask,
    SegmentMask,
    attend,
    check_attention_impl,
    decode_attention,
    resolve_impl,
)
from balcap_jax.models.interface import CacheSpec, KVCache
from balcap_jax.models.layer_stack import layer_indices, scan_layers, stacked
from balcap_jax.models.layers import (
    Linear,
    RMSNorm,
    SwiGLU,
    activation,
    apply_rotary,
    constrain_batch,
    mrope_cos_sin,
    rope_cos_sin,
    rope_inv_freq,
    write_cache_layer,
)
from balcap_jax.models.remat import Remat

Array = jax.Array

_SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "qwen2_5_vl", "qwen2_vl", "llama")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and flags of a Qwen2/Llama-style decoder. Hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] | None = None  # None: 1-D RoPE; else M-RoPE chunk sizes over (t, h, w)
    qkv_bias: bool = True  # Qwen2: True; Llama: `attention_bias`
    o_bias: bool = False  # Llama's `attention_bias` also covers o_proj
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention: str = "reference"  # attention.ATTENTION_IMPLS: the einsum reference or the platform's fused kernel

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):  # fmt: skip
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DecoderConfig.{name} must be positive, got {getattr(self, name)}")
        activation(self.hidden_act)  # raises a clear error for an unsupported hidden_act
        check_attention_impl(self.attention, field="DecoderConfig.attention")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )

    @property
    def uses_mrope(self) -> bool:
        return self.mrope_section is not None

    def cache_spec(self) -> CacheSpec:
        return CacheSpec(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, tie_word_embeddings: bool | None = None) -> "DecoderConfig":
        """From an HF text config dict (Qwen2, Qwen2-VL/2.5-VL text part, flat or nested, or Llama).

        For a Qwen2.5-VL `config.json` pass the whole dict: a nested `text_config` is used when present.
        Embeddings are tied when the top level or the text config says so (HF's rule); `tie_word_embeddings`
        overrides both.
        """
        top = dict(hf)
        text = dict(top.get("text_config") or top)
        model_type = text.get("model_type", top.get("model_type"))
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not a supported decoder; expected one of "
                             f"{_SUPPORTED_MODEL_TYPES}")
        if text.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported (no released Qwen2.5-VL uses it); set it "
                             "to false in config.json")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or top.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"rope type {rope_type!r} is not supported (only default RoPE and M-RoPE)")
        theta = rope.get("rope_theta", text.get("rope_theta", top.get("rope_theta")))
        if theta is None:
            raise ValueError("config has no rope_theta (neither in rope_parameters nor at the top level)")
        mrope_section = rope.get("mrope_section")
        is_llama = model_type == "llama"
        num_heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // num_heads
        if tie_word_embeddings is None:
            # As HF's Qwen2_5_VLConfig: tied if either the top level or the text config says so.
            tie_word_embeddings = bool(top.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=text.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            mrope_section=tuple(mrope_section) if mrope_section is not None else None,
            qkv_bias=bool(text.get("attention_bias", False)) if is_llama else True,
            o_bias=bool(text.get("attention_bias", False)) if is_llama else False,
            mlp_bias=bool(text.get("mlp_bias", False)),
            hidden_act=text.get("hidden_act", "silu"),
            tie_word_embeddings=tie_word_embeddings,
        )


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, use_bias=c.qkv_bias, **linear)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, **linear)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, **linear)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.o_bias, **linear)
        self.head_dim = c.head_dim
        self.attention = c.attention

    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: SegmentMask | DecodeMask,
        cache_kv: tuple[Array, Array] | None = None,
        layer: Array | int = 0,
        write_slot: Array | int = 0,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """x [B, T, D]; cos/sin [B, T, Dh]; `layer`: int or int32[], the scan's layer index.

        A `SegmentMask` (training, prefill) attends over this step's own T keys with `config.attention`'s kernel.
        With `cache_kv` = (k, v) [L, B, S, H_kv, Dh] (prefill) they are written at layer `layer`, slots
        [write_slot, write_slot + T), and the updated cache_kv is returned.

        A `DecodeMask` (one token, T = 1) attends over the cache's `mask.length` filled slots, read only
        (`decode_attention`), and over the token's own key and value; it returns them, (k, v) [B, 1, H_kv, Dh]
        in the cache's dtype, for `TextModel.decode` to write. Returns ([B, T, D], cache_kv / (k, v) / None)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, -1, self.head_dim)
        k = self.k_proj(x).reshape(batch, length, -1, self.head_dim)
        v = self.v_proj(x).reshape(batch, length, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(mask, DecodeMask):
            if cache_kv is None:
                raise ValueError("a DecodeMask attends over the KV cache; pass cache_kv")
            # Rounded to the cache's dtype as if written and read back, as every later step will read them.
            current = (k.astype(cache_kv[0].dtype), v.astype(cache_kv[1].dtype))
            exact = resolve_impl(self.attention, dtype=q.dtype) == "reference"  # the reference rounds as HF
            out = decode_attention(q, cache_kv[0], cache_kv[1], mask.kv_valid, mask.length, layer=layer,
                                   exact=exact, current=current)  # fmt: skip
            return self.o_proj(out.reshape(batch, length, -1)), current
        if cache_kv is not None:
            cache_kv = (write_cache_layer(cache_kv[0], layer, write_slot, k),
                        write_cache_layer(cache_kv[1], layer, write_slot, v))  # fmt: skip
        # Prefill writes slots [0, T) of an empty cache: its keys are exactly this step's, so the cache is not
        # read back.
        out = attend(
            q, k.astype(q.dtype), v.astype(q.dtype), q_segment_ids=mask.q_segment_ids,
            kv_segment_ids=mask.kv_segment_ids, causal=mask.causal, impl=self.attention,
        )  # fmt: skip
        return self.o_proj(out.reshape(batch, length, -1)), cache_kv


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)); then x + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(
            config.hidden_size,
            config.intermediate_size,
            use_bias=config.mlp_bias,
            act=config.hidden_act,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype
        )

    def __call__(self, x, cos, sin, mask, cache_kv=None, layer: Array | int = 0, write_slot=0):
        """See `Attention.__call__`; returns ([B, T, D], the updated cache_kv, or this token's (k, v) in decode)."""
        attn_out, cache_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, layer, write_slot)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache_kv


class TextModel(nnx.Module):
    """Token embedding, decoder layers and final norm (HF `Qwen2_5_VLTextModel` / `LlamaModel`).

    Positions: int[B, T] for 1-D RoPE configs, int[3, B, T] (t, h, w) for M-RoPE configs. An M-RoPE model
    also accepts int[B, T] (text-only: the same position on all three axes).

    `layers` is a stack of `num_layers` DecoderLayers (parameters [L, ...]) run by one scan; `remat` (False /
    True / "none" / "full" / "save_dots", see `remat.Remat`) checkpoints the scanned layer in the training
    forward.
    """

    layer_stacks = ("layers",)

    def __init__(
        self,
        config: DecoderConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.remat = Remat.parse(remat)
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = stacked(
            lambda r: DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r), config.num_layers, rngs
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)

    # -- helpers --------------------------------------------------------------------------------------------

    def embed(self, input_ids: Array) -> Array:
        """int[...] -> [..., D] in the compute dtype."""
        return self.embed_tokens(input_ids).astype(self.dtype)

    def rotary(self, positions: Array) -> tuple[Array, Array]:
        """positions int[B, T] or int[3, B, T] -> cos, sin fp32 [B, T, Dh]."""
        c = self.config
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta)
        if c.uses_mrope:
            if positions.ndim == 2:
                positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
            return mrope_cos_sin(positions, inv_freq, c.mrope_section)
        if positions.ndim != 2:
            raise ValueError(f"1-D RoPE decoder expects positions [B, T], got shape {positions.shape}")
        return rope_cos_sin(positions, inv_freq)

    def _layers(self, x, cos, sin, mask, cache_kv, write_slot):
        """All layers, then the final norm. Returns (hidden, the updated cache_kv), or in decode (hidden, the new
        (k, v)).

        Prefill: the whole stacked cache rides in the scan carry and each layer writes its own slice in place (no
        per-layer copies of the cache). Decode (`DecodeMask`): the cache is only read inside the scan, and the
        layers' new keys and values come back stacked, (k, v) [L, B, 1, H_kv, Dh], for `decode` to write."""
        indices = layer_indices(self.config.num_layers)
        if isinstance(mask, DecodeMask):
            def decode_step(layer: DecoderLayer, hidden, index):
                hidden, current = layer(hidden, cos, sin, mask, cache_kv, index)
                return constrain_batch(hidden), current

            x, new_kv = scan_layers(self.layers, decode_step, constrain_batch(x), indices)
            return self.norm(x), new_kv

        def step(layer: DecoderLayer, carry, index):
            hidden, kv = carry
            hidden, kv = layer(hidden, cos, sin, mask, kv, index, write_slot)
            return (constrain_batch(hidden), kv), None

        # Remat only matters where a backward pass follows: the cache-free training forward.
        remat = self.remat if cache_kv is None else Remat.NONE
        (x, cache_kv), _ = scan_layers(self.layers, step, (constrain_batch(x), cache_kv), indices, remat=remat)
        return self.norm(x), cache_kv

    # -- entry points ---------------------------------------------------------------------------------------

    def __call__(self, embeds: Array, positions: Array, attention_mask: Array) -> Array:
        """Full-sequence forward. embeds [B, T, D], attention_mask bool[B, T] -> final-norm hidden [B, T, D]."""
        batch, length, _ = embeds.shape
        chex.assert_shape(attention_mask, (batch, length))
        cos, sin = self.rotary(positions)
        mask = SegmentMask.from_padding(attention_mask)
        hidden, _ = self._layers(embeds.astype(self.dtype), cos, sin, mask, None, 0)
        return hidden

    def prefill(
        self, embeds: Array, positions: Array, attention_mask: Array, cache: KVCache
    ) -> tuple[Array, KVCache]:
        """Prompt forward writing cache slots [0, T). Returns hidden [B, T, D] and the cache with
        valid[:, :T] = attention_mask, valid[:, T:] = False and index = T."""
        batch, length, _ = embeds.shape
        chex.assert_shape(attention_mask, (batch, length))
        if length > cache.max_len:
            raise ValueError(f"prompt length {length} exceeds the KV cache length {cache.max_len}")
        attention_mask = attention_mask.astype(bool)
        valid = jnp.zeros((batch, cache.max_len), bool).at[:, :length].set(attention_mask)
        cos, sin = self.rotary(positions)
        mask = SegmentMask.from_padding(attention_mask)
        hidden, (k, v) = self._layers(embeds.astype(self.dtype), cos, sin, mask, (cache.k, cache.v), 0)
        return hidden, KVCache(k=k, v=v, valid=valid, index=jnp.asarray(length, jnp.int32))

    def decode(self, embeds: Array, positions: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """One token per row. embeds [B, D], positions int[B] (text position, used on all M-RoPE axes).
        Writes slot `cache.index`; returns hidden [B, D] and the cache with index + 1.

        The layers read the cache and attend to the token's own key and value beside it; all L layers' keys and
        values are then written with one update per buffer, in place on a donated cache."""
        batch = embeds.shape[0]
        chex.assert_shape(positions, (batch,))
        index = cache.index
        cos, sin = self.rotary(positions[:, None])
        mask = DecodeMask(kv_valid=cache.valid, length=index)
        hidden, (k_new, v_new) = self._layers(
            embeds[:, None].astype(self.dtype), cos, sin, mask, (cache.k, cache.v), index
        )
        chex.assert_shape(k_new, (cache.k.shape[0], batch, 1, *cache.k.shape[3:]))
        zero = jnp.zeros((), jnp.int32)
        at_index = (zero, zero, index, zero, zero)
        return hidden[:, 0], KVCache(
            k=jax.lax.dynamic_update_slice(cache.k, k_new, at_index),
            v=jax.lax.dynamic_update_slice(cache.v, v_new, at_index),
            valid=jax.lax.dynamic_update_slice(cache.valid, jnp.ones((batch, 1), bool), (zero, index)),
            index=index + 1,
        )
