"""The JAX peer, raced: google-tunix's `Sampler` and its GRPO step (`GRPOLearner` over an `RLCluster`) vs ours.

Runs in its own venv (tunix 0.1.7 pins safetensors<0.8, transformers 5.24 needs >=0.8, so the two cannot be
resolved together; tunix is installed beside our pinned stack with --no-deps and imports and runs with
safetensors 0.8.0):

    python3 -m venv .venv-tunix
    .venv-tunix/bin/pip install -e . -c constraints.txt
    .venv-tunix/bin/pip install --no-deps google-tunix==0.1.7
    .venv-tunix/bin/pip install datasets google-metrax hf-transfer importlib-resources jinja2 kagglehub numba \
        jaxtyping omegaconf perfetto pylatexenc python-dotenv qwix sentencepiece sympy -c constraints.txt
    .venv-tunix/bin/python -m experiments.bench_vs_tunix            # --race=sampler|grpo|both (default both)

Both races: a random Qwen2-architecture decoder of the same shape on both sides (default: Qwen2.5-0.5B widths —
hidden 896, MLP 4864, 14/2 heads of 64, tied 151,936-token embedding, q/k/v biases — with --layers layers), fp32,
the same P prompt strings (random words, the real Qwen tokenizer), G rows per prompt, prompts left-padded to 64
tokens, exactly --new-tokens tokens per row (no EOS on either side, checked), temperature-1 sampling over the
full vocabulary. The weights are drawn independently on each side (same shapes): with no EOS the work does not
depend on their values. Rounds interleaved (tunix, ours, tunix, ...); each side's first call compiles and is
reported apart, then --warmup rounds are discarded and the median and min-max of --runs rounds are reported;
the ratio (tunix seconds / ours) is taken per round.

Sampler race: each side starts from the strings and ends with the decoded completions (tokenising, padding,
prefill, decode, detokenising all inside the timing). Ours (`balcap_jax.sampling.Sampler` on the text-only
`LlamaForCausalLM` decoder) runs each prompt's prefill once and tiles its KV cache G times; tunix gets the
P x G strings (its sampler has no group tiling).

GRPO-step race: one step = sample G completions of each of the P prompts, score them, group-relative
advantages, one Adam update (lr --lr, no clipping, no weight decay), clipped surrogate (eps 0.2) averaged
over tokens, no KL term and no reference model (our default `loss.kl_coef=0`; tunix `beta=0` builds none), one
update per batch (so pi_old is the update's own forward on both sides: no extra log-prob pass). The reward on
both sides is the same pure function: fixed-seed uniform random numbers, one per completion.
  * tunix: `GRPOLearner.train` on a one-batch dataset (each call runs exactly one step: its data thread,
    rollout, rewards, `grpo` advantages, `grpo` loss with loss_agg_mode="token-mean", optax.adam) over an
    `RLCluster` whose actor and rollout share one 1x1 ("fsdp", "tp") mesh of Auto axes on the one device
    (so they share weights and no sync runs), vanilla rollout engine (its `Sampler`), top_p=1, no top-k.
    The default mesh axis type of jax 0.10 (Explicit) breaks its embedding gather ("Use .at[...].get
    (out_sharding=)"), hence Auto.
  * ours: the production step object `trainer.rl_step.RLStep` (what `python -m balcap_jax.train` runs),
    built as `trainer/loop.py` builds it, on the production text decoder of our Qwen2-architecture policy
    family: `qwen2_5_vl` (the registered families are qwen2_5_vl and llava; the text-only `LlamaForCausalLM`
    has no policy family), with text-only prompts, whose M-RoPE positions are equal on all three axes (=1-D
    RoPE). Advantage kind "grpo" (ddof 1, eps 1e-6, as tunix's), token-mean loss, AdamW with weight decay 0 and
    no clipping (= Adam), timed from the strings to the updated parameters (`jax.block_until_ready`).
  The family's vision-input hook gives no vision inputs for a batch without any image, so the sampler and
  `build_training_batch` run the prompts as text only (the tower never runs).
  Asymmetries left: our model carries a 1-block, 64-wide vision tower whose parameters (~0.1M, zero
  gradients) ride along in the Adam update, and our sampler suppresses the three image ids; ours prefills each
  prompt once and tiles the cache G times, tunix samples P x G rows; tunix's `train` call sets up its data
  thread and closes its cluster's loggers once per step (its driver, inside its timing).

The last line printed is `tunix_sampler_ratio=<float> tunix_grpo_step_ratio=<float>` (medians of the per-round
ratios tunix seconds / ours; only the races that ran).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import jax
from flax import nnx

from balcap_jax.models.llama_text import LlamaForCausalLM
from balcap_jax.models.qwen2_5_vl.processor import load_tokenizer
from balcap_jax.models.qwen2_5_vl.text import DecoderConfig
from balcap_jax.sampling import Sampler, SamplerConfig, Temperature
from experiments import common

WORDS = ("a", "photo", "of", "red", "cat", "sitting", "on", "the", "blue", "mat", "near", "window", "with", "light",
         "and", "two", "small", "dogs", "in", "garden")  # fmt: skip
RACES = ("sampler", "grpo", "both")
PROMPT_BUCKET = 64
ENDOFTEXT_ID = 151643  # the Qwen tokenizer's pad token
IM_END_ID = 151645


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int = 4
    hidden: int = 896
    intermediate: int = 4864
    heads: int = 14
    kv_heads: int = 2
    head_dim: int = 64
    vocab: int = 151936

    def ours(self) -> DecoderConfig:
        return DecoderConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                             num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
                             head_dim=self.head_dim, qkv_bias=True, tie_word_embeddings=True)  # fmt: skip

    def ours_policy(self) -> dict[str, Any]:
        """A Qwen2.5-VL config.json dict (`Qwen2_5_VLConfig.from_hf`) whose text decoder is this shape (1e6 rope
        theta as tunix's Qwen2), with the smallest vision tower the family allows (text-only prompts never
        feed it an image)."""
        half = self.head_dim // 2
        t_section = half // 4
        hw = (half - t_section) // 2
        return dict(
            model_type="qwen2_5_vl", tie_word_embeddings=True,
            text_config=dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                             num_hidden_layers=self.layers, num_attention_heads=self.heads,
                             num_key_value_heads=self.kv_heads, rms_norm_eps=1e-6, tie_word_embeddings=True,
                             rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0,
                                                  mrope_section=[t_section, hw, half - t_section - hw])),
            vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, in_channels=3,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               out_hidden_size=self.hidden, fullatt_block_indexes=[0]),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        )  # fmt: skip

    def tunix(self):
        from tunix.models.qwen2 import model as qwen2

        return qwen2.ModelConfig(num_layers=self.layers, vocab_size=self.vocab, embed_dim=self.hidden,
                                 hidden_dim=self.intermediate, num_heads=self.heads, head_dim=self.head_dim,
                                 num_kv_heads=self.kv_heads, rope_theta=1_000_000, norm_eps=1e-6,
                                 use_tied_embedding=True)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What both GRPO steps are given: P prompts x G rows, exactly `new_tokens` per row, Adam at `lr`."""

    prompts: int
    group: int
    new_tokens: int
    lr: float
    seed: int = 0
    clip_eps: float = 0.2
    advantage_eps: float = 1e-6  # tunix's grpo estimator: (r - mean) / (std(ddof=1) + 1e-6)

    @property
    def rows(self) -> int:
        return self.prompts * self.group


