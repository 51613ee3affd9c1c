"""The reward manager: K components over a P x G batch of captions -> `rewards[P, G, K]` plus metrics.

All judge calls of a batch are in flight together: the K components run concurrently, and each runs its items
concurrently (the judge backends bound the actual concurrency). NaN marks an unscorable component of a sample.

Overlap with the accelerator: `submit` schedules a batch on the manager's own event loop (a daemon thread) and
returns a `concurrent.futures.Future` at once, so the training loop can sample the next batch while this one is
being judged:

    with RewardManager([precision, recall, linguistic]) as manager:
        pending = manager.submit(items)          # items: P lists of G RewardItems
        next_batch = sample(...)                  # accelerator busy meanwhile
        rewards = pending.result().rewards        # float32[P, G, K]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import threading
import time
from typing import Mapping, Sequence

import numpy as np

from balcap_jax.rewards.types import ComponentScore, RewardComponent, RewardItem


@dataclasses.dataclass(frozen=True)
class ComponentMetrics:
    """Over the scored (non-NaN) samples: mean, std (population); nan_count: unscorable samples; errors: failed
    judge calls; latency_s: wall time of the component on this batch; judge_calls / cache_hits: from records."""

    mean: float
    std: float
    nan_count: int
    errors: int
    latency_s: float
    judge_calls: int
    cache_hits: int


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """rewards: float32[P, G, K] (NaN = unscorable); scores[k][n]: the ComponentScore of component k, sample n
    (row-major over P, G); metrics: per component name; latency_s: wall time of the whole batch."""

    rewards: np.ndarray
    component_names: tuple[str, ...]
    scores: tuple[tuple[ComponentScore, ...], ...]
    metrics: Mapping[str, ComponentMetrics]
    latency_s: float

    def scalars(self, prefix: str = "rewards") -> dict[str, float]:
        """Flat {"rewards/precision/mean": ..., ...} for metric writers."""
        out = {f"{prefix}/latency_s": self.latency_s}
        for name, metrics in self.metrics.items():
            for field in dataclasses.fields(metrics):
                out[f"{prefix}/{name}/{field.name}"] = float(getattr(metrics, field.name))
        return out


def _check_scores(name: str, scores: Sequence[ComponentScore], expected: int) -> None:
    if len(scores) != expected:
        raise ValueError(f"reward component {name!r} returned {len(scores)} scores for {expected} items")
    for index, score in enumerate(scores):
        if not isinstance(score, ComponentScore):
            raise TypeError(
                f"reward component {name!r} item {index}: expected ComponentScore, got {type(score).__name__}"
            )
        if not (math.isnan(score.value) or 0.0 <= score.value <= 1.0):
            raise ValueError(
                f"reward component {name!r} item {index}: value {score.value} is outside [0, 1] and not NaN"
            )


def component_metrics(scores: Sequence[ComponentScore], latency_s: float) -> ComponentMetrics:
    values = np.array([s.value for s in scores], dtype=np.float64)
    scored = values[~np.isnan(values)]
    return ComponentMetrics(
        mean=float(scored.mean()) if scored.size else math.nan,
        std=float(scored.std()) if scored.size else math.nan,
        nan_count=int(values.size - scored.size),
        errors=sum(s.errors for s in scores),
        latency_s=latency_s,
        judge_calls=sum(int(s.record.get("judge_calls", 0)) for s in scores),
        cache_hits=sum(int(s.record.get("cache_hits", 0)) for s in scores),
    )


def flatten_groups(items: Sequence[Sequence[RewardItem]]) -> tuple[list[RewardItem], int, int]:
    """(row-major flat items, P, G) of P groups of G items each; ValueError on ragged or empty input."""
    if not items or not all(len(group) for group in items):
        raise ValueError("reward batch is empty; pass P >= 1 groups of G >= 1 RewardItems")
    group_size = len(items[0])
    for p, group in enumerate(items):
        if len(group) != group_size:
            raise ValueError(f"reward batch is ragged: group 0 has {group_size} items, group {p} has {len(group)}")
    return [item for group in items for item in group], len(items), group_size


class RewardManager:
    """Runs `components` (distinct names) on batches; `score` in an event loop, `submit` from any thread."""

    def __init__(self, components: Sequence[RewardComponent]):
        names = [c.name for c in components]
        if not components:
            raise ValueError("RewardManager needs at least one reward component")
        if len(set(names)) != len(names):
            raise ValueError(f"reward component names must be distinct, got {names}")
        self.components = tuple(components)
        self.component_names = tuple(names)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def _timed(self, component: RewardComponent, items: list[RewardItem]) -> tuple[list[ComponentScore], float]:
        start = time.perf_counter()
        scores = list(await component.score(items))
        return scores, time.perf_counter() - start

    async def score(self, items: Sequence[Sequence[RewardItem]]) -> RewardBatch:
        """Score P groups of G items with every component concurrently."""
        flat, num_prompts, group_size = flatten_groups(items)
        start = time.perf_counter()
        results = await asyncio.gather(*(self._timed(c, flat) for c in self.components))
        rewards = np.empty((len(flat), len(self.components)), np.float32)
        metrics = {}
        for k, (name, (scores, latency)) in enumerate(zip(self.component_names, results)):
            _check_scores(name, scores, len(flat))
            rewards[:, k] = [s.value for s in scores]
            metrics[name] = component_metrics(scores, latency)
        return RewardBatch(
            rewards=rewards.reshape(num_prompts, group_size, len(self.components)),
            component_names=self.component_names,
            scores=tuple(tuple(scores) for scores, _ in results),
            metrics=metrics,
            latency_s=time.perf_counter() - start,
        )

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="reward-manager", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def submit(self, items: Sequence[Sequence[RewardItem]]) -> concurrent.futures.Future:
        """Start scoring on the background event loop; returns a Future of the RewardBatch immediately."""
        flatten_groups(items)  # fail fast, in the caller's thread, on a malformed batch
        return asyncio.run_coroutine_threadsafe(self.score(items), self._background_loop())

    def score_sync(self, items: Sequence[Sequence[RewardItem]]) -> RewardBatch:
        """Blocking `score` (runs on the background loop, so it works inside and outside other event loops)."""
        return self.submit(items).result()

    def close(self) -> None:
        """Stop the background loop (pending batches are cancelled)."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return

        async def cancel_pending() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_pending(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()

    def __enter__(self) -> "RewardManager":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
