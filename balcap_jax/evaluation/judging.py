"""What every judged protocol shares: the pair of judges, repeated asks with majority votes, id bookkeeping.

Judges are any `rewards.judges.protocol.Judge` backend (OpenAI-compatible HTTP, in-process JAX, scripted). A
judgement asked `votes` times uses seeds 0..votes-1 (and `vote_temperature` when votes > 1, so the asks differ);
a single ask is greedy (temperature 0). Unusable answers are re-asked by `rewards.structured_call.ask_json`
and, when they stay unusable, make the item unscored (recorded, excluded from the averages, counted).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from typing import Any, Callable, Hashable, Sequence

from balcap_jax.rewards.judges.protocol import Judge, JudgeRequest
from balcap_jax.rewards.structured_call import AskPolicy, CallLog, ask_json


@dataclasses.dataclass(frozen=True)
class EvalJudges:
    """text: answers from text alone (decomposition, matching, caption QA); visual: sees the image
    (fact verification, pairwise battles) and must be multimodal."""

    text: Judge
    visual: Judge

    def __post_init__(self):
        if not self.visual.multimodal:
            raise ValueError(
                f"the visual judge {self.visual.model!r} is text-only (multimodal=False); DCScore verification and "
                "CapArena battles need a judge that sees the image"
            )

    def fingerprint(self) -> dict[str, str]:
        return {"text_judge": self.text.model, "visual_judge": self.visual.model}


class Unscorable(Exception):
    """A judge call failed for good (judge unavailable, or unusable answers after every re-ask)."""


@dataclasses.dataclass(frozen=True)
class VotePolicy:
    votes: int = 1
    vote_temperature: float = 0.7
    max_tokens: int = 2048
    ask: AskPolicy = AskPolicy()

    def __post_init__(self):
        if self.votes < 1:
            raise ValueError(f"votes must be >= 1, got {self.votes}")
        if self.vote_temperature < 0:
            raise ValueError(f"vote_temperature must be >= 0, got {self.vote_temperature}")

    def requests(self, make: Callable[..., JudgeRequest]) -> list[JudgeRequest]:
        """`votes` requests from `make(temperature=..., seed=..., max_tokens=...)`."""
        temperature = 0.0 if self.votes == 1 else self.vote_temperature
        return [make(temperature=temperature, seed=seed, max_tokens=self.max_tokens) for seed in range(self.votes)]


async def ask_or_raise(
    judge: Judge, request: JudgeRequest, schema: Any, log: CallLog, *, policy: AskPolicy, check=None, label: str
) -> Any:
    """The parsed, checked answer; `Unscorable` when the judge failed for good (the reason is in `log`)."""
    outcome = await ask_json(judge, request, schema, log, policy=policy, check=check, label=label)
    if outcome is None:
        raise Unscorable(log.failures[-1] if log.failures else f"{label}: judge failed")
    return outcome[0]


async def ask_votes(
    judge: Judge, make: Callable[..., JudgeRequest], schema: Any, log: CallLog, policy: VotePolicy, *, check, label
) -> list[Any]:
    """The answers of `policy.votes` asks (concurrently); `Unscorable` if any of them failed."""
    requests = policy.requests(make)
    return list(
        await asyncio.gather(
            *(ask_or_raise(judge, r, schema, log, policy=policy.ask, check=check, label=label) for r in requests)
        )
    )


def majority_bool(votes: Sequence[bool]) -> bool:
    """True iff strictly more than half of the votes are True (a tie is False: no credit without a majority)."""
    if not votes:
        raise ValueError("majority_bool needs at least one vote")
    return sum(bool(v) for v in votes) * 2 > len(votes)


def majority_choice(votes: Sequence[Hashable], default: Hashable) -> Hashable:
    """The value more than half of the votes agree on, else `default`."""
    if not votes:
        raise ValueError("majority_choice needs at least one vote")
    value, count = collections.Counter(votes).most_common(1)[0]
    return value if count * 2 > len(votes) else default


def id_lines(rows: Sequence[tuple[str, str]], text_key: str) -> str:
    """Rows (id, text) as one JSON object per line, for a prompt's data block."""
    return "\n".join(json.dumps({"id": i, text_key: t}, ensure_ascii=False) for i, t in rows)


def by_id(rows: list[dict[str, Any]], expected: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
    """{id: row} for exactly `expected` (first of duplicates wins, extras ignored); a missing id raises
    JudgeOutputError so the judge is asked again."""
    from balcap_jax.rewards.json_output import JudgeOutputError

    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        found.setdefault(str(row["id"]).strip(), row)
    missing = [i for i in expected if i not in found]
    if missing:
        raise JudgeOutputError(f"judge gave no {what} for ids {missing[:10]}")
    return {i: found[i] for i in expected}
