"""Non-cached references for sampler tests: step-by-step decoding with the full training forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from balcap_jax.models.interface import next_text_positions


def greedy_reference(
    model, prompts: dict, num_new: int, eos_ids=(), pad_id: int = 0, blocked_ids=()
) -> np.ndarray:
    """int32[B, num_new]: argmax of the full (non-cached) forward, one token at a time; pad after EOS;
    `blocked_ids` are never chosen.

    The sequence lives in a fixed [B, T + num_new] buffer (so the forward compiles once); causal attention
    means the not-yet-written columns cannot influence the column being read.
    """
    ids = np.asarray(prompts["input_ids"])
    mask = np.asarray(prompts["attention_mask"])
    positions = np.asarray(prompts["positions"])
    batch, length = ids.shape
    start = np.asarray(next_text_positions(jnp.asarray(positions), jnp.asarray(mask)))
    completion_positions = start[:, None] + np.arange(num_new)[None]
    if positions.ndim == 3:
        completion_positions = np.broadcast_to(completion_positions[None], (3, batch, num_new))
    full_positions = jnp.asarray(np.concatenate([positions, completion_positions], axis=-1), jnp.int32)
    ids = np.concatenate([ids, np.full((batch, num_new), pad_id, np.int32)], axis=1)
    mask = np.concatenate([mask, np.zeros((batch, num_new), bool)], axis=1)
    vision = prompts.get("vision")

    @jax.jit
    def next_logits(ids, mask, column):
        inputs = {"input_ids": ids, "attention_mask": mask, "positions": full_positions}
        if vision is not None:
            inputs["vision"] = vision
        hidden = jax.lax.dynamic_index_in_dim(model.hidden_states(inputs), column, axis=1, keepdims=False)
        logits = model.logits(hidden)
        return logits.at[:, jnp.asarray(blocked_ids, jnp.int32)].set(-jnp.inf) if blocked_ids else logits

    done = np.zeros(batch, bool)
    for j in range(num_new):
        token = np.asarray(jnp.argmax(next_logits(ids, mask, length - 1 + j), axis=-1)).astype(np.int32)
        token = np.where(done, pad_id, token)
        ids[:, length + j] = token
        mask[:, length + j] = ~done
        done = done | np.isin(token, eos_ids)
    return ids[:, length:]


def completion_logprobs_full_forward(model, batch: dict, temperature: float) -> np.ndarray:
    """fp32[N, T_new] log_softmax(logits / T) of each completion token, from one full forward of the training
    batch built by `build_training_batch` (what the trainer recomputes)."""
    num_new = batch["completion_ids"].shape[1]

    @jax.jit
    def forward(batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "positions", "vision") if k in batch}
        hidden = model.hidden_states(inputs)[:, -(num_new + 1) : -1]
        logp = jax.nn.log_softmax(model.logits(hidden) / temperature, axis=-1)
        chosen = jnp.take_along_axis(logp, batch["completion_ids"][..., None], axis=-1)[..., 0]
        return jnp.where(batch["completion_mask"], chosen, 0.0)

    return np.asarray(forward(batch))
