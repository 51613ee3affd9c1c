"""Layer stacks: one [L, ...] parameter per kind, one scan per stack, so the program does not grow with depth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

from balcap_jax.models.interface import KVCache
from balcap_jax.models.layer_stack import layer_at, layer_stack_prefixes, leading, scan_layers, stacked
from balcap_jax.models.attention import SegmentMask
from balcap_jax.models.llava import config as llava_config
from balcap_jax.models.llava import params as llava_params
from balcap_jax.models.llava.sharding import LlavaSharding
from balcap_jax.models.qwen2_5_vl import params as qwen_params
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL, make_inputs
from balcap_jax.models.qwen2_5_vl.sharding import QwenSharding
from balcap_jax.models.qwen2_5_vl.text import DecoderConfig, DecoderLayer
from balcap_jax.models.qwen2_5_vl.vision import VisionConfig
from balcap_jax.parallel.sharding import named_leaves

DECODER = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=8, rope_theta=10000.0)  # fmt: skip


def tiny_qwen(depth: int) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL with `depth` decoder layers and `depth` vision blocks (the last one full attention)."""
    text = DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=depth, num_heads=4,
                         num_kv_heads=2, head_dim=16, rope_theta=10000.0, mrope_section=(2, 3, 3))  # fmt: skip
    vision = VisionConfig(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=(depth - 1,))  # fmt: skip
    return Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=500, video_token_id=501,
                            vision_start_token_id=502, vision_end_token_id=503)  # fmt: skip


def image_batch(config: Qwen2_5_VLConfig) -> dict:
    """One row: an 8 x 8-patch image (16 image tokens) then 24 text tokens."""
    ids = np.concatenate([[502], np.full(16, 500), [503], np.arange(24) % 480])[None]
    pixels = np.random.default_rng(0).standard_normal((64, config.vision.patch_dim)).astype(np.float32)
    batch = make_inputs(config, ids, np.ones_like(ids, bool), pixels, np.array([[1, 8, 8]]))
    return jax.tree.map(jnp.asarray, batch)


def _sub_jaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def count_equations(jaxpr, primitive: str | None = None) -> int:
    """Equations of `jaxpr` and every nested jaxpr (scan / cond / remat bodies), optionally of one primitive."""
    total = 0
    for eqn in jaxpr.eqns:
        total += primitive is None or eqn.primitive.name == primitive
        total += sum(count_equations(sub, primitive) for sub in _sub_jaxprs(eqn.params))
    return total


def test_stacked_layers_are_initialised_independently_and_scan_like_a_loop(highest_precision):
    layers = stacked(lambda rngs: DecoderLayer(DECODER, rngs=rngs), 3, nnx.Rngs(0))
    q = layers.self_attn.q_proj.kernel[...]
    assert q.shape == (3, 32, 32) and layers.input_layernorm.scale[...].shape == (3, 32)
    assert not np.array_equal(q[0], q[1]) and not np.array_equal(q[1], q[2])

    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    cos, sin = jnp.ones((2, 5, 8)), jnp.zeros((2, 5, 8))
    mask = SegmentMask.from_padding(jnp.ones((2, 5), bool))

    @jax.jit
    def scanned(state):
        step = lambda layer, h, _: (layer(h, cos, sin, mask)[0], None)  # noqa: E731
        return scan_layers(nnx.merge(graphdef, state), step, x, jnp.arange(3))[0]

    @jax.jit
    def looped(state):
        module, h = nnx.merge(graphdef, state), x
        for i in range(3):
            h = layer_at(module, i)(h, cos, sin, mask)[0]
        return h

    graphdef, state = nnx.split(layers)
    # The same maths; XLA:CPU compiles a loop body and straight-line code into differently fused kernels, so
    # fp32 results may differ in the last bits (the bf16 HF parity tests stay bit-exact).
    np.testing.assert_allclose(np.asarray(scanned(state)), np.asarray(looped(state)), rtol=1e-5, atol=1e-5)
    assert leading(layers, 3) is layers and leading(layers, 2).mlp.up_proj.kernel[...].shape == (2, 32, 48)
    with pytest.raises(IndexError, match="outside a stack of 3"):
        layer_at(layers, 3)
    with pytest.raises(ValueError, match="at least one layer"):
        stacked(lambda rngs: DecoderLayer(DECODER, rngs=rngs), 0, nnx.Rngs(0))


