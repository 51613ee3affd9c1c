"""CaptionQA-style evaluation: can a text-only judge answer the image's multiple-choice questions from the caption?

Benchmark file (JSONL, one image per line):

    {"image_id": "0001",
     "image": "images/0001.jpg",                 # local path, relative to this file (or absolute)
     "domain": "natural",                        # any label; scores are reported per domain
     "questions": [{"question": "What colour is the bus?",
                    "options": ["red", "blue", "green"],  # >= 2 options
                    "answer": 0}]}                         # index into options, or the correct option's text

Protocol (`present_question`, pure): each question's options are shuffled by a generator seeded with
(seed, image_id, question index) (seed 0 by default), so the order is reproducible and independent of which
other items run or in which order; for every question that is not yes/no, "Cannot answer from the caption" is
appended as the last option. The text judge answers at temperature 0 from the caption alone.

Score per question (`question_score`, pure): 1 for the correct option, 1/n + 0.05 for "cannot answer" (n: the
number of original options), 0 for a wrong option. Reported (x100): the mean per domain and overall (the mean
over all questions), plus the mean over domains. A question whose answer stays unusable is unscored (excluded,
counted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import string
from typing import Any, Sequence

import numpy as np

from balcap_jax.evaluation import benchmark_files as files
from balcap_jax.evaluation.judging import EvalJudges, Unscorable, ask_or_raise
from balcap_jax.evaluation.prompt_files import render_prompt
from balcap_jax.evaluation.results_store import item_key
from balcap_jax.rewards.caprl_qa import ANSWER_SCHEMA, chosen_index, option_block
from balcap_jax.rewards.caprl_qa import MultipleChoice as Question  # question, options, answer index
from balcap_jax.rewards.judges.protocol import user_request
from balcap_jax.rewards.structured_call import AskPolicy, CallLog

NAME = "captionqa"
CANNOT_ANSWER = "Cannot answer from the caption"
CANNOT_ANSWER_BONUS = 0.05


# ---------------------------------------------------------------------------------------------------------------
# The metric (pure)


@dataclasses.dataclass(frozen=True)
class Presented:
    """A question as shown to the judge. correct / cannot_answer: option indices (cannot_answer None for yes/no
    questions); num_choices: the number of original options."""

    question: str
    options: tuple[str, ...]
    correct: int
    cannot_answer: int | None
    num_choices: int


def is_yes_no(options: Sequence[str]) -> bool:
    return sorted(o.strip().lower().rstrip(".") for o in options) == ["no", "yes"]


def present_question(question: Question, image_id: str, index: int, seed: int = 0) -> Presented:
    """Options shuffled with a generator seeded by (seed, image_id, index); "cannot answer" appended unless the
    question is yes/no."""
    digest = int.from_bytes(hashlib.sha256(f"{image_id}\x00{index}".encode("utf-8")).digest()[:8], "little")
    order = np.random.default_rng([seed, digest]).permutation(len(question.options))
    options = tuple(question.options[int(j)] for j in order)
    correct = int(np.flatnonzero(order == question.answer)[0])
    if is_yes_no(question.options):
        return Presented(question.question, options, correct, None, len(question.options))
    return Presented(question.question, options + (CANNOT_ANSWER,), correct, len(options), len(question.options))


def question_score(presented: Presented, choice: int) -> float:
    """1 correct, 1/n + 0.05 for "cannot answer" (n original options), 0 wrong."""
    if choice == presented.correct:
        return 1.0
    if choice == presented.cannot_answer:
        return 1.0 / presented.num_choices + CANNOT_ANSWER_BONUS
    return 0.0


def aggregate_scores(per_item: Sequence[tuple[str, Sequence[float | None]]]) -> dict[str, Any]:
    """per_item: (domain, per-question scores; None = unscored). -> overall (mean over questions), per-domain
    means and their mean (macro), all x100, with counts."""
    by_domain: dict[str, list[float]] = {}
    unscored = 0
    for domain, scores in per_item:
        by_domain.setdefault(domain, [])
        for score in scores:
            if score is None or math.isnan(score):
                unscored += 1
            else:
                by_domain[domain].append(score)
    every = [s for values in by_domain.values() for s in values]
    per_domain = {d: (float(np.mean(v)) * 100 if v else math.nan) for d, v in sorted(by_domain.items())}
    finite_domains = [v for v in per_domain.values() if not math.isnan(v)]
    return {
        "overall": float(np.mean(every)) * 100 if every else math.nan,
        "macro_over_domains": float(np.mean(finite_domains)) if finite_domains else math.nan,
        "per_domain": per_domain,
        "num_items": len(per_item),
        "num_questions_scored": len(every),
        "num_questions_unscored": unscored,
    }


# ---------------------------------------------------------------------------------------------------------------
# The benchmark file


@dataclasses.dataclass(frozen=True)
class CaptionQAItem:
    image_id: str
    image_path: str
    domain: str
    questions: tuple[Question, ...]


def _questions(raw: Any, where: str) -> tuple[Question, ...]:
    if not isinstance(raw, list) or not raw:
        raise files.BenchmarkFormatError(f"{where}: 'questions' must be a non-empty list")
    out = []
    for i, row in enumerate(raw):
        at = f"{where}: questions[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise files.BenchmarkFormatError(f"{at} needs a 'question' string")
        options = row.get("options")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            raise files.BenchmarkFormatError(f"{at}['options'] must be a list of >= 2 non-empty strings")
        if len(options) + 1 > len(string.ascii_uppercase):
            raise files.BenchmarkFormatError(f"{at}['options'] has more than 25 options")
        answer = row.get("answer")
        if isinstance(answer, str) and answer in options:
            answer = options.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
            raise files.BenchmarkFormatError(f"{at}['answer'] must be an index into options or an option's text")
        out.append(Question(row["question"], tuple(options), answer))
    return tuple(out)


def load_items(path: str) -> list[CaptionQAItem]:
    items = []
    for where, row in files.read_jsonl(path):
        domain = row.get("domain", "all")
        if not isinstance(domain, str) or not domain:
            raise files.BenchmarkFormatError(f"{where}: 'domain' must be a non-empty string (or be left out)")
        items.append(CaptionQAItem(files.required_str(row, "image_id", where), files.image_path(row, path, where),
                                   domain, _questions(row.get("questions"), where)))  # fmt: skip
    files.unique_ids([item.image_id for item in items], path)
    return items


# ---------------------------------------------------------------------------------------------------------------
# Judging


@dataclasses.dataclass(frozen=True)
class CaptionQAConfig:
    seed: int = 0
    max_tokens: int = 256
    prompt_version: int = 1


class CaptionQA:
    name = NAME

    def __init__(self, items: Sequence[CaptionQAItem], judges: EvalJudges, config: CaptionQAConfig = CaptionQAConfig()):
        self.items = list(items)
        self.judges = judges
        self.config = config
        # re-asks of an unusable answer stay greedy: the protocol is temperature 0
        self.ask_policy = AskPolicy(reask_temperature=None)

    def item_key(self, item: CaptionQAItem, caption: str) -> str:
        questions = [dataclasses.astuple(q) for q in item.questions]
        return item_key(
            protocol=NAME, image_id=item.image_id, caption=caption, questions=questions, domain=item.domain,
            config=dataclasses.asdict(self.config), text_judge=self.judges.text.model,
        )  # fmt: skip

    async def _answer(self, caption: str, presented: Presented, log: CallLog) -> int | None:
        prompt = render_prompt("captionqa_answer", self.config.prompt_version, caption=caption,
                               question=presented.question, options=option_block(presented.options))  # fmt: skip
        request = user_request(prompt, max_tokens=self.config.max_tokens, temperature=0.0)
        try:
            return await ask_or_raise(self.judges.text, request, ANSWER_SCHEMA, log, policy=self.ask_policy,
                                      check=lambda parsed: chosen_index(parsed["answer"], presented.options),
                                      label="captionqa")  # fmt: skip
        except Unscorable:
            return None

    async def judge_item(self, item: CaptionQAItem, caption: str) -> dict[str, Any]:
        log = CallLog()
        presented = [present_question(q, item.image_id, i, self.config.seed) for i, q in enumerate(item.questions)]
        choices = await asyncio.gather(*(self._answer(caption, p, log) for p in presented))
        rows = [
            {"question": p.question, "options": list(p.options), "correct": p.correct, "chosen": c,
             "score": None if c is None else question_score(p, c)}
            for p, c in zip(presented, choices)
        ]  # fmt: skip
        return {"domain": item.domain, "questions": rows} | log.as_record()

    def aggregate(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return aggregate_scores([(r["domain"], [q["score"] for q in r["questions"]]) for r in results])
