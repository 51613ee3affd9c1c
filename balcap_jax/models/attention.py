"""Softmax attention behind one switch: the einsum reference or the platform's fused kernel.

    out = attend(q, k, v, q_segment_ids=..., kv_segment_ids=..., causal=True, impl=config.attention)

Masking is expressed by segment ids (a query sees the keys of its own segment) and an optional causal rule
(query t sees key slots <= t). That one description serves every caller: causal text with padding (real tokens
segment 1, padding segment 0, so a padding query sees padding and no row is ever fully masked), the Qwen vision
windows and per-image full attention (one segment per window / image), and CLIP (no segments).

`impl`:
  * "reference": the einsum that materialises fp32 scores, rounded where HF's eager attention rounds, so a bf16
    model agrees with HF's bf16 model (`attention_scores`). The parity tests run it.
  * "flash": the platform's fused kernel, resolved when the program is traced: TPU -> Pallas splash attention
    (segment ids and the causal mask inside the kernel, no [T, S] scores in HBM); GPU -> cuDNN through
    `jax.nn.dot_product_attention` (bf16/fp16 only: an fp32 model keeps the reference); CPU -> the reference.
  * "splash" / "cudnn": that kernel whatever the platform (tests, AOT lowering).

Decoding does not go through `attend`: `decode_attention` reads the KV cache block by block and stops at the
filled length, so a step's cost follows the tokens written so far, not the cache size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

# What `config.model.attention` may say; "splash"/"cudnn" force a kernel (tests, AOT) and are not config values.
ATTENTION_IMPLS = ("reference", "flash")
_KERNELS = ("reference", "splash", "cudnn")
_BATCH_AXES = ("data", "fsdp")  # parallel.mesh.BATCH_AXES (not imported: models do not depend on parallel/)
_HEAD_AXIS = "tensor"
SPLASH_BLOCK = 128  # splash tiles; sequences are padded to a multiple of it


def check_attention_impl(impl: str, *, field: str = "attention") -> str:
    """`impl` if it names an attention implementation, else a ValueError naming `field` and the choices."""
    if impl not in ATTENTION_IMPLS + _KERNELS[1:]:
        raise ValueError(f"{field}={impl!r} is not an attention implementation; use one of {ATTENTION_IMPLS}")
    return impl


def with_attention(model_config: Any, impl: str) -> Any:
    """A model config (Qwen2.5-VL, LLaVA or a bare decoder / tower config) whose every attention uses `impl`.

    Configs carry the choice like their shapes, so loaders that take a `config=` build the module with it."""
    check_attention_impl(impl, field="config.model.attention")
    if hasattr(model_config, "text") and hasattr(model_config, "vision"):
        return dataclasses.replace(
            model_config,
            text=dataclasses.replace(model_config.text, attention=impl),
            vision=dataclasses.replace(model_config.vision, attention=impl),
        )
    return dataclasses.replace(model_config, attention=impl)


def trace_platform() -> str:
    """The platform the program being traced is for: the ambient mesh's devices (an AOT compile for TPU traces on
    a CPU host), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_impl(impl: str, platform: str | None = None, dtype: Any = jnp.bfloat16) -> str:
    """"flash" -> the kernel for `platform` (default: `trace_platform()`) and compute `dtype`; others pass.

    Returns one of "reference", "splash", "cudnn"."""
    check_attention_impl(impl)
    if impl != "flash":
        return impl
    platform = platform or trace_platform()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"  # cuDNN's fused attention takes no fp32; an fp32 model keeps the reference
    return "reference"


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def attention_scores(equation: str, q: Array, k: Array, scale: float) -> Array:
    """Scaled attention logits `einsum(equation, q, k) * scale`, returned in fp32 for the softmax.

    Rounded where HF's eager attention rounds: `matmul(q, k^T)` to q's dtype, then the product with the
    (fp32) scale again. In fp32 both roundings are no-ops.
    """
    logits = jnp.einsum(equation, q, k, preferred_element_type=jnp.float32).astype(q.dtype)
    return (logits.astype(jnp.float32) * np.float32(scale)).astype(q.dtype).astype(jnp.float32)


def causal_mask(query_slots: Array, key_valid: Array) -> Array:
    """Mask for queries at cache slots `query_slots` int[B, T] over keys at slots 0..S-1.

    key_valid: bool[B, S]. A query attends key slot s iff s <= its own slot and the key is valid.
    Returns bool[B, T, S].
    """
    chex.assert_rank([query_slots, key_valid], [2, 2])
    key_slots = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
    return (key_slots[None, None, :] <= query_slots[:, :, None]) & key_valid[:, None, :]


