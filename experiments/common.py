"""What the benchmarks share: real photographs, the peak-RSS probe, interleaved timing, spreads, markdown tables.

A race is only fair when both sides see the same machine: `interleaved` runs them A B A B ... so load from other
processes lands on both, and every figure is reported as the median with its min-max (`Spread`) over the
measured rounds, never a single run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# scikit-image's sample photographs (shipped inside its wheel: no download), cycled over prompts.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry")


# -- inputs ------------------------------------------------------------------------------------------------------


def photograph_arrays(count: int) -> list[np.ndarray]:
    """`count` real photographs, uint8[H, W, 3] each (grey ones stacked to RGB), cycling through PHOTOS."""
    import skimage.data

    if count < 1:
        raise ValueError(f"count={count} photographs: ask for at least 1")
    out = []
    for i in range(count):
        array = np.asarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])())
        out.append((np.stack([array] * 3, -1) if array.ndim == 2 else array[..., :3]).astype(np.uint8))
    return out


# -- memory ------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class PeakRSS:
    """Peak resident-set growth (MiB) of this process between `start()` and `stop()` (or over a `with` block):
    Linux VmHWM, reset through /proc/self/clear_refs after trimming the allocator; NaN where that is unavailable."""

    growth_mib: float = float("nan")

    def start(self) -> "PeakRSS":
        self.growth_mib = float("nan")
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed-but-held pages would hide this block's own growth
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._before: int | None = _status_kib("VmRSS")
        except (OSError, AttributeError):
            self._before = None
        return self

    def stop(self) -> float:
        if self._before is not None:
            self.growth_mib = (_status_kib("VmHWM") - self._before) / 1024
        return self.growth_mib

    def __enter__(self) -> "PeakRSS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- timing ------------------------------------------------------------------------------------------------------


def interleaved(sides: Mapping[str, Callable[[], Any]], runs: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each side's `runs` measured calls, the sides called in turn (A B A B ...), after `warmup`
    rounds that are run the same way and discarded. Each call must block until its work is done."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs={runs}, warmup={warmup}: give runs >= 1 and warmup >= 0")
    if not sides:
        raise ValueError("sides is empty: give at least one {name: callable}")
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(warmup + runs):
        for name, fn in sides.items():
            start = clock()
            fn()
            elapsed = clock() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def matmul_rates(rows: int, inner: int, outer: int, dtype: Any, runs: int) -> list[float]:
    """FLOP/s of `runs` timed [rows x inner] x [inner x outer] matmuls in `dtype` on the default device, after
    one untimed (compiling) call: this machine's matmul rate, for rooflines and ceilings."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((rows, inner), dtype), jnp.ones((inner, outer), dtype)
    product = jax.jit(lambda a, b: a @ b)
    call = lambda: product(a, b).block_until_ready()  # noqa: E731
    call()
    return [2 * rows * inner * outer / t for t in interleaved({"matmul": call}, runs, warmup=0)["matmul"]]


@dataclasses.dataclass(frozen=True)
class Spread:
    """Median and range of a set of measurements."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        values = [float(v) for v in values]
        if not values or any(math.isnan(v) for v in values):
            raise ValueError(f"Spread.of({values}): needs at least one measurement and no NaN")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def format(self, digits: int = 3, unit: str = "") -> str:
        """'1.23 (1.10-1.40)' plus the unit: the median, then min-max."""
        suffix = f" {unit}" if unit else ""
        return f"{self.median:.{digits}f}{suffix} ({self.low:.{digits}f}-{self.high:.{digits}f})"

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """Spread of numerators[i] / denominators[i]: the ratio of each interleaved round (both sides measured
    under the same load), rather than a ratio of two independently noisy medians."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"paired_ratios needs equally many values on both sides, got {len(numerators)} and "
                         f"{len(denominators)}")
    if min(denominators) <= 0:
        raise ValueError(f"paired_ratios: a denominator is {min(denominators)}; times must be positive")
    return Spread.of([n / d for n, d in zip(numerators, denominators)])


# -- reporting ---------------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; `numeric[i]` right-aligns column i."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells (the header's), got {[len(r) for r in rows]}")
    numeric = list(numeric) if numeric is not None else [False] * len(header)
    if len(numeric) != len(header):
        raise ValueError(f"numeric has {len(numeric)} flags for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages (what `uptime` prints); [] where the OS does not say."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How to rerun: `python -m experiments.<module> <argv>` from the repository root."""
    import sys

    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join(["python -m", f"experiments.{module}", *args]).strip()
