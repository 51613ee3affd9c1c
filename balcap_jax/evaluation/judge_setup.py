"""The evaluation judges from the run config (`config.rewards.judge`) or the scripted dry-run backend.

  backend "openai"   : OpenAI-compatible servers (vLLM, SGLang, hosted APIs): `llm_url`/`llm_model` answer from
                       text, `vlm_url`/`vlm_model` see the image (without a VLM the text judge must be
                       multimodal and is used for both); replies cached in `<cache_dir>/judge_cache.sqlite`.
  "scripted"         : `scripted_judge.EvalRuleResponder`, deterministic, no model (tests, dry runs).
"""

from __future__ import annotations

import os
from typing import Any

from balcap_jax.evaluation.judging import EvalJudges
from balcap_jax.evaluation.scripted_judge import scripted_eval_judge

BACKENDS = ("openai", "scripted")


def _urls(value: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in str(value).split(",") if u.strip())


def openai_judges(judge: Any) -> EvalJudges:
    from balcap_jax.rewards.judges.openai_compatible import OpenAICompatibleConfig, OpenAICompatibleJudge
    from balcap_jax.rewards.judges.response_cache import ResponseCache

    if not judge.llm_url or not judge.llm_model:
        raise ValueError(
            "config.rewards.judge.llm_url and llm_model must be set to evaluate with judge backend 'openai' (e.g. "
            "--config.rewards.judge.llm_url=http://host:8000/v1 --config.rewards.judge.llm_model=Qwen/Qwen2.5-72B)"
        )
    cache = ResponseCache(os.path.join(judge.cache_dir, "judge_cache.sqlite")) if judge.cache_dir else None
    common = dict(max_concurrency=int(judge.max_concurrency), request_timeout_s=float(judge.timeout_s),
                  max_attempts=int(judge.max_retries) + 1, api_key_env=judge.api_key_env or None)  # fmt: skip
    text = OpenAICompatibleJudge(
        OpenAICompatibleConfig(model=judge.llm_model, base_urls=_urls(judge.llm_url), multimodal=not judge.vlm_url,
                               **common), cache=cache)  # fmt: skip
    visual = text
    if judge.vlm_url:
        if not judge.vlm_model:
            raise ValueError("config.rewards.judge.vlm_model must be set when vlm_url is")
        visual = OpenAICompatibleJudge(
            OpenAICompatibleConfig(model=judge.vlm_model, base_urls=_urls(judge.vlm_url), multimodal=True, **common),
            cache=cache,
        )
    return EvalJudges(text=text, visual=visual)


def build_judges(backend: str, config: Any, *, scripted_latency_s: float = 0.0) -> EvalJudges:
    """backend: "config" (whatever config.rewards.judge.backend names; must be "openai") or one of BACKENDS."""
    if backend == "config":
        backend = str(config.rewards.judge.backend)
        if backend not in BACKENDS:
            raise ValueError(
                f"config.rewards.judge.backend={backend!r} cannot judge the DCScore / CaptionQA / CapArena protocols; "
                "set it to 'openai' (with llm_url/llm_model, vlm_url/vlm_model) or pass --judge=scripted for a dry run"
            )
    if backend == "openai":
        return openai_judges(config.rewards.judge)
    if backend == "scripted":
        judge = scripted_eval_judge(latency_s=scripted_latency_s)
        return EvalJudges(text=judge, visual=judge)
    raise ValueError(f"--judge={backend!r}: use 'config' or one of {BACKENDS}")
