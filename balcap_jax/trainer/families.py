"""What the training loop does differently per policy family: prompt processing, vision inputs, ids never to
sample. Everything else in the loop (sampler, log-probs, update, judges) is family-agnostic.

  Qwen2.5-VL: dynamic-resolution patches (`pixel_values` [N_patches, C·t·p·p] + `image_grid_thw`), host-side
              window/rotary tables, M-RoPE positions [3, B, T].
  LLaVA-1.5:  fixed-size CLIP crops [B, H, W, 3], 1-D positions.

Both lay a batch's images out by block of rows (`models/image_shards.py`): each block (a batch shard of the mesh,
times the update's micro-batches) encodes the images of its own rows' prompts, once each, however many of its
rows (the G rollouts of a prompt) read them. Every process builds only the blocks of its own rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from balcap_jax.data.llava_inputs import LlavaCaptionProcessor
from balcap_jax.data.qwen_inputs import QWEN_CONCAT_KEYS, QwenCaptionProcessor
from balcap_jax.models import image_shards
from balcap_jax.models.llava.processor import shard_sizes, sharded_vision_inputs
from balcap_jax.models.qwen2_5_vl.vision_host import (
    fullest_shard_patches,
    images_per_prompt_from_tokens,
    prepare_sharded_vision_inputs,
)
from balcap_jax.parallel import hosts


@dataclasses.dataclass(frozen=True)
class QwenFamily:
    concat_keys: tuple[str, ...] = QWEN_CONCAT_KEYS

    def processor(self, policy: Any, instruction: str) -> QwenCaptionProcessor:
        return QwenCaptionProcessor(policy.tokenizer, instruction=instruction, image_config=policy.image_config)

    def images_per_prompt(self, policy: Any, batch: Mapping[str, Any]) -> np.ndarray:
        """int[B]: how many consecutive images of the batch each row owns (read from its image tokens)."""
        c = policy.model_config
        return images_per_prompt_from_tokens(
            np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"], bool),
            np.asarray(batch["image_grid_thw"]), image_token_id=int(c.image_token_id),
            spatial_merge_size=int(c.vision.spatial_merge_size),
        )

    def vision_inputs(self, policy: Any, batch: Mapping[str, Any], repeats: int, shards: int) -> dict[str, np.ndarray]:
        """This process's rows' images in `shards` blocks of the batch's rows, each prompt's rows `repeats` copies
        (prompt-major); the patch bucket is agreed over processes, so every process builds the same shapes."""
        per_prompt = self.images_per_prompt(policy, batch)
        plan = image_shards.plan_row_shards(len(per_prompt), repeats, shards)
        vision, grid = policy.model_config.vision, np.asarray(batch["image_grid_thw"])
        fullest = hosts.agree_max(fullest_shard_patches(grid, vision, plan=plan, images_per_prompt=per_prompt))
        return prepare_sharded_vision_inputs(
            np.asarray(batch["pixel_values"]), grid, vision, plan=plan, images_per_prompt=per_prompt,
            min_patches=fullest,
        )

    def blocked_ids(self, policy: Any) -> tuple[int, ...]:
        c = policy.model_config
        return (int(c.image_token_id), int(c.vision_start_token_id), int(c.vision_end_token_id))


@dataclasses.dataclass(frozen=True)
class LlavaFamily:
    concat_keys: tuple[str, ...] = ("pixel_values",)

    def processor(self, policy: Any, instruction: str) -> LlavaCaptionProcessor:
        c = policy.model_config
        return LlavaCaptionProcessor(
            policy.tokenizer, image_token_id=int(c.image_token_id), image_seq_length=int(c.image_seq_length),
            instruction=instruction, image_config=policy.image_config,
        )

    def images_per_prompt(self, policy: Any, batch: Mapping[str, Any]) -> np.ndarray:
        del policy
        return np.ones((len(batch["pixel_values"]),), np.int64)  # one CLIP crop per row

    def vision_inputs(self, policy: Any, batch: Mapping[str, Any], repeats: int, shards: int) -> dict[str, np.ndarray]:
        """This process's rows' crops in `shards` blocks of rows, each distinct crop once per block (CLIP encodes
        it once; its features fill the block's `repeats` rows of its prompt)."""
        per_prompt = self.images_per_prompt(policy, batch)
        plan = image_shards.plan_row_shards(len(per_prompt), repeats, shards)
        images, runs = shard_sizes(plan, per_prompt, int(per_prompt.sum()))
        return sharded_vision_inputs(
            np.asarray(batch["pixel_values"]), plan=plan, images_per_prompt=per_prompt,
            min_images=hosts.agree_max(images), min_runs=hosts.agree_max(runs),
        )

    def blocked_ids(self, policy: Any) -> tuple[int, ...]:
        return (int(policy.model_config.image_token_id),)


FAMILIES = {"qwen2_5_vl": QwenFamily(), "llava": LlavaFamily()}


def family_of(policy: Any):
    try:
        return FAMILIES[policy.family.name]
    except KeyError:
        raise ValueError(
            f"the training loop has no data adapter for model family {policy.family.name!r}; known: {sorted(FAMILIES)}"
        ) from None
