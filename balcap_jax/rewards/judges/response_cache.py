"""An on-disk cache of judge replies, keyed by everything that determines the reply.

Re-scoring the same captions (a resumed run, evaluation after training, debugging a reward) must not pay for the
same judge calls twice. The key is a SHA-256 over a canonical JSON of (backend kind, model, request payload):
messages with their images, sampling parameters, seed. SQLite in WAL mode gives atomic writes and safe
concurrent use by several processes (e.g. training and an evaluation job sharing one cache file).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    created REAL NOT NULL DEFAULT (julianday('now'))
)
"""


def cache_key(model: str, payload: Any) -> str:
    """A stable hex digest of (model, payload); payload must be JSON-serialisable (bytes go in as base64)."""
    canonical = json.dumps(
        {"model": model, "payload": payload}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """get/put of reply texts by key, thread-safe; `hits`/`misses` count lookups since construction."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(path, check_same_thread=False, timeout=30.0, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.execute(_SCHEMA)
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._connection.execute("SELECT text FROM replies WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return row[0]

    def put(self, key: str, model: str, text: str) -> None:
        with self._lock:
            self._connection.execute(
                "INSERT OR REPLACE INTO replies (key, model, text) VALUES (?, ?, ?)", (key, model, text)
            )

    def __len__(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __repr__(self) -> str:
        return f"ResponseCache({self.path!r}, hits={self.hits}, misses={self.misses})"
