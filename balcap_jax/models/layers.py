"""Building blocks shared by the decoders and vision towers: RMSNorm, rotary embeddings, SwiGLU, attention.

Conventions (all functions are pure and jit-friendly):
  * activations are [B, T, D]; attention heads live on axis -2: q [B, T, H, Dh], k/v [B, S, H_kv, Dh].
  * rotary `cos`/`sin` have the shape of the rotated tensor without its head axis: [..., T, Dh].
  * masks are boolean, True = "may attend".
  * numerically sensitive reductions (RMSNorm variance, softmax) run in fp32 whatever the compute dtype.
  * in a reduced compute dtype (bf16) every op rounds where HF's torch modules round, so a bf16 model agrees
    with HF's bf16 model, not only with fp32 (see `Linear`, `activation`, `attention.attention_scores`). In fp32 these
    roundings are no-ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

# Activations round as torch's kernels do: one rounding of an fp32 evaluation (quick_gelu: one per op).


def silu(x: Array) -> Array:
    """x * sigmoid(x), in fp32, rounded once to x's dtype."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, torch's `nn.GELU()`, in fp32, rounded once to x's dtype."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def gelu_tanh(x: Array) -> Array:
    """tanh-approximated GELU (`gelu_pytorch_tanh`), in fp32, rounded once to x's dtype."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's x * sigmoid(1.702 x).

    HF composes it from three torch ops, each rounding to x's dtype (the constant stays fp32, as torch keeps
    Python scalars in fp32), so it rounds after each of the three here too.
    """
    scaled = (x.astype(jnp.float32) * np.float32(1.702)).astype(x.dtype)
    gate = jax.nn.sigmoid(scaled.astype(jnp.float32)).astype(x.dtype)
    return x * gate


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": silu,
    "swish": silu,
    "gelu": gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,  # exact in any dtype
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function HF configs call `name` (`hidden_act`, `projector_hidden_act`)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


@jax.custom_vjp
def biased_matmul(x: Array, kernel: Array, bias: Array) -> Array:
    """x [..., D_in] @ kernel [D_in, D_out] + bias [D_out] (one dtype), summed in fp32 and rounded once.

    torch's `addmm` (HF's `nn.Linear`) adds the bias to the fp32 accumulator; rounding the product first and
    the sum again (flax's order) differs in about a third of bf16 outputs. Returns [..., D_out] in x's dtype.
    """
    y = jnp.einsum("...i,io->...o", x, kernel, preferred_element_type=jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


def _biased_matmul_fwd(x: Array, kernel: Array, bias: Array) -> tuple[Array, tuple[Array, Array]]:
    return biased_matmul(x, kernel, bias), (x, kernel)


def _biased_matmul_bwd(residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array, Array]:
    # The backward pass of a plain linear layer in the compute dtype: without the custom rule, the fp32
    # accumulator would make every weight-gradient matmul an fp32 one.
    x, kernel = residuals
    flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    d_x = jnp.einsum("...o,io->...i", grad, kernel)
    d_kernel = jnp.einsum("ni,no->io", flat_x, flat_grad)
    d_bias = jnp.sum(flat_grad, axis=0, dtype=jnp.float32).astype(grad.dtype)
    return d_x, d_kernel, d_bias


biased_matmul.defvjp(_biased_matmul_fwd, _biased_matmul_bwd)

# Remat policies see a custom_vjp as one opaque call, not as the matmul it is; naming its output lets the
# "save_dots" policy (remat.py) keep biased projections like plain ones instead of recomputing them.
BIASED_MATMUL_NAME = "biased_matmul"


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters and arguments) whose bias joins the fp32 accumulator before the single
    rounding to the compute dtype, as in torch (see `biased_matmul`). Without a bias, or in fp32, it computes
    exactly what `nnx.Linear` does."""

    def __call__(self, inputs: Array, *, bias_after_rounding: bool = False) -> Array:
        """inputs [..., D_in] -> [..., D_out]. `bias_after_rounding` rounds the product before adding the bias,
        as torch does when the input is a strided (non-contiguous) 3-D view: it then skips the fused addmm."""
        if self.bias is None or bias_after_rounding:
            return super().__call__(inputs)
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return checkpoint_name(biased_matmul(x, kernel, bias), BIASED_MATMUL_NAME)


class RMSNorm(nnx.Module):
    """Root-mean-square norm: x / sqrt(mean(x^2) + eps) * scale, statistics in fp32.

    The normalised activations are cast back to the input dtype *before* the scale multiply, as in HF
    (`weight * hidden.to(input_dtype)`), so bf16 models round at the same place.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; accepted so every module shares a constructor shape
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.scale[...] * normed


