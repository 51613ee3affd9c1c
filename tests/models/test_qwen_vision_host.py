"""Host-side vision preparation (window index, segments, rotary tables, buckets) against HF transformers."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from balcap_jax.models.image_shards import IMAGES_PER_SHARD, RowShard, plan_row_shards
from balcap_jax.models.qwen2_5_vl import vision_host
from balcap_jax.models.qwen2_5_vl.vision import VisionConfig

# Grids (t, h, w) in patches: full and partial windows (8 x 8 patches), a square, a one-window image, a 2-frame clip.
GRIDS = [
    np.array([[1, 20, 12], [1, 8, 28], [1, 6, 6]]),
    np.array([[1, 16, 16]]),
    np.array([[2, 10, 14], [1, 4, 2]]),
    np.array([[1, 2, 2], [1, 34, 50]]),
]
CONFIG = VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=40,
                      fullatt_block_indexes=(1,))  # fmt: skip


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_window_layout_matches_hf(grid):
    ref_index, ref_cu = get_vision_window_index(
        torch.from_numpy(grid), spatial_merge_size=2, window_size=112, patch_size=14
    )
    layout = vision_host.window_layout(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    np.testing.assert_array_equal(layout.window_index, ref_index.numpy())
    cu = np.concatenate([[0], np.cumsum(layout.window_lengths * 4)])
    np.testing.assert_array_equal(cu, ref_cu.numpy())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 2), st.integers(1, 40), st.integers(1, 40)).map(lambda g: (g[0], 2 * g[1], 2 * g[2])),
        min_size=1,
        max_size=4,
    )
)
def test_window_layout_and_positions_match_hf_on_random_grids(grids):
    grid = np.array(grids, dtype=np.int64)
    ref_index, ref_cu = get_vision_window_index(torch.from_numpy(grid), 2, 112, 14)
    layout = vision_host.window_layout(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    np.testing.assert_array_equal(layout.window_index, ref_index.numpy())
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(layout.window_lengths * 4)]), ref_cu.numpy())
    ref_positions = get_vision_position_ids(torch.from_numpy(grid), 2).numpy()
    np.testing.assert_array_equal(vision_host.merge_order_positions(grid, 2), ref_positions)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_merge_order_positions_match_hf(grid):
    ref = get_vision_position_ids(torch.from_numpy(grid), 2).numpy()
    np.testing.assert_array_equal(vision_host.merge_order_positions(grid, 2), ref)


@pytest.mark.parametrize("head_dim", [8, 80])
def test_rotary_tables_match_hf(head_dim):
    grid = GRIDS[3]
    hf_config = Qwen2_5_VLVisionConfig(hidden_size=head_dim * 2, num_heads=2)
    rotary = Qwen2_5_VLVisionRotaryEmbedding(hf_config)
    positions = get_vision_position_ids(torch.from_numpy(grid), 2)
    ref_cos, ref_sin = rotary(torch.zeros(1), positions)
    cos, sin = vision_host.vision_rotary_tables(
        vision_host.merge_order_positions(grid, 2), head_dim=head_dim, theta=10000.0
    )
    assert cos.shape == (positions.shape[0], head_dim) and cos.dtype == np.float32
    # Angles reach the largest position in radians; torch's vectorised float32 cos/sin (chosen at run time) may
    # be off by a few ulps of the angle there, so the bound scales with the float32 spacing at that angle.
    atol = 2e-6 + 3 * float(np.spacing(np.float32(positions.max())))
    np.testing.assert_allclose(cos, ref_cos.numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(sin, ref_sin.numpy(), atol=atol, rtol=0)


def test_segment_ids_follow_cu_seqlens_and_isolate_padding():
    lengths = np.array([3, 1, 4])
    ids = vision_host.segment_ids_from_lengths(lengths, 10)
    np.testing.assert_array_equal(ids, [0, 0, 0, 1, 2, 2, 2, 2, 3, 3])
    with pytest.raises(ValueError, match="cover 8 positions"):
        vision_host.segment_ids_from_lengths(lengths, 7)
    grid = GRIDS[2]
    ref_cu = get_vision_cu_seqlens(torch.from_numpy(grid)).numpy()  # one segment per frame
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(vision_host.frame_lengths(grid))]), ref_cu)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_prepare_vision_inputs_layout(grid):
    n = int(np.prod(grid, axis=1).sum())
    pixels = np.random.default_rng(0).normal(size=(n, CONFIG.patch_dim)).astype(np.float32)
    out = vision_host.prepare_vision_inputs(pixels, grid, CONFIG)
    padded = vision_host.choose_bucket(n, vision_host.DEFAULT_PATCH_BUCKETS, multiple=64)
    assert out["patches"].shape == (padded, CONFIG.patch_dim)
    assert {k: v.dtype for k, v in out.items()} == {
        "patches": np.float32, "window_segment_ids": np.int32, "full_segment_ids": np.int32,
        "rotary_cos": np.float32, "rotary_sin": np.float32, "inverse_window_index": np.int32, "token_valid": bool,
    }  # fmt: skip

    ref_index, ref_cu = get_vision_window_index(torch.from_numpy(grid), 2, 112, 14)
    patch_order = (ref_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    np.testing.assert_array_equal(out["patches"][:n], pixels[patch_order])
    assert not out["patches"][n:].any()

    # Window segments: HF's cu_window_seqlens; padding is one extra segment of its own, in both segmentations.
    window_ids = out["window_segment_ids"]
    np.testing.assert_array_equal(np.flatnonzero(np.diff(window_ids[:n])) + 1, ref_cu.numpy()[1:-1])
    for ids in (window_ids, out["full_segment_ids"]):
        assert np.all(ids[n:] == ids[:n].max() + 1)
    frames = int(grid[:, 0].sum())
    assert out["full_segment_ids"][:n].max() == frames - 1

    # Merged tokens: the first n/4 are valid and, through the inverse permutation, in processor order.
    m = n // 4
    np.testing.assert_array_equal(out["token_valid"], np.arange(padded // 4) < m)
    inverse = out["inverse_window_index"]
    np.testing.assert_array_equal(ref_index.numpy()[inverse[:m]], np.arange(m))
    np.testing.assert_array_equal(np.sort(inverse), np.arange(padded // 4))


def test_patch_buckets():
    assert vision_host.choose_bucket(100, (64, 128, 256), multiple=64) == 128
    assert vision_host.choose_bucket(128, (256, 128), multiple=64) == 128
    assert vision_host.choose_bucket(100, None, multiple=64) == 128
    assert all(b % 64 == 0 for b in vision_host.DEFAULT_PATCH_BUCKETS)
    with pytest.raises(ValueError, match="largest bucket"):
        vision_host.choose_bucket(300, (64, 256), multiple=64)
    with pytest.raises(ValueError, match="multiples of 64"):
        vision_host.choose_bucket(30, (32, 64), multiple=64)


def test_bad_inputs_raise_clear_errors():
    grid = np.array([[1, 4, 4]])
    pixels = np.zeros((16, CONFIG.patch_dim), np.float32)
    with pytest.raises(ValueError, match="describes 16"):
        vision_host.prepare_vision_inputs(pixels[:12], grid, CONFIG)
    with pytest.raises(ValueError, match=r"\[num_patches, 1176\]"):
        vision_host.prepare_vision_inputs(pixels[:, :100], grid, CONFIG)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        vision_host.prepare_vision_inputs(pixels[:15], np.array([[1, 5, 3]]), CONFIG)
    with pytest.raises(ValueError, match=r"shape \[n_images, 3\]"):
        vision_host.prepare_vision_inputs(pixels, np.array([4, 4]), CONFIG)
    with pytest.raises(ValueError, match="empty"):
        vision_host.prepare_vision_inputs(pixels[:0], np.zeros((0, 3), np.int64), CONFIG)


def test_num_image_tokens():
    np.testing.assert_array_equal(vision_host.num_image_tokens(GRIDS[2], 2), [70, 2])


def test_sharded_inputs_stack_per_shard_buckets():
    grid = GRIDS[0]  # 240 + 224 + 36 patches
    n = int(np.prod(grid, axis=1).sum())
    pixels = np.random.default_rng(0).normal(size=(n, CONFIG.patch_dim)).astype(np.float32)
    plan = [RowShard(0, 2, np.ones(2, np.int64)), RowShard(2, 2, np.zeros(0, np.int64)),
            RowShard(2, 3, np.ones(1, np.int64))]  # images 0-1, none, image 2
    out = vision_host.prepare_sharded_vision_inputs(pixels, grid, CONFIG, plan=plan)
    assert out["patches"].shape == (3, 512, CONFIG.patch_dim) and out["token_valid"].shape == (3, 128)
    np.testing.assert_array_equal(out[IMAGES_PER_SHARD], [2, 0, 1])
    alone = vision_host.prepare_vision_inputs(pixels[:464], grid[:2], CONFIG, bucket_sizes=(512,))
    for key in alone:
        np.testing.assert_array_equal(out[key][0], alone[key])
    assert not out["token_valid"][1].any() and not out["patches"][1].any()
    np.testing.assert_array_equal(out["token_valid"][2], np.arange(128) < 9)
    wide = vision_host.prepare_sharded_vision_inputs(pixels, grid, CONFIG, plan=plan, min_patches=700)
    assert wide["patches"].shape == (3, 768, CONFIG.patch_dim)  # another process's fullest shard sets the bucket
    with pytest.raises(ValueError, match="covers 4 prompts"):
        vision_host.prepare_sharded_vision_inputs(pixels, grid, CONFIG, plan=[RowShard(0, 4, np.ones(4, np.int64))])


def test_repeats_tile_each_images_tokens_without_repeating_patches():
    grid = GRIDS[0]  # 60 + 56 + 9 tokens
    n = int(np.prod(grid, axis=1).sum())
    pixels = np.random.default_rng(0).normal(size=(n, CONFIG.patch_dim)).astype(np.float32)
    once = vision_host.prepare_vision_inputs(pixels, grid, CONFIG)
    thrice = vision_host.prepare_vision_inputs(pixels, grid, CONFIG, repeats=3)
    for key in ("patches", "window_segment_ids", "full_segment_ids", "rotary_cos", "rotary_sin"):
        np.testing.assert_array_equal(thrice[key], once[key])  # the tower still sees each image once
    real = once["inverse_window_index"][:125]
    expected = np.concatenate([np.tile(real[a:b], 3) for a, b in [(0, 60), (60, 116), (116, 125)]])
    np.testing.assert_array_equal(thrice["inverse_window_index"][:375], expected)
    np.testing.assert_array_equal(thrice["token_valid"], np.arange(3 * 128) < 375)
    assert thrice["inverse_window_index"].max() < 128
    with pytest.raises(ValueError, match="positive integer"):
        vision_host.prepare_vision_inputs(pixels, grid, CONFIG, repeats=0)


# Three prompts: two images of different sizes (48 + 4 tokens), a text-only prompt, one image (9 tokens).
MULTI_GRID = np.array([[1, 8, 24], [1, 4, 4], [1, 6, 6]])
MULTI_PROMPTS = [2, 0, 1]


def _multi_pixels() -> np.ndarray:
    n = int(np.prod(MULTI_GRID, axis=1).sum())
    return np.random.default_rng(1).normal(size=(n, CONFIG.patch_dim)).astype(np.float32)


def test_repeats_tile_each_prompts_images_together():
    """Prompt-major rows p * G + g read all of prompt p's images in order, then again for the next copy."""
    pixels = _multi_pixels()
    once = vision_host.prepare_vision_inputs(pixels, MULTI_GRID, CONFIG)
    tiled = vision_host.prepare_vision_inputs(pixels, MULTI_GRID, CONFIG, repeats=3, images_per_prompt=MULTI_PROMPTS)
    for key in ("patches", "window_segment_ids", "full_segment_ids", "rotary_cos", "rotary_sin"):
        np.testing.assert_array_equal(tiled[key], once[key])
    real = once["inverse_window_index"]
    prompt0, prompt2 = real[0:52], real[52:61]  # images (0, 1) and image 2, in processor order
    expected = np.concatenate([prompt0, prompt0, prompt0, prompt2, prompt2, prompt2])
    np.testing.assert_array_equal(tiled["inverse_window_index"][: expected.size], expected)
    np.testing.assert_array_equal(tiled["token_valid"], np.arange(tiled["token_valid"].size) < 3 * 61)


