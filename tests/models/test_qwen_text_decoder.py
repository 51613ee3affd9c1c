"""The Qwen2 / Llama text decoder: config parsing, parity with HF torch, and KV-cache consistency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from balcap_jax.models.interface import KVCache
from balcap_jax.models.attention import SegmentMask
from balcap_jax.models.layers import mrope_cos_sin, rope_inv_freq
from balcap_jax.models.qwen2_5_vl.text import DecoderConfig, DecoderLayer, TextModel
from tests.models import qwen_fixtures as fx

pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module")
def hf_model():
    return fx.tiny_qwen_hf_model(seed=0)


@pytest.fixture(scope="module")
def hf_state(hf_model):
    return fx.hf_state_numpy(hf_model)


@pytest.fixture(scope="module")
def decoder_config(hf_model):
    return DecoderConfig.from_hf(hf_model.config.to_dict())


def _mrope_positions(rng, batch, length):
    """Monotone but distinct (t, h, w) positions, reaching a few thousand to exercise high rotary angles."""
    base = np.cumsum(rng.integers(1, 8, size=(batch, length)), axis=1)
    return np.stack([base, base + rng.integers(0, 5, size=base.shape), base + 3]).astype(np.int32)


def _hf_causal_additive_mask(attention_mask):
    b, t = attention_mask.shape
    allowed = np.tril(np.ones((t, t), bool))[None] & attention_mask[:, None, :].astype(bool)
    return torch.from_numpy(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None])


def test_config_from_hf_qwen_nested_and_flat(hf_model, decoder_config):
    assert decoder_config == DecoderConfig(
        vocab_size=fx.TINY_VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, mrope_section=(2, 3, 3),
        qkv_bias=True, tie_word_embeddings=False,
    )
    # The released checkpoints' flat layout: text fields at the top, legacy `rope_scaling` with type "mrope".
    flat = dict(hf_model.config.to_dict()["text_config"], model_type="qwen2_5_vl", tie_word_embeddings=True,
                rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    del flat["rope_parameters"]
    assert DecoderConfig.from_hf(flat) == dict_replace(decoder_config, tie_word_embeddings=True)
    # HF ties when either level says so (transformers 5 may keep it only inside text_config).
    nested = hf_model.config.to_dict()
    nested["text_config"] = dict(nested["text_config"], tie_word_embeddings=True)
    assert DecoderConfig.from_hf(nested).tie_word_embeddings
    assert not DecoderConfig.from_hf(nested, tie_word_embeddings=False).tie_word_embeddings


def dict_replace(config, **kw):
    import dataclasses

    return dataclasses.replace(config, **kw)


def test_config_from_hf_llama():
    llama = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                 attention_bias=False, tie_word_embeddings=False)
    config = DecoderConfig.from_hf(llama)
    assert (config.mrope_section, config.qkv_bias, config.o_bias, config.head_dim) == (None, False, False, 8)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(hidden_act="relu6"), "hidden_act"),
        (dict(num_key_value_heads=3), "multiple"),
        (dict(num_hidden_layers=0), "num_layers"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}), "rope type"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1.0, "mrope_section": [1, 1, 1]}),
         "mrope_section"),
    ],
)
def test_config_from_hf_rejects_unsupported(hf_model, bad, match):
    text = dict(hf_model.config.to_dict()["text_config"], **bad)
    with pytest.raises(ValueError, match=match):
        DecoderConfig.from_hf(text)


def test_decoder_layer_matches_hf(hf_model, hf_state, decoder_config):
    rng = np.random.default_rng(0)
    b, t = 2, 520
    x = rng.standard_normal((b, t, 64)).astype(np.float32)
    positions = _mrope_positions(rng, b, t)
    attention_mask = np.ones((b, t), bool)
    attention_mask[1, :17] = False

    hf_text = hf_model.model.language_model
    with torch.no_grad():
        cos, sin = hf_text.rotary_emb(torch.from_numpy(x), torch.from_numpy(positions).long())
        expected = hf_text.layers[0](
            torch.from_numpy(x), attention_mask=_hf_causal_additive_mask(attention_mask),
            position_embeddings=(cos, sin),
        ).numpy()

    layer = fx.load_hf_into(
        DecoderLayer(decoder_config, rngs=nnx.Rngs(0)), hf_state, "model.language_model.layers.0."
    )
    our_cos, our_sin = mrope_cos_sin(
        jnp.asarray(positions), rope_inv_freq(decoder_config.head_dim, decoder_config.rope_theta),
        decoder_config.mrope_section,
    )
    ours, _ = nnx.jit(lambda lyr, *a: lyr(*a))(
        layer, jnp.asarray(x), our_cos, our_sin, SegmentMask.from_padding(jnp.asarray(attention_mask))
    )
    np.testing.assert_allclose(np.asarray(ours)[attention_mask], expected[attention_mask], atol=1e-4)


def _our_text_model(decoder_config, hf_state, **kw):
    abstract = nnx.eval_shape(lambda: TextModel(decoder_config, rngs=nnx.Rngs(0), **kw))
    return fx.load_hf_into(abstract, hf_state, "model.language_model.")


def test_text_model_matches_hf_with_padding(hf_model, hf_state, decoder_config):
    rng = np.random.default_rng(1)
    b, t = 2, 512
    ids = rng.integers(0, fx.TEXT_TOKEN_MAX, size=(b, t))
    positions = _mrope_positions(rng, b, t)
    attention_mask = np.ones((b, t), bool)
    attention_mask[0, -40:] = False  # right padding
    attention_mask[1, :25] = False  # left padding
    with torch.no_grad():
        expected = hf_model.model.language_model(
            input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(positions).long(),
            attention_mask=torch.from_numpy(attention_mask).long(),
        ).last_hidden_state.numpy()

    model = _our_text_model(decoder_config, hf_state)
    hidden = jax.jit(lambda m, *a: m(m.embed(a[0]), *a[1:]))(
        model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(attention_mask)
    )
    np.testing.assert_allclose(np.asarray(hidden)[attention_mask], expected[attention_mask], atol=1e-4)


def test_prefill_then_decode_equals_full_forward(hf_state, decoder_config):
    """Left-padded prompts prefilled into the cache, then tokens decoded one at a time, reproduce the
    full-sequence hidden states at every real position."""
    rng = np.random.default_rng(2)
    b, prompt_len, new_tokens, max_len = 3, 24, 6, 40
    total = prompt_len + new_tokens
    ids = rng.integers(0, fx.TEXT_TOKEN_MAX, size=(b, total))
    attention_mask = np.ones((b, total), bool)
    attention_mask[1, :5] = False
    attention_mask[2, :11] = False
    positions_1d = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
    positions = np.stack([positions_1d, positions_1d + 2, positions_1d + 1])  # M-RoPE axes differ in the prompt

    model = _our_text_model(decoder_config, hf_state)
    full_positions = positions.copy()
    # Decoded text continues from the prompt's max position on all three axes.
    next_pos = positions[:, :, prompt_len - 1].max(axis=0) + 1
    for i in range(new_tokens):
        full_positions[:, :, prompt_len + i] = next_pos + i
    full = np.asarray(nnx.jit(lambda m, i, p, a: m(m.embed(i), p, a))(
        model, jnp.asarray(ids), jnp.asarray(full_positions), jnp.asarray(attention_mask)
    ))

    spec = decoder_config.cache_spec()
    cache = KVCache.zeros(num_layers=spec.num_layers, batch=b, max_len=max_len, num_kv_heads=spec.num_kv_heads,
                          head_dim=spec.head_dim, dtype=jnp.float32)
    prefill = nnx.jit(lambda m, e, p, a, c: m.prefill(e, p, a, c))
    decode = nnx.jit(lambda m, e, p, c: m.decode(e, p, c), donate_argnums=3)
    hidden, cache = prefill(model, model.embed(jnp.asarray(ids[:, :prompt_len])),
                            jnp.asarray(positions[:, :, :prompt_len]),
                            jnp.asarray(attention_mask[:, :prompt_len]), cache)
    assert int(cache.index) == prompt_len
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :prompt_len]), attention_mask[:, :prompt_len])
    assert not np.asarray(cache.valid[:, prompt_len:]).any()
    prompt_mask = attention_mask[:, :prompt_len]
    np.testing.assert_allclose(np.asarray(hidden)[prompt_mask], full[:, :prompt_len][prompt_mask], atol=1e-5)
    for i in range(new_tokens):
        step, cache = decode(model, model.embed(jnp.asarray(ids[:, prompt_len + i])),
                             jnp.asarray(next_pos + i, jnp.int32), cache)
        np.testing.assert_allclose(np.asarray(step), full[:, prompt_len + i], atol=1e-5)
    assert int(cache.index) == total


def test_remat_forward_and_grad_match(hf_state, decoder_config):
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, fx.TEXT_TOKEN_MAX, size=(2, 16)))
    positions = jnp.broadcast_to(jnp.arange(16), (3, 2, 16))
    mask = jnp.ones((2, 16), bool)

    def loss(model):
        return jnp.mean(model(model.embed(ids), positions, mask) ** 2)

    plain = _our_text_model(decoder_config, hf_state)
    remat = _our_text_model(decoder_config, hf_state, remat=True)
    # One rematerialised region, the scanned decoder layer (whatever the depth), none without remat.
    assert str(jax.make_jaxpr(nnx.grad(loss))(remat)).count("remat") == 1
    assert "remat" not in str(jax.make_jaxpr(nnx.grad(loss))(plain))
    g_plain = nnx.jit(nnx.grad(loss))(plain)
    g_remat = nnx.jit(nnx.grad(loss))(remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), nnx.to_pure_dict(g_plain),
                 nnx.to_pure_dict(g_remat))


def test_llama_decoder_matches_hf_llama_model():
    """The same TextModel with 1-D RoPE, no q/k/v bias and Llama's config spelling (LLaVA's decoder)."""
    import transformers

    from balcap_jax.models import hf_io
    from balcap_jax.models.qwen2_5_vl.params import from_hf_tensors

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    hf_config._attn_implementation = "eager"
    hf_llama = transformers.LlamaModel(hf_config).eval()
    with torch.no_grad():
        for param in hf_llama.parameters():
            param.copy_(param + 0.05 * torch.randn_like(param))
    config = DecoderConfig.from_hf(hf_config.to_dict())
    assert not config.uses_mrope and not config.qkv_bias
    model = from_hf_tensors(nnx.eval_shape(lambda: TextModel(config, rngs=nnx.Rngs(0))),
                            fx.hf_state_numpy(hf_llama), hf_io.ParamMapping())  # fmt: skip

    rng = np.random.default_rng(4)
    ids = rng.integers(3, 128, size=(2, 300))
    mask = np.ones((2, 300), bool)
    mask[1, :30] = False
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        expected = hf_llama(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long(),
                            position_ids=torch.from_numpy(positions)).last_hidden_state.numpy()  # fmt: skip
    ours = nnx.jit(lambda m, i, p, a: m(m.embed(i), p, a))(model, jnp.asarray(ids), jnp.asarray(positions),
                                                           jnp.asarray(mask))  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours)[mask], expected[mask], atol=1e-4)
    with pytest.raises(ValueError, match="1-D RoPE"):
        model.rotary(jnp.zeros((3, 2, 5), jnp.int32))
