"""Reading the local benchmark files (JSONL, one image per line) with errors that name the file, line and field.

Images are local files, given by a path relative to the benchmark file's folder (or absolute); nothing is ever
downloaded. Each protocol module documents its own line format and validates it with these helpers.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


class BenchmarkFormatError(ValueError):
    """A benchmark file line that does not follow the documented format."""


def read_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every non-empty line; where = "<path>:<line>" for error messages."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file {path!r} does not exist (give a local JSONL file)")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkFormatError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise BenchmarkFormatError(f"{where}: each line must be a JSON object")
            yield where, row


def required_str(row: dict[str, Any], field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkFormatError(f"{where}: {field!r} must be a non-empty string, got {value!r:.60}")
    return value


def image_path(row: dict[str, Any], benchmark_path: str, where: str) -> str:
    """The absolute path of the line's "image" (relative paths are relative to the benchmark file)."""
    relative = required_str(row, "image", where)
    if "://" in relative:
        raise BenchmarkFormatError(f"{where}: 'image' must be a local path, not a URL ({relative!r})")
    folder = os.path.dirname(os.path.abspath(benchmark_path))
    path = relative if os.path.isabs(relative) else os.path.join(folder, relative)
    if not os.path.isfile(path):
        raise BenchmarkFormatError(f"{where}: 'image' file {relative!r} not found (looked at {path})")
    return path


def unique_ids(ids: list[str], path: str) -> None:
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise BenchmarkFormatError(f"{path}: image_id {image_id!r} appears twice; ids must be unique")
        seen.add(image_id)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()
