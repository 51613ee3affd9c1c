"""A deterministic judge for the evaluation prompts (tests and dry runs), behind `rewards.judges.scripted`.

Rules, read from the tagged sections of the prompts (so they stay in step with the templates):
- decomposition (<description>): every sentence (split on . ! ? ;) is one unit; a unit is non-descriptive when
  it contains a word from `subjective_words`;
- matching (<oracle_facts> + <units>): a unit matches the first fact whose words longer than three letters all
  appear in the unit, else "none";
- verification (<statements>): a statement is correct unless it contains a word from `false_words`;
- caption QA (<question> + <options>): the first option whose words all appear in the caption, else the
  "cannot answer" option when offered, else "A";
- battles (<caption_a> + <caption_b>): the caption with more correct sentences (no false word) minus false
  ones wins; equal counts are a tie.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

from balcap_jax.rewards.judges.protocol import JudgeRequest
from balcap_jax.rewards.judges.scripted import ScriptedJudge, tagged_section

_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"[.!?;]+", text) if s.strip()]


def _json_lines(block: str) -> list[dict]:
    return [json.loads(line) for line in block.splitlines() if line.strip()]


class EvalRuleResponder:
    """Callable `JudgeRequest -> text` implementing the rules in the module docstring."""

    def __init__(
        self,
        *,
        false_words: Iterable[str] = ("purple", "unicorn", "dragon"),
        subjective_words: Iterable[str] = ("seems", "probably", "peaceful", "beautiful", "mood"),
    ):
        self.false_words = frozenset(w.lower() for w in false_words)
        self.subjective_words = frozenset(w.lower() for w in subjective_words)

    def correct(self, text: str) -> bool:
        return not set(_words(text)) & self.false_words

    def __call__(self, request: JudgeRequest) -> str:
        prompt = "\n".join(message.text for message in request.messages)
        if (caption_a := tagged_section(prompt, "caption_a")) is not None:
            return self._battle(caption_a, tagged_section(prompt, "caption_b") or "")
        if tagged_section(prompt, "question") is not None:
            return self._answer(tagged_section(prompt, "caption") or "", tagged_section(prompt, "options") or "")
        if (facts := tagged_section(prompt, "oracle_facts")) is not None:
            return self._match(facts, tagged_section(prompt, "units") or "")
        if (statements := tagged_section(prompt, "statements")) is not None:
            rows = _json_lines(statements)
            return json.dumps({"verdicts": [{"id": r["id"], "correct": self.correct(r["statement"])} for r in rows]})
        if (description := tagged_section(prompt, "description")) is not None:
            units = [{"unit": s, "descriptive": not set(_words(s)) & self.subjective_words}
                     for s in _sentences(description)]  # fmt: skip
            return json.dumps({"units": units})
        raise ValueError("EvalRuleResponder: the prompt matches none of the evaluation templates")

    @staticmethod
    def _match(facts_block: str, units_block: str) -> str:
        facts = _json_lines(facts_block)
        matches = []
        for unit in _json_lines(units_block):
            words = set(_words(unit["unit"]))
            found = next((f["id"] for f in facts if {w for w in _words(f["fact"]) if len(w) > 3} <= words), "none")
            matches.append({"id": unit["id"], "fact": found})
        return json.dumps({"matches": matches})

    @staticmethod
    def _answer(caption: str, options_block: str) -> str:
        caption_words = set(_words(caption))
        cannot = None
        for line in options_block.splitlines():
            match = re.match(r"\s*([A-Z])\.\s*(.*)", line)
            if not match:
                continue
            letter, text = match.groups()
            if text.lower().startswith("cannot answer"):
                cannot = letter
            elif set(_words(text)) <= caption_words:
                return json.dumps({"answer": letter})
        return json.dumps({"answer": cannot or "A"})

    def _battle(self, caption_a: str, caption_b: str) -> str:
        def merit(caption: str) -> int:
            return sum(1 if self.correct(s) else -1 for s in _sentences(caption))

        a, b = merit(caption_a), merit(caption_b)
        return json.dumps({"better": "A" if a > b else "B" if b > a else "tie"})


def scripted_eval_judge(latency_s: float = 0.0, **rules) -> ScriptedJudge:
    """A multimodal `ScriptedJudge` answering the evaluation prompts by the rules above."""
    return ScriptedJudge(EvalRuleResponder(**rules), model="scripted-eval-rules", multimodal=True, latency_s=latency_s)
