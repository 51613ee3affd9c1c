"""The (text judge, visual judge) pair over OpenAI-compatible servers, as training, evaluation and the scoring CLI
all use it: one response cache shared by both, and without a separate VLM the text judge sees the images too.

`openai_judge_pair` takes explicit endpoints (the CLI's flags); `openai_judge_pair_from_config` reads the run
config's `rewards.judge` block (training, evaluation), where the cache defaults to `<workdir>/judge_cache`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal, Sequence

from balcap_jax.rewards.judges.openai_compatible import OpenAICompatibleConfig, OpenAICompatibleJudge
from balcap_jax.rewards.judges.response_cache import ResponseCache
from balcap_jax.rewards.judges.wire_images import DEFAULT_MAX_SIDE

CACHE_FILE = "judge_cache.sqlite"
WORKDIR_CACHE_DIR = "judge_cache"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One served judge model: its name, base URLs (round-robin), API and the env var holding its key."""

    model: str
    base_urls: tuple[str, ...]
    api_key_env: str | None = None
    api: Literal["chat", "completions"] = "chat"


def split_urls(values: str | Sequence[str] | None) -> tuple[str, ...]:
    """Base URLs from a comma-separated string or from several such strings (a repeated flag)."""
    if values is None:
        return ()
    values = [values] if isinstance(values, str) else values
    return tuple(url.strip() for value in values for url in str(value).split(",") if url.strip())


def openai_judge_pair(
    text: Endpoint, visual: Endpoint | None = None, *, cache_path: str | None = None, **client: Any
) -> tuple[OpenAICompatibleJudge, OpenAICompatibleJudge]:
    """(text judge, visual judge) sharing one response cache at `cache_path` (None: no cache). Without `visual`
    the text judge is multimodal and is returned twice. client: further OpenAICompatibleConfig fields (both)."""
    cache = ResponseCache(cache_path) if cache_path else None

    def judge(endpoint: Endpoint, multimodal: bool) -> OpenAICompatibleJudge:
        config = OpenAICompatibleConfig(
            model=endpoint.model, base_urls=endpoint.base_urls, api=endpoint.api, api_key_env=endpoint.api_key_env,
            multimodal=multimodal, **client,
        )  # fmt: skip
        return OpenAICompatibleJudge(config, cache=cache)

    text_judge = judge(text, multimodal=visual is None)
    return text_judge, (text_judge if visual is None else judge(visual, multimodal=True))


def judge_cache_path(cache_dir: str, workdir: str | os.PathLike | None) -> str | None:
    """The cache file: in `cache_dir`, else in `<workdir>/judge_cache`, else none."""
    if cache_dir:
        return os.path.join(cache_dir, CACHE_FILE)
    if workdir is not None and os.fspath(workdir):
        return os.path.join(os.fspath(workdir), WORKDIR_CACHE_DIR, CACHE_FILE)
    return None


def openai_judge_pair_from_config(
    judge: Any, *, workdir: str | os.PathLike | None = None, purpose: str = "for backend='openai'"
) -> tuple[OpenAICompatibleJudge, OpenAICompatibleJudge]:
    """The pair from `config.rewards.judge`; `purpose` completes the error message for missing servers."""
    if not judge.llm_url or not judge.llm_model:
        raise ValueError(
            f"config.rewards.judge.llm_url and llm_model must be set {purpose} (e.g. "
            "--config.rewards.judge.llm_url=http://host:8000/v1 --config.rewards.judge.llm_model=Qwen/Qwen2.5-72B)"
        )
    if judge.vlm_url and not judge.vlm_model:
        raise ValueError("config.rewards.judge.vlm_model must be set when vlm_url is")
    key_env = judge.api_key_env or None
    text = Endpoint(judge.llm_model, split_urls(judge.llm_url), key_env)
    visual = Endpoint(judge.vlm_model, split_urls(judge.vlm_url), key_env) if judge.vlm_url else None
    return openai_judge_pair(
        text, visual,
        cache_path=judge_cache_path(judge.get("cache_dir", ""), workdir),
        max_concurrency=int(judge.max_concurrency),
        request_timeout_s=float(judge.timeout_s),
        max_attempts=int(judge.max_retries) + 1,
        image_max_side=int(judge.get("image_max_side", DEFAULT_MAX_SIDE)),
        response_format=str(judge.get("response_format", "json_schema")),
    )  # fmt: skip
