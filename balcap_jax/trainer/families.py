"""What the training loop does differently per policy family: prompt processing, vision inputs, ids never to
sample. Everything else in the loop (sampler, log-probs, update, judges) is family-agnostic.

  Qwen2.5-VL: dynamic-resolution patches concatenated over the batch (`pixel_values` [N_patches, C·t·p·p] +
              `image_grid_thw`), host-side window/rotary tables, M-RoPE positions [3, B, T]; the G rollouts of a
              prompt share one encoding of its images (`prepare_vision_inputs(repeats=G, images_per_prompt=...)`).
  LLaVA-1.5:  fixed-size CLIP crops [B, H, W, 3], 1-D positions; each of the G rows carries its image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from balcap_jax.data.llava_inputs import LlavaCaptionProcessor
from balcap_jax.data.qwen_inputs import QWEN_CONCAT_KEYS, QwenCaptionProcessor
from balcap_jax.models.qwen2_5_vl.vision_host import images_per_prompt_from_tokens, prepare_vision_inputs


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

    def vision_inputs(self, policy: Any, batch: Mapping[str, Any], repeats: int) -> dict[str, np.ndarray]:
        """The batch's images (all processes' when `host_data` gathered them, with their "images_per_prompt")."""
        # Rows own consecutive images (collate order); a prompt's G copies must read all of its images in order.
        images_per_prompt = batch.get("images_per_prompt")
        if images_per_prompt is None:
            images_per_prompt = self.images_per_prompt(policy, batch)
        return prepare_vision_inputs(
            np.asarray(batch["pixel_values"]), np.asarray(batch["image_grid_thw"]), policy.model_config.vision,
            repeats=repeats, images_per_prompt=np.asarray(images_per_prompt),
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

    def vision_inputs(self, policy: Any, batch: Mapping[str, Any], repeats: int) -> dict[str, np.ndarray]:
        del policy
        return {"pixel_values": np.repeat(np.asarray(batch["pixel_values"], np.float32), repeats, axis=0)}

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
