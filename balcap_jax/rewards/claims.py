"""Atomic claims: decomposition of a text by an LLM judge, shared by precision (the caption's claims) and recall
(the reference's claims).

The judge's own claim ids are not trusted: claims are renumbered `{prefix}1..n` in answer order, and later
per-claim verdicts are matched on those ids.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from balcap_jax.rewards.json_output import JudgeOutputError
from balcap_jax.rewards.judges.protocol import Judge, user_request
from balcap_jax.rewards.prompt_templates import render_prompt
from balcap_jax.rewards.structured_call import AskPolicy, CallLog, ask_json

DECOMPOSITION_SCHEMA = {"claims": [{"element": str, "claim": str}]}


@dataclasses.dataclass(frozen=True)
class Claim:
    """id: our id (c1, r3, ...); element: instance identifier such as dog_0; text: the claim itself."""

    id: str
    element: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "element": self.element, "claim": self.text}


def claim_lines(claims: Sequence[Claim], text_key: str = "claim") -> str:
    """Claims rendered one JSON object per line ({"id", text_key}) for a prompt's data block."""
    return "\n".join(json.dumps({"id": c.id, text_key: c.text}, ensure_ascii=False) for c in claims)


def _to_claims(prefix: str, max_claims: int):
    def check(parsed: dict[str, Any]) -> tuple[tuple[Claim, ...], bool]:
        rows = [row for row in parsed["claims"] if row["claim"].strip()]
        claims = tuple(
            Claim(f"{prefix}{i + 1}", row["element"].strip() or "scene", row["claim"].strip())
            for i, row in enumerate(rows[:max_claims])
        )
        return claims, len(rows) > max_claims

    return check


async def decompose(
    judge: Judge,
    text: str,
    log: CallLog,
    *,
    prefix: str,
    prompt_version: int,
    max_claims: int,
    max_tokens: int,
    policy: AskPolicy,
    label: str,
) -> tuple[tuple[Claim, ...], bool] | None:
    """(claims, truncated) for `text`, at most `max_claims` of them; None when the judge failed (see `log`)."""
    request = user_request(render_prompt("decompose_claims", prompt_version, description=text), max_tokens=max_tokens)
    # One claim beyond max_claims is allowed through the schema so that truncation is still detected.
    outcome = await ask_json(
        judge, request, DECOMPOSITION_SCHEMA, log, policy=policy, check=_to_claims(prefix, max_claims), label=label,
        schema_name="decompose_claims", max_items=max_claims + 1,
    )  # fmt: skip
    return None if outcome is None else outcome[0]


def match_ids(rows: list[dict[str, Any]], expected_ids: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
    """{id: row} for exactly `expected_ids`; extra ids are ignored, the first of duplicates wins, and a missing id
    raises JudgeOutputError (so the judge is asked again). `what` names the rows in that error."""
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        found.setdefault(row["id"].strip(), row)
    missing = [i for i in expected_ids if i not in found]
    if missing:
        raise JudgeOutputError(f"judge gave no {what} for ids {missing[:10]}")
    return {i: found[i] for i in expected_ids}


def chunks(claims: Sequence[Claim], size: int) -> list[Sequence[Claim]]:
    return [claims[i : i + size] for i in range(0, len(claims), size)]
