"""Manifest validation: every kind of bad line is a counted, logged skip with a reason; good lines round-trip."""

import base64
import io
import json
import logging

import pytest
from PIL import Image

from balcap_jax.data import manifest as M


def png(width=16, height=12, colour=(10, 20, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def parse(line, tmp_path, limits=M.ImageLimits()):
    raw = line if isinstance(line, bytes) else line.encode()
    return M.parse_manifest_line(raw, 3, base_dir=str(tmp_path), source_name="m.jsonl", limits=limits)


def test_round_trip_of_embedded_and_path_images(tmp_path):
    (tmp_path / "a.png").write_bytes(png(20, 10))
    questions = [{"question": "Colour?", "choices": ["red", "blue"], "answer": "blue"}]
    line = M.write_manifest_line("x", ["A box.", "Box."], image_bytes=png(), questions=questions, metadata={"k": [1]})
    example = parse(line, tmp_path)
    assert (example.example_id, example.references, example.metadata) == ("x", ("A box.", "Box."), {"k": [1]})
    assert example.image_bytes == png() and (example.width, example.height) == (16, 12)
    assert example.questions[0]["answer"] == 1  # answer text is turned into the choice index
    by_path = parse(M.write_manifest_line("y", ["A."], image_path="a.png"), tmp_path)
    assert (by_path.width, by_path.height) == (20, 10) and by_path.image_bytes == (tmp_path / "a.png").read_bytes()
    default_id = parse(json.dumps({"image": "a.png", "reference": "One."}), tmp_path)
    assert default_id.example_id == "m.jsonl:3" and default_id.references == ("One.",)


def b64(data):
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"\xff\xfe{\"id\": 1}", "non_utf8_line"),
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_json"),
        (json.dumps({"image": "nowhere.png", "references": ["A."]}), "missing_image"),
        (json.dumps({"image": "http://example.com/a.png", "references": ["A."]}), "bad_image_field"),
        (json.dumps({"references": ["A."]}), "bad_image_field"),
        (json.dumps({"image_base64": b64(b"\x89PNG\r\n garbage"), "references": ["A."]}), "corrupt_image"),
        (json.dumps({"image_base64": b64(png()[:40]), "references": ["A."]}), "corrupt_image"),
        (json.dumps({"image_base64": "***", "references": ["A."]}), "corrupt_image"),
        (json.dumps({"image_base64": b64(png()), "references": []}), "empty_references"),
        (json.dumps({"image_base64": b64(png()), "references": ["  ", ""]}), "empty_references"),
        (json.dumps({"image_base64": b64(png())}), "empty_references"),
        (json.dumps({"image_base64": b64(png()), "references": ["A."], "questions": [{"question": "Q?"}]}),
         "bad_questions"),
        (json.dumps({"image_base64": b64(png()), "references": ["A."],
                     "questions": [{"question": "Q?", "choices": ["a", "b"], "answer": 5}]}), "bad_questions"),
        (json.dumps({"image_base64": b64(png()), "references": ["A."], "metadata": [1]}), "bad_metadata"),
    ],
)
def test_bad_lines_raise_skip_with_reason(line, reason, tmp_path):
    with pytest.raises(M.SkipRecord) as info:
        parse(line, tmp_path)
    assert info.value.reason == reason


def test_oversized_images_are_skipped_before_decoding(tmp_path):
    line = json.dumps({"image_base64": b64(png(64, 64)), "references": ["A."]})
    with pytest.raises(M.SkipRecord, match="max_pixels") as info:
        parse(line, tmp_path, M.ImageLimits(max_pixels=32 * 32))
    assert info.value.reason == "oversized_image"
    with pytest.raises(M.SkipRecord, match="max_bytes"):
        parse(line, tmp_path, M.ImageLimits(max_bytes=10))


def test_read_manifest_keeps_good_lines_and_tallies_the_rest(tmp_path, caplog):
    good = [M.write_manifest_line(f"g{i}", [f"Caption {i}."], image_bytes=png(colour=(i, 0, 0))) for i in range(3)]
    lines = [good[0].encode(), b"\xff bad bytes", good[1].encode(), b"", b"{oops",
             json.dumps({"id": "e", "image_base64": b64(png()), "references": [""]}).encode(), good[2].encode(),
             good[0].encode()]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    tally = M.SkipTally()
    with caplog.at_level(logging.WARNING):
        examples = list(M.read_manifest(str(path), tally))
    assert [e.example_id for e in examples] == ["g0", "g1", "g2"]
    assert dict(tally.counts) == {"non_utf8_line": 1, "bad_json": 1, "empty_references": 1, "duplicate_id": 1}
    assert [r[0] for r in tally.records] == ["m.jsonl:2", "m.jsonl:5", "m.jsonl:6", "m.jsonl:8"]
    assert tally.total == 4 and "4 records skipped" in tally.summary()
    for record_id, _, _ in tally.records:
        assert any(record_id in message for message in caplog.messages), record_id


def test_write_manifest_line_needs_exactly_one_image_source():
    with pytest.raises(ValueError, match="exactly one"):
        M.write_manifest_line("x", ["A."])
    with pytest.raises(ValueError, match="exactly one"):
        M.write_manifest_line("x", ["A."], image_path="a.png", image_bytes=b"1")


def test_decode_image_returns_rgb():
    buffer = io.BytesIO()
    Image.new("L", (5, 7), 128).save(buffer, format="PNG")
    image = M.decode_image(buffer.getvalue())
    assert image.mode == "RGB" and image.size == (5, 7)
