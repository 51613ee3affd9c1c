"""A tiny causal LM for the RL tests: the part of `models.interface.CausalLM` that training uses.

hidden_states: token embedding + position embedding, a causal prefix mean over real tokens (so every output
depends on the whole prefix and on attention_mask), an MLP with a residual, RMSNorm. The unembedding is the tied
token embedding. An optional "vision" input float[B, D] is added to every position, standing in for the model-
specific extras that RL batches pass through untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ToyCausalLM(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, max_positions: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.position = nnx.Embed(max_positions, dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(2 * dim, dim, rngs=rngs)
        self.norm = nnx.RMSNorm(dim, rngs=rngs)

    def hidden_states(self, inputs: dict) -> jax.Array:
        tokens, mask = inputs["input_ids"], inputs["attention_mask"]
        x = self.embed(tokens) + self.position(inputs["positions"])
        if "vision" in inputs:
            x = x + inputs["vision"][:, None, :]
        weights = mask[..., None].astype(x.dtype)
        prefix_mean = jnp.cumsum(x * weights, axis=1) / jnp.maximum(jnp.cumsum(weights, axis=1), 1.0)
        h = prefix_mean + self.mlp_out(jax.nn.gelu(self.mlp_in(prefix_mean)))
        return self.norm(h)

    def output_embedding(self) -> jax.Array:
        return self.embed.embedding[...].T

    def stored_output_embedding(self) -> tuple[jax.Array, int]:
        return self.embed.embedding[...], 0

    def logits(self, hidden: jax.Array) -> jax.Array:
        return jnp.einsum("...d,dv->...v", hidden, self.output_embedding(), preferred_element_type=jnp.float32)
