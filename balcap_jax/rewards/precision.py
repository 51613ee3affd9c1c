"""Precision: utility-aware correctness of a caption's atomic claims (docs/METHOD.md, component 1).

caption --LLM--> atomic claims (instance ids such as dog_0) --VLM + image--> per claim: correct? pointable?
r_P = #(correct and pointable) / #claims. A caption with no claims (empty, a refusal) scores 0; a judge failure
scores NaN with the error counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any, Sequence

from balcap_jax.rewards.claims import Claim, chunks, claim_lines, decompose, match_ids
from balcap_jax.rewards.judges.protocol import ImagePart, Judge, user_request
from balcap_jax.rewards.prompt_templates import render_prompt
from balcap_jax.rewards.structured_call import AskPolicy, CallLog, ask_json
from balcap_jax.rewards.types import ComponentScore, RewardItem

VERDICT_SCHEMA = {"verdicts": [{"id": str, "correct": bool, "pointable": bool}]}


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """require_pointable: a correct claim earns credit only if pointable (the paper's utility-awareness).
    max_claims: claims kept per caption (the rest are dropped and the record says so).
    claims_per_call: claims verified per VLM call (long captions are split over concurrent calls)."""

    decompose_prompt_version: int = 1
    verify_prompt_version: int = 1
    require_pointable: bool = True
    max_claims: int = 100
    claims_per_call: int = 25
    decompose_max_tokens: int = 4096
    verify_max_tokens: int = 4096
    policy: AskPolicy = AskPolicy()

    def __post_init__(self):
        if self.max_claims < 1 or self.claims_per_call < 1:
            raise ValueError("PrecisionConfig.max_claims and claims_per_call must be >= 1")


class PrecisionReward:
    """`RewardComponent` "precision": `text_judge` decomposes, `visual_judge` (multimodal) verifies."""

    name = "precision"

    def __init__(self, text_judge: Judge, visual_judge: Judge, config: PrecisionConfig = PrecisionConfig()):
        if not visual_judge.multimodal:
            raise ValueError(
                f"precision needs a multimodal visual judge to check claims against the image; {visual_judge.model!r} "
                "is text-only (multimodal=False)"
            )
        self.text_judge = text_judge
        self.visual_judge = visual_judge
        self.config = config

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]:
        return list(await asyncio.gather(*(self.score_one(item) for item in items)))

    async def _verify(self, image: ImagePart, claims: Sequence[Claim], log: CallLog) -> dict[str, Any] | None:
        cfg = self.config
        prompt = render_prompt("verify_claims", cfg.verify_prompt_version, claims=claim_lines(claims))
        request = user_request(image, prompt, max_tokens=cfg.verify_max_tokens)
        ids = [c.id for c in claims]

        def check(parsed: dict[str, Any]) -> dict[str, dict[str, Any]]:
            return match_ids(parsed["verdicts"], ids, "verdict")

        outcome = await ask_json(
            self.visual_judge, request, VERDICT_SCHEMA, log, policy=cfg.policy, check=check, label="verify",
            schema_name="verify_claims", max_items=len(ids),
        )  # fmt: skip
        return None if outcome is None else outcome[0]

    async def score_one(self, item: RewardItem) -> ComponentScore:
        cfg = self.config
        record: dict[str, Any] = {
            "prompts": {"decompose_claims": cfg.decompose_prompt_version, "verify_claims": cfg.verify_prompt_version}
        }
        if not item.caption.strip():
            return ComponentScore(0.0, record | {"claims": [], "reason": "empty caption"})
        if item.image is None:
            return ComponentScore(math.nan, record | {"reason": "no image: precision needs the image"})
        try:
            image = ImagePart(item.image)
        except ValueError as error:
            return ComponentScore(math.nan, record | {"reason": f"unreadable image: {error}"})
        log = CallLog()
        decomposition = await decompose(
            self.text_judge, item.caption, log, prefix="c", prompt_version=cfg.decompose_prompt_version,
            max_claims=cfg.max_claims, max_tokens=cfg.decompose_max_tokens, policy=cfg.policy, label="decompose",
        )  # fmt: skip
        if decomposition is None:
            return ComponentScore(math.nan, record | log.as_record(), errors=log.errors)
        claims, truncated = decomposition
        record |= {"truncated_claims": truncated}
        if not claims:
            return ComponentScore(0.0, record | {"claims": [], "reason": "no claims"} | log.as_record())
        parts = chunks(claims, cfg.claims_per_call)
        verdict_chunks = await asyncio.gather(*(self._verify(image, part, log) for part in parts))
        if any(chunk is None for chunk in verdict_chunks):
            record["claims"] = [c.as_dict() for c in claims]
            return ComponentScore(math.nan, record | log.as_record(), errors=log.errors)
        verdicts = {key: value for chunk in verdict_chunks for key, value in chunk.items()}
        rows, credited = [], 0
        for claim in claims:
            correct, pointable = verdicts[claim.id]["correct"], verdicts[claim.id]["pointable"]
            earns = correct and (pointable or not cfg.require_pointable)
            credited += int(earns)
            rows.append(claim.as_dict() | {"correct": correct, "pointable": pointable, "credited": earns})
        return ComponentScore(credited / len(claims), record | {"claims": rows} | log.as_record(), errors=log.errors)
