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


def real_scale(c: ml_collections.ConfigDict, *, release: str, name: str) -> ml_collections.ConfigDict:
    """Turns the embedded default into a real-scale recipe; shared by configs/qwen3b.py and configs/llava7b.py."""
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


def get_config() -> ml_collections.ConfigDict:
    c = real_scale(_default_config(), release="Qwen2.5-VL-7B-Instruct", name="qwen2_5_vl")
    # Images up to 512 * 28² pixels: <= 2048 patches, <= 512 image tokens; 16 images = 32768 patches, the largest
    # vision bucket, which one block of rows (all P prompts in the default rollouts) must hold.
    c.data.min_pixels = 64 * 28 * 28
    c.data.max_pixels = 512 * 28 * 28
    c.data.prompt_buckets = (192, 320, 576)
    c.data.prompts_per_batch = 16  # P images x G = 8 -> 128 sequences per RL step, 16 per device on 8 devices
    return c
