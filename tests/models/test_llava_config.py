"""LLaVA-1.5 configuration: HF config.json in both spellings, HF defaults for omitted keys, validation errors."""

from __future__ import annotations

import dataclasses

import pytest

from balcap_jax.models.llava import config as llava_config
from balcap_jax.models.llava.config import CLIPVisionConfig, LlavaConfig

# config.json of llava-hf/llava-1.5-7b-hf as published (transformers 4.36 era): most Llama fields are omitted.
LLAVA_HF_7B_CONFIG_JSON = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


def test_llava_hf_7b_config_json_gives_the_7b_preset():
    assert LlavaConfig.from_hf_dict(LLAVA_HF_7B_CONFIG_JSON) == llava_config.llava_1_5_7b()


def test_transformers5_spelling_of_the_same_config_agrees():
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlavaConfig(**LLAVA_HF_7B_CONFIG_JSON)
    assert LlavaConfig.from_hf_dict(hf.to_dict()) == llava_config.llava_1_5_7b()


def test_our_defaults_table_matches_transformers_class_defaults():
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig().to_dict()
    text = transformers.LlamaConfig().to_dict()
    for key, value in llava_config.HF_CLIP_VISION_DEFAULTS.items():
        assert vision[key] == value, key
    for key, value in llava_config.HF_LLAMA_DEFAULTS.items():
        expected = text["rope_parameters"]["rope_theta"] if key == "rope_theta" else text[key]
        assert expected == value, key


def test_to_hf_dict_round_trips_and_transformers_accepts_it():
    transformers = pytest.importorskip("transformers")
    for config in (llava_config.llava_1_5_7b(), llava_config.llava_1_5_13b(), llava_config.tiny()):
        hf = transformers.LlavaConfig(**config.to_hf_dict())
        assert hf.text_config.num_hidden_layers == config.text.num_layers
        assert LlavaConfig.from_hf_dict(hf.to_dict()) == config


def test_derived_sizes():
    config = llava_config.llava_1_5_7b()
    assert (config.vision.grid_size, config.vision.num_patches, config.vision.num_positions) == (24, 576, 577)
    assert config.image_seq_length == 576
    assert config.projector_in_features == 1024
    two_layers = dataclasses.replace(config, vision_feature_layer=(-2, -5))
    assert two_layers.projector_in_features == 2048


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(vision_feature_layer=30), "vision_feature_layer 30 is out of range"),
        (dict(vision_feature_layer=()), "at least one layer"),
        (dict(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
        (dict(image_token_id=40000), "image_token_id"),
        (dict(projector_hidden_act="mish"), "projector_hidden_act"),
    ],
)
def test_invalid_llava_config_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(llava_config.llava_1_5_7b(), **change)


def test_invalid_vision_config_names_the_field():
    with pytest.raises(ValueError, match="image_size .* multiple of patch_size"):
        CLIPVisionConfig(image_size=330, patch_size=14)
    with pytest.raises(ValueError, match="hidden_size .* divisible by num_attention_heads"):
        CLIPVisionConfig(hidden_size=1000, num_attention_heads=16)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="relu6")


def test_from_hf_dict_rejects_other_architectures():
    with pytest.raises(ValueError, match="model_type must be 'llava'"):
        LlavaConfig.from_hf_dict({**LLAVA_HF_7B_CONFIG_JSON, "model_type": "llava_next"})
    with pytest.raises(ValueError, match="text_config.model_type must be 'llama'"):
        mistral = {**LLAVA_HF_7B_CONFIG_JSON["text_config"], "model_type": "mistral"}
        LlavaConfig.from_hf_dict({**LLAVA_HF_7B_CONFIG_JSON, "text_config": mistral})
    with pytest.raises(ValueError, match="no vision_config"):
        LlavaConfig.from_hf_dict({k: v for k, v in LLAVA_HF_7B_CONFIG_JSON.items() if k != "vision_config"})
