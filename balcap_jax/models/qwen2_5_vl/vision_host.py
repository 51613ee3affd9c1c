"""Host-side (numpy) preparation of Qwen2.5-VL vision-tower inputs.

Everything in the vision tower that depends on the image grids — the window permutation, the attention segments,
the 2-D rotary tables and the merged-token order — is computed here, once per batch, on the host. The jitted
tower (`vision.py`) then sees only fixed-shape arrays, so a compiled tower is reused for every batch whose patch
count falls in the same bucket.

Vocabulary (one image = one entry of `grid_thw`, frames x patch rows x patch columns):
  patch        one `temporal_patch_size x patch_size x patch_size` pixel cube, `C*T*p*p` values.
  merge unit   the `merge x merge` patches that the merger fuses into one language-model token. The image
               processor already emits patches grouped by merge unit (`merge_order_positions`).
  window       `window_size` pixels square (112 px = 4 x 4 merge units = 64 patches); windowed blocks attend
               within a window, full-attention blocks within a frame.
  window order the patch order the tower works in: windows one after another, each window's merge units in
               raster order (HF's `get_vision_window_index`).

The patches are permuted into window order here (a per-patch linear embedding commutes with the permutation),
and the tower's merged tokens are put back into processor order by `inverse_window_index`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from balcap_jax.models.image_shards import IMAGES_PER_SHARD, RowShard

if TYPE_CHECKING:  # vision.py imports jax; the host side only reads the config's integers.
    from balcap_jax.models.qwen2_5_vl.vision import VisionConfig

# Patch-count buckets: a ratio of about 1.5 between neighbours bounds the padding waste at 50% while keeping the
# number of compiled tower variants small. Every entry is a multiple of 64 patches (one 112-px window of 14-px
# patches), which the tower's block-local window attention requires.
DEFAULT_PATCH_BUCKETS: tuple[int, ...] = (
    256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """The window permutation of one batch of images.

    window_index:   int64[U]  merge unit (in processor order) at each window-order position; U = sum(t*h*w)/merge².
    window_lengths: int64[n_windows]  merge units per non-empty window, in window order.
    """

    window_index: np.ndarray
    window_lengths: np.ndarray


def validate_grid_thw(grid_thw: np.ndarray, spatial_merge_size: int, *, allow_empty: bool = False) -> np.ndarray:
    """Checks `grid_thw` int[n_images, 3] (frames, patch rows, patch columns) and returns it as int64.

    `allow_empty`: accept no image (shape [0, 3], or an empty sequence), for the functions that count or lay out
    blocks (a process whose rows hold no image while another's do builds all-padding blocks); the functions that
    encode images keep refusing it."""
    grid = np.asarray(grid_thw)
    if allow_empty and grid.shape in ((0,), (0, 3)):
        return np.zeros((0, 3), np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [n_images, 3] (t, h, w); got {grid.shape}")
    if grid.shape[0] == 0:
        raise ValueError("grid_thw is empty: prepare vision inputs only for batches with at least one image")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw must hold integers; got dtype {grid.dtype}")
    if np.any(grid <= 0):
        raise ValueError(f"grid_thw entries must be positive; got {grid.tolist()}")
    if np.any(grid[:, 1:] % spatial_merge_size):
        raise ValueError(
            f"grid_thw heights and widths must be multiples of spatial_merge_size={spatial_merge_size}; got "
            f"{grid.tolist()} (resize images with processor.smart_resize so both sides are multiples of "
            "patch_size * merge_size pixels)"
        )
    return grid.astype(np.int64)


def merge_order_positions(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """(row, column) of every patch, in the order the image processor emits patches.

    The processor groups patches by merge unit: merge units in raster order, and inside each unit its
    `merge x merge` patches in raster order. Frames repeat the same positions.

    grid_thw: int[n_images, 3]. Returns int64[sum(t*h*w), 2] with columns (row, column).
    """
    grid = validate_grid_thw(grid_thw, spatial_merge_size)
    m = spatial_merge_size
    per_image = []
    for t, h, w in grid.tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        # [h/m, m, w/m, m] -> [h/m, w/m, m, m]: units in raster order, then patches inside a unit.
        rows = rows.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        per_image.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(per_image, axis=0)


def window_layout(grid_thw: np.ndarray, *, spatial_merge_size: int, window_size: int, patch_size: int) -> WindowLayout:
    """The window permutation of merge units, frame by frame and image by image.

    Each frame's `h/m x w/m` grid of merge units is cut into windows of `window_size // (patch_size * m)` units
    square, starting at the top-left corner (the last row/column of windows may be partial). Windows are taken in
    raster order and each window lists its units in raster order.
    """
    grid = validate_grid_thw(grid_thw, spatial_merge_size)
    units_per_window_side = window_size // (spatial_merge_size * patch_size)
    if units_per_window_side < 1 or window_size % (spatial_merge_size * patch_size):
        raise ValueError(
            f"window_size={window_size} must be a positive multiple of patch_size * spatial_merge_size = "
            f"{patch_size * spatial_merge_size} pixels"
        )
    s = units_per_window_side
    indices, lengths = [], []
    offset = 0
    for t, h, w in grid.tolist():
        units_h, units_w = h // spatial_merge_size, w // spatial_merge_size
        windows_h, windows_w = -(-units_h // s), -(-units_w // s)
        unit_ids = np.full((t, windows_h * s, windows_w * s), -1, dtype=np.int64)
        unit_ids[:, :units_h, :units_w] = np.arange(t * units_h * units_w).reshape(t, units_h, units_w) + offset
        # [t, Wh, s, Ww, s] -> [t, Wh, Ww, s, s]: one row per window, its units in raster order.
        per_window = unit_ids.reshape(t, windows_h, s, windows_w, s).transpose(0, 1, 3, 2, 4).reshape(-1, s * s)
        real = per_window >= 0
        indices.append(per_window[real])
        lengths.append(real.sum(axis=1))
        offset += t * units_h * units_w
    all_lengths = np.concatenate(lengths)
    return WindowLayout(window_index=np.concatenate(indices), window_lengths=all_lengths[all_lengths > 0])


def segment_ids_from_lengths(lengths: np.ndarray, total: int) -> np.ndarray:
    """Segment id of every position of a sequence cut into consecutive segments of `lengths`.

    Positions past `sum(lengths)` (bucket padding) form one extra segment of their own, so padding never
    attends to real positions or is attended by them. Returns int32[total].
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    used = int(lengths.sum())
    if used > total:
        raise ValueError(f"segments cover {used} positions but the sequence has only {total}")
    ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return np.concatenate([ids, np.full(total - used, len(lengths), dtype=np.int32)])


def frame_lengths(grid_thw: np.ndarray) -> np.ndarray:
    """Patches per frame, one entry per (image, frame): the full-attention segments. int64[sum(t)]."""
    grid = np.asarray(grid_thw, dtype=np.int64)
    return np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])


