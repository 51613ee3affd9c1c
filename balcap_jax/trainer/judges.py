"""The run's reward components from `config.rewards` (names, judge backend)."""

from __future__ import annotations

import logging
import os
from typing import Any

from balcap_jax.rewards.components import COMPONENT_NAMES, judged_components
from balcap_jax.rewards.judges import BACKENDS
from balcap_jax.rewards.judges.jax_local import ImagesUnscorable, llama_text_judge
from balcap_jax.rewards.judges.openai_pair import openai_judge_pair_from_config
from balcap_jax.rewards.shapes_world.components import (
    ShapesWorldLinguistic,
    ShapesWorldPrecision,
    ShapesWorldQA,
    ShapesWorldRecall,
)

logger = logging.getLogger(__name__)


def build_reward_components(config: Any, *, workdir: str | os.PathLike | None = None) -> list[Any]:
    """One component per name in `config.rewards.components`, in that order (the K axis of rewards[P, G, K]).

    workdir: the run's directory; with backend 'openai' and an empty `rewards.judge.cache_dir`, judge replies
    are cached in `<workdir>/judge_cache` (so a resumed run pays for no judge call twice).
    """
    names = tuple(config.rewards.components)
    unknown = [n for n in names if n not in COMPONENT_NAMES]
    if unknown:
        raise ValueError(f"config.rewards.components has unknown names {unknown}; allowed: {COMPONENT_NAMES}")
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
    if judge.backend == "jax_local":
        return _jax_local_components(names, judge)
    raise ValueError(f"config.rewards.judge.backend={judge.backend!r} is not a judge backend; allowed: {list(BACKENDS)}")


def _jax_local_components(names: tuple[str, ...], judge: Any) -> list[Any]:
    """The text judge in-process on our Llama decoder; it is text-only, so precision's image checks are
    unscorable (NaN, counted) rather than answered by a model that cannot see the image."""
    model_dir = judge.get("local_model_dir", "")
    if not model_dir:
        raise ValueError(
            "config.rewards.judge.local_model_dir must be set for backend='jax_local' (a local HF Llama chat "
            "checkpoint, e.g. the directory `python -m balcap_jax.tools.smollm2_checkpoint` prints)"
        )
    text = llama_text_judge(str(model_dir), max_new_tokens=int(judge.get("local_max_new_tokens", 512)))
    if "precision" in names:
        logger.warning("judge.backend='jax_local' is text-only: every precision score will be unscorable (NaN)")
    return judged_components(names, text, ImagesUnscorable(text))


def _openai_components(names: tuple[str, ...], judge: Any, workdir: str | os.PathLike | None) -> list[Any]:
    return judged_components(names, *openai_judge_pair_from_config(judge, workdir=workdir))
