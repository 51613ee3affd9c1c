"""CapArena-style evaluation: pairwise battles of the evaluated captions against baseline captions.

Benchmark file (JSONL, one image per line):

    {"image_id": "0001",
     "image": "images/0001.jpg",                    # local path, relative to this file (or absolute)
     "reference": "A human-written caption ...",    # shown to the judge as a reference
     "baselines": {"gpt-4o": "caption ...", "cogvlm": "caption ..."}}   # baseline name -> its caption

Every image must give the same set of baselines (a missing one would skew that baseline's score).

Per (image, baseline) the visual judge sees the image, the human reference and the two captions as "A" and "B"
and says which is better or "tie". Which caption is A is drawn from a generator seeded with (seed, image_id,
baseline), recorded in the results (`model_is_a`), so a run is reproducible and position bias averages out.

Score (`battle_outcome`, `aggregate_scores`, pure): +1 when the evaluated caption wins, -1 when it loses, 0 for a
tie; per baseline (wins - losses) / 2 summed over images (CapArena-Auto's score); the reported score is the mean
over baselines. Battles the judge could not decide are unscored (excluded, counted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
from typing import Any, Sequence

import numpy as np

from balcap_jax.evaluation import benchmark_files as files
from balcap_jax.evaluation.judging import EvalJudges, Unscorable, VotePolicy, ask_or_raise
from balcap_jax.evaluation.prompt_files import render_prompt
from balcap_jax.evaluation.results_store import item_key
from balcap_jax.rewards.json_output import OneOf
from balcap_jax.rewards.judges.protocol import ImagePart, user_request
from balcap_jax.rewards.structured_call import CallLog

NAME = "caparena"
VERDICT_SCHEMA = {"better": OneOf("a", "b", "tie")}


# ---------------------------------------------------------------------------------------------------------------
# The metric (pure)


def model_is_a(image_id: str, baseline: str, seed: int) -> bool:
    """Whether the evaluated caption is shown as caption A in this battle (a pure function of its arguments)."""
    digest = int.from_bytes(hashlib.sha256(f"{image_id}\x00{baseline}".encode("utf-8")).digest()[:8], "little")
    return bool(np.random.default_rng([seed, digest]).integers(0, 2))


def battle_outcome(verdict: str, model_is_a: bool) -> int:
    """+1 the evaluated caption won, -1 it lost, 0 tie; `verdict` is the judge's "a", "b" or "tie"."""
    verdict = verdict.lower()
    if verdict == "tie":
        return 0
    if verdict not in ("a", "b"):
        raise ValueError(f"verdict must be 'a', 'b' or 'tie', got {verdict!r}")
    return 1 if (verdict == "a") == model_is_a else -1


def aggregate_scores(outcomes: Sequence[dict[str, int | None]]) -> dict[str, Any]:
    """outcomes: per image {baseline: +1 / -1 / 0, or None if unscored}. -> per-baseline wins, losses, ties and
    score (wins - losses) / 2; `score`: the mean of the per-baseline scores."""
    baselines = sorted({b for row in outcomes for b in row})
    per_baseline: dict[str, dict[str, float]] = {}
    for baseline in baselines:
        values = [row.get(baseline) for row in outcomes]
        wins = sum(v == 1 for v in values)
        losses = sum(v == -1 for v in values)
        ties = sum(v == 0 for v in values)
        per_baseline[baseline] = {"wins": wins, "losses": losses, "ties": ties,
                                  "unscored": sum(v is None for v in values), "score": (wins - losses) / 2}  # fmt: skip
    scores = [row["score"] for row in per_baseline.values()]
    return {"score": float(np.mean(scores)) if scores else math.nan, "per_baseline": per_baseline,
            "num_items": len(outcomes)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The benchmark file


@dataclasses.dataclass(frozen=True)
class CapArenaItem:
    image_id: str
    image_path: str
    reference: str
    baselines: tuple[tuple[str, str], ...]  # (name, caption), sorted by name


def load_items(path: str) -> list[CapArenaItem]:
    items = []
    for where, row in files.read_jsonl(path):
        baselines = row.get("baselines")
        if not isinstance(baselines, dict) or not baselines or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in baselines.items()
        ):
            raise files.BenchmarkFormatError(f"{where}: 'baselines' must be a non-empty object {{name: caption}}")
        items.append(
            CapArenaItem(
                image_id=files.required_str(row, "image_id", where),
                image_path=files.image_path(row, path, where),
                reference=files.required_str(row, "reference", where),
                baselines=tuple(sorted(baselines.items())),
            )
        )
    files.unique_ids([item.image_id for item in items], path)
    names = {tuple(name for name, _ in item.baselines) for item in items}
    if len(names) > 1:
        raise files.BenchmarkFormatError(f"{path}: every line must give the same baselines; found {sorted(names)}")
    return items


# ---------------------------------------------------------------------------------------------------------------
# Judging


@dataclasses.dataclass(frozen=True)
class CapArenaConfig:
    """seed: draws which caption is shown first in each battle (recorded with every result)."""

    seed: int = 0
    max_tokens: int = 512
    prompt_version: int = 1


class CapArena:
    name = NAME

    def __init__(self, items: Sequence[CapArenaItem], judges: EvalJudges, config: CapArenaConfig = CapArenaConfig()):
        self.items = list(items)
        self.judges = judges
        self.config = config
        self.ask_policy = VotePolicy().ask

    def item_key(self, item: CapArenaItem, caption: str) -> str:
        return item_key(protocol=NAME, image_id=item.image_id, caption=caption, reference=item.reference,
                        baselines=item.baselines, config=dataclasses.asdict(self.config),
                        visual_judge=self.judges.visual.model)  # fmt: skip

    async def _battle(self, image: bytes, item: CapArenaItem, caption: str, baseline: str, other: str,
                      log: CallLog) -> dict[str, Any]:  # fmt: skip
        first = model_is_a(item.image_id, baseline, self.config.seed)
        caption_a, caption_b = (caption, other) if first else (other, caption)
        prompt = render_prompt("caparena_battle", self.config.prompt_version, reference=item.reference,
                               caption_a=caption_a, caption_b=caption_b)  # fmt: skip
        request = user_request(ImagePart(image), prompt, max_tokens=self.config.max_tokens, temperature=0.0)
        try:
            verdict = (await ask_or_raise(self.judges.visual, request, VERDICT_SCHEMA, log, policy=self.ask_policy,
                                          label=f"battle:{baseline}"))["better"]  # fmt: skip
        except Unscorable as error:
            return {"baseline": baseline, "model_is_a": first, "verdict": None, "outcome": None, "error": str(error)}
        return {"baseline": baseline, "model_is_a": first, "verdict": verdict,
                "outcome": battle_outcome(verdict, first)}  # fmt: skip

    async def judge_item(self, item: CapArenaItem, caption: str) -> dict[str, Any]:
        log = CallLog()
        image = files.read_bytes(item.image_path)
        battles = await asyncio.gather(
            *(self._battle(image, item, caption, name, other, log) for name, other in item.baselines)
        )
        return {"battles": list(battles), "seed": self.config.seed} | log.as_record()

    def aggregate(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out = aggregate_scores([{b["baseline"]: b["outcome"] for b in r["battles"]} for r in results])
        return out | {"order_seed": self.config.seed}
