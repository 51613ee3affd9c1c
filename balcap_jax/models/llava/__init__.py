"""LLaVA-1.5 (CLIP ViT-L/14-336 + 2-layer GELU projector + Llama decoder) in Flax NNX."""

from balcap_jax.models.llava.config import CLIPVisionConfig, LlavaConfig, llava_1_5_7b, llava_1_5_13b, tiny
from balcap_jax.models.llava.model import LlavaForCausalLM
from balcap_jax.models.llava.params import abstract_llava, llava_param_mapping, load_llava, save_llava
from balcap_jax.models.llava.processor import (
    ClipImageProcessorConfig,
    caption_prompt,
    encode_prompt,
    make_batch,
    preprocess_images,
)
from balcap_jax.models.llava.sharding import LlavaSharding

__all__ = [
    "CLIPVisionConfig",
    "ClipImageProcessorConfig",
    "LlavaConfig",
    "LlavaForCausalLM",
    "LlavaSharding",
    "abstract_llava",
    "caption_prompt",
    "encode_prompt",
    "llava_1_5_13b",
    "llava_1_5_7b",
    "llava_param_mapping",
    "load_llava",
    "make_batch",
    "preprocess_images",
    "save_llava",
    "tiny",
]
