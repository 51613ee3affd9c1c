"""From judged rewards to per-sample advantages, as the run config says (pure; jit-able).

rewards [P, G, K] in the order of `config.rewards.components` -> optional length handling (BalCapRL's
length-conditional mask on the rewards, or the linear-penalty baseline as an additive per-sample term) -> GRPO or
c-GDPO.

What an unscorable (NaN) component does: under c-GDPO it is left out of that component's group statistics and adds
0 to the sample's summed z-scores, i.e. the group average; under GRPO the default `partial_nan="mean_present"`
scores the sample by the weighted mean of its scored components rescaled to the full weight, so it is neither
penalised nor rewarded for the judge's failure (TRL's "sum_present" would read it as 0). A sample with every
component NaN is unscorable under both: excluded from the statistics, advantage 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from balcap_jax.rl import advantages as adv

Array = jax.Array

ADVANTAGE_KINDS = ("grpo", "gdpo")  # config.advantage.kind
LENGTH_KINDS = ("mask", "linear", "none")  # config.length.kind
DEFAULT_GRPO_PARTIAL_NAN = "mean_present"
B_CAPSCORE_COMPONENTS = ("precision", "recall", "linguistic")


@dataclasses.dataclass(frozen=True)
class ShapingConfig:
    """Static (hashable) settings; see configs/tiny.py for the meaning of each field.

    grpo_partial_nan: how GRPO scores a partially judged sample (rl/advantages.grpo_advantages); from
      `config.advantage.partial_nan`, default "mean_present" (an unscorable component is never read as 0).
    masked_value: a finite value, or NaN to make a masked component unscorable instead of penalised.
    """

    components: tuple[str, ...]
    weights: tuple[float, ...]
    kind: str = "gdpo"
    eps: float = 1e-4
    ddof: int = 1
    batch_stats: str = "sample"
    grpo_partial_nan: str = DEFAULT_GRPO_PARTIAL_NAN
    length_kind: str = "mask"
    length_component: str = "linguistic"
    ratio_min: float = adv.DEFAULT_RATIO_MIN
    ratio_max: float = adv.DEFAULT_RATIO_MAX
    masked_value: float = 0.0
    length_coef: float = 0.01

    def __post_init__(self):
        if len(self.components) != len(self.weights):
            raise ValueError(
                f"config.rewards.weights has {len(self.weights)} entries for {len(self.components)} components "
                f"{self.components}; give one weight per component"
            )
        if self.kind not in ADVANTAGE_KINDS:
            raise ValueError(f"config.advantage.kind={self.kind!r}; allowed: {list(ADVANTAGE_KINDS)}")
        if self.grpo_partial_nan not in adv.PARTIAL_NAN_MODES:
            raise ValueError(
                f"config.advantage.partial_nan={self.grpo_partial_nan!r}; allowed: {adv.PARTIAL_NAN_MODES} "
                f"(use {DEFAULT_GRPO_PARTIAL_NAN!r} so an unscorable component is not read as 0)"
            )
        if self.length_kind not in LENGTH_KINDS:
            raise ValueError(f"config.length.kind={self.length_kind!r}; allowed: {list(LENGTH_KINDS)}")
        if self.length_kind == "mask" and self.length_component not in self.components:
            raise ValueError(
                f"config.length.component={self.length_component!r} is not a reward component {self.components}"
            )
        if math.isinf(self.masked_value):
            raise ValueError(
                f"config.length.masked_value={self.masked_value}; use a finite value (no credit: 0.0) or NaN "
                "(the masked component becomes unscorable)"
            )

    @classmethod
    def from_config(cls, config: Any) -> "ShapingConfig":
        return cls(
            components=tuple(config.rewards.components),
            weights=tuple(float(w) for w in config.rewards.weights),
            kind=config.advantage.kind,
            eps=float(config.advantage.eps),
            ddof=int(config.advantage.ddof),
            batch_stats=config.advantage.batch_stats,
            # configs written before the field existed keep working, with the training default
            grpo_partial_nan=config.advantage.get("partial_nan", DEFAULT_GRPO_PARTIAL_NAN),
            length_kind=config.length.kind,
            length_component=config.length.component,
            ratio_min=float(config.length.ratio_min),
            ratio_max=float(config.length.ratio_max),
            masked_value=float(config.length.masked_value),
            length_coef=float(config.length.coef),
        )


def shape_rewards(rewards: Array, lengths: Array, ref_lengths: Array, cfg: ShapingConfig) -> tuple[Array, Array]:
    """The length-conditional mask, when configured. rewards [P, G, K], lengths [P, G] (caption tokens, EOS
    excluded), ref_lengths [P]. Returns (rewards [P, G, K], weights float32[K]); the linear penalty is not a
    reward component and lives in `length_offset`."""
    weights = jnp.asarray(cfg.weights, jnp.float32)
    if cfg.length_kind == "mask":
        index = cfg.components.index(cfg.length_component)
        rewards = adv.length_conditional_mask(
            rewards, lengths, ref_lengths, component=index, ratio_min=cfg.ratio_min, ratio_max=cfg.ratio_max,
            masked_value=cfg.masked_value,
        )
    return rewards, weights


def length_offset(lengths: Array, ref_lengths: Array, cfg: ShapingConfig) -> Array | None:
    """The linear length penalty −λ · max(0, ρ − 1) as float32[P, G] (ρ = length / reference length), added to
    each sample's score before normalisation; None unless config.length.kind == "linear"."""
    if cfg.length_kind != "linear":
        return None
    return adv.linear_length_penalty(lengths, ref_lengths, coef=cfg.length_coef, relative=True)


