"""balcap_jax.models.layers against the HF torch reference (fp32, highest matmul precision)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_qwen

from balcap_jax.models import attention, layers

pytestmark = pytest.mark.usefixtures("highest_precision")


def _t(x):
    return torch.from_numpy(np.array(x))


def test_rms_norm_matches_hf():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32) * 3
    scale = (1 + 0.1 * rng.standard_normal(16)).astype(np.float32)
    ref = hf_qwen.Qwen2_5_VLRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(_t(scale))
        expected = ref(_t(x)).numpy()
    norm = layers.RMSNorm(16, eps=1e-6)
    norm.scale[...] = jnp.asarray(scale)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, atol=1e-5, rtol=1e-5)


def test_rms_norm_bf16_rounds_before_scaling_like_hf():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    ref = hf_qwen.Qwen2_5_VLRMSNorm(8, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 8))
        expected = ref(_t(x).to(torch.bfloat16)).float().numpy()
    norm = layers.RMSNorm(8, eps=1e-6, param_dtype=jnp.bfloat16)
    norm.scale[...] = jnp.linspace(0.5, 1.5, 8).astype(jnp.bfloat16)
    out = norm(jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), expected)


def test_rotary_matches_hf_apply_rotary_pos_emb():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 7, 4, 16)).astype(np.float32)  # [B, T, H, Dh]
    positions = rng.integers(0, 3000, size=(2, 7))
    cos, sin = layers.rope_cos_sin(jnp.asarray(positions), layers.rope_inv_freq(16, 10000.0))
    ours = layers.apply_rotary(jnp.asarray(q), cos, sin)
    # HF: q [B, H, T, Dh], cos [B, T, Dh] unsqueezed on the head axis.
    ref_q, _ = hf_qwen.apply_rotary_pos_emb(
        _t(q).transpose(1, 2), _t(q).transpose(1, 2), _t(np.asarray(cos)), _t(np.asarray(sin))
    )
    np.testing.assert_allclose(np.asarray(ours), ref_q.transpose(1, 2).numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(layers.rotate_half(jnp.asarray(q))), hf_qwen.rotate_half(_t(q)).numpy())


def test_mrope_tables_match_hf_rotary_embedding():
    config = hf_qwen.Qwen2_5_VLTextConfig(
        hidden_size=64,
        num_attention_heads=4,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[2, 3, 3]),
    )
    rotary = hf_qwen.Qwen2_5_VLRotaryEmbedding(config)
    rng = np.random.default_rng(3)
    positions = rng.integers(0, 5000, size=(3, 2, 11))
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), _t(positions))
    cos, sin = layers.mrope_cos_sin(jnp.asarray(positions), layers.rope_inv_freq(16, 1_000_000.0), (2, 3, 3))
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=1e-5)
    np.testing.assert_allclose(layers.rope_inv_freq(16, 1_000_000.0), rotary.inv_freq.numpy(), rtol=1e-7)


def test_mrope_equals_1d_rope_when_axes_agree():
    positions = jnp.arange(12).reshape(2, 6)
    inv_freq = layers.rope_inv_freq(16, 10000.0)
    mcos, msin = layers.mrope_cos_sin(jnp.broadcast_to(positions, (3, 2, 6)), inv_freq, (2, 3, 3))
    cos, sin = layers.rope_cos_sin(positions, inv_freq)
    np.testing.assert_array_equal(np.asarray(mcos), np.asarray(cos))
    np.testing.assert_array_equal(np.asarray(msin), np.asarray(sin))


def test_mrope_section_must_cover_head_dim():
    with pytest.raises(ValueError, match="mrope_section"):
        layers.mrope_cos_sin(jnp.zeros((3, 1, 2), jnp.int32), layers.rope_inv_freq(16, 1e4), (2, 3, 2))


def test_swiglu_matches_hf_mlp():
    config = hf_qwen.Qwen2_5_VLTextConfig(hidden_size=16, intermediate_size=24)
    ref = hf_qwen.Qwen2MLP(config)
    ours = layers.SwiGLU(16, 24, rngs=nnx.Rngs(0))
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(ours, name).kernel[...] = jnp.asarray(getattr(ref, name).weight.detach().numpy().T)
    x = np.random.default_rng(4).standard_normal((2, 3, 16)).astype(np.float32)
    with torch.no_grad():
        expected = ref(_t(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, atol=1e-5)


def test_gqa_attention_with_padding_matches_hf_eager():
    rng = np.random.default_rng(5)
    b, t, h, h_kv, d = 2, 9, 4, 2, 8
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, t, h_kv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, h_kv, d)).astype(np.float32)
    valid = np.ones((b, t), bool)
    valid[1, :3] = False  # left padding
    slots = np.broadcast_to(np.arange(t), (b, t))
    mask = attention.causal_mask(jnp.asarray(slots), jnp.asarray(valid))
    ours = np.asarray(attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask))
    assert np.isfinite(ours).all()  # fully masked (padding) query rows stay finite

    module = torch.nn.Module()
    module.num_key_value_groups = h // h_kv
    module.training = False
    additive = np.where(np.asarray(mask), 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    ref, _ = hf_qwen.eager_attention_forward(
        module, _t(q).transpose(1, 2), _t(k).transpose(1, 2), _t(v).transpose(1, 2), _t(additive), scaling=d**-0.5
    )
    np.testing.assert_allclose(ours[valid], ref.numpy()[valid], atol=1e-5)


def test_write_cache_layer_writes_only_the_slice():
    buffer = jnp.zeros((3, 2, 6, 1, 2))
    new = jnp.ones((2, 2, 1, 2))
    out = layers.write_cache_layer(buffer, 1, 3, new)
    assert float(out.sum()) == new.size
    np.testing.assert_array_equal(np.asarray(out[1, :, 3:5]), np.ones((2, 2, 1, 2)))
    jitted = jax.jit(layers.write_cache_layer, static_argnums=1)(buffer, 2, jnp.int32(4), new)
    np.testing.assert_array_equal(np.asarray(jitted[2, :, 4:6]), np.ones((2, 2, 1, 2)))


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden_act"):
        layers.activation("relu6")


def test_constrain_batch_is_identity_without_mesh_and_shards_under_one():
    from balcap_jax.parallel.mesh import make_mesh

    x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
    assert layers.constrain_batch(x) is x
    mesh = make_mesh((2, 2, 2))
    with jax.set_mesh(mesh):
        out = jax.jit(layers.constrain_batch)(x)
        odd = jax.jit(layers.constrain_batch)(x[:3])  # 3 rows do not split over 4 batch shards: left alone
    assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(odd), np.asarray(x[:3]))
