"""The Qwen2.5-VL vision tower (ViT with window attention and a 2x2 patch merger) in Flax NNX.

The tower runs on one flat sequence holding the patches of every image in the batch, already permuted into
window order and padded to a bucket by `vision_host.prepare_vision_inputs`, which also supplies the attention
segments, the rotary tables and the inverse permutation. Nothing here depends on the image sizes, so one
compiled tower serves every batch in a bucket. An optional leading block axis (one such sequence per block of
rows, `vision_host.prepare_sharded_vision_inputs`) rides along every op, so a mesh can split the images.

Attention is block-diagonal by segment: windowed blocks see the patches of their own 112-px window, the
`fullatt_block_indexes` blocks see their whole image frame, padding sees only padding. Window attention only
ever compares keys within one window-sized block of the query's (windows are contiguous and at most
`window_patches` long), so its cost is linear in the number of patches; which keys count is still decided by
segment equality alone.

The blocks are one layer stack (`layer_stack.py`: parameters [depth, ...]) run by one `lax.scan`, so the
compiled tower holds one block whatever the depth. Windowed and full-attention blocks share their weights'
shapes and differ only in the segments they attend over; each scan step picks its attention with `lax.cond`
on a per-block flag (only the chosen branch runs).

Attribute names mirror HF's `Qwen2_5_VisionTransformerPretrainedModel` (`patch_embed.proj`, `blocks.attn.qkv`
for HF's `blocks.{i}.attn.qkv`, `blocks.mlp.gate_proj`, `merger.ln_q`, `merger.mlp[0]` / `merger.mlp[2]`), so
checkpoints convert by rule; the one exception, the Conv3d patch projection, is declared in `hf_special_cases`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax.models.layer_stack import scan_layers, stacked
from balcap_jax.models.attention import attend, check_attention_impl, resolve_impl
from balcap_jax.models.layers import Linear, RMSNorm, SwiGLU, apply_rotary, gelu
from balcap_jax.models.remat import Remat

Array = jax.Array
VisionInputs = Mapping[str, Array]
# (q, k, v) [N, H, Dh] -> [N, H, Dh]: how one block attends (see `window_attention`, `full_attention`).
Attend = Callable[[Array, Array, Array], Array]

# Keys of `vision_host.prepare_vision_inputs` that the tower reads.
VISION_INPUT_KEYS = (
    "patches",
    "window_segment_ids",
    "full_segment_ids",
    "rotary_cos",
    "rotary_sin",
    "inverse_window_index",
    "token_valid",
)
_SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape of the vision tower. Defaults are those of HF's `Qwen2_5_VLVisionConfig()`; real checkpoints set
    `hidden_size=1280` and `out_hidden_size` to the decoder width (2048 for 3B, 3584 for 7B)."""

    depth: int = 32
    hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 4
    rms_norm_eps: float = 1e-6
    attention: str = "reference"  # attention.ATTENTION_IMPLS: the einsum reference or the platform's fused kernel

    def __post_init__(self):
        check_attention_impl(self.attention, field="VisionConfig.attention")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size"):  # fmt: skip
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VisionConfig.{name} must be positive; got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VisionConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(f"VisionConfig head_dim={self.head_dim} must be a multiple of 4 (2-D rotary)")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(
                f"VisionConfig.window_size={self.window_size} must be a multiple of patch_size * "
                f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"VisionConfig.fullatt_block_indexes {bad} are outside [0, depth={self.depth})")
        if self.hidden_act not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(f"VisionConfig.hidden_act={self.hidden_act!r}; supported: {_SUPPORTED_ACTIVATIONS}")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> VisionConfig:
        """From an HF `vision_config` dict (the `config.json` entry or `Qwen2_5_VLVisionConfig.to_dict()`).

        Accepts the released checkpoints' spellings (`in_chans`, a top-level `rope_theta`); keys that do not
        shape the tower (`model_type`, `initializer_range`, ...) are ignored.
        """
        config = dict(config)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ValueError(f"vision rope_type={rope['rope_type']!r}: only the axial 2-D rotary is supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        if "in_chans" in config and "in_channels" not in config:
            kwargs["in_channels"] = config["in_chans"]
        kwargs["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", cls.rope_theta)))
        for name in ("patch_size", "temporal_patch_size"):
            if isinstance(kwargs.get(name), (list, tuple)):
                sizes = set(kwargs[name])
                if len(sizes) != 1:
                    raise ValueError(f"vision {name}={kwargs[name]}: only equal sizes along every axis are supported")
                kwargs[name] = sizes.pop()
        return cls(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch, C*T*p*p (1176 for 3 x 2 x 14 x 14)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches fused into one language-model token (4)."""
        return self.spatial_merge_size**2

    @property
    def window_patches(self) -> int:
        """Patches in one full attention window (64 = (112 / 14)²); the unit of patch buckets."""
        return (self.window_size // self.patch_size) ** 2


# ----------------------------------------------------------------------------------------------------------------
# Attention over segments
# ----------------------------------------------------------------------------------------------------------------


def segment_attention(
    q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array, *, impl: str = "reference"
) -> Array:
    """Softmax attention where a query sees exactly the keys of its own segment (no causality).

    q [..., Q, H, Dh], k/v [..., K, H, Dh], q_segment_ids int[..., Q], kv_segment_ids int[..., K]; the leading
    axes are attention's batch. `impl` as in `attention.attend` (the reference rounds as HF rounds). Every query
    must share a segment with at least one key (the tower guarantees it: each query's own position is always
    among the keys). Returns [..., Q, H, Dh] in v's dtype.
    """
    chex.assert_equal_shape([k, v])
    lead = q.shape[:-3]
    flat = lambda x: x.reshape(-1, *x.shape[len(lead):])  # noqa: E731  leading axes -> one batch axis
    out = attend(
        flat(q), flat(k), flat(v), q_segment_ids=flat(q_segment_ids), kv_segment_ids=flat(kv_segment_ids),
        impl=impl,
    )
    return out.reshape(q.shape)


def local_segment_attention(
    q: Array, k: Array, v: Array, segment_ids: Array, *, block_size: int, impl: str = "reference"
) -> Array:
    """`segment_attention` over one sequence whose segments are contiguous and at most `block_size` long.

    The sequence is cut into blocks of `block_size`; a query's segment then lies within its own block and the
    two neighbouring ones, so each block of queries is compared with those three blocks of keys only
    (O(N * block_size) instead of O(N²)). The result is exactly `segment_attention(q, k, v, ids, ids)` for every
    query whose segment fits in a block. (The tower's bucket padding is one segment that may be longer; its
    queries then see only nearby padding, which changes no real position.)

    q/k/v [..., N, H, Dh] with N a multiple of block_size; segment_ids int[..., N] (leading axes: independent
    sequences, e.g. the blocks of rows of `models/image_shards.py`). Returns [..., N, H, Dh].
    """
    *lead, n, heads, head_dim = q.shape
    if n % block_size:
        raise ValueError(f"sequence length {n} must be a multiple of the attention block size {block_size}")
    blocks = n // block_size
    axis = len(lead)  # the blocks axis of the reshaped sequences

    def neighbourhood(x: Array, fill) -> Array:
        """[..., N, ...] -> [..., blocks, 3 * block_size, ...]: each block with its left and right neighbours."""
        x = x.reshape(*lead, blocks, block_size, *x.shape[axis + 1:])
        edge_shape = list(x.shape)
        edge_shape[axis] = 1
        edge = jnp.full(edge_shape, fill, x.dtype)
        padded = jnp.concatenate([edge, x, edge], axis=axis)
        take = lambda a, b: jax.lax.slice_in_dim(padded, a, padded.shape[axis] - b, axis=axis)  # noqa: E731
        return jnp.concatenate([take(0, 2), take(1, 1), take(2, 0)], axis=axis + 1)

    # The halo beyond the sequence ends gets segment -1, which no position has.
    out = segment_attention(
        q.reshape(*lead, blocks, block_size, heads, head_dim),
        neighbourhood(k, 0),
        neighbourhood(v, 0),
        segment_ids.reshape(*lead, blocks, block_size),
        neighbourhood(segment_ids, -1),
        impl=impl,
    )
    return out.reshape(q.shape)


def chunked_segment_attention(
    q: Array, k: Array, v: Array, segment_ids: Array, *, query_chunk: int, impl: str = "reference"
) -> Array:
    """`segment_attention` over one whole sequence, `query_chunk` queries at a time.

    Peak memory holds H x query_chunk x N logits instead of H x N x N (the chunk body is rematerialised in the
    backward pass). q/k/v [..., N, H, Dh], segment_ids int[..., N] (leading axes: independent sequences); N must
    be a multiple of query_chunk. A fused kernel (`impl` resolving to one) never holds the logits, so it takes the
    whole sequence at once.
    """
    *lead, n, heads, head_dim = q.shape
    if n <= query_chunk or resolve_impl(impl, dtype=q.dtype) != "reference":
        return segment_attention(q, k, v, segment_ids, segment_ids, impl=impl)
    if n % query_chunk:
        raise ValueError(f"sequence length {n} must be a multiple of the query chunk {query_chunk}")
    axis = len(lead)

    @jax.checkpoint
    def one_chunk(chunk: tuple[Array, Array]) -> Array:
        q_chunk, q_ids = chunk
        return segment_attention(q_chunk, k, v, q_ids, segment_ids, impl=impl)

    # [..., N, ...] -> [N / chunk, ..., chunk, ...]: lax.map walks the chunks, every sequence at once.
    q_chunks = jnp.moveaxis(q.reshape(*lead, n // query_chunk, query_chunk, heads, head_dim), axis, 0)
    id_chunks = jnp.moveaxis(segment_ids.reshape(*lead, n // query_chunk, query_chunk), axis, 0)
    out = jax.lax.map(one_chunk, (q_chunks, id_chunks))
    return jnp.moveaxis(out, 0, axis).reshape(q.shape)


def _largest_dividing_chunk(n: int, limit: int, granule: int) -> int:
    """The largest multiple of `granule` that divides n and is <= limit (n itself when n <= limit)."""
    if n <= limit:
        return n
    for size in range(limit - limit % granule, 0, -granule):
        if n % size == 0:
            return size
    return n


def window_attention(segment_ids: Array, *, block_size: int, impl: str = "reference") -> Attend:
    """A windowed block's attention: `local_segment_attention` over segments at most `block_size` long."""
    return lambda q, k, v: local_segment_attention(q, k, v, segment_ids, block_size=block_size, impl=impl)


def full_attention(segment_ids: Array, *, query_chunk: int, impl: str = "reference") -> Attend:
    """A full-attention block's attention: each image frame attends to itself, `query_chunk` queries at a time."""
    return lambda q, k, v: chunked_segment_attention(q, k, v, segment_ids, query_chunk=query_chunk, impl=impl)


def window_block_size(n: int, window_patches: int, impl: str, dtype) -> int:
    """Queries per block of the windowed attention over n patches: one window for the reference; for a fused
    kernel the largest multiple of `window_patches` up to 512 that divides n (kernel tiles are 128 long, and
    the neighbourhood stays linear in n)."""
    if resolve_impl(impl, dtype=dtype) == "reference":
        return window_patches
    return _largest_dividing_chunk(n, 512, granule=window_patches)


def selected_attention(
    is_full: Array, window_segment_ids: Array, full_segment_ids: Array, *, block_size: int, query_chunk: int,
    impl: str = "reference",
) -> Attend:
    """`full_attention` where bool[] `is_full` holds, else `window_attention`: one `lax.cond`, so a scan over
    blocks of both kinds compiles each kind once and runs only the chosen one (the projections stay outside)."""
    window = window_attention(window_segment_ids, block_size=block_size, impl=impl)
    full = full_attention(full_segment_ids, query_chunk=query_chunk, impl=impl)
    return lambda q, k, v: jax.lax.cond(is_full, full, window, q, k, v)


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


class PatchProjection(nnx.Module):
    """The Conv3d patch projection (stride = kernel) as one matmul over flattened patches.

    kernel [C, T, p, p, D]: HF's Conv3d weight [D, C, T, p, p] with the output axis moved last, so the
    conversion needs no config (see `hf_special_cases`).
    """

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        shape = (config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2, 3))
        self.kernel = nnx.Param(init(rngs.params(), (*shape, config.hidden_size), param_dtype))
        self.dtype = dtype

    def __call__(self, patches: Array) -> Array:
        """patches [N, C*T*p*p] (C, T, p, p flattened in that order) -> [N, D]."""
        kernel = self.kernel[...]
        kernel = kernel.reshape(-1, kernel.shape[-1]).astype(self.dtype)
        return jnp.dot(patches.astype(self.dtype), kernel)


