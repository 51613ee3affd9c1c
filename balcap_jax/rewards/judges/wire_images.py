"""Images as HTTP judges receive them: downscaled, in a format every server decodes, prepared once per image.

Sending the original file costs up to tens of MB of base64 per request, although servers resize to their own
pixel budget anyway, and hosted APIs refuse formats other than PNG/JPEG/GIF/WEBP. So an image is re-encoded
when it is larger than `max_side` on its longest side or not PNG/JPEG: PNG when it has an alpha channel
(JPEG would drop it), JPEG otherwise. PNG or JPEG files that already fit go out byte for byte (no second lossy
encode). EXIF orientation is not applied: the judge sees the pixels the policy's image loader decodes.

`WireImageCache` keeps the prepared data URLs by content digest, so the G captions of an image (and each of
their verification chunks) share one preparation, even when they all ask at the same moment.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import io
import threading

from PIL import Image

from balcap_jax.rewards.judges.protocol import ImagePart

DEFAULT_MAX_SIDE = 1024
JPEG_QUALITY = 90
PASS_THROUGH_MIMES = frozenset({"image/png", "image/jpeg"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


@dataclasses.dataclass(frozen=True)
class WireImage:
    """An image ready to send: its MIME type, encoded bytes and pixel size (width, height)."""

    mime: str
    data: bytes
    width: int
    height: int

    @property
    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _wire_mode(image: Image.Image) -> Image.Image:
    """RGBA with alpha, L for grey levels, else RGB: the modes PNG and JPEG both store faithfully. Palette and
    1-bit images are converted before resizing because Pillow resizes those with nearest-neighbour only."""
    target = "RGBA" if _has_alpha(image) else ("L" if image.mode in ("L", "1") else "RGB")
    return image if image.mode == target else image.convert(target)


def _fitted_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is `max_side`, aspect ratio kept."""
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(data: bytes, mime: str, max_side: int) -> WireImage:
    """`data` (an encoded image of type `mime`) with its longest side at most `max_side` px (0 = keep the size),
    as PNG (alpha) or JPEG; unchanged when it is PNG/JPEG and already fits. ValueError when Pillow cannot read it.
    """
    if max_side < 0:
        raise ValueError(f"max_side must be >= 0 (0 keeps the size), got {max_side}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            fits = max_side == 0 or max(width, height) <= max_side
            if fits and mime in PASS_THROUGH_MIMES:
                return WireImage(mime, bytes(data), width, height)
            if not fits:
                # JPEG decodes at 1/2, 1/4 or 1/8 scale directly (still >= the target size): 4-16x less work.
                image.draft(None, _fitted_size(width, height, max_side))
            converted = _wire_mode(image)  # first frame of animated GIF/TIFF files
            if not fits:
                converted.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=None)
            buffer = io.BytesIO()
            if converted.mode == "RGBA":
                converted.save(buffer, "PNG")
                out_mime = "image/png"
            else:
                converted.save(buffer, "JPEG", quality=JPEG_QUALITY)
                out_mime = "image/jpeg"
            return WireImage(out_mime, buffer.getvalue(), *converted.size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot prepare the image ({mime}, {len(data)} bytes) for the judge: {error}") from None


class WireImageCache:
    """Data URLs of prepared images by content digest; single-flight (concurrent askers share one preparation)
    and bounded (the oldest of `capacity` entries is dropped first). Preparation runs on worker threads so the
    event loop keeps serving HTTP meanwhile; a failed preparation is not cached. Usable from any event loop."""

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE, capacity: int = 256, workers: int = 2):
        if max_side < 0:
            raise ValueError(f"WireImageCache.max_side must be >= 0 (0 keeps the size), got {max_side}")
        if capacity < 1 or workers < 1:
            raise ValueError("WireImageCache.capacity and workers must be >= 1")
        self.max_side = max_side
        self.capacity = capacity
        self._workers = workers
        self._entries: collections.OrderedDict[str, concurrent.futures.Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def _prepare(self, image: ImagePart) -> str:
        return prepare_image(image.data, image.mime, self.max_side).data_url

    def _future(self, image: ImagePart) -> concurrent.futures.Future:
        with self._lock:
            future = self._entries.get(image.digest)
            if future is not None:
                self._entries.move_to_end(image.digest)
                return future
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self._workers, "judge-images")
            future = self._executor.submit(self._prepare, image)
            self._entries[image.digest] = future
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        future.add_done_callback(lambda done: self._forget_failure(image.digest, done))
        return future

    def _forget_failure(self, digest: str, future: concurrent.futures.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                if self._entries.get(digest) is future:
                    del self._entries[digest]

    async def data_url(self, image: ImagePart) -> str:
        """The prepared data URL of `image`; ValueError when it cannot be decoded."""
        future = self._future(image)
        if future.done():  # the common case (every caption after the first): no hop through the event loop
            return future.result()
        # Shielded: one asker being cancelled must not cancel the preparation the others are waiting for.
        return await asyncio.shield(asyncio.wrap_future(future))

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            self._entries.clear()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
