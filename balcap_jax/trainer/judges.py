"""The run's reward components from `config.rewards` (names, judge backend)."""

from __future__ import annotations

import os
from typing import Any

from balcap_jax.rewards.components import COMPONENT_NAMES, judged_components
from balcap_jax.rewards.judges.openai_pair import openai_judge_pair_from_config
from balcap_jax.rewards.judges.shapes_world import (
    ShapesWorldLinguistic,
    ShapesWorldPrecision,
    ShapesWorldQA,
    ShapesWorldRecall,
)

KNOWN_COMPONENTS = COMPONENT_NAMES


def build_reward_components(config: Any, *, workdir: str | os.PathLike | None = None) -> list[Any]:
    """One component per name in `config.rewards.components`, in that order (the K axis of rewards[P, G, K]).

    workdir: the run's directory; with backend 'openai' and an empty `rewards.judge.cache_dir`, judge replies
    are cached in `<workdir>/judge_cache` (so a resumed run pays for no judge call twice).
    """
    names = tuple(config.rewards.components)
    unknown = [n for n in names if n not in KNOWN_COMPONENTS]
    if unknown:
        raise ValueError(f"config.rewards.components has unknown names {unknown}; allowed: {KNOWN_COMPONENTS}")
    judge = config.rewards.judge
    if judge.backend == "shapes_world":
        factories = {
            "precision": ShapesWorldPrecision,
            "recall": ShapesWorldRecall,
            "linguistic": ShapesWorldLinguistic,
            "caprl_qa": ShapesWorldQA,
        }
        return [factories[n]() for n in names]
    if judge.backend == "openai":
        return _openai_components(names, judge, workdir)
    raise ValueError(
        f"config.rewards.judge.backend={judge.backend!r} cannot drive training from the config; allowed: "
        "'shapes_world', 'openai' (in-process JAX judges are built in code: balcap_jax.rewards.judges.jax_local)"
    )


def _openai_components(names: tuple[str, ...], judge: Any, workdir: str | os.PathLike | None) -> list[Any]:
    return judged_components(names, *openai_judge_pair_from_config(judge, workdir=workdir))
