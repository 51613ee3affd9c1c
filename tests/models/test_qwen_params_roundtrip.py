"""HF checkpoint -> ours -> export -> HF: identical logits; both key layouts; clear errors; bf16; sharded load."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from balcap_jax.models import hf_io
from balcap_jax.models.qwen2_5_vl import params
from balcap_jax.tools import parity
from tests.models import qwen_fixtures as fx

pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_dir(request, tmp_path_factory):
    model = fx.tiny_qwen_hf_model(seed=2, tie_word_embeddings=request.param)
    directory = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(directory)
    return directory, model


def _hf_logits(model, batch):
    return parity.hf_logits(model, batch, image_token_id=fx.IMAGE_TOKEN_ID)


def test_roundtrip_hf_ours_hf_logits_identical(hf_dir, tmp_path):
    directory, hf_model = hf_dir
    ours = params.load_qwen2_5_vl(directory)
    config = ours.config
    files = params.save_qwen2_5_vl(ours, tmp_path / "export")
    assert set(hf_io.SafetensorsDirectory(tmp_path / "export").keys()) == set(
        hf_io.SafetensorsDirectory(directory).keys()
    ) - ({"lm_head.weight"} if config.text.tie_word_embeddings else set())
    if config.text.tie_word_embeddings:
        assert "lm_head.weight" not in hf_io.SafetensorsDirectory(tmp_path / "export").keys()
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "export", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert files
    batch = parity.build_batch(config, seed=0, prompt_tokens=64, image_grids=((1, 8, 12), (1, 4, 4)))
    np.testing.assert_allclose(_hf_logits(reloaded, batch), _hf_logits(hf_model, batch), atol=1e-5, rtol=0)
    original = fx.hf_state_numpy(hf_model)
    for key, value in fx.hf_state_numpy(reloaded).items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    exported_config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported_config["tie_word_embeddings"] == config.text.tie_word_embeddings


def test_flat_and_nested_checkpoint_layouts_load_alike(hf_dir, tmp_path):
    """save_pretrained writes flat keys (`model.layers.*`, `visual.*`); the module layout (`state_dict()`
    names, `model.language_model.*`) loads to the same parameters; the nested export layout reloads too."""
    directory, hf_model = hf_dir
    assert params.is_flat_layout(hf_io.SafetensorsDirectory(directory).keys())
    (tmp_path / "nested").mkdir()
    hf_io.write_safetensors(tmp_path / "nested" / "model.safetensors", fx.hf_state_numpy(hf_model), {"format": "pt"})
    (tmp_path / "nested" / "config.json").write_text((directory / "config.json").read_text())
    assert not params.is_flat_layout(hf_io.SafetensorsDirectory(tmp_path / "nested").keys())
    reference = params.load_qwen2_5_vl(directory)
    params.save_qwen2_5_vl(reference, tmp_path / "nested_export", layout="nested")
    assert any(k.startswith("model.language_model.")
               for k in hf_io.SafetensorsDirectory(tmp_path / "nested_export").keys())  # fmt: skip
    expected = params.named_leaves(nnx.state(reference, nnx.Param))
    for other in (tmp_path / "nested", tmp_path / "nested_export"):
        loaded = params.named_leaves(nnx.state(params.load_qwen2_5_vl(other), nnx.Param))
        for (name, a), (_, b) in zip(loaded, expected):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_bf16_load_matches_fp32_cast(hf_dir):
    directory, _ = hf_dir
    ours16 = params.load_qwen2_5_vl(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours32 = params.load_qwen2_5_vl(directory)
    leaves16 = params.named_leaves(nnx.state(ours16, nnx.Param))
    leaves32 = dict(params.named_leaves(nnx.state(ours32, nnx.Param)))
    assert all(leaf.dtype == jnp.bfloat16 for _, leaf in leaves16)
    for name, leaf in leaves16:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaves32[name].astype(jnp.bfloat16)))


def _write(directory, tensors, config_text):
    directory.mkdir()
    hf_io.write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    (directory / "config.json").write_text(config_text)


def test_missing_unexpected_and_misshaped_keys_are_named(hf_dir, tmp_path):
    directory, hf_model = hf_dir
    state = fx.hf_state_numpy(hf_model)
    config_text = (directory / "config.json").read_text()

    missing = {k: v for k, v in state.items() if k != "model.language_model.layers.1.mlp.up_proj.weight"}
    assert len(missing) == len(state) - 1
    _write(tmp_path / "missing", missing, config_text)
    with pytest.raises(hf_io.HFWeightsError, match=r"missing.*layers\.1\.mlp\.up_proj\.weight"):
        params.load_qwen2_5_vl(tmp_path / "missing")

    _write(tmp_path / "unexpected", dict(state, **{"model.language_model.extra.weight": np.zeros(3, np.float32)}),
           config_text)  # fmt: skip
    with pytest.raises(hf_io.HFWeightsError, match=r"unexpected.*extra\.weight"):
        params.load_qwen2_5_vl(tmp_path / "unexpected")

    bad = dict(state)
    bad["model.language_model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    _write(tmp_path / "shape", bad, config_text)
    with pytest.raises(hf_io.HFWeightsError, match=r"k_proj\.weight.*shape"):
        params.load_qwen2_5_vl(tmp_path / "shape")


def test_in_memory_conversion_roundtrip(hf_dir):
    _, hf_model = hf_dir
    state = fx.hf_state_numpy(hf_model)
    config = params.Qwen2_5_VLConfig.from_hf(hf_model.config.to_dict())
    mapping = params.qwen2_5_vl_mapping(config, state, export_layout="nested")
    ours = params.from_hf_tensors(params.abstract_model(config), state, mapping)
    exported = params.to_hf_tensors(ours, mapping)
    expected_keys = set(state) - ({"lm_head.weight"} if config.text.tie_word_embeddings else set())
    assert set(exported) == expected_keys
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_load_straight_into_sharded_arrays(hf_dir):
    from balcap_jax.models.qwen2_5_vl.sharding import QwenSharding
    from balcap_jax.parallel.mesh import make_mesh

    directory, _ = hf_dir
    mesh = make_mesh((2, 2, 2))
    sharded = params.load_qwen2_5_vl(directory, mesh=mesh, sharding=QwenSharding.sampling())
    plain = dict(params.named_leaves(nnx.state(params.load_qwen2_5_vl(directory), nnx.Param)))
    leaves = params.named_leaves(nnx.state(sharded, nnx.Param))
    q = dict(leaves)["model.language_model.layers.self_attn.q_proj.kernel"]  # the stack of every layer's q_proj
    assert q.sharding.spec == P(None, *QwenSharding.sampling().attn_in) and q.sharding.mesh.shape == mesh.shape
    for name, leaf in leaves:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(plain[name]), err_msg=name)
