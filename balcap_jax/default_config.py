"""The embedded default recipe (`configs/tiny.py` re-exports it): a small Qwen2.5-VL-architecture policy learning
to caption ShapesWorld on a laptop CPU.

RL from the shipped warm start (`balcap_jax/assets/shapes_world_warm_start.{npz,json}`: 6000 SFT steps on the
imperfect captions of data/shapes_world_warm_start.py, rebuilt by the command its JSON records), then c-GDPO with
length-conditional masking of the linguistic reward, scored exactly by the ShapesWorld offline judge. Tuned to
finish on 2 CPU cores within 15 minutes including the install. `--config.train.init_from= --config.train.sft_steps=N`
starts from random weights with N SFT steps instead.

  python -m balcap_jax.train --workdir=/tmp/balcap_tiny          # this recipe
  python -m balcap_jax.train --config=configs/tiny.py            # the same, from the recipes folder
"""

import ml_collections

# The shipped warm start (built by `python -m experiments.build_warm_start --out=balcap_jax/assets/shapes_world_warm_start
# --sft_steps=6000 --seed=0`; its .json records the commit).
WARM_START = "assets/shapes_world_warm_start"


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_minutes_budget = 15  # informational: what the recipe is tuned to finish within on 2 CPU cores

    c.model = ml_collections.ConfigDict()
    c.model.name = "qwen2_5_vl"  # one of balcap_jax.models.registry.names()
    c.model.hf_dir = ""  # local HF directory; empty -> random init from `c.model.tiny`
    c.model.dtype = "float32"  # activation dtype: float32 | bfloat16
    c.model.param_dtype = "float32"
    c.model.attention = "reference"  # reference (einsum, HF rounding) | flash (TPU splash, GPU cuDNN; CPU: reference)
    c.model.tiny = ml_collections.ConfigDict(
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vision_depth=2,
            vision_hidden_size=64,
            vision_intermediate_size=128,
            vision_num_heads=2,
            tie_word_embeddings=True,
        )
    )

    # FSDP over however many local devices there are (1 on a laptop, 8 on a TPU VM or a GPU box).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # Multi-host: one process per host (README, "Launching on pods and clusters"); 0 = single process.
    c.distributed = ml_collections.ConfigDict(
        dict(num_processes=0, process_id=0, coordinator_address="", local_device_ids=(), auto_detect=False)
    )

    c.data = ml_collections.ConfigDict()
    c.data.source = "shapes_world"  # shapes_world | manifest
    c.data.manifest = ""  # JSONL manifest (source == manifest)
    c.data.records_dir = ""  # where array_record files are written/read; empty -> <workdir>/data
    c.data.eval_manifest = ""  # manifests: JSONL of held-out images; or eval_fraction of the manifest
    c.data.eval_fraction = 0.0
    c.data.loader_shards = 0  # data streams per global batch; 0 = one per process (fix it to compare process counts)
    c.data.prompts_per_batch = 8  # P: images per RL batch (global, across hosts)
    c.data.prompt = "Describe the image in detail."
    c.data.prompt_buckets = (64, 128, 256)
    c.data.min_pixels = 56 * 56
    c.data.max_pixels = 112 * 112
    c.data.max_image_bytes = 8 * 1024 * 1024
    # The testbed: 1-2 objects per image (a relation between two), and a warm start fitted to imperfect captions
    # (data/shapes_world_warm_start.py): habit rates (invented_object, omitted_relations, wrong_attribute,
    # repeated_sentence). A longer caption can cover more (the relation) or hallucinate more (an invented object),
    # so precision and recall trade off through length. max_objects=1 with captioner_habits=() is the old world
    # (one object, warm start fitted to the references).
    c.data.shapes_world = ml_collections.ConfigDict(
        dict(image_size=112, max_objects=2, num_train=2048, num_eval=64, captioner_habits=(0.6, 0.6, 0.1, 0.2))
    )

    c.sampling = ml_collections.ConfigDict(
        dict(group_size=8, max_new_tokens=48, temperature=1.0, top_p=1.0, top_k=0)
    )

    c.rewards = ml_collections.ConfigDict()
    c.rewards.components = ("precision", "recall", "linguistic")
    c.rewards.weights = (1.0, 1.0, 1.0)  # alpha, beta, gamma
    c.rewards.judge = ml_collections.ConfigDict(
        dict(
            backend="shapes_world",  # shapes_world | openai | jax_local (in-process Llama text judge)
            llm_url="",
            llm_model="",
            vlm_url="",
            vlm_model="",
            api_key_env="",
            cache_dir="",
            max_concurrency=64,
            timeout_s=60.0,
            max_retries=4,
            image_max_side=1024,  # longest side of images sent to HTTP judges; 0 keeps the size
            response_format="json_schema",  # json_schema | json_object | none (servers rejecting response_format)
            local_model_dir="",  # jax_local: an HF Llama chat directory (python -m balcap_jax.tools.smollm2_checkpoint)
            local_max_new_tokens=512,
        )
    )

    c.advantage = ml_collections.ConfigDict(
        dict(kind="gdpo", eps=1e-4, ddof=1, batch_stats="sample", partial_nan="mean_present")  # kind: grpo | gdpo
    )
    c.length = ml_collections.ConfigDict(
        dict(
            kind="mask",  # mask | linear | none
            component="linguistic",
            # The paper's band (arXiv 2605.07394): linguistic credit only for 0.5 <= rho <= 2.0.
            ratio_min=0.5,
            ratio_max=2.0,
            masked_value=0.0,
            coef=0.01,  # linear baseline: penalty per unit of length ratio above 1 (rho - 1)
        )
    )

    c.loss = ml_collections.ConfigDict(
        dict(eps_low=0.2, eps_high=0.28, dual_clip=0.0, kl_coef=0.0, aggregation="token-mean", tis_cap=0.0)
    )
    c.optim = ml_collections.ConfigDict(
        dict(lr=3e-4, warmup_steps=5, schedule="constant", weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999)
    )
    c.train = ml_collections.ConfigDict(
        dict(rl_steps=800, updates_per_batch=1, micro_batches=1, sft_steps=0, sft_batch_size=16, sft_lr=3e-3,
             compile_cache_dir="", overlap="none",  # cache '' = <workdir>/compile_cache; overlap: none | one_step_off
             # warm start (trainer/warm_start.py), relative to the package; '' = random weights (then set sft_steps)
             init_from=WARM_START)
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=250, keep=2, export_hf=True))
    c.metrics = ml_collections.ConfigDict(dict(log_every=50, sample_every=25, eval_every=0))
    c.eval = ml_collections.ConfigDict(dict(max_images=0, batch_size=0))  # 0: the whole split, P*G per batch
    return c
