"""Qwen2.5-VL-7B-Instruct, c-GDPO with length-conditional masking, judged by vLLM/SGLang servers; one 8-GPU host.

Set the weights directory and the judge servers (validation names each one that is missing):

  python -m balcap_jax.train --config=configs/qwen7b.py --workdir=/ckpt/balcap_qwen7b \
      --config.model.hf_dir=/models/Qwen2.5-VL-7B-Instruct --config.data.manifest=/data/captions.jsonl \
      --config.rewards.judge.llm_url=http://judge:8000/v1 --config.rewards.judge.llm_model=Qwen2.5-72B-Instruct \
      --config.rewards.judge.vlm_url=http://judge:8001/v1 --config.rewards.judge.vlm_model=Qwen2.5-VL-72B-Instruct

Regime (docs/METHOD.md): G = 8 samples per image at temperature 1, lr 1e-6, bf16 compute with fp32 master weights
and fp32 AdamW moments (a 1e-6 step is below bf16's resolution for weights of magnitude ~1e-2, so bf16 master
weights would not move), per-layer rematerialisation, FSDP over every device. Per-device memory of this
update step (AOT-compiled, no weights): experiments/results/memory.md (python experiments/memory_table.py).

Images travel in blocks of rows (models/image_shards.py): in the update each device encodes only its own rows'
images, once per prompt; in the rollouts one block per batch shard of the sampling mesh, and with the default
sampling layout (tensor-parallel over fsdp and tensor) that is a single block of all P prompts. The sizes here are
for one 8-device host. On a pod, let P grow with the chips and keep whole rows per chip in the rollouts:

  32 chips (v5p-64, 8 hosts):   --config.data.prompts_per_batch=32 --config.mesh.sampling_tensor_axes=tensor
  64 chips (v5p-128, 16 hosts): --config.data.prompts_per_batch=64 --config.mesh.sampling_tensor_axes=tensor

(the rollout copy, bf16, is then whole on each chip and every chip samples its own prompts; with
mesh.tensor=4, say, it is split 4 ways instead). P may be any multiple of the batch shards (mesh.data *
mesh.fsdp); validation names the field when a shard's images would overflow the largest patch bucket.
"""

import ml_collections

from balcap_jax.default_config import get_config as _default_config
from balcap_jax.recipes import real_scale


def get_config() -> ml_collections.ConfigDict:
    c = real_scale(_default_config(), release="Qwen2.5-VL-7B-Instruct", name="qwen2_5_vl")
    # Images up to 512 * 28² pixels: <= 2048 patches, <= 512 image tokens; 16 images = 32768 patches, the largest
    # vision bucket, which one block of rows (all P prompts in the default rollouts) must hold.
    c.data.min_pixels = 64 * 28 * 28
    c.data.max_pixels = 512 * 28 * 28
    c.data.prompt_buckets = (192, 320, 576)
    c.data.prompts_per_batch = 16  # P images x G = 8 -> 128 sequences per RL step, 16 per device on 8 devices
    return c
