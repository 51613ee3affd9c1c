"""Per-item evaluation results on disk: an append-only JSONL file, one line per finished item, flushed at once.

An evaluation that judges thousands of captions must survive a kill at any moment and never pay twice for an
item it already judged. Each finished item is appended as one line `{"key": ..., "item_id": ..., "result": ...}`
and flushed to the kernel immediately, so `kill -9` loses at most the items still in flight. On re-open the file
is read back; a last line cut short by the kill (no trailing newline, or not JSON) is dropped and the file is
truncated to the last complete line before anything new is appended.

`key` fingerprints everything the result depends on (protocol, item, caption, judge models, prompt versions,
seeds: see `item_key`), so a re-run with another checkpoint or judge never reuses a stale result: its keys differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any, Iterator, Mapping


def item_key(**fields: Any) -> str:
    """A stable hex digest of JSON-serialisable `fields` (order-independent)."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def _complete_lines(path: str) -> tuple[list[dict[str, Any]], int]:
    """(parsed rows of every complete line, byte length of the valid prefix). A final line without newline or
    that is not a JSON object ends the valid prefix (a write cut by a kill)."""
    rows: list[dict[str, Any]] = []
    valid = 0
    with open(path, "rb") as handle:
        data = handle.read()
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:
            break
        line = data[offset:end]
        offset = end + 1
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(row, dict) or "key" not in row:
                break
            rows.append(row)
        valid = offset
    return rows, valid


class ResultsStore:
    """Finished items of one protocol: `get(key)`, `put(key, item_id, result)`, thread-safe, append-only.

    with ResultsStore(out_dir / "dcscore.items.jsonl") as store:
        if (cached := store.get(key)) is None:
            store.put(key, item_id, await judge_item(...))
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        self._rows: dict[str, dict[str, Any]] = {}
        if os.path.exists(self.path):
            rows, valid = _complete_lines(self.path)
            if valid < os.path.getsize(self.path):
                with open(self.path, "r+b") as handle:
                    handle.truncate(valid)
            for row in rows:
                self._rows[row["key"]] = row  # a key written twice (two racing runs): the last one wins
        self.resumed = len(self._rows)
        self._lock = threading.Lock()
        self._handle = open(self.path, "a", encoding="utf-8")

    def get(self, key: str) -> Any | None:
        row = self._rows.get(key)
        return None if row is None else row["result"]

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def put(self, key: str, item_id: str, result: Mapping[str, Any] | Any) -> None:
        row = {"key": key, "item_id": item_id, "result": result}
        line = json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n"
        with self._lock:
            self._handle.write(line)
            self._handle.flush()
            self._rows[key] = json.loads(line)  # what a re-run will read back (tuples -> lists, etc.)

    def rows(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._rows.values()))

    def close(self) -> None:
        with self._lock:
            if not self._handle.closed:
                self._handle.close()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
