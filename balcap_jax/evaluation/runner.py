"""Runs one protocol over (item, caption) pairs: cached results first, the rest judged concurrently and appended
to the protocol's `ResultsStore` the moment each finishes, then the pure aggregate.

A result whose record lists judge `failures` (judge unavailable, unusable answers after every re-ask) counts as
unscored in this run's aggregate but is not stored, so the next run asks again instead of caching an outage.

A protocol is any object with `name`, `items` (each with an `image_id`), `item_key(item, caption)`,
`async judge_item(item, caption) -> JSON-able dict` and `aggregate(results) -> dict` (see dcscore.py,
captionqa.py, caparena.py, shapes_world_eval.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Mapping, Protocol, Sequence

from balcap_jax.evaluation.results_store import ResultsStore


class EvalProtocol(Protocol):
    name: str
    items: Sequence[Any]

    def item_key(self, item: Any, caption: str) -> str: ...

    async def judge_item(self, item: Any, caption: str) -> dict[str, Any]: ...

    def aggregate(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class ProtocolRun:
    """metrics: the protocol's aggregate; results: per item, in item order; resumed: items read from the store;
    judged: items judged by this run; not_stored: judged items with judge failures, left for the next run to retry;
    missing_captions: items skipped because no caption was given for them."""

    name: str
    metrics: dict[str, Any]
    results: list[dict[str, Any]]
    resumed: int
    judged: int
    not_stored: int
    missing_captions: list[str]
    seconds: float


def missing_captions(protocol: EvalProtocol, captions: Mapping[str, str]) -> list[str]:
    return [item.image_id for item in protocol.items if item.image_id not in captions]


async def run_protocol(
    protocol: EvalProtocol, captions: Mapping[str, str], store: ResultsStore, *, max_items_in_flight: int = 16
) -> ProtocolRun:
    """Judges every item that has a caption and no stored result; `max_items_in_flight` bounds concurrent items
    (judge backends bound their own request concurrency as well)."""
    if max_items_in_flight < 1:
        raise ValueError(f"max_items_in_flight must be >= 1, got {max_items_in_flight}")
    start = time.perf_counter()
    todo = [(item, captions[item.image_id]) for item in protocol.items if item.image_id in captions]
    keys = [protocol.item_key(item, caption) for item, caption in todo]
    pending = [(key, item, caption) for key, (item, caption) in zip(keys, todo) if key not in store]
    limit = asyncio.Semaphore(max_items_in_flight)
    unstored: dict[str, dict[str, Any]] = {}

    async def one(key: str, item: Any, caption: str) -> None:
        async with limit:
            result = {"image_id": item.image_id, "caption": caption} | await protocol.judge_item(item, caption)
        if result.get("failures"):
            unstored[key] = result
        else:
            store.put(key, item.image_id, result)

    await asyncio.gather(*(one(*job) for job in pending))
    results = [unstored[key] if key in unstored else store.get(key) for key in keys]
    return ProtocolRun(
        name=protocol.name,
        metrics=protocol.aggregate(results),
        results=results,
        resumed=len(todo) - len(pending),
        judged=len(pending),
        not_stored=len(unstored),
        missing_captions=missing_captions(protocol, captions),
        seconds=time.perf_counter() - start,
    )
