"""LLaVA-1.5 vs HF transformers (torch, CPU, fp32): components, full logits, KV-cache decoding, weight round trip.

The reference is a tiny random `LlavaForConditionalGeneration` built in-process (CLIP 3 layers at 56 px = 16
image tokens, Llama 2 layers with GQA 4/2). Its weights are redrawn with std 0.1 (HF's 0.02 init makes a tiny
model's outputs nearly input-independent, which would hide bugs). Our model is loaded from the checkpoint HF's
own `save_pretrained` writes, so every test also exercises the loader.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

from balcap_jax.models.hf_io import HFWeightsError, iter_hf_tensors  # noqa: E402
from balcap_jax.models.interface import KVCache, next_text_positions  # noqa: E402
from balcap_jax.models.layer_stack import layer_at  # noqa: E402
from balcap_jax.models.llava import params as llava_params  # noqa: E402
from balcap_jax.models.llava import processor  # noqa: E402
from balcap_jax.models.llava.config import LlavaConfig  # noqa: E402

VOCAB = 256
IMAGE_TOKEN = VOCAB - 1
IMAGE_SIZE = 56
COMPONENT_TOL = 1e-4
LOGIT_TOL = 1e-3


def _hf_config() -> "transformers.LlavaConfig":
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    text = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=16,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    return config


def _redraw(model: "torch.nn.Module", seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_scale = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(_hf_config()).eval().float()
    _redraw(model, seed=0)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava_hf")
    hf_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ours(hf_dir):
    return llava_params.load_llava(hf_dir)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Three real photographs of different sizes and aspect ratios, preprocessed to 56 px. [3, 56, 56, 3]"""
    skimage_data = pytest.importorskip("skimage.data")
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    cfg = processor.ClipImageProcessorConfig(shortest_edge=IMAGE_SIZE, crop_size=IMAGE_SIZE)
    return processor.preprocess_images([Image.fromarray(p) for p in photos], cfg)


def _nchw(pixels: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(pixels, -1, 1)))


def _prompt(rng: np.random.Generator, length: int, image_slots: list[int], per_image: int) -> list[int]:
    """Random text ids with `per_image` image tokens starting at each of `image_slots`."""
    ids = list(rng.integers(1, IMAGE_TOKEN - 1, size=length))
    for start in image_slots:
        ids[start : start + per_image] = [IMAGE_TOKEN] * per_image
    return ids


def _hf_logits(hf_model, batch: dict) -> np.ndarray:
    kwargs = dict(
        input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
        attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
        position_ids=torch.from_numpy(batch["positions"].astype(np.int64)),
    )
    if "vision" in batch:
        kwargs["pixel_values"] = _nchw(batch["vision"]["pixel_values"])
    with torch.no_grad():
        return hf_model(**kwargs).logits.numpy()


@nnx.jit
def _forward(model, batch):
    return model(batch)


def _our_logits(model, batch: dict) -> np.ndarray:
    """Full forward under jit: `nnx.jit` splits the module into (graphdef, state) at the boundary."""
    return np.asarray(_forward(model, jax.tree.map(jnp.asarray, batch)))


# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------


def test_config_from_hf_and_back(hf_model):
    config = LlavaConfig.from_hf_dict(hf_model.config.to_dict())
    assert config.image_seq_length == 16 and config.image_token_id == IMAGE_TOKEN
    assert (config.text.num_kv_heads, config.text.head_dim, config.text.qkv_bias) == (2, 16, False)
    assert config.vision.hidden_act == "quick_gelu" and config.feature_layers == (-2,)
    rebuilt = transformers.LlavaConfig(**config.to_hf_dict())
    assert LlavaConfig.from_hf_dict(rebuilt.to_dict()) == config


# ------------------------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------------------------


def test_vision_embeddings_match(hf_model, ours, pixels, highest_precision):
    expected = hf_model.model.vision_tower.embeddings(_nchw(pixels)).detach().numpy()
    got = np.asarray(ours.model.vision_tower.embeddings(jnp.asarray(pixels)))
    np.testing.assert_allclose(got, expected, atol=COMPONENT_TOL, rtol=0)


def test_vision_encoder_layer_matches(hf_model, ours, highest_precision):
    hidden = np.random.default_rng(1).normal(size=(2, 17, 32)).astype(np.float32)
    with torch.no_grad():
        expected = hf_model.model.vision_tower.encoder.layers[1](torch.from_numpy(hidden), None)
    layer = layer_at(ours.model.vision_tower.encoder.layers, 1)
    got = nnx.jit(lambda layer, x: layer(x))(layer, jnp.asarray(hidden))
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=COMPONENT_TOL, rtol=0)


