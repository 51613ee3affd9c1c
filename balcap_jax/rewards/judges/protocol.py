"""The judge protocol: one async text-generation call, whatever runs behind it.

Reward components build a `JudgeRequest` (chat messages, optionally with images) and await `Judge.generate`.
Backends (an OpenAI-compatible HTTP client, an in-process JAX model, a scripted rule table for tests) differ in
how they produce the text, never in what they accept or return. A backend that cannot answer after its own
retries raises `JudgeUnavailable`; callers turn that into a NaN reward and a counted error, never a zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import re
from typing import Any, Callable, Literal, Protocol, Sequence

Role = Literal["system", "user", "assistant"]

_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def sniff_image_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes, from their magic number (PNG, JPEG, GIF, WEBP, BMP, TIFF)."""
    for signature, mime in _IMAGE_SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError(
        "image bytes are not PNG, JPEG, GIF, WEBP, BMP or TIFF (first bytes "
        f"{data[:8]!r}); pass encoded image files, not raw pixel arrays"
    )


@dataclasses.dataclass(frozen=True)
class ImagePart:
    """An encoded image inside a message. `mime` is sniffed from the bytes when left empty."""

    data: bytes
    mime: str = ""

    def __post_init__(self):
        if not isinstance(self.data, (bytes, bytearray)) or not self.data:
            raise ValueError("ImagePart.data must be non-empty encoded image bytes (PNG/JPEG/GIF/WEBP/BMP/TIFF)")
        if not self.mime:
            object.__setattr__(self, "mime", sniff_image_mime(bytes(self.data)))

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the bytes (hex), computed once: it keys per-image caches such as the prepared data URL."""
        return hashlib.sha256(self.data).hexdigest()

    def __repr__(self) -> str:  # never dump kilobytes of image into logs
        return f"ImagePart({self.mime}, {len(self.data)} bytes, sha256={self.digest[:12]})"


Content = str | ImagePart


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat turn: a role and an ordered tuple of text and image parts."""

    role: Role
    content: tuple[Content, ...]

    def __post_init__(self):
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"Message.role must be 'system', 'user' or 'assistant', got {self.role!r}")
        if isinstance(self.content, (str, ImagePart)):
            object.__setattr__(self, "content", (self.content,))
        if not self.content:
            raise ValueError("Message.content is empty; give at least one text or image part")
        for part in self.content:
            if not isinstance(part, (str, ImagePart)):
                raise TypeError(f"Message.content parts must be str or ImagePart, got {type(part).__name__}")

    @property
    def text(self) -> str:
        """The text parts joined by blank lines (images dropped)."""
        return "\n\n".join(part for part in self.content if isinstance(part, str))

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(part for part in self.content if isinstance(part, ImagePart))


_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class ResponseSchema:
    """The JSON Schema an answer must follow, for backends with constrained decoding (vLLM, SGLang).

    name: [A-Za-z0-9_-]{1,64} (the OpenAI API's rule for json_schema names).
    schema_json: the schema as canonical JSON text (text keeps the request immutable and hashable).
    """

    name: str
    schema_json: str

    def __post_init__(self):
        if not _SCHEMA_NAME.match(self.name):
            raise ValueError(f"ResponseSchema.name={self.name!r} must match [A-Za-z0-9_-]{{1,64}}")
        if not isinstance(json.loads(self.schema_json), dict):
            raise ValueError("ResponseSchema.schema_json must be a JSON object")

    @functools.cached_property
    def schema(self) -> dict[str, Any]:
        """The schema as a dict (parsed once; treat it as read-only)."""
        return json.loads(self.schema_json)


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
    """A generation request. Sampling parameters are part of the request (and of any cache key).

    seed: distinguishes deliberate re-asks (e.g. after an unparsable answer) so they are neither served the
    same cached reply nor, on servers that honour it, sampled identically.
    response_schema: the JSON Schema of the expected answer; backends that support structured output send it
    (it is part of the request body, hence of the cache key); others ignore it.
    accept: whether a reply text is a usable answer; caching backends store only accepted replies, so an
    unusable answer is asked again on the next run instead of being replayed. Not part of equality or keys.
    """

    messages: tuple[Message, ...]
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    response_schema: ResponseSchema | None = None
    accept: Callable[[str], bool] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not self.messages:
            raise ValueError("JudgeRequest.messages is empty")
        if self.max_tokens <= 0:
            raise ValueError(f"JudgeRequest.max_tokens must be positive, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"JudgeRequest.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"JudgeRequest.top_p must be in (0, 1], got {self.top_p}")

    @property
    def has_images(self) -> bool:
        return any(message.images for message in self.messages)

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(image for message in self.messages for image in message.images)

    def accepts(self, text: str) -> bool:
        """Whether `text` may be cached as this request's answer (always, without an `accept` predicate)."""
        return self.accept is None or bool(self.accept(text))

    def with_seed(self, seed: int | None) -> "JudgeRequest":
        return dataclasses.replace(self, seed=seed)


def user_request(*content: Content, system: str | None = None, **params) -> JudgeRequest:
    """A single-turn request: an optional system message, then one user message with `content` parts."""
    messages = ((Message("system", (system,)),) if system else ()) + (Message("user", tuple(content)),)
    return JudgeRequest(messages=messages, **params)


@dataclasses.dataclass(frozen=True)
class JudgeReply:
    """text: the generated text; cached: served from the response cache (no model call); latency_s: wall time
    of the call including retries; attempts: model calls made (0 when cached)."""

    text: str
    cached: bool = False
    latency_s: float = 0.0
    attempts: int = 1


class JudgeUnavailable(RuntimeError):
    """The backend gave up on a request (retries exhausted or a non-retryable error)."""


class Judge(Protocol):
    """Anything that turns a `JudgeRequest` into text. `multimodal` says whether it accepts `ImagePart`s."""

    model: str
    multimodal: bool

    async def generate(self, request: JudgeRequest) -> JudgeReply: ...


async def generate_all(judge: Judge, requests: Sequence[JudgeRequest]) -> list[JudgeReply | JudgeUnavailable]:
    """Run `requests` concurrently (the backend bounds concurrency); failures are returned, not raised."""
    async def one(request: JudgeRequest) -> JudgeReply | JudgeUnavailable:
        try:
            return await judge.generate(request)
        except JudgeUnavailable as error:
            return error

    return list(await asyncio.gather(*(one(request) for request in requests)))
