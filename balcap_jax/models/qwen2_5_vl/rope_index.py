"""M-RoPE position ids on the host (numpy), equal to HF `Qwen2_5_VLModel.get_rope_index` for images.

Every real token gets a (t, h, w) position triple:
  * text: the running text position on all three axes, one step per token;
  * an image of grid (T, H, W) patches starting at running position p: its T * (H/m) * (W/m) merged tokens
    (m = spatial_merge_size), in row-major (t, h, w) order, get (p + t, p + h, p + w); the running position
    then advances by max(H, W) / m (HF's rule for images, whose temporal extent is 1).
Padding slots (attention_mask False) get position 0 and do not advance the running position, so left and
right padding give the same positions to the real tokens.

`rope_deltas[b]` = max position + 1 - number of real tokens: generated text at real-token index n sits at
position n + delta (HF's arithmetic; `interface.next_text_positions` gives the first one on device).
"""

from __future__ import annotations

import numpy as np


def image_token_count(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """Merged tokens per image: prod(grid_thw) / merge^2. grid_thw int[N, 3] -> int[N]."""
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    if np.any(grid_thw[:, 1:] % spatial_merge_size):
        raise ValueError(f"image_grid_thw {grid_thw.tolist()} has a height/width not divisible by "
                         f"spatial_merge_size={spatial_merge_size}")
    return np.prod(grid_thw, axis=1) // (spatial_merge_size**2)


def _image_positions(start: int, grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """int[3, T*(H/m)*(W/m)] positions of one image's merged tokens, offset by `start`."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // spatial_merge_size, int(grid_thw[2]) // spatial_merge_size
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions for a batch.

    input_ids int[B, T]; attention_mask bool/int[B, T] or None (all real); image_grid_thw int[N_images, 3] for
    the images of the whole batch in reading order (row by row), or None for a text-only batch.
    Returns positions int32[3, B, T] and rope_deltas int32[B].

    Raises ValueError when the `<|image_pad|>` tokens do not match the grids exactly (count per image ==
    prod(grid_thw) / merge^2), naming the row and the counts.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask = np.ones((batch, length), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    grids = grids.reshape(-1, 3)
    tokens_per_image = image_token_count(grids, spatial_merge_size)

    is_image = (input_ids == image_token_id) & mask
    if is_image.sum() != tokens_per_image.sum():
        raise ValueError(
            f"the batch has {int(is_image.sum())} <|image_pad|> tokens (id {image_token_id}) but image_grid_thw "
            f"{grids.tolist()} needs {int(tokens_per_image.sum())} (prod(grid_thw) / {spatial_merge_size}^2 per "
            "image); expand each image placeholder to its grid's token count"
        )

    positions = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros((batch,), np.int64)
    next_image = 0
    for row in range(batch):
        row_image = is_image[row][mask[row]]
        row_positions = np.zeros((3, row_image.size), np.int64)
        cursor, token = 0, 0  # running text position, index among the row's real tokens
        while token < row_image.size:
            if not row_image[token]:
                run_end = token
                while run_end < row_image.size and not row_image[run_end]:
                    run_end += 1
                row_positions[:, token:run_end] = np.arange(cursor, cursor + run_end - token)
                cursor += run_end - token
                token = run_end
                continue
            if next_image >= len(grids):
                raise ValueError(f"row {row} has more <|image_pad|> tokens than image_grid_thw provides")
            count = int(tokens_per_image[next_image])
            run = row_image[token : token + count]
            if run.size < count or not run.all():
                raise ValueError(
                    f"row {row}: image {next_image} with grid {grids[next_image].tolist()} needs {count} "
                    f"consecutive <|image_pad|> tokens, found {int(np.argmin(np.append(run, False)))}"
                )
            row_positions[:, token : token + count] = _image_positions(cursor, grids[next_image], spatial_merge_size)
            cursor += int(max(grids[next_image][1], grids[next_image][2])) // spatial_merge_size
            token += count
            next_image += 1
        positions[:, row, mask[row]] = row_positions
        deltas[row] = (row_positions.max() + 1 - row_image.size) if row_image.size else 0
    return positions.astype(np.int32), deltas.astype(np.int32)


def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    """1-D positions of a text-only batch: 0, 1, ... over the real tokens of each row, 0 on padding.
    bool[B, T] -> int32[B, T] (broadcast to [3, B, T] for an M-RoPE model)."""
    mask = np.asarray(attention_mask).astype(bool)
    return np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