def prompt_strings(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(8, 24))) for _ in range(count)]


def random_rewards(seed: int) -> Callable[[int], list[float]]:
    """count -> that many uniform [0, 1) rewards from one fixed-seed stream (a fresh stream per call of this
    factory, so both sides draw the same sequence)."""
    rng = np.random.default_rng(seed)
    return lambda count: rng.random(count).tolist()


def tunix_grpo_settings(s: StepSettings) -> dict[str, dict[str, Any]]:
    """Keyword arguments of tunix's RolloutConfig ("rollout"), GRPOConfig ("algo") and the Adam learning rate
    ("optimizer") for `s`. eos_tokens=[-1] (an id never sampled) so every row runs to max_tokens_to_generate."""
    return dict(
        rollout=dict(max_tokens_to_generate=s.new_tokens, temperature=1.0, top_p=1.0, top_k=None,
                     max_prompt_length=PROMPT_BUCKET, kv_cache_size=PROMPT_BUCKET + s.new_tokens, eos_tokens=[-1]),
        algo=dict(num_generations=s.group, num_iterations=1, beta=0.0, epsilon=s.clip_eps,
                  loss_agg_mode="token-mean", advantage_estimator="grpo", policy_loss_fn="grpo"),
        optimizer=dict(learning_rate=s.lr),
    )  # fmt: skip


