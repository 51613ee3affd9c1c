"""Qwen2.5-VL as a `balcap_jax.models.interface.CausalLM`: vision tower, image-token scatter, M-RoPE decoder.

Attribute names mirror HF's `Qwen2_5_VLForConditionalGeneration` (`model.visual`, `model.language_model`,
`lm_head`), so params.py converts checkpoints by rule.

Batches (see interface.py) carry `positions` int32[3, B, T] from `rope_index.get_rope_index` and, for image
batches, `vision` = `vision_host.prepare_vision_inputs(...)`. `make_inputs` builds both on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax.models.causal_lm import CausalLMHead
from balcap_jax.models.image_shards import scatter_image_embeddings
from balcap_jax.models.interface import KVCache, SequenceInputs
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.rope_index import get_rope_index
from balcap_jax.models.qwen2_5_vl.text import TextModel
from balcap_jax.models.qwen2_5_vl.vision import VisionTower
from balcap_jax.models.qwen2_5_vl.vision_host import DEFAULT_PATCH_BUCKETS, prepare_vision_inputs

Array = jax.Array


class Qwen2_5_VLModel(nnx.Module):
    """Vision tower + text decoder (HF `Qwen2_5_VLModel`)."""

    def __init__(self, config: Qwen2_5_VLConfig, *, dtype, param_dtype, remat: bool | str, rngs: nnx.Rngs):
        self.visual = VisionTower(config.vision, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat)
        self.language_model = TextModel(config.text, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)


class Qwen2_5_VL(CausalLMHead):
    """The policy model. Implements `interface.CausalLM` (the head is `CausalLMHead`'s but for `logits`)."""

    def __init__(
        self,
        config: Qwen2_5_VLConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
    ):
        self.config = config
        self.model = Qwen2_5_VLModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.init_lm_head(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    # -- CausalLM --------------------------------------------------------------------------------------------

    def image_embeddings(self, vision: dict) -> Array:
        """The vision tower on host-prepared inputs: [M, D] embeddings, real image tokens first ([K, M, D] for
        inputs laid out by batch shard, `models/image_shards.py`)."""
        return self.model.visual(vision)

    def embed_inputs(self, inputs: SequenceInputs) -> Array:
        """Token embeddings with image embeddings scattered into the `<|image_pad|>` slots. [B, T, D].

        Image embeddings come from `inputs["vision"]` (the tower runs here) or, when the caller already has
        them, from `inputs["image_embeds"]` [M, D] or [K, M, D] (e.g. computed once per prompt and repeated for
        the G samples of a group, in the reading order of the batch's image tokens).
        """
        input_ids = inputs["input_ids"]
        embeds = self.model.language_model.embed(input_ids)
        if inputs.get("vision") is not None and inputs.get("image_embeds") is not None:
            raise ValueError("inputs hold both 'vision' and 'image_embeds'; pass one of them")
        if inputs.get("image_embeds") is not None:
            image_embeds = inputs["image_embeds"]
        elif inputs.get("vision") is not None:
            image_embeds = self.image_embeddings(inputs["vision"])
        else:
            return embeds
        is_image = (input_ids == self.config.image_token_id) & inputs["attention_mask"].astype(bool)
        return scatter_image_embeddings(embeds, is_image, image_embeds)

    def hidden_states(self, inputs: SequenceInputs) -> Array:
        """Final-norm hidden states [B, T, D] of full sequences (the training forward)."""
        _check_inputs(inputs)
        return self.model.language_model(self.embed_inputs(inputs), inputs["positions"], inputs["attention_mask"])

    def prefill(self, inputs: SequenceInputs, cache: KVCache) -> tuple[Array, KVCache]:
        _check_inputs(inputs)
        return self.model.language_model.prefill(
            self.embed_inputs(inputs), inputs["positions"], inputs["attention_mask"], cache
        )

    def decode(self, tokens: Array, positions: Array, cache: KVCache) -> tuple[Array, KVCache]:
        text = self.model.language_model
        return text.decode(text.embed(tokens), positions, cache)

    def logits(self, hidden: Array) -> Array:
        """hidden [..., D] -> fp32 logits [..., V]: products in the *unembedding's* dtype, accumulated in fp32.

        Kept apart from `layers.unembed_logits` (which casts the other way) because the two differ whenever the
        dtypes do, e.g. in the bf16 rollout copy (fp32 norm scale -> fp32 hidden, bf16 unembedding): here the
        product runs in bf16, there in fp32. Merging them would change this model's rollouts.
        """
        unembed = self.output_embedding()
        return jnp.einsum("...d,dv->...v", hidden.astype(unembed.dtype), unembed,
                          preferred_element_type=jnp.float32)


def _check_inputs(inputs: SequenceInputs) -> None:
    for key in ("input_ids", "attention_mask", "positions"):
        if key not in inputs:
            raise KeyError(f"inputs lack {key!r}; build batches with qwen2_5_vl.model.make_inputs")
    batch, length = inputs["input_ids"].shape
    chex.assert_shape(inputs["attention_mask"], (batch, length))
    if inputs["positions"].shape not in ((3, batch, length), (batch, length)):
        raise ValueError(f"positions must be [3, B, T] or [B, T] with B, T = {batch}, {length}; got "
                         f"{inputs['positions'].shape}")


def make_inputs(
    config: Qwen2_5_VLConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    *,
    bucket_sizes: Sequence[int] | None = DEFAULT_PATCH_BUCKETS,
) -> dict:
    """Host-side batch (numpy) for the model: ids, mask, M-RoPE positions and, with images, vision inputs.

    input_ids int[B, T] with each image expanded to prod(grid_thw)/merge² `<|image_pad|>` tokens;
    pixel_values float[N_patches, C*T*p*p] and image_grid_thw int[N_images, 3] for all images in reading order.
    Raises ValueError when the image tokens and the grids disagree.
    """
    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask).astype(bool)
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pass both pixel_values and image_grid_thw, or neither")
    positions, _ = get_rope_index(
        input_ids, attention_mask, image_grid_thw, image_token_id=config.image_token_id,
        spatial_merge_size=config.spatial_merge_size,
    )
    batch = {"input_ids": input_ids.astype(np.int32), "attention_mask": attention_mask, "positions": positions}
    if pixel_values is not None:
        batch["vision"] = prepare_vision_inputs(
            np.asarray(pixel_values, np.float32), np.asarray(image_grid_thw), config.vision, bucket_sizes=bucket_sizes
        )
    return batch
