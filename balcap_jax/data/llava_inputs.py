"""The pipeline's processor for LLaVA-1.5 captioning prompts: conversation template, CLIP image preprocessing,
`<image>` expansion and 1-D positions for one example.

    processor = LlavaCaptionProcessor(tokenizer, image_token_id=config.image_token_id,
                                      image_seq_length=config.image_seq_length)
    dataset = make_dataset(source, processor, PipelineConfig(batch_size=8, buckets=(640,), pad_id=processor.pad_id))

Per example it returns input_ids int32[T] (the prompt tokenized with the tokenizer's special tokens, e.g. BOS,
then each `<image>` token repeated image_seq_length times), positions int32[T] = 0..T-1 and pixel_values
float32[1, crop, crop, 3] (channels last). Left-padded by the pipeline, positions stay 0.. on the real tokens,
as `models.llava.processor.padded_positions` computes them on a padded batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from balcap_jax.data.records import CaptionExample
from balcap_jax.models.llava.processor import (
    ClipImageProcessorConfig,
    expand_image_token_ids,
    format_llava_prompt,
    preprocess_image,
)


@dataclasses.dataclass(frozen=True)
class LlavaCaptionProcessor:
    """CaptionExample -> LLaVA-1.5 prompt features (see module docstring)."""

    tokenizer: Any
    image_token_id: int
    image_seq_length: int = 576
    instruction: str = "Describe the image in detail."
    image_config: ClipImageProcessorConfig = ClipImageProcessorConfig()
    system: str | None = None

    def __post_init__(self):
        if self.image_seq_length < 1:
            raise ValueError(f"LlavaCaptionProcessor.image_seq_length must be >= 1; got {self.image_seq_length}")

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def __call__(self, example: CaptionExample) -> dict[str, np.ndarray]:
        text = format_llava_prompt(self.instruction, num_images=1, system=self.system)
        ids = list(self.tokenizer(text)["input_ids"])
        if ids.count(self.image_token_id) != 1:
            raise ValueError(
                f"the tokenizer turned '<image>' into {ids.count(self.image_token_id)} tokens of id "
                f"{self.image_token_id}; give the image_token_id the tokenizer uses for '<image>'"
            )
        input_ids = np.asarray(expand_image_token_ids(ids, self.image_token_id, self.image_seq_length), np.int32)
        return {
            "input_ids": input_ids,
            "positions": np.arange(len(input_ids), dtype=np.int32),
            "pixel_values": preprocess_image(example.image, self.image_config)[None],
        }