def test_vision_tower_hidden_states_and_pooled_output_match(hf_model, ours, pixels, highest_precision):
    with torch.no_grad():
        out = hf_model.model.vision_tower(_nchw(pixels), output_hidden_states=True)
    got = nnx.jit(lambda tower, x: tower.hidden_states(x))(ours.model.vision_tower, jnp.asarray(pixels))
    assert len(got) == len(out.hidden_states) == 4
    for ours_state, hf_state in zip(got, out.hidden_states):
        np.testing.assert_allclose(np.asarray(ours_state), hf_state.numpy(), atol=COMPONENT_TOL, rtol=0)
    pooled = nnx.jit(lambda tower, x: tower.pooled(x))(ours.model.vision_tower, jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=COMPONENT_TOL, rtol=0)


def test_image_features_match_projected_penultimate_layer_without_cls(hf_model, ours, pixels, highest_precision):
    with torch.no_grad():
        expected = torch.stack(hf_model.model.get_image_features(_nchw(pixels)).pooler_output).numpy()
    got = np.asarray(nnx.jit(lambda model, x: model.image_features(x))(ours.model, jnp.asarray(pixels)))
    assert got.shape == (3, 16, 64)
    np.testing.assert_allclose(got, expected, atol=COMPONENT_TOL, rtol=0)


def test_multi_layer_full_strategy_features_match(hf_model, ours, pixels, highest_precision):
    """A tuple of feature layers with the CLS kept (LLaVA variants): HF's concatenation order and CLS handling."""
    with torch.no_grad():
        hf_states = hf_model.model.vision_tower(_nchw(pixels), output_hidden_states=True).hidden_states
    expected = torch.cat([hf_states[-3], hf_states[1]], dim=-1).numpy()
    select = nnx.jit(lambda tower, x: tower.select_features(x, (-3, 1), drop_cls=False))
    got = select(ours.model.vision_tower, jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(got), expected, atol=COMPONENT_TOL, rtol=0)


