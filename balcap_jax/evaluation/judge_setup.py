"""The evaluation judges from the run config (`config.rewards.judge`) or the scripted dry-run backend.

  backend "openai"   : OpenAI-compatible servers (vLLM, SGLang, hosted APIs): `llm_url`/`llm_model` answer from
                       text, `vlm_url`/`vlm_model` see the image (without a VLM the text judge must be
                       multimodal and is used for both); replies cached in `<cache_dir>/judge_cache.sqlite`
                       (or `<workdir>/judge_cache/` when cache_dir is empty and a workdir is given).
  "scripted"         : `scripted_judge.EvalRuleResponder`, deterministic, no model (tests, dry runs).
"""

from __future__ import annotations

import os
from typing import Any

from balcap_jax.evaluation.judging import EvalJudges
from balcap_jax.evaluation.scripted_judge import scripted_eval_judge

BACKENDS = ("openai", "scripted")


def openai_judges(judge: Any, *, workdir: str | os.PathLike | None = None) -> EvalJudges:
    from balcap_jax.rewards.judges.openai_pair import openai_judge_pair_from_config

    text, visual = openai_judge_pair_from_config(
        judge, workdir=workdir, purpose="to evaluate with judge backend 'openai'"
    )
    return EvalJudges(text=text, visual=visual)


def build_judges(
    backend: str, config: Any, *, scripted_latency_s: float = 0.0, workdir: str | os.PathLike | None = None
) -> EvalJudges:
    """backend: "config" (whatever config.rewards.judge.backend names; must be "openai") or one of BACKENDS.
    workdir: where the judge cache lives when `rewards.judge.cache_dir` is empty (None: no cache then)."""
    if backend == "config":
        backend = str(config.rewards.judge.backend)
        if backend not in BACKENDS:
            raise ValueError(
                f"config.rewards.judge.backend={backend!r} cannot judge the DCScore / CaptionQA / CapArena protocols; "
                "set it to 'openai' (with llm_url/llm_model, vlm_url/vlm_model) or pass --judge=scripted for a dry run"
            )
    if backend == "openai":
        return openai_judges(config.rewards.judge, workdir=workdir)
    if backend == "scripted":
        judge = scripted_eval_judge(latency_s=scripted_latency_s)
        return EvalJudges(text=judge, visual=judge)
    raise ValueError(f"--judge={backend!r}: use 'config' or one of {BACKENDS}")