class PatchEmbed(nnx.Module):
    """HF's `patch_embed`: flattened pixel patches -> hidden_size."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = PatchProjection(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, patches: Array) -> Array:
        return self.proj(patches)


class VisionAttention(nnx.Module):
    """Multi-head self-attention with 2-D rotary on q/k; fused `qkv` projection laid out [3, H, Dh]."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size, **linear)
        self.proj = Linear(config.hidden_size, config.hidden_size, **linear)
        self.num_heads = config.num_heads

    def __call__(self, x: Array, cos: Array, sin: Array, attend: Attend) -> Array:
        """x [..., N, D]; cos/sin [..., N, Dh]; `attend` the block's attention over its segments
        (`window_attention`, `full_attention` or `selected_attention`). Returns [..., N, D]."""
        *lead, n, width = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(*lead, n, 3, self.num_heads, -1), -3, 0)
        # Rotation in fp32, as the reference does, then back to the compute dtype.
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(v.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(v.dtype)
        return self.proj(attend(q, k, v).reshape(*lead, n, width))


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.norm2 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(
            config.hidden_size,
            config.intermediate_size,
            use_bias=True,
            act=config.hidden_act,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array, cos: Array, sin: Array, attend: Attend) -> Array:
        """x [..., N, D]; cos/sin [..., N, Dh]; `attend` as in `VisionAttention`. Returns [..., N, D]."""
        x = x + self.attn(self.norm1(x), cos, sin, attend)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each merge unit's merge² consecutive patches concatenated and mapped by a GELU MLP."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        merged_width = config.hidden_size * config.merge_unit
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_q = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        # Index 1 holds the activation (torch's erf GELU) so the linears sit at HF's `mlp.0` / `mlp.2`.
        self.mlp = nnx.List(
            [
                Linear(merged_width, merged_width, **linear),
                gelu,
                Linear(merged_width, config.out_hidden_size, **linear),
            ]
        )
        self.merged_width = merged_width

    def __call__(self, x: Array) -> Array:
        """x [..., N, D] (N a multiple of merge²) -> [..., N / merge², out_hidden_size]."""
        x = self.ln_q(x)
        x = x.reshape(*x.shape[:-2], -1, self.merged_width)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionTower(nnx.Module):
    """Qwen2.5-VL vision encoder: patches of a batch of images -> language-model image embeddings.

    `__call__(vision_inputs)` takes the dict of `vision_host.prepare_vision_inputs` (as arrays) and returns
    image_embeds [M, out_hidden_size], M = repeats * padded patches / merge²: the embeddings of every image token
    in processor order (image after image, each image's run `repeats` times), followed by zero rows for bucket
    padding (`token_valid` False).

    Inputs with a leading block axis (`vision_host.prepare_sharded_vision_inputs`: patches [K, P, C*T*p*p], ...)
    are encoded block by block into [K, M, out_hidden_size]: every op keeps the axis (attention folds it into
    its batch, so fused kernels see it as rows), and sharding it like the batch keeps each device encoding only
    its own rows' images.

    `blocks` is a stack of `depth` VisionBlocks (parameters [depth, ...]) run by one scan; `remat` (False / True /
    "none" / "full" / "save_dots", see `remat.Remat`) checkpoints the scanned block.
    """

    layer_stacks = ("blocks",)

    def __init__(
        self,
        config: VisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        full_attention_query_chunk: int = 1024,
    ):
        self.config = config
        self.remat = Remat.parse(remat)
        self.full_attention_query_chunk = full_attention_query_chunk
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = PatchEmbed(config, rngs=rngs, **kw)
        self.blocks = stacked(lambda r: VisionBlock(config, rngs=r, **kw), config.depth, rngs)
        self.merger = PatchMerger(config, rngs=rngs, **kw)

    def full_attention_flags(self) -> np.ndarray:
        """bool[depth]: which blocks attend over whole frames (`fullatt_block_indexes`); the others are windowed."""
        return np.isin(np.arange(self.config.depth), self.config.fullatt_block_indexes)

    def encode_patches(self, inputs: VisionInputs) -> Array:
        """Patch embedding and all blocks: [..., P, hidden_size] hidden states in window order (before the merger);
        a leading axis holds independent blocks of images (`models/image_shards.py`)."""
        _check_vision_inputs(inputs, self.config)
        x = self.patch_embed(inputs["patches"])
        cos, sin = inputs["rotary_cos"], inputs["rotary_sin"]
        patches = x.shape[-2]
        query_chunk = _largest_dividing_chunk(
            patches, self.full_attention_query_chunk, granule=self.config.window_patches
        )

        impl = self.config.attention
        block_size = window_block_size(patches, self.config.window_patches, impl, x.dtype)

        def step(block: VisionBlock, x: Array, is_full: Array) -> tuple[Array, None]:
            attend = selected_attention(
                is_full, inputs["window_segment_ids"], inputs["full_segment_ids"],
                block_size=block_size, query_chunk=query_chunk, impl=impl,
            )  # fmt: skip
            return block(x, cos, sin, attend), None

        x, _ = scan_layers(self.blocks, step, x, jnp.asarray(self.full_attention_flags()), remat=self.remat)
        return x

    def __call__(self, inputs: VisionInputs) -> Array:
        """[M, out_hidden_size], or [K, M, out_hidden_size] for K blocks; see the class docstring."""
        inputs = {key: inputs[key] for key in VISION_INPUT_KEYS if key in inputs}
        merged = self.merger(self.encode_patches(inputs))  # [..., M, out] in window order
        embeds = jnp.take_along_axis(merged, inputs["inverse_window_index"][..., None], axis=-2)
        return jnp.where(inputs["token_valid"][..., None], embeds, jnp.zeros((), embeds.dtype))


def _check_vision_inputs(inputs: VisionInputs, config: VisionConfig) -> None:
    """Shape checks at the tower's boundary (static under jit)."""
    missing = [key for key in VISION_INPUT_KEYS if key not in inputs]
    if missing:
        raise KeyError(f"vision inputs lack {missing}; build them with vision_host.prepare_vision_inputs")
    patches = inputs["patches"]
    if patches.ndim not in (2, 3):
        raise ValueError(f"patches must be [P, C*T*p*p] or [K, P, C*T*p*p] (blocks); got shape {patches.shape}")
    lead = patches.shape[:-2]
    if patches.shape[-1] != config.patch_dim:
        raise ValueError(f"patches have {patches.shape[-1]} values each; the config expects {config.patch_dim}")
    n = patches.shape[-2]
    if n % config.window_patches:
        raise ValueError(
            f"the padded patch count {n} must be a multiple of window_patches={config.window_patches}; use "
            "vision_host.prepare_vision_inputs to pad"
        )
    chex.assert_shape([inputs["window_segment_ids"], inputs["full_segment_ids"]], (*lead, n))
    chex.assert_shape([inputs["rotary_cos"], inputs["rotary_sin"]], (*lead, n, config.head_dim))
    outputs = inputs["inverse_window_index"].shape
    if outputs[:-1] != lead or outputs[-1] % (n // config.merge_unit):
        raise ValueError(
            f"inverse_window_index has shape {outputs}; expected [repeats * {n // config.merge_unit}] for {n} patches"
        )
    chex.assert_shape(inputs["token_valid"], outputs)


# ----------------------------------------------------------------------------------------------------------------
# HF checkpoint layout
# ----------------------------------------------------------------------------------------------------------------


def _conv3d_weight_to_ours(weight: np.ndarray) -> np.ndarray:
    """HF Conv3d weight [D, C, T, p, p] -> our kernel [C, T, p, p, D]."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(weight), 0, -1))


def _conv3d_weight_to_hf(kernel: np.ndarray) -> np.ndarray:
    """Our kernel [C, T, p, p, D] -> HF Conv3d weight [D, C, T, p, p]."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(kernel), -1, 0))


def hf_special_cases() -> dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]]:
    """Tensors of this tower whose HF layout is not the Linear/RMSNorm rule: {hf_key_suffix: (to_ours, to_hf)}.

    The names follow the rule (`patch_embed.proj.kernel` <-> `patch_embed.proj.weight`); only the tensor
    transform differs, because the HF patch projection is a Conv3d.
    """
    return {"patch_embed.proj.weight": (_conv3d_weight_to_ours, _conv3d_weight_to_hf)}
