"""Qwen2.5-VL vision tower: component and end-to-end parity with HF transformers (torch CPU, fp32)."""

import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLVisionConfig, Qwen2VLImageProcessorPil
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from balcap_jax.models.image_shards import RowShard
from balcap_jax.models.layer_stack import layer_at
from balcap_jax.models.qwen2_5_vl import processor, vision_host
from balcap_jax.models.qwen2_5_vl.vision import (
    VisionBlock,
    VisionConfig,
    VisionTower,
    chunked_segment_attention,
    full_attention,
    hf_special_cases,
    local_segment_attention,
    segment_attention,
    window_attention,
)

# Three images of different sizes (patch grids), with full and partial 8 x 8-patch windows: 500 patches, 125 tokens.
GRID = np.array([[1, 20, 12], [1, 8, 28], [1, 6, 6]])
NUM_PATCHES = int(np.prod(GRID, axis=1).sum())
TOL = dict(atol=1e-4, rtol=0)

_LEAF_TO_HF = {"kernel": "weight", "bias": "bias", "scale": "weight"}


def tiny_hf_config() -> Qwen2_5_VLVisionConfig:
    """Head dim 16 (4 rotary frequencies per axis); block 1 full attention, blocks 0 and 2 windowed."""
    config = Qwen2_5_VLVisionConfig(
        depth=3, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=40, fullatt_block_indexes=[1]
    )
    config._attn_implementation = "eager"
    return config


def tower_from_hf(config: VisionConfig, hf_state: dict[str, torch.Tensor], **kwargs) -> VisionTower:
    """Our tower holding HF's tensors, mapped by the naming rule plus the declared special cases (every key used);
    the stacked `blocks.*` leaves [depth, ...] take HF's per-block `blocks.{i}.*` tensors.

    Built abstractly first: random initialisation would only be overwritten.
    """
    abstract = nnx.eval_shape(lambda: VisionTower(config, rngs=nnx.Rngs(0), **kwargs))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    special = hf_special_cases()
    remaining = {k: v.detach().numpy() for k, v in hf_state.items()}

    def take(name: str, leaf_name: str) -> np.ndarray:
        tensor = remaining.pop(name)
        if name in special:
            return special[name][0](tensor)
        return tensor.T if leaf_name == "kernel" else tensor

    flat = []
    for path, leaf in nnx.to_flat_state(params):
        name = ".".join(map(str, path[:-1])) + "." + _LEAF_TO_HF[path[-1]]
        if path[0] == "blocks":
            rest_of_name = name[len("blocks."):]
            tensor = np.stack([take(f"blocks.{i}.{rest_of_name}", path[-1]) for i in range(leaf.shape[0])])
        else:
            tensor = take(name, path[-1])
        assert tensor.shape == leaf.shape, (name, tensor.shape, leaf.shape)
        flat.append((path, leaf.replace(jnp.asarray(tensor, leaf.dtype))))
    assert not remaining, f"HF tensors with no counterpart: {sorted(remaining)}"
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


