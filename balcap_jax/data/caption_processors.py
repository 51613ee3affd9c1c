"""Which pipeline processor turns a caption example into a family's prompt features, keyed by family name.

The model families (`models/registry.py`) sit below the data layer and cannot build these processors, so the
choice lives here:

    processor = caption_processor(policy.family.name, tokenizer=policy.tokenizer,
                                  model_config=policy.model_config, image_config=policy.image_config,
                                  instruction="Describe the image in detail.")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from balcap_jax.data.llava_inputs import LlavaCaptionProcessor
from balcap_jax.data.qwen_inputs import QwenCaptionProcessor

CaptionProcessor = QwenCaptionProcessor | LlavaCaptionProcessor


def _qwen(tokenizer: Any, model_config: Any, image_config: Any, instruction: str) -> QwenCaptionProcessor:
    del model_config  # Qwen's image tokens follow from the image, not the config
    return QwenCaptionProcessor(tokenizer, instruction=instruction, image_config=image_config)


def _llava(tokenizer: Any, model_config: Any, image_config: Any, instruction: str) -> LlavaCaptionProcessor:
    c = model_config
    return LlavaCaptionProcessor(
        tokenizer, image_token_id=int(c.image_token_id), image_seq_length=int(c.image_seq_length),
        instruction=instruction, image_config=image_config,
    )


_BUILDERS: dict[str, Callable[[Any, Any, Any, str], CaptionProcessor]] = {"qwen2_5_vl": _qwen, "llava": _llava}


def families() -> list[str]:
    """The family names this module has a caption processor for."""
    return sorted(_BUILDERS)


def caption_processor(family: str, *, tokenizer: Any, model_config: Any, image_config: Any,
                      instruction: str) -> CaptionProcessor:
    """The pipeline processor for model family `family`: `tokenizer` (HF tokenizer), `model_config` (the
    family's config), `image_config` (its image processing config), `instruction` (the caption request)."""
    if family not in _BUILDERS:
        raise ValueError(f"no caption processor for model family {family!r}; known: {families()}")
    return _BUILDERS[family](tokenizer, model_config, image_config, instruction)
