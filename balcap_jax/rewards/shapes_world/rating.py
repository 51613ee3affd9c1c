"""ShapesWorld's linguistic judge as an LLM rater would answer: clarity, fluency and coherence, each an integer
rating on 1-10, their mean mapped to [0, 1] (docs/METHOD.md: "an LLM judge rates clarity, fluency and coherence; r_L is
their mean, scaled to [0, 1]").

What each rating measures, from the grammar's sentence reports and the caption's claims:
  fluency    the share of sentences that are grammatical (rules G1-G6 of `shapes_world_grammar`);
  clarity    the share of well-formed sentences (capital, end mark, 3-40 words) times the share of claims that
             say something checkable (an unknown word, a negation or a fragment is an unclear clause);
  coherence  non-repetition: distinct sentences / sentences times distinct claims / claims (0 with no claim).
A share s in [0, 1] becomes the rating 1 + round(9 s): like an LLM judge, the scale is coarse (ten values), a
caption that is wholly bad on an axis still gets the lowest rating 1, and small flaws can round away. The mapped
score is (mean rating - 1) / 9, so a caption rated 10 on all three scores 1 and one rated 1 on all three scores 0.
An empty caption is rated 1 on every axis.
"""

from __future__ import annotations

from typing import Any

from balcap_jax.data.shapes_world_grammar import ParsedCaption

RATING_MIN, RATING_MAX = 1, 10
AXES = ("clarity", "fluency", "coherence")


def to_rating(share: float) -> int:
    """A share in [0, 1] on the judge's integer scale 1..10; raises ValueError outside [0, 1]."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"a rating share must be in [0, 1]; got {share}")
    return RATING_MIN + int(round((RATING_MAX - RATING_MIN) * share))


def from_ratings(ratings: dict[str, int]) -> float:
    """The mean of the AXES ratings mapped from [1, 10] to [0, 1]."""
    mean = sum(ratings[axis] for axis in AXES) / len(AXES)
    return (mean - RATING_MIN) / (RATING_MAX - RATING_MIN)


def linguistic_ratings(parsed: ParsedCaption) -> dict[str, int]:
    """{clarity, fluency, coherence} -> rating in 1..10 for one parsed caption (see the module docstring)."""
    sentences = parsed.sentences
    if not sentences:
        return {axis: RATING_MIN for axis in AXES}
    claims = parsed.claims
    grammatical = sum(s.grammatical for s in sentences) / len(sentences)
    well_formed = sum(s.well_formed for s in sentences) / len(sentences)
    checkable = sum(c.kind != "unverifiable" for c in claims) / len(claims) if claims else 0.0
    distinct_sentences = len({" ".join(s.text.lower().split()) for s in sentences}) / len(sentences)
    keys = [c.key() for c in claims]
    distinct_claims = len(set(keys)) / len(keys) if keys else 0.0  # saying nothing is not coherent
    return {
        "clarity": to_rating(well_formed * checkable),
        "fluency": to_rating(grammatical),
        "coherence": to_rating(distinct_sentences * distinct_claims),
    }


def rated_linguistic(parsed: ParsedCaption) -> tuple[float, dict[str, Any]]:
    """(score in [0, 1], record with the three ratings)."""
    ratings = linguistic_ratings(parsed)
    return from_ratings(ratings), {"ratings": ratings, "scale": f"{RATING_MIN}-{RATING_MAX}"}
