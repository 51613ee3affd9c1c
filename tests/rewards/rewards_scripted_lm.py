"""A scripted causal LM implementing `CausalLM`: whatever the prompt, it generates one fixed text, then EOS.

It lets the in-process judge be tested end to end (encoder -> sampler prefill/decode with a real KV cache ->
token ids -> text -> parsed score) with a known answer. Tokens are characters tagged with their step in the
script, so "what comes next" is a function of the previous token alone:

  prompt characters: ids 0..255 (code point mod 256)  -> next is script step 0
  script step j:     id 256 * (j + 1) + code point     -> next is step j + 1, or EOS after the last step
The hidden state is the current token id (D = 1); `logits` looks the successor up in a table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax.models.interface import CacheSpec, KVCache


class ScriptedLM(nnx.Module):
    def __init__(self, script: str):
        self.script_length = len(script)
        self.vocab_size = 256 * (len(script) + 1) + 1
        self.eos_id = self.vocab_size - 1
        ids = self.script_ids(script)
        successor = np.full((self.vocab_size,), self.eos_id, np.int32)
        successor[:256] = ids[0]
        successor[ids[:-1]] = ids[1:]
        self.successor = nnx.Variable(jnp.asarray(successor))

    @staticmethod
    def script_ids(script: str) -> np.ndarray:
        return np.array([256 * (j + 1) + (ord(c) % 256) for j, c in enumerate(script)], np.int32)

    @staticmethod
    def tokenize(text: str) -> list[int]:
        return [ord(c) % 256 for c in text]

    def detokenize(self, ids) -> str:
        return "".join(chr(int(i) % 256) for i in ids if int(i) != self.eos_id)

    def cache_spec(self) -> CacheSpec:
        return CacheSpec(num_layers=1, num_kv_heads=1, head_dim=1)

    def hidden_states(self, inputs):
        return inputs["input_ids"].astype(jnp.float32)[..., None]

    def prefill(self, inputs, cache: KVCache):
        length = inputs["input_ids"].shape[1]
        valid = cache.valid.at[:, :length].set(inputs["attention_mask"].astype(bool))
        return self.hidden_states(inputs), cache.replace(valid=valid, index=jnp.asarray(length, jnp.int32))

    def decode(self, tokens, positions, cache: KVCache):
        del positions
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, jnp.ones((cache.batch, 1), bool), cache.index, axis=1)
        return tokens.astype(jnp.float32)[:, None], cache.replace(valid=valid, index=cache.index + 1)

    def output_embedding(self):
        # The successor table is not linear in the hidden state; only `logits` is meaningful for this toy.
        return jnp.zeros((1, self.vocab_size), jnp.float32)

    def stored_output_embedding(self):
        return self.output_embedding(), 1

    def logits(self, hidden):
        token = hidden[..., 0].astype(jnp.int32)
        return jax.nn.one_hot(self.successor[...][token], self.vocab_size, dtype=jnp.float32) * 50.0
