"""Our judge client against a real vLLM server (CPU build, SmolLM2-135M-Instruct): how often replies are valid
JSON with and without the schema sent as `response_format`, and judge requests per second at a concurrency.

Each mode sends the same N requests, our own judge prompts (claim decomposition of N different captions, every
other one the linguistic rating prompt) with their JSON Schemas, through `OpenAICompatibleJudge` at temperature 0
and a fixed `max_tokens`. A reply counts as
  valid JSON   when the whole reply (whitespace stripped) is one JSON object, and as
  usable       when our parser finds a value matching the prompt's schema in it (what the reward reads).
Requests/s is N over the wall time of the mode's batch at --concurrency requests in flight.

    python -m balcap_jax.tools.judge_server build            # once
    nice -n 10 python experiments/judge_server_report.py [--requests 64 --concurrency 8 --max-tokens 256]

Starts the server on 127.0.0.1 (a free port) and always kills it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from typing import Sequence

from balcap_jax.rewards.claims import DECOMPOSITION_SCHEMA
from balcap_jax.rewards.json_output import JudgeOutputError, parse_judge_json
from balcap_jax.rewards.json_schema import response_schema
from balcap_jax.rewards.judges.openai_compatible import OpenAICompatibleConfig, OpenAICompatibleJudge
from balcap_jax.rewards.judges.protocol import JudgeRequest, JudgeUnavailable, user_request
from balcap_jax.rewards.linguistic import ASPECTS
from balcap_jax.rewards.prompt_templates import render_prompt

SUBJECTS = ("a red ball", "two cats", "an old bicycle", "a wooden boat", "a bowl of soup", "three tall trees",
            "a blue car", "a sleeping dog")  # fmt: skip
PLACES = ("on a beach", "in a kitchen", "next to a wall", "under a bridge", "in the snow", "on a table",
          "in a garden", "at night")  # fmt: skip
LINGUISTIC_SCHEMA = {aspect: float for aspect in ASPECTS}


def caption(n: int) -> str:
    """A distinct, plain two-sentence caption per index."""
    subject, place = SUBJECTS[n % len(SUBJECTS)], PLACES[(n // len(SUBJECTS)) % len(PLACES)]
    return f"A photograph of {subject} {place}. The light is soft and the background is blurred ({n})."


def judge_requests(count: int, max_tokens: int) -> list[tuple[JudgeRequest, dict]]:
    """(request, its json_output schema): decomposition prompts, every other one a linguistic rating prompt."""
    out = []
    for n in range(count):
        if n % 2:
            prompt, schema, name = render_prompt("linguistic", 1, caption=caption(n)), LINGUISTIC_SCHEMA, "linguistic"
        else:
            prompt = render_prompt("decompose_claims", 1, description=caption(n))
            schema, name = DECOMPOSITION_SCHEMA, "decompose"
        request = user_request(prompt, max_tokens=max_tokens, temperature=0.0, seed=0,
                               response_schema=response_schema(name, schema))  # fmt: skip
        out.append((request, schema))
    return out


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text.strip()), dict)
    except ValueError:
        return False


def is_usable(text: str, schema: dict) -> bool:
    try:
        parse_judge_json(text, schema)
        return True
    except JudgeOutputError:
        return False


@dataclasses.dataclass(frozen=True)
class ModeResult:
    mode: str
    requests: int
    valid_json: int
    usable: int
    failed: int
    seconds: float

    def row(self) -> str:
        return (f"| {self.mode:<11} | {self.requests:>8} | {100 * self.valid_json / self.requests:>9.1f} % "
                f"| {100 * self.usable / self.requests:>6.1f} % | {self.failed:>6} | {self.seconds:>7.1f} "
                f"| {self.requests / self.seconds:>10.2f} |")  # fmt: skip


async def run_mode(base_url: str, model: str, mode: str, requests, concurrency: int, timeout_s: float) -> ModeResult:
    config = OpenAICompatibleConfig(model=model, base_urls=(base_url,), max_concurrency=concurrency,
                                    request_timeout_s=timeout_s, max_attempts=2, response_format=mode)  # fmt: skip
    judge = OpenAICompatibleJudge(config)
    start = time.perf_counter()
    replies = await asyncio.gather(*(judge.generate(r) for r, _ in requests), return_exceptions=True)
    seconds = time.perf_counter() - start
    await judge.aclose()
    texts = [(r.text if not isinstance(r, BaseException) else None) for r in replies]
    unexpected = [r for r in replies if isinstance(r, BaseException) and not isinstance(r, JudgeUnavailable)]
    if unexpected:
        raise unexpected[0]
    return ModeResult(
        mode, len(requests), sum(t is not None and is_json_object(t) for t in texts),
        sum(t is not None and is_usable(t, s) for t, (_, s) in zip(texts, requests)),
        sum(t is None for t in texts), seconds,
    )  # fmt: skip


def table(results: Sequence[ModeResult]) -> str:
    lines = ["| mode        | requests | valid JSON  | usable   | failed | seconds | requests/s |",
             "|-------------|----------|-------------|----------|--------|---------|------------|"]
    return "\n".join(lines + [r.row() for r in results])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP attempt")
    parser.add_argument("--modes", default="json_schema,none", help="comma list of json_schema, json_object, none")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        parser.error("--requests, --concurrency and --max-tokens must be >= 1")
    from balcap_jax.tools.judge_server import serving
    from balcap_jax.tools.smollm2_checkpoint import converted_dir

    requests = judge_requests(args.requests, args.max_tokens)
    results = []
    with serving(converted_dir()) as server:
        print(f"vLLM ready at {server.base_url} in {server.starts[-1]:.0f} s", flush=True)
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            results.append(asyncio.run(run_mode(server.base_url, server.options.served_name, mode, requests,
                                                args.concurrency, args.timeout)))  # fmt: skip
            print(results[-1].row(), flush=True)
    print(f"\nour client vs vLLM CPU (SmolLM2-135M-Instruct), {args.requests} requests, concurrency "
          f"{args.concurrency}, max_tokens {args.max_tokens}:")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
