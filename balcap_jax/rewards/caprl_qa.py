"""CapRL QA utility: can a text-only LLM answer the image's multiple-choice questions from the caption alone?

Optional fourth component and the CapRL baseline (docs/METHOD.md). Per caption: `num_draws` questions drawn with
replacement from the image's question set, each with its options shuffled and a "cannot answer from the caption"
option appended; r = mean credit (1 correct, `cannot_answer_credit` for choosing "cannot answer", 0 wrong).
Draws depend only on (seed, image_id), so the G captions of a group face the same questions.

Questions come from `RewardItem.metadata["questions"]`: a list of
  {"question": str, "options": [str, ...] (>= 2), "answer": index into options or the correct option's text}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import re
import string
from typing import Any, Sequence

import numpy as np

from balcap_jax.rewards.json_output import JudgeOutputError
from balcap_jax.rewards.judges.protocol import Judge, user_request
from balcap_jax.rewards.prompt_templates import render_prompt
from balcap_jax.rewards.structured_call import AskPolicy, CallLog, ask_json
from balcap_jax.rewards.types import ComponentScore, RewardItem

ANSWER_SCHEMA = {"answer": str}
CANNOT_ANSWER = "The question cannot be answered from the caption."
_LETTER = re.compile(r"^\W*([A-Za-z])\W*$")


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    question: str
    options: tuple[str, ...]
    answer: int  # index into options


@dataclasses.dataclass(frozen=True)
class Draw:
    """One asked question: options in the order shown (cannot-answer last); correct: its index there."""

    question: str
    options: tuple[str, ...]
    correct: int
    cannot_answer: int


@dataclasses.dataclass(frozen=True)
class CapRLQAConfig:
    """min_answered_fraction: share of draws that must get a usable answer, else NaN (1.0: all of them)."""

    prompt_version: int = 1
    num_draws: int = 8
    seed: int = 0
    cannot_answer_text: str = CANNOT_ANSWER
    cannot_answer_credit: float = 0.0
    min_answered_fraction: float = 1.0
    max_tokens: int = 256
    policy: AskPolicy = AskPolicy()

    def __post_init__(self):
        if self.num_draws < 1:
            raise ValueError(f"CapRLQAConfig.num_draws must be >= 1, got {self.num_draws}")
        if not 0.0 <= self.cannot_answer_credit <= 1.0:
            raise ValueError(f"CapRLQAConfig.cannot_answer_credit must be in [0, 1], got {self.cannot_answer_credit}")
        if not 0.0 < self.min_answered_fraction <= 1.0:
            raise ValueError(f"CapRLQAConfig.min_answered_fraction must be in (0, 1], got {self.min_answered_fraction}")


def parse_questions(item: RewardItem) -> tuple[MultipleChoice, ...]:
    """The item's multiple-choice set, validated; ValueError naming the image and the field otherwise."""
    raw = item.metadata.get("questions")
    where = f"RewardItem(image_id={item.image_id!r}).metadata['questions']"
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(f"{where} must be a non-empty list of {{question, options, answer}} for the caprl_qa reward")
    parsed = []
    for i, row in enumerate(raw):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise ValueError(f"{where}[{i}] needs a 'question' string")
        options = row.get("options")
        if not isinstance(options, (list, tuple)) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{where}[{i}]['options'] must be a list of >= 2 strings")
        answer = row.get("answer")
        if isinstance(answer, str) and answer in options:
            answer = list(options).index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
            raise ValueError(
                f"{where}[{i}]['answer'] must be an index into options or one option's text, got {answer!r}"
            )
        parsed.append(MultipleChoice(row["question"], tuple(options), answer))
    return tuple(parsed)


def draw_questions(questions: Sequence[MultipleChoice], image_id: str, config: CapRLQAConfig) -> tuple[Draw, ...]:
    """`num_draws` questions with replacement, options shuffled, cannot-answer appended; a pure function of
    (questions, image_id, seed)."""
    if max(len(q.options) for q in questions) + 1 > len(string.ascii_uppercase):
        raise ValueError("caprl_qa supports at most 25 options per question")
    image_hash = int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng([config.seed, image_hash])
    draws = []
    for index in rng.integers(0, len(questions), size=config.num_draws):
        question = questions[int(index)]
        order = rng.permutation(len(question.options))
        options = tuple(question.options[int(j)] for j in order) + (config.cannot_answer_text,)
        correct = int(np.flatnonzero(order == question.answer)[0])
        draws.append(Draw(question.question, options, correct, len(options) - 1))
    return tuple(draws)


def option_block(options: Sequence[str]) -> str:
    return "\n".join(f"{string.ascii_uppercase[i]}. {text}" for i, text in enumerate(options))


def chosen_index(answer: str, options: Sequence[str]) -> int:
    """The option a judge's answer names: a letter ("B", "(b)", "B.") or an option's exact text."""
    match = _LETTER.match(answer)
    if match:
        index = string.ascii_uppercase.index(match.group(1).upper())
        if index < len(options):
            return index
    lowered = [o.strip().lower() for o in options]
    if answer.strip().lower() in lowered:
        return lowered.index(answer.strip().lower())
    raise JudgeOutputError(f"answer {answer[:40]!r} names none of the {len(options)} options")


class CapRLQAReward:
    """`RewardComponent` "caprl_qa" (text judge only)."""

    name = "caprl_qa"

    def __init__(self, text_judge: Judge, config: CapRLQAConfig = CapRLQAConfig()):
        self.text_judge = text_judge
        self.config = config

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]:
        draws = [draw_questions(parse_questions(item), item.image_id, self.config) for item in items]
        return list(await asyncio.gather(*(self.score_one(item, d) for item, d in zip(items, draws))))

    async def _ask(self, caption: str, draw: Draw, log: CallLog) -> int | None:
        cfg = self.config
        fields = dict(caption=caption, question=draw.question, options=option_block(draw.options))
        prompt = render_prompt("caption_qa", cfg.prompt_version, **fields)
        outcome = await ask_json(
            self.text_judge, user_request(prompt, max_tokens=cfg.max_tokens), ANSWER_SCHEMA, log, policy=cfg.policy,
            check=lambda parsed: chosen_index(parsed["answer"], draw.options), label="caption_qa",
            schema_name="caption_qa",
        )  # fmt: skip
        return None if outcome is None else outcome[0]

    def credit(self, draw: Draw, choice: int) -> float:
        if choice == draw.correct:
            return 1.0
        return self.config.cannot_answer_credit if choice == draw.cannot_answer else 0.0

    async def score_one(self, item: RewardItem, draws: Sequence[Draw]) -> ComponentScore:
        cfg = self.config
        record: dict[str, Any] = {"prompts": {"caption_qa": cfg.prompt_version}}
        if not item.caption.strip():
            # Nothing can be answered from an empty caption: every draw is a "cannot answer".
            return ComponentScore(cfg.cannot_answer_credit, record | {"reason": "empty caption"})
        log = CallLog()
        choices = await asyncio.gather(*(self._ask(item.caption, draw, log) for draw in draws))
        rows = [
            {"question": d.question, "options": list(d.options), "correct": d.correct, "chosen": c}
            | ({"credit": self.credit(d, c)} if c is not None else {})
            for d, c in zip(draws, choices)
        ]
        record |= {"draws": rows} | log.as_record()
        answered = [row["credit"] for row in rows if "credit" in row]
        if len(answered) < math.ceil(cfg.min_answered_fraction * len(draws) - 1e-9):
            return ComponentScore(math.nan, record, errors=log.errors)
        return ComponentScore(sum(answered) / len(answered), record, errors=log.errors)
