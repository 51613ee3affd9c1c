"""experiments/paired_stats.py on synthetic per-seed results: paired differences, bootstrap CIs, verdicts."""

import math
from pathlib import Path

import numpy as np
import pytest

from tests.experiments.script_module import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "paired_stats.py"


@pytest.fixture(scope="module")
def ps():
    with script_module(SCRIPT, "paired_stats_script") as module:
        yield module


def _seeds(values):
    return {s: float(v) for s, v in enumerate(values)}


def test_differences_are_per_shared_seed_and_skip_nan(ps):
    a = {0: 0.5, 1: 0.7, 2: math.nan, 3: 0.9, 9: 1.0}
    b = {0: 0.4, 1: 0.5, 2: 0.1, 3: 0.9}
    assert ps.paired_differences(a, b) == pytest.approx({0: 0.1, 1: 0.2, 3: 0.0})


def test_pairing_removes_the_shared_seed_effect(ps):
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 0.2, size=8)  # large between seeds, identical for both variants
    a = _seeds(0.5 + seed_effect + 0.05 + rng.normal(0, 0.005, 8))
    b = _seeds(0.5 + seed_effect)
    comparison = ps.compare(a, b)
    assert comparison.ci_low > 0.03 and comparison.ci_high < 0.07
    assert comparison.verdict("A", "B") == "A higher" and ps.claim_outcome(comparison, +1) == "reproduced"
    assert ps.claim_outcome(comparison, -1) == "reversed"


def test_no_true_difference_is_a_tie(ps):
    rng = np.random.default_rng(1)
    ties = 0
    for trial in range(40):
        noise = rng.normal(0, 0.05, size=(2, 6))
        ties += ps.compare(_seeds(noise[0]), _seeds(noise[1]), resamples=2000, seed=trial).sign == 0
    # a 95 % interval excludes the true 0 about 5 % of the time (the percentile bootstrap on 6 values a bit more)
    assert ties >= 32


def test_a_negative_shift_favours_b(ps):
    comparison = ps.compare(_seeds([0.1, 0.12, 0.11, 0.09, 0.1]), _seeds([0.3, 0.31, 0.29, 0.3, 0.32]))
    assert comparison.sign == -1 and comparison.verdict("A", "B") == "B higher"
    assert ps.claim_outcome(comparison, +1) == "reversed"


def test_fewer_than_five_seeds_is_never_a_verdict(ps):
    comparison = ps.compare(_seeds([1.0, 1.0, 1.0, 1.0]), _seeds([0.0, 0.0, 0.0, 0.0]))
    assert comparison.n == 4 and comparison.verdict("A", "B") == "too few seeds"
    assert ps.claim_outcome(comparison, +1) == "not reproduced"


def test_bootstrap_interval_matches_the_normal_approximation_for_many_seeds(ps):
    x = np.random.default_rng(2).normal(0.3, 0.1, size=400)
    low, high = ps.bootstrap_ci(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.003) and high == pytest.approx(x.mean() + half, abs=0.003)


def test_bootstrap_is_deterministic_and_checks_its_arguments(ps):
    x = [0.1, 0.3, 0.2, 0.5, 0.4]
    assert ps.bootstrap_ci(x, seed=3) == ps.bootstrap_ci(x, seed=3)
    assert all(math.isnan(v) for v in ps.bootstrap_ci([]))
    with pytest.raises(ValueError, match="confidence"):
        ps.bootstrap_ci(x, confidence=1.5)
    with pytest.raises(ValueError, match="resamples"):
        ps.bootstrap_ci(x, resamples=10)
    with pytest.raises(ValueError, match="expected_sign"):
        ps.claim_outcome(ps.compare(_seeds(x), _seeds(x)), 0)


def test_sentence_reports_mean_ci_seeds_and_verdict(ps):
    comparison = ps.compare(_seeds([0.2, 0.21, 0.19, 0.2, 0.22]), _seeds([0.1] * 5))
    line = comparison.sentence("c-GDPO", "GRPO", "total")
    assert line.startswith("- c-GDPO − GRPO (total): +0.104 [95 % CI +0.")
    assert line.endswith("5 seeds (paired): c-GDPO higher.")
    assert "no seed" in ps.compare({}, {}).sentence("a", "b", "total")
