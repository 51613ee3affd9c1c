"""The JSON Schema of a judge answer, from the declarative schema its parser validates (json_output.py).

Servers with constrained decoding (vLLM, SGLang) then cannot emit anything else, and the bounds below keep a
judge that starts repeating itself from running to max_tokens: every array gets `maxItems`, every string
`maxLength`. The parser stays as tolerant as before, for servers that ignore the schema.

  str -> string (maxLength)   bool -> boolean   int -> integer   float -> number
  Range(lo, hi) -> number in [lo, hi]   OneOf(...) -> string enum   [s] -> array (maxItems)
  {"k": s} -> object, every key required, no other keys (what strict mode asks for)
"""

from __future__ import annotations

import json
from typing import Any

from balcap_jax.rewards.json_output import OneOf, Range
from balcap_jax.rewards.judges.protocol import ResponseSchema

DEFAULT_MAX_ITEMS = 128
DEFAULT_MAX_LENGTH = 400


def json_schema(schema: Any, *, max_items: int = DEFAULT_MAX_ITEMS, max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """The JSON Schema (a dict) equivalent to a json_output schema, with the given array and string bounds."""
    if max_items < 1 or max_length < 1:
        raise ValueError(f"json_schema bounds must be >= 1, got max_items={max_items}, max_length={max_length}")

    def convert(node: Any) -> dict:
        if node is str:
            return {"type": "string", "maxLength": max_length}
        if node is bool:
            return {"type": "boolean"}
        if node is int:
            return {"type": "integer"}
        if node is float:
            return {"type": "number"}
        if isinstance(node, Range):
            return {"type": "number", "minimum": node.lo, "maximum": node.hi}
        if isinstance(node, OneOf):
            return {"type": "string", "enum": list(node.choices)}
        if isinstance(node, list) and len(node) == 1:
            return {"type": "array", "items": convert(node[0]), "maxItems": max_items}
        if isinstance(node, dict):
            return {
                "type": "object",
                "properties": {key: convert(value) for key, value in node.items()},
                "required": list(node),
                "additionalProperties": False,
            }
        raise TypeError(f"json_schema: unsupported schema node {node!r}")

    return convert(schema)


def response_schema(
    name: str, schema: Any, *, max_items: int = DEFAULT_MAX_ITEMS, max_length: int = DEFAULT_MAX_LENGTH
) -> ResponseSchema:
    """The `ResponseSchema` named `name` for a json_output schema (see `json_schema`)."""
    converted = json_schema(schema, max_items=max_items, max_length=max_length)
    # Key order is kept (not sorted): constrained decoders emit properties in schema order, and the prompts ask
    # for "id" before the verdict on it.
    return ResponseSchema(name, json.dumps(converted, separators=(",", ":")))
