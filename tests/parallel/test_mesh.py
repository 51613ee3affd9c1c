"""Mesh construction, multi-host settings validation and the sharding helpers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from balcap_jax import parallel
from balcap_jax.parallel import sharding as sh


@pytest.mark.parametrize(
    "shape, expected",
    [((2, 2, 2), (2, 2, 2)), ((1, 8, 1), (1, 8, 1)), ((1, -1, 2), (1, 4, 2)), ((-1, 1, 1), (8, 1, 1))],
)
def test_make_mesh_shapes(shape, expected):
    mesh = parallel.make_mesh(shape)
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.size == jax.device_count()
    assert parallel.batch_size_divisor(mesh) == expected[0] * expected[1]


def test_make_mesh_on_a_subset_of_devices():
    mesh = parallel.make_mesh((1, -1, 2), devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert set(mesh.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 2, 1), r"2\*2\*1 = 4, but 8 devices.*multiply to the device count"),
        ((-1, -1, 1), r"at most one axis may be -1"),
        ((3, -1, 1), r"multiply to 3, which does not divide the 8"),
        ((1, 0, 8), r"mesh.fsdp=0 is invalid"),
    ],
)
def test_bad_mesh_shapes_name_the_problem(shape, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(shape)


def test_mesh_shape_from_config():
    config = ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 2})
    assert parallel.MeshShape.from_config(config).resolve(8) == (2, 2, 2)
    assert parallel.MeshShape.from_config({"tensor": 4}).resolve(8) == (1, 2, 4)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['model'\]"):
        parallel.MeshShape.from_config({"model": 2})


def test_distributed_settings():
    assert not parallel.initialize_distributed(parallel.DistributedConfig())
    assert not parallel.initialize_distributed(parallel.DistributedConfig.from_config({"num_processes": 1}))
    with pytest.raises(ValueError, match=r"process_id=2 is invalid.*num_processes=2"):
        parallel.initialize_distributed(parallel.DistributedConfig(num_processes=2, process_id=2))
    with pytest.raises(ValueError, match=r"coordinator_address=None.*host:port"):
        parallel.initialize_distributed(parallel.DistributedConfig(num_processes=2, process_id=0))


def test_logical_axes_map_to_specs():
    assert parallel.logical_to_spec(("embed", "mlp"), parallel.TRAINING_RULES) == P("fsdp", "tensor")
    assert parallel.logical_to_spec(("embed", "mlp"), parallel.SAMPLING_RULES) == P(None, "tensor")
    assert parallel.logical_to_spec(("batch", None), parallel.TRAINING_RULES) == P(("data", "fsdp"), None)
    # an axis already used by an earlier dimension is not used twice
    assert parallel.logical_to_spec(("heads", "mlp"), parallel.TRAINING_RULES) == P("tensor", None)
    tree = {"wq": ("embed", "heads", "head_dim"), "norm": (None,)}
    assert parallel.specs_from_logical(tree, parallel.TRAINING_RULES) == {
        "wq": P("fsdp", "tensor", None),
        "norm": P(None),
    }


class TwoLayer(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(16, 24, rngs=rngs) for _ in range(2)])
        self.norm = nnx.RMSNorm(24, rngs=rngs)


def test_specs_from_rules_and_abstract_with_shardings():
    abstract = nnx.state(nnx.eval_shape(lambda: TwoLayer(nnx.Rngs(0))))
    rules = [(r"layers\.\d+\.kernel", P("fsdp", "tensor")), (r".*bias", P("tensor"))]
    with pytest.raises(ValueError, match=r"no sharding rule matches parameter 'norm.scale'"):
        parallel.specs_from_rules(abstract, rules)
    specs = parallel.specs_from_rules(abstract, rules, default=P())
    mesh = parallel.make_mesh((2, 2, 2))
    target = parallel.abstract_with_shardings(abstract, specs, mesh)
    leaves = dict(sh.named_leaves(target))
    assert leaves["layers.1.kernel"].sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    assert leaves["norm.scale"].sharding == NamedSharding(mesh, P())

    # materialise directly sharded, as a trainer would with jit(out_shardings=...)
    model = nnx.eval_shape(lambda: TwoLayer(nnx.Rngs(0)))
    graphdef, _ = nnx.split(model)
    state = jax.jit(lambda: nnx.state(TwoLayer(nnx.Rngs(0))), out_shardings=sh.shardings_of(target))()
    kernel = dict(sh.named_leaves(state))["layers.0.kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor") and kernel.addressable_shards[0].data.shape == (8, 12)
    assert nnx.merge(graphdef, state) is not None
    assert "layers.0.kernel" in sh.describe(target)


def test_fit_spec_checks_divisibility():
    mesh = parallel.make_mesh((1, 4, 2))
    with pytest.raises(ValueError, match=r"w: dimension 0 of shape \(6, 8\) has size 6, not divisible by the 4"):
        parallel.fit_spec("w", (6, 8), P("fsdp", "tensor"), mesh)
    assert parallel.fit_spec("w", (6, 8), P("fsdp", "tensor"), mesh, on_indivisible="replicate") == P(None, "tensor")
    with pytest.raises(ValueError, match=r"mesh axis 'model' does not exist"):
        parallel.fit_spec("w", (8,), P("model"), mesh)
    with pytest.raises(ValueError, match=r"has 2 entries but the array has shape \(8,\)"):
        parallel.fit_spec("w", (8,), P("fsdp", None), mesh)


def test_batch_sharding_splits_over_data_and_fsdp():
    mesh = parallel.make_mesh((2, 2, 2))
    batch = jax.device_put(jnp.arange(16 * 3).reshape(16, 3), parallel.batch_sharding(mesh, 2))
    assert {s.data.shape for s in batch.addressable_shards} == {(4, 3)}
    np.testing.assert_array_equal(np.asarray(batch), np.arange(48).reshape(16, 3))
