"""Robust extraction and validation of the JSON a judge was asked to produce.

Judges wrap JSON in code fences, add a sentence before or after it, reorder keys, write `"yes"` for `true` or
`"7"` for `7`. `extract_json` finds the first JSON object (or array) in the text; `validate` checks it against a
small declarative schema and normalises those harmless variations. Everything else raises `JudgeOutputError`,
which callers count as a failed judge call (NaN reward), never as a zero.

Schemas are plain Python values:
  str | bool | int | float   a scalar of that type (bools accept "true"/"yes"/"no"..., numbers accept "7")
  Range(lo, hi)              a number within [lo, hi]
  OneOf("a", "b")            one of these strings (case-insensitive)
  [schema]                   a list whose every element matches `schema`
  {"key": schema, ...}       an object with at least these keys (extra keys ignored, key case ignored)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Iterator

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_TRUE = frozenset({"true", "yes", "y", "1", "correct"})
_FALSE = frozenset({"false", "no", "n", "0", "incorrect"})


class JudgeOutputError(ValueError):
    """The judge's text holds no JSON, or JSON that does not match the expected schema."""


@dataclasses.dataclass(frozen=True)
class Range:
    lo: float
    hi: float


@dataclasses.dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]

    def __init__(self, *choices: str):
        object.__setattr__(self, "choices", tuple(c.lower() for c in choices))


_OPENERS = {"object": "{", "array": "[", "any": "{["}
# Bounds that keep adversarial outputs (thousands of '{') from costing quadratic time.
MAX_TEXT_CHARS = 50_000
MAX_CANDIDATES = 64
MAX_DECODE_ATTEMPTS = 256
# A judge's JSON nests a few levels; a longer run of openers is skipped whole after one failed decode, since
# re-trying from each opener inside it costs the run's depth every time (quadratic under a raised recursion limit).
MAX_OPENER_RUN = 32
_OPENER_RUN = re.compile(r"[\[{\s]*")
# Characters all decode attempts together may read: an unclosed value nested thousands deep ('{"a": ' * 30000)
# is read to its end from every opener, so without this bound the attempts cost depth x length.
MAX_SCANNED_CHARS = 4 * MAX_TEXT_CHARS


def iter_json(text: str, kind: str = "any") -> Iterator[Any]:
    """Every decodable JSON value of `kind` ("object", "array" or "any") in `text`, in order: the contents of
    code fences first, then the raw text. Bounded: the first MAX_TEXT_CHARS characters, at most MAX_CANDIDATES
    values, MAX_DECODE_ATTEMPTS decode attempts and MAX_SCANNED_CHARS characters read by them all."""
    if kind not in _OPENERS:
        raise ValueError(f"kind must be one of {sorted(_OPENERS)}, got {kind!r}")
    if not isinstance(text, str):
        raise JudgeOutputError(f"judge output must be text, got {type(text).__name__}")
    text = text[:MAX_TEXT_CHARS]
    decoder = json.JSONDecoder()
    openers = _OPENERS[kind]
    yielded = attempts = scanned = 0
    for chunk in [match.group(1) for match in _FENCE.finditer(text)] + [text]:
        index = 0
        while yielded < MAX_CANDIDATES and attempts < MAX_DECODE_ATTEMPTS and scanned < MAX_SCANNED_CHARS:
            positions = [p for p in (chunk.find(o, index) for o in openers) if p >= 0]
            if not positions:
                break
            start = min(positions)
            attempts += 1
            try:
                value, end = decoder.raw_decode(chunk, start)
            except (json.JSONDecodeError, RecursionError) as error:
                # How far the decoder read before failing (a RecursionError says not: count the rest of the text).
                scanned += max(getattr(error, "pos", len(chunk)) - start, 1)
                run = _OPENER_RUN.match(chunk, start).end() - start
                index = start + (run if run > MAX_OPENER_RUN else 1)
                continue
            scanned += end - start
            if isinstance(value, (dict, list)):
                yielded += 1
                yield value
            index = end


def extract_json(text: str, *, kind: str = "object") -> Any:
    """The first decodable JSON value of `kind` in `text` (see `iter_json`), or JudgeOutputError."""
    for value in iter_json(text, kind):
        return value
    raise JudgeOutputError(f"no JSON {kind} found in judge output: {str(text)[:200]!r}")


def _as_number(value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise JudgeOutputError(f"{path}: expected a number, got a boolean")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise JudgeOutputError(f"{path}: expected a number, got {value[:40]!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JudgeOutputError(f"{path}: expected a finite number, got {value!r:.40}")
    return float(value)


def _as_bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise JudgeOutputError(f"{path}: expected true/false, got {value!r:.40}")


def validate(value: Any, schema: Any, path: str = "$") -> Any:
    """`value` normalised to `schema` (see module docstring); raises JudgeOutputError naming the bad path."""
    if schema is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise JudgeOutputError(f"{path}: expected a string, got {type(value).__name__}")
        return value
    if schema is bool:
        return _as_bool(value, path)
    if schema is int:
        number = _as_number(value, path)
        if number != int(number):
            raise JudgeOutputError(f"{path}: expected an integer, got {number}")
        return int(number)
    if schema is float:
        return _as_number(value, path)
    if isinstance(schema, Range):
        number = _as_number(value, path)
        if not schema.lo <= number <= schema.hi:
            raise JudgeOutputError(f"{path}: {number} is outside [{schema.lo}, {schema.hi}]")
        return number
    if isinstance(schema, OneOf):
        if not isinstance(value, str) or value.strip().lower() not in schema.choices:
            raise JudgeOutputError(f"{path}: expected one of {list(schema.choices)}, got {value!r:.40}")
        return value.strip().lower()
    if isinstance(schema, list):
        if len(schema) != 1:
            raise TypeError("a list schema holds exactly one element schema")
        if not isinstance(value, list):
            raise JudgeOutputError(f"{path}: expected a list, got {type(value).__name__}")
        return [validate(element, schema[0], f"{path}[{i}]") for i, element in enumerate(value)]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise JudgeOutputError(f"{path}: expected an object, got {type(value).__name__}")
        by_lower = {str(key).strip().lower(): item for key, item in value.items()}
        out = {}
        for key, sub_schema in schema.items():
            if key.lower() not in by_lower:
                raise JudgeOutputError(f"{path}: missing key {key!r} (has {sorted(by_lower)[:8]})")
            out[key] = validate(by_lower[key.lower()], sub_schema, f"{path}.{key}")
        return out
    raise TypeError(f"unsupported schema {schema!r}")


def parse_judge_json(text: str, schema: Any) -> Any:
    """The first JSON value in `text` that matches `schema`, normalised; JudgeOutputError when none does.

    Where the schema is an object with a single list-valued key, a bare top-level list is accepted too (judges
    often answer `[...]` when asked for `{"claims": [...]}`).
    """
    single_list_key = isinstance(schema, dict) and len(schema) == 1 and isinstance(next(iter(schema.values())), list)
    first_error: JudgeOutputError | None = None
    for value in iter_json(text, "array" if isinstance(schema, list) else "any"):
        if isinstance(value, list) and single_list_key:
            value = {next(iter(schema)): value}
        try:
            return validate(value, schema)
        except JudgeOutputError as error:
            first_error = first_error or error
    if first_error is not None:
        raise first_error
    raise JudgeOutputError(f"no JSON found in judge output: {str(text)[:200]!r}")
