"""hf_io: HF safetensors directories <-> sharded JAX states, against real `transformers` checkpoints."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from balcap_jax.models import hf_io
from balcap_jax.parallel import abstract_with_shardings, make_mesh, specs_from_rules

from tests.models.tiny_lm import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, MLP, TRAINING_RULES, VOCAB, abstract_state


def tiny_qwen2(dtype=torch.float32) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise so a swap would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.copy_(torch.randn_like(param))
    return model.to(dtype)


def ours_from_torch(torch_key: str, tensor: torch.Tensor) -> np.ndarray:
    """The expected value of our parameter, written independently of hf_io's rules."""
    array = tensor.detach().float().numpy()
    is_linear_weight = torch_key.endswith("_proj.weight") or torch_key == "lm_head.weight"
    return array.T if is_linear_weight else array


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_tiny")
    model = tiny_qwen2()
    model.save_pretrained(path, max_shard_size="40KB")
    return path, model


def test_fixture_is_sharded_on_disk(hf_dir):
    path, _ = hf_dir
    index = json.loads((path / hf_io.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 3


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1)])
def test_load_onto_mesh_streams_shards_and_matches_torch(hf_dir, mesh_shape, monkeypatch):
    path, model = hf_dir
    mesh = make_mesh(mesh_shape)
    abstract = abstract_state()
    target = abstract_with_shardings(abstract, specs_from_rules(abstract, TRAINING_RULES), mesh)

    requested = []  # element counts each device asked the loader for: never a whole sharded tensor
    original = jax.make_array_from_callback

    def spy(shape, sharding, callback, *args, **kwargs):
        def recording(index):
            out = callback(index)
            requested.append((shape, out.shape, sharding.shard_shape(shape)))
            return out

        return original(shape, sharding, recording, *args, **kwargs)

    monkeypatch.setattr(hf_io.jax, "make_array_from_callback", spy)
    state = hf_io.load_hf_state(path, target)

    assert requested and all(got == shard for _, got, shard in requested)
    q_kernel = state["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert q_kernel.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    assert {s.data.shape for s in q_kernel.addressable_shards} == {
        (HIDDEN // mesh.shape["fsdp"], HEADS * HEAD_DIM // mesh.shape["tensor"])
    }
    ours = dict(hf_io.named_leaves(state))
    for key, tensor in model.state_dict().items():
        name = key.replace("_proj.weight", "_proj.kernel").replace("lm_head.weight", "lm_head.kernel")
        name = name.replace("embed_tokens.weight", "embed_tokens.embedding").replace("norm.weight", "norm.scale")
        np.testing.assert_array_equal(np.asarray(ours.pop(name)), ours_from_torch(key, tensor), err_msg=key)
    assert not ours, f"parameters not compared: {list(ours)}"


def test_export_reloads_in_transformers_bit_identical(hf_dir, tmp_path):
    path, model = hf_dir
    mesh = make_mesh((2, 2, 2))
    abstract = abstract_state()
    state = hf_io.load_hf_state(path, abstract_with_shardings(abstract, specs_from_rules(abstract, TRAINING_RULES), mesh))
    out = tmp_path / "export"
    files = hf_io.save_hf_state(state, out, config=hf_io.read_hf_config(path), max_shard_size="30KB")
    assert len(files) >= 3 and (out / hf_io.INDEX_FILE).exists()

    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out, local_files_only=True).eval()
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    ids = torch.arange(20)[None] % VOCAB
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_bf16_checkpoint_into_fp32_and_bf16_export(tmp_path):
    model = tiny_qwen2(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    state = hf_io.load_hf_state(tmp_path / "bf16", abstract_state(jnp.float32))
    kernel = state["lm_head"]["kernel"][...]
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(kernel), model.lm_head.weight.detach().float().numpy().T)

    hf_io.save_hf_state(state, tmp_path / "out", config=hf_io.read_hf_config(tmp_path / "bf16"), dtype=jnp.bfloat16)
    reader = hf_io.SafetensorsDirectory(tmp_path / "out")
    assert reader.tensors["lm_head.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_conv_kernel_layout_matches_torch_conv():
    """HFKernel maps torch Conv weight [out, in, kh, kw] to flax kernel [kh, kw, in, out] exactly."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, kernel_size=(2, 3), bias=False)
    images = torch.randn(2, 3, 6, 7)
    kernel = hf_io.HFKernel().to_ours(conv.weight.detach().numpy())
    ours = jax.lax.conv_general_dilated(
        jnp.asarray(images.numpy()).transpose(0, 2, 3, 1), jnp.asarray(kernel), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest",
    )
    np.testing.assert_allclose(np.asarray(ours), conv(images).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_array_equal(hf_io.HFKernel().to_hf(kernel), conv.weight.detach().numpy())


def _save(directory, tensors, config=None):
    directory.mkdir(parents=True, exist_ok=True)
    hf_io.write_safetensors(directory / hf_io.SINGLE_FILE, tensors, {"format": "pt"})
    (directory / hf_io.CONFIG_FILE).write_text(json.dumps(config or {}))
    return directory


class Patches(nnx.Module):
    """A Conv3d patch embedding stored as a Linear over flattened patches (the Qwen2.5-VL special case)."""

    def __init__(self, rngs):
        self.visual = nnx.Module()
        self.visual.patch_embed = nnx.Module()
        self.visual.patch_embed.proj = nnx.Linear(3 * 2 * 4 * 4, 8, use_bias=False, rngs=rngs)
        self.visual.norm = nnx.LayerNorm(8, rngs=rngs)


def test_special_cases_aliases_prefix_renames_and_ignored_keys(tmp_path):
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((8, 3, 2, 4, 4)).astype(np.float32)
    norm_w, norm_b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    tensors = {
        "old.visual.patch_embed.proj.weight": conv,
        "old.visual.norm.weight": norm_w,
        "old.visual.norm.bias": norm_b,
        "old.visual.rotary.inv_freq": np.ones(4, np.float32),
    }
    directory = _save(tmp_path / "ckpt", tensors)
    special = {"patch_embed.proj.weight": (lambda w: w.reshape(w.shape[0], -1).T, lambda k: k.T.reshape(8, 3, 2, 4, 4))}
    mapping = hf_io.ParamMapping(
        prefix_renames=[("visual.", "new.visual.")],
        checkpoint_aliases=[("old.", "new.")],
        special_cases=special,
        ignore_unexpected=[r".*\.inv_freq"],
    )
    abstract = nnx.state(nnx.eval_shape(lambda: Patches(nnx.Rngs(0))), nnx.Param)
    mesh = make_mesh((1, 4, 2))
    target = abstract_with_shardings(abstract, lambda name, leaf: P("fsdp") if leaf.ndim == 2 else P(), mesh)
    state = hf_io.load_hf_state(directory, target, mapping)
    np.testing.assert_array_equal(np.asarray(state["visual"]["patch_embed"]["proj"]["kernel"][...]), conv.reshape(8, -1).T)
    np.testing.assert_array_equal(np.asarray(state["visual"]["norm"]["scale"][...]), norm_w)
    np.testing.assert_array_equal(np.asarray(state["visual"]["norm"]["bias"][...]), norm_b)

    hf_io.save_hf_state(state, tmp_path / "out", mapping)
    back = dict(hf_io.iter_hf_tensors(tmp_path / "out"))
    assert sorted(back) == ["new.visual.norm.bias", "new.visual.norm.weight", "new.visual.patch_embed.proj.weight"]
    np.testing.assert_array_equal(back["new.visual.patch_embed.proj.weight"], conv)


@pytest.fixture
def small_dir(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "model.norm.weight": np.ones(HIDDEN, np.float32),
    }
    return tensors, tmp_path


class Small(nnx.Module):
    def __init__(self, rngs, vocab=VOCAB, extra=False, dtype=jnp.float32):
        self.model = nnx.Module()
        self.model.embed_tokens = nnx.Embed(vocab, HIDDEN, rngs=rngs, param_dtype=dtype)
        self.model.norm = nnx.RMSNorm(HIDDEN, rngs=rngs)
        if extra:
            self.lm_head = nnx.Linear(HIDDEN, vocab, rngs=rngs)


def _abstract_small(**kwargs):
    return nnx.state(nnx.eval_shape(lambda: Small(nnx.Rngs(0), **kwargs)), nnx.Param)


def test_missing_key_is_named(small_dir):
    tensors, tmp = small_dir
    directory = _save(tmp / "ckpt", tensors)
    with pytest.raises(hf_io.HFWeightsError, match=r"missing key.*'lm_head\.weight'.*lm_head\.kernel"):
        hf_io.load_hf_state(directory, _abstract_small(extra=True))


def test_unexpected_key_is_named(small_dir):
    tensors, tmp = small_dir
    directory = _save(tmp / "ckpt", {**tensors, "model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(hf_io.HFWeightsError, match=r"unexpected key.*model\.extra\.weight"):
        hf_io.load_hf_state(directory, _abstract_small())


def test_shape_mismatch_names_key_and_shapes(small_dir):
    tensors, tmp = small_dir
    directory = _save(tmp / "ckpt", tensors)
    with pytest.raises(hf_io.HFWeightsError, match=r"model\.embed_tokens\.weight.*\(128, 32\).*\(64, 32\)"):
        hf_io.load_hf_state(directory, _abstract_small(vocab=64))


def test_dtype_kind_mismatch_is_named(small_dir):
    tensors, tmp = small_dir
    tensors["model.embed_tokens.weight"] = np.zeros((VOCAB, HIDDEN), np.int32)
    directory = _save(tmp / "ckpt", tensors)
    with pytest.raises(hf_io.HFWeightsError, match=r"model\.embed_tokens\.weight.*int32.*float32"):
        hf_io.load_hf_state(directory, _abstract_small())


def test_missing_directory_and_config_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.SafetensorsDirectory(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf_io.SafetensorsDirectory(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_io.read_hf_config(tmp_path)


def test_safetensors_writer_round_trips_every_float_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        f"t.{np.dtype(d).name}": rng.standard_normal((3, 5)).astype(d)
        for d in (np.float32, np.float16, ml_dtypes.bfloat16, np.float64)
    }
    tensors["t.int"] = np.arange(7, dtype=np.int64)
    hf_io.write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    from safetensors.torch import load_file  # the reference reader

    loaded = load_file(tmp_path / "x.safetensors")
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key].float().numpy(), value.astype(np.float32), err_msg=key)
    infos, metadata = hf_io.read_safetensors_header(tmp_path / "x.safetensors")
    assert metadata == {"format": "pt"} and infos["t.bfloat16"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_shard_groups_respect_max_size():
    groups = hf_io._shard_groups([("a", 40), ("b", 40), ("c", 100), ("d", 10)], 90)
    assert groups == [["a", "b"], ["c"], ["d"]]
    assert hf_io._parse_size("5GB") == 5 * 10**9 and hf_io._parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        hf_io._parse_size("lots")


@pytest.mark.parametrize("max_workers", [1, 3])
def test_conv_kernels_load_and_export_sharded_through_device_transposes(tmp_path, max_workers):
    """4-D kernels take the on-device transpose path: every layout must equal numpy's transpose exactly."""
    rng = np.random.default_rng(0)
    weights = {f"convs.{i}.weight": rng.standard_normal((8, 4, 3, 2)).astype(ml_dtypes.bfloat16) for i in range(3)}
    directory = _save(tmp_path / "ckpt", weights)
    mesh = make_mesh((2, 2, 2))
    abstract = {"convs": {str(i): {"kernel": jax.ShapeDtypeStruct((3, 2, 4, 8), jnp.float32)} for i in range(3)}}
    specs = {"convs": {"0": {"kernel": P(None, None, "fsdp", "tensor")}, "1": {"kernel": P(None, "data", None, ("fsdp", "tensor"))}, "2": {"kernel": P()}}}
    state = hf_io.load_hf_state(directory, abstract_with_shardings(abstract, specs, mesh), max_workers=max_workers)
    for i in range(3):
        loaded = state["convs"][str(i)]["kernel"]
        assert loaded.sharding.spec == specs["convs"][str(i)]["kernel"]
        np.testing.assert_array_equal(np.asarray(loaded), weights[f"convs.{i}.weight"].astype(np.float32).transpose(2, 3, 1, 0))
    hf_io.save_hf_state(state, tmp_path / "out", dtype=jnp.bfloat16)
    for key, value in hf_io.iter_hf_tensors(tmp_path / "out"):
        np.testing.assert_array_equal(value, weights[key])
