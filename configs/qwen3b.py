"""Qwen2.5-VL-3B-Instruct: the qwen7b recipe (see configs/qwen7b.py) at 3B, same regime and mesh.

  python -m balcap_jax.train --config=configs/qwen3b.py --workdir=/ckpt/balcap_qwen3b \
      --config.model.hf_dir=/models/Qwen2.5-VL-3B-Instruct --config.data.manifest=/data/captions.jsonl \
      --config.rewards.judge.llm_url=http://judge:8000/v1 --config.rewards.judge.llm_model=Qwen2.5-72B-Instruct \
      --config.rewards.judge.vlm_url=http://judge:8001/v1 --config.rewards.judge.vlm_model=Qwen2.5-VL-72B-Instruct
"""

import ml_collections

from balcap_jax.default_config import get_config as _default_config
from balcap_jax.recipes import real_scale



def get_config() -> ml_collections.ConfigDict:
    c = real_scale(_default_config(), release="Qwen2.5-VL-3B-Instruct", name="qwen2_5_vl")
    c.data.min_pixels = 64 * 28 * 28
    c.data.max_pixels = 512 * 28 * 28  # <= 512 image tokens; 16 images fill the 32768-patch vision bucket
    c.data.prompt_buckets = (192, 320, 576)
    c.data.prompts_per_batch = 16  # x G = 8 -> 128 sequences per RL step
    c.optim.lr = 2e-6  # the smaller model tolerates a larger step (docs/METHOD.md: 1e-6 .. 1e-5)
    return c
