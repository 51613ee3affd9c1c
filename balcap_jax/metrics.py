"""Run metrics: TensorBoard + JSONL writers, console progress with ETA, phase timers, compile counts, samples.

Everything a run logs lands in its workdir:
  <workdir>/metrics.jsonl        one JSON object per `write_scalars` call: {"step", "wall_time", **scalars}
  <workdir>/samples.jsonl        sample captions with their rewards, one object per caption
  <workdir>/tensorboard/         the same scalars and samples as TensorBoard events
Each line is flushed to the OS as it is written, so a killed process loses nothing it logged. Non-finite
values are written as JSON `null` (strict JSON; `nan_count`-style scalars carry the information).
Resuming at step s (`resume_step=s`) drops what a killed run logged after s, from the JSONL files and (with
TensorBoard's `purge_step`) from the event files, so a resumed run's logs read like an uninterrupted one.
Only process 0 writes; other processes get no-op writers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_python(value: Any) -> Any:
    """Scalars (python, numpy, 0-d jax arrays) -> float/int/bool; non-finite floats -> None (JSON null)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(value)
        if value.ndim:
            raise ValueError(f"metric values must be scalars, got an array of shape {value.shape}")
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_jsonl(path: Path, after_step: int) -> int:
    """Drops lines whose "step" > after_step (atomically); returns how many lines were dropped.

    A torn last line (the process died mid-write) is dropped too.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if record.get("step", -1) > after_step:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


class _JsonlFile:
    def __init__(self, path: Path, *, fsync: bool):
        self._file = open(path, "a", encoding="utf-8")
        self._fsync = fsync

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class MetricsWriter:
    """Scalars and sample captions to TensorBoard (tensorboardX) and JSONL in `workdir`.

    fsync=True also survives a machine crash (costs a disk sync per write); flushing alone survives a kill.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        fsync: bool = False,
        enabled: bool | None = None,
    ):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for name in (METRICS_FILE, SAMPLES_FILE):
                truncate_jsonl(self.workdir / name, resume_step)
        self._metrics = _JsonlFile(self.workdir / METRICS_FILE, fsync=fsync)
        self._samples = _JsonlFile(self.workdir / SAMPLES_FILE, fsync=fsync)
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR), purge_step=purge, flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One JSONL line and one TensorBoard scalar per entry (names like "reward/precision_mean")."""
        if not self.enabled:
            return
        values = {name: to_python(value) for name, value in scalars.items()}
        self._metrics.write({"step": int(step), "wall_time": time.time(), **values})
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(name, value, int(step))
                elif value is None:
                    self._tb.add_scalar(name, float("nan"), int(step))
            self._tb.flush()

    def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]], *, tag: str = "samples") -> None:
        """Sample captions: each a mapping such as {"image_id", "caption", "reference", "rewards": {...}}.

        Written one JSONL object per sample (with "step") and as one markdown table in TensorBoard's text tab.
        """
        if not self.enabled or not samples:
            return
        for sample in samples:
            self._samples.write({"step": int(step), **_jsonable(sample)})
        if self._tb is not None:
            self._tb.add_text(tag, samples_markdown(samples), int(step))
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value):
        return [_jsonable(v) for v in np.asarray(value).tolist()]
    return to_python(value)


def samples_markdown(samples: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of samples: one row each, nested reward dicts flattened to columns."""

    def flat(sample: Mapping[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for key, value in sample.items():
            if isinstance(value, Mapping):
                row.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                row[key] = value
        return row

    rows = [flat(s) for s in samples]
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value: Any) -> str:
        value = to_python(value) if not isinstance(value, str) else value
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Summaries of arrays
# ------------------------------------------------------------------------------------------------------------


def reward_component_stats(rewards: np.ndarray, names: Sequence[str], *, prefix: str = "reward") -> dict[str, float]:
    """Per-component mean / std / NaN count of `rewards[P, G, K]` (NaN = unscorable, excluded from mean/std)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 3 or rewards.shape[-1] != len(names):
        raise ValueError(f"rewards must be [P, G, K={len(names)}] for components {list(names)}, got {rewards.shape}")
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        column = rewards[..., k].ravel()
        scored = column[~np.isnan(column)]
        out[f"{prefix}/{name}_mean"] = float(scored.mean()) if scored.size else float("nan")
        out[f"{prefix}/{name}_std"] = float(scored.std()) if scored.size else float("nan")
        out[f"{prefix}/{name}_nan_count"] = int(column.size - scored.size)
    return out


def array_stats(name: str, values: Any, *, mask: Any = None) -> dict[str, float]:
    """mean / std / min / max of `values` where `mask` is True (all entries when no mask)."""
    values = np.asarray(values, dtype=np.float64)
    if mask is not None:
        values = values[np.asarray(mask, dtype=bool)]
    values = values.ravel()
    if not values.size:
        return {f"{name}_{s}": float("nan") for s in ("mean", "std", "min", "max")}
    return {
        f"{name}_mean": float(values.mean()),
        f"{name}_std": float(values.std()),
        f"{name}_min": float(values.min()),
        f"{name}_max": float(values.max()),
    }


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------


class PhaseTimer:
    """Wall time per named phase (sample / reward / update ...), accumulated until `summary()`.

    JAX dispatch is asynchronous: end a device phase with `jax.block_until_ready(result)` inside the `with`,
    or use `timer.run(name, fn, *args)`, which does so.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._totals: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self._totals[name] += self._clock() - start
            self._counts[name] += 1

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.phase(name):
            return jax.block_until_ready(fn(*args, **kwargs))

    def summary(self, *, reset: bool = True, prefix: str = "time") -> dict[str, float]:
        """{"time/<phase>_s": seconds, ..., "time/total_s": sum} since the last reset."""
        out = {f"{prefix}/{name}_s": total for name, total in self._totals.items()}
        out[f"{prefix}/total_s"] = sum(self._totals.values())
        if reset:
            self._totals.clear()
            self._counts.clear()
        return out


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) per function name, via jax.monitoring.

    A rising count after warm-up means shapes are not bucketed well (each new shape recompiles).
    """

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.counts: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self._registered = False

    def _listener(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == self.EVENT:
            name = str(kwargs.get("fun_name", "?"))
            if name.startswith("jit(") and name.endswith(")"):
                name = name[4:-1]
            self.counts[name] += 1
            self.seconds[name] += duration

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        self._registered = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._registered:
            jax.monitoring.unregister_event_duration_listener(self._listener)
            self._registered = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self, prefix: str = "compile") -> dict[str, float]:
        return {f"{prefix}/count": self.total, f"{prefix}/seconds": sum(self.seconds.values())}


# ------------------------------------------------------------------------------------------------------------
# Console progress
# ------------------------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'; unknown -> '?'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_line(
    step: int,
    total: int,
    *,
    seconds_per_step: float,
    metrics: Mapping[str, Any] | None = None,
    width: int = 20,
) -> str:
    """'step 40/100 [########............]  40% 1.50 s/step ETA 1m30s | loss=0.12 reward=0.5'."""
    fraction = min(max(step / total, 0.0), 1.0) if total > 0 else 1.0
    filled = int(round(fraction * width))
    eta = (total - step) * seconds_per_step
    rate = f"{seconds_per_step:.2f} s/step" if math.isfinite(seconds_per_step) else "? s/step"
    line = f"step {step}/{total} [{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} {rate} ETA {format_duration(eta)}"
    if metrics:
        shown = []
        for name, value in metrics.items():
            value = to_python(value)
            shown.append(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")
        line += " | " + " ".join(shown)
    return line


class ConsoleProgress:
    """Prints a progress line with an ETA every `every` steps (rewrites one line on a terminal).

    The rate is measured from the first reported step on, so the first step's compile time does not
    inflate the ETA.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        every: int = 1,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool | None = None,
    ):
        self.total = total_steps
        self.every = max(1, every)
        self.stream = stream or sys.stderr
        self._clock = clock
        self._first: tuple[int, float] | None = None
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def seconds_per_step(self, step: int) -> float:
        if self._first is None or step <= self._first[0]:
            return float("nan")
        first_step, first_time = self._first
        return (self._clock() - first_time) / (step - first_step)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> str | None:
        if self._first is None:
            self._first = (step, self._clock())
        if not self.enabled or (step % self.every and step != self.total):
            return None
        line = progress_line(step, self.total, seconds_per_step=self.seconds_per_step(step), metrics=metrics)
        end = "\n" if not self._tty or step >= self.total else ""
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()
        return line