@pytest.fixture(scope="module")
def hf_tower():
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(tiny_hf_config()).eval()
    with torch.no_grad():  # random norms and biases too, so every parameter matters
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def tower(hf_tower):
    config = VisionConfig.from_hf(hf_tower.config.to_dict())
    # A small query chunk so the full-attention block takes the chunked (lax.map) path on 512 patches.
    return tower_from_hf(config, hf_tower.state_dict(), full_attention_query_chunk=128)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).normal(size=(NUM_PATCHES, 1176)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _apply_tower(graphdef, state, inputs):
    return nnx.merge(graphdef, state)(inputs)


def run_tower(model: VisionTower, inputs: dict) -> np.ndarray:
    """The tower as the pipeline runs it: split to (graphdef, state), jitted (compiled once per bucket)."""
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        return np.asarray(_apply_tower(graphdef, state, inputs))


def hf_window_order_inputs(hf_tower, pixels):
    """HF's hidden states after patch embedding + window permutation, and its permuted rotary tables."""
    grid = torch.from_numpy(GRID)
    window_index, cu_window = get_vision_window_index(grid, 2, 112, 14)
    with torch.no_grad():
        hidden = hf_tower.patch_embed(torch.from_numpy(pixels))
        hidden = hf_tower.permute_input_for_window_attn(hidden, window_index, NUM_PATCHES)
        cos, sin = hf_tower.rotary_pos_emb(hidden, get_vision_position_ids(grid, 2))
        cos = hf_tower.permute_input_for_window_attn(cos, window_index, NUM_PATCHES)
        sin = hf_tower.permute_input_for_window_attn(sin, window_index, NUM_PATCHES)
    return hidden, (cos, sin), cu_window, get_vision_cu_seqlens(grid)


def test_config_from_hf(hf_tower):
    config = VisionConfig.from_hf(hf_tower.config.to_dict())
    assert (config.depth, config.hidden_size, config.num_heads, config.head_dim) == (3, 64, 4, 16)
    assert config.fullatt_block_indexes == (1,) and config.rope_theta == 10000.0
    assert (config.patch_dim, config.merge_unit, config.window_patches) == (1176, 4, 64)
    # The released Qwen2.5-VL-7B config.json spelling.
    released = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                "tokens_per_second": 2, "temporal_patch_size": 2, "model_type": "qwen2_5_vl"}  # fmt: skip
    config = VisionConfig.from_hf(released)
    assert (config.hidden_size, config.out_hidden_size, config.head_dim) == (1280, 3584, 80)
    assert (config.in_channels, config.tokens_per_second) == (3, 2)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VisionConfig.from_hf({**released, "num_heads": 3})
    with pytest.raises(ValueError, match="outside"):
        VisionConfig.from_hf({**released, "fullatt_block_indexes": [40]})
    with pytest.raises(ValueError, match="window_size"):
        VisionConfig(window_size=100)


