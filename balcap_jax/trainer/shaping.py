"""From judged rewards to per-sample advantages, as the run config says (pure; jit-able).

rewards [P, G, K] in the order of `config.rewards.components` -> optional length handling (BalCapRL's
length-conditional mask, or the linear-penalty baseline appended as a component) -> GRPO or c-GDPO.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from balcap_jax.rl import advantages as adv

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ShapingConfig:
    """Static (hashable) settings; see configs/tiny.py for the meaning of each field."""

    components: tuple[str, ...]
    weights: tuple[float, ...]
    kind: str = "gdpo"
    eps: float = 1e-4
    ddof: int = 1
    batch_stats: str = "sample"
    length_kind: str = "mask"
    length_component: str = "linguistic"
    ratio_min: float = 0.5
    ratio_max: float = 1.5
    masked_value: float = 0.0
    length_coef: float = 0.01

    def __post_init__(self):
        if len(self.components) != len(self.weights):
            raise ValueError(
                f"config.rewards.weights has {len(self.weights)} entries for {len(self.components)} components "
                f"{self.components}; give one weight per component"
            )
        if self.kind not in ("grpo", "gdpo"):
            raise ValueError(f"config.advantage.kind={self.kind!r}; allowed: 'grpo', 'gdpo'")
        if self.length_kind not in ("mask", "linear", "none"):
            raise ValueError(f"config.length.kind={self.length_kind!r}; allowed: 'mask', 'linear', 'none'")
        if self.length_kind == "mask" and self.length_component not in self.components:
            raise ValueError(
                f"config.length.component={self.length_component!r} is not a reward component {self.components}"
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
            length_kind=config.length.kind,
            length_component=config.length.component,
            ratio_min=float(config.length.ratio_min),
            ratio_max=float(config.length.ratio_max),
            masked_value=float(config.length.masked_value),
            length_coef=float(config.length.coef),
        )


def shape_rewards(rewards: Array, lengths: Array, ref_lengths: Array, cfg: ShapingConfig) -> tuple[Array, Array]:
    """Length handling. rewards [P, G, K], lengths [P, G] (caption tokens, EOS excluded), ref_lengths [P].
    Returns (rewards [P, G, K'], weights [K']) with K' = K + 1 for the linear penalty."""
    weights = jnp.asarray(cfg.weights, jnp.float32)
    if cfg.length_kind == "mask":
        index = cfg.components.index(cfg.length_component)
        rewards = adv.length_conditional_mask(
            rewards, lengths, ref_lengths, component=index, ratio_min=cfg.ratio_min, ratio_max=cfg.ratio_max,
            masked_value=cfg.masked_value,
        )
    elif cfg.length_kind == "linear":
        rewards = adv.linear_length_penalty(rewards, lengths, ref_lengths, coef=cfg.length_coef, relative=True)
        weights = jnp.concatenate([weights, jnp.ones((1,), jnp.float32)])
    return rewards, weights


def advantages(rewards: Array, lengths: Array, ref_lengths: Array, cfg: ShapingConfig) -> tuple[Array, Array]:
    """-> (advantages float32[P, G], shaped rewards [P, G, K'])."""
    shaped, weights = shape_rewards(rewards, lengths, ref_lengths, cfg)
    if cfg.kind == "grpo":
        return adv.grpo_advantages(shaped, weights, eps=cfg.eps, ddof=cfg.ddof), shaped
    token_counts = lengths if cfg.batch_stats == "token" else None
    return (
        adv.gdpo_advantages(shaped, weights, eps=cfg.eps, ddof=cfg.ddof, batch_stats=cfg.batch_stats,
                            token_counts=token_counts),
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
