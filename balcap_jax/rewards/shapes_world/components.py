"""The exact offline judge of ShapesWorld: precision, recall, linguistic quality and multiple-choice QA.

Each component implements `RewardComponent` and reads the ground truth from `RewardItem.metadata`:
`metadata["scene_graph"]` (a `SceneGraph` or its `to_dict()`) and, for QA, `metadata["questions"]` (as made by
`shapes_world.multiple_choice_questions`). An item without them is unscorable: NaN with the reason in `record`.
Captions are parsed by `shapes_world_grammar.parse_caption`, which never raises.

Scores (all in [0, 1], exact, deterministic):
  precision   #correct claims / #claims over distinct claims (0 for a caption with no claims). A claim is correct
              iff it is pointable (every object it mentions is named by a colour or a shape and matches an object
              in the image; "there is a shape" points at nothing; a count of zero is a negative statement) and
              true of the scene graph. Unverifiable clauses (unknown words, negations, fragments with content)
              are claims that are never correct. Duplicates share one credit: a repeated claim counts once, and a
              correct claim that only restates facts of earlier claims ("There is a red circle. The circle is
              red.", "A is left of B. B is right of A.") counts in neither numerator nor denominator, so
              padding a caption with paraphrases earns nothing.
  recall      #reference facts covered / #facts (`shapes_world.scene_facts`), covered = stated by a correct claim
              (`entailed_facts`): existence by any claim naming that colour and shape; size / region by a size /
              region claim about an object its mention identifies uniquely; a relation by the same relation or
              its mirror ("B right of A" covers "A left of B"); the count by a count claim about all shapes.
  linguistic  as the component scores it by default: clarity, fluency and coherence rated 1-10 like an LLM judge,
              the mean mapped to [0, 1] (`rating.py`). `linguistic()` below is the exact continuous
              score (`ShapesWorldLinguistic(scale="exact")`):
              non_repetition × mean over sentences of grammatical × (1 + well_formed) / 2, with the rules of
              `shapes_world_grammar` (G1–G6, well-formedness): an ungrammatical sentence earns 0, a grammatical
              one with bad capitalisation / punctuation / length earns 1/2; and
              non_repetition = (#distinct sentences / #sentences) × (#distinct claims / #claims). Empty: 0.
  caprl_qa    mean over the image's questions of 1 if the answer read off the caption's claims is right,
              `cannot_answer_credit` if the caption does not say, else 0. The offline answerer is exact, so all
              questions are asked once (the expectation of CapRL's sampling with replacement).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

from balcap_jax.data import shapes_world as world
from balcap_jax.data.shapes_world_grammar import Claim, Mention, ParsedCaption, parse_caption
from balcap_jax.rewards.shapes_world.rating import rated_linguistic
from balcap_jax.rewards.types import ComponentScore, RewardItem

_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_REGION_CELLS = {name: cell for cell, name in world.REGIONS.items()}


# ----------------------------------------------------------------------------------------------------------
# Claim checking


def resolve(mention: Mention | None, scene: world.SceneGraph) -> list[world.SceneObject]:
    """Objects matching everything the mention states."""
    if mention is None:
        return []
    return [
        o
        for o in scene.objects
        if (mention.colour is None or o.colour == mention.colour)
        and (mention.shape is None or o.shape == mention.shape)
        and (mention.size is None or o.size == mention.size)
    ]


@dataclasses.dataclass(frozen=True)
class ClaimVerdict:
    """duplicate: a correct claim stating only facts that earlier claims already stated (not counted)."""

    claim: Claim
    pointable: bool
    correct: bool
    duplicate: bool = False


def _is_generic(mention: Mention | None) -> bool:
    return mention is None or (mention.colour is None and mention.shape is None)


def check_claim(claim: Claim, scene: world.SceneGraph) -> ClaimVerdict:
    """Pointable: each mentioned object exists in the image and is named by a colour or a shape ("there is a
    shape" points at nothing in particular); count claims are about the whole image and pointable unless they
    count zero (a negative statement). Correct: pointable and true."""
    if claim.kind == "unverifiable":
        return ClaimVerdict(claim, False, False)
    if claim.kind == "count":
        if not isinstance(claim.value, int) or claim.value < 1:
            return ClaimVerdict(claim, False, False)
        return ClaimVerdict(claim, True, len(resolve(claim.mention, scene)) == claim.value)
    if _is_generic(claim.mention) or (claim.kind == "relation" and _is_generic(claim.other)):
        return ClaimVerdict(claim, False, False)
    subjects = resolve(claim.mention, scene)
    if claim.kind == "relation":
        objects = resolve(claim.other, scene)
        pointable = bool(subjects) and bool(objects)
        true = any(a is not b and world.relation_holds(a, str(claim.value), b) for a in subjects for b in objects)
        return ClaimVerdict(claim, pointable, pointable and true)
    attribute: Callable[[world.SceneObject], bool] = {
        "exists": lambda o: True,
        "size": lambda o: o.size == claim.value,
        "colour": lambda o: o.colour == claim.value,
        "region": lambda o: o.region == claim.value,
    }[claim.kind]
    return ClaimVerdict(claim, bool(subjects), any(attribute(o) for o in subjects))


def _unique_target(mention: Mention | None, scene: world.SceneGraph) -> tuple[str, str] | None:
    matches = resolve(mention, scene)
    return (matches[0].colour, matches[0].shape) if len(matches) == 1 else None


def entailed_facts(claim: Claim, scene: world.SceneGraph) -> frozenset[tuple]:
    """What a correct claim states, in `scene_facts` form (relations in both directions):
    existence of every object named by colour and shape; size / region of the object its mention identifies
    uniquely; "the circle is red" names the red circle; a relation between two uniquely identified objects;
    the count (counts of one kind of shape are their own facts, outside `scene_facts`)."""
    if claim.kind == "count":
        key = ("count", claim.value) if claim.mention == Mention() else ("count of", claim.mention, claim.value)
        return frozenset([key])
    facts: set[tuple] = set()
    for m in (claim.mention, claim.other):
        if m is not None and m.colour is not None and m.shape is not None and resolve(m, scene):
            facts.add(("object", m.colour, m.shape))
    target = _unique_target(claim.mention, scene)
    if target is not None:
        if claim.kind in ("size", "region"):
            facts.add((claim.kind, *target, claim.value))
        elif claim.kind == "colour":
            facts.add(("object", *target))
        elif claim.kind == "relation":
            other = _unique_target(claim.other, scene)
            if other is not None:
                facts.add(("relation", target, claim.value, other))
                facts.add(("relation", other, _MIRROR[str(claim.value)], target))
    return frozenset(facts)


def unique_claims(parsed: ParsedCaption) -> list[Claim]:
    return list({c.key(): c for c in parsed.claims}.values())


def precision(parsed: ParsedCaption, scene: world.SceneGraph) -> tuple[float, list[ClaimVerdict]]:
    """#correct / #claims over distinct claims, where a correct claim that only restates facts of earlier
    claims ("There is a red circle. The circle is red.", "A left of B. B right of A.") is a duplicate and
    counts in neither: duplicates share one credit, so padding with paraphrases earns nothing."""
    verdicts: list[ClaimVerdict] = []
    stated: set[tuple] = set()
    for claim in unique_claims(parsed):
        verdict = check_claim(claim, scene)
        if verdict.correct:
            facts = entailed_facts(claim, scene)
            if facts and facts <= stated:
                verdict = dataclasses.replace(verdict, duplicate=True)
            stated |= facts
        verdicts.append(verdict)
    counted = [v for v in verdicts if not v.duplicate]
    if not counted:
        return 0.0, verdicts
    return sum(v.correct for v in counted) / len(counted), verdicts


def covered_facts(verdicts: Sequence[ClaimVerdict], scene: world.SceneGraph) -> set[tuple]:
    """The facts stated by the correct claims."""
    return set().union(*(entailed_facts(v.claim, scene) for v in verdicts if v.correct))


def recall(verdicts: Sequence[ClaimVerdict], scene: world.SceneGraph, include_relations: bool = True
           ) -> tuple[float, list[tuple[tuple, bool]]]:
    facts = world.scene_facts(scene, include_relations)
    covered = covered_facts(verdicts, scene)
    marks = [(f, f in covered) for f in facts]
    return sum(ok for _, ok in marks) / len(facts), marks


def linguistic(parsed: ParsedCaption) -> tuple[float, dict[str, Any]]:
    sentences = parsed.sentences
    if not sentences:
        return 0.0, {"reason": "empty caption"}
    per_sentence = sum(s.grammatical * (1 + s.well_formed) / 2 for s in sentences) / len(sentences)
    normalised = [" ".join(s.text.lower().split()) for s in sentences]
    distinct_sentences = len(set(normalised)) / len(normalised)
    keys = [c.key() for c in parsed.claims]
    distinct_claims = len(set(keys)) / len(keys) if keys else 1.0
    non_repetition = distinct_sentences * distinct_claims
    return per_sentence * non_repetition, {
        "sentence_quality": per_sentence,
        "distinct_sentences": distinct_sentences,
        "distinct_claims": distinct_claims,
        "violations": [list(s.violations) for s in sentences],
        "not_well_formed": [s.text for s in sentences if not s.well_formed],
    }


# ----------------------------------------------------------------------------------------------------------
# Multiple-choice answering from the caption alone


def _about(mention: Mention | None, colour: str, shape: str) -> bool:
    return mention is not None and mention.colour == colour and mention.shape == shape


def _first(values: Sequence[Any]) -> Any:
    return values[0] if values else None


def answer_question(parsed: ParsedCaption, query: dict[str, Any]) -> str | None:
    """The choice text the caption implies for a `query` (see `multiple_choice_questions`); None = the caption
    does not say. Reads what the caption claims, true or not, like a text-only reader would."""
    claims = parsed.claims
    kind = query.get("kind")
    if kind == "count":
        return _first([str(c.value) for c in claims if c.kind == "count" and c.mention == Mention()])
    if kind == "colour":
        shape = query.get("shape")
        stated = [c.mention.colour for c in claims if c.mention and c.mention.shape == shape and c.mention.colour]
        stated += [c.value for c in claims if c.kind == "colour" and c.mention and c.mention.shape == shape]
        return _first(stated)
    colour, shape = query.get("colour"), query.get("shape")
    if kind == "size":
        stated = [c.value for c in claims if c.kind == "size" and _about(c.mention, colour, shape)]
        stated += [c.mention.size for c in claims if _about(c.mention, colour, shape) and c.mention.size]
        return _first(stated)
    if kind == "region":
        regions = _regions_of(claims, colour, shape)
        return world.region_phrase(regions[0]) if regions else None
    if kind == "exists":
        if any(_about(c.mention, colour, shape) or _about(c.other, colour, shape) for c in claims):
            return "yes"
        count = answer_question(parsed, {"kind": "count"})
        named = {(m.colour, m.shape) for c in claims for m in (c.mention, c.other)
                 if m is not None and m.colour and m.shape}
        return "no" if count is not None and int(count) == len(named) else None
    if kind == "relation":
        (sc, ss), rel, (oc, os_) = query.get("subject", ("", "")), query.get("relation"), query.get("object", ("", ""))
        for c in claims:
            if c.kind != "relation":
                continue
            forward = _about(c.mention, sc, ss) and _about(c.other, oc, os_)
            backward = _about(c.mention, oc, os_) and _about(c.other, sc, ss)
            said = c.value if forward else _MIRROR.get(str(c.value)) if backward else None
            if said == rel:
                return "yes"
            if said == _MIRROR.get(str(rel)):
                return "no"
        subject_regions, object_regions = _regions_of(claims, sc, ss), _regions_of(claims, oc, os_)
        if subject_regions and object_regions:
            a = _object_at(subject_regions[0])
            b = _object_at(object_regions[0])
            return "yes" if world.relation_holds(a, str(rel), b) else "no"
        return None
    return None


def _regions_of(claims: Sequence[Claim], colour: str, shape: str) -> list[str]:
    return [str(c.value) for c in claims if c.kind == "region" and _about(c.mention, colour, shape)]


def _object_at(region: str) -> world.SceneObject:
    row, col = _REGION_CELLS[region]
    return world.SceneObject("circle", "red", "small", row, col, (0.0, 0.0), 0.0)


def qa_accuracy(parsed: ParsedCaption, questions: Sequence[dict[str, Any]], cannot_answer_credit: float
                ) -> tuple[float, list[dict[str, Any]]]:
    marks = []
    for q in questions:
        answer = answer_question(parsed, q["query"])
        truth = q["choices"][q["answer"]]
        credit = cannot_answer_credit if answer is None else float(answer == truth)
        marks.append({"question": q["question"], "answer": answer, "truth": truth, "credit": credit})
    return sum(m["credit"] for m in marks) / len(marks), marks


# ----------------------------------------------------------------------------------------------------------
# Reward components


def scene_of(item: RewardItem) -> world.SceneGraph:
    """The item's scene graph; raises ValueError naming the missing field."""
    graph = item.metadata.get("scene_graph")
    if graph is None:
        raise ValueError(f"item {item.image_id!r} has no metadata['scene_graph'] (ShapesWorld items carry it)")
    return graph if isinstance(graph, world.SceneGraph) else world.SceneGraph.from_dict(graph)


def _score_each(items: Sequence[RewardItem], fn: Callable[[RewardItem], tuple[float, dict[str, Any]]]
                ) -> list[ComponentScore]:
    scores = []
    for item in items:
        try:
            value, record = fn(item)
        except ValueError as e:  # missing or malformed ground truth: unscorable, never a fake 0
            scores.append(ComponentScore(math.nan, {"error": str(e)}))
            continue
        scores.append(ComponentScore(float(value), record))
    return scores


def _verdict_record(verdicts: Sequence[ClaimVerdict]) -> list[dict[str, Any]]:
    return [{"claim": v.claim.describe(), "pointable": v.pointable, "correct": v.correct, "duplicate": v.duplicate}
            for v in verdicts]


@dataclasses.dataclass(frozen=True)
class ShapesWorldPrecision:
    name: str = "precision"

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]:
        def one(item):
            value, verdicts = precision(parse_caption(item.caption), scene_of(item))
            return value, {"claims": _verdict_record(verdicts)}

        return _score_each(items, one)


