"""The judged reward components by name, built over a (text judge, visual judge) pair.

Training, evaluation tooling and the scoring CLI name components the same way; this is the one place that maps
a name to its class and says which judge each one uses.
"""

from __future__ import annotations

from typing import Any, Sequence

from balcap_jax.rewards.caprl_qa import CapRLQAReward
from balcap_jax.rewards.judges.protocol import Judge
from balcap_jax.rewards.linguistic import LinguisticReward
from balcap_jax.rewards.precision import PrecisionReward
from balcap_jax.rewards.recall import RecallReward

COMPONENT_NAMES = ("precision", "recall", "linguistic", "caprl_qa")


def judged_components(names: Sequence[str], text_judge: Judge, visual_judge: Judge) -> list[Any]:
    """One component per name, in order; precision verifies on `visual_judge`, everything else reads text."""
    unknown = [name for name in names if name not in COMPONENT_NAMES]
    if unknown:
        raise ValueError(f"unknown reward components {unknown}; allowed: {COMPONENT_NAMES}")
    factories = {
        "precision": lambda: PrecisionReward(text_judge, visual_judge),
        "recall": lambda: RecallReward(text_judge),
        "linguistic": lambda: LinguisticReward(text_judge),
        "caprl_qa": lambda: CapRLQAReward(text_judge),
    }
    return [factories[name]() for name in names]