def our_grpo_config(s: StepSettings):
    """The run config of our raced step: the embedded default with the same settings as `tunix_grpo_settings`
    (GRPO advantages, token-mean clipped surrogate, no KL, AdamW without decay or clipping, constant lr)."""
    import ml_collections

    from balcap_jax import default_config

    c = default_config.get_config()
    c.seed = s.seed
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.data.prompt_buckets = (PROMPT_BUCKET,)
    c.sampling = ml_collections.ConfigDict(dict(group_size=s.group, max_new_tokens=s.new_tokens, temperature=1.0,
                                                top_p=1.0, top_k=0))  # fmt: skip
    c.rewards.components, c.rewards.weights = ("random",), (1.0,)
    c.advantage = ml_collections.ConfigDict(dict(kind="grpo", eps=s.advantage_eps, ddof=1, batch_stats="sample"))
    c.length.kind = "none"
    c.loss = ml_collections.ConfigDict(dict(eps_low=s.clip_eps, eps_high=s.clip_eps, dual_clip=0.0, kl_coef=0.0,
                                            aggregation="token-mean"))  # fmt: skip
    c.optim = ml_collections.ConfigDict(dict(lr=s.lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                                             grad_clip=0.0, b1=0.9, b2=0.999))  # fmt: skip
    c.train.rl_steps, c.train.updates_per_batch, c.train.micro_batches = 1000, 1, 1
    c.train.overlap = "none"
    return c


