"""DCScore-style evaluation (DeCapBench): decompose -> match to oracle facts -> verify on the image.

Benchmark file (JSONL, one image per line; the local copy of a DeCapBench-format file):

    {"image_id": "0001",                          # unique id
     "image": "images/0001.jpg",                  # local path, relative to this file (or absolute)
     "reference": "A man in a red coat ...",      # the human-written detailed caption
     "oracle_facts": ["there is a man",           # optional: the human caption's facts, as strings ...
                      {"fact": "the coat is red", "descriptive": true}]}   # ... or objects
    Without "oracle_facts" the reference is decomposed by the text judge (same prompt as captions).

Per caption:
  1. the text judge decomposes it into primitive units, each tagged descriptive (directly visible) or not;
  2. the text judge matches each unit to the oracle fact stating the same information, or to none;
  3. the visual judge checks each unit against the image, with the human caption as extra evidence.
  Steps 2 and 3 are asked `votes` times (docs/METHOD.md: 3) and decided by majority.

Metric (`sample_scores`, pure), per caption, on all units and again on descriptive units / descriptive facts:
  - duplicates share one credit: units matched to the same oracle fact form one group, and unmatched units with
    the same normalised text form one group; a group of k units gives each unit weight 1/k;
  - precision = sum(weight * correct) / sum(weight); a caption with no units scores 0;
  - recall = (covered facts + novel) / (oracle facts + novel), where a fact is covered when a correct unit
    matches it and `novel` counts the groups of correct unmatched units (correct information the human caption
    lacks adds to both numerator and denominator); undefined (NaN, excluded) when both counts are 0;
  - F1 = 2PR / (P + R) (0 when P + R = 0).
  For the descriptive variant a descriptive unit matched to a non-descriptive fact counts as unmatched.
Reported values are means over scored captions, x100.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

from balcap_jax.evaluation import benchmark_files as files
from balcap_jax.evaluation.judging import (
    EvalJudges,
    Unscorable,
    VotePolicy,
    ask_or_raise,
    ask_votes,
    by_id,
    id_lines,
    majority_bool,
    majority_choice,
)
from balcap_jax.evaluation.prompt_files import render_prompt
from balcap_jax.evaluation.results_store import item_key
from balcap_jax.rewards.json_output import JudgeOutputError
from balcap_jax.rewards.judges.protocol import ImagePart, user_request
from balcap_jax.rewards.structured_call import CallLog

NAME = "dcscore"
NO_MATCH = "none"
METRICS = ("precision", "recall", "f1", "precision_descriptive", "recall_descriptive", "f1_descriptive")
DECOMPOSE_SCHEMA = {"units": [{"unit": str, "descriptive": bool}]}
MATCH_SCHEMA = {"matches": [{"id": str, "fact": str}]}
VERIFY_SCHEMA = {"verdicts": [{"id": str, "correct": bool}]}


# ---------------------------------------------------------------------------------------------------------------
# The metric (pure)


@dataclasses.dataclass(frozen=True)
class OracleFact:
    id: str
    text: str
    descriptive: bool = True


@dataclasses.dataclass(frozen=True)
class Unit:
    """One judged caption unit. match: the id of the oracle fact it states, or None; correct: verified."""

    text: str
    descriptive: bool
    match: str | None
    correct: bool


def _normalised(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def precision_recall(units: Sequence[Unit], facts: Sequence[OracleFact]) -> tuple[float, float]:
    """(precision, recall) of one caption, in [0, 1] (recall NaN when there is nothing to recall)."""
    fact_ids = {fact.id for fact in facts}
    groups: dict[tuple[str, str], list[Unit]] = {}
    for unit in units:
        group = ("fact", unit.match) if unit.match in fact_ids else ("text", _normalised(unit.text))
        groups.setdefault(group, []).append(unit)
    if not units:
        precision = 0.0
    else:
        # every group carries weight 1, shared by its units: a group's credit is the share of its units correct
        precision = sum(sum(u.correct for u in members) / len(members) for members in groups.values()) / len(groups)
    covered = sum(1 for (kind, _), members in groups.items() if kind == "fact" and any(u.correct for u in members))
    novel = sum(1 for (kind, _), members in groups.items() if kind == "text" and any(u.correct for u in members))
    denominator = len(facts) + novel
    recall = (covered + novel) / denominator if denominator else math.nan
    return precision, recall


def f1(precision: float, recall: float) -> float:
    if math.isnan(precision) or math.isnan(recall):
        return math.nan
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def sample_scores(units: Sequence[Unit], facts: Sequence[OracleFact]) -> dict[str, float]:
    """{metric: value in [0, 1] or NaN} for one caption, on all units and on descriptive ones (see module doc)."""
    p, r = precision_recall(units, facts)
    descriptive_facts = [f for f in facts if f.descriptive]
    descriptive_ids = {f.id for f in descriptive_facts}
    descriptive_units = [
        dataclasses.replace(u, match=u.match if u.match in descriptive_ids else None) for u in units if u.descriptive
    ]
    pd, rd = precision_recall(descriptive_units, descriptive_facts)
    return {"precision": p, "recall": r, "f1": f1(p, r), "precision_descriptive": pd, "recall_descriptive": rd,
            "f1_descriptive": f1(pd, rd)}  # fmt: skip


def aggregate_scores(per_sample: Sequence[dict[str, float] | None]) -> dict[str, Any]:
    """Means over scored samples (None = unscored), x100; counts of scored and unscored samples."""
    scored = [s for s in per_sample if s is not None]
    out: dict[str, Any] = {"num_items": len(per_sample), "num_scored": len(scored)}
    for metric in METRICS:
        values = np.array([s[metric] for s in scored], dtype=np.float64)
        finite = values[~np.isnan(values)]
        out[metric] = float(finite.mean() * 100) if finite.size else math.nan
    return out


# ---------------------------------------------------------------------------------------------------------------
# The benchmark file


@dataclasses.dataclass(frozen=True)
class DCScoreItem:
    image_id: str
    image_path: str
    reference: str
    oracle_facts: tuple[OracleFact, ...] | None  # None: decompose the reference with the judge


def _oracle_facts(raw: Any, where: str) -> tuple[OracleFact, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise files.BenchmarkFormatError(f"{where}: 'oracle_facts' must be a non-empty list (or be left out)")
    facts = []
    for index, fact in enumerate(raw):
        if isinstance(fact, str) and fact.strip():
            facts.append(OracleFact(f"f{index + 1}", fact.strip()))
        elif isinstance(fact, dict) and isinstance(fact.get("fact"), str) and fact["fact"].strip():
            descriptive = fact.get("descriptive", True)
            if not isinstance(descriptive, bool):
                raise files.BenchmarkFormatError(f"{where}: oracle_facts[{index}]['descriptive'] must be true/false")
            facts.append(OracleFact(f"f{index + 1}", fact["fact"].strip(), descriptive))
        else:
            raise files.BenchmarkFormatError(
                f"{where}: oracle_facts[{index}] must be a non-empty string or {{\"fact\": str, \"descriptive\": bool}}"
            )
    return tuple(facts)


def load_items(path: str) -> list[DCScoreItem]:
    items = [
        DCScoreItem(
            image_id=files.required_str(row, "image_id", where),
            image_path=files.image_path(row, path, where),
            reference=files.required_str(row, "reference", where),
            oracle_facts=_oracle_facts(row.get("oracle_facts"), where),
        )
        for where, row in files.read_jsonl(path)
    ]
    files.unique_ids([item.image_id for item in items], path)
    return items


# ---------------------------------------------------------------------------------------------------------------
# Judging


@dataclasses.dataclass(frozen=True)
class DCScoreConfig:
    """votes: asks per matching / verification decision, decided by majority (DeCapBench samples 3).
    max_units: units kept per caption (the rest are dropped; the item's record says how many)."""

    votes: int = 3
    vote_temperature: float = 0.7
    max_units: int = 100
    max_tokens: int = 4096
    decompose_prompt_version: int = 1
    match_prompt_version: int = 1
    verify_prompt_version: int = 1

    def __post_init__(self):
        VotePolicy(self.votes, self.vote_temperature)  # validates
        if self.max_units < 1:
            raise ValueError(f"DCScoreConfig.max_units must be >= 1, got {self.max_units}")

    @property
    def vote_policy(self) -> VotePolicy:
        return VotePolicy(self.votes, self.vote_temperature, self.max_tokens)


def _units_check(max_units: int):
    def check(parsed: dict[str, Any]) -> list[dict[str, Any]]:
        return [row for row in parsed["units"] if row["unit"].strip()][:max_units]

    return check


class DCScore:
    """The DCScore protocol over a benchmark file (see module docstring)."""

    name = NAME

    def __init__(self, items: Sequence[DCScoreItem], judges: EvalJudges, config: DCScoreConfig = DCScoreConfig()):
        self.items = list(items)
        self.judges = judges
        self.config = config

    def item_key(self, item: DCScoreItem, caption: str) -> str:
        facts = None if item.oracle_facts is None else [dataclasses.astuple(f) for f in item.oracle_facts]
        return item_key(protocol=NAME, image_id=item.image_id, caption=caption, reference=item.reference, facts=facts,
                        config=dataclasses.asdict(self.config), **self.judges.fingerprint())  # fmt: skip

    async def _decompose(self, text: str, log: CallLog, label: str) -> list[dict[str, Any]]:
        cfg = self.config
        prompt = render_prompt("dcscore_decompose", cfg.decompose_prompt_version, description=text)
        request = user_request(prompt, max_tokens=cfg.max_tokens)
        return await ask_or_raise(self.judges.text, request, DECOMPOSE_SCHEMA, log, policy=cfg.vote_policy.ask,
                                  check=_units_check(cfg.max_units), label=label)  # fmt: skip

    async def _match(
        self, units: list[tuple[str, str]], facts: Sequence[OracleFact], log: CallLog
    ) -> dict[str, str | None]:
        cfg = self.config
        fact_ids = {f.id for f in facts}
        unit_ids = [u for u, _ in units]
        facts_block = id_lines([(f.id, f.text) for f in facts], "fact")
        prompt = render_prompt("dcscore_match", cfg.match_prompt_version, facts=facts_block,
                               units=id_lines(units, "unit"))  # fmt: skip

        def check(parsed: dict[str, Any]) -> dict[str, str]:
            rows = by_id(parsed["matches"], unit_ids, "match")
            out = {}
            for unit_id, row in rows.items():
                fact = row["fact"].strip()
                if fact.lower() not in (NO_MATCH, "") and fact not in fact_ids:
                    raise JudgeOutputError(f"unit {unit_id} matched to unknown fact id {fact!r}")
                out[unit_id] = fact if fact in fact_ids else NO_MATCH
            return out

        votes = await ask_votes(self.judges.text, lambda **kw: user_request(prompt, **kw), MATCH_SCHEMA, log,
                                cfg.vote_policy, check=check, label="match")  # fmt: skip
        decided = {u: majority_choice([v[u] for v in votes], NO_MATCH) for u in unit_ids}
        return {u: (None if m == NO_MATCH else m) for u, m in decided.items()}

    async def _verify(
        self, image: bytes, reference: str, units: list[tuple[str, str]], log: CallLog
    ) -> dict[str, bool]:
        cfg = self.config
        unit_ids = [u for u, _ in units]
        prompt = render_prompt("dcscore_verify", cfg.verify_prompt_version, reference=reference,
                               units=id_lines(units, "statement"))  # fmt: skip

        def check(parsed: dict[str, Any]) -> dict[str, bool]:
            return {u: row["correct"] for u, row in by_id(parsed["verdicts"], unit_ids, "verdict").items()}

        votes = await ask_votes(self.judges.visual, lambda **kw: user_request(ImagePart(image), prompt, **kw),
                                VERIFY_SCHEMA, log, cfg.vote_policy, check=check, label="verify")  # fmt: skip
        return {u: majority_bool([v[u] for v in votes]) for u in unit_ids}

    async def judge_item(self, item: DCScoreItem, caption: str) -> dict[str, Any]:
        log = CallLog()
        try:
            facts = item.oracle_facts
            if facts is None:
                rows = await self._decompose(item.reference, log, "decompose_reference")
                facts = tuple(OracleFact(f"f{i + 1}", r["unit"].strip(), r["descriptive"]) for i, r in enumerate(rows))
            rows = await self._decompose(caption, log, "decompose_caption") if caption.strip() else []
            units_text = [(f"u{i + 1}", r["unit"].strip()) for i, r in enumerate(rows)]
            matches: dict[str, str | None] = {u: None for u, _ in units_text}
            verdicts: dict[str, bool] = {}
            if units_text:  # matching and verification are independent: ask both at once
                image = files.read_bytes(item.image_path)
                verifying = self._verify(image, item.reference, units_text, log)
                if facts:
                    matches, verdicts = await asyncio.gather(self._match(units_text, facts, log), verifying)
                else:
                    verdicts = await verifying
        except Unscorable as error:
            return {"scores": None, "error": str(error)} | log.as_record()
        units = [Unit(text, row["descriptive"], matches[u], verdicts[u]) for (u, text), row in zip(units_text, rows)]
        scores = sample_scores(units, facts) if facts else None
        return {
            "scores": scores,
            "units": [dataclasses.asdict(u) for u in units],
            "oracle_facts": [dataclasses.asdict(f) for f in facts],
            **({} if facts else {"error": "the reference has no facts"}),
        } | log.as_record()

    def aggregate(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return aggregate_scores([r["scores"] for r in results])
