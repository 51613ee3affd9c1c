"""Linguistic quality: clarity, fluency and coherence rated by a text judge (docs/METHOD.md, component 3).

r_L = (mean of the three scores - scale_min) / (scale_max - scale_min), in [0, 1]. The judge never sees the
image: this component rewards writing, not content. An empty caption scores 0 (there is no writing to credit);
a judge failure scores NaN. Length gating (docs/METHOD.md, length-conditional masking) happens downstream in rl/.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any, Sequence

from balcap_jax.rewards.json_output import Range
from balcap_jax.rewards.judges.protocol import Judge, user_request
from balcap_jax.rewards.prompt_templates import render_prompt
from balcap_jax.rewards.structured_call import AskPolicy, CallLog, ask_json
from balcap_jax.rewards.types import ComponentScore, RewardItem

ASPECTS = ("clarity", "fluency", "coherence")


@dataclasses.dataclass(frozen=True)
class LinguisticConfig:
    """scale_min / scale_max: the score range the prompt asks for (1..10 in linguistic.v1)."""

    prompt_version: int = 1
    scale_min: float = 1.0
    scale_max: float = 10.0
    max_tokens: int = 512
    policy: AskPolicy = AskPolicy()

    def __post_init__(self):
        if not self.scale_max > self.scale_min:
            raise ValueError(f"LinguisticConfig needs scale_max > scale_min, got {self.scale_min}..{self.scale_max}")


def normalised_mean(scores: dict[str, float], scale_min: float, scale_max: float) -> float:
    """Mean of the aspect scores mapped linearly from [scale_min, scale_max] to [0, 1]."""
    mean = sum(scores[a] for a in ASPECTS) / len(ASPECTS)
    return (mean - scale_min) / (scale_max - scale_min)


class LinguisticReward:
    """`RewardComponent` "linguistic" (text judge only)."""

    name = "linguistic"

    def __init__(self, text_judge: Judge, config: LinguisticConfig = LinguisticConfig()):
        self.text_judge = text_judge
        self.config = config
        self._schema = {aspect: Range(config.scale_min, config.scale_max) for aspect in ASPECTS}

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]:
        return list(await asyncio.gather(*(self.score_one(item) for item in items)))

    async def score_one(self, item: RewardItem) -> ComponentScore:
        cfg = self.config
        record: dict[str, Any] = {"prompts": {"linguistic": cfg.prompt_version}}
        if not item.caption.strip():
            return ComponentScore(0.0, record | {"reason": "empty caption"})
        log = CallLog()
        prompt = render_prompt("linguistic", cfg.prompt_version, caption=item.caption)
        request = user_request(prompt, max_tokens=cfg.max_tokens)
        outcome = await ask_json(
            self.text_judge, request, self._schema, log, policy=cfg.policy, label="linguistic", schema_name="linguistic"
        )
        if outcome is None:
            return ComponentScore(math.nan, record | log.as_record(), errors=log.errors)
        scores, _ = outcome
        value = normalised_mean(scores, cfg.scale_min, cfg.scale_max)
        return ComponentScore(value, record | {"scores": scores} | log.as_record(), errors=log.errors)
