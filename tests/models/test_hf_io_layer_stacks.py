"""hf_io with layer stacks: HF's per-layer keys load into [L, ...] leaves (sharded, layer axis replicated) and
export back to the same per-layer tensors, bit for bit, layer by layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from balcap_jax.models import hf_io
from balcap_jax.models.layer_stack import layer_stack_prefixes, stacked
from balcap_jax.models.layers import RMSNorm
from balcap_jax.parallel.mesh import make_mesh
from balcap_jax.parallel.sharding import abstract_with_shardings, named_leaves, specs_from_rules

LAYERS = 3


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(8, 12, rngs=rngs)
        self.norm = RMSNorm(12, eps=1e-6)


class Toy(nnx.Module):
    layer_stacks = ("blocks",)

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(16, 8, rngs=rngs)
        self.blocks = stacked(Block, LAYERS, rngs)


def hf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """The checkpoint HF would write for `Toy`: one tensor per layer, torch layouts."""
    rng = np.random.default_rng(seed)
    tensors = {"model.embed.weight": rng.standard_normal((16, 8)).astype(np.float32)}
    for i in range(LAYERS):
        tensors[f"model.blocks.{i}.proj.weight"] = rng.standard_normal((12, 8)).astype(np.float32)
        tensors[f"model.blocks.{i}.proj.bias"] = rng.standard_normal(12).astype(np.float32)
        tensors[f"model.blocks.{i}.norm.weight"] = rng.standard_normal(12).astype(np.float32)
    return tensors


def toy_mapping(module: nnx.Module) -> hf_io.ParamMapping:
    return hf_io.ParamMapping(prefix_renames=(("", "model."),)).with_stacked(layer_stack_prefixes(module))


def test_per_layer_names_and_keys():
    mapping = toy_mapping(nnx.eval_shape(lambda: Toy(nnx.Rngs(0))))
    assert mapping.stacked == ("blocks.",)
    assert mapping.layer_names("blocks.proj.kernel", (LAYERS, 8, 12)) == [
        "blocks.0.proj.kernel", "blocks.1.proj.kernel", "blocks.2.proj.kernel"]  # fmt: skip
    assert mapping.layer_names("embed.embedding", (16, 8)) is None
    assert mapping.hf_keys("blocks.norm.scale", (LAYERS, 12)) == [f"model.blocks.{i}.norm.weight" for i in range(3)]
    with pytest.raises(hf_io.HFWeightsError, match="no layer axis"):
        mapping.layer_names("blocks.step", ())


def test_load_into_a_sharded_stack_and_export_bit_identically(tmp_path):
    tensors = hf_tensors()
    (tmp_path / "in").mkdir()
    hf_io.write_safetensors(tmp_path / "in" / hf_io.SINGLE_FILE, tensors, {"format": "pt"})
    abstract = nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    mesh = make_mesh((2, 2, 2))
    rules = [(r"blocks\.proj\.kernel", P(None, "fsdp", "tensor")), (r"blocks\..*", P()), (r"embed\..*", P("fsdp"))]
    target = abstract_with_shardings(params, specs_from_rules(params, rules), mesh)
    loaded = hf_io.load_hf_state(tmp_path / "in", target, toy_mapping(abstract))

    kernel = dict(named_leaves(loaded))["blocks.proj.kernel"]
    assert kernel.shape == (LAYERS, 8, 12) and kernel.sharding == NamedSharding(mesh, P(None, "fsdp", "tensor"))
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(LAYERS, 4, 6)}
    for i in range(LAYERS):
        np.testing.assert_array_equal(np.asarray(kernel)[i], tensors[f"model.blocks.{i}.proj.weight"].T)

    model = nnx.merge(graphdef, loaded)
    files = hf_io.save_hf_state(nnx.state(model, nnx.Param), tmp_path / "out", toy_mapping(model),
                                max_shard_size=400)  # fmt: skip
    assert len(files) > 1
    exported = dict(hf_io.iter_hf_tensors(tmp_path / "out"))
    assert sorted(exported) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # Layer-major, as HF writes: all of block 0, then block 1, ... where the stack stands in pytree order.
    per_layer = [f"model.blocks.{i}.{leaf}" for i in range(LAYERS) for leaf in ("norm.weight", "proj.bias",
                                                                              "proj.weight")]  # fmt: skip
    assert hf_io.expected_hf_keys(nnx.state(model, nnx.Param), toy_mapping(model)) == [*per_layer,
                                                                                        "model.embed.weight"]


def test_a_missing_layer_is_named(tmp_path):
    tensors = hf_tensors()
    del tensors["model.blocks.1.proj.bias"]
    (tmp_path / "in").mkdir()
    hf_io.write_safetensors(tmp_path / "in" / hf_io.SINGLE_FILE, tensors, {"format": "pt"})
    abstract = nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))
    with pytest.raises(hf_io.HFWeightsError, match=r"1 missing key.*'model\.blocks\.1\.proj\.bias'.*blocks\.1\.proj"):
        hf_io.load_hf_state(tmp_path / "in", nnx.state(abstract, nnx.Param), toy_mapping(abstract))


def test_bf16_stack_exports_from_a_single_device_array(tmp_path):
    model = Toy(nnx.Rngs(3))
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param))
    hf_io.save_hf_state(params, tmp_path, toy_mapping(model))
    exported = dict(hf_io.iter_hf_tensors(tmp_path))
    kernel = np.asarray(model.blocks.proj.kernel[...].astype(jnp.bfloat16))
    for i in range(LAYERS):
        assert exported[f"model.blocks.{i}.proj.weight"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(exported[f"model.blocks.{i}.proj.weight"], kernel[i].T)
