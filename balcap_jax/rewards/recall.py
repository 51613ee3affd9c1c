"""Recall: how many of the reference's atomic claims a caption covers (docs/METHOD.md, component 2).

The reference caption(s) of an image are decomposed once (an in-memory single-flight cache per image, backed by
the judge's on-disk response cache across runs): the G captions of a group share one decomposition call.
Then a text judge decides per reference claim whether the caption covers it: r_R = #covered / #reference claims.
Empty caption -> 0; a reference with no claims, or a judge failure -> NaN.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any, Sequence

from balcap_jax.rewards.claims import Claim, chunks, claim_lines, decompose, match_ids
from balcap_jax.rewards.judges.protocol import Judge, user_request
from balcap_jax.rewards.prompt_templates import render_prompt
from balcap_jax.rewards.structured_call import AskPolicy, CallLog, ask_json
from balcap_jax.rewards.types import ComponentScore, RewardItem

COVERAGE_SCHEMA = {"coverage": [{"id": str, "covered": bool}]}


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """max_reference_claims: reference claims kept per image. facts_per_call: reference claims judged per call.
    reference_cache_size: images whose decomposition stays in memory (oldest evicted first)."""

    decompose_prompt_version: int = 1
    coverage_prompt_version: int = 1
    max_reference_claims: int = 100
    facts_per_call: int = 40
    decompose_max_tokens: int = 4096
    coverage_max_tokens: int = 4096
    reference_cache_size: int = 65536
    policy: AskPolicy = AskPolicy()

    def __post_init__(self):
        if self.max_reference_claims < 1 or self.facts_per_call < 1 or self.reference_cache_size < 1:
            raise ValueError("RecallConfig.max_reference_claims, facts_per_call and reference_cache_size must be >= 1")


def reference_text(references: Sequence[str]) -> str:
    """All reference captions of an image as one text (facts of several human references are pooled)."""
    return "\n\n".join(r.strip() for r in references if r.strip())


@dataclasses.dataclass(frozen=True)
class _Decomposition:
    claims: tuple[Claim, ...]
    truncated: bool
    record: dict[str, Any]


class RecallReward:
    """`RewardComponent` "recall" (text judge only)."""

    name = "recall"

    def __init__(self, text_judge: Judge, config: RecallConfig = RecallConfig()):
        self.text_judge = text_judge
        self.config = config
        self._references: dict[tuple[str, str], _Decomposition] = {}
        self._in_flight: dict[tuple[str, str], asyncio.Future] = {}

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]:
        return list(await asyncio.gather(*(self.score_one(item) for item in items)))

    async def reference_claims(self, image_id: str, references: Sequence[str]) -> tuple[_Decomposition | None, CallLog]:
        """The decomposition of an image's references (None on judge failure), computed once per (image,
        references) even when many captions ask at the same time; failures are not cached (retried next batch)."""
        key = (image_id, reference_text(references))
        log = CallLog()
        if key in self._references:
            return self._references[key], log
        pending = self._in_flight.get(key)
        if pending is not None and pending.get_loop() is asyncio.get_running_loop():
            return await asyncio.shield(pending), log
        future = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            cfg = self.config
            outcome = await decompose(
                self.text_judge, key[1], log, prefix="r", prompt_version=cfg.decompose_prompt_version,
                max_claims=cfg.max_reference_claims, max_tokens=cfg.decompose_max_tokens, policy=cfg.policy,
                label="decompose_reference",
            )  # fmt: skip
            result = None if outcome is None else _Decomposition(outcome[0], outcome[1], log.as_record())
            if result is not None:
                if len(self._references) >= cfg.reference_cache_size:
                    self._references.pop(next(iter(self._references)))
                self._references[key] = result
            future.set_result(result)
            return result, log
        except BaseException as error:
            future.set_exception(error)
            raise
        finally:
            self._in_flight.pop(key, None)

    async def _coverage(self, caption: str, facts: Sequence[Claim], log: CallLog) -> dict[str, Any] | None:
        cfg = self.config
        prompt = render_prompt(
            "coverage", cfg.coverage_prompt_version, caption=caption, facts=claim_lines(facts, text_key="fact")
        )
        ids = [f.id for f in facts]
        outcome = await ask_json(
            self.text_judge, user_request(prompt, max_tokens=cfg.coverage_max_tokens), COVERAGE_SCHEMA, log,
            policy=cfg.policy, check=lambda parsed: match_ids(parsed["coverage"], ids, "coverage decision"),
            label="coverage", schema_name="coverage", max_items=len(ids),
        )  # fmt: skip
        return None if outcome is None else outcome[0]

    async def score_one(self, item: RewardItem) -> ComponentScore:
        cfg = self.config
        record: dict[str, Any] = {
            "prompts": {"decompose_claims": cfg.decompose_prompt_version, "coverage": cfg.coverage_prompt_version}
        }
        if not reference_text(item.references):
            return ComponentScore(math.nan, record | {"reason": "no reference caption"})
        reference, reference_log = await self.reference_claims(item.image_id, item.references)
        if reference is None:
            # The decomposition failed for the whole image; every caption of it counts the failed call.
            record |= {"reason": "reference decomposition failed"} | reference_log.as_record()
            return ComponentScore(math.nan, record, errors=1)
        record["reference_claims"] = [c.as_dict() for c in reference.claims]
        record["reference_truncated"] = reference.truncated
        if not reference.claims:
            return ComponentScore(math.nan, record | {"reason": "reference has no claims"})
        if not item.caption.strip():
            return ComponentScore(0.0, record | {"reason": "empty caption"})
        log = CallLog(calls=reference_log.calls, cache_hits=reference_log.cache_hits, latency_s=reference_log.latency_s)
        parts = chunks(reference.claims, cfg.facts_per_call)
        decided = await asyncio.gather(*(self._coverage(item.caption, part, log) for part in parts))
        if any(chunk is None for chunk in decided):
            return ComponentScore(math.nan, record | log.as_record(), errors=log.errors)
        covered = {key: row["covered"] for chunk in decided for key, row in chunk.items()}
        record["reference_claims"] = [c.as_dict() | {"covered": covered[c.id]} for c in reference.claims]
        value = sum(covered.values()) / len(reference.claims)
        return ComponentScore(value, record | log.as_record(), errors=log.errors)
