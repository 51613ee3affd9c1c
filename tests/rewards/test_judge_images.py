"""Images for HTTP judges: any readable format is scored, large images arrive downscaled as PNG/JPEG, and each
image is prepared once however many captions (and verification chunks) of it are judged."""

import asyncio
import base64
import io
import math

import numpy as np
import pytest
from PIL import Image

from balcap_jax.rewards.judges import wire_images
from balcap_jax.rewards.judges.openai_compatible import OpenAICompatibleConfig, OpenAICompatibleJudge
from balcap_jax.rewards.judges.protocol import ImagePart, generate_all, sniff_image_mime, user_request
from balcap_jax.rewards.judges.wire_images import WireImageCache, prepare_image
from balcap_jax.rewards.precision import PrecisionConfig, PrecisionReward
from balcap_jax.rewards.types import RewardItem

FAST = dict(request_timeout_s=2.0, connect_timeout_s=1.0, backoff_initial_s=0.01, backoff_max_s=0.05, max_attempts=2)
VERIFY_PROMPT = '<claims>\n{"id": "c1", "claim": "a blue square"}\n</claims>'


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def photo(size=(64, 48), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def vlm(server, **overrides):
    config = OpenAICompatibleConfig(model="vlm", base_urls=(server.base_url,), multimodal=True, **(FAST | overrides))
    return OpenAICompatibleJudge(config)


def sent_images(server) -> list[tuple[str, Image.Image]]:
    """(mime, decoded image) of every image part the server received, in arrival order."""
    urls = [
        part["image_url"]["url"]
        for body in server.bodies
        for message in body.get("messages", [])
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]
    heads_and_data = [url.split(",", 1) for url in urls]
    return [
        (head.removeprefix("data:").removesuffix(";base64"), Image.open(io.BytesIO(base64.b64decode(data))))
        for head, data in heads_and_data
    ]


@pytest.mark.parametrize("fmt, mime", [("BMP", "image/bmp"), ("TIFF", "image/tiff")])
def test_bmp_and_tiff_images_are_scored_and_sent_as_jpeg(fake_server, fmt, mime):
    server = fake_server()
    judge = vlm(server)
    data = encoded(photo(), fmt)
    assert sniff_image_mime(data) == mime
    item = RewardItem("img", "A red ball. A purple cube.", ("A red ball.",), data)
    [score] = asyncio.run(PrecisionReward(judge, judge).score([item]))
    assert score.value == pytest.approx(0.5) and score.errors == 0
    [(sent_mime, image)] = sent_images(server)
    assert sent_mime == "image/jpeg" and image.format == "JPEG" and image.size == (64, 48)


def test_a_large_image_arrives_with_its_longest_side_at_image_max_side(fake_server):
    server = fake_server()
    big = encoded(Image.new("RGB", (3000, 2000), "blue"), "PNG")
    asyncio.run(generate_all(vlm(server), [user_request(ImagePart(big), VERIFY_PROMPT)]))
    asyncio.run(generate_all(vlm(server, image_max_side=512), [user_request(ImagePart(big), VERIFY_PROMPT)]))
    asyncio.run(generate_all(vlm(server, image_max_side=0), [user_request(ImagePart(big), VERIFY_PROMPT)]))
    (default_mime, default), (_, small), (kept_mime, kept) = sent_images(server)
    assert default.size == (1024, 683) and default_mime == "image/jpeg"  # no alpha: a photo goes out as JPEG
    assert small.size == (512, 341)
    assert kept.size == (3000, 2000) and kept_mime == "image/png"  # fits (no limit) and PNG: sent as it is


def test_each_image_is_prepared_once_for_all_captions_and_chunks(fake_server, monkeypatch):
    calls = []

    def counting(data, mime, max_side):
        calls.append(len(data))
        return prepare_image(data, mime, max_side)

    monkeypatch.setattr(wire_images, "prepare_image", counting)
    server = fake_server()
    judge = vlm(server)
    first, second = encoded(photo(seed=1), "BMP"), encoded(photo(seed=2), "BMP")
    captions = ["A red ball. A blue cube.", "A red ball. A purple cube.", "A green cone. A red ball.", "A cube."]
    items = [RewardItem("a", c, ("r",), bytes(bytearray(first))) for c in captions]  # G = 4 copies of the bytes
    items += [RewardItem("b", c, ("r",), second) for c in captions[:2]]
    component = PrecisionReward(judge, judge, PrecisionConfig(claims_per_call=1))
    scores = asyncio.run(component.score(items))
    assert all(not math.isnan(s.value) for s in scores)
    verify_images = len(sent_images(server))
    assert verify_images == 2 * 3 + 1 + 2 * 2  # one verification call per claim
    assert sorted(calls) == sorted([len(first), len(second)])  # ... but one preparation per image
    asyncio.run(component.score(items[:1]))  # a later batch reuses the prepared image too
    assert len(calls) == 2


def test_alpha_goes_out_as_png_grey_stays_grey_and_fitting_jpeg_is_untouched():
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 128))
    out = prepare_image(encoded(rgba, "TIFF"), "image/tiff", 1024)
    assert out.mime == "image/png" and Image.open(io.BytesIO(out.data)).getpixel((0, 0)) == (255, 0, 0, 128)
    palette = Image.new("P", (30, 30), 1)
    palette.info["transparency"] = 1
    assert prepare_image(encoded(palette, "GIF", transparency=1), "image/gif", 16).mime == "image/png"
    grey = prepare_image(encoded(Image.new("L", (2000, 100), 77), "BMP"), "image/bmp", 1000)
    assert grey.mime == "image/jpeg" and (grey.width, grey.height) == (1000, 50)
    assert Image.open(io.BytesIO(grey.data)).mode == "L"
    jpeg = encoded(photo(), "JPEG", quality=80)
    assert prepare_image(jpeg, "image/jpeg", 64).data == jpeg  # fits: no second lossy encode
    assert prepare_image(jpeg, "image/jpeg", 32).width == 32


def test_unreadable_images_fail_clearly_are_not_cached_and_score_nan(fake_server):
    with pytest.raises(ValueError, match="cannot prepare the image"):
        prepare_image(b"BM" + b"\x00" * 40, "image/bmp", 1024)
    with pytest.raises(ValueError, match="max_side"):
        prepare_image(encoded(photo(), "PNG"), "image/png", -1)
    cache = WireImageCache(max_side=64)
    broken = ImagePart(b"\x89PNG\r\n\x1a\n" + b"junk")
    with pytest.raises(ValueError):
        asyncio.run(cache.data_url(broken))
    assert len(cache) == 0  # a failure is not remembered
    server = fake_server()
    judge = vlm(server)
    item = RewardItem("img", "A red ball.", ("r",), broken.data)
    [score] = asyncio.run(PrecisionReward(judge, judge).score([item]))
    assert math.isnan(score.value) and score.errors == 1
    assert "cannot prepare the image" in score.record["failures"][0] and len(sent_images(server)) == 0


def test_image_options_are_validated_with_the_field_name():
    with pytest.raises(ValueError, match="image_max_side"):
        OpenAICompatibleConfig(model="m", base_urls=("http://h/v1",), image_max_side=-5)
    with pytest.raises(ValueError, match="image_cache_size"):
        OpenAICompatibleConfig(model="m", base_urls=("http://h/v1",), image_cache_size=0)
