"""A pure per-token log-prob function for any policy that satisfies `models.interface.CausalLM`.

The update step differentiates `log_prob_fn(params, batch)`; the module itself never crosses the jit boundary:
it is rebuilt inside with `nnx.merge(graphdef, params)` (see models/interface.py).

Alignment: token t of `input_ids` is scored by the hidden state at t − 1. The function scores the last T_c
positions of the sequence, where T_c = batch["completion_mask"].shape[1] (T when the key is absent), so a batch
laid out as [prompt | completion] can carry completion-only arrays ([B, T_c]) and skip the prompt's vocabulary
matmuls. When T_c == T, position 0 has no context and gets log-prob 0 and entropy 0 (mask it out).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models.interface import CausalLM
from balcap_jax.rl.losses import token_logprobs_from_hidden

Array = jax.Array
Batch = dict[str, Any]
LogProbFn = Callable[[Any, Batch], tuple[Array, Array]]

# The trainer's log-probs of a batch before its first update (rl/update.py, old_logprobs="batch").
TRAINER_LOGPROBS = "trainer_logprobs"
# Batch keys consumed by the RL loss; every other key is a model input and is passed to `hidden_states` as is.
RL_KEYS = frozenset({"completion_mask", "old_logprobs", "advantages", "ref_logprobs", TRAINER_LOGPROBS})


def model_inputs(batch: Batch) -> Batch:
    """The model's part of an RL batch: everything but the loss keys (input_ids, attention_mask, positions,
    and extras such as "vision" pass through)."""
    missing = {"input_ids", "attention_mask", "positions"} - batch.keys()
    if missing:
        raise ValueError(f"batch is missing model inputs {sorted(missing)} (see models/interface.py).")
    return {key: value for key, value in batch.items() if key not in RL_KEYS}


def num_scored_positions(batch: Batch) -> int:
    """T_c: how many trailing positions of input_ids are scored (static, from the completion mask's shape)."""
    total = batch["input_ids"].shape[1]
    scored = batch["completion_mask"].shape[1] if "completion_mask" in batch else total
    if not 1 <= scored <= total:
        raise ValueError(
            f"completion_mask has {scored} positions but input_ids only {total}; completion arrays must be "
            "[B, T_c] with T_c <= T, aligned with the last T_c tokens of input_ids."
        )
    return scored


def make_log_prob_fn(
    graphdef: nnx.GraphDef,
    *,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    frozen_state: nnx.State | None = None,
) -> LogProbFn:
    """Build `log_prob_fn(params, batch) -> (logprobs float32[B, T_c], entropy float32[B, T_c])`.

    graphdef: from `nnx.split(model)` of a module implementing `CausalLM`. params: the state that was split off
    with it (differentiated by the update step). frozen_state: the remaining states when the model was split
    with filters (e.g. `nnx.split(model, nnx.Param, ...)`), merged in as constants of the computation.
    temperature: the sampler's temperature, so ratios compare the same distribution. chunk_size: vocabulary
    columns per chunk of the log-softmax (see `token_logprobs_from_hidden`).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (the sampler's temperature); got {temperature}.")
    extra_states = () if frozen_state is None else (frozen_state,)

    def log_prob_fn(params: Any, batch: Batch) -> tuple[Array, Array]:
        input_ids = batch["input_ids"]
        chex.assert_rank(input_ids, 2)
        total = input_ids.shape[1]
        scored = num_scored_positions(batch)
        model: CausalLM = nnx.merge(graphdef, params, *extra_states)
        hidden = model.hidden_states(model_inputs(batch))
        chex.assert_shape(hidden, (*input_ids.shape, None))
        # Hidden state t - 1 predicts token t: score tokens [total - scored, total) from states one earlier.
        first = total - scored
        context = hidden[:, max(first - 1, 0) : total - 1]
        targets = input_ids[:, max(first, 1) :]
        unembed, vocab_axis = model.stored_output_embedding()
        logprobs, entropy = token_logprobs_from_hidden(
            context, unembed, targets, temperature=temperature, chunk_size=chunk_size, vocab_axis=vocab_axis
        )
        if first == 0:  # the first token has no context: pad its column with zeros
            logprobs = jnp.pad(logprobs, ((0, 0), (1, 0)))
            entropy = jnp.pad(entropy, ((0, 0), (1, 0)))
        return logprobs, entropy

    return log_prob_fn
