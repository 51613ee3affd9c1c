"""Images laid out by block of rows: the plan, the per-block scatter, and the work each device does on a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from balcap_jax.models import image_shards
from balcap_jax.models.image_shards import IMAGES_PER_SHARD, plan_row_shards, scatter_image_embeddings
from balcap_jax.models.llava import config as llava_config
from balcap_jax.models.llava.model import LlavaForCausalLM
from balcap_jax.models.llava.processor import sharded_vision_inputs
from balcap_jax.models.qwen2_5_vl import vision_host
from balcap_jax.models.qwen2_5_vl.vision import VisionConfig, VisionTower
from balcap_jax.parallel.mesh import MeshShape, make_mesh


def test_the_plan_cuts_prompt_major_rows_into_equal_blocks():
    plan = plan_row_shards(num_prompts=3, rows_per_prompt=2, shards=2)  # rows p0 p0 p1 | p1 p2 p2
    assert [(s.first, s.stop, s.rows.tolist()) for s in plan] == [(0, 2, [2, 1]), (1, 3, [1, 2])]
    plan = plan_row_shards(num_prompts=4, rows_per_prompt=2, shards=2)  # whole groups: nothing straddles
    assert [(s.first, s.stop, s.rows.tolist()) for s in plan] == [(0, 2, [2, 2]), (2, 4, [2, 2])]
    plan = plan_row_shards(num_prompts=1, rows_per_prompt=4, shards=4)  # one row per block, all of one prompt
    assert [(s.first, s.stop, s.rows.tolist()) for s in plan] == [(0, 1, [1])] * 4
    with pytest.raises(ValueError, match="do not split into 4 equal vision shards"):
        plan_row_shards(num_prompts=3, rows_per_prompt=1, shards=4)


def test_per_block_scatter_equals_the_flat_scatter_of_the_blocks_concatenated():
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(4, 5, 3)).astype(np.float32)
    is_image = rng.random((4, 5)) < 0.5
    # Block k (rows 2k, 2k + 1) holds exactly its own placeholders' embeddings, then padding rows.
    counts = is_image.reshape(2, -1).sum(1)
    blocks = np.zeros((2, 10, 3), np.float32)
    flat = rng.normal(size=(int(counts.sum()), 3)).astype(np.float32)
    blocks[0, : counts[0]], blocks[1, : counts[1]] = flat[: counts[0]], flat[counts[0]:]
    per_block = scatter_image_embeddings(jnp.asarray(embeds), jnp.asarray(is_image), jnp.asarray(blocks))
    whole = scatter_image_embeddings(jnp.asarray(embeds), jnp.asarray(is_image), jnp.asarray(flat))
    np.testing.assert_array_equal(np.asarray(per_block), np.asarray(whole))
    np.testing.assert_array_equal(np.asarray(whole)[~is_image], embeds[~is_image])
    np.testing.assert_array_equal(np.asarray(whole)[is_image], flat)  # row-major reading order
    with pytest.raises(ValueError, match="width"):
        scatter_image_embeddings(jnp.asarray(embeds), jnp.asarray(is_image), jnp.zeros((2, 10, 4)))
    with pytest.raises(ValueError, match="do not split into the 3 shards"):
        scatter_image_embeddings(jnp.asarray(embeds), jnp.asarray(is_image), jnp.zeros((3, 10, 3)))


# -- the work each device does ------------------------------------------------------------------------------

QWEN_VISION = VisionConfig.from_hf(dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                                        out_hidden_size=24, fullatt_block_indexes=[1]))
# Eight images of six sizes, one per device block: 64 to 240 patches each.
GRIDS = np.array([[1, 8, 8], [1, 16, 8], [1, 8, 24], [1, 20, 12], [1, 8, 8], [1, 12, 12], [1, 16, 16],
                  [1, 8, 16]])


def _mesh():
    return make_mesh(MeshShape(1, 8, 1))


def _per_device_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_each_device_encodes_only_its_rows_images_with_qwen():
    """8 prompts x G=2 rows on an 8-way FSDP mesh: every device holds one prompt's patches and encodes those."""
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(int(np.prod(GRIDS, 1).sum()), QWEN_VISION.patch_dim)).astype(np.float32)
    blocks = vision_host.prepare_sharded_vision_inputs(pixels, GRIDS, QWEN_VISION,
                                                       plan=plan_row_shards(8, 2, 8))
    flat = vision_host.prepare_vision_inputs(pixels, GRIDS, QWEN_VISION, repeats=2)
    mesh = _mesh()
    split = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    placed = jax.device_put(blocks, split)
    for shard in placed["patches"].addressable_shards:  # device k holds block k: image k's patches, once
        k = shard.index[0].start
        valid_patches = int((np.asarray(shard.data)[0] != 0).any(-1).sum())
        assert valid_patches == int(np.prod(GRIDS[k])), k
    tower = VisionTower(QWEN_VISION, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(tower)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    encode = lambda s, v: nnx.merge(graphdef, s)(v)  # noqa: E731
    with jax.set_mesh(mesh):
        out = jax.jit(encode)(state, placed)
        per_block = _per_device_flops(encode, state, placed)
        replicated = _per_device_flops(encode, state, jax.device_put(flat, NamedSharding(mesh, PartitionSpec())))
    assert {s.data.shape[0] for s in out.addressable_shards} == {1}  # embeddings stay on their device
    # Per device: one block (the largest image's bucket, 256 patches) vs all 8 images (1536-patch bucket).
    print(f"qwen tower flops per device: {per_block:.3g} per block vs {replicated:.3g} flat")
    assert per_block < replicated / 4, (per_block, replicated)
    unplaced = np.asarray(jax.jit(encode)(state, jax.tree.map(jnp.asarray, blocks)))
    np.testing.assert_allclose(np.asarray(out), unplaced, atol=1e-5)
    assert blocks[IMAGES_PER_SHARD].tolist() == [1] * 8


def test_llava_encodes_each_distinct_image_once_and_on_its_own_device():
    config = llava_config.tiny()
    model = LlavaForCausalLM(config, rngs=nnx.Rngs(0))
    prompts, group, L = 8, 4, config.image_seq_length
    size = config.vision.image_size
    crops = np.random.default_rng(2).normal(size=(prompts, size, size, 3)).astype(np.float32)
    blocks = sharded_vision_inputs(crops, plan=plan_row_shards(prompts, group, 8))
    assert blocks["pixel_values"].shape[:2] == (8, 1)  # 8 distinct crops for 32 rows: each encoded once
    np.testing.assert_array_equal(blocks["image_index"], np.zeros((8, group)))
    # Every row: <image> x L then two text tokens; prompt p's G rows read crop p.
    ids = np.concatenate([np.full((prompts * group, L), config.image_token_id), np.ones((prompts * group, 2))], 1)
    inputs = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones(ids.shape, bool),
              "positions": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)}
    graphdef, state = nnx.split(model)
    embed = lambda s, batch: nnx.merge(graphdef, s).model.embed(batch)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        per_row = embed(state, {**inputs, "vision": {"pixel_values": jnp.asarray(np.repeat(crops, group, 0))}})
        once = embed(state, {**inputs, "vision": jax.tree.map(jnp.asarray, blocks)})
    np.testing.assert_allclose(np.asarray(once), np.asarray(per_row), atol=1e-5)

    mesh = _mesh()
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    placed = {**jax.device_put(inputs, rows),
              "vision": jax.device_put(blocks, rows)}
    flat = {**placed, "vision": jax.device_put({"pixel_values": np.repeat(crops, group, 0)},
                                               NamedSharding(mesh, PartitionSpec()))}
    with jax.set_mesh(mesh):
        per_device = _per_device_flops(embed, state, placed)
        everything = _per_device_flops(embed, state, flat)
    # One crop per device instead of all 32 rows' crops on every device.
    print(f"llava embed flops per device: {per_device:.3g} per block vs {everything:.3g} flat")
    assert per_device < everything / 16, (per_device, everything)
    assert image_shards.is_sharded(blocks) and not image_shards.is_sharded({"pixel_values": crops})


