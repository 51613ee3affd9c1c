"""The rollout copy of the weights (trainer/rollout_weights.py): bf16, tensor-parallel over the configured axes
on the sampling mesh, KV heads never split finer than the model has them, and greedy rollouts in that layout
equal rollouts in the training layout without decode all-gathering a whole weight or the KV cache."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from balcap_jax.models import registry
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL, make_inputs
from balcap_jax.parallel.mesh import MeshShape, make_mesh, sampling_mesh
from balcap_jax.parallel.sharding import dividing_axes, named_leaves
from balcap_jax.sampling import Greedy, Sampler, SamplerConfig
from balcap_jax.tools import parity
from balcap_jax.trainer import rollout_weights
from tests.models import qwen_fixtures as fx

QWEN = registry.get("qwen2_5_vl")
LAYERS = "model.language_model.layers."


def tiny_qwen(*, heads: int, kv_heads: int, hidden: int = 128) -> Qwen2_5_VLConfig:
    config = fx.tiny_qwen_config_dict()
    config["text_config"].update(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=hidden)
    config["vision_config"]["out_hidden_size"] = hidden
    return Qwen2_5_VLConfig.from_hf(config)


def training_params(config: Qwen2_5_VLConfig, mesh, *, dtype=jnp.bfloat16):
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(0), dtype=dtype)
    return model, QWEN.sharding("training").shard_params(nnx.state(model, nnx.Param), mesh)


# ---------------------------------------------------------------------------------------------------------------
# Planning


def test_dividing_axes_takes_the_largest_sub_product_that_divides():
    mesh = make_mesh((1, 4, 2))
    assert dividing_axes(8, ("fsdp", "tensor"), mesh) == ("fsdp", "tensor")
    assert dividing_axes(28, ("fsdp", "tensor"), mesh) == ("fsdp",)  # 4 | 28, 8 does not
    assert dividing_axes(2, ("fsdp", "tensor"), mesh) == ("tensor",)
    assert dividing_axes(3, ("fsdp", "tensor"), mesh) == ()  # nothing divides: replicated
    assert dividing_axes(8, ("fsdp", "tensor"), mesh, prefix=("tensor",)) == ("tensor", "fsdp")
    assert dividing_axes(4, ("data", "fsdp"), mesh) == ("fsdp",)  # size-1 axes split nothing
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        dividing_axes(8, ("model",), mesh)


def test_sampling_mesh_renames_the_tensor_parallel_axes_and_keeps_device_order():
    mesh = make_mesh((1, 4, 2))
    target = sampling_mesh(mesh, ("fsdp", "tensor"))
    assert dict(target.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "fsdp_tp": 4, "tensor_tp": 2}
    assert [d.id for d in target.devices.flat] == [d.id for d in mesh.devices.flat]
    only_tensor = sampling_mesh(mesh, ("tensor",))
    assert dict(only_tensor.shape) == {"data": 1, "fsdp": 4, "tensor": 1, "tensor_tp": 2}


def test_config_key_is_read_and_bad_axes_name_the_field():
    config = ml_collections.ConfigDict(dict(mesh=dict(data=1, fsdp=-1, tensor=1), model=dict(dtype="bfloat16")))
    assert rollout_weights.sampling_tensor_axes(config) == ("fsdp", "tensor")  # the default
    config.mesh.sampling_tensor_axes = ("tensor",)
    assert rollout_weights.sampling_tensor_axes(config) == ("tensor",)
    assert MeshShape.from_config(config.mesh) == MeshShape(1, -1, 1)  # a layout field, not an axis size
    config.mesh.sampling_tensor_axes = ("fsdp", "model")
    with pytest.raises(ValueError, match=r"config\.mesh\.sampling_tensor_axes"):
        rollout_weights.sampling_tensor_axes(config)
    assert rollout_weights.rollout_dtype(config) == jnp.bfloat16
    config.model.dtype = "float32"
    assert rollout_weights.rollout_dtype(config) is None  # fp32 recipes keep fp32 rollouts


# ---------------------------------------------------------------------------------------------------------------
# The copy


def test_rollout_copy_is_bf16_and_split_over_fsdp_and_tensor():
    mesh = make_mesh((1, 4, 2))
    config = tiny_qwen(heads=8, kv_heads=8)
    _, params = training_params(config, mesh)
    weights = rollout_weights.build(QWEN, config, params, mesh, tensor_axes=("fsdp", "tensor"),
                                    dtype=jnp.bfloat16)
    assert weights.cache_heads == ("fsdp_tp", "tensor_tp")
    copy = dict(named_leaves(weights(params)))
    layers, hidden, heads_dim = config.text.num_layers, 128, 8 * config.text.head_dim
    shard = lambda name: copy[name].sharding.shard_shape(copy[name].shape)  # noqa: E731
    for proj in ("q", "k", "v"):
        assert shard(f"{LAYERS}self_attn.{proj}_proj.kernel") == (layers, hidden, heads_dim // 8)
        assert copy[f"{LAYERS}self_attn.{proj}_proj.kernel"].dtype == jnp.bfloat16
    assert shard(f"{LAYERS}self_attn.o_proj.kernel") == (layers, heads_dim // 8, hidden)
    assert shard(f"{LAYERS}mlp.gate_proj.kernel") == (layers, hidden, 128 // 8)
    assert shard(f"{LAYERS}mlp.down_proj.kernel") == (layers, 128 // 8, hidden)
    assert shard("lm_head.kernel") == (hidden, fx.TINY_VOCAB // 8)
    assert shard("model.language_model.embed_tokens.embedding") == (fx.TINY_VOCAB // 8, hidden)
    # Norm scales and biases enter arithmetic in their own dtype: kept fp32 (and tiny).
    assert copy[f"{LAYERS}input_layernorm.scale"].dtype == jnp.float32
    assert copy[f"{LAYERS}self_attn.q_proj.bias"].dtype == jnp.float32
    assert all(leaf.sharding.mesh == weights.mesh for leaf in copy.values())
    # One program: the jit the loop calls as for_sampling.
    assert weights.program.lower(params).as_text().count("func.func public @main") == 1


def test_kv_heads_are_never_split_finer_than_the_model_has_them():
    # 4 q / 2 KV heads on fsdp=4 x tensor=2: KV heads 2-way (tensor), q heads on the same axis (4 does not take
    # 8), MLP and vocabulary 8-way.
    mesh = make_mesh((1, 4, 2))
    config = tiny_qwen(heads=4, kv_heads=2, hidden=64)
    _, params = training_params(config, mesh)
    weights = rollout_weights.build(QWEN, config, params, mesh, tensor_axes=("fsdp", "tensor"), dtype=None)
    assert weights.plan.kv_heads == ("tensor_tp",) and weights.plan.heads == ("tensor_tp",)
    assert weights.plan.mlp == ("fsdp_tp", "tensor_tp")
    copy = dict(named_leaves(weights(params)))
    k = copy[f"{LAYERS}self_attn.k_proj.kernel"]
    assert k.sharding.shard_shape(k.shape)[-1] == config.text.head_dim  # one whole KV head per device
    assert k.dtype == jnp.float32  # dtype=None keeps the params' dtype
    # On fsdp=8 nothing divides 2 KV heads or 4 q heads: attention is replicated, the MLP still split 8-way, and
    # the KV cache splits its rows over the batch axes instead.
    mesh = make_mesh((1, 8, 1))
    _, params = training_params(config, mesh)
    weights = rollout_weights.build(QWEN, config, params, mesh, tensor_axes=("fsdp", "tensor"), dtype=None)
    assert weights.plan.kv_heads == () and weights.plan.heads == () and weights.plan.mlp == ("fsdp_tp",)
    copy = dict(named_leaves(weights(params)))
    assert copy[f"{LAYERS}self_attn.k_proj.kernel"].sharding.is_fully_replicated
    assert not copy[f"{LAYERS}mlp.up_proj.kernel"].sharding.is_fully_replicated
    # The KV cache then splits its rows over the tensor-parallel axes its heads could not take: never replicated.
    assert weights.cache_rows == ("fsdp_tp",)
    layout = Sampler(nnx.graphdef(nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))), mesh=weights.mesh,
                     cache_heads=weights.cache_heads, cache_rows=weights.cache_rows).layout
    k_spec = layout.cache_sharding(5, 1, 3).spec
    assert k_spec == jax.sharding.PartitionSpec(None, ("data", "fsdp", "fsdp_tp"), None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# Rollouts in the new layout


def _gathered_shapes(hlo: str) -> set[tuple[int, ...]]:
    shapes = set()
    for line in hlo.splitlines():
        match = re.search(r"= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", line)
        if match:
            shapes.add(tuple(int(d) for d in match.group(1).split(",") if d))
    return shapes


@pytest.mark.slow  # two prefill/decode compiles on 8 fake devices (~1 min on the loaded 2-core machine)
def test_greedy_rollouts_equal_the_training_layout_and_decode_gathers_no_weight(highest_precision):
    mesh = make_mesh((1, 4, 2))
    config = tiny_qwen(heads=8, kv_heads=8)
    model, params = training_params(config, mesh, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    weights = rollout_weights.build(QWEN, config, params, mesh, tensor_axes=("fsdp", "tensor"), dtype=None)
    batch = parity.build_batch(config, seed=4, prompt_tokens=40, image_grids=((1, 8, 12), (1, 4, 4)))
    prompts = make_inputs(config, np.repeat(batch.input_ids, 2, 0), np.repeat(batch.attention_mask, 2, 0),
                          np.tile(batch.pixel_values, (2, 1)), np.tile(batch.image_grid_thw, (2, 1)))
    sampler_config = SamplerConfig(max_new_tokens=6, eos_ids=(), pad_id=0, prompt_buckets=(48, 96), group_size=2,
                                   strategy=Greedy(), cache_dtype="float32")

    def with_params(p):
        merged = nnx.merge(graphdef, state)
        nnx.update(merged, p)
        return nnx.state(merged)

    key = jax.random.key(0)
    with jax.set_mesh(mesh):  # the loop's context; the sampler enters its own mesh
        training = Sampler(graphdef, mesh=mesh)(with_params(params), prompts, sampler_config, key)
        sampler = Sampler(graphdef, mesh=weights.mesh, cache_heads=weights.cache_heads)
        rollout_state = with_params(weights(params))
        rollout = sampler(rollout_state, prompts, sampler_config, key)
        np.testing.assert_array_equal(np.asarray(rollout.tokens), np.asarray(training.tokens))

        start = sampler.prefill(rollout_state, sampler.prepare_prompts(prompts, sampler_config), sampler_config)
        assert start.cache.k.sharding.spec[3] == ("fsdp_tp", "tensor_tp")  # the cache follows k/v_proj
        key = jax.device_put(key, jax.sharding.NamedSharding(weights.mesh, jax.sharding.PartitionSpec()))
        with sampler.mesh_context():
            compiled = sampler._decode.compiled_variant(
                rollout_state, start.cache, start.logits, start.start_positions, key, graphdef=graphdef,
                config=sampler_config, layout=sampler.layout)
    gathered = _gathered_shapes(compiled.as_text())
    whole = {tuple(leaf.shape[1:]) for name, leaf in named_leaves(rollout_state) if name.startswith(LAYERS)}
    cache = tuple(start.cache.k.shape)
    assert not gathered & whole, f"decode all-gathers whole weights: {gathered & whole}"
    assert cache[1:] not in gathered and cache not in gathered, "decode all-gathers the KV cache"