def test_images_per_prompt_of_ones_is_the_per_image_default():
    pixels = _multi_pixels()
    default = vision_host.prepare_vision_inputs(pixels, MULTI_GRID, CONFIG, repeats=2)
    ones = vision_host.prepare_vision_inputs(pixels, MULTI_GRID, CONFIG, repeats=2, images_per_prompt=[1, 1, 1])
    for key in default:
        np.testing.assert_array_equal(ones[key], default[key])


@pytest.mark.parametrize(
    "images_per_prompt, match",
    [([2, 2], "sum to the number of images"), ([3, -1, 1], "non-negative"), ([[2, 1]], "1-D integer"),
     ([1.0, 2.0], "1-D integer")],  # fmt: skip
)
def test_bad_images_per_prompt_name_the_field(images_per_prompt, match):
    with pytest.raises(ValueError, match=f"images_per_prompt.*{match}|{match}.*images_per_prompt"):
        vision_host.prepare_vision_inputs(_multi_pixels(), MULTI_GRID, CONFIG, images_per_prompt=images_per_prompt)


def _rows_with_images(tokens_per_row: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded rows holding, per image, its placeholder tokens (id 9) between text tokens (id 1)."""
    ids = np.zeros((len(tokens_per_row), length), np.int64)
    mask = np.zeros(ids.shape, bool)
    for r, images in enumerate(tokens_per_row):
        row = np.concatenate([[1, 1], *[np.concatenate([np.full(n, 9), [1]]) for n in images]])
        ids[r, length - row.size :], mask[r, length - row.size :] = row, True
    return ids, mask


def test_images_per_prompt_from_tokens_reads_each_rows_image_count():
    ids, mask = _rows_with_images([[48, 4], [], [9]], length=60)
    ids[1, :3] = 9  # padding that happens to hold the placeholder id is masked out, not counted
    counts = vision_host.images_per_prompt_from_tokens(ids, mask, MULTI_GRID, image_token_id=9, spatial_merge_size=2)
    np.testing.assert_array_equal(counts, MULTI_PROMPTS)
    assert counts.dtype == np.int64


@pytest.mark.parametrize(
    "tokens_per_row",
    [[[50], [2, 9]], [[48, 4], []], [[48, 4], [9, 4]]],
    ids=["row ends inside an image", "an image is left over", "more tokens than images"],
)
def test_images_per_prompt_from_tokens_rejects_rows_that_split_or_miss_images(tokens_per_row):
    ids, mask = _rows_with_images(tokens_per_row, length=70)
    with pytest.raises(ValueError, match="do not split into whole images of grid_thw"):
        vision_host.images_per_prompt_from_tokens(ids, mask, MULTI_GRID, image_token_id=9, spatial_merge_size=2)


def test_sharded_inputs_repeat_each_shards_prompts_together():
    pixels = _multi_pixels()
    # 3 prompts x 2 rows in 2 blocks of 3 rows: (p0, p0, p1) and (p1, p2, p2); p1 is text-only.
    plan = plan_row_shards(3, 2, 2)
    out = vision_host.prepare_sharded_vision_inputs(pixels, MULTI_GRID, CONFIG, plan=plan,
                                                    images_per_prompt=MULTI_PROMPTS)
    first = vision_host.prepare_vision_inputs(
        pixels[:208], MULTI_GRID[:2], CONFIG, bucket_sizes=(256,), repeats=2, images_per_prompt=[2]
    )
    second = vision_host.prepare_vision_inputs(pixels[208:], MULTI_GRID[2:], CONFIG, bucket_sizes=(256,), repeats=2)
    for key in first:
        np.testing.assert_array_equal(out[key][0], first[key])
        np.testing.assert_array_equal(out[key][1], second[key])


def test_a_prompt_whose_rows_straddle_two_blocks_is_encoded_in_both():
    pixels = _multi_pixels()
    prompts = [1, 1, 1]  # images 0, 1, 2 (208 + 16 + 36 patches... one per prompt)
    grid = MULTI_GRID
    plan = plan_row_shards(3, 2, 2)  # blocks (p0, p0, p1) and (p1, p2, p2)
    out = vision_host.prepare_sharded_vision_inputs(pixels, grid, CONFIG, plan=plan, images_per_prompt=prompts)
    np.testing.assert_array_equal(out[IMAGES_PER_SHARD], [2, 2])
    patches = np.prod(grid, axis=1)
    first = vision_host.prepare_vision_inputs(pixels[: patches[:2].sum()], grid[:2], CONFIG, bucket_sizes=(256,),
                                              repeats=[2, 1], max_repeats=2)
    second = vision_host.prepare_vision_inputs(pixels[patches[0]:], grid[1:], CONFIG, bucket_sizes=(256,),
                                               repeats=[1, 2])
    for key in first:
        np.testing.assert_array_equal(out[key][0], first[key])
        np.testing.assert_array_equal(out[key][1], second[key])
    tokens = vision_host.num_image_tokens(grid, 2)
    assert out["token_valid"][0].sum() == 2 * tokens[0] + tokens[1]
    assert out["token_valid"][1].sum() == tokens[1] + 2 * tokens[2]
