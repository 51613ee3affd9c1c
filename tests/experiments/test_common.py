"""experiments/common.py: interleaved timing, spreads, paired ratios, tables, the RSS probe, photographs."""

import numpy as np
import pytest

from experiments import common


def test_interleaved_alternates_sides_and_discards_warmup_rounds():
    calls, ticks = [], iter(range(1000))
    sides = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = common.interleaved(sides, runs=3, warmup=2, clock=lambda: next(ticks) ** 2)
    assert calls == ["a", "b"] * 5
    # call k spans clock readings 2k and 2k+1: (2k+1)^2 - (2k)^2 = 4k + 1; the first 4 calls are warm-up
    assert times == {"a": [17.0, 25.0, 33.0], "b": [21.0, 29.0, 37.0]}


def test_interleaved_rejects_empty_or_negative_settings():
    with pytest.raises(ValueError, match="runs"):
        common.interleaved({"a": lambda: None}, runs=0)
    with pytest.raises(ValueError, match="sides"):
        common.interleaved({}, runs=1)


def test_matmul_rates_time_each_call_of_the_given_shape():
    """One finite, positive FLOP/s per timed call (the compiling call is not among them)."""
    rates = common.matmul_rates(64, 32, 48, np.float32, runs=3)
    assert len(rates) == 3 and all(np.isfinite(r) and r > 0 for r in rates)


def test_spread_and_paired_ratios():
    spread = common.Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (spread.median, spread.low, spread.high, spread.count) == (2.5, 1.0, 10.0, 4)
    assert spread.format(1, "s") == "2.5 s (1.0-10.0)"
    ratios = common.paired_ratios([10.0, 30.0, 8.0], [2.0, 3.0, 4.0])  # 5, 10, 2
    assert (ratios.median, ratios.low, ratios.high) == (5.0, 2.0, 10.0)
    with pytest.raises(ValueError, match="NaN"):
        common.Spread.of([1.0, float("nan")])
    with pytest.raises(ValueError, match="equally many"):
        common.paired_ratios([1.0], [1.0, 2.0])


def test_markdown_table_aligns_numeric_columns_and_checks_widths():
    table = common.markdown_table(["name", "s"], [["ours", 1.5], ["hf", 3]], [False, True])
    assert table.splitlines() == ["| name | s |", "| --- | ---: |", "| ours | 1.5 |", "| hf | 3 |"]
    with pytest.raises(ValueError, match="2 cells"):
        common.markdown_table(["name", "s"], [["only one"]])


def test_peak_rss_sees_an_allocation():
    with common.PeakRSS() as peak:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert peak.growth_mib >= 48


def test_photographs_are_real_rgb_images():
    photos = common.photograph_arrays(9)
    assert len(photos) == 9 and all(p.ndim == 3 and p.shape[-1] == 3 and p.dtype == np.uint8 for p in photos)
    np.testing.assert_array_equal(photos[0], photos[8])  # cycles through the samples
    assert photos[0].std() > 10  # a photograph, not a constant
    with pytest.raises(ValueError, match="count"):
        common.photograph_arrays(0)


def test_command_line_names_the_module():
    assert common.command_line("bench_sampling", ["--runs", "5"]) == "python -m experiments.bench_sampling --runs 5"