def test_patch_embed_matches_conv3d(hf_tower, tower, pixels, highest_precision):
    with torch.no_grad():
        ref = hf_tower.patch_embed(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(np.asarray(tower.patch_embed(jnp.asarray(pixels))), ref, **TOL)


@pytest.mark.parametrize("block_index", [0, 1], ids=["window", "full"])
def test_block_matches_hf(hf_tower, tower, pixels, block_index, highest_precision):
    hidden, rotary, cu_window, cu_full = hf_window_order_inputs(hf_tower, pixels)
    is_full = block_index in tower.config.fullatt_block_indexes
    with torch.no_grad():
        ref = hf_tower.blocks[block_index](
            hidden, cu_seqlens=cu_full if is_full else cu_window, position_embeddings=rotary
        ).numpy()

    inputs = vision_host.prepare_vision_inputs(pixels, GRID, tower.config)  # 512 patches: 12 padding
    x = jnp.zeros((512, 64)).at[:NUM_PATCHES].set(hidden.numpy())
    segments = inputs["full_segment_ids" if is_full else "window_segment_ids"]

    @nnx.jit
    def run_block(block: VisionBlock, x, cos, sin, segments):
        attend = full_attention(segments, query_chunk=128) if is_full else window_attention(segments, block_size=64)
        return block(x, cos, sin, attend)

    out = run_block(layer_at(tower.blocks, block_index), x, inputs["rotary_cos"], inputs["rotary_sin"], segments)
    np.testing.assert_allclose(np.asarray(out[:NUM_PATCHES]), ref, **TOL)


def test_merger_matches_hf(hf_tower, tower, highest_precision):
    x = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = hf_tower.merger(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(tower.merger(jnp.asarray(x))), ref, **TOL)


def test_tower_matches_hf_on_three_images(hf_tower, tower, pixels):
    with torch.no_grad():
        ref = hf_tower(torch.from_numpy(pixels), grid_thw=torch.from_numpy(GRID)).pooler_output.numpy()
    inputs = vision_host.prepare_vision_inputs(pixels, GRID, tower.config)
    out = run_tower(tower, inputs)
    assert out.shape == (128, 40) and ref.shape == (125, 40)
    np.testing.assert_allclose(out[:125], ref, **TOL)
    assert not out[125:].any(), "bucket padding rows must be zero"


def test_photos_through_processor_and_tower_match_hf(hf_tower, tower):
    """End to end on real photographs: our preprocessing + host prep + tower vs HF's image processor + tower."""
    data_dir = os.path.join(importlib.util.find_spec("skimage").submodule_search_locations[0], "data")
    photos = [PIL.Image.open(os.path.join(data_dir, name)).convert("RGB") for name in ("coffee.png", "astronaut.png")]
    config = processor.ImageProcessorConfig(max_pixels=50_000)
    pixel_values, grid_thw = processor.preprocess_images(photos, config)
    assert grid_thw.tolist() == [[1, 12, 18], [1, 14, 14]]
    hf_inputs = Qwen2VLImageProcessorPil(max_pixels=50_000)(images=photos, return_tensors="pt")
    with torch.no_grad():
        ref = hf_tower(hf_inputs["pixel_values"], grid_thw=hf_inputs["image_grid_thw"]).pooler_output.numpy()
    out = run_tower(tower, vision_host.prepare_vision_inputs(pixel_values, grid_thw, tower.config))
    np.testing.assert_allclose(out[: ref.shape[0]], ref, **TOL)


def test_repeated_tokens_equal_the_tiled_single_pass(tower, pixels):
    """`repeats=G` (G samples per prompt) gives each image's tokens G times from one pass of the tower."""
    once = run_tower(tower, vision_host.prepare_vision_inputs(pixels, GRID, tower.config))
    twice = run_tower(tower, vision_host.prepare_vision_inputs(pixels, GRID, tower.config, repeats=2))
    expected = np.concatenate([np.tile(once[a:b], (2, 1)) for a, b in [(0, 60), (60, 116), (116, 125)]])
    assert twice.shape == (256, 40)
    np.testing.assert_array_equal(twice[:250], expected)
    assert not twice[250:].any()


def test_padding_patches_do_not_influence_real_tokens(tower, pixels):
    """Garbage in the padding patches and a larger bucket leave every real token unchanged."""
    tight = vision_host.prepare_vision_inputs(pixels, GRID, tower.config, bucket_sizes=None)  # 512
    roomy = vision_host.prepare_vision_inputs(pixels, GRID, tower.config, bucket_sizes=(1024,))
    roomy["patches"][NUM_PATCHES:] = 100.0 * np.random.default_rng(2).normal(size=(1024 - NUM_PATCHES, 1176))
    a, b = run_tower(tower, tight), run_tower(tower, roomy)
    assert b.shape == (256, 40)
    np.testing.assert_allclose(a[:125], b[:125], atol=1e-5, rtol=0)


def test_each_image_is_encoded_independently(tower, pixels):
    """Batching images together changes nothing: window and full attention never cross images."""
    batched = run_tower(tower, vision_host.prepare_vision_inputs(pixels, GRID, tower.config))
    start = token = 0
    for grid in GRID:
        n = int(np.prod(grid))
        image_pixels = pixels[start:start + n]
        inputs = vision_host.prepare_vision_inputs(image_pixels, grid[None], tower.config, bucket_sizes=[256])
        alone = run_tower(tower, inputs)
        np.testing.assert_allclose(alone[: n // 4], batched[token:token + n // 4], atol=1e-5, rtol=0)
        start, token = start + n, token + n // 4


def random_contiguous_segments(rng, n: int, max_len: int) -> np.ndarray:
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(rng.integers(1, max_len + 1)))
    lengths[-1] -= sum(lengths) - n
    return np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)


def test_local_and_chunked_attention_equal_dense_segment_attention(highest_precision):
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(256, 2, 8)), jnp.float32) for _ in range(3))
    windows = jnp.asarray(random_contiguous_segments(rng, 256, 16))
    frames = jnp.asarray(random_contiguous_segments(rng, 256, 200))

    @jax.jit
    def all_variants(q, k, v, windows, frames):
        return (
            segment_attention(q, k, v, windows, windows),
            local_segment_attention(q, k, v, windows, block_size=16),
            segment_attention(q, k, v, frames, frames),
            chunked_segment_attention(q, k, v, frames, query_chunk=64),
            segment_attention(q, k, v.at[0].add(10.0), windows, windows),
        )

    dense, local, dense_frames, chunked, perturbed = all_variants(q, k, v, windows, frames)
    np.testing.assert_allclose(local, dense, atol=1e-6)
    np.testing.assert_allclose(chunked, dense_frames, atol=1e-6)
    # A key outside a query's segment contributes nothing: perturbing it leaves the other segments unchanged.
    other_segments = np.asarray(windows) != int(windows[0])
    np.testing.assert_allclose(perturbed[other_segments], dense[other_segments], atol=1e-6)
    assert not np.allclose(perturbed[~other_segments], dense[~other_segments])


def _one_row_per_image(images_per_shard):
    """Blocks of rows holding one image each, `images_per_shard[k]` of them in block k."""
    bounds = np.cumsum([0, *images_per_shard])
    return [RowShard(int(a), int(b), np.ones(b - a, np.int64)) for a, b in zip(bounds[:-1], bounds[1:])]


