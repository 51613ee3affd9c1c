"""LLaVA-1.5 configuration: a CLIP vision tower, a 2-layer projector and a Llama decoder.

`CLIPVisionConfig` and the top-level `LlavaConfig` fields carry HF's names; the decoder is the `DecoderConfig`
shared with Qwen2 (`qwen2_5_vl/text.py`, 1-D RoPE, no q/k/v bias). `LlavaConfig.from_hf` reads a
`config.json` of either transformers generation (keys it omits take HF's class defaults, as transformers
does) and `to_hf_dict` writes one back; the presets reproduce `llava-hf/llava-1.5-{7b,13b}-hf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from balcap_jax.models.attention import check_attention_impl
from balcap_jax.models.qwen2_5_vl.text import DecoderConfig

FeatureSelect = Literal["default", "full"]

# transformers' `CLIPVisionConfig()` and `LlamaConfig()` defaults for the fields we read (a test pins them).
HF_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
HF_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
}


def _require_positive(owner: str, **fields: int) -> None:
    for name, value in fields.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP ViT (pre-LN, quick_gelu, CLS token, learned positions); defaults are ViT-L/14 at 336 px."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    attention: str = "reference"  # attention.ATTENTION_IMPLS: the einsum reference or the platform's fused kernel

    def __post_init__(self):
        check_attention_impl(self.attention, field="CLIPVisionConfig.attention")
        _require_positive(
            "CLIPVisionConfig",
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_channels=self.num_channels,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPVisionConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIPVisionConfig.hidden_act must be 'quick_gelu' or 'gelu', got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side (24 for ViT-L/14 at 336 px)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_positions(self) -> int:
        """Patches plus the CLS token."""
        return self.num_patches + 1


def llama_decoder_config(
    *,
    vocab_size: int = 32064,
    hidden_size: int = 4096,
    intermediate_size: int = 11008,
    num_layers: int = 32,
    num_heads: int = 32,
    num_kv_heads: int | None = None,
    rms_norm_eps: float = 1e-5,
    rope_theta: float = 10000.0,
    attention_bias: bool = False,
) -> DecoderConfig:
    """A Llama decoder as the shared `DecoderConfig` (1-D RoPE, no q/k/v bias); defaults are Vicuna-7B-v1.5
    with LLaVA-1.5's 32064-token vocabulary."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    return DecoderConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads if num_kv_heads is None else num_kv_heads,
        head_dim=hidden_size // num_heads,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        mrope_section=None,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=False,
        hidden_act="silu",
        tie_word_embeddings=False,
    )


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The whole LLaVA-1.5 model.

    text: the Llama decoder, as the decoder config shared with Qwen2 (`mrope_section=None`: 1-D RoPE).
    vision_feature_layer: index into the tower's hidden states (0 = embeddings after `pre_layrnorm`, i = after
      layer i); negative counts from the end like HF (-2 = the penultimate layer). A tuple concatenates several.
    vision_feature_select_strategy: "default" drops the CLS token, "full" keeps it.
    tie_word_embeddings: lm_head shares the token embedding (no LLaVA-1.5 release does; kept for completeness).
    """

    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    text: DecoderConfig = dataclasses.field(default_factory=llama_decoder_config)
    image_token_id: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: FeatureSelect = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        if not self.feature_layers:
            raise ValueError("LlavaConfig.vision_feature_layer must name at least one layer")
        for layer in self.feature_layers:
            if not -(self.vision.num_hidden_layers + 1) <= layer <= self.vision.num_hidden_layers:
                raise ValueError(
                    f"LlavaConfig.vision_feature_layer {layer} is out of range for a tower with "
                    f"{self.vision.num_hidden_layers} layers (valid: -{self.vision.num_hidden_layers + 1}.."
                    f"{self.vision.num_hidden_layers})"
                )
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "LlavaConfig.vision_feature_select_strategy must be 'default' (drop CLS) or 'full', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        if self.projector_hidden_act not in ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu", "relu"):
            raise ValueError(f"LlavaConfig.projector_hidden_act {self.projector_hidden_act!r} is not supported")
        if self.text.uses_mrope:
            raise ValueError("LlavaConfig.text must use 1-D RoPE (mrope_section=None); LLaVA's decoder is Llama")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(
                f"LlavaConfig.image_token_id ({self.image_token_id}) must be a valid id below text.vocab_size "
                f"({self.text.vocab_size})"
            )
        if self.text.tie_word_embeddings != self.tie_word_embeddings:
            object.__setattr__(
                self, "text", dataclasses.replace(self.text, tie_word_embeddings=self.tie_word_embeddings)
            )

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def image_seq_length(self) -> int:
        """Placeholder tokens per image (576 for ViT-L/14 at 336 px with the CLS dropped)."""
        cls = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + cls

    @property
    def projector_in_features(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LlavaConfig":
        """Build from a parsed HF `config.json` (`model_type` "llava"; transformers 4.x or 5.x spelling)."""
        if hf.get("model_type", "llava") != "llava":
            raise ValueError(f"config.json model_type must be 'llava', got {hf.get('model_type')!r}")
        if not hf.get("vision_config"):
            raise ValueError("config.json has no vision_config; LLaVA needs the CLIP tower's shape")
        if not hf.get("text_config"):
            raise ValueError("config.json has no text_config; LLaVA needs the Llama decoder's shape")
        # A key left out of config.json means "the HF class default" (llava-hf files omit most Llama fields).
        vision_hf = HF_CLIP_VISION_DEFAULTS | dict(hf["vision_config"])
        text_hf = HF_LLAMA_DEFAULTS | {"model_type": "llama"} | dict(hf["text_config"])
        if vision_hf.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(
                f"vision_config.model_type must be 'clip_vision_model', got {vision_hf.get('model_type')!r}"
            )
        if text_hf["model_type"] != "llama":
            raise ValueError(f"text_config.model_type must be 'llama', got {text_hf['model_type']!r}")
        # HF forwards a tied text config to the top level; so do we.
        tie = bool(hf.get("tie_word_embeddings", False) or text_hf.get("tie_word_embeddings", False))
        names = {f.name for f in dataclasses.fields(CLIPVisionConfig)}
        vision = CLIPVisionConfig(**{k: v for k, v in vision_hf.items() if k in names})
        return cls(
            vision=vision,
            text=DecoderConfig.from_hf(text_hf, tie_word_embeddings=tie),
            image_token_id=hf.get("image_token_index", hf.get("image_token_id", cls.image_token_id)),
            vision_feature_layer=hf.get("vision_feature_layer", cls.vision_feature_layer),
            vision_feature_select_strategy=hf.get(
                "vision_feature_select_strategy", cls.vision_feature_select_strategy
            ),
            projector_hidden_act=hf.get("projector_hidden_act", cls.projector_hidden_act),
            multimodal_projector_bias=hf.get("multimodal_projector_bias", cls.multimodal_projector_bias),
            tie_word_embeddings=tie,
        )

    # The name `params.load_llava` and the tests use; `from_hf` is the one every family shares.
    from_hf_dict = from_hf

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers needs to rebuild this model (`LlavaForConditionalGeneration`)."""
        t = self.text
        if t.qkv_bias != t.o_bias:
            raise ValueError("a Llama config.json has one attention_bias flag; qkv_bias and o_bias must agree")
        # `attention` picks our kernel; it is no part of the checkpoint's description.
        vision = dataclasses.asdict(self.vision) | {"model_type": "clip_vision_model"}
        vision.pop("attention")
        text = {
            "model_type": "llama",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "hidden_act": t.hidden_act,
            "attention_bias": t.qkv_bias,
            "mlp_bias": t.mlp_bias,
            "rope_theta": t.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        layer = self.vision_feature_layer
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "vision_config": vision,
            "text_config": text,
            "image_token_index": self.image_token_id,
            "image_seq_length": self.image_seq_length,
            "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def llava_1_5_7b() -> LlavaConfig:
    """`llava-hf/llava-1.5-7b-hf`: CLIP ViT-L/14-336 + Vicuna-7B-v1.5 (7,063,427,072 parameters)."""
    return LlavaConfig()


def llava_1_5_13b() -> LlavaConfig:
    """`llava-hf/llava-1.5-13b-hf`: CLIP ViT-L/14-336 + Vicuna-13B-v1.5 (13,351,494,656 parameters)."""
    text = llama_decoder_config(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40)
    return LlavaConfig(text=text)


def tiny(*, image_size: int = 28, patch_size: int = 14, vocab_size: int = 128) -> LlavaConfig:
    """A few-kilobyte model for tests and smoke runs (image token = the last vocabulary id)."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )
    text = llama_decoder_config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, rms_norm_eps=1e-6,
    )
    return LlavaConfig(vision=vision, text=text, image_token_id=vocab_size - 1)
