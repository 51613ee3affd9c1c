"""Qwen2.5-VL as a `ModelFamily`: dynamic-resolution patches (`pixel_values` [N_patches, C·t·p·p] +
`image_grid_thw`), host-side window/rotary tables, M-RoPE positions [3, B, T].

Images are laid out by block of rows (`models/image_shards.py`): each block (a batch shard of the mesh, times the
update's micro-batches) encodes the images of its own rows' prompts, once each, however many of its rows (the G
rollouts of a prompt) read them. Every process builds only the blocks of its own rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from balcap_jax.models import image_shards
from balcap_jax.models.model_family import ModelFamily
from balcap_jax.models.qwen2_5_vl import processor
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from balcap_jax.models.qwen2_5_vl.params import load_qwen2_5_vl, save_qwen2_5_vl
from balcap_jax.models.qwen2_5_vl.sharding import QwenSharding
from balcap_jax.models.qwen2_5_vl.vision_host import (
    fullest_shard_patches,
    images_per_prompt_from_tokens,
    prepare_sharded_vision_inputs,
    validate_grid_thw,
)
from balcap_jax.parallel import hosts

# The flat patch rows and their grids vary in count per example, so batches concatenate them.
CONCAT_KEYS = ("pixel_values", "image_grid_thw")


def images_per_prompt(model_config: Qwen2_5_VLConfig, batch: Mapping[str, Any]) -> np.ndarray:
    """int[B]: how many consecutive images of the batch each row owns (read from its image tokens)."""
    c = model_config
    return images_per_prompt_from_tokens(
        np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"], bool),
        batch.get("image_grid_thw", ()), image_token_id=int(c.image_token_id),
        spatial_merge_size=int(c.vision.spatial_merge_size),
    )


def vision_inputs(model_config: Qwen2_5_VLConfig, batch: Mapping[str, Any], repeats: int,
                  shards: int) -> dict[str, np.ndarray] | None:
    """This process's rows' images in `shards` blocks of the batch's rows, each prompt's rows `repeats` copies
    (prompt-major); the patch bucket is agreed over processes, so every process builds the same shapes.

    None when no process's rows hold an image (a text-only batch: the tower does not run). Whether any image
    exists is agreed first, so a process without images builds all-padding blocks when another has some."""
    vision = model_config.vision
    grid = validate_grid_thw(batch.get("image_grid_thw", ()), vision.spatial_merge_size, allow_empty=True)
    if hosts.agree_max(len(grid)) == 0:
        return None
    per_prompt = images_per_prompt(model_config, batch)
    plan = image_shards.plan_row_shards(len(per_prompt), repeats, shards)
    fullest = hosts.agree_max(fullest_shard_patches(grid, vision, plan=plan, images_per_prompt=per_prompt))
    return prepare_sharded_vision_inputs(
        np.asarray(batch.get("pixel_values", ())), grid, vision, plan=plan, images_per_prompt=per_prompt,
        min_patches=fullest,
    )


def blocked_ids(model_config: Qwen2_5_VLConfig) -> tuple[int, ...]:
    c = model_config
    return (int(c.image_token_id), int(c.vision_start_token_id), int(c.vision_end_token_id))


FAMILY = ModelFamily(
    name="qwen2_5_vl",
    hf_model_types=("qwen2_5_vl",),
    config_from_hf=Qwen2_5_VLConfig.from_hf,
    model_class=Qwen2_5_VL,
    load=load_qwen2_5_vl,
    save=save_qwen2_5_vl,
    sharding=QwenSharding.layout,
    processor=processor,
    concat_keys=CONCAT_KEYS,
    images_per_prompt=images_per_prompt,
    vision_inputs=vision_inputs,
    blocked_ids=blocked_ids,
)
