"""LLaVA-1.5's multimodal projector: Linear -> GELU -> Linear from vision width to the decoder width."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models.layers import Linear, activation
from balcap_jax.models.llava.config import LlavaConfig


class LlavaMultiModalProjector(nnx.Module):
    """[..., D_vision * len(feature_layers)] -> [..., D_text]."""

    def __init__(self, config: LlavaConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        width = config.text.hidden_size
        kw = dict(use_bias=config.multimodal_projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Linear(config.projector_in_features, width, **kw)
        self.act_name = config.projector_hidden_act  # a name keeps the graphdef comparable across instances
        self.linear_2 = Linear(width, width, **kw)

    def __call__(self, image_features: jax.Array, *, strided_input: bool = False) -> jax.Array:
        """`strided_input`: HF hands its projector a strided view (see `LlavaModel.image_features`), for which
        torch's linear rounds the product before adding the bias; linear_1 then does the same."""
        hidden = self.linear_1(image_features, bias_after_rounding=strided_input)
        return self.linear_2(activation(self.act_name)(hidden))
