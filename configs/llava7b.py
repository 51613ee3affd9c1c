"""LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B-v1.5): the qwen7b regime (see configs/qwen7b.py) for LLaVA.

  python -m balcap_jax.train --config=configs/llava7b.py --workdir=/ckpt/balcap_llava7b \
      --config.model.hf_dir=/models/llava-1.5-7b-hf --config.data.manifest=/data/captions.jsonl \
      --config.rewards.judge.llm_url=http://judge:8000/v1 --config.rewards.judge.llm_model=Qwen2.5-72B-Instruct \
      --config.rewards.judge.vlm_url=http://judge:8001/v1 --config.rewards.judge.vlm_model=Qwen2.5-VL-72B-Instruct

Every image is 336 x 336 pixels -> 576 placeholder tokens; Vicuna's context is 4096 tokens.
"""

import ml_collections

from balcap_jax.default_config import get_config as _default_config
from balcap_jax.recipes import real_scale



def get_config() -> ml_collections.ConfigDict:
    c = real_scale(_default_config(), release="llava-1.5-7b-hf", name="llava")
    c.data.min_pixels = 336 * 336  # fixed by the CLIP tower (resize + centre crop)
    c.data.max_pixels = 336 * 336
    c.data.prompt_buckets = (640,)  # 576 image tokens + the chat template
    c.data.prompts_per_batch = 16  # x G = 8 -> 128 sequences per RL step
    c.train.micro_batches = 2  # 64 sequences per micro-batch, each with its whole blocks of rows and their crops
    return c
