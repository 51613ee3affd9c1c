"""The attention switch: fused kernels against the einsum reference, the blocked decode, and the config field.

Splash (the TPU kernel) runs here in Pallas interpret mode, forward and backward; cuDNN cannot run on CPU, so its
call is checked with the same arguments on `jax.nn.dot_product_attention`'s XLA implementation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from balcap_jax import config as config_lib
from balcap_jax.models import attention
from balcap_jax.models.interface import KVCache
from balcap_jax.models.llava.config import CLIPVisionConfig, LlavaConfig
from balcap_jax.models.qwen2_5_vl.config import RELEASED_CONFIGS, Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.text import DecoderConfig, TextModel
from balcap_jax.models.qwen2_5_vl.vision import VisionConfig, VisionTower
from balcap_jax.models.qwen2_5_vl.vision_host import prepare_vision_inputs

# Tolerances against the reference: fp32 differs by summation order; bf16 by where each side rounds.
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DTYPES = [jnp.float32, jnp.bfloat16]


def _qkv(seed: int, batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int, dim: int, dtype):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, dim), jnp.float32).astype(dtype)
    return q, k, v


def _f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def _left_padding(batch: int, length: int, pads: tuple[int, ...]) -> jax.Array:
    return jnp.arange(length)[None, :] >= jnp.asarray(pads)[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Config


def test_every_model_config_validates_its_attention_field():
    for make, name in (
        (lambda: DecoderConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                               num_kv_heads=1, head_dim=4, attention="fast"), "DecoderConfig.attention"),
        (lambda: VisionConfig(attention="fast"), "VisionConfig.attention"),
        (lambda: CLIPVisionConfig(attention="fast"), "CLIPVisionConfig.attention"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=rf"{name}='fast'.*'reference', 'flash'"):
            make()
    field = config_lib.SCHEMA_BY_PATH["model.attention"]
    assert field.check("flash") == [] and field.check("reference") == []
    assert "config.model.attention='fast' is not allowed" in field.check("fast")[0]


def test_with_attention_sets_every_tower_of_a_model_config():
    qwen = attention.with_attention(Qwen2_5_VLConfig.from_hf(RELEASED_CONFIGS["Qwen2.5-VL-3B-Instruct"]), "flash")
    assert (qwen.text.attention, qwen.vision.attention) == ("flash", "flash")
    llava = attention.with_attention(LlavaConfig(), "flash")
    assert (llava.text.attention, llava.vision.attention) == ("flash", "flash")
    assert "attention" not in llava.to_hf_dict()["vision_config"]  # our kernel choice is not a checkpoint field
    with pytest.raises(ValueError, match="config.model.attention='splashy'"):
        attention.with_attention(LlavaConfig(), "splashy")


def test_flash_resolves_to_the_platform_kernel():
    assert attention.resolve_impl("flash", "tpu", jnp.float32) == "splash"
    assert attention.resolve_impl("flash", "gpu", jnp.bfloat16) == "cudnn"
    assert attention.resolve_impl("flash", "gpu", jnp.float32) == "reference"  # cuDNN has no fp32 attention
    assert attention.resolve_impl("flash", "cpu", jnp.bfloat16) == "reference"
    assert attention.resolve_impl("reference", "tpu") == "reference"
    # Traced under a mesh, the mesh's devices decide (an AOT compile for TPU traces on a CPU host).
    mesh = jax.make_mesh((1,), ("data",))
    with jax.set_mesh(mesh):
        assert attention.trace_platform() == jax.devices()[0].platform


# ----------------------------------------------------------------------------------------------------------------
# Fused kernels vs the reference


@pytest.mark.parametrize("dtype", DTYPES)
def test_splash_equals_reference_on_causal_text_with_left_padding(dtype):
    # 200 tokens: padded to two 128-tiles inside the kernel; GQA with 2 query heads per KV head.
    q, k, v = _qkv(0, 3, 200, 200, 4, 2, 64, dtype)
    valid = _left_padding(3, 200, (0, 37, 150))
    mask = attention.SegmentMask.from_padding(valid)
    run = lambda impl: jax.jit(  # noqa: E731
        lambda q, k, v: attention.attend(q, k, v, q_segment_ids=mask.q_segment_ids,
                                         kv_segment_ids=mask.kv_segment_ids, causal=True, impl=impl)
    )(q, k, v)  # fmt: skip
    got, want = run("splash"), run("reference")
    assert got.dtype == dtype and got.shape == q.shape
    assert np.isfinite(_f32(got)).all()  # padding queries see padding keys: no empty rows, no NaN
    np.testing.assert_allclose(_f32(got)[np.asarray(valid)], _f32(want)[np.asarray(valid)], **TOL[dtype])


def test_splash_gradients_equal_the_reference():
    q, k, v = _qkv(1, 2, 130, 130, 2, 1, 32, jnp.float32)
    valid = _left_padding(2, 130, (0, 20))
    ids = valid.astype(jnp.int32)
    weight = jnp.where(valid, 1.0, 0.0)[:, :, None, None]  # padded rows carry no loss, as in training

    def loss(impl, q, k, v):
        out = attention.attend(q, k, v, q_segment_ids=ids, kv_segment_ids=ids, causal=True, impl=impl)
        return jnp.sum(jnp.sin(out) * weight)

    grads = {impl: jax.jit(jax.grad(lambda *a, i=impl: loss(i, *a), argnums=(0, 1, 2)))(q, k, v)
             for impl in ("splash", "reference")}  # fmt: skip
    for got, want in zip(grads["splash"], grads["reference"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def _three_images():
    """Three images of different sizes (64 + 48 + 24 patches), host-prepared: windows and frames as segments."""
    config = VisionConfig(depth=2, hidden_size=64, intermediate_size=96, num_heads=2, out_hidden_size=32,
                          fullatt_block_indexes=(1,))  # fmt: skip
    grid = np.asarray([[1, 8, 8], [1, 4, 12], [1, 6, 4]])
    patches = np.random.default_rng(0).standard_normal((int(np.prod(grid, axis=1).sum()), config.patch_dim))
    return config, prepare_vision_inputs(patches.astype(np.float32), grid, config, bucket_sizes=(256,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_splash_equals_reference_on_packed_windows_and_per_image_attention(dtype):
    from balcap_jax.models.qwen2_5_vl.vision import chunked_segment_attention, local_segment_attention

    _, inputs = _three_images()
    windows, frames = jnp.asarray(inputs["window_segment_ids"]), jnp.asarray(inputs["full_segment_ids"])
    assert len(np.unique(inputs["window_segment_ids"])) > 4 and len(np.unique(inputs["full_segment_ids"])) == 4
    q, k, v = (x[0] for x in _qkv(2, 1, 256, 256, 2, 2, 32, dtype))
    # A fused kernel takes 128-patch blocks of windows (two windows each) and the frames in one call.
    for impl, block in (("reference", 64), ("splash", 128)):
        window_out = jax.jit(lambda q, k, v, b=block, i=impl: local_segment_attention(q, k, v, windows, block_size=b,
                                                                                    impl=i))(q, k, v)  # fmt: skip
        frame_out = jax.jit(lambda q, k, v, i=impl: chunked_segment_attention(q, k, v, frames, query_chunk=64,
                                                                             impl=i))(q, k, v)  # fmt: skip
        if impl == "reference":
            want = (window_out, frame_out)
    for got, ref in zip((window_out, frame_out), want):
        np.testing.assert_allclose(_f32(got), _f32(ref), **TOL[dtype])


def test_vision_tower_with_splash_equals_the_reference_tower():
    config, inputs = _three_images()
    towers = {impl: VisionTower(dataclasses.replace(config, attention=impl), rngs=nnx.Rngs(0))
              for impl in ("reference", "splash")}  # fmt: skip
    outs = {impl: np.asarray(nnx.jit(lambda t, x: t(x))(tower, inputs)) for impl, tower in towers.items()}
    np.testing.assert_allclose(outs["splash"], outs["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cudnn_call_has_the_reference_semantics(dtype):
    """The exact cuDNN call, run by XLA: causal rule, left padding and packed segments through its mask."""
    q, k, v = _qkv(3, 2, 48, 48, 4, 2, 16, dtype)
    valid = _left_padding(2, 48, (5, 0))
    ids = jnp.where(valid, jnp.where(jnp.arange(48) < 30, 1, 2), 0).astype(jnp.int32)  # two packed segments
    for causal in (True, False):
        got = attention.cudnn_attention(q, k, v, ids, ids, causal=causal, scale=16**-0.5, implementation="xla")
        want = attention.attend(q, k, v, q_segment_ids=ids, kv_segment_ids=ids, causal=causal)
        np.testing.assert_allclose(_f32(got)[np.asarray(valid)], _f32(want)[np.asarray(valid)], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cudnn_call_pads_odd_lengths_to_even_with_the_reference_semantics(dtype):
    """CLIP's 577 tokens: cuDNN trains with a mask only on even lengths, so odd ones get one padded slot."""
    q, k, v = _qkv(5, 2, 17, 17, 4, 2, 16, dtype)
    valid = _left_padding(2, 17, (3, 0))
    ids = jnp.where(valid, 1, 0).astype(jnp.int32)
    for causal in (True, False):
        for q_ids, kv_ids in ((None, None), (ids, ids)):
            got = attention.cudnn_attention(q, k, v, q_ids, kv_ids, causal=causal, scale=16**-0.5,
                                            implementation="xla")
            want = attention.attend(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids, causal=causal)
            assert got.shape == want.shape == q.shape
            rows = np.asarray(valid) if q_ids is not None else np.ones((2, 17), bool)
            np.testing.assert_allclose(_f32(got)[rows], _f32(want)[rows], **TOL[dtype])
    grads = jax.grad(lambda q: attention.cudnn_attention(q, k, v, None, None, causal=False, scale=0.25,
                                                         implementation="xla").astype(jnp.float32).sum())(q)
    assert grads.shape == q.shape and bool(jnp.isfinite(grads).all())


