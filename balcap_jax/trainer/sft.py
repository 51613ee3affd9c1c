"""Supervised warm start: teacher-forced cross-entropy on reference captions, same batch layout as RL."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from balcap_jax.rl.policy_logprobs import LogProbFn
from balcap_jax.rl.update import TrainState

Array = jax.Array


def sft_loss(log_prob_fn: LogProbFn, params: Any, batch: dict[str, Any]) -> tuple[Array, dict[str, Array]]:
    """Mean negative log-likelihood per completion token (EOS included)."""
    logprobs, _ = log_prob_fn(params, batch)
    mask = batch["completion_mask"].astype(jnp.float32)
    tokens = jnp.maximum(mask.sum(), 1.0)
    nll = -jnp.sum(logprobs * mask) / tokens
    accuracy_proxy = jnp.sum(jnp.exp(logprobs) * mask) / tokens  # mean p(target): rises towards 1 as SFT fits
    return nll, {"sft/nll": nll, "sft/mean_target_prob": accuracy_proxy, "sft/tokens": tokens}


def make_sft_step(
    log_prob_fn: LogProbFn, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, Array]]]:
    """Jitted `(state, batch) -> (state, metrics)`; the state is donated."""

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, Array]]:
        (_, metrics), grads = jax.value_and_grad(lambda p: sft_loss(log_prob_fn, p, batch), has_aux=True)(
            state.params
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics["sft/grad_norm"] = optax.global_norm(grads)
        new_state = TrainState(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            step=state.step + 1,
            skipped_steps=state.skipped_steps,
        )
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,))
