"""From a stored record (as `ManifestCaptions` writes it) to a decoded `CaptionExample`, or a `Skipped` marker.

Decoding never raises for bad data: a record whose image does not decode, is oversized, has no non-empty
reference or has unreadable JSON becomes `Skipped(record_id, reason, detail)` (and a log line). Markers flow
down the pipeline with the examples, so skips are counted in the batches that follow them even when decoding
runs in worker processes: nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping

from PIL import Image

from balcap_jax.data.manifest import ImageLimits, SkipRecord, decode_image

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CaptionExample:
    """A decoded example. image: RGB PIL image; image_bytes: the stored encoding (what image judges get)."""

    example_id: str
    image: Image.Image
    image_bytes: bytes
    references: tuple[str, ...]
    questions: tuple[dict[str, Any], ...]
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record the pipeline could not use; reason is a stable key (e.g. 'corrupt_image')."""

    record_id: str
    reason: str
    detail: str = ""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalar
        return _text(value.item())
    return str(value)


def _json(value: Any, field: str, expected: type) -> Any:
    if value is None:
        return expected()
    try:
        parsed = json.loads(_text(value)) if not isinstance(value, expected) else value
    except json.JSONDecodeError as e:
        raise SkipRecord("bad_json", f"{field} is not JSON: {e.msg}") from e
    if not isinstance(parsed, expected):
        raise SkipRecord("bad_json", f"{field} must be a JSON {expected.__name__}")
    return parsed


def decode_record(record: Mapping[str, Any], limits: ImageLimits = ImageLimits()) -> CaptionExample | Skipped:
    """Decode one stored record: keys id, image_bytes, references, questions_json, metadata_json."""
    record_id = _text(record.get("id", "<no id>"))
    try:
        image_bytes = record.get("image_bytes")
        if not isinstance(image_bytes, (bytes, bytearray)) or not image_bytes:
            raise SkipRecord("missing_image", "record has no image_bytes")
        references = tuple(r for r in (_text(x).strip() for x in record.get("references", ())) if r)
        if not references:
            raise SkipRecord("empty_references", "no non-empty reference caption")
        questions = tuple(_json(record.get("questions_json"), "questions_json", list))
        metadata = _json(record.get("metadata_json"), "metadata_json", dict)
        image = decode_image(bytes(image_bytes), limits)
    except SkipRecord as skip:
        log.warning("skipping record %s: %s (%s)", record_id, skip.reason, skip.detail)
        return Skipped(record_id, skip.reason, skip.detail)
    except (TypeError, ValueError, AttributeError) as e:  # a record not written by ManifestCaptions
        log.warning("skipping record %s: bad_record (%s: %s)", record_id, type(e).__name__, e)
        return Skipped(record_id, "bad_record", f"{type(e).__name__}: {e}")
    return CaptionExample(record_id, image, bytes(image_bytes), references, questions, metadata)
