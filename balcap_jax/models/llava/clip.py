"""CLIP ViT vision tower (the image encoder of LLaVA-1.5), Flax NNX.

Pre-LN transformer: patch conv (no bias) + CLS token + learned positions, `pre_layrnorm`, N encoder layers of
(LayerNorm -> bidirectional attention -> residual, LayerNorm -> MLP(quick_gelu) -> residual). LLaVA reads the
hidden states of an inner layer (-2 by default), so the forward runs only the layers it needs; the unused top
layer and `post_layernorm` are kept as parameters so checkpoints round-trip unchanged.

The encoder layers are one layer stack (`layer_stack.py`: parameters [N, ...]) run by one `lax.scan`.
Attribute names mirror the HF torch modules (`embeddings.patch_embedding`, `encoder.layers.self_attn.q_proj` for
HF's `encoder.layers.{i}.self_attn.q_proj`, `pre_layrnorm` with HF's spelling) so weight conversion is a rule per
leaf, not a table.

Images are channels-last: pixel_values float[N, H, W, C] (HF uses [N, C, H, W]).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models.layer_stack import leading, scan_layers, stacked
from balcap_jax.models.attention import attend
from balcap_jax.models.layers import Linear, activation
from balcap_jax.models.llava.config import CLIPVisionConfig
from balcap_jax.models.remat import Remat

Array = jax.Array


def _layer_norm(features: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # The two-pass variance matches torch; the one-pass E[x^2]-E[x]^2 loses digits on large activations.
    return nnx.LayerNorm(
        features, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class CLIPVisionEmbeddings(nnx.Module):
    """Patchify + CLS + learned absolute positions. [N, H, W, C] -> [N, 1 + P, D]."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        width = config.hidden_size
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (width,), param_dtype) * width**-0.5
        )
        self.patch_embedding = nnx.Conv(
            config.num_channels,
            width,
            kernel_size=(config.patch_size, config.patch_size),
            strides=(config.patch_size, config.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            config.num_positions, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, pixel_values: Array) -> Array:
        cfg = self.config
        chex.assert_rank(pixel_values, 4)
        if pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"pixel_values must be [N, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] (channels last), "
                f"got {pixel_values.shape}; resize with balcap_jax.models.llava.processor.preprocess_images"
            )
        patches = self.patch_embedding(pixel_values)  # [N, g, g, D]
        n = patches.shape[0]
        # Row-major flattening over (row, col) is the order of HF's conv output flatten(2).
        patches = patches.reshape(n, cfg.num_patches, cfg.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (n, 1, cfg.hidden_size))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding.embedding[...][None].astype(tokens.dtype)


class CLIPAttention(nnx.Module):
    """Bidirectional multi-head self-attention with q/k/v/out biases. [N, S, D] -> [N, S, D]."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention = config.attention
        width = config.hidden_size
        linear = lambda: Linear(width, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = linear(), linear(), linear(), linear()

    def __call__(self, x: Array) -> Array:
        n, s, _ = x.shape
        split = lambda t: t.reshape(n, s, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # Unmasked; the reference scales after the product, as HF does (scaling q first rounds differently).
        out = attend(q, k, v, scale=self.head_dim**-0.5, impl=self.attention)
        return self.out_proj(out.reshape(n, s, self.num_heads * self.head_dim))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # The name, not the function, is stored: static module attributes are part of the graphdef, which must
        # compare equal across model instances for jit caches to be shared.
        self.act_name = config.hidden_act
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x: Array) -> Array:
        return self.fc2(activation(self.act_name)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN residual block. [N, S, D] -> [N, S, D]."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(config, **kw)
        self.layer_norm1 = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, param_dtype, rngs)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, param_dtype, rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """`layers`: a stack of `num_hidden_layers` CLIPEncoderLayers (parameters [N, ...])."""

    layer_stacks = ("layers",)

    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = stacked(
            lambda r: CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r),
            config.num_hidden_layers,
            rngs,
        )


class CLIPVisionTower(nnx.Module):
    """The CLIP vision transformer without heads (HF `CLIPVisionModel`). `remat` (False / True / "none" /
    "full" / "save_dots", see `remat.Remat`) checkpoints the scanned encoder layer."""

    def __init__(
        self,
        config: CLIPVisionConfig,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.remat = Remat.parse(remat)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPVisionEmbeddings(config, **kw)
        self.pre_layrnorm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, param_dtype, rngs)
        self.encoder = CLIPEncoder(config, **kw)
        self.post_layernorm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, param_dtype, rngs)

    def hidden_states(self, pixel_values: Array, num_layers: int | None = None) -> list[Array]:
        """Hidden states [N, 1 + P, D] after the embeddings (+ pre_layrnorm) and after each of the first
        `num_layers` encoder layers (all when None): num_layers + 1 arrays, indexed like HF's `hidden_states`."""
        num_layers = self.config.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= self.config.num_hidden_layers:
            raise ValueError(f"num_layers must be in [0, {self.config.num_hidden_layers}], got {num_layers}")
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        if num_layers == 0:
            return [x]

        def step(layer: CLIPEncoderLayer, hidden: Array, _) -> tuple[Array, Array]:
            hidden = layer(hidden)
            return hidden, hidden

        # LLaVA stops below the top layer; scanning a slice of the stack skips the layers above.
        _, states = scan_layers(leading(self.encoder.layers, num_layers), step, x, remat=self.remat)
        return [x, *states]

    def pooled(self, pixel_values: Array) -> Array:
        """CLIP's pooled output: post_layernorm of the last layer's CLS state. [N, H, W, C] -> [N, D]."""
        return self.post_layernorm(self.hidden_states(pixel_values)[-1][:, 0])

    def select_features(
        self, pixel_values: Array, feature_layers: tuple[int, ...], drop_cls: bool
    ) -> Array:
        """LLaVA's image features: the hidden states of `feature_layers` (HF indexing, negatives from the end),
        concatenated on the feature axis, CLS dropped when `drop_cls`. -> [N, P or 1 + P, D * len(layers)]."""
        count = self.config.num_hidden_layers + 1
        indices = tuple(layer % count for layer in feature_layers)
        states = self.hidden_states(pixel_values, num_layers=max(indices))
        selected = [states[i][:, 1:] if drop_cls else states[i] for i in indices]
        return selected[0] if len(selected) == 1 else jnp.concatenate(selected, axis=-1)