def test_decoder_layer_matches(hf_model, ours, highest_precision):
    from balcap_jax.models.attention import SegmentMask

    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(2, 40, 64)).astype(np.float32)
    positions = np.broadcast_to(np.arange(40), (2, 40))
    hf_lm = hf_model.model.language_model
    with torch.no_grad():
        t_hidden, t_pos = torch.from_numpy(hidden), torch.from_numpy(positions.copy())
        cos_sin = hf_lm.rotary_emb(t_hidden, t_pos)
        mask = torch.full((40, 40), float("-inf")).triu(1)[None, None].expand(2, 1, 40, 40)
        expected = hf_lm.layers[0](t_hidden, attention_mask=mask, position_ids=t_pos, position_embeddings=cos_sin)
        expected = expected[0] if isinstance(expected, tuple) else expected
    @nnx.jit
    def layer_forward(text, hidden, positions):
        cos, sin = text.rotary(positions)
        allowed = SegmentMask.from_padding(jnp.ones(positions.shape, bool))
        return layer_at(text.layers, 0)(hidden, cos, sin, allowed)[0]

    got = layer_forward(ours.model.language_model, jnp.asarray(hidden), jnp.asarray(positions, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=COMPONENT_TOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_padded_batch(pixels) -> dict:
    """Row 0: 530 tokens with two images; row 1: 300 tokens with one image, left padded to 530."""
    rng = np.random.default_rng(3)
    rows = [_prompt(rng, 530, [5, 260], 16), _prompt(rng, 300, [40], 16)]
    cfg = LlavaConfig.from_hf_dict(_hf_config().to_dict())
    return processor.make_batch(rows, pixels, cfg, pad_id=0, padding_side="left")


@pytest.fixture(scope="module")
def hf_long_logits(hf_model, long_padded_batch) -> np.ndarray:
    return _hf_logits(hf_model, long_padded_batch)


def test_full_logits_match_with_images_long_prompt_and_left_padding(hf_long_logits, ours, long_padded_batch,
                                                                    highest_precision):
    expected = hf_long_logits
    got = _our_logits(ours, long_padded_batch)
    mask = long_padded_batch["attention_mask"]
    assert got.shape == expected.shape == (2, 530, VOCAB) and got.dtype == np.float32
    np.testing.assert_allclose(got[mask], expected[mask], atol=LOGIT_TOL, rtol=0)


def test_text_only_batch_logits_match(hf_model, ours, highest_precision):
    rng = np.random.default_rng(4)
    rows = [_prompt(rng, 64, [], 0), _prompt(rng, 50, [], 0)]
    cfg = LlavaConfig.from_hf_dict(_hf_config().to_dict())
    batch = processor.make_batch(rows, None, cfg, pad_id=0, padding_side="right")
    expected, got = _hf_logits(hf_model, batch), _our_logits(ours, batch)
    mask = batch["attention_mask"]
    np.testing.assert_allclose(got[mask], expected[mask], atol=LOGIT_TOL, rtol=0)


def test_prefill_then_decode_equals_full_forward(ours, pixels, highest_precision):
    """Greedy-free check: feed fixed continuation tokens one by one through the cache and compare each step's
    logits to the full forward over prompt + continuation (left-padded rows, images in the prompt)."""
    rng = np.random.default_rng(5)
    cfg = ours.config
    rows = [_prompt(rng, 40, [3], 16), _prompt(rng, 25, [2], 16)]
    prompt = processor.make_batch(rows, pixels[:2], cfg, pad_id=0)
    steps = 4
    continuation = rng.integers(1, IMAGE_TOKEN - 1, size=(2, steps)).astype(np.int32)
    full = {
        "input_ids": np.concatenate([prompt["input_ids"], continuation], axis=1),
        "attention_mask": np.concatenate([prompt["attention_mask"], np.ones((2, steps), bool)], axis=1),
        "vision": prompt["vision"],
    }
    full["positions"] = processor.padded_positions(full["attention_mask"])
    expected = _our_logits(ours, full)

    spec = ours.cache_spec()
    cache = KVCache.zeros(
        num_layers=spec.num_layers, batch=2, max_len=48, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        dtype=jnp.float32,
    )
    prefill = nnx.jit(lambda model, inputs, cache: model.prefill(inputs, cache))
    decode = nnx.jit(lambda model, tokens, positions, cache: model.decode(tokens, positions, cache))
    inputs = jax.tree.map(jnp.asarray, prompt)
    hidden, cache = prefill(ours, inputs, cache)
    assert int(cache.index) == 40
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :40]), prompt["attention_mask"])
    mask = prompt["attention_mask"]
    np.testing.assert_allclose(np.asarray(ours.logits(hidden))[mask], expected[:, :40][mask], atol=1e-4, rtol=0)
    position = next_text_positions(inputs["positions"], inputs["attention_mask"])
    np.testing.assert_array_equal(np.asarray(position), [40, 25])  # prompt lengths: the first new position
    for step in range(steps):
        hidden, cache = decode(ours, jnp.asarray(continuation[:, step]), position + step, cache)
        np.testing.assert_allclose(np.asarray(ours.logits(hidden)), expected[:, 40 + step], atol=1e-4, rtol=0)
    assert int(cache.index) == 40 + steps


def test_bf16_compute_stays_close_to_fp32_reference(hf_long_logits, hf_dir, long_padded_batch):
    """bf16 weights and activations: logits stay fp32 and within bf16 rounding of the fp32 reference."""
    model = llava_params.load_llava(hf_dir, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    expected = hf_long_logits
    got = _our_logits(model, long_padded_batch)
    mask = long_padded_batch["attention_mask"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[mask], expected[mask], atol=0.2, rtol=0)
    assert (got[mask].argmax(-1) == expected[mask].argmax(-1)).mean() > 0.95


def test_gradients_reach_the_used_vision_layers_and_skip_the_unused_top(ours, pixels):
    """Feature layer -2 of a 3-layer tower: layers 0-1 learn, layer 2 and post_layernorm get exact zeros."""
    rng = np.random.default_rng(6)
    batch = processor.make_batch([_prompt(rng, 24, [2], 16)], pixels[:1], ours.config, pad_id=0)

    def loss(model, batch):
        return jnp.mean(model(batch)[:, -1] ** 2)

    grads = nnx.jit(nnx.grad(loss))(ours, jax.tree.map(jnp.asarray, batch))
    tower = grads["model"]["vision_tower"]
    assert float(jnp.abs(tower["encoder"]["layers"]["mlp"]["fc1"]["kernel"][...][0]).max()) > 0
    assert float(jnp.abs(tower["embeddings"]["patch_embedding"]["kernel"][...]).max()) > 0
    unused = [jax.tree.map(lambda stacked: stacked[2], tower["encoder"]["layers"]), tower["post_layernorm"]]
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(unused))


