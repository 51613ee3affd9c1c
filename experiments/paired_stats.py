"""Paired statistics for ablations over seeds: per-seed differences, a bootstrap 95 % CI of their mean, a verdict.

Two variants run on the same seeds share their warm start and data order, so seed-to-seed variation cancels in
the per-seed difference d_s = a_s - b_s; the comparison is about mean(d). Its 95 % interval is the percentile
bootstrap (resampling seeds with replacement, a fixed generator so reports are reproducible). The verdict is
"tie" unless the interval excludes 0, and "too few seeds" below `MIN_SEEDS` (a bootstrap over 2-4 values is
not an interval worth reading).

    comparison = compare({0: .61, 1: .58, ...}, {0: .55, 1: .57, ...})
    comparison.verdict("c-GDPO", "GRPO")            # "c-GDPO higher" | "GRPO higher" | "tie" | "too few seeds"
    claim_outcome(comparison, expected_sign=+1)     # "reproduced" | "not reproduced" | "reversed"
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

MIN_SEEDS = 5
CONFIDENCE = 0.95
RESAMPLES = 10_000


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    """{seed: a[seed] - b[seed]} over the seeds both have, dropping seeds where either value is NaN."""
    out = {}
    for seed in sorted(set(a) & set(b)):
        diff = float(a[seed]) - float(b[seed])
        if not math.isnan(diff):
            out[seed] = diff
    return out


def bootstrap_ci(values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (float[n], n >= 1): resample n values with
    replacement `resamples` times. Returns (low, high); (nan, nan) for no values."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 for a usable percentile interval; got {resamples}")
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """mean of the per-seed differences a - b, its bootstrap CI, and the differences by seed."""

    differences: Mapping[int, float]
    mean: float
    ci_low: float
    ci_high: float
    min_seeds: int = MIN_SEEDS

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def enough_seeds(self) -> bool:
        return self.n >= self.min_seeds

    @property
    def sign(self) -> int:
        """+1 if the CI lies above 0, -1 if below, 0 if it contains 0 or there are too few seeds."""
        if not self.enough_seeds:
            return 0
        return 1 if self.ci_low > 0 else -1 if self.ci_high < 0 else 0

    def verdict(self, name_a: str, name_b: str) -> str:
        if not self.enough_seeds:
            return "too few seeds"
        return {1: f"{name_a} higher", -1: f"{name_b} higher", 0: "tie"}[self.sign]

    def sentence(self, name_a: str, name_b: str, metric: str) -> str:
        """A table-ready line: '- a − b (metric): +0.031 [95 % CI +0.012, +0.050], 5 seeds (paired): a higher.'"""
        if self.n == 0:
            return f"- {name_a} − {name_b} ({metric}): no seed with both runs finished."
        return (f"- {name_a} − {name_b} ({metric}): {self.mean:+.3f} [95 % CI {self.ci_low:+.3f}, "
                f"{self.ci_high:+.3f}], {self.n} seed{'s' if self.n != 1 else ''} (paired): "
                f"{self.verdict(name_a, name_b)}.")


def compare(a: Mapping[int, float], b: Mapping[int, float], *, min_seeds: int = MIN_SEEDS,
            resamples: int = RESAMPLES, seed: int = 0) -> PairedComparison:
    """The paired comparison of a against b (per-seed metric values)."""
    diffs = paired_differences(a, b)
    values = list(diffs.values())
    mean = float(np.mean(values)) if values else math.nan
    low, high = bootstrap_ci(values, resamples=resamples, seed=seed)
    return PairedComparison(diffs, mean, low, high, min_seeds)


def claim_outcome(comparison: PairedComparison, expected_sign: int) -> str:
    """What a paper claim "a beats b" (expected_sign +1) or "a is below b" (-1) comes to on this testbed:
    'reproduced' when the CI excludes 0 on the claimed side, 'reversed' when on the other, else 'not reproduced'
    (a tie, or too few seeds)."""
    if expected_sign not in (1, -1):
        raise ValueError(f"expected_sign must be +1 or -1; got {expected_sign}")
    if comparison.sign == expected_sign:
        return "reproduced"
    return "reversed" if comparison.sign == -expected_sign else "not reproduced"
