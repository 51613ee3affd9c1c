"""LLaVA-1.5 as a `ModelFamily`: fixed-size CLIP crops [B, H, W, 3], one per row, 1-D positions.

Crops are laid out by block of rows (`models/image_shards.py`): each block encodes each distinct crop of its rows
once (CLIP runs once per crop; its features fill the block's rows of that prompt). Every process builds only the
blocks of its own rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from balcap_jax.models import image_shards
from balcap_jax.models.llava import processor
from balcap_jax.models.llava.config import LlavaConfig
from balcap_jax.models.llava.model import LlavaForCausalLM
from balcap_jax.models.llava.params import load_llava, save_llava
from balcap_jax.models.llava.processor import shard_sizes, sharded_vision_inputs
from balcap_jax.models.llava.sharding import LlavaSharding
from balcap_jax.models.model_family import ModelFamily
from balcap_jax.parallel import hosts


def images_per_prompt(model_config: LlavaConfig, batch: Mapping[str, Any]) -> np.ndarray:
    del model_config
    return np.ones((len(batch["pixel_values"]),), np.int64)  # one CLIP crop per row


def vision_inputs(model_config: LlavaConfig, batch: Mapping[str, Any], repeats: int,
                  shards: int) -> dict[str, np.ndarray]:
    """This process's rows' crops in `shards` blocks of rows, each distinct crop once per block (CLIP encodes
    it once; its features fill the block's `repeats` rows of its prompt)."""
    per_prompt = images_per_prompt(model_config, batch)
    plan = image_shards.plan_row_shards(len(per_prompt), repeats, shards)
    images, runs = shard_sizes(plan, per_prompt, int(per_prompt.sum()))
    return sharded_vision_inputs(
        np.asarray(batch["pixel_values"]), plan=plan, images_per_prompt=per_prompt,
        min_images=hosts.agree_max(images), min_runs=hosts.agree_max(runs),
    )


def blocked_ids(model_config: LlavaConfig) -> tuple[int, ...]:
    return (int(model_config.image_token_id),)


FAMILY = ModelFamily(
    name="llava",
    hf_model_types=("llava",),
    config_from_hf=LlavaConfig.from_hf,
    model_class=LlavaForCausalLM,
    load=load_llava,
    save=save_llava,
    sharding=LlavaSharding.layout,
    processor=processor,
    concat_keys=("pixel_values",),  # each example carries its crop as [1, H, W, 3]
    images_per_prompt=images_per_prompt,
    vision_inputs=vision_inputs,
    blocked_ids=blocked_ids,
)
