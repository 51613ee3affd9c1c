"""The whole Qwen2.5-VL (vision tower + scatter + M-RoPE decoder + lm_head) against HF torch, fp32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from balcap_jax.models.interface import KVCache, next_text_positions
from balcap_jax.models.qwen2_5_vl import params
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL, make_inputs
from balcap_jax.tools import parity
from tests.models import qwen_fixtures as fx

pytestmark = pytest.mark.usefixtures("highest_precision")

GRIDS = ((1, 8, 12), (1, 16, 8), (1, 4, 4))  # three sizes; the 16x8 one spans two 112-px windows


@functools.lru_cache(maxsize=None)
def _build(tied: bool):
    hf_model = fx.tiny_qwen_hf_model(seed=1, tie_word_embeddings=tied)
    config = Qwen2_5_VLConfig.from_hf(hf_model.config.to_dict())
    ours = fx.load_hf_into(params.abstract_model(config), fx.hf_state_numpy(hf_model))
    return hf_model, ours


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request):
    return _build(request.param)


def test_config_from_hf(models):
    hf_model, ours = models
    config = ours.config
    assert config.image_token_id == fx.IMAGE_TOKEN_ID and config.text.mrope_section == (2, 3, 3)
    assert config.text.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert hasattr(ours, "lm_head") != config.text.tie_word_embeddings
    assert Qwen2_5_VLConfig.from_hf(config.to_hf()) == config


def test_logits_long_prompt_three_images_and_padded_text_row(models):
    hf_model, ours = models
    batch = parity.build_batch(ours.config, seed=0, prompt_tokens=520, image_grids=GRIDS)
    assert batch.input_ids.shape[1] >= 500 and (~batch.attention_mask).any()
    report = parity.compare(
        parity.hf_logits(hf_model, batch, image_token_id=fx.IMAGE_TOKEN_ID),
        parity.our_logits(ours, batch),
        batch.attention_mask,
    )
    assert report.max_abs_logit_diff <= 1e-3, report
    assert report.max_kl <= 1e-7, report


def test_logits_text_only_padded_batch(models):
    hf_model, ours = models
    batch = parity.build_batch(ours.config, seed=1, prompt_tokens=500, image_grids=())
    report = parity.compare(
        parity.hf_logits(hf_model, batch, image_token_id=fx.IMAGE_TOKEN_ID),
        parity.our_logits(ours, batch),
        batch.attention_mask,
    )
    assert report.max_abs_logit_diff <= 1e-3, report


def test_prefill_and_decode_match_full_forward_with_images():
    _, model = _build(False)
    config = model.config
    prompt = parity.build_batch(config, seed=2, prompt_tokens=40, image_grids=GRIDS[:2])
    b, prompt_len = prompt.input_ids.shape
    new_tokens = 4
    continuation = np.random.default_rng(3).integers(0, fx.TEXT_TOKEN_MAX, size=(b, new_tokens))
    inputs = make_inputs(config, prompt.input_ids, prompt.attention_mask, prompt.pixel_values,
                         prompt.image_grid_thw)  # fmt: skip
    spec = model.cache_spec()
    cache = KVCache.zeros(num_layers=spec.num_layers, batch=b, max_len=prompt_len + new_tokens,
                          num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, inputs, cache):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.prefill(inputs, cache)
        return m.logits(hidden), cache

    @jax.jit
    def decode(state, tokens, positions, cache):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.decode(tokens, positions, cache)
        return m.logits(hidden), cache

    prefill_logits, cache = prefill(state, inputs, cache)
    start = np.asarray(next_text_positions(jnp.asarray(inputs["positions"]), jnp.asarray(inputs["attention_mask"])))
    step_logits = []
    for i in range(new_tokens):
        logits, cache = decode(state, jnp.asarray(continuation[:, i], jnp.int32), jnp.asarray(start + i), cache)
        step_logits.append(np.asarray(logits))

    # The same tokens through the full forward, positions from get_rope_index on the whole sequence.
    full = make_inputs(config, np.concatenate([prompt.input_ids, continuation], 1),
                       np.concatenate([prompt.attention_mask, np.ones((b, new_tokens), bool)], 1),
                       prompt.pixel_values, prompt.image_grid_thw)  # fmt: skip
    np.testing.assert_array_equal(full["positions"][:, :, prompt_len:], (start + np.arange(new_tokens)[:, None]).T[None].repeat(3, 0))
    full_logits = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, full))
    mask = prompt.attention_mask
    np.testing.assert_allclose(np.asarray(prefill_logits)[mask], full_logits[:, :prompt_len][mask], atol=1e-4)
    np.testing.assert_allclose(np.stack(step_logits, 1), full_logits[:, prompt_len:], atol=1e-4)


def test_precomputed_image_embeds_equal_running_the_tower():
    """One prompt's image embeddings, computed once and repeated for a group of 2 samples, give the same
    hidden states as running the tower on the tiled batch."""
    _, model = _build(False)
    config = model.config
    one = parity.build_batch(config, seed=7, prompt_tokens=24, image_grids=GRIDS[1:], text_only_row=False)
    group = 2
    tiled = make_inputs(config, np.tile(one.input_ids, (group, 1)), np.tile(one.attention_mask, (group, 1)),
                        np.tile(one.pixel_values, (group, 1)), np.tile(one.image_grid_thw, (group, 1)))  # fmt: skip
    single = make_inputs(config, one.input_ids, one.attention_mask, one.pixel_values, one.image_grid_thw)
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state, tiled, vision):
        m = nnx.merge(graphdef, state)
        n_real = int(np.prod(one.image_grid_thw, axis=1).sum()) // config.vision.merge_unit
        embeds = jnp.tile(m.image_embeddings(vision)[:n_real], (group, 1))
        precomputed = dict(tiled, image_embeds=embeds)
        del precomputed["vision"]
        return m.hidden_states(tiled), m.hidden_states(precomputed)

    ref, ours = both(state, tiled, single["vision"])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    with pytest.raises(ValueError, match="both"):
        model.embed_inputs(dict(single, image_embeds=jnp.zeros((1, 64))))


def test_make_inputs_rejects_mismatched_image_tokens(models):
    _, model = models
    batch = parity.build_batch(model.config, seed=4, prompt_tokens=20, image_grids=((1, 4, 4),))
    with pytest.raises(ValueError, match="image_grid_thw"):
        make_inputs(model.config, batch.input_ids, batch.attention_mask, batch.pixel_values,
                    np.array([[1, 4, 8]]))  # fmt: skip
    with pytest.raises(ValueError, match="both"):
        make_inputs(model.config, batch.input_ids, batch.attention_mask, batch.pixel_values, None)


def test_output_embedding_and_logits_agree(models):
    _, model = models
    hidden = jnp.asarray(np.random.default_rng(5).standard_normal((3, 64)), jnp.float32)
    logits = model.logits(hidden)
    assert logits.dtype == jnp.float32 and logits.shape == (3, fx.TINY_VOCAB)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(hidden @ model.output_embedding()), atol=1e-5)
    assert isinstance(model, Qwen2_5_VL)


@pytest.mark.slow  # two extra compilations of the whole model (fp32 and bf16)
def test_bf16_model_and_cache_track_fp32():
    """bf16 weights, activations and KV cache (the production setting) stay close to the fp32 logits."""
    hf_model, ours32 = _build(False)
    config = ours32.config
    ours16 = fx.load_hf_into(params.abstract_model(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
                             fx.hf_state_numpy(hf_model))  # fmt: skip
    batch = parity.build_batch(config, seed=6, prompt_tokens=64, image_grids=GRIDS[:2])
    inputs = make_inputs(config, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw)
    b, t = batch.input_ids.shape
    spec = config.text.cache_spec()

    def run(model, cache_dtype):
        graphdef, state = nnx.split(model)

        @jax.jit
        def step(state, inputs):
            m = nnx.merge(graphdef, state)
            cache = KVCache.zeros(num_layers=spec.num_layers, batch=b, max_len=t + 1, num_kv_heads=spec.num_kv_heads,
                                  head_dim=spec.head_dim, dtype=cache_dtype)  # fmt: skip
            hidden, cache = m.prefill(inputs, cache)
            positions = next_text_positions(inputs["positions"], inputs["attention_mask"])
            step_hidden, cache = m.decode(inputs["input_ids"][:, -1], positions, cache)
            return m.logits(hidden), m.logits(step_hidden), cache.k

        return step(state, inputs)

    prompt32, step32, _ = run(ours32, jnp.float32)
    prompt16, step16, cache_k = run(ours16, jnp.bfloat16)
    assert prompt16.dtype == jnp.float32 and cache_k.dtype == jnp.bfloat16
    mask = batch.attention_mask
    scale = float(np.abs(np.asarray(prompt32)[mask]).max())
    assert np.abs(np.asarray(prompt16) - np.asarray(prompt32))[mask].max() <= 0.1 * scale
    assert np.abs(np.asarray(step16) - np.asarray(step32)).max() <= 0.1 * scale


def test_remat_flag_reaches_every_decoder_layer_and_vision_block():
    _, model = _build(False)
    config = model.config
    batch = parity.build_batch(config, seed=8, prompt_tokens=16, image_grids=GRIDS[2:], text_only_row=False)
    inputs = make_inputs(config, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw)
    remat_model = fx.load_hf_into(params.abstract_model(config, remat=True), fx.hf_state_numpy(_build(False)[0]))
    # One rematerialised region per layer stack (the scanned decoder layer and vision block), whatever the depth.
    for m, expected in ((model, 0), (remat_model, 2)):
        g, p, rest = nnx.split(m, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(g, p, rest).hidden_states(inputs) ** 2)  # noqa: E731
        assert str(jax.make_jaxpr(jax.grad(loss))(p)).count("remat") == expected


def test_greedy_decoding_matches_hf_generate():
    """Prefill + decode through the KV cache, greedy, reproduces HF `generate` token for token on a left-padded
    batch (an image row and a text-only row): the decode positions continue HF's M-RoPE `rope_deltas`."""
    import torch

    hf_model, model = _build(False)
    config = model.config
    batch = parity.build_batch(config, seed=9, prompt_tokens=40, image_grids=GRIDS[1:])
    new_tokens = 8
    with torch.no_grad():
        generated = hf_model.generate(
            input_ids=torch.from_numpy(batch.input_ids),
            attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64)),
            pixel_values=torch.from_numpy(batch.pixel_values),
            image_grid_thw=torch.from_numpy(batch.image_grid_thw),
            mm_token_type_ids=torch.from_numpy((batch.input_ids == fx.IMAGE_TOKEN_ID).astype(np.int64)),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )[:, batch.input_ids.shape[1]:].numpy()

    inputs = make_inputs(config, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw)
    b, t = batch.input_ids.shape
    spec = model.cache_spec()
    graphdef, state = nnx.split(model)

    @jax.jit
    def greedy(state, inputs):
        m = nnx.merge(graphdef, state)
        cache = KVCache.zeros(num_layers=spec.num_layers, batch=b, max_len=t + new_tokens,
                              num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=jnp.float32)
        hidden, cache = m.prefill(inputs, cache)
        token = jnp.argmax(m.logits(hidden[:, -1]), axis=-1).astype(jnp.int32)
        position = next_text_positions(inputs["positions"], inputs["attention_mask"])

        def step(carry, _):
            token, position, cache = carry
            hidden, cache = m.decode(token, position, cache)
            return (jnp.argmax(m.logits(hidden), axis=-1).astype(jnp.int32), position + 1, cache), token

        _, tokens = jax.lax.scan(step, (token, position, cache), None, length=new_tokens)
        return tokens.T

    assert all(len(set(row.tolist())) > 1 for row in generated)  # a non-degenerate continuation
    np.testing.assert_array_equal(np.asarray(greedy(state, inputs)), generated)
