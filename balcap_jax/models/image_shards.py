"""Images laid out by batch shard: each shard of rows encodes only the images its rows read.

A batch of B rows is cut into K equal blocks of consecutive rows (K = the mesh's batch shards, times the update's
micro-batches). Block k's vision inputs hold the images of exactly the prompts its rows belong to, each image
once however many of the block's rows repeat it (the G rollouts of a prompt), and every array of the vision
pytree gains a leading axis K that is sharded like the rows. The towers keep that axis through every op
(attention folds it into its batch), so a device encodes its own rows' images and nothing else, and the
embeddings reach their rows without leaving the device (`scatter_image_embeddings` per block).

Host side (numpy): `plan_row_shards` says which prompts, and how many rows of each, a block holds; the model
families build each block's arrays from it (`qwen2_5_vl.vision_host.prepare_sharded_vision_inputs`,
`llava.processor.sharded_vision_inputs`). A vision pytree laid out this way carries `IMAGES_PER_SHARD`
(int32[K], distinct images per block), which is how placement code tells it from a flat, replicated one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from balcap_jax.models.attention import ambient_batch_axes

Array = jax.Array

IMAGES_PER_SHARD = "images_per_shard"


def is_sharded(vision: Mapping[str, Any] | None) -> bool:
    """Whether a vision pytree is laid out by batch shard (every leaf [K, ...])."""
    return isinstance(vision, Mapping) and IMAGES_PER_SHARD in vision


@dataclasses.dataclass(frozen=True)
class RowShard:
    """One block of rows: prompts [first, stop) of the batch, `rows[i]` rows of prompt first + i (>= 1)."""

    first: int
    stop: int
    rows: np.ndarray  # int64[stop - first]


def plan_row_shards(num_prompts: int, rows_per_prompt: int, shards: int) -> list[RowShard]:
    """Cut the num_prompts * rows_per_prompt rows of a prompt-major batch (row p·G + g is prompt p) into `shards`
    equal blocks of consecutive rows. A prompt whose rows straddle two blocks appears in both (its images are
    then encoded once per block); with rows_per_prompt | rows per block no prompt straddles."""
    rows = num_prompts * rows_per_prompt
    if shards < 1 or rows % shards:
        raise ValueError(
            f"{num_prompts} prompts x {rows_per_prompt} rows = {rows} rows do not split into {shards} equal vision "
            "shards (the mesh's batch shards x micro-batches); make the batch a multiple of them"
        )
    per = rows // shards
    plan = []
    for k in range(shards):
        lo, hi = k * per, (k + 1) * per
        first, stop = lo // rows_per_prompt, -(-hi // rows_per_prompt)
        starts = np.maximum(np.arange(first, stop) * rows_per_prompt, lo)
        ends = np.minimum(np.arange(first + 1, stop + 1) * rows_per_prompt, hi)
        plan.append(RowShard(first, stop, (ends - starts).astype(np.int64)))
    return plan


def map_over_shards(fn: Callable[[Any], Array], inputs: Any) -> Array:
    """`fn` (one shard's inputs -> one shard's output) over the leading shard axis of `inputs`, the axis split
    over the mesh's batch axes as the rows are (`vmap` with `spmd_axis_name`, so fused kernels under shard_map
    inside `fn` stay per device too)."""
    size = jax.tree.leaves(inputs)[0].shape[0]
    return jax.vmap(fn, spmd_axis_name=ambient_batch_axes(size))(inputs)


def _scatter_rows(embeds: Array, is_image: Array, image_embeds: Array) -> Array:
    rank = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    gathered = image_embeds[jnp.clip(rank, 0, image_embeds.shape[0] - 1)].astype(embeds.dtype)
    return jnp.where(is_image[..., None], gathered, embeds)


def scatter_image_embeddings(embeds: Array, is_image: Array, image_embeds: Array) -> Array:
    """Replace the image-placeholder rows of `embeds` by image embeddings, in reading order (HF's `masked_scatter`).

    embeds [B, T, D]; is_image bool[B, T]; image_embeds [M, D] (one sequence for the whole batch) or [K, M, D]
    (per block: block k = rows [k·B/K, (k+1)·B/K)). Within a block, the j-th True of `is_image` (row-major)
    receives its image_embeds[j]; rows past the real embeddings are the caller's bucket padding. Callers
    guarantee each block has no more placeholders than M (checked on the host).
    """
    chex.assert_rank([embeds, is_image], [3, 2])
    if image_embeds.shape[-1] != embeds.shape[-1]:
        raise ValueError(f"image embeddings have width {image_embeds.shape[-1]}, text embeddings {embeds.shape[-1]}")
    if image_embeds.ndim == 2:
        return _scatter_rows(embeds, is_image, image_embeds)
    chex.assert_rank(image_embeds, 3)
    shards = image_embeds.shape[0]
    batch, length, width = embeds.shape
    if batch % shards:
        raise ValueError(f"{batch} rows do not split into the {shards} shards of the image embeddings")
    blocks = lambda x: x.reshape(shards, batch // shards, *x.shape[1:])  # noqa: E731
    out = map_over_shards(lambda a: _scatter_rows(*a), (blocks(embeds), blocks(is_image), image_embeds))
    return out.reshape(batch, length, width)
