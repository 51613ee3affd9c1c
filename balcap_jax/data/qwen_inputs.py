"""The pipeline's processor for Qwen2.5-VL captioning prompts: chat template, image patches, image-token
expansion and host-side M-RoPE positions for one example.

    processor = QwenCaptionProcessor(load_tokenizer(), instruction="Describe the image in detail.")
    config = PipelineConfig(batch_size=8, buckets=(128, 256), pad_id=processor.pad_id,
                            concat_keys=QWEN_CONCAT_KEYS)
    dataset = make_dataset(source, processor, config)

Per example it returns input_ids int32[T], mm_token_type_ids int32[T], positions int32[3, T],
pixel_values float32[N, C·t·p·p] and image_grid_thw int64[1, 3]. Positions are computed on the unpadded prompt;
the pipeline left-pads them with zeros, which equals computing them on the left-padded batch (padding is
masked and real tokens start at 0 either way).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from balcap_jax.data.records import CaptionExample
from balcap_jax.models.qwen2_5_vl.processor import (
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_TOKEN_ID,
    ImageProcessorConfig,
    caption_prompt,
    encode_prompt,
)
from balcap_jax.models.qwen2_5_vl.family import CONCAT_KEYS as QWEN_CONCAT_KEYS  # noqa: F401 (the pipeline's name)
from balcap_jax.models.qwen2_5_vl.rope_index import get_rope_index


@dataclasses.dataclass(frozen=True)
class QwenCaptionProcessor:
    """CaptionExample -> Qwen2.5-VL prompt features (see module docstring)."""

    tokenizer: Any
    instruction: str = "Describe the image in detail."
    image_config: ImageProcessorConfig = ImageProcessorConfig()
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def __call__(self, example: CaptionExample) -> dict[str, np.ndarray]:
        text = caption_prompt(self.instruction, num_images=1, system_prompt=self.system_prompt)
        features = encode_prompt(self.tokenizer, text, [example.image], self.image_config)
        positions, _ = get_rope_index(
            features["input_ids"][None],
            None,
            features["image_grid_thw"],
            image_token_id=IMAGE_TOKEN_ID,
            spatial_merge_size=self.image_config.merge_size,
        )
        features["positions"] = positions[:, 0].astype(np.int32)
        return features