def token_counts(lengths: Array) -> Array:
    """Loss-carrying tokens per caption, int32[P, G], from lengths [P, G] that exclude EOS
    (trainer/rl_step.caption_lengths).

    The completion mask includes the EOS token, so it is counted: an EOS-only caption has weight 1 in token-level
    batch statistics instead of dropping out of them. A caption truncated at the token budget has no EOS and is
    counted one token long (a relative error below 1 / max_new_tokens).
    """
    return jnp.maximum(lengths.astype(jnp.int32), 0) + 1


def advantages(rewards: Array, lengths: Array, ref_lengths: Array, cfg: ShapingConfig) -> tuple[Array, Array]:
    """-> (advantages float32[P, G], shaped rewards [P, G, K]). lengths [P, G] exclude EOS; ref_lengths [P]."""
    shaped, weights = shape_rewards(rewards, lengths, ref_lengths, cfg)
    offset = length_offset(lengths, ref_lengths, cfg)
    if cfg.kind == "grpo":
        return (
            adv.grpo_advantages(shaped, weights, eps=cfg.eps, ddof=cfg.ddof, partial_nan=cfg.grpo_partial_nan,
                                offset=offset),
            shaped,
        )
    counts = token_counts(lengths) if cfg.batch_stats == "token" else None
    return (
        adv.gdpo_advantages(shaped, weights, eps=cfg.eps, ddof=cfg.ddof, batch_stats=cfg.batch_stats,
                            token_counts=counts, offset=offset),
        shaped,
    )


def balanced_score(rewards: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of the raw components per sample (NaN components skipped): the headline number."""
    rewards = np.asarray(rewards, np.float64)
    w = np.broadcast_to(np.asarray(weights, np.float64), rewards.shape)
    present = ~np.isnan(rewards)
    total = np.where(present, rewards * w, 0.0).sum(-1)
    norm = np.where(present, w, 0.0).sum(-1)
    return np.where(norm > 0, total / np.where(norm > 0, norm, 1.0), np.nan)


def b_capscore(rewards: np.ndarray, components: Sequence[str]) -> np.ndarray:
    """b-CapScore: the harmonic mean of precision, recall and linguistic per sample, float64[...].

    rewards: float[..., K] in [0, 1], ordered as `components` (names, K of them). 3 / (1/p + 1/r + 1/l); 0 where
    any of the three is 0 (its limit); NaN where any is NaN (unscorable wins over 0: the score is undefined) or
    where `components` lacks one of them.
    """
    rewards = np.asarray(rewards, np.float64)
    components = tuple(components)
    if rewards.ndim == 0 or rewards.shape[-1] != len(components):
        raise ValueError(
            f"rewards has shape {rewards.shape} but components names {len(components)} ({components}); the last "
            "axis must hold one value per component"
        )
    if not all(name in components for name in B_CAPSCORE_COMPONENTS):
        return np.full(rewards.shape[:-1], np.nan)
    three = rewards[..., [components.index(name) for name in B_CAPSCORE_COMPONENTS]]
    if np.any(three < 0):
        raise ValueError(
            f"b_capscore needs rewards in [0, 1], got a minimum of {np.nanmin(three)}; pass the judged rewards, not "
            "ones length-masked to a negative config.length.masked_value"
        )
    with np.errstate(divide="ignore"):
        harmonic = len(B_CAPSCORE_COMPONENTS) / np.sum(1.0 / three, axis=-1)  # a 0 gives 1/0 = inf, hence 0
    return np.where(np.any(np.isnan(three), axis=-1), np.nan, harmonic)


def mean_b_capscore(rewards: np.ndarray, components: Sequence[str]) -> float | None:
    """The mean b-CapScore over the samples it is defined for (NaN if none is); None when `components` lack one
    of precision, recall and linguistic (the metric does not apply)."""
    if not set(B_CAPSCORE_COMPONENTS) <= set(components):
        return None
    values = b_capscore(rewards, components)
    present = ~np.isnan(values)
    return float(values[present].mean()) if present.any() else float("nan")
