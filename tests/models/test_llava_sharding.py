"""LLaVA-1.5 on the fake 8-device mesh: sharded forwards equal the single-device forward; layouts fit real shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from balcap_jax.models.llava import config as llava_config
from balcap_jax.models.llava import params as llava_params
from balcap_jax.models.llava import processor
from balcap_jax.models.llava.model import LlavaForCausalLM
from balcap_jax.models.llava.sharding import LlavaSharding
from balcap_jax.parallel.mesh import make_mesh
from balcap_jax.parallel.sharding import named_leaves, shard_like

CONFIG = llava_config.tiny()  # 4 image tokens per 28-px image


@pytest.fixture(scope="module")
def model() -> LlavaForCausalLM:
    return LlavaForCausalLM(CONFIG, rngs=nnx.Rngs(0))


def _batch(rows: int) -> dict:
    rng = np.random.default_rng(0)
    img = CONFIG.image_token_id
    token_rows = []
    for r in range(rows):
        length = 24 - 2 * r
        ids = list(rng.integers(1, img - 1, size=length))
        ids[3 : 3 + CONFIG.image_seq_length] = [img] * CONFIG.image_seq_length
        token_rows.append(ids)
    pixels = rng.normal(size=(rows, 28, 28, 3)).astype(np.float32)
    return processor.make_batch(token_rows, pixels, CONFIG, pad_id=0)


def _forward(graphdef, state, batch):
    return nnx.merge(graphdef, state)(batch)


@pytest.fixture(scope="module")
def single_device(model):
    """(batch, logits) of the unsharded forward, the reference for every mesh."""
    graphdef, state = nnx.split(model)
    batch = jax.tree.map(jnp.asarray, _batch(8))
    with jax.default_matmul_precision("highest"):
        return batch, jax.jit(_forward, static_argnums=0)(graphdef, state, batch)


@pytest.fixture(scope="module")
def abstract_7b_state():
    """LLaVA-1.5-7B as ShapeDtypeStructs (bf16): nothing is allocated."""
    return nnx.state(llava_params.abstract_llava(llava_config.llava_1_5_7b(), param_dtype=jnp.bfloat16))


@pytest.mark.parametrize(
    "mesh_shape, layout",
    [((2, 2, 2), "training"), ((1, 8, 1), "training"), ((1, 2, 4), "sampling")],
)
def test_sharded_forward_equals_single_device(model, single_device, mesh_shape, layout, highest_precision):
    graphdef, state = nnx.split(model)
    batch, expected = single_device

    mesh = make_mesh(mesh_shape)
    sharding = getattr(LlavaSharding, layout)()
    target = sharding.abstract_params(state, mesh, on_indivisible="raise")
    sharded_state = shard_like(state, target)
    q_spec = sharded_state["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec
    # Stacked layers: a replicated layer axis, then each layer's own spec.
    assert q_spec == (P(None, "fsdp", "tensor") if layout == "training" else P(None, None, "tensor"))
    sharded_batch = sharding.shard_inputs(batch, mesh)
    assert sharded_batch["vision"]["pixel_values"].sharding.spec == P(("data", "fsdp"))
    with jax.set_mesh(mesh):
        got = jax.jit(_forward, static_argnums=0)(graphdef, sharded_state, sharded_batch)
    mask = np.asarray(batch["attention_mask"])
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(expected)[mask], atol=1e-5, rtol=0)


def test_training_and_sampling_layouts():
    state = nnx.state(llava_params.abstract_llava(CONFIG))
    training = dict(named_leaves(LlavaSharding.training().param_specs(state)))
    sampling = dict(named_leaves(LlavaSharding.sampling().param_specs(state)))
    q = "model.language_model.layers.self_attn.q_proj.kernel"  # stacks: [L, in, out], layer axis replicated
    down = "model.language_model.layers.mlp.down_proj.kernel"
    fc1 = "model.vision_tower.encoder.layers.mlp.fc1.kernel"
    assert (training[q], training[down], training[fc1]) == (P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp"),
                                                           P(None, "fsdp", "tensor"))
    assert (sampling[q], sampling[down]) == (P(None, None, "tensor"), P(None, "tensor", None))
    assert training["lm_head.kernel"] == P("fsdp", "tensor")
    assert all("fsdp" not in tuple(spec) for spec in sampling.values())


def test_llava_1_5_7b_instantiates_abstractly_with_the_published_parameter_count(abstract_7b_state):
    leaves = jax.tree.leaves(abstract_7b_state)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert sum(leaf.size for leaf in leaves) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf safetensors total
    shapes = dict(named_leaves(abstract_7b_state))
    assert shapes["model.vision_tower.embeddings.position_embedding.embedding"].shape == (577, 1024)
    assert shapes["model.multi_modal_projector.linear_1.kernel"].shape == (1024, 4096)
    assert shapes["lm_head.kernel"].shape == (4096, 32064)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1), (1, 1, 8)])
def test_layouts_divide_the_real_7b_shapes(abstract_7b_state, mesh_shape):
    """Every sharded dimension of LLaVA-1.5-7B divides on these meshes (no silent replication)."""
    mesh = make_mesh(mesh_shape)
    for layout in (LlavaSharding.training(), LlavaSharding.sampling()):
        target = layout.abstract_params(abstract_7b_state, mesh, on_indivisible="raise")
        leaves = dict(named_leaves(target))
        assert isinstance(leaves["lm_head.kernel"].sharding, NamedSharding)


def test_unknown_parameter_has_no_silent_default():
    state = {"model": {"new_head": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}}
    with pytest.raises(ValueError, match="new_head"):
        LlavaSharding.training().param_specs(state)


def test_load_from_hf_directory_straight_into_shards(model, tmp_path):
    llava_params.save_llava(model, tmp_path)
    mesh = make_mesh((2, 2, 2))
    loaded = llava_params.load_llava(tmp_path, mesh=mesh)
    kernel = loaded.model.language_model.layers.mlp.gate_proj.kernel[...]  # [L, D, F], every layer's gate_proj
    assert kernel.sharding == NamedSharding(mesh, P(None, "fsdp", "tensor"))
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (CONFIG.text.num_layers, 32, 64)
    for (name, a), (_, b) in zip(named_leaves(nnx.state(model)), named_leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_sharded_prefill_and_decode_with_sharded_cache_equal_single_device(model, highest_precision):
    """The sampler's path on the sampling layout: batch and KV cache over (data, fsdp), heads over tensor."""
    from balcap_jax.models.interface import KVCache, next_text_positions

    inputs = jax.tree.map(jnp.asarray, _batch(4))
    spec = model.cache_spec()
    cache = KVCache.zeros(num_layers=spec.num_layers, batch=4, max_len=32, num_kv_heads=spec.num_kv_heads,
                          head_dim=spec.head_dim, dtype=jnp.float32)  # fmt: skip
    tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]], jnp.int32).T  # [B=4, steps=2]
    graphdef, state = nnx.split(model)

    @jax.jit
    def generate(state, inputs, cache):
        model = nnx.merge(graphdef, state)
        hidden, cache = model.prefill(inputs, cache)
        logits = [model.logits(hidden[:, -1])]
        position = next_text_positions(inputs["positions"], inputs["attention_mask"])
        for step in range(tokens.shape[1]):
            hidden, cache = model.decode(tokens[:, step], position + step, cache)
            logits.append(model.logits(hidden))
        return jnp.stack(logits, 1), cache

    expected, _ = generate(state, inputs, cache)
    mesh = make_mesh((2, 2, 2))
    sharding = LlavaSharding.sampling()
    cache = KVCache(
        k=jax.device_put(cache.k, sharding.cache_sharding(mesh, cache.k.shape)),
        v=jax.device_put(cache.v, sharding.cache_sharding(mesh, cache.v.shape)),
        valid=jax.device_put(cache.valid, sharding.batch_sharding(mesh, cache.valid.shape)),
        index=cache.index,
    )
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), None, "tensor")
    with jax.set_mesh(mesh):
        got, out_cache = generate(sharding.shard_params(state, mesh), sharding.shard_inputs(inputs, mesh), cache)
    assert int(out_cache.index) == inputs["input_ids"].shape[1] + 2
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)
