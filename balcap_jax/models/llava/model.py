"""LLaVA-1.5 as a `balcap_jax.models.interface.CausalLM`: CLIP tower -> projector -> Llama decoder.

The module tree mirrors HF transformers 5.x `LlavaForConditionalGeneration`:

    model.vision_tower            CLIPVisionTower (clip.py)
    model.multi_modal_projector   LlavaMultiModalProjector (projector.py)
    model.language_model          TextModel (the shared Qwen2/Llama decoder, 1-D RoPE)
    lm_head                       absent when the embeddings are tied

Inputs (`SequenceInputs`): input_ids int32[B, T] with every image expanded to `config.image_seq_length`
copies of `config.image_token_id`; attention_mask bool[B, T]; positions int32[B, T] (1-D RoPE; see
`processor.padded_positions`); optional vision, one of:
  {"pixel_values": float[N, H, W, 3]}: the N images in the row-major order of their placeholder tokens (HF's
      `masked_scatter` order); the batch holds exactly N * image_seq_length image tokens
      (`processor.check_image_token_count`);
  laid out by batch shard (`models/image_shards.py`, `processor.sharded_vision_inputs`): "pixel_values"
      float[K, n, H, W, 3] (each block's distinct images, zero-padded to n), "image_index" int32[K, m] (the image
      of each of the block's m placeholder runs, in reading order) and "images_per_shard". CLIP then encodes each
      distinct image once, however many rows (the G rollouts of a prompt) read it.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models.causal_lm import CausalLMHead
from balcap_jax.models.image_shards import scatter_image_embeddings
from balcap_jax.models.interface import KVCache, SequenceInputs
from balcap_jax.models.llava.clip import CLIPVisionTower
from balcap_jax.models.llava.config import LlavaConfig
from balcap_jax.models.llava.projector import LlavaMultiModalProjector
from balcap_jax.models.qwen2_5_vl.text import TextModel

Array = jax.Array


class LlavaModel(nnx.Module):
    """Everything but the LM head (HF `LlavaModel`)."""

    def __init__(
        self, config: LlavaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = CLIPVisionTower(config.vision, remat=remat, **kw)
        self.multi_modal_projector = LlavaMultiModalProjector(config, **kw)
        self.language_model = TextModel(config.text, remat=remat, **kw)

    def image_features(self, pixel_values: Array) -> Array:
        """[N, H, W, 3] -> projected features [N, image_seq_length, D_text]."""
        cfg = self.config
        drop_cls = cfg.vision_feature_select_strategy == "default"
        features = self.vision_tower.select_features(pixel_values.astype(self.dtype), cfg.feature_layers, drop_cls)
        # For an int feature layer HF slices the CLS off its hidden states, `[:, 1:]`: a strided view unless there
        # is a single image (a list of layers is concatenated into a fresh tensor); its bf16 rounding follows.
        strided = drop_cls and isinstance(cfg.vision_feature_layer, int) and pixel_values.shape[0] > 1
        return self.multi_modal_projector(features, strided_input=strided)

    def embed(self, inputs: SequenceInputs) -> Array:
        """Token embeddings with image features in the placeholder slots. -> [B, T, D]."""
        input_ids = inputs["input_ids"]
        embeds = self.language_model.embed(input_ids)
        vision = inputs.get("vision")
        if vision is None or vision["pixel_values"].size == 0:
            return embeds
        is_image = (input_ids == self.config.image_token_id) & inputs["attention_mask"].astype(bool)
        pixels = vision["pixel_values"]
        if "image_index" not in vision:
            features = self.image_features(pixels)  # [N, L, D]
            return scatter_image_embeddings(embeds, is_image, features.reshape(-1, features.shape[-1]))
        shards, per_shard = pixels.shape[:2]
        # One CLIP batch over every block's images: its rows split over the batch axes like the blocks.
        features = self.image_features(pixels.reshape(shards * per_shard, *pixels.shape[2:]))
        features = features.reshape(shards, per_shard, *features.shape[1:])  # [K, n, L, D]
        runs = jnp.take_along_axis(features, vision["image_index"][:, :, None, None], axis=1)  # [K, m, L, D]
        return scatter_image_embeddings(embeds, is_image, runs.reshape(shards, -1, runs.shape[-1]))


class LlavaForCausalLM(CausalLMHead):
    """LLaVA-1.5 with the `CausalLM` methods (HF `LlavaForConditionalGeneration`); the head is `CausalLMHead`'s."""

    def __init__(
        self,
        config: LlavaConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.model = LlavaModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        # `LlavaConfig` keeps `text.tie_word_embeddings` equal to its own, so the head follows `config`.
        self.init_lm_head(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    # -- CausalLM -------------------------------------------------------------------------------------------

    def hidden_states(self, inputs: SequenceInputs) -> Array:
        """Training forward: final-norm hidden states [B, T, D]."""
        _check_inputs(inputs)
        embeds = self.model.embed(inputs)
        return self.model.language_model(embeds, inputs["positions"], inputs["attention_mask"])

    def prefill(self, inputs: SequenceInputs, cache: KVCache) -> tuple[Array, KVCache]:
        """Vision tower + prompt into `cache` slots [0, T). Returns hidden [B, T, D] and the cache."""
        _check_inputs(inputs)
        embeds = self.model.embed(inputs)
        return self.model.language_model.prefill(embeds, inputs["positions"], inputs["attention_mask"], cache)

    def decode(self, tokens: Array, positions: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """One generated token per row: tokens int32[B], positions int32[B] -> hidden [B, D], cache."""
        chex.assert_rank([tokens, positions], [1, 1])
        embeds = self.model.language_model.embed(tokens)
        return self.model.language_model.decode(embeds, positions, cache)


def _check_inputs(inputs: SequenceInputs) -> None:
    for key in ("input_ids", "attention_mask", "positions"):
        if key not in inputs:
            raise KeyError(f"LLaVA inputs need {key!r}; build them with balcap_jax.models.llava.processor.make_batch")
    chex.assert_rank([inputs["input_ids"], inputs["attention_mask"]], [2, 2])
    chex.assert_equal_shape([inputs["input_ids"], inputs["attention_mask"], inputs["positions"]])
    vision = inputs.get("vision")
    if vision is not None and "pixel_values" not in vision:
        raise KeyError("inputs['vision'] must hold 'pixel_values' float[N, H, W, 3]")