def text_prompt_batch(tokenizer: Any, prompts: Sequence[str], bucket: int, pad_id: int) -> dict[str, Any]:
    """Our pipeline's batch layout for text-only prompts: input_ids int32[P, bucket] (left-padded),
    attention_mask bool[P, bucket], positions int32[3, P, bucket] (the same on the three M-RoPE axes, 0 on
    padding), no image (pixel_values [0, 1176], image_grid_thw [0, 3]), and the per-prompt fields the judges
    read (one empty reference each)."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    if max(len(e) for e in encoded) > bucket:
        raise ValueError(f"a prompt has {max(len(e) for e in encoded)} tokens, more than the {bucket}-token bucket")
    ids = np.full((len(prompts), bucket), pad_id, np.int32)
    mask = np.zeros((len(prompts), bucket), bool)
    for i, row in enumerate(encoded):
        ids[i, bucket - len(row) :], mask[i, bucket - len(row) :] = row, True
    positions = np.where(mask, np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return dict(input_ids=ids, attention_mask=mask, positions=np.stack([positions] * 3),
                pixel_values=np.zeros((0, 3 * 2 * 14 * 14), np.float32), image_grid_thw=np.zeros((0, 3), np.int64),
                prompt_length=mask.sum(1).astype(np.int32), example_id=[f"prompt_{i}" for i in range(len(prompts))],
                references=[("",) for _ in prompts], image_bytes=[None] * len(prompts),
                metadata=[{} for _ in prompts])  # fmt: skip


def check_lengths(lengths: Mapping[str, Sequence[int]], new_tokens: int) -> None:
    """Equal work: every row of every measured call of each side generated exactly `new_tokens` tokens."""
    bad = {k: sorted(set(int(x) for x in v)) for k, v in lengths.items() if set(int(x) for x in v) != {new_tokens}}
    if bad:
        raise RuntimeError(f"completion lengths differ from --new-tokens={new_tokens}: {bad}")


def _spread(values: Sequence[float]) -> dict[str, float]:
    return common.Spread.of(values).to_dict()


# ---------------------------------------------------------------------------------------------------------------
# Sampler race


def run_sampler(args: argparse.Namespace, shape: Shape, tokenizer: Any) -> dict[str, Any]:
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.qwen2 import model as qwen2

    prompts = prompt_strings(args.prompts, args.seed)
    rows = args.prompts * args.group
    bucket = PROMPT_BUCKET

    theirs = qwen2.Qwen2(shape.tunix(), rngs=nnx.Rngs(args.seed))
    cache = tunix_sampler.CacheConfig(cache_size=bucket + args.new_tokens, num_layers=shape.layers,
                                      num_kv_heads=shape.kv_heads, head_dim=shape.head_dim)  # fmt: skip
    their_sampler = tunix_sampler.Sampler(theirs, tokenizer, cache)
    repeated = [p for p in prompts for _ in range(args.group)]

    def tunix_side() -> list[str]:
        out = their_sampler(repeated, max_generation_steps=args.new_tokens, max_prompt_length=bucket,
                            temperature=1.0, top_p=1.0, eos_tokens=[-1], seed=args.seed)  # fmt: skip
        return list(out.text)

    ours = nnx.jit(lambda: LlamaForCausalLM(shape.ours(), rngs=nnx.Rngs(args.seed)))()
    our_sampler, state = Sampler.from_model(ours)
    scfg = SamplerConfig(max_new_tokens=args.new_tokens, eos_ids=(), pad_id=0, strategy=Temperature(1.0),
                         group_size=args.group, prompt_buckets=(bucket,), cache_dtype="float32")  # fmt: skip
    key = jax.random.key(args.seed)

    def our_side() -> list[str]:
        batch = text_prompt_batch(tokenizer, prompts, bucket, pad_id=0)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "positions": batch["positions"][0]}  # the text decoder's 1-D RoPE positions  # fmt: skip
        rollout = our_sampler(state, inputs, scfg, key)
        return tokenizer.batch_decode(np.asarray(rollout.tokens).tolist())

    first = {"tunix": tunix_side(), "ours": our_side()}  # compiles both
    assert len(first["tunix"]) == len(first["ours"]) == rows
    times = common.interleaved({"tunix": tunix_side, "ours": our_side}, args.runs, args.warmup)
    tps = {k: _spread([rows * args.new_tokens / t for t in v]) for k, v in times.items()}
    ratio = common.paired_ratios(times["tunix"], times["ours"])
    return dict(seconds=times, tokens_per_s=tps, sampler_ratio=ratio.to_dict())


# ---------------------------------------------------------------------------------------------------------------
# GRPO-step race


def build_tunix_grpo(shape: Shape, s: StepSettings, tokenizer: Any) -> tuple[Callable[[], list[int]], Any]:
    """tunix's GRPO step as a callable: one `GRPOLearner.train` call on a one-batch dataset, blocked until the
    actor's new weights exist; returns the generated tokens of each row. Also returns the learner."""
    import optax
    from tunix.models.qwen2 import model as qwen2
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    Role = rl_cluster_lib.Role
    settings = tunix_grpo_settings(s)
    generated: list[int] = []

    class CountingCluster(rl_cluster_lib.RLCluster):
        """Records how many tokens each row of each rollout generated (the equal-work check); no other change."""

        def generate(self, *a, **kw):
            out = super().generate(*a, **kw)
            generated.extend(len(t) for t in out.tokens)
            return out

    # Explicit axes (jax 0.10's default) break tunix's embedding gather; Auto is what its own meshes use.
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    training = rl_cluster_lib.RLTrainingConfig(actor_optimizer=optax.adam(**settings["optimizer"]),
                                               eval_every_n_steps=10**9, max_steps=10**9)  # fmt: skip
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={Role.ACTOR: mesh, Role.REFERENCE: mesh, Role.ROLLOUT: mesh}, rollout_engine="vanilla",
        offload_to_cpu=False, training_config=training,
        rollout_config=base_rollout.RolloutConfig(**settings["rollout"]),
    )  # fmt: skip
    model = qwen2.Qwen2(shape.tunix(), rngs=nnx.Rngs(s.seed))
    cluster = CountingCluster(actor=model, reference=None, tokenizer=tokenizer, cluster_config=cluster_config)
    draw = random_rewards(s.seed)
    reward = lambda prompts, completions, **_: draw(len(completions))  # noqa: E731
    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=grpo_learner.GRPOConfig(**settings["algo"]),
                                       reward_fns=reward)  # fmt: skip
    # Its data pipeline repeats each prompt G times (np.repeat over the batch axis): prompts are an array.
    dataset = [{"prompts": np.asarray(prompt_strings(s.prompts, s.seed))}]

    def step() -> list[int]:
        del generated[:]
        learner.train(dataset)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
        return list(generated)

    return step, learner