def test_text_model_with_splash_equals_the_reference_in_forward_and_prefill():
    base = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, mrope_section=(1, 1, 2))  # fmt: skip
    models = {impl: TextModel(dataclasses.replace(base, attention=impl), rngs=nnx.Rngs(0))
              for impl in ("reference", "splash")}  # fmt: skip
    valid = _left_padding(2, 20, (0, 6))
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    embeds = jax.random.normal(jax.random.key(4), (2, 20, 32))
    cache = KVCache.zeros(num_layers=2, batch=2, max_len=32, num_kv_heads=2, head_dim=8, dtype=jnp.float32)
    for impl, model in models.items():
        forward = nnx.jit(lambda m, e: m(e, positions, valid))(model, embeds)
        prefill, _ = nnx.jit(lambda m, e, c: m.prefill(e, positions, valid, c))(model, embeds, cache)
        models[impl] = (forward, prefill)
    for got, want in zip(models["splash"], models["reference"]):
        np.testing.assert_allclose(np.asarray(got)[np.asarray(valid)], np.asarray(want)[np.asarray(valid)],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Decode over the filled part of the cache


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 17, 40, 50])
def test_blocked_decode_equals_the_reference_and_never_reads_unfilled_slots(dtype, length, exact):
    batch, cache_len, heads, kv_heads, dim, layers = 3, 50, 4, 2, 16, 2  # 50 = 3 blocks of 16 + an overlap
    q, k, v = _qkv(5, batch, 1, cache_len, heads, kv_heads, dim, dtype)
    valid = jnp.ones((batch, cache_len), bool).at[1, :4].set(False).at[2, 7:9].set(False)
    valid = valid.at[:, length - 1].set(True)  # the slot just written is always valid
    # Slots >= length hold NaN, the other layer too: one read of them would turn the output into NaN.
    unfilled = jnp.arange(cache_len)[None, :, None, None] >= length
    k_cache = jnp.stack([jnp.full_like(k, jnp.nan), jnp.where(unfilled, jnp.nan, k)])
    v_cache = jnp.stack([jnp.full_like(v, jnp.nan), jnp.where(unfilled, jnp.nan, v)])
    assert k_cache.shape == (layers, batch, cache_len, kv_heads, dim)
    got = jax.jit(lambda *a: attention.decode_attention(*a, layer=1, block_size=16, exact=exact))(
        q, k_cache, v_cache, valid, jnp.asarray(length, jnp.int32)
    )
    mask = (valid & (jnp.arange(cache_len) < length))[:, None, :]
    want = attention.dot_product_attention(q, k[:, :length], v[:, :length], mask[:, :, :length])
    assert got.shape == q.shape and got.dtype == dtype
    if exact and dtype == jnp.float32:
        np.testing.assert_allclose(_f32(got), _f32(want), atol=1e-6, rtol=1e-6)
    elif exact:  # rounds where the reference rounds: at most one bf16 ulp apart (summation order)
        np.testing.assert_allclose(_f32(got), _f32(want), atol=0, rtol=2**-7)
    else:
        np.testing.assert_allclose(_f32(got), _f32(want), **TOL[dtype])


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [0, 16, 33])
def test_the_current_token_beside_the_cache_equals_it_written_at_slot_length(dtype, length, exact):
    """`current=(k, v)` is the decoder's way of attending the step's own token without writing the cache inside
    the layer loop: the same output as writing it at slot `length` and reading `length + 1` slots, and the
    slots from `length` on are never read (NaN there would show)."""
    batch, cache_len, heads, kv_heads, dim = 2, 40, 4, 2, 16
    q, k, v = _qkv(9, batch, 1, cache_len, heads, kv_heads, dim, dtype)
    valid = jnp.ones((batch, cache_len), bool).at[1, :3].set(False)
    k_now, v_now = k[:, length : length + 1], v[:, length : length + 1]
    written = attention.decode_attention(
        q, k[None], v[None], valid.at[:, length].set(True), jnp.int32(length + 1), block_size=16, exact=exact
    )
    unread = jnp.arange(cache_len)[None, :, None, None] >= length
    k_stale, v_stale = jnp.where(unread, jnp.nan, k), jnp.where(unread, jnp.nan, v)
    beside = jax.jit(lambda *a: attention.decode_attention(*a, block_size=16, exact=exact, current=(k_now, v_now)))(
        q, k_stale[None], v_stale[None], valid, jnp.int32(length)
    )
    assert beside.shape == q.shape and beside.dtype == dtype
    if dtype == jnp.float32:
        np.testing.assert_allclose(_f32(beside), _f32(written), atol=1e-6, rtol=1e-6)
    elif exact:  # the same roundings; only the fp32 summation order differs
        np.testing.assert_allclose(_f32(beside), _f32(written), atol=0, rtol=2**-7)
    else:  # one rounding at the end of an online softmax whose block order differs
        np.testing.assert_allclose(_f32(beside), _f32(written), **TOL[dtype])