def test_the_compiled_program_does_not_grow_with_depth():
    """Forward + backward with an image, and prefill + decode: the same program at depth 2 and depth 6 (one
    scanned decoder layer and one scanned vision block of each kind), where unrolled layers would triple it."""

    def programs(depth: int) -> tuple[int, int]:
        config = tiny_qwen(depth)
        graphdef, params, rest = nnx.split(Qwen2_5_VL(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
        batch = image_batch(config)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest).hidden_states(batch) ** 2)  # noqa: E731

        def sample(p):
            model = nnx.merge(graphdef, p, rest)
            cache = KVCache.zeros(num_layers=depth, batch=1, max_len=48, num_kv_heads=2, head_dim=16)
            _, cache = model.prefill(batch, cache)
            return model.decode(jnp.array([7]), jnp.array([40]), cache)

        return (count_equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr),
                count_equations(jax.make_jaxpr(sample)(params).jaxpr))  # fmt: skip

    shallow, deep = programs(2), programs(6)
    assert shallow == deep, (shallow, deep)


def test_windowed_and_full_blocks_share_one_scan_with_one_cond():
    config = tiny_qwen(4)
    graphdef, state = nnx.split(Qwen2_5_VL(config, rngs=nnx.Rngs(0)).model.visual)
    vision = image_batch(config)["vision"]
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(vision))(state).jaxpr
    assert (count_equations(jaxpr, "scan"), count_equations(jaxpr, "cond")) == (1, 1)


def test_stack_prefixes_name_every_stack():
    qwen = qwen_params.abstract_model(tiny_qwen(2))
    assert layer_stack_prefixes(qwen) == ("model.language_model.layers.", "model.visual.blocks.")
    assert layer_stack_prefixes(qwen.model.language_model) == ("layers.",)
    llava = llava_params.abstract_llava(llava_config.tiny())
    assert layer_stack_prefixes(llava) == ("model.language_model.layers.", "model.vision_tower.encoder.layers.")
    shapes = dict(named_leaves(nnx.state(qwen, nnx.Param)))
    assert shapes["model.language_model.layers.self_attn.q_proj.kernel"].shape == (2, 64, 64)
    assert shapes["model.visual.blocks.attn.qkv.kernel"].shape == (2, 32, 96)


@pytest.mark.parametrize("family", ["qwen", "llava"])
@pytest.mark.parametrize("layout", ["training", "sampling"])
def test_the_layer_axis_is_never_sharded(family, layout):
    if family == "qwen":
        abstract, sharding = qwen_params.abstract_model(tiny_qwen(2)), QwenSharding.layout(layout)
    else:
        abstract, sharding = llava_params.abstract_llava(llava_config.tiny()), LlavaSharding.layout(layout)
    params = nnx.state(abstract, nnx.Param)
    prefixes = layer_stack_prefixes(abstract)
    specs = dict(named_leaves(sharding.param_specs(params)))
    stacked_specs = {name: spec for name, spec in specs.items() if name.startswith(prefixes)}
    assert len(stacked_specs) > 10
    assert all(len(spec) == 0 or spec[0] is None for spec in stacked_specs.values()), stacked_specs
    # Every other dimension keeps the per-layer rule: some stacked matrices are sharded behind the layer axis.
    assert any(any(axis is not None for axis in spec[1:]) for spec in stacked_specs.values())


def test_a_released_depth_builds_abstractly_in_one_vmapped_initialiser():
    """eval_shape of the 7B shapes traces each layer's initialisers once, not 28 + 32 times."""
    config = dataclasses.replace(tiny_qwen(2), text=dataclasses.replace(tiny_qwen(2).text, num_layers=28),
                                 vision=dataclasses.replace(tiny_qwen(2).vision, depth=32,
                                                            fullatt_block_indexes=(7, 15, 23, 31)))  # fmt: skip
    jaxpr = jax.make_jaxpr(lambda: nnx.state(Qwen2_5_VL(config, rngs=nnx.Rngs(0)), nnx.Param))().jaxpr
    shallow = jax.make_jaxpr(lambda: nnx.state(Qwen2_5_VL(tiny_qwen(2), rngs=nnx.Rngs(0)), nnx.Param))().jaxpr
    assert count_equations(jaxpr) == count_equations(shallow)
    leaves = jax.eval_shape(lambda: nnx.state(Qwen2_5_VL(config, rngs=nnx.Rngs(0)), nnx.Param))
    assert dict(named_leaves(leaves))["model.visual.blocks.mlp.down_proj.kernel"].shape == (32, 64, 32)