def build_our_grpo(shape: Shape, s: StepSettings, tokenizer: Any) -> tuple[Callable[[], list[int]], Any]:
    """Our production RL step (`RLStep`) as a callable from the prompt strings to the updated parameters;
    returns each row's generated tokens. Also returns the reward manager (the caller closes it)."""
    import jax.numpy as jnp

    from balcap_jax.metrics import PhaseTimer
    from balcap_jax.models import registry
    from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
    from balcap_jax.models.qwen2_5_vl.processor import ImageProcessorConfig
    from balcap_jax.parallel import hosts
    from balcap_jax.rewards.manager import RewardManager
    from balcap_jax.rewards.types import ComponentScore
    from balcap_jax.rl import update as update_lib
    from balcap_jax.trainer import builders, placement
    from balcap_jax.trainer.policy import Policy
    from balcap_jax.trainer.rl_step import RLStep

    draw = random_rewards(s.seed)

    @dataclasses.dataclass(frozen=True)
    class RandomReward:
        name: str = "random"

        async def score(self, items) -> list[ComponentScore]:
            return [ComponentScore(v) for v in draw(len(items))]

    config = our_grpo_config(s)
    family = registry.get("qwen2_5_vl")
    model_config = Qwen2_5_VLConfig.from_hf(shape.ours_policy())
    model = nnx.jit(lambda: family.model_class(model_config, rngs=nnx.Rngs(s.seed), dtype=jnp.float32,
                                               param_dtype=jnp.float32))()  # fmt: skip
    policy = Policy(family, model_config, model, tokenizer, ImageProcessorConfig(), None, eos_id=IM_END_ID,
                    pad_id=ENDOFTEXT_ID)  # fmt: skip
    mesh = builders.mesh(config, devices=jax.devices()[:1])
    # As trainer/loop.py builds it: training layout, the rollout copy program, a sampler whose cache follows it.
    graphdef, params = nnx.split(model)
    params = jax.device_put(params, placement.param_shardings(family, params, mesh, "training"))
    for_sampling = placement.rollout_copy(config, policy, params, mesh)
    sampler = Sampler(graphdef, mesh=for_sampling.mesh, cache_heads=for_sampling.cache_heads,
                      cache_rows=for_sampling.cache_rows)  # fmt: skip
    manager = RewardManager([RandomReward()])
    rl_step = RLStep(policy, sampler, builders.rl_update_step(graphdef, config), manager, config, mesh, for_sampling)
    rl_step.sampler_config = dataclasses.replace(rl_step.sampler_config, eos_ids=())  # equal work: no EOS
    optimizer, _ = builders.rl_optimizer(config)
    # As the loop starts its RL phase: every leaf laid out on the mesh (else the second step recompiles).
    train_state = hosts.globalize(update_lib.TrainState.create(params, optimizer), mesh)
    box = {"train": train_state, "rng": hosts.globalize(jax.random.key(s.seed), mesh)}
    prompts = prompt_strings(s.prompts, s.seed)

    def step() -> list[int]:
        batch = text_prompt_batch(tokenizer, prompts, PROMPT_BUCKET, policy.pad_id)
        with jax.set_mesh(mesh):
            result = rl_step(box, batch, PhaseTimer())
            jax.block_until_ready(result.state["train"])
        box.update(result.state)
        return np.asarray(result.rollout.lengths).tolist()

    return step, manager