@dataclasses.dataclass(frozen=True)
class ShapesWorldRecall:
    name: str = "recall"
    include_relations: bool = True

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]:
        def one(item):
            scene = scene_of(item)
            _, verdicts = precision(parse_caption(item.caption), scene)
            value, marks = recall(verdicts, scene, self.include_relations)
            return value, {"facts": [{"fact": world.fact_to_text(f), "covered": ok} for f, ok in marks]}

        return _score_each(items, one)


LINGUISTIC_SCALES = ("rating", "exact")


@dataclasses.dataclass(frozen=True)
class ShapesWorldLinguistic:
    """scale "rating" (the default): clarity, fluency and coherence rated 1-10 like an LLM judge, mean mapped to
    [0, 1] (`rating.py`); "exact": the continuous `linguistic` score above."""

    name: str = "linguistic"
    scale: str = "rating"

    def __post_init__(self):
        if self.scale not in LINGUISTIC_SCALES:
            raise ValueError(f"ShapesWorldLinguistic.scale={self.scale!r}; allowed: {LINGUISTIC_SCALES}")

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]:
        judge = rated_linguistic if self.scale == "rating" else linguistic
        return _score_each(items, lambda item: judge(parse_caption(item.caption)))


@dataclasses.dataclass(frozen=True)
class ShapesWorldQA:
    """CapRL-style QA utility with the exact offline answerer."""

    name: str = "caprl_qa"
    cannot_answer_credit: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.cannot_answer_credit <= 1.0:
            raise ValueError(f"ShapesWorldQA.cannot_answer_credit must be in [0, 1]; got {self.cannot_answer_credit}")

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]:
        def one(item):
            questions = item.metadata.get("questions")
            if not questions:
                raise ValueError(f"item {item.image_id!r} has no metadata['questions']")
            value, marks = qa_accuracy(parse_caption(item.caption), questions, self.cannot_answer_credit)
            return value, {"questions": marks}

        return _score_each(items, one)


def shapes_world_components(include_relations: bool = True, with_qa: bool = False) -> list[Any]:
    """The judge's components in the paper's order: precision, recall, linguistic (+ QA)."""
    components: list[Any] = [ShapesWorldPrecision(), ShapesWorldRecall(include_relations=include_relations),
                             ShapesWorldLinguistic()]
    if with_qa:
        components.append(ShapesWorldQA())
    return components