def segment_mask(q_segment_ids: Array | None, kv_segment_ids: Array | None, *, causal: bool, shape) -> Array | None:
    """bool[B, T, S] "query t may attend key s": same segment and, if `causal`, s <= t. None when nothing is
    masked. shape = (B, T, S); segment ids int[B, T] / int[B, S] or both None."""
    batch, q_len, kv_len = shape
    mask = None
    if q_segment_ids is not None:
        mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        rule = jnp.arange(kv_len)[None, None, :] <= jnp.arange(q_len)[None, :, None]
        mask = rule if mask is None else mask & rule
    return None if mask is None else jnp.broadcast_to(mask, (batch, q_len, kv_len))


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, *, scale: float | None = None) -> Array:
    """Grouped-query softmax attention, the reference math.

    q [B, T, H, Dh], k/v [B, S, H_kv, Dh] with H a multiple of H_kv, mask bool[B, T, S] or None (no masking).
    Softmax in fp32 over logits rounded as HF rounds them (`attention_scores`); fully masked rows give a finite,
    meaningless output instead of NaN. Returns [B, T, H, Dh] in v's dtype.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    groups = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    logits = attention_scores("btkgd,bskd->bkgts", q, k, scale)
    if mask is not None:
        chex.assert_rank(mask, 3)
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


# ----------------------------------------------------------------------------------------------------------------
# Fused kernels
# ----------------------------------------------------------------------------------------------------------------


def _pad_axis(x: Array, axis: int, to: int, value) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def splash_kernel(q_len: int, kv_len: int, groups: int, causal: bool, interpret: bool):
    """The splash MQA kernel for one KV head and its `groups` query heads over [q_len, kv_len] (both multiples
    of SPLASH_BLOCK). Built inside each trace: it holds its block-sparsity tables as arrays of that trace."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    one = masks.CausalMask((q_len, kv_len)) if causal else masks.FullMask((q_len, kv_len))
    block = min(SPLASH_BLOCK, q_len, kv_len)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return splash.make_splash_mqa(
        masks.MultiHeadMask([one] * groups), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def splash_attention(
    q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array, *, causal: bool, scale: float,
    interpret: bool = False,
) -> Array:
    """Pallas TPU splash attention with the reference's signature (q [B, T, H, Dh], k/v [B, S, H_kv, Dh],
    segment ids int[B, T] / int[B, S]); `interpret` runs the kernel in Pallas interpret mode (CPU tests).

    Sequences are padded to a multiple of SPLASH_BLOCK with segment -1 on both sides, so padded queries see
    padded keys only and never a real one (and no row is empty). q is scaled before the kernel (it has no
    scale argument); each KV head is one MQA call over its group of query heads. Returns [B, T, H, Dh]."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q_pad, kv_pad = (-(-n // SPLASH_BLOCK) * SPLASH_BLOCK for n in (q_len, kv_len))
    q = _pad_axis((q * jnp.asarray(scale, q.dtype)).astype(q.dtype), 1, q_pad, 0)
    k, v = _pad_axis(k, 1, kv_pad, 0), _pad_axis(v, 1, kv_pad, 0)
    q_ids = _pad_axis(q_segment_ids.astype(jnp.int32), 1, q_pad, -1)
    kv_ids = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, kv_pad, -1)
    kernel = splash_kernel(q_pad, kv_pad, groups, bool(causal), bool(interpret))
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    # [B, T, H_kv * G, Dh] -> [B, H_kv, G, T, Dh]; k/v [B, S, H_kv, Dh] -> [B, H_kv, S, Dh].
    q = q.reshape(batch, q_pad, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_row(q_row, k_row, v_row, q_row_ids, kv_row_ids):
        ids = SegmentIds(q=q_row_ids, kv=kv_row_ids)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(q, k, v, q_ids, kv_ids)  # [B, H_kv, G, T_pad, Dh]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_pad, heads, head_dim)
    return out[:, :q_len].astype(v.dtype)


def cudnn_attention(
    q: Array, k: Array, v: Array, q_segment_ids: Array | None, kv_segment_ids: Array | None, *, causal: bool,
    scale: float, implementation: str = "cudnn",
) -> Array:
    """cuDNN fused attention via `jax.nn.dot_product_attention` (same shapes as the reference). The causal rule
    is cuDNN's own mask; segments become its boolean mask [B, 1, T, S] (cuDNN has no segment ids), which is
    O(T * S) bits per row, not the H x T x S fp32 scores. `implementation="xla"` runs the same call on any
    platform (tests)."""
    length = q.shape[1]
    if length % 2 or k.shape[1] % 2:
        q, k, v, q_segment_ids, kv_segment_ids = _even_lengths(q, k, v, q_segment_ids, kv_segment_ids)
    mask = None
    if q_segment_ids is not None:
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal, implementation=implementation
    )
    return out[:, :length]


def _even_lengths(q: Array, k: Array, v: Array, q_ids: Array | None, kv_ids: Array | None) -> tuple[Array, ...]:
    """cuDNN trains with a mask only on even sequence lengths (CLIP's 577 tokens are not): one slot of padding
    where a length is odd. A padded key gets a segment no query has; a padded query repeats the last real
    query's segment (it must see some key; its output is dropped). Both sit after every real slot, so the causal
    rule is unchanged."""
    if q_ids is None:
        q_ids = jnp.zeros(q.shape[:2], jnp.int32)
        kv_ids = jnp.zeros(k.shape[:2], jnp.int32)
    t, s = q.shape[1] + q.shape[1] % 2, k.shape[1] + k.shape[1] % 2
    never = jnp.iinfo(jnp.int32).min
    q_ids = jnp.concatenate([q_ids, jnp.broadcast_to(q_ids[:, -1:], (q_ids.shape[0], t - q_ids.shape[1]))], 1)
    return (_pad_axis(q, 1, t, 0), _pad_axis(k, 1, s, 0), _pad_axis(v, 1, s, 0), q_ids,
            _pad_axis(kv_ids, 1, s, never))


def ambient_batch_axes(size: int) -> tuple[str, ...] | None:
    """The ambient mesh's batch axes (those of size > 1) when they divide a leading axis of `size`, else None (no
    mesh, or a size that cannot be split: the work then runs whole on every device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = tuple(a for a in _BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    return axes if axes and size % shards == 0 else None


def _shard_over_batch(fn, arrays: tuple[Array, ...], heads: tuple[int, int]):
    """Run `fn(*arrays)` per batch (and head) shard under the ambient mesh, as a `shard_map`.

    A Pallas / cuDNN custom call is opaque to XLA's partitioner, which would gather a sharded batch onto every
    device; mapping over shards keeps each device on its own rows. arrays: q, k, v [B, ., H, Dh] then segment ids
    [B, .] (or None). Without a mesh `fn` runs as is; a batch that does not divide over the batch axes (the
    vision tower's one flat sequence) runs whole on every device, as the replicated reference does."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*arrays)
    rows = ambient_batch_axes(arrays[0].shape[0])
    head_axis = None
    if _HEAD_AXIS in mesh.axis_names and mesh.shape[_HEAD_AXIS] > 1 and not heads[1] % mesh.shape[_HEAD_AXIS]:
        head_axis = _HEAD_AXIS
    P = jax.sharding.PartitionSpec
    qkv = P(rows, None, head_axis, None)
    specs = tuple(qkv if i < 3 else (None if a is None else P(rows, None)) for i, a in enumerate(arrays))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*arrays)


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    impl: str = "reference",
) -> Array:
    """Softmax attention: query t of row b sees key s iff they share a segment (when ids are given) and, when
    `causal`, s <= t (queries sit at the first T key slots).

    q [B, T, H, Dh], k/v [B, S, H_kv, Dh] (H a multiple of H_kv), segment ids int[B, T] and int[B, S] or both None;
    scale defaults to Dh^-0.5. Every query must see at least one key (the callers' segment layouts guarantee it).
    impl: see the module docstring; splash off TPU runs in Pallas interpret mode (tests). Returns [B, T, H, Dh].
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"num_heads={q.shape[2]} must be a multiple of num_kv_heads={k.shape[2]}")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(f"causal attention needs at least as many keys ({k.shape[1]}) as queries ({q.shape[1]})")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kernel = resolve_impl(impl, dtype=q.dtype)
    if kernel == "reference":
        mask = segment_mask(q_segment_ids, kv_segment_ids, causal=causal, shape=(q.shape[0], q.shape[1], k.shape[1]))
        return dot_product_attention(q, k, v, mask, scale=scale)
    if kernel == "splash":
        if q_segment_ids is None:
            q_segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
            kv_segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
        interpret = trace_platform() != "tpu"
        fn = functools.partial(splash_attention, causal=causal, scale=scale, interpret=interpret)
    else:
        fn = functools.partial(cudnn_attention, causal=causal, scale=scale)
    return _shard_over_batch(fn, (q, k, v, q_segment_ids, kv_segment_ids), (q.shape[2], k.shape[2]))


# ----------------------------------------------------------------------------------------------------------------
# Decode: the filled part of the cache only
# ----------------------------------------------------------------------------------------------------------------


def decode_block_scores(qg: Array, k: Array, scale: float) -> Array:
    """Scaled logits of one query group against a block of cached keys, rounded as `attention_scores`.

    qg [B, H_kv, G, Dh]; k [B, S, H_kv, Dh] (the cache's layout) -> fp32 [B, H_kv, G, S].

    On CPU the product is taken as [B, S, H_kv * Dh] x [B, H_kv * Dh, H]: the keys as they lie in the cache
    against a block-diagonal copy of the queries (H_kv times the FLOPs of a tiny product). The plain einsum
    contracts the keys' minor dimension, and XLA:CPU transposes the whole block for it: that transpose was the
    largest cost of a small model's decode step after the weights' matmuls. Other platforms keep the einsum
    (their compilers pick the cache's layout themselves).
    """
    if trace_platform() != "cpu":
        return attention_scores("bkgd,bskd->bkgs", qg, k, scale)
    batch, kv_heads, groups, head_dim = qg.shape
    block = k.shape[1]
    eye = jnp.eye(kv_heads, dtype=qg.dtype)
    queries = jnp.einsum("bkgd,kj->bjdkg", qg, eye).reshape(batch, kv_heads * head_dim, kv_heads * groups)
    keys = k.reshape(batch, block, kv_heads * head_dim)
    raw = jnp.einsum("bsc,bch->bsh", keys, queries, preferred_element_type=jnp.float32).astype(qg.dtype)
    raw = jnp.transpose(raw.reshape(batch, block, kv_heads, groups), (0, 2, 3, 1))
    return (raw.astype(jnp.float32) * np.float32(scale)).astype(qg.dtype).astype(jnp.float32)


def decode_block_size(cache_len: int, limit: int = 256) -> int:
    """Keys per step of `decode_attention`: `limit`, or the whole cache when it is shorter."""
    return max(1, min(limit, cache_len))


def decode_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    kv_valid: Array,
    length: Array,
    *,
    layer: Array | int = 0,
    block_size: int = 256,
    scale: float | None = None,
    exact: bool = True,
    current: tuple[Array, Array] | None = None,
) -> Array:
    """One query per row against the first `length` slots of a stacked KV cache, block by block.

    q [B, 1, H, Dh]; k_cache/v_cache [L, B, S, H_kv, Dh] (this `layer` is read); kv_valid bool[B, S]; length
    int32[] (the loops' trip count is ceil(length / block_size): blocks past the filled part are never read).
    Logits round as HF rounds them (`attention_scores`). The last block may overlap the one before it when S is
    not a multiple of block_size: slots already counted are masked.

    current: this step's own key and value (k, v) [B, 1, H_kv, Dh], attended besides the cache's `length` slots
    (always valid), as if written at slot `length`. The decoder passes them instead of writing the cache inside
    its layer loop: a loop that reads and updates the same buffer made XLA:CPU copy the whole stacked cache
    twice per layer (see `TextModel.decode`, which writes every layer's token once, after the loop).

    exact=True (the reference): the softmax of the reference in three passes over the filled blocks (max, sum,
    weights rounded to the compute dtype before the product with v, as HF's eager attention rounds them), so a
    bf16 decode step rounds where HF's does. exact=False (fused kernels): one pass, an online softmax with fp32
    running max / sum / weighted values, rounded once at the end. Returns [B, 1, H, Dh] in q's dtype.
    """
    batch, one, heads, head_dim = q.shape
    chex.assert_rank([k_cache, v_cache], 5)
    _, _, cache_len, kv_heads, _ = k_cache.shape
    if one != 1:
        raise ValueError(f"decode_attention takes one query per row, got q of shape {q.shape}")
    block = decode_block_size(cache_len, block_size)
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    qg = q.reshape(batch, kv_heads, groups, head_dim)
    layer = jnp.asarray(layer, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    length = jnp.asarray(length, jnp.int32)
    lowest = jnp.finfo(jnp.float32).min
    trips = (jnp.minimum(length, cache_len) + block - 1) // block

    def read_block(i, with_values: bool):
        """Block i: (masked fp32 logits [B, H_kv, G, block], valid [B, 1, 1, block], values or None)."""
        nominal = i * block
        start = jnp.minimum(nominal, cache_len - block)  # dynamic_slice would clamp to this anyway
        index = (layer, zero, start, zero, zero)
        size = (1, batch, block, kv_heads, head_dim)
        k = jax.lax.dynamic_slice(k_cache, index, size)[0].astype(q.dtype)
        slots = start + jnp.arange(block, dtype=jnp.int32)
        valid = jax.lax.dynamic_slice(kv_valid, (zero, start), (batch, block))
        valid = (valid & (slots >= nominal)[None] & (slots < length)[None])[:, None, None, :]
        logits = jnp.where(valid, decode_block_scores(qg, k, scale), lowest)
        if not with_values:
            return logits, valid, None
        v = jax.lax.dynamic_slice(v_cache, index, size)[0].astype(q.dtype)
        # A block's tail past `length` holds whatever the cache held (stale rows, NaN): a zero weight does not
        # cancel a NaN value, so masked values are zeroed too.
        v = jnp.where(valid[:, 0, 0, :, None, None], v, jnp.zeros((), v.dtype))
        return logits, valid, v

    # The loops' initial running max, sum and weighted values: empty, or opened by the current token.
    stats = jnp.full((batch, kv_heads, groups), lowest, jnp.float32)
    sum0 = jnp.zeros((batch, kv_heads, groups), jnp.float32)
    acc0 = jnp.zeros((batch, kv_heads, groups, head_dim), jnp.float32)
    if current is not None:
        k_now, v_now = (x.reshape(batch, kv_heads, head_dim).astype(q.dtype) for x in current)
        logit_now = attention_scores("bkgd,bkd->bkg", qg, k_now, scale)  # [B, H_kv, G]
        stats = logit_now

    if exact:
        def max_step(i, running_max):
            return jnp.maximum(running_max, jnp.max(read_block(i, False)[0], axis=-1))

        row_max = jax.lax.fori_loop(0, trips, max_step, stats)
        if current is not None:
            sum0 = jnp.exp(logit_now - row_max)

        def sum_step(i, total):
            logits, valid, _ = read_block(i, False)
            return total + jnp.sum(jnp.where(valid, jnp.exp(logits - row_max[..., None]), 0.0), axis=-1)

        total = jax.lax.fori_loop(0, trips, sum_step, sum0)
        if current is not None:
            weight_now = (jnp.exp(logit_now - row_max) / total).astype(v_now.dtype)
            acc0 = jnp.einsum("bkg,bkd->bkgd", weight_now, v_now, preferred_element_type=jnp.float32)

        def value_step(i, acc):
            logits, valid, v = read_block(i, True)
            weights = jnp.where(valid, jnp.exp(logits - row_max[..., None]), 0.0) / total[..., None]
            return acc + jnp.einsum("bkgs,bskd->bkgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)

        out = jax.lax.fori_loop(0, trips, value_step, acc0)
    else:
        if current is not None:  # the current token opens the running softmax: weight exp(0) = 1
            sum0 = jnp.ones_like(sum0)
            acc0 = jnp.broadcast_to(v_now[:, :, None].astype(jnp.float32), acc0.shape)

        def online_step(i, carry):
            running_max, running_sum, acc = carry
            logits, valid, v = read_block(i, True)
            new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
            weights = jnp.where(valid, jnp.exp(logits - new_max[..., None]), 0.0)
            correction = jnp.exp(running_max - new_max)
            running_sum = running_sum * correction + jnp.sum(weights, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgs,bskd->bkgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
            )
            return new_max, running_sum, acc

        _, total, acc = jax.lax.fori_loop(0, trips, online_step, (stats, sum0, acc0))
        # A row with no valid key (never the case in decoding: the new token is valid) gives zeros, not NaN.
        out = acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    return out.reshape(batch, 1, heads, head_dim).astype(q.dtype)


@struct.dataclass
class SegmentMask:
    """Who sees whom in a full-sequence attention: segment ids int[B, T] / int[B, S] and the causal rule."""

    q_segment_ids: Array
    kv_segment_ids: Array
    causal: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def from_padding(cls, attention_mask: Array, *, causal: bool = True) -> "SegmentMask":
        """Text rows: bool[B, T] (True = real token) -> real tokens segment 1, padding segment 0."""
        ids = attention_mask.astype(jnp.int32)
        return cls(q_segment_ids=ids, kv_segment_ids=ids, causal=causal)


@struct.dataclass
class DecodeMask:
    """A decode step's view of the cache: kv_valid bool[B, S] and the filled length int32[] (slots >= length
    are never read; the step's own token, not yet written, is attended besides them)."""

    kv_valid: Array
    length: Array
