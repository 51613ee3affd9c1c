"""Text-only Llama checkpoints (HF `LlamaForCausalLM`: SmolLM2, Vicuna, ...) on our shared decoder.

This is the decoder LLaVA-1.5 runs (`qwen2_5_vl/text.py`, 1-D RoPE), wrapped as a `CausalLM` without a vision
tower, so a real text checkpoint can check that decoder end to end. The module tree mirrors HF's:

    model            TextModel (embed_tokens, layers.self_attn / mlp / norms as one [L, ...] stack, norm)
    lm_head          absent when the embeddings are tied

so our dotted parameter names are the HF checkpoint keys after `hf_io`'s leaf rule (with the layer index of the
stacked decoder layers); loading needs no renames.
Inputs are `SequenceInputs` without "vision": input_ids int32[B, T], attention_mask bool[B, T], positions
int32[B, T] (0.. over each row's real tokens; padding may hold anything).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models.causal_lm import CausalLMHead
from balcap_jax.models.hf_io import ParamMapping, load_hf_state, read_hf_config
from balcap_jax.models.interface import KVCache, SequenceInputs
from balcap_jax.models.layer_stack import layer_stack_prefixes
from balcap_jax.models.llava.config import HF_LLAMA_DEFAULTS
from balcap_jax.models.qwen2_5_vl.text import DecoderConfig, TextModel

Array = jax.Array

# Tensors older checkpoints store that are recomputed here (rotary tables).
_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")


def llama_config_from_hf(hf: Mapping[str, Any]) -> DecoderConfig:
    """A parsed `LlamaForCausalLM` config.json -> `DecoderConfig`.

    Keys the file omits take transformers' `LlamaConfig` defaults (as transformers does). The rotary base is
    read from `rope_parameters` (transformers 5.x) or the top-level `rope_theta` (4.x); scaled RoPE variants
    (llama3, yarn, ...) are rejected by `DecoderConfig.from_hf`.
    """
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ValueError(
            f"config.json model_type must be 'llama' for a text-only Llama checkpoint, got {model_type!r}; "
            "LLaVA directories load with balcap_jax.models.llava.params.load_llava"
        )
    if "text_config" in hf or "vision_config" in hf:
        raise ValueError("config.json has text_config/vision_config: it is a multimodal model, not a text Llama")
    return DecoderConfig.from_hf(HF_LLAMA_DEFAULTS | dict(hf))


def llama_param_mapping(config: DecoderConfig) -> ParamMapping:
    """Checkpoint keys equal our names after the leaf rule; a tied checkpoint's `lm_head.weight` (some writers
    keep the duplicate) and rotary buffers are skipped."""
    ignore = list(_BUFFERS)
    if config.tie_word_embeddings:
        ignore.append(r"lm_head\.weight")
    return ParamMapping(ignore_unexpected=tuple(ignore))


class LlamaForCausalLM(CausalLMHead):
    """A text-only Llama with the `CausalLM` methods (HF `LlamaForCausalLM`); the head is `CausalLMHead`'s."""

    def __init__(
        self,
        config: DecoderConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        if config.uses_mrope:
            raise ValueError("LlamaForCausalLM needs a 1-D RoPE DecoderConfig (mrope_section=None)")
        self.config = config
        self.model = TextModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.init_lm_head(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @property
    def text_model(self) -> TextModel:
        return self.model

    def hidden_states(self, inputs: SequenceInputs) -> Array:
        """Training forward: final-norm hidden states [B, T, D]."""
        _check_inputs(inputs)
        embeds = self.model.embed(inputs["input_ids"])
        return self.model(embeds, inputs["positions"], inputs["attention_mask"])

    def prefill(self, inputs: SequenceInputs, cache: KVCache) -> tuple[Array, KVCache]:
        """Prompt into cache slots [0, T). Returns hidden [B, T, D] and the cache."""
        _check_inputs(inputs)
        embeds = self.model.embed(inputs["input_ids"])
        return self.model.prefill(embeds, inputs["positions"], inputs["attention_mask"], cache)

    def decode(self, tokens: Array, positions: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """tokens int32[B], positions int32[B] -> hidden [B, D] and the cache with one more slot written."""
        chex.assert_rank([tokens, positions], [1, 1])
        return self.model.decode(self.model.embed(tokens), positions, cache)


def _check_inputs(inputs: SequenceInputs) -> None:
    for key in ("input_ids", "attention_mask", "positions"):
        if key not in inputs:
            raise KeyError(f"Llama inputs need {key!r} (int32[B, T] ids, bool[B, T] mask, int32[B, T] positions)")
    if inputs.get("vision") is not None:
        raise ValueError("a text-only Llama takes no inputs['vision']; use a LLaVA model for images")
    chex.assert_rank([inputs["input_ids"], inputs["attention_mask"], inputs["positions"]], [2, 2, 2])
    chex.assert_equal_shape([inputs["input_ids"], inputs["attention_mask"], inputs["positions"]])


def load_llama_text(
    directory: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool | str = False,
    config: DecoderConfig | None = None,
) -> LlamaForCausalLM:
    """A local HF `LlamaForCausalLM` directory (config.json + safetensors) -> our model on the first device,
    streamed tensor by tensor. `config` overrides the directory's config.json."""
    config = config or llama_config_from_hf(read_hf_config(directory))
    abstract = nnx.eval_shape(
        lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    mapping = llama_param_mapping(config).with_stacked(layer_stack_prefixes(abstract))
    return nnx.merge(graphdef, load_hf_state(directory, state, mapping))
