"""Builds the policy a run trains: model module, tokenizer, image processing and the token ids the loop needs.

Two sources: a local Hugging Face directory (`config.model.hf_dir`, real checkpoints, full vocabulary), or a
from-scratch Qwen2.5-VL-architecture model shaped by `config.model.tiny` whose vocabulary is the subset of Qwen
ids that the world's prompts and references use (see `vocab_subset.py`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax.models import registry
from balcap_jax.models.attention import with_attention
from balcap_jax.models.qwen2_5_vl import processor as qwen_processor
from balcap_jax.models.qwen2_5_vl import config as qwen_ids
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.trainer.vocab_subset import VocabSubset

IM_END = "<|im_end|>"


@dataclasses.dataclass
class Policy:
    """model: the NNX module (vocabulary = `vocab.size` when a subset is used). tokenizer: the Qwen/HF tokenizer.
    vocab: the id subset or None (model ids are tokenizer ids). eos_id / pad_id: in model ids."""

    family: registry.ModelFamily
    model_config: Any
    model: nnx.Module
    tokenizer: Any
    image_config: Any  # the family's image processing config (Qwen ImageProcessorConfig | ClipImageProcessorConfig)
    vocab: VocabSubset | None
    eos_id: int
    pad_id: int
    extra_eos_ids: tuple[int, ...] = ()  # further ids that end a caption (the checkpoint's generation config)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a rollout, `eos_id` (the one SFT targets end with) first."""
        return (self.eos_id,) + tuple(i for i in self.extra_eos_ids if i != self.eos_id)

    def to_model_ids(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids, np.int32) if self.vocab is None else self.vocab.from_tokenizer(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Model ids of one completion (EOS and padding already removed) -> text."""
        ids = np.asarray(ids, np.int64)
        if self.vocab is not None:
            ids = self.vocab.to_tokenizer(ids)
            ids = ids[ids >= 0]
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()

    def encode_text(self, text: str) -> np.ndarray:
        """Plain text (a reference caption) -> model ids, no special tokens."""
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int64)
        return self.to_model_ids(ids)


def _dtype(name: str):
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"config.model.dtype/param_dtype={name!r}: use 'float32' or 'bfloat16'") from e


def tiny_qwen_config(tiny: Any, *, vocab: VocabSubset) -> Qwen2_5_VLConfig:
    """config.model.tiny -> a Qwen2.5-VL config over the compact vocabulary (special ids remapped)."""
    heads = int(tiny.num_attention_heads)
    head_dim = int(tiny.hidden_size) // heads
    half = head_dim // 2
    # M-RoPE splits the rotary half-dimension over (t, h, w) like the released models (16, 24, 24 of 64).
    t_section = half // 4
    hw = (half - t_section) // 2
    mrope = [t_section, hw, half - t_section - hw]
    text = dict(
        vocab_size=vocab.size,
        hidden_size=int(tiny.hidden_size),
        intermediate_size=int(tiny.intermediate_size),
        num_hidden_layers=int(tiny.num_hidden_layers),
        num_attention_heads=heads,
        num_key_value_heads=int(tiny.num_key_value_heads),
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope),
        tie_word_embeddings=bool(tiny.tie_word_embeddings),
    )
    depth = int(tiny.vision_depth)
    vision = dict(
        depth=depth,
        hidden_size=int(tiny.vision_hidden_size),
        intermediate_size=int(tiny.vision_intermediate_size),
        num_heads=int(tiny.vision_num_heads),
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        out_hidden_size=int(tiny.hidden_size),
        fullatt_block_indexes=[depth - 1],
    )
    return Qwen2_5_VLConfig.from_hf(
        dict(
            model_type="qwen2_5_vl",
            text_config=text,
            vision_config=vision,
            image_token_id=vocab.compact(qwen_ids.IMAGE_TOKEN_ID),
            video_token_id=vocab.unk_id,
            vision_start_token_id=vocab.compact(qwen_ids.VISION_START_TOKEN_ID),
            vision_end_token_id=vocab.compact(qwen_ids.VISION_END_TOKEN_ID),
            tie_word_embeddings=bool(tiny.tie_word_embeddings),
        )
    )


def corpus_vocab(tokenizer: Any, prompt_ids: np.ndarray, texts: Iterable[str]) -> VocabSubset:
    """The subset covering the prompt template (image placeholder included) and every corpus text."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    specials = [im_end, qwen_ids.IMAGE_TOKEN_ID, qwen_ids.VISION_START_TOKEN_ID,
                qwen_ids.VISION_END_TOKEN_ID]
    sequences = [prompt_ids] + [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return VocabSubset.from_corpus(sequences, always=specials)


def build_policy(config: Any, *, corpus: Iterable[str] | None, seed: int, mesh: Any = None) -> Policy:
    """The run's policy. `corpus` (reference texts) is required for from-scratch models (vocabulary subset).
    With a `mesh`, HF weights are streamed straight into the family's training layout (no device ever holds the
    whole model)."""
    model_cfg = config.model
    dtype, param_dtype = _dtype(model_cfg.dtype), _dtype(model_cfg.param_dtype)
    remat = model_cfg.get("remat", False)  # False/True or "none" | "full" | "save_dots" (models.remat)
    attention = model_cfg.get("attention", "reference")  # models.attention.ATTENTION_IMPLS
    if model_cfg.hf_dir:
        return _from_hf_dir(config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention, mesh=mesh)
    if model_cfg.name != "qwen2_5_vl":
        raise ValueError(
            f"config.model.name={model_cfg.name!r} with an empty config.model.hf_dir: only 'qwen2_5_vl' can be "
            "built from scratch (config.model.tiny); set config.model.hf_dir to a local HF checkpoint directory"
        )
    if corpus is None:
        raise ValueError("a from-scratch policy needs the corpus of reference texts to build its vocabulary")
    tokenizer = qwen_processor.load_tokenizer()
    image_config = qwen_processor.ImageProcessorConfig(
        min_pixels=int(config.data.min_pixels), max_pixels=int(config.data.max_pixels)
    )
    prompt = qwen_processor.caption_prompt(config.data.prompt, num_images=1)
    prompt_ids = np.asarray(tokenizer.encode(prompt, add_special_tokens=False))
    vocab = corpus_vocab(tokenizer, prompt_ids, corpus)
    qwen_config = with_attention(tiny_qwen_config(model_cfg.tiny, vocab=vocab), attention)
    family = registry.get("qwen2_5_vl")
    model = family.model_class(qwen_config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype, remat=remat)
    eos = vocab.compact(tokenizer.convert_tokens_to_ids(IM_END))
    return Policy(family, qwen_config, model, tokenizer, image_config, vocab, eos_id=eos, pad_id=vocab.unk_id)


def _from_hf_dir(config: Any, *, dtype, param_dtype, remat: bool | str, attention: str, mesh: Any) -> Policy:
    from transformers import AutoTokenizer

    from balcap_jax.models.hf_io import read_hf_config

    directory = config.model.hf_dir
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"config.model.hf_dir={directory!r} is not a directory; point it at a local Hugging Face checkpoint "
            "(config.json + *.safetensors)"
        )
    family = registry.family_for_hf_dir(directory)
    if family.name != config.model.name:
        raise ValueError(f"config.model.name={config.model.name!r} but {directory} holds a {family.name!r} model")
    sharding = family.sharding("training") if mesh is not None else None
    # The attention kernel travels in the model config, which every family's loader accepts.
    model_config = with_attention(family.config_from_hf(read_hf_config(directory)), attention)
    model = family.load(directory, dtype=dtype, param_dtype=param_dtype, remat=remat, mesh=mesh, sharding=sharding,
                        config=model_config)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    preprocessor = _read_json(os.path.join(directory, "preprocessor_config.json"))
    generation = _read_json(os.path.join(directory, "generation_config.json")) or {}
    if family.name == "llava":
        from balcap_jax.models.llava.processor import ClipImageProcessorConfig

        image_config = (ClipImageProcessorConfig.from_hf_dict(preprocessor) if preprocessor
                        else ClipImageProcessorConfig.for_model(model_config))
        eos = tokenizer.eos_token_id
    else:
        image_config = (qwen_processor.ImageProcessorConfig.from_hf(preprocessor) if preprocessor
                        else qwen_processor.ImageProcessorConfig())
        # The recipe sizes its vision buckets for its own pixel limits; the checkpoint's preprocessor allows
        # ~12.8 MP (16k image tokens per photo), which no RL batch can afford.
        image_config = dataclasses.replace(
            image_config, min_pixels=int(config.data.min_pixels), max_pixels=int(config.data.max_pixels)
        )
        eos = tokenizer.convert_tokens_to_ids(IM_END)
    if eos is None:
        raise ValueError(f"the tokenizer in {directory} defines no end-of-turn token; captions could never end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return Policy(family, model_config, model, tokenizer, image_config, None, int(eos), int(pad),
                  extra_eos_ids=generation_eos_ids(generation))


def generation_eos_ids(generation_config: dict) -> tuple[int, ...]:
    """`eos_token_id` of a generation_config.json (an int, a list, or absent) -> a tuple of ids."""
    eos = generation_config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def _read_json(path: str) -> dict | None:
    import json

    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
