"""Ask a judge for JSON, parse and validate it, and re-ask when the answer is unusable.

Transport failures are retried inside the judge backend. This layer handles the other failure: a reply that
arrived but holds no valid JSON. It re-asks with a fresh seed (and, by default, a non-zero temperature, since a
greedy judge would repeat itself), so the re-ask is a different cache key too. When every attempt fails the
result is None and one error is counted: the caller returns NaN, never 0.

Every request carries the answer's JSON Schema (for servers with constrained decoding) and an `accept`
predicate (the same parse and check), so caching backends never store an unusable answer: a re-run asks again
instead of replaying the failure.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from balcap_jax.rewards.json_output import JudgeOutputError, parse_judge_json
from balcap_jax.rewards.json_schema import DEFAULT_MAX_ITEMS, DEFAULT_MAX_LENGTH, response_schema
from balcap_jax.rewards.judges.protocol import Judge, JudgeRequest, JudgeUnavailable

MAX_RECORDED_CHARS = 4000


@dataclasses.dataclass(frozen=True)
class AskPolicy:
    """parse_attempts: how many times a judge is asked before an unparsable answer counts as an error.
    reask_temperature: temperature of re-asks (None keeps the request's own)."""

    parse_attempts: int = 3
    reask_temperature: float | None = 0.7

    def __post_init__(self):
        if self.parse_attempts < 1:
            raise ValueError(f"AskPolicy.parse_attempts must be >= 1, got {self.parse_attempts}")
        if self.reask_temperature is not None and self.reask_temperature < 0:
            raise ValueError(f"AskPolicy.reask_temperature must be >= 0, got {self.reask_temperature}")


@dataclasses.dataclass
class CallLog:
    """Per-item bookkeeping of judge calls, merged into the item's `ComponentScore.record` / `.errors`."""

    calls: int = 0
    cache_hits: int = 0
    errors: int = 0
    reasks: int = 0
    latency_s: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {
            "judge_calls": self.calls,
            "cache_hits": self.cache_hits,
            "reasks": self.reasks,
            "judge_latency_s": round(self.latency_s, 6),
            "failures": list(self.failures),
        }


class _Parser:
    """parse + check of reply texts, remembered per text (the backend's `accept` and the caller both ask)."""

    def __init__(self, schema: Any, check: Callable[[Any], Any] | None):
        self.schema, self.check = schema, check
        self._outcomes: dict[str, Any] = {}

    def __call__(self, text: str) -> Any:
        """The parsed, checked value of `text`; JudgeOutputError when it is unusable."""
        if text not in self._outcomes:
            try:
                value = parse_judge_json(text, self.schema)
                self._outcomes[text] = self.check(value) if self.check is not None else value
            except JudgeOutputError as error:
                self._outcomes[text] = error
        outcome = self._outcomes[text]
        if isinstance(outcome, JudgeOutputError):
            raise outcome
        return outcome

    def usable(self, text: str) -> bool:
        try:
            self(text)
        except JudgeOutputError:
            return False
        return True


def _schema_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in label)[:64] or "answer"


def _reask(request: JudgeRequest, attempt: int, policy: AskPolicy) -> JudgeRequest:
    if attempt == 0:
        return request
    temperature = request.temperature if policy.reask_temperature is None else policy.reask_temperature
    return dataclasses.replace(request, seed=(request.seed or 0) + attempt, temperature=temperature)


async def ask_json(
    judge: Judge,
    request: JudgeRequest,
    schema: Any,
    log: CallLog,
    *,
    policy: AskPolicy = AskPolicy(),
    check: Callable[[Any], Any] | None = None,
    label: str = "judge",
    schema_name: str | None = None,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[Any, str] | None:
    """(parsed value, raw text) of the first answer that parses, validates and passes `check`; None on failure.

    check: extra validation of the parsed value (e.g. "one verdict per claim id"); it returns the value to use
    and raises JudgeOutputError to reject the answer.
    schema_name / max_items / max_length: the name and the array / string bounds of the JSON Schema sent with
    the request (default name: `label`); a request that already carries a `response_schema` keeps it.
    """
    parser = _Parser(schema, check)
    request = dataclasses.replace(
        request,
        response_schema=request.response_schema
        or response_schema(schema_name or _schema_name(label), schema, max_items=max_items, max_length=max_length),
        accept=parser.usable,
    )
    for attempt in range(policy.parse_attempts):
        try:
            reply = await judge.generate(_reask(request, attempt, policy))
        except JudgeUnavailable as error:
            log.errors += 1
            log.failures.append(f"{label}: judge unavailable: {str(error)[:300]}")
            return None
        log.calls += 1
        log.cache_hits += int(reply.cached)
        log.latency_s += reply.latency_s
        try:
            return parser(reply.text), reply.text[:MAX_RECORDED_CHARS]
        except JudgeOutputError as error:
            if attempt + 1 < policy.parse_attempts:
                log.reasks += 1
                continue
            log.errors += 1
            log.failures.append(f"{label}: unusable answer after {policy.parse_attempts} attempts: {str(error)[:300]}")
            return None
    raise AssertionError("unreachable")