def run_grpo(args: argparse.Namespace, shape: Shape, tokenizer: Any) -> dict[str, Any]:
    s = StepSettings(args.prompts, args.group, args.new_tokens, args.lr, args.seed)
    tunix_step, _ = build_tunix_grpo(shape, s, tokenizer)
    our_step, manager = build_our_grpo(shape, s, tokenizer)
    lengths: dict[str, list[int]] = {"tunix": [], "ours": []}

    def recorded(name: str, fn: Callable[[], list[int]]) -> Callable[[], None]:
        return lambda: lengths[name].extend(fn())

    sides = {"tunix": recorded("tunix", tunix_step), "ours": recorded("ours", our_step)}
    with manager:
        first_s = {}
        for name, fn in sides.items():  # each side's first step compiles
            start = time.perf_counter()
            fn()
            first_s[name] = time.perf_counter() - start
        times = common.interleaved(sides, args.runs, args.warmup)
    check_lengths(lengths, s.new_tokens)
    if any(len(v) != s.rows * (1 + args.warmup + args.runs) for v in lengths.values()):
        raise RuntimeError(f"expected {s.rows} rows per step, got {({k: len(v) for k, v in lengths.items()})}")
    ratio = common.paired_ratios(times["tunix"], times["ours"])
    return dict(grpo_seconds=times, grpo_first_step_s=first_s, grpo_step_ratio=ratio.to_dict(),
                grpo_settings=dict(dataclasses.asdict(s), rows=s.rows, tunix=tunix_grpo_settings(s)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tunix

    shape = shape_of(args)
    tokenizer = load_tokenizer()
    load_start = common.loadavg()
    out: dict[str, Any] = dict(
        race=args.race, shape=dataclasses.asdict(shape), prompts=args.prompts, group=args.group,
        rows=args.prompts * args.group, new_tokens=args.new_tokens, prompt_bucket=PROMPT_BUCKET, runs=args.runs,
        warmup=args.warmup, lr=args.lr, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
        tunix=getattr(tunix, "__version__", "0.1.7"), jax=jax.__version__,
    )  # fmt: skip
    if args.race in ("sampler", "both"):
        out.update(run_sampler(args, shape, tokenizer))
    if args.race in ("grpo", "both"):
        out.update(run_grpo(args, shape, tokenizer))
    out["loadavg"] = dict(start=load_start, end=common.loadavg())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Arguments and report


def shape_of(args: argparse.Namespace) -> Shape:
    return Shape(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                 kv_heads=args.kv_heads, head_dim=args.head_dim)  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default = Shape()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--race", choices=RACES, default="both", help="which race(s) to run")
    parser.add_argument("--prompts", type=int, default=2, help="P prompts")
    parser.add_argument("--group", type=int, default=4, help="G rows per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per row (no EOS on either side)")
    parser.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate of the GRPO step")
    parser.add_argument("--layers", type=int, default=default.layers)
    parser.add_argument("--hidden", type=int, default=default.hidden)
    parser.add_argument("--intermediate", type=int, default=default.intermediate)
    parser.add_argument("--heads", type=int, default=default.heads)
    parser.add_argument("--kv-heads", type=int, default=default.kv_heads)
    parser.add_argument("--head-dim", type=int, default=default.head_dim)
    parser.add_argument("--runs", type=int, default=5, help="measured rounds per race")
    parser.add_argument("--warmup", type=int, default=1, help="rounds discarded after each side's compiling call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(common.RESULTS))
    parser.add_argument("--out-name", default="bench_vs_tunix")
    args = parser.parse_args(argv)
    for name in ("prompts", "new_tokens", "runs", "layers", "hidden", "intermediate", "heads", "kv_heads",
                 "head_dim"):  # fmt: skip
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.group < 1 or (args.race != "sampler" and args.group < 2):
        raise SystemExit(f"--group={args.group} must be >= 2 for the GRPO race (group-relative advantages), >= 1 "
                         "for the sampler race alone")  # fmt: skip
    if args.warmup < 0:
        raise SystemExit(f"--warmup={args.warmup} must be >= 0")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--kv-heads={args.kv_heads} must divide --heads={args.heads}")
    if args.head_dim % 2:
        raise SystemExit(f"--head-dim={args.head_dim} must be even (rotary halves)")
    if args.race != "sampler" and args.heads * args.head_dim != args.hidden:
        raise SystemExit(f"--heads x --head-dim = {args.heads * args.head_dim} must equal --hidden={args.hidden} "
                         "for the GRPO race (our Qwen2.5-VL family derives head_dim = hidden / heads)")  # fmt: skip
    if not args.lr > 0:
        raise SystemExit(f"--lr={args.lr} must be > 0")
    return args


def summary_line(result: Mapping[str, Any]) -> str:
    """`tunix_sampler_ratio=<median> tunix_grpo_step_ratio=<median>`, for the races in `result`."""
    keys = (("tunix_sampler_ratio", "sampler_ratio"), ("tunix_grpo_step_ratio", "grpo_step_ratio"))
    return " ".join(f"{name}={result[key]['median']:.3f}" for name, key in keys if key in result)


def render_markdown(r: dict, command: str) -> str:
    fmt = lambda d, k=3: common.Spread(d["median"], d["low"], d["high"], d["count"]).format(k)  # noqa: E731
    s = r["shape"]
    lines = [
        "# The JAX peer, raced: google-tunix's sampler and GRPO step vs ours (interleaved)",
        "",
        f"Random text-only Qwen2 decoder, {s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, "
        f"{s['heads']}/{s['kv_heads']} heads of {s['head_dim']}, tied vocabulary {s['vocab']}, fp32, jax {r['jax']} "
        f"on {r['backend']} ({r['device']}). {r['prompts']} prompts x G={r['group']} = {r['rows']} rows, prompts "
        f"padded to {r['prompt_bucket']}, {r['new_tokens']} new tokens per row (no EOS), temperature 1. Strings in on "
        f"both sides. Rounds tunix -> ours after each side's compiling call, {r['warmup']} warm-up discarded, median "
        f"(min-max) of {r['runs']}. Load average {r['loadavg']['start']} at the start, {r['loadavg']['end']} at the "
        "end.",
        "",
    ]
    if "sampler_ratio" in r:
        rows = [[f"google-tunix {r['tunix']} `Sampler`", fmt(_spread(r["seconds"]["tunix"])),
                 fmt(r["tokens_per_s"]["tunix"], 1), "P x G strings, no group tiling"],
                ["balcap_jax `Sampler`", fmt(_spread(r["seconds"]["ours"])),
                 fmt(r["tokens_per_s"]["ours"], 1), "prefill once per prompt, KV cache tiled G times"]]  # fmt: skip
        lines += [
            "## Sampler (strings out)",
            "",
            common.markdown_table(["sampler", "s per call", "tokens/s", "notes"], rows, [False, True, True, False]),
            "",
            f"**tunix_sampler_ratio = {fmt(r['sampler_ratio'], 2)}x** (per round: tunix seconds / our seconds).",
            "",
        ]
    if "grpo_step_ratio" in r:
        first = r["grpo_first_step_s"]
        rows = [[f"google-tunix {r['tunix']} `GRPOLearner.train` (one step) over `RLCluster`",
                 fmt(_spread(r["grpo_seconds"]["tunix"])), f"{first['tunix']:.3f}",
                 "vanilla rollout (its `Sampler`, P x G rows), actor = rollout on one mesh, `grpo` advantages, "
                 "token-mean loss, optax.adam"],
                ["balcap_jax `RLStep` (production step, `qwen2_5_vl` family, text-only prompts)",
                 fmt(_spread(r["grpo_seconds"]["ours"])), f"{first['ours']:.3f}",
                 "prefill once per prompt, cache tiled G times; text-only batch (no vision inputs: the vision "
                 "tower never runs); `grpo` advantages, token-mean loss, AdamW (decay 0, no clip)"]]  # fmt: skip
        lines += [
            "## One GRPO step (sample, rewards, advantages, one Adam update)",
            "",
            f"Same reward on both sides (fixed-seed uniform random numbers), no KL and no reference model, one update "
            f"per batch, clip eps {r['grpo_settings']['clip_eps']}, lr {r['grpo_settings']['lr']}; every row of every "
            "step generated exactly the new-token count on both sides (checked).",
            "",
            common.markdown_table(["GRPO step", "s per step", "first step s (compiles)", "notes"], rows,
                                  [False, True, True, False]),
            "",
            f"**tunix_grpo_step_ratio = {fmt(r['grpo_step_ratio'], 2)}x** (per round: tunix seconds / our seconds).",
            "",
        ]
    lines += [f"Reproduce (repository root, in .venv-tunix): `{command}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import tunix  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"google-tunix is not importable here ({error}); run in .venv-tunix (see the docstring)")
    result = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out_name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.out_name}.md").write_text(render_markdown(result, common.command_line("bench_vs_tunix", argv)))
    keys = ("tokens_per_s", "sampler_ratio", "grpo_first_step_s", "grpo_step_ratio")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
