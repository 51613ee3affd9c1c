"""The run's reward components from `config.rewards` (names, judge backend)."""

from __future__ import annotations

import os
from typing import Any

from balcap_jax.rewards.caprl_qa import CapRLQAReward
from balcap_jax.rewards.judges.openai_compatible import OpenAICompatibleConfig, OpenAICompatibleJudge
from balcap_jax.rewards.judges.response_cache import ResponseCache
from balcap_jax.rewards.judges.shapes_world import (
    ShapesWorldLinguistic,
    ShapesWorldPrecision,
    ShapesWorldQA,
    ShapesWorldRecall,
)
from balcap_jax.rewards.linguistic import LinguisticReward
from balcap_jax.rewards.precision import PrecisionReward
from balcap_jax.rewards.recall import RecallReward

KNOWN_COMPONENTS = ("precision", "recall", "linguistic", "caprl_qa")


def build_reward_components(config: Any) -> list[Any]:
    """One component per name in `config.rewards.components`, in that order (the K axis of rewards[P, G, K])."""
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
        return _openai_components(names, judge)
    raise ValueError(
        f"config.rewards.judge.backend={judge.backend!r} cannot drive training from the config; allowed: "
        "'shapes_world', 'openai' (in-process JAX judges are built in code: balcap_jax.rewards.judges.jax_local)"
    )


def _openai_components(names: tuple[str, ...], judge: Any) -> list[Any]:
    if not judge.llm_url or not judge.llm_model:
        raise ValueError(
            "config.rewards.judge.llm_url and llm_model must be set for backend='openai' (e.g. "
            "--config.rewards.judge.llm_url=http://host:8000/v1 --config.rewards.judge.llm_model=Qwen/Qwen2.5-72B)"
        )
    cache = ResponseCache(os.path.join(judge.cache_dir, "judge_cache.sqlite")) if judge.cache_dir else None
    common = dict(
        max_concurrency=int(judge.max_concurrency),
        request_timeout_s=float(judge.timeout_s),
        max_attempts=int(judge.max_retries) + 1,
        api_key_env=judge.api_key_env or None,
    )
    urls = tuple(u for u in str(judge.llm_url).split(",") if u)
    text_judge = OpenAICompatibleJudge(
        OpenAICompatibleConfig(model=judge.llm_model, base_urls=urls, multimodal=not judge.vlm_url, **common),
        cache=cache,
    )
    visual_judge = text_judge
    if judge.vlm_url:
        if not judge.vlm_model:
            raise ValueError("config.rewards.judge.vlm_model must be set when vlm_url is")
        vlm_urls = tuple(u for u in str(judge.vlm_url).split(",") if u)
        visual_judge = OpenAICompatibleJudge(
            OpenAICompatibleConfig(model=judge.vlm_model, base_urls=vlm_urls, multimodal=True, **common),
            cache=cache,
        )
    factories = {
        "precision": lambda: PrecisionReward(text_judge, visual_judge),
        "recall": lambda: RecallReward(text_judge),
        "linguistic": lambda: LinguisticReward(text_judge),
        "caprl_qa": lambda: CapRLQAReward(text_judge),
    }
    return [factories[n]() for n in names]
