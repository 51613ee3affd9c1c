"""Local JSONL caption manifests: the schema, validation, and an auditable record of what was skipped.

One JSON object per line (UTF-8):

    {"id": "img-001",                        # optional; default "<manifest name>:<line number>"
     "image": "images/001.jpg",              # a local path, relative to the manifest's folder, or absolute
     "image_base64": "iVBORw0K...",          # ... or the encoded image itself (exactly one of the two)
     "references": ["A dog on a sofa.", ...],# one or more reference captions ("reference": "..." also accepted)
     "questions": [{"question": "What animal?", "choices": ["dog", "cat"], "answer": 0}],   # optional
     "metadata": {...}}                      # optional, any JSON (ShapesWorld puts its scene graph here)

`answer` is the index of the right choice (or the choice text). URLs are refused (nothing is downloaded).
A bad line never stops a build: `read_manifest` yields the good examples and records every skipped line in a
`SkipTally` (a count per reason plus the record id and reason, each also logged as a warning).
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import io
import json
import logging
import os
import warnings
from typing import Any, Iterator

from PIL import Image

log = logging.getLogger(__name__)


class SkipRecord(Exception):
    """A record that cannot be used; `reason` is a short stable key, `detail` what exactly was wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class SkipTally:
    """Counts of skipped records by reason, with the (record id, reason, detail) of each."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    records: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def add(self, record_id: str, skip: SkipRecord) -> None:
        self.counts[skip.reason] += 1
        self.records.append((record_id, skip.reason, skip.detail))
        log.warning("skipping record %s: %s (%s)", record_id, skip.reason, skip.detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        return f"{self.total} records skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Images over these limits are skipped as oversized (a decompression-bomb guard as much as a budget)."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 8192 * 8192
    max_side: int = 16384


@dataclasses.dataclass(frozen=True)
class ManifestExample:
    """A validated manifest line. image_bytes: the encoded image as given (never re-encoded)."""

    example_id: str
    image_bytes: bytes
    width: int
    height: int
    references: tuple[str, ...]
    questions: tuple[dict[str, Any], ...]
    metadata: dict[str, Any]


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode encoded image bytes into a loaded RGB image, or raise SkipRecord('oversized_image' |
    'corrupt_image'). The size is read from the header before any pixel is decoded."""
    if len(data) > limits.max_bytes:
        raise SkipRecord("oversized_image", f"{len(data)} bytes > max_bytes={limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > limits.max_pixels or max(width, height) > limits.max_side:
                    raise SkipRecord(
                        "oversized_image",
                        f"{width}x{height} px exceeds max_pixels={limits.max_pixels} or max_side={limits.max_side}",
                    )
                rgb = image.convert("RGB")  # decodes every pixel: truncated or corrupt data fails here
    except SkipRecord:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipRecord("oversized_image", str(e)) from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) on bad bytes
        raise SkipRecord("corrupt_image", f"cannot decode image: {type(e).__name__}: {e}") from e
    if width < 1 or height < 1:
        raise SkipRecord("corrupt_image", f"image has size {width}x{height}")
    return rgb