class SwiGLU(nnx.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) — the Qwen2/Llama MLP (and Qwen2.5-VL vision MLP with bias)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        use_bias: bool = False,
        act: str = "silu",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        linear = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(dim, hidden_dim, **linear)
        self.up_proj = Linear(dim, hidden_dim, **linear)
        self.down_proj = Linear(hidden_dim, dim, **linear)
        self.act_name = act

    def __call__(self, x: Array) -> Array:
        act = activation(self.act_name)
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ----------------------------------------------------------------------------------------------------------------


def unembed_logits(hidden: Array, weight: Array) -> Array:
    """hidden [..., D] x unembedding [D, V] -> fp32 logits [..., V]: products in the compute dtype (the
    weight is cast to hidden's), accumulated in fp32."""
    return jnp.einsum("...d,dv->...v", hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies theta^(-2i/Dh), i < Dh/2, in fp32 exactly as HF computes them. Returns [Dh/2]."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def rotate_half(x: Array) -> Array:
    """[x1, x2] -> [-x2, x1] over the last axis (the "half-split" rotary layout HF checkpoints use)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x [..., T, H, Dh] by angles given as cos/sin [..., T, Dh] (broadcast over the head axis)."""
    chex.assert_equal(cos.shape, sin.shape)
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"rotary tables have last dim {cos.shape[-1]}, but x has head_dim {x.shape[-1]}")
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def _cos_sin_from_angles(angles: Array) -> tuple[Array, Array]:
    """angles [..., Dh/2] -> cos, sin [..., Dh] in the half-split layout."""
    full = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(full), jnp.sin(full)


def rope_cos_sin(positions: Array, inv_freq: Array | np.ndarray) -> tuple[Array, Array]:
    """1-D RoPE tables. positions int[B, T] (any leading shape) -> cos, sin fp32 [B, T, Dh]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return _cos_sin_from_angles(angles)


def mrope_frequency_axes(mrope_section: Sequence[int]) -> np.ndarray:
    """For each of the Dh/2 frequencies, which position axis (0=t, 1=h, 2=w) drives it. Returns int[Dh/2].

    Qwen2-VL splits the frequencies into consecutive chunks of sizes `mrope_section` and assigns chunk i to
    axis i % 3.
    """
    return np.concatenate([np.full((size,), i % 3, np.int32) for i, size in enumerate(mrope_section)])


def mrope_cos_sin(
    positions: Array, inv_freq: Array | np.ndarray, mrope_section: Sequence[int]
) -> tuple[Array, Array]:
    """Multimodal RoPE tables. positions int[3, B, T] (t, h, w) -> cos, sin fp32 [B, T, Dh]."""
    inv_freq = np.asarray(inv_freq)
    if sum(mrope_section) != inv_freq.shape[0]:
        raise ValueError(
            f"mrope_section {list(mrope_section)} sums to {sum(mrope_section)}, but head_dim/2 = {inv_freq.shape[0]}"
        )
    chex.assert_rank(positions, 3)
    chex.assert_axis_dimension(positions, 0, 3)
    # [3, B, T] -> [B, T, Dh/2]: the position that drives each frequency.
    per_frequency = jnp.moveaxis(positions[mrope_frequency_axes(mrope_section)], 0, -1)
    angles = per_frequency.astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    return _cos_sin_from_angles(angles)


# ----------------------------------------------------------------------------------------------------------------
# KV cache and batch placement (attention itself lives in attention.py)
# ----------------------------------------------------------------------------------------------------------------


def write_cache_layer(buffer: Array, layer: int, start: Array | int, new: Array) -> Array:
    """Write `new` [B, T, H_kv, Dh] into cache buffer [L, B, S, H_kv, Dh] at layer `layer`, slots [start, start+T).

    A single `dynamic_update_slice` on the stacked buffer, so XLA updates the (donated) cache in place.
    """
    zero = jnp.zeros((), jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    return jax.lax.dynamic_update_slice(
        buffer, new[None].astype(buffer.dtype), (jnp.asarray(layer, jnp.int32), zero, start, zero, zero)
    )


def constrain_batch(x: Array, batch_axes: tuple[str, ...] = ("data", "fsdp")) -> Array:
    """Pin x's leading (batch) dimension to the mesh axes `batch_axes`, everything else replicated.

    Only acts under a mesh context (`jax.set_mesh(mesh)`) whose axes include `batch_axes` and divide the batch;
    otherwise returns x unchanged, so single-device code and tests are unaffected. Under FSDP this keeps
    activations split by batch between layers, so XLA all-gathers weights instead of resharding activations.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(axis in mesh.axis_names for axis in batch_axes):
        return x
    shards = int(np.prod([mesh.shape[axis] for axis in batch_axes]))
    if shards == 1 or x.shape[0] % shards:
        return x
    spec = jax.sharding.PartitionSpec(batch_axes, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)
