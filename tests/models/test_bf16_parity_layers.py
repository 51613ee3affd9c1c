"""balcap_jax.models.layers in bf16 against the torch ops HF's bf16 modules run: the same roundings, bit for bit.

Each op gets random bf16 inputs and must equal torch's bf16 result exactly (the few documented exceptions are
fp32 library differences far below a bf16 ulp). Our side is compiled with `TORCH_LIKE_XLA_CPU`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.activations import ACT2FN
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_qwen

from balcap_jax.models import attention, layers

# XLA CPU options under which our programs round as written: no fp32 excess precision kept across fused bf16
# ops, and no YNNPACK fusions (their fused exp differs from torch's, which moves bf16 softmax roundings).
TORCH_LIKE_XLA_CPU = {"xla_allow_excess_precision": False, "xla_cpu_experimental_ynn_fusion_type": ""}
torch_like_jit = functools.partial(jax.jit, compiler_options=TORCH_LIKE_XLA_CPU)


def _bf16_pair(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0):
    """The same bf16 values as a torch tensor and a jax array."""
    t = torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32)).to(torch.bfloat16)
    return t, jnp.asarray(t.float().numpy(), jnp.bfloat16)


def _np(x) -> np.ndarray:
    return x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(jnp.asarray(x, jnp.float32))


def _bf16_linear(rng: np.random.Generator, d_in: int, d_out: int) -> tuple[torch.nn.Linear, layers.Linear]:
    ref = torch.nn.Linear(d_in, d_out).to(torch.bfloat16)
    ours = layers.Linear(d_in, d_out, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(0.2 * rng.standard_normal((d_out, d_in)).astype(np.float32)))
        ref.bias.copy_(torch.from_numpy(rng.standard_normal(d_out).astype(np.float32)))
    ours.kernel[...] = jnp.asarray(_np(ref.weight.detach()).T, jnp.bfloat16)
    ours.bias[...] = jnp.asarray(_np(ref.bias.detach()), jnp.bfloat16)
    return ref, ours


def test_linear_adds_the_bias_before_rounding_like_torch():
    rng = np.random.default_rng(0)
    ref, ours = _bf16_linear(rng, 48, 40)
    x_t, x = _bf16_pair(rng, (3, 50, 48))
    with torch.no_grad():
        expected = ref(x_t)  # contiguous 3-D input: torch's fused addmm
    got = torch_like_jit(lambda m, x: m(x))(ours, x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_np(got), _np(expected))


def test_linear_bias_after_rounding_matches_torch_on_a_strided_view():
    rng = np.random.default_rng(1)
    ref, ours = _bf16_linear(rng, 48, 40)
    x_t, x = _bf16_pair(rng, (3, 51, 48))
    with torch.no_grad():
        strided = x_t[:, 1:]  # what HF's LLaVA hands its projector: torch then runs matmul, then add
        assert not strided.is_contiguous()
        expected = ref(strided)
    got = torch_like_jit(lambda m, x: m(x, bias_after_rounding=True))(ours, x[:, 1:])
    np.testing.assert_array_equal(_np(got), _np(expected))
    fused = torch_like_jit(lambda m, x: m(x))(ours, x[:, 1:])
    assert (_np(fused) != _np(expected)).any()  # the two torch paths really round differently


def test_linear_fp32_is_nnx_linear_and_bf16_backward_stays_bf16():
    rng = np.random.default_rng(2)
    ours = layers.Linear(16, 8, rngs=nnx.Rngs(0))
    ours.bias[...] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    plain = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    plain.bias[...] = ours.bias[...]
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(plain(x)))

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x)))

    grads, grads_x = nnx.grad(loss, argnums=(0, 1))(ours, x)
    plain_grads, plain_grads_x = nnx.grad(loss, argnums=(0, 1))(plain, x)
    with jax.default_matmul_precision("highest"):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(np.asarray(grads[name][...]), np.asarray(plain_grads[name][...]), rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(grads_x), np.asarray(plain_grads_x), rtol=1e-5, atol=1e-6)

    bf16 = layers.Linear(16, 8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(bf16)
    x16 = x.astype(jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(nnx.merge(graphdef, p), x16).astype(jnp.float32)))(params)
    # The forward product sits inside the custom-VJP call; the top level holds the input and kernel gradients.
    backward = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(backward) == 2
    operand_dtypes = [v.aval.dtype for e in backward for v in e.invars]
    assert all(dtype == jnp.bfloat16 for dtype in operand_dtypes), operand_dtypes


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "quick_gelu"])
def test_activations_round_like_hf(name):
    x_t, x = _bf16_pair(np.random.default_rng(3), (20000,), scale=3.0)
    with torch.no_grad():
        expected = _np(ACT2FN[name](x_t))
    got = _np(torch_like_jit(layers.activation(name))(x))
    differ = got != expected
    if name.startswith("gelu"):
        # torch's and XLA's fp32 erf/tanh differ far in the negative tail, where GELU(x) is below 3e-3.
        assert (_np(x_t)[differ] < -3).all() and np.abs(got - expected).max() <= 2e-5
        assert differ.mean() < 0.1
    else:
        assert not differ.any(), f"{differ.mean():.2%} of {name} outputs round differently"


@pytest.mark.parametrize("head_dim", [16, 128])  # 128: a scale (2^-3.5) that bf16 cannot represent
def test_attention_scores_round_like_hf_eager(head_dim):
    rng = np.random.default_rng(4)
    q_t, q = _bf16_pair(rng, (2, 30, 3, head_dim))
    k_t, k = _bf16_pair(rng, (2, 30, 3, head_dim))
    with torch.no_grad():  # HF eager: matmul(q, k^T) * scaling on [B, H, T, Dh]
        expected = torch.matmul(q_t.transpose(1, 2), k_t.transpose(1, 2).transpose(2, 3)) * head_dim**-0.5
    got = torch_like_jit(lambda q, k: attention.attention_scores("bqhd,bkhd->bhqk", q, k, head_dim**-0.5))(q, k)
    assert got.dtype == jnp.float32
    got, expected = _np(got), _np(expected)
    # A CPU with AVX512-BF16 lets torch sum bf16 products in its own order, which can move a nearly cancelling
    # dot product by one bf16 ulp; rounding in the wrong place (the scale folded into q) moves half of them.
    differ = got != expected
    one_ulp = np.ldexp(1.0, np.frexp(expected)[1] - 8)
    assert (np.abs(got - expected)[differ] <= one_ulp[differ]).all()
    assert differ.mean() <= 1e-3, f"{differ.mean():.2%} of the scores round differently from HF eager"


def test_gqa_attention_with_padding_matches_hf_eager_in_bf16():
    rng = np.random.default_rng(5)
    b, t, h, h_kv, d = 2, 40, 4, 2, 16
    (q_t, q), (k_t, k), (v_t, v) = (_bf16_pair(rng, (b, t, n, d)) for n in (h, h_kv, h_kv))
    valid = np.ones((b, t), bool)
    valid[1, :7] = False  # left padding
    mask = attention.causal_mask(jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.asarray(valid))
    got = torch_like_jit(attention.dot_product_attention)(q, k, v, mask)

    module = torch.nn.Module()
    module.num_key_value_groups, module.training = h // h_kv, False
    additive = torch.from_numpy(np.where(np.asarray(mask), 0.0, np.finfo(np.float32).min)[:, None]).to(torch.bfloat16)
    with torch.no_grad():
        expected, _ = hf_qwen.eager_attention_forward(
            module, q_t.transpose(1, 2), k_t.transpose(1, 2), v_t.transpose(1, 2), additive, scaling=d**-0.5
        )
    np.testing.assert_array_equal(_np(got)[valid], _np(expected)[valid])