def test_sharded_inputs_encode_each_shard_like_its_own_batch(tower, pixels):
    """A leading shard axis (one bucket per data-parallel shard) is vmapped: shard s equals its images alone."""
    sharded = vision_host.prepare_sharded_vision_inputs(pixels, GRID, tower.config, plan=_one_row_per_image([1, 2]))
    out = run_tower(tower, sharded)
    assert out.shape == (2, 96, 40)  # 240 and 260 patches: both shards in the 384-patch bucket
    first = run_tower(tower, vision_host.prepare_vision_inputs(pixels[:240], GRID[:1], tower.config))
    np.testing.assert_allclose(out[0, :60], first[:60], atol=1e-5, rtol=0)
    whole = run_tower(tower, vision_host.prepare_vision_inputs(pixels, GRID, tower.config))
    np.testing.assert_allclose(out[1, :65], whole[60:125], atol=1e-5, rtol=0)
    assert not out[:, 65:].any() and not out[0, 60:].any()


def test_shard_axis_splits_over_a_data_mesh(tower, pixels):
    """With the shard axis on a 4-device 'data' mesh, each device encodes its own shard; results unchanged."""
    sharded = vision_host.prepare_sharded_vision_inputs(pixels, GRID, tower.config, plan=_one_row_per_image([1, 1, 0, 1]))
    expected = run_tower(tower, sharded)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    on_mesh = jax.device_put(sharded, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    graphdef, state = nnx.split(tower)
    with jax.default_matmul_precision("highest"):
        out = _apply_tower(graphdef, state, on_mesh)
    assert out.sharding.is_equivalent_to(on_mesh["token_valid"].sharding, 3)
    assert {shard.data.shape for shard in out.addressable_shards} == {(1, 64, 40)}
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


def test_gradients_flow_through_the_tower_with_and_without_remat(hf_tower, tower, pixels):
    grid = np.array([[1, 8, 8]])
    inputs = vision_host.prepare_vision_inputs(pixels[:64], grid, tower.config, bucket_sizes=(128,))
    remat_tower = tower_from_hf(tower.config, hf_tower.state_dict(), remat=True, full_attention_query_chunk=64)

    def grads_of(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(inputs) ** 2)  # noqa: E731
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.grad(loss))(params)

    grads, remat_grads = grads_of(tower), grads_of(remat_tower)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert np.abs(np.asarray(grads["blocks"]["attn"]["qkv"]["kernel"][...][1])).sum() > 0
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())  # same maths, fused differently


def test_bf16_tower_tracks_fp32(hf_tower, tower, pixels):
    inputs = vision_host.prepare_vision_inputs(pixels, GRID, tower.config)
    bf16 = tower_from_hf(tower.config, hf_tower.state_dict(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    ref, out = run_tower(tower, inputs), run_tower(bf16, inputs).astype(np.float32)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out[:125] - ref[:125]).max() < 0.05 * np.abs(ref).max()


def test_hf_special_cases_round_trip(hf_tower):
    to_ours, to_hf = hf_special_cases()["patch_embed.proj.weight"]
    weight = hf_tower.patch_embed.proj.weight.detach().numpy()  # [D, C, T, p, p]
    assert to_ours(weight).shape == (3, 2, 14, 14, 64)
    np.testing.assert_array_equal(to_hf(to_ours(weight)), weight)


@pytest.mark.parametrize("out_hidden_size", [2048, 3584], ids=["3B", "7B"])
def test_released_tower_param_counts_match_hf(out_hidden_size):
    """The released towers (hidden 1280, 32 blocks) instantiate abstractly with HF's exact parameter count."""
    released = dataclasses.replace(VisionConfig(), hidden_size=1280, out_hidden_size=out_hidden_size)
    abstract = nnx.eval_shape(lambda: VisionTower(released, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    hf_config = Qwen2_5_VLVisionConfig(hidden_size=1280, out_hidden_size=out_hidden_size)
    with torch.device("meta"):
        hf = Qwen2_5_VisionTransformerPretrainedModel(hf_config)
    assert ours == sum(p.numel() for p in hf.parameters())
    assert ours == {2048: 668_684_288, 3584: 676_550_144}[out_hidden_size]  # the checkpoints' `visual.*`