def test_gradients_through_blocks_on_a_mesh_equal_those_of_one_flat_sequence():
    """The tower's weight gradients summed over per-device blocks equal one device's gradient on all images."""
    rng = np.random.default_rng(3)
    grids = GRIDS[:4]
    pixels = rng.normal(size=(int(np.prod(grids, 1).sum()), QWEN_VISION.patch_dim)).astype(np.float32)
    blocks = vision_host.prepare_sharded_vision_inputs(pixels, grids, QWEN_VISION, plan=plan_row_shards(4, 2, 8))
    flat = vision_host.prepare_vision_inputs(pixels, grids, QWEN_VISION, repeats=2)
    graphdef, state = nnx.split(VisionTower(QWEN_VISION, rngs=nnx.Rngs(1)))

    def loss(s, vision):  # order-free over tokens: blocks and the flat sequence list them differently
        return jnp.sum(nnx.merge(graphdef, s)(vision) ** 2)

    mesh = _mesh()
    with jax.default_matmul_precision("highest"):
        expected = jax.jit(jax.grad(loss))(state, jax.tree.map(jnp.asarray, flat))
        with jax.set_mesh(mesh):
            placed = jax.device_put(blocks, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
            replicated = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
            actual = jax.jit(jax.grad(loss))(replicated, placed)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        b = np.asarray(b)  # fp32 sums over ~1000 patches in another order: noise ~1e-5 of the leaf's scale
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))
