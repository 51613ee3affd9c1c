"""A deterministic offline judge: answers our prompt templates from simple, documented rules.

Used by tests (directly, or behind the loopback HTTP test server) and for dry runs of the scoring pipeline with
no model at all. The rules read the tagged sections the prompt templates put their data in
(`<description>`, `<claims>`, `<candidate_caption>` + `<reference_facts>`, `<caption>`, `<question>` +
`<options>`), so they stay in step with the templates:

- decomposition: every sentence (split on . ! ? ;) is one claim about element "scene";
- visual verification: a claim is correct unless it contains a word from `false_words`, pointable unless it
  contains a word from `unpointable_words`;
- coverage: a fact is covered when every word of it longer than three letters appears in the caption;
- linguistic: fluency 3 when a word repeats back to back (else 9), coherence 4 beyond 12 sentences (else 8),
  clarity 7;
- caption QA: the first option whose text appears in the caption, else the "cannot answer" option.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Callable, Iterable

from balcap_jax.rewards.judges.protocol import JudgeReply, JudgeRequest

Responder = Callable[[JudgeRequest], str]

_WORD = re.compile(r"[a-z0-9']+")


def tagged_section(text: str, tag: str) -> str | None:
    """The text between <tag> and </tag> (stripped), or None when the tag is absent."""
    match = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.DOTALL)
    return match.group(1).strip() if match else None


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _json_lines(block: str) -> list[dict]:
    rows = []
    for line in block.splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


class RuleBasedResponder:
    """Callable `JudgeRequest -> text` implementing the rules in the module docstring."""

    def __init__(
        self,
        *,
        false_words: Iterable[str] = ("purple", "unicorn", "dragon"),
        unpointable_words: Iterable[str] = ("beautiful", "peaceful", "mood", "lovely"),
    ):
        self.false_words = frozenset(w.lower() for w in false_words)
        self.unpointable_words = frozenset(w.lower() for w in unpointable_words)

    def __call__(self, request: JudgeRequest) -> str:
        prompt = "\n".join(message.text for message in request.messages)
        if tagged_section(prompt, "question") is not None:
            return self._answer(tagged_section(prompt, "caption") or "", tagged_section(prompt, "options") or "")
        if (facts := tagged_section(prompt, "reference_facts")) is not None:
            return self._coverage(tagged_section(prompt, "candidate_caption") or "", facts)
        if (claims := tagged_section(prompt, "claims")) is not None:
            return self._verify(claims)
        if (description := tagged_section(prompt, "description")) is not None:
            return self._decompose(description)
        if (caption := tagged_section(prompt, "caption")) is not None:
            return self._linguistic(caption)
        raise ValueError("RuleBasedResponder: the prompt matches none of the known templates")

    @staticmethod
    def _decompose(description: str) -> str:
        sentences = [s.strip() for s in re.split(r"[.!?;]+", description) if s.strip()]
        claims = [{"id": f"c{i + 1}", "element": "scene", "claim": s} for i, s in enumerate(sentences)]
        return json.dumps({"claims": claims})

    def _verify(self, block: str) -> str:
        verdicts = []
        for claim in _json_lines(block):
            words = set(_words(claim["claim"]))
            verdicts.append(
                {
                    "id": claim["id"],
                    "correct": not (words & self.false_words),
                    "pointable": not (words & self.unpointable_words),
                }
            )
        return json.dumps({"verdicts": verdicts})

    @staticmethod
    def _coverage(caption: str, block: str) -> str:
        caption_words = set(_words(caption))
        rows = []
        for fact in _json_lines(block):
            needed = {w for w in _words(fact["fact"]) if len(w) > 3}
            rows.append({"id": fact["id"], "covered": needed <= caption_words})
        return json.dumps({"coverage": rows})

    @staticmethod
    def _linguistic(caption: str) -> str:
        words = _words(caption)
        stutters = any(a == b for a, b in zip(words, words[1:]))
        sentences = [s for s in re.split(r"[.!?]+", caption) if s.strip()]
        return json.dumps({"clarity": 7, "fluency": 3 if stutters else 9, "coherence": 4 if len(sentences) > 12 else 8})

    @staticmethod
    def _answer(caption: str, options_block: str) -> str:
        caption_text = " ".join(_words(caption))
        cannot = None
        for line in options_block.splitlines():
            match = re.match(r"\s*([A-Z])\.\s*(.*)", line)
            if not match:
                continue
            letter, text = match.groups()
            if "cannot be answered" in text.lower() or "does not give enough" in text.lower():
                cannot = letter
                continue
            if text and " ".join(_words(text)) in caption_text:
                return json.dumps({"answer": letter})
        return json.dumps({"answer": cannot or "A"})


class ScriptedJudge:
    """A `Judge` whose replies come from `responder` (a function of the request); records every request."""

    def __init__(
        self, responder: Responder, *, model: str = "scripted", multimodal: bool = True, latency_s: float = 0.0
    ):
        self.responder = responder
        self.model = model
        self.multimodal = multimodal
        self.latency_s = latency_s
        self.requests: list[JudgeRequest] = []

    async def generate(self, request: JudgeRequest) -> JudgeReply:
        start = time.perf_counter()
        self.requests.append(request)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return JudgeReply(self.responder(request), latency_s=time.perf_counter() - start)