# ------------------------------------------------------------------------------------------------------------
# Weights in and out
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["llava-hf", "transformers5"])
def test_round_trip_hf_ours_hf_gives_identical_logits(hf_model, hf_long_logits, ours, long_padded_batch, tmp_path,
                                                      layout):
    llava_params.save_llava(ours, tmp_path, layout=layout)
    keys = [key for key, _ in iter_hf_tensors(tmp_path)]
    if layout == "llava-hf":
        assert "vision_tower.vision_model.embeddings.class_embedding" in keys
        assert "language_model.lm_head.weight" in keys and "language_model.model.norm.weight" in keys
    else:
        assert "model.vision_tower.embeddings.class_embedding" in keys and "lm_head.weight" in keys
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    reloaded = reloaded.eval().float()
    original = hf_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, original[name], atol=0, rtol=0, msg=name)
    expected = hf_long_logits
    got = _hf_logits(reloaded, long_padded_batch)
    mask = long_padded_batch["attention_mask"]
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-5, rtol=0)
    # Our loader reads our own export back bit-exactly (the llava-hf layout is the `vision_model` nesting).
    again = llava_params.load_llava(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_export_and_load(ours, tmp_path):
    llava_params.save_llava(ours, tmp_path, dtype=jnp.bfloat16)
    dtypes = {str(t.dtype) for _, t in iter_hf_tensors(tmp_path)}
    assert dtypes == {"bfloat16"}
    model = llava_params.load_llava(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    kernel = model.model.language_model.layers.mlp.up_proj.kernel[...][0]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel), np.asarray(ours.model.language_model.layers.mlp.up_proj.kernel[...][0], jnp.bfloat16)
    )


def test_loader_names_the_offending_keys(hf_dir, tmp_path):
    config = LlavaConfig.from_hf_dict(_hf_config().to_dict())
    wrong_vocab = LlavaConfig(
        vision=config.vision, text=config.text.__class__(**{**config.text.__dict__, "vocab_size": VOCAB + 8}),
        image_token_id=IMAGE_TOKEN,
    )
    with pytest.raises(HFWeightsError, match=r"lm_head\.weight.*shape"):
        llava_params.load_llava(hf_dir, config=wrong_vocab)
    # Drop one tensor: the error names the missing key.
    from balcap_jax.models.hf_io import write_safetensors

    tensors = {k: v for k, v in iter_hf_tensors(hf_dir) if "layers.1.mlp.fc2.bias" not in k}
    write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(HFWeightsError, match=r"missing.*model\.vision_tower\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        llava_params.load_llava(tmp_path)
    # An extra tensor: the error names it; known buffers (old checkpoints' position_ids) are skipped.
    tensors = dict(iter_hf_tensors(hf_dir))
    tensors["vision_tower.vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    tensors["multi_modal_projector.linear_3.weight"] = np.zeros((2, 2), np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    with pytest.raises(HFWeightsError, match=r"1 unexpected key.*multi_modal_projector\.linear_3\.weight"):
        llava_params.load_llava(tmp_path)


def test_parity_check_on_a_checkpoint_directory(hf_dir):
    """The user-facing check (`tools.parity_llava.check_llava`, the LLaVA half of `tools.parity`)."""
    from balcap_jax.tools.parity_llava import build_batch, check_llava

    config = LlavaConfig.from_hf_dict(_hf_config().to_dict())
    batch = build_batch(config, prompt_tokens=64)
    assert batch["vision"]["pixel_values"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert (batch["input_ids"] == IMAGE_TOKEN).sum() == 4 * 16
    assert not batch["attention_mask"][2].all()  # the text-only row is left padded
    report = check_llava(str(hf_dir), prompt_tokens=64)
    assert report.num_tokens == int(batch["attention_mask"].sum())
    assert report.ok(logit_tol=LOGIT_TOL, kl_tol=1e-6), str(report)


def test_parity_cli_dispatches_llava_checkpoints(hf_dir, capsys):
    """`python -m balcap_jax.tools.parity --hf-dir` recognises a LLaVA checkpoint by its config.json."""
    from balcap_jax.tools import parity

    assert parity.main(["--hf-dir", str(hf_dir), "--prompt-tokens", "64"]) == 0
    assert "PASS" in capsys.readouterr().out
