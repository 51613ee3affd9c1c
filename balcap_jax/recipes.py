"""The real-scale recipes' shared part, and loading a recipe of the repository's configs/ by name.

`configs/qwen7b.py`, `qwen3b.py` and `llava7b.py` are each `real_scale(<embedded default>, ...)` plus their sizes;
tools, tests and experiments load them with `load_recipe("qwen7b")` (one loader; the CLIs take the file path).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # in a source checkout (editable install)


def load_recipe(name: str) -> ml_collections.ConfigDict:
    """`get_config()` of configs/<name>.py (name without ".py", e.g. "qwen7b"), or of a path to a recipe file."""
    path = Path(name) if name.endswith(".py") else CONFIGS_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise FileNotFoundError(f"no recipe {name!r} at {path}; recipes in {CONFIGS_DIR}: {known}")
    spec = importlib.util.spec_from_file_location(f"balcap_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def real_scale(c: ml_collections.ConfigDict, *, release: str, name: str) -> ml_collections.ConfigDict:
    """The embedded default turned into a real-scale recipe (configs/qwen7b.py, qwen3b.py, llava7b.py add their sizes)."""
    del c["total_minutes_budget"]  # the laptop-budget note of the embedded default
    c.model.name = name
    c.model.release = release  # the checkpoint whose shapes this recipe is sized for (AOT memory analysis)
    c.model.hf_dir = ""  # REQUIRED: local HF directory of `release` (config.json + *.safetensors)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.attention = "flash"  # TPU Pallas splash / GPU cuDNN; the reference einsum on CPU
    c.model.remat = True  # rematerialise each decoder layer / vision block in the backward pass
    del c.model["tiny"]  # weights come from hf_dir only: an empty hf_dir is a validation error

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # FSDP over all devices

    c.data.source = "manifest"
    c.data.manifest = ""  # REQUIRED: JSONL manifest of images and reference captions
    c.data.prompt = "Describe this image in detail."
    c.data.max_image_bytes = 32 * 1024 * 1024
    c.data.eval_manifest = ""  # held-out images; or set data.eval_fraction (e.g. 0.01) to hold out of the manifest
    c.data.eval_fraction = 0.0
    del c.data["shapes_world"]

    c.sampling = ml_collections.ConfigDict(dict(group_size=8, max_new_tokens=512, temperature=1.0, top_p=1.0, top_k=0))

    c.rewards.components = ("precision", "recall", "linguistic")
    c.rewards.weights = (1.0, 1.0, 1.0)
    c.rewards.judge.backend = "openai"
    c.rewards.judge.llm_url = ""  # REQUIRED: OpenAI-compatible server decomposing / matching claims
    c.rewards.judge.llm_model = ""
    c.rewards.judge.vlm_url = ""  # REQUIRED: OpenAI-compatible multimodal server verifying claims on the image
    c.rewards.judge.vlm_model = ""
    c.rewards.judge.api_key_env = ""  # e.g. "JUDGE_API_KEY" for servers started with --api-key
    c.rewards.judge.cache_dir = ""  # empty: <workdir>/judge_cache
    c.rewards.judge.max_concurrency = 256
    c.rewards.judge.timeout_s = 120.0
    c.rewards.judge.max_retries = 6
    c.rewards.judge.image_max_side = 1024
    c.rewards.judge.response_format = "json_schema"

    c.advantage = ml_collections.ConfigDict(
        dict(kind="gdpo", eps=1e-4, ddof=1, batch_stats="sample", partial_nan="mean_present")
    )
    c.length = ml_collections.ConfigDict(
        dict(kind="mask", component="linguistic", ratio_min=0.5, ratio_max=2.0, masked_value=0.0, coef=0.001)
    )
    c.loss = ml_collections.ConfigDict(
        dict(eps_low=0.2, eps_high=0.28, dual_clip=0.0, kl_coef=0.0, aggregation="token-mean", tis_cap=0.0)
    )
    c.optim = ml_collections.ConfigDict(
        dict(lr=1e-6, warmup_steps=10, schedule="constant", weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999)
    )
    c.train = ml_collections.ConfigDict(
        dict(rl_steps=500, updates_per_batch=1, micro_batches=1, sft_steps=0, sft_batch_size=64, sft_lr=1e-5,
             compile_cache_dir="", overlap="none")
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=25, keep=3, export_hf=True))
    c.metrics = ml_collections.ConfigDict(dict(log_every=1, sample_every=10, eval_every=50))
    # 512 held-out images in batches of 16 (16 images x <= 2048 patches fill the largest vision bucket when the
    # rollouts hold every prompt in one block).
    c.eval = ml_collections.ConfigDict(dict(max_images=512, batch_size=16))
    return c
