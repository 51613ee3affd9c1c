"""The LM head every `interface.CausalLM` here puts on the shared decoder (`qwen2_5_vl/text.py` `TextModel`).

LLaVA, Qwen2.5-VL and the text-only Llama differ in what feeds the decoder (images or not, 1-D RoPE or M-RoPE),
not in what follows it: an untied `lm_head` or the tied token embedding as the unembedding, fp32 logits, and the
cache spec of the decoder. `CausalLMHead` holds that part once; a subclass builds its modules, calls
`init_lm_head`, says how it runs the decoder (`hidden_states`) and, unless it sits at `model.language_model`,
where it is (`text_model`).

Parameter paths are unchanged by the base: `lm_head` stays a top-level attribute (absent when tied), so HF
conversion rules (`lm_head.kernel`, `...embed_tokens.embedding`) keep matching.
"""

from __future__ import annotations

import jax
from flax import nnx

from balcap_jax.models import layers
from balcap_jax.models.interface import CacheSpec, SequenceInputs
from balcap_jax.models.qwen2_5_vl.text import TextModel

Array = jax.Array


class CausalLMHead(nnx.Module):
    """`cache_spec`, `output_embedding`, `logits` and `__call__` of a causal LM over a `TextModel`."""

    @property
    def text_model(self) -> TextModel:
        """The decoder whose token embedding a tied head reads: HF's multimodal layout `model.language_model`
        (LLaVA, Qwen2.5-VL); a text-only model, whose `model` is the decoder, overrides it."""
        return self.model.language_model

    def hidden_states(self, inputs: SequenceInputs) -> Array:
        """Final-norm hidden states [B, T, D] of full sequences (the training forward)."""
        raise NotImplementedError

    def init_lm_head(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        """Adds `lm_head` (kernel [D, V]) when the embeddings are untied. Call it after `text_model` exists and
        after every other module, so the rng stream (and so every initial weight) is what it always was."""
        config = self.text_model.config
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs,
            )

    def cache_spec(self) -> CacheSpec:
        return self.text_model.config.cache_spec()

    def output_embedding(self) -> Array:
        """The unembedding matrix [D, V]: lm_head's kernel, or the transposed token embedding when tied."""
        matrix, vocab_axis = self.stored_output_embedding()
        return matrix if vocab_axis == 1 else matrix.T

    def stored_output_embedding(self) -> tuple[Array, int]:
        """The unembedding as stored, with its vocabulary axis: (lm_head's kernel [D, V], 1), or (the tied token
        embedding [V, D], 0)."""
        if self.text_model.config.tie_word_embeddings:
            return self.text_model.embed_tokens.embedding[...], 0
        return self.lm_head.kernel[...], 1

    def logits(self, hidden: Array) -> Array:
        """hidden [..., D] -> fp32 logits [..., V] (products in hidden's dtype, accumulated in fp32)."""
        return layers.unembed_logits(hidden, self.output_embedding())

    def __call__(self, inputs: SequenceInputs) -> Array:
        """Full-sequence fp32 logits [B, T, V] (tests and tools; training uses chunked log-probs instead)."""
        return self.logits(self.hidden_states(inputs))