def vision_rotary_tables(positions: np.ndarray, *, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables of the tower's 2-D (axial) rotary embedding.

    A quarter of the head's frequencies rotate with the patch row and another quarter with the column; the
    (row, column) angles are concatenated to half a head and repeated, so `rotate_half` pairs dimension i with
    i + head_dim/2. Computed in float32 like the reference.

    positions: int[N, 2] (row, column). Returns (cos, sin), each float32[N, head_dim].
    """
    if head_dim % 4:
        raise ValueError(f"the vision head dimension must be a multiple of 4 for 2-D rotary; got {head_dim}")
    half = head_dim // 2
    exponents = np.arange(0, half, 2, dtype=np.float32) / np.float32(half)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)  # [head_dim/4]
    angles = positions.astype(np.float32)[:, :, None] * inv_freq  # [N, 2, head_dim/4]
    angles = angles.reshape(angles.shape[0], half)  # row angles then column angles
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def choose_bucket(num_patches: int, bucket_sizes: Sequence[int] | None, *, multiple: int) -> int:
    """The padded patch count: the smallest bucket >= num_patches, or (no buckets) the next multiple of `multiple`."""
    if bucket_sizes is None:
        return -(-num_patches // multiple) * multiple
    buckets = sorted(int(b) for b in bucket_sizes)
    bad = [b for b in buckets if b <= 0 or b % multiple]
    if bad:
        raise ValueError(
            f"bucket_sizes must be positive multiples of {multiple} patches (one attention window); got {bad}"
        )
    for bucket in buckets:
        if bucket >= num_patches:
            return bucket
    raise ValueError(
        f"the batch has {num_patches} patches, more than the largest bucket ({buckets[-1]}); add a larger entry "
        "to bucket_sizes or lower the image processor's max_pixels / the number of images per batch"
    )


def validate_images_per_prompt(images_per_prompt: Sequence[int] | np.ndarray | None, num_images: int) -> np.ndarray:
    """Checks `images_per_prompt` int[n_prompts] against the batch's `num_images`; None -> one image per prompt.

    Returns int64[n_prompts].
    """
    if images_per_prompt is None:
        return np.ones((num_images,), np.int64)
    counts = np.asarray(images_per_prompt)
    if counts.ndim != 1 or (counts.size and not np.issubdtype(counts.dtype, np.integer)):
        raise ValueError(
            f"images_per_prompt must be a 1-D integer array (images of each prompt, in row order); got shape "
            f"{counts.shape} and dtype {counts.dtype}"
        )
    if np.any(counts < 0) or int(counts.sum()) != num_images:
        raise ValueError(
            f"images_per_prompt={counts.tolist()} must be non-negative and sum to the number of images in grid_thw "
            f"({num_images}); count each prompt's images in row order (images_per_prompt_from_tokens does this)"
        )
    return counts.astype(np.int64)


def repeated_token_order(tokens_per_image: np.ndarray, images_per_prompt: np.ndarray,
                         repeats: int | np.ndarray) -> np.ndarray:
    """Processor-order index of every output image token when prompt p's rows are tiled `repeats[p]` times.

    Prompt after prompt, the tokens of all the prompt's images (in order) are emitted `repeats[p]` times: the
    reading order of image placeholders in a prompt-major batch whose rows are copies of their prompt.

    tokens_per_image: int[n_images]; images_per_prompt: int[n_prompts] summing to n_images; repeats: an int (every
    prompt) or int[n_prompts]. Returns int64[sum_p repeats[p] * tokens of prompt p].
    """
    token_bounds = np.concatenate([[0], np.cumsum(tokens_per_image)]).astype(np.int64)
    image_bounds = np.concatenate([[0], np.cumsum(images_per_prompt)]).astype(np.int64)
    counts = np.broadcast_to(np.asarray(repeats, np.int64), images_per_prompt.shape)
    runs = [
        np.tile(np.arange(token_bounds[first], token_bounds[last]), int(count))
        for first, last, count in zip(image_bounds[:-1], image_bounds[1:], counts)
    ]
    return np.concatenate([np.zeros((0,), np.int64), *runs])


def images_per_prompt_from_tokens(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    grid_thw: np.ndarray,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> np.ndarray:
    """How many of the batch's images each prompt row holds, read off its `<|image_pad|>` count.

    Images are dealt out to rows in order (the collate order of `grid_thw`), so row r owns the images whose
    tokens add up to its placeholder count; a count that does not end on an image boundary is an error.

    input_ids int[P, T]; attention_mask bool[P, T] or None (all real); grid_thw int[n_images, 3].
    Returns int64[P].
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [n_prompts, length]; got {ids.shape}")
    is_image = ids == image_token_id
    if attention_mask is not None:
        is_image &= np.asarray(attention_mask).astype(bool)
    per_row = is_image.sum(axis=1)
    row_ends = np.cumsum(per_row)
    image_ends = np.concatenate([[0], np.cumsum(num_image_tokens(grid_thw, spatial_merge_size))])
    # Each row must end exactly where some image ends, and the last row where the last image ends.
    last_image = np.searchsorted(image_ends, row_ends)
    inside = last_image < image_ends.size
    on_boundary = inside & (image_ends[np.minimum(last_image, image_ends.size - 1)] == row_ends)
    if not np.all(on_boundary) or int(row_ends[-1] if row_ends.size else 0) != int(image_ends[-1]):
        raise ValueError(
            f"the rows' image tokens ({per_row.tolist()}) do not split into whole images of grid_thw (tokens per "
            f"image: {np.diff(image_ends).tolist()}); give each row its own images, in row order, each expanded "
            "to prod(grid)/merge² <|image_pad|> tokens"
        )
    return np.diff(np.concatenate([[0], last_image])).astype(np.int64)


def prepare_vision_inputs(
    pixel_values: np.ndarray,
    grid_thw: np.ndarray,
    config: VisionConfig,
    *,
    bucket_sizes: Sequence[int] | None = DEFAULT_PATCH_BUCKETS,
    repeats: int | Sequence[int] | np.ndarray = 1,
    images_per_prompt: Sequence[int] | np.ndarray | None = None,
    max_repeats: int | None = None,
) -> dict[str, np.ndarray]:
    """Everything the jitted `VisionTower` needs for a batch of images, padded to a patch bucket.

    pixel_values: float[N, C*T*p*p] patches of all images, concatenated in processor order (as returned by
        `processor.preprocess_images` or HF's `Qwen2VLImageProcessorPil`).
    grid_thw: int[n_images, 3]; N must equal sum(t*h*w).
    bucket_sizes: allowed padded patch counts (multiples of `config.window_patches`); None pads only to the next
        multiple of `config.window_patches` (one compilation per distinct patch count).
    repeats: emit each prompt's image tokens this many times in a row, as a batch holding G samples per prompt
        (prompt-major rows p * G + g) needs. The tower still encodes every image once: the copies are a gather
        of its output (and their gradients add up), so this costs 1/repeats of repeating the pixels. An
        int[n_prompts] gives each prompt its own count (a shard of rows holding part of a prompt's group).
    images_per_prompt: int[n_prompts], how many consecutive images (in `grid_thw` order) each prompt holds; 0
        for a text-only prompt. A prompt's run is all its images in order, so prompt p with images (a, b)
        yields a b a b ... (repeats times), the order its G tiled rows read them in. None means one image per
        prompt, i.e. each image's tokens repeated on their own (image 0 x repeats, image 1 x repeats, ...).

    max_repeats: sizes the output for this many repeats (default: the largest of `repeats`), so shards with
        different counts share one shape.

    Returns a dict of numpy arrays, with P the padded patch count and M = max_repeats * P / merge²:
      "patches":              float32[P, C*T*p*p]  patches in window order; padding rows are zero.
      "window_segment_ids":   int32[P]   attention segment of each patch in windowed blocks (one per window).
      "full_segment_ids":     int32[P]   attention segment in full-attention blocks (one per image frame).
      "rotary_cos", "rotary_sin": float32[P, head_dim]  2-D rotary tables in window order.
      "inverse_window_index": int32[M]   for each output token (processor order), its window-order merged row.
      "token_valid":          bool[M]    True for the repeats * sum(t*h*w)/merge² real tokens, which come first.
    Padding patches form their own segment in both segmentations, so they never influence real patches.
    """
    grid = validate_grid_thw(grid_thw, config.spatial_merge_size)
    pixels = np.asarray(pixel_values)
    num_patches = int(np.sum(np.prod(grid, axis=1)))
    if pixels.ndim != 2 or pixels.shape[1] != config.patch_dim:
        raise ValueError(
            f"pixel_values must have shape [num_patches, {config.patch_dim}] (C*T*p*p = {config.in_channels}*"
            f"{config.temporal_patch_size}*{config.patch_size}*{config.patch_size}); got {pixels.shape}"
        )
    if pixels.shape[0] != num_patches:
        raise ValueError(
            f"pixel_values has {pixels.shape[0]} patches but grid_thw {grid.tolist()} describes {num_patches}; "
            "pass the pixel_values and grid_thw of the same images"
        )
    per_prompt = validate_images_per_prompt(images_per_prompt, len(grid))
    counts = _validate_repeats(repeats, len(per_prompt))
    max_repeats = int(counts.max(initial=1)) if max_repeats is None else int(max_repeats)
    if counts.size and counts.max() > max_repeats:
        raise ValueError(f"max_repeats={max_repeats} is below the largest of repeats ({int(counts.max())})")
    unit = config.merge_unit
    layout = window_layout(
        grid,
        spatial_merge_size=config.spatial_merge_size,
        window_size=config.window_size,
        patch_size=config.patch_size,
    )
    padded = choose_bucket(num_patches, bucket_sizes, multiple=config.window_patches)

    # Window order at patch granularity: each merge unit's patches stay together and in order.
    patch_order = (layout.window_index[:, None] * unit + np.arange(unit)).reshape(-1)
    patches = np.zeros((padded, config.patch_dim), dtype=np.float32)
    patches[:num_patches] = pixels[patch_order]

    positions = np.zeros((padded, 2), dtype=np.int64)
    positions[:num_patches] = merge_order_positions(grid, config.spatial_merge_size)[patch_order]
    cos, sin = vision_rotary_tables(positions, head_dim=config.head_dim, theta=config.rope_theta)

    # Output token k (processor order, each prompt's run repeated) reads window-order merged row inverse[k];
    # rows past the real tokens read any in-range row: token_valid zeroes them.
    to_window_order = np.argsort(layout.window_index)
    real = to_window_order[repeated_token_order(num_image_tokens(grid, config.spatial_merge_size), per_prompt, counts)]
    padded_units = padded // unit
    outputs = max_repeats * padded_units
    inverse = np.arange(outputs, dtype=np.int64) % padded_units
    inverse[: real.size] = real
    # Window order only moves units within their frame, so frames stay contiguous and the per-frame
    # segments of full attention apply unchanged to the permuted sequence.
    return {
        "patches": patches,
        "window_segment_ids": segment_ids_from_lengths(layout.window_lengths * unit, padded),
        "full_segment_ids": segment_ids_from_lengths(frame_lengths(grid), padded),
        "rotary_cos": cos,
        "rotary_sin": sin,
        "inverse_window_index": inverse.astype(np.int32),
        "token_valid": np.arange(outputs) < real.size,
    }


def empty_vision_inputs(config: VisionConfig, padded_patches: int, *, repeats: int = 1) -> dict[str, np.ndarray]:
    """`prepare_vision_inputs`' layout for a bucket holding no image (all padding, no valid token)."""
    units = padded_patches // config.merge_unit
    outputs = repeats * units
    return {
        "patches": np.zeros((padded_patches, config.patch_dim), np.float32),
        "window_segment_ids": np.zeros((padded_patches,), np.int32),
        "full_segment_ids": np.zeros((padded_patches,), np.int32),
        "rotary_cos": np.ones((padded_patches, config.head_dim), np.float32),
        "rotary_sin": np.zeros((padded_patches, config.head_dim), np.float32),
        "inverse_window_index": (np.arange(outputs) % units).astype(np.int32),
        "token_valid": np.zeros((outputs,), bool),
    }


def _validate_repeats(repeats: int | Sequence[int] | np.ndarray, num_prompts: int) -> np.ndarray:
    """`repeats` (an int or one count per prompt) -> int64[num_prompts], each >= 1."""
    counts = np.asarray(repeats)
    if counts.ndim == 0:
        if int(counts) != counts:
            raise ValueError(f"repeats must be a positive integer; got {repeats!r}")
        counts = np.full((num_prompts,), int(counts))
    if counts.shape != (num_prompts,) or (counts.size and not np.issubdtype(counts.dtype, np.integer)):
        raise ValueError(f"repeats must be a positive integer or one per prompt ({num_prompts}); got {repeats!r}")
    if np.any(counts < 1):
        raise ValueError(f"repeats must be a positive integer; got {counts.tolist()}")
    return counts.astype(np.int64)


def _shard_image_spans(images_per_prompt: np.ndarray, patches_per_image: np.ndarray,
                       plan: Sequence[RowShard]) -> list[tuple[int, int, int, int]]:
    """(first image, stop image, first patch, stop patch) of each block of `plan`."""
    image_bounds = np.concatenate([[0], np.cumsum(images_per_prompt)]).astype(np.int64)
    patch_bounds = np.concatenate([[0], np.cumsum(patches_per_image)]).astype(np.int64)
    if plan and plan[-1].stop > len(images_per_prompt):
        raise ValueError(
            f"the row plan covers {plan[-1].stop} prompts; images_per_prompt has {len(images_per_prompt)}"
        )
    spans = []
    for shard in plan:
        i0, i1 = int(image_bounds[shard.first]), int(image_bounds[shard.stop])
        spans.append((i0, i1, int(patch_bounds[i0]), int(patch_bounds[i1])))
    return spans


def fullest_shard_patches(grid_thw: np.ndarray, config: VisionConfig, *, plan: Sequence[RowShard],
                          images_per_prompt: Sequence[int] | np.ndarray | None = None) -> int:
    """The patch count of the fullest block of `plan`: what every block's bucket must hold (agree it over
    processes before `prepare_sharded_vision_inputs`)."""
    grid = validate_grid_thw(grid_thw, config.spatial_merge_size, allow_empty=True)
    spans = _shard_image_spans(validate_images_per_prompt(images_per_prompt, len(grid)), np.prod(grid, axis=1), plan)
    return max((p1 - p0 for _, _, p0, p1 in spans), default=0)


def prepare_sharded_vision_inputs(
    pixel_values: np.ndarray,
    grid_thw: np.ndarray,
    config: VisionConfig,
    *,
    plan: Sequence[RowShard],
    images_per_prompt: Sequence[int] | np.ndarray | None = None,
    bucket_sizes: Sequence[int] | None = DEFAULT_PATCH_BUCKETS,
    min_patches: int = 0,
) -> dict[str, np.ndarray]:
    """`prepare_vision_inputs` per block of rows (`models/image_shards.py`): block k of `plan` encodes the images
    of its prompts once and emits each prompt's image tokens once per row it holds of that prompt.

    The images (in batch order) belong to the prompts by `images_per_prompt` (None: one image per prompt). All
    blocks share one bucket, the smallest holding the fullest block and `min_patches` (the fullest block over
    all processes, so every process builds the same shapes). Every array gains a leading axis K = len(plan), and
    `image_shards.IMAGES_PER_SHARD` int32[K] counts each block's images; `VisionTower` returns [K, M, D] with
    M = (most rows of one prompt in any block) * bucket / merge².
    """
    grid = validate_grid_thw(grid_thw, config.spatial_merge_size, allow_empty=True)
    per_prompt = validate_images_per_prompt(images_per_prompt, len(grid))
    patches_per_image = np.prod(grid, axis=1)
    pixel_values = np.asarray(pixel_values)
    if pixel_values.shape[0] != patches_per_image.sum():
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but grid_thw {grid.tolist()} describes "
            f"{int(patches_per_image.sum())}; pass the pixel_values and grid_thw of the same images"
        )
    if not plan:
        raise ValueError("the row plan holds no shard; plan at least one (image_shards.plan_row_shards)")
    spans = _shard_image_spans(per_prompt, patches_per_image, plan)
    fullest = max(max(p1 - p0 for _, _, p0, p1 in spans), int(min_patches), 1)
    padded = choose_bucket(fullest, bucket_sizes, multiple=config.window_patches)
    max_repeats = max(int(shard.rows.max(initial=1)) for shard in plan)
    shards = []
    for shard, (i0, i1, p0, p1) in zip(plan, spans):
        prompts = per_prompt[shard.first:shard.stop]
        with_images = prompts > 0  # text-only prompts add no token anywhere
        if i1 == i0:
            shards.append(empty_vision_inputs(config, padded, repeats=max_repeats))
            continue
        shards.append(prepare_vision_inputs(
            pixel_values[p0:p1], grid[i0:i1], config, bucket_sizes=(padded,), repeats=shard.rows[with_images],
            images_per_prompt=prompts[with_images], max_repeats=max_repeats,
        ))  # fmt: skip
    out = {key: np.stack([shard[key] for shard in shards]) for key in shards[0]}
    out[IMAGES_PER_SHARD] = np.asarray([i1 - i0 for i0, i1, _, _ in spans], np.int32)
    return out


def num_image_tokens(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """Language-model tokens per image: t*h*w / merge². int64[n_images] (empty for no image)."""
    grid = validate_grid_thw(grid_thw, spatial_merge_size, allow_empty=True)
    return np.prod(grid, axis=1) // (spatial_merge_size**2)
