"""Released shapes instantiate abstractly with the published parameter counts; sharding layouts cover every
parameter; a sharded forward on the fake 8-device mesh equals the single-device forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from balcap_jax.models.interface import KVCache
from balcap_jax.models.qwen2_5_vl import params
from balcap_jax.models.qwen2_5_vl.config import RELEASED_CONFIGS, Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL, make_inputs
from balcap_jax.models.qwen2_5_vl.sharding import QwenSharding, shard_inputs
from balcap_jax.parallel.mesh import make_mesh
from balcap_jax.parallel.sharding import named_leaves
from balcap_jax.tools import parity
from tests.models import qwen_fixtures as fx

# Parameter counts of the released checkpoints (the HF hub's safetensors totals).
PUBLISHED = {"Qwen2.5-VL-3B-Instruct": 3_754_622_976, "Qwen2.5-VL-7B-Instruct": 8_292_166_656}


@pytest.mark.slow  # nnx.eval_shape of a 36-layer model traces ~700 initialisers (~10 s each config)
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_released_configs_have_published_parameter_counts(name):
    config = Qwen2_5_VLConfig.from_hf(RELEASED_CONFIGS[name])
    abstract = params.abstract_model(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    leaves = named_leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for _, leaf in leaves)  # nothing allocated
    count = sum(int(np.prod(leaf.shape)) for _, leaf in leaves)
    assert abs(count - PUBLISHED[name]) <= 1e-3 * PUBLISHED[name], count
    assert count == PUBLISHED[name]

    # Both layouts place every parameter of the real shapes on a (1, 2, 4) mesh without replication fallbacks.
    mesh = make_mesh((1, 2, 4))
    params_state = nnx.state(abstract, nnx.Param)
    for layout in (QwenSharding.training(), QwenSharding.sampling()):
        placed = layout.abstract_params(params_state, mesh, on_indivisible="raise")
        assert len(named_leaves(placed)) == len(leaves)
    spec = dict(named_leaves(QwenSharding.training().param_specs(params_state)))
    # Stacked decoder layers: a replicated layer axis in front of each layer's own spec.
    assert spec["model.language_model.layers.self_attn.q_proj.kernel"] == P(None, "fsdp", "tensor")
    assert spec["model.language_model.layers.mlp.down_proj.kernel"] == P(None, "tensor", "fsdp")
    sampling = dict(named_leaves(QwenSharding.sampling().param_specs(params_state)))
    assert all("fsdp" not in str(s) for s in sampling.values())


def test_unknown_parameter_has_no_silent_default():
    with pytest.raises(ValueError, match="no sharding rule"):
        QwenSharding.training().param_spec("model.language_model.new_thing.kernel", jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="layout"):
        QwenSharding.layout("inference")


@pytest.fixture(scope="module")
def reference():
    """Tiny model (random init), a batch of 4 rows with 4 images, and the single-device logits / decode step."""
    config = Qwen2_5_VLConfig.from_hf(transformers.Qwen2_5_VLConfig(**fx.tiny_qwen_config_dict()).to_dict())
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(0))
    one = parity.build_batch(config, seed=5, prompt_tokens=48, image_grids=((1, 8, 12), (1, 4, 4)))
    inputs = make_inputs(config, np.tile(one.input_ids, (2, 1)), np.tile(one.attention_mask, (2, 1)),
                         np.tile(one.pixel_values, (2, 1)), np.tile(one.image_grid_thw, (2, 1)))  # fmt: skip
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        expected = {layout: np.asarray(_STEPS[layout](graphdef)(state, inputs)) for layout in _STEPS}
    return graphdef, state, inputs, expected


def _training_step(graphdef):
    """The training forward: full-sequence logits."""
    return jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(inputs))


def _sampling_step(graphdef):
    """Prefill into a KV cache, then one decode step: the logits of the step."""

    @jax.jit
    def step(state, inputs):
        model = nnx.merge(graphdef, state)
        spec = model.cache_spec()
        batch, length = inputs["input_ids"].shape
        cache = KVCache.zeros(num_layers=spec.num_layers, batch=batch, max_len=length + 1,
                              num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=jnp.float32)
        _, cache = model.prefill(inputs, cache)
        hidden, _ = model.decode(inputs["input_ids"][:, -1], jnp.full((batch,), 500, jnp.int32), cache)
        return model.logits(hidden)

    return step


_STEPS = {"training": _training_step, "sampling": _sampling_step}


@pytest.mark.parametrize(
    "mesh_shape, layout",
    [((2, 2, 2), "training"), ((1, 8, 1), "training"), ((1, 1, 8), "sampling"), ((2, 2, 2), "sampling")],
)
def test_sharded_forward_equals_single_device(reference, mesh_shape, layout):
    graphdef, state, inputs, expected = reference
    mesh = make_mesh(mesh_shape)
    sharding = QwenSharding.layout(layout)
    sharded = sharding.shard_params(nnx.state(nnx.merge(graphdef, state), nnx.Param), mesh)
    q_kernel = dict(named_leaves(sharded))["model.language_model.layers.self_attn.q_proj.kernel"]
    assert len(q_kernel.sharding.device_set) == 8 and not q_kernel.sharding.is_fully_replicated
    full_state = _with_params(graphdef, state, sharded)
    # Under the mesh context the decoder also pins its activations to the batch axes (layers.constrain_batch).
    with jax.default_matmul_precision("highest"), jax.set_mesh(mesh):
        out = np.asarray(_STEPS[layout](graphdef)(full_state, shard_inputs(inputs, mesh, sharding)))
    np.testing.assert_allclose(out, expected[layout], atol=1e-5)


def _with_params(graphdef, state, params_state):
    model = nnx.merge(graphdef, state)
    nnx.update(model, params_state)
    return nnx.state(model)