def test_decode_trip_count_follows_the_filled_length():
    """The loops over KV blocks are while loops bounded by `length` (a traced value), not by the cache size: one
    pass for the online softmax, three for the reference's rounding."""
    q, k, v = _qkv(6, 1, 1, 64, 2, 1, 8, jnp.float32)
    for exact, passes in ((False, 1), (True, 3)):
        jaxpr = jax.make_jaxpr(lambda length, e=exact: attention.decode_attention(
            q, k[None], v[None], jnp.ones((1, 64), bool), length, block_size=16, exact=e))(jnp.asarray(3))  # fmt: skip
        names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
        assert names.count("while") == passes and "scan" not in names


def test_text_model_decode_equals_the_full_forward():
    """Prefill + blocked decode steps give the hidden states of the full-sequence forward (left padding)."""
    config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8)  # fmt: skip
    model = TextModel(config, rngs=nnx.Rngs(1))
    total, prompt = 24, 18
    valid = _left_padding(2, total, (0, 5))
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    embeds = jax.random.normal(jax.random.key(7), (2, total, 32))
    full = nnx.jit(lambda m: m(embeds, positions, valid))(model)
    cache = KVCache.zeros(num_layers=2, batch=2, max_len=40, num_kv_heads=2, head_dim=8, dtype=jnp.float32)
    _, cache = nnx.jit(lambda m, c: m.prefill(embeds[:, :prompt], positions[:, :prompt], valid[:, :prompt], c))(
        model, cache
    )
    step = nnx.jit(lambda m, e, p, c: m.decode(e, p, c))
    for t in range(prompt, total):
        hidden, cache = step(model, embeds[:, t], positions[:, t], cache)
        np.testing.assert_allclose(np.asarray(hidden), np.asarray(full[:, t]), atol=1e-5, rtol=1e-5)
    # Every layer's key and value of each decoded token landed in its slot: the cache equals a prefill of all.
    whole = KVCache.zeros(num_layers=2, batch=2, max_len=40, num_kv_heads=2, head_dim=8, dtype=jnp.float32)
    _, whole = nnx.jit(lambda m, c: m.prefill(embeds, positions, valid, c))(model, whole)
    assert int(cache.index) == total
    for got, want in ((cache.k, whole.k), (cache.v, whole.v)):
        np.testing.assert_allclose(np.asarray(got[:, :, :total]), np.asarray(want[:, :, :total]), atol=1e-5)
        assert not np.asarray(got[:, :, total:]).any()


def test_decode_loop_never_copies_the_whole_cache():
    """The decode step reads the cache inside its layer scan and writes all layers' token once, after it. When
    each layer wrote its slice inside the scan, XLA:CPU copied the whole stacked V cache twice per layer per
    token (a third of a small model's decode step)."""
    config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                           num_kv_heads=2, head_dim=8)  # fmt: skip
    model = TextModel(config, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    cache = KVCache.zeros(num_layers=3, batch=4, max_len=48, num_kv_heads=2, head_dim=8, dtype=jnp.float32)
    cache = cache.replace(index=jnp.int32(8))

    def generate(state, cache):
        def step(carry):
            count, hidden, cache = carry
            hidden, cache = nnx.merge(graphdef, state).decode(hidden, jnp.full((4,), count), cache)
            return count + 1, hidden, cache

        return jax.lax.while_loop(lambda c: c[0] < 20, step, (jnp.int32(0), jnp.ones((4, 32)), cache))[2]

    hlo = jax.jit(generate, donate_argnums=1).lower(state, cache).compile().as_text()
    cache_shape = "f32[3,4,48,2,8]"
    copies = [line for line in hlo.splitlines() if f"= {cache_shape}" in line and " copy(" in line]
    assert not copies, "\n".join(copies)
