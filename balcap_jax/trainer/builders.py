"""The one place a run config becomes objects: mesh, optimizers, loss, log-prob functions, sampler configs,
reward shaping. The training loop, the AOT tools and evaluation all build through here, so a compiled program
and the program the loop runs can never drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from balcap_jax.parallel.mesh import MeshShape, make_mesh
from balcap_jax.rl import losses as losses_lib
from balcap_jax.rl import update as update_lib
from balcap_jax.rl.policy_logprobs import make_log_prob_fn
from balcap_jax.sampling.config import SamplerConfig
from balcap_jax.sampling.strategies import Greedy, Temperature, TopP
from balcap_jax.rl import shaping


def mesh(config: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    return make_mesh(MeshShape.from_config(config.mesh), devices=devices)


def rl_temperature(config: Any) -> float:
    """The temperature the RL log-probs are taken at: the sampling distribution's (see `sampler_config`)."""
    return max(float(config.sampling.temperature), 1e-6)


def rl_log_prob_fn(graphdef: Any, config: Any):
    """Per-token log-probs under the distribution the rollouts were sampled from (RL ratio, KL)."""
    return make_log_prob_fn(graphdef, temperature=rl_temperature(config))


def sft_log_prob_fn(graphdef: Any):
    """Supervised cross-entropy is the model's own distribution: temperature 1, whatever the sampler uses."""
    return make_log_prob_fn(graphdef, temperature=1.0)


def _optimizer(config: Any, *, lr: float, total_steps: int, warmup: int):
    o = config.optim
    schedule = o.schedule if o.schedule != "cosine" or total_steps > warmup else "constant"
    cfg = update_lib.OptimizerConfig(
        learning_rate=lr, schedule=schedule, warmup_steps=warmup, total_steps=total_steps,
        b1=float(o.b1), b2=float(o.b2), weight_decay=float(o.weight_decay),
        max_grad_norm=float(o.grad_clip) if o.grad_clip else None,
    )
    return update_lib.make_optimizer(cfg), update_lib.make_lr_schedule(cfg)


def rl_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + clipping + warm-up over every optimizer update of the RL phase."""
    total = max(int(config.train.rl_steps) * int(config.train.updates_per_batch), 1)
    return _optimizer(config, lr=float(config.optim.lr), total_steps=total, warmup=int(config.optim.warmup_steps))


def sft_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    sft_steps = int(config.train.sft_steps)
    return _optimizer(config, lr=float(config.train.sft_lr), total_steps=max(sft_steps, 1),
                      warmup=min(int(config.optim.warmup_steps), max(sft_steps - 1, 0)))


def loss_config(config: Any) -> losses_lib.LossConfig:
    loss = config.loss
    return losses_lib.LossConfig(
        eps_low=float(loss.eps_low), eps_high=float(loss.eps_high), dual_clip=float(loss.dual_clip) or None,
        kl_coef=float(loss.kl_coef), aggregation=loss.aggregation, tis_cap=float(loss.get("tis_cap", 0.0)),
        norm_length=int(config.sampling.max_new_tokens),  # Dr. GRPO's constant stays the buffer when trimmed
    )


def old_logprobs_mode(config: Any) -> str:
    """pi_old of the RL ratio: the update's own forward with one update per batch (ratio exactly 1 at it), else
    recomputed once per batch by the trainer (`rl_batch_logprobs`); with overlap the batch was sampled by the
    previous weights, so pi_old is theirs (recomputed right after sampling)."""
    overlapped = config.train.get("overlap", "none") != "none"
    return "current" if int(config.train.updates_per_batch) == 1 and not overlapped else "batch"


def rl_batch_logprobs(graphdef: Any, config: Any):
    """Jitted (params, batch) -> log-probs [B, T_c] under the RL distribution: pi_old before a batch's updates
    (updates_per_batch > 1) and pi_ref from the frozen reference (loss.kl_coef > 0)."""
    return update_lib.make_batch_logprobs(rl_log_prob_fn(graphdef, config),
                                          micro_batches=int(config.train.micro_batches))


def rl_update_step(graphdef: Any, config: Any):
    """The jitted RL update of the recipe (the loop runs it; the AOT tools lower exactly this)."""
    optimizer, schedule = rl_optimizer(config)
    return update_lib.make_update_step(
        rl_log_prob_fn(graphdef, config), optimizer, loss_config(config),
        micro_batches=int(config.train.micro_batches), learning_rate_fn=schedule,
        old_logprobs=old_logprobs_mode(config),
    )


def shaping_config(config: Any) -> shaping.ShapingConfig:
    return shaping.ShapingConfig.from_config(config)


def sampler_config(config: Any, policy: Any, *, greedy: bool = False, group_size: int | None = None) -> SamplerConfig:
    """Rollout settings: `greedy` for evaluation captions (group_size 1 unless given)."""
    s = config.sampling
    top_k = int(s.top_k) or None
    if greedy or float(s.temperature) == 0.0:
        strategy = Greedy()
    elif float(s.top_p) < 1.0:
        strategy = TopP(float(s.top_p), float(s.temperature), top_k)
    else:
        strategy = Temperature(float(s.temperature), top_k)
    if group_size is None:
        group_size = 1 if greedy else int(s.group_size)
    return SamplerConfig(
        max_new_tokens=int(s.max_new_tokens),
        eos_ids=tuple(int(e) for e in policy.eos_ids),
        pad_id=int(policy.pad_id),
        strategy=strategy,
        group_size=group_size,
        prompt_buckets=tuple(int(b) for b in config.data.prompt_buckets),
        cache_dtype="float32" if config.model.dtype == "float32" else "bfloat16",
        blocked_ids=policy.family.blocked_ids(policy.model_config),
    )