def check_image(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[int, int]:
    """(width, height) of a decodable image within `limits`; raises SkipRecord otherwise."""
    return decode_image(data, limits).size


def _image_bytes(entry: dict[str, Any], base_dir: str) -> bytes:
    has_path, has_b64 = "image" in entry, "image_base64" in entry
    if has_path == has_b64:
        raise SkipRecord("bad_image_field", "give exactly one of 'image' (a local path) or 'image_base64'")
    if has_b64:
        try:
            return base64.b64decode(str(entry["image_base64"]), validate=True)
        except (binascii.Error, ValueError) as e:
            raise SkipRecord("corrupt_image", f"image_base64 is not valid base64: {e}") from e
    path = entry["image"]
    if not isinstance(path, str) or not path:
        raise SkipRecord("bad_image_field", f"'image' must be a non-empty path string, got {path!r}")
    if "://" in path:
        raise SkipRecord("bad_image_field", f"'image' is a URL ({path}); manifests take local files only")
    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    try:
        with open(full, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise SkipRecord("missing_image", f"no such file: {full}") from e
    except OSError as e:
        raise SkipRecord("missing_image", f"cannot read {full}: {e}") from e


def _references(entry: dict[str, Any]) -> tuple[str, ...]:
    refs = entry.get("references", entry.get("reference"))
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list):
        raise SkipRecord("empty_references", "'references' must be a list of caption strings")
    kept = tuple(r.strip() for r in refs if isinstance(r, str) and r.strip())
    if not kept:
        raise SkipRecord("empty_references", f"no non-empty reference caption in {refs!r}"[:200])
    if len(kept) < len(refs):
        log.warning("record %s: dropped %d empty/non-string references of %d", entry.get("id"), len(refs) - len(kept),
                    len(refs))
    return kept


def _questions(entry: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    raw = entry.get("questions", [])
    if not isinstance(raw, list):
        raise SkipRecord("bad_questions", "'questions' must be a list")
    out = []
    for k, q in enumerate(raw):
        if not isinstance(q, dict) or not isinstance(q.get("question"), str):
            raise SkipRecord("bad_questions", f"questions[{k}] needs a 'question' string")
        choices = q.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise SkipRecord("bad_questions", f"questions[{k}].choices must be a list of >= 2 strings")
        answer = q.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise SkipRecord("bad_questions", f"questions[{k}].answer must index choices (0..{len(choices) - 1})")
        out.append({**q, "answer": answer})
    return tuple(out)


def parse_manifest_line(
    raw: bytes, line_number: int, *, base_dir: str, source_name: str, limits: ImageLimits = ImageLimits()
) -> ManifestExample:
    """Validate one manifest line (raw bytes, newline stripped or not); raises SkipRecord."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipRecord("non_utf8_line", f"line is not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise SkipRecord("bad_json", f"line is not JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(entry, dict):
        raise SkipRecord("bad_json", f"line is a JSON {type(entry).__name__}, expected an object")
    example_id = str(entry.get("id", f"{source_name}:{line_number}"))
    metadata = entry.get("metadata", {})
    if not isinstance(metadata, dict):
        raise SkipRecord("bad_metadata", "'metadata' must be a JSON object")
    references = _references(entry)
    questions = _questions(entry)
    data = _image_bytes(entry, base_dir)
    width, height = check_image(data, limits)
    return ManifestExample(example_id, data, width, height, references, questions, metadata)


def read_manifest(path: str, tally: SkipTally, limits: ImageLimits = ImageLimits()) -> Iterator[ManifestExample]:
    """Valid examples of the manifest at `path`, in file order; each bad line is added to `tally`."""
    base_dir = os.path.dirname(os.path.abspath(path))
    source_name = os.path.basename(path)
    seen: set[str] = set()
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            record_id = f"{source_name}:{line_number}"
            try:
                example = parse_manifest_line(raw, line_number, base_dir=base_dir, source_name=source_name,
                                              limits=limits)
                if example.example_id in seen:
                    raise SkipRecord("duplicate_id", f"id {example.example_id!r} already used earlier in {source_name}")
            except SkipRecord as skip:
                tally.add(record_id, skip)
                continue
            seen.add(example.example_id)
            yield example


def write_manifest_line(
    example_id: str,
    references: list[str] | tuple[str, ...],
    *,
    image_path: str | None = None,
    image_bytes: bytes | None = None,
    questions: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (),
    metadata: dict[str, Any] | None = None,
) -> str:
    """One manifest line (no newline) in the schema above; exactly one of image_path / image_bytes."""
    if (image_path is None) == (image_bytes is None):
        raise ValueError("write_manifest_line needs exactly one of image_path or image_bytes")
    entry: dict[str, Any] = {"id": example_id, "references": list(references)}
    if image_path is not None:
        entry["image"] = image_path
    else:
        entry["image_base64"] = base64.b64encode(image_bytes).decode("ascii")
    if questions:
        entry["questions"] = list(questions)
    if metadata:
        entry["metadata"] = metadata
    return json.dumps(entry, ensure_ascii=False)
