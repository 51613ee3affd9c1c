"""Small shared helpers for the evaluation tests: tiny images and benchmark files."""

import json
from pathlib import Path

from PIL import Image


def write_png(path, colour=(200, 30, 30)) -> Path:
    path = Path(path)
    Image.new("RGB", (32, 32), colour).save(path, format="PNG")
    return path


def write_jsonl(path, rows) -> str:
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def make_benchmarks(directory, num_images: int = 6) -> dict[str, str]:
    """Images, one benchmark file per judged protocol and a captions file, all tiny; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    ids = [f"img{n}" for n in range(num_images)]
    for n, image_id in enumerate(ids):
        write_png(directory / f"{image_id}.png", colours[n % len(colours)])
    reference = "A brown dog sits. A ball is red. The grass is green."
    captions = {
        image_id: [
            "A brown dog sits on grass. A purple dragon flies.",
            "A brown dog sits. A ball is red. The sky seems peaceful.",
            "A red ball.",
        ][n % 3]
        for n, image_id in enumerate(ids)
    }
    questions = [
        {"question": "What colour is the ball?", "options": ["red", "blue", "green"], "answer": 0},
        {"question": "What animal is there?", "options": ["dog", "horse"], "answer": "dog"},
        {"question": "Is it raining?", "options": ["yes", "no"], "answer": 1},
    ]
    return {
        "dcscore": write_jsonl(directory / "decap.jsonl", [
            {"image_id": i, "image": f"{i}.png", "reference": reference,
             **({"oracle_facts": ["a brown dog sits", "a ball is red"]} if n % 2 else {})}
            for n, i in enumerate(ids)]),
        "captionqa": write_jsonl(directory / "captionqa.jsonl", [
            {"image_id": i, "image": f"{i}.png", "domain": ["natural", "document"][n % 2], "questions": questions}
            for n, i in enumerate(ids)]),
        "caparena": write_jsonl(directory / "caparena.jsonl", [
            {"image_id": i, "image": f"{i}.png", "reference": reference,
             "baselines": {"short": "A dog.", "wrong": "A purple dog. A unicorn."}} for i in ids]),
        "captions": write_jsonl(directory / "captions.jsonl", [
            {"image_id": i, "caption": c} for i, c in captions.items()]),
    }  # fmt: skip
