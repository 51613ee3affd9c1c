"""The training run: data -> (SFT warm start) -> [sample G rollouts -> judge -> advantages -> update]* .

Steps are numbered globally: 1..sft_steps are supervised, then rl_steps RL steps. A checkpoint's step therefore
says which phase it belongs to, which fixes the optimizer-state shape to restore into. Everything a resumed run
needs to continue exactly (params, optimizer state, rng key, data-iterator states) is in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax import checkpoint as ckpt_lib
from balcap_jax import metrics as metrics_lib
from balcap_jax.data import pipeline as pipeline_lib
from balcap_jax.data import shapes_world as world
from balcap_jax.data import tfds_builder
from balcap_jax.data.shapes_world_records import prepare_shapes_world
from balcap_jax.rewards.manager import RewardManager
from balcap_jax.rl import losses as losses_lib
from balcap_jax.rl import update as update_lib
from balcap_jax.rl.policy_logprobs import make_log_prob_fn
from balcap_jax.sampling.config import SamplerConfig
from balcap_jax.sampling.rollout import FinishReason, build_training_batch
from balcap_jax.sampling.sampler import Sampler
from balcap_jax.sampling.strategies import Greedy, Temperature, TopP
from balcap_jax.parallel.mesh import MeshShape, make_mesh
from balcap_jax.trainer import batches as batches_lib
from balcap_jax.trainer import placement
from balcap_jax.trainer import shaping
from balcap_jax.trainer.families import family_of
from balcap_jax.trainer.judges import build_reward_components
from balcap_jax.trainer.policy import Policy, build_policy
from balcap_jax.trainer.sft import make_sft_step

log = logging.getLogger(__name__)


# What the console progress line shows (everything goes to metrics.jsonl and TensorBoard).
CONSOLE_METRICS = (
    "sft/nll", "sft/mean_target_prob", "reward/total_mean", "reward/precision_mean", "reward/recall_mean",
    "reward/linguistic_mean", "length/tokens_mean", "loss/clip_fraction", "time/total_s",
)


@dataclasses.dataclass
class RunSummary:
    """What a finished (or stopped) run reports. eval_start / eval_end: mean reward per component (and
    "total", the weighted mean) on the held-out split before and after RL (greedy captions)."""

    final_step: int
    stopped_early: bool
    eval_start: dict[str, float]
    eval_end: dict[str, float]
    export_dir: str | None

    def gain(self) -> dict[str, float]:
        return {k: self.eval_end[k] - self.eval_start[k] for k in self.eval_end if k in self.eval_start}


# ---------------------------------------------------------------------------------------------------------------
# Set-up


def _data_dir(config: Any, workdir: Path) -> str:
    return config.data.records_dir or str(workdir / "data")


def _world_config(config: Any) -> world.WorldConfig:
    sw = config.data.shapes_world
    return world.WorldConfig(image_size=int(sw.image_size), max_objects=int(sw.max_objects))


def prepare_data(config: Any, workdir: Path):
    """-> (train source, eval source). ShapesWorld is generated (once) into array_record; a manifest is built."""
    data_dir = _data_dir(config, workdir)
    if config.data.source == "shapes_world":
        sw = config.data.shapes_world
        name = prepare_shapes_world(
            data_dir, seed=int(config.seed),
            split_sizes={"train": int(sw.num_train), "validation": int(sw.num_eval)},
            config=_world_config(config),
        )
        return tfds_builder.open_split(data_dir, name, "train"), tfds_builder.open_split(data_dir, name, "validation")
    manifest = config.data.manifest
    if not manifest or not os.path.isfile(manifest):
        raise FileNotFoundError(f"config.data.manifest={manifest!r} is not a file; give a JSONL manifest path")
    name = "manifest_" + Path(manifest).stem
    tfds_builder.prepare_manifest_dataset(data_dir, name, {"train": manifest})
    source = tfds_builder.open_split(data_dir, name, "train")
    return source, source


def corpus_texts(source) -> list[str]:
    """Every reference caption of a source (for the vocabulary of from-scratch policies)."""
    texts = []
    for i in range(len(source)):
        for ref in source[i]["references"]:
            texts.append(ref.decode("utf-8", "replace") if isinstance(ref, bytes) else str(ref))
    return texts


def sampler_config(config: Any, policy: Policy, *, greedy: bool = False, group_size: int | None = None) -> SamplerConfig:
    s = config.sampling
    top_k = int(s.top_k) or None
    if greedy or float(s.temperature) == 0.0:
        strategy = Greedy()
    elif float(s.top_p) < 1.0:
        strategy = TopP(float(s.top_p), float(s.temperature), top_k)
    else:
        strategy = Temperature(float(s.temperature), top_k)
    return SamplerConfig(
        max_new_tokens=int(s.max_new_tokens),
        eos_ids=(int(policy.eos_id),),
        pad_id=int(policy.pad_id),
        strategy=strategy,
        group_size=int(s.group_size) if group_size is None else group_size,
        prompt_buckets=tuple(int(b) for b in config.data.prompt_buckets),
        cache_dtype="float32" if config.model.dtype == "float32" else "bfloat16",
        blocked_ids=family_of(policy).blocked_ids(policy),
    )


def _optimizer(config: Any, *, lr: float, total_steps: int, warmup: int):
    o = config.optim
    schedule = o.schedule if o.schedule != "cosine" or total_steps > warmup else "constant"
    cfg = update_lib.OptimizerConfig(
        learning_rate=lr, schedule=schedule, warmup_steps=warmup, total_steps=total_steps,
        b1=float(o.b1), b2=float(o.b2), weight_decay=float(o.weight_decay),
        max_grad_norm=float(o.grad_clip) if o.grad_clip else None,
    )
    return update_lib.make_optimizer(cfg), update_lib.make_lr_schedule(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_rewards(
    policy: Policy, sampler: Sampler, params: Any, manager: RewardManager, eval_batches, config: Any
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy captions of every held-out batch, judged: mean per component and the weighted total.
    `params` should be in the sampling layout."""
    if not eval_batches:
        raise ValueError(
            "the held-out split yields no full batch: config.data.shapes_world.num_eval (or the manifest) must "
            "hold at least prompts_per_batch * group_size images"
        )
    scfg = sampler_config(config, policy, greedy=True, group_size=1)
    all_rewards, samples = [], []
    for batch in eval_batches:
        rollout = sampler(params, batches_lib.prompt_inputs(policy, batch), scfg, jax.random.key(0))
        captions = batches_lib.completion_texts(policy, rollout)
        judged = manager.score_sync(batches_lib.reward_items(batch, captions, 1))
        all_rewards.append(judged.rewards.reshape(-1, judged.rewards.shape[-1]))
        samples += [{"image_id": i, "caption": c, "reference": r[0]}
                    for i, c, r in zip(batch["example_id"], captions, batch["references"])]
    rewards = np.concatenate(all_rewards)
    names = manager.component_names
    out = {name: float(np.nanmean(rewards[:, k])) for k, name in enumerate(names)}
    out["total"] = float(np.nanmean(shaping.balanced_score(rewards, config.rewards.weights)))
    return out, samples


def _eval_batches(config: Any, eval_source, processor, policy: Policy) -> list[dict[str, Any]]:
    """The held-out split in batches of P*G images (a row count the RL batch already divides over the mesh)."""
    cfg = pipeline_lib.PipelineConfig(
        batch_size=int(config.data.prompts_per_batch) * int(config.sampling.group_size),
        buckets=tuple(config.data.prompt_buckets), shuffle=False, num_epochs=1, pad_id=policy.pad_id,
        concat_keys=family_of(policy).concat_keys, seed=int(config.seed), drop_remainder=True,
    )
    return list(pipeline_lib.make_dataset(eval_source, processor, cfg))


# ---------------------------------------------------------------------------------------------------------------
# The run


def _host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def run(config: Any, workdir: str | os.PathLike, *, echo=print, devices=None) -> RunSummary:
    """Runs (or resumes) the recipe `config` in `workdir` on a mesh of `devices` (default: all devices, which the
    config's mesh shape must cover)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seed = int(config.seed)
    sft_steps, rl_steps = int(config.train.sft_steps), int(config.train.rl_steps)
    total_steps = sft_steps + rl_steps
    G, P = int(config.sampling.group_size), int(config.data.prompts_per_batch)

    train_source, eval_source = prepare_data(config, workdir)
    mesh = make_mesh(MeshShape.from_config(config.mesh), devices=devices)
    corpus = corpus_texts(train_source) if not config.model.hf_dir else None
    policy = build_policy(config, corpus=corpus, seed=seed, mesh=mesh)
    graphdef, params = nnx.split(policy.model)
    params = jax.device_put(params, placement.param_shardings(policy.family, params, mesh, "training"))
    sampling_shardings = placement.param_shardings(policy.family, params, mesh, "sampling")
    for_sampling = lambda p: jax.device_put(p, sampling_shardings)  # noqa: E731
    log_prob_fn = make_log_prob_fn(graphdef, temperature=max(float(config.sampling.temperature), 1e-6))
    sampler = Sampler(graphdef, mesh=mesh)
    processor = batches_lib.PolicyPromptProcessor.for_policy(policy, config.data.prompt)

    def pipeline(batch_size: int, phase_seed: int):
        cfg = pipeline_lib.PipelineConfig(
            batch_size=batch_size, buckets=tuple(config.data.prompt_buckets), seed=phase_seed,
            pad_id=policy.pad_id, concat_keys=family_of(policy).concat_keys, drop_remainder=True,
        )
        return iter(pipeline_lib.make_dataset(train_source, processor, cfg))

    sft_iter = pipeline(int(config.train.sft_batch_size), seed)
    rl_iter = pipeline(P, seed + 1)

    sft_opt, sft_lr = _optimizer(config, lr=float(config.train.sft_lr), total_steps=max(sft_steps, 1),
                                 warmup=min(int(config.optim.warmup_steps), max(sft_steps - 1, 0)))
    rl_opt, rl_lr = _optimizer(config, lr=float(config.optim.lr), total_steps=max(rl_steps * int(config.train.updates_per_batch), 1),
                               warmup=int(config.optim.warmup_steps))
    loss_cfg = losses_lib.LossConfig(
        eps_low=float(config.loss.eps_low), eps_high=float(config.loss.eps_high),
        dual_clip=float(config.loss.dual_clip) or None, kl_coef=float(config.loss.kl_coef),
        aggregation=config.loss.aggregation,
    )
    sft_step = make_sft_step(log_prob_fn, sft_opt)
    rl_update = update_lib.make_update_step(log_prob_fn, rl_opt, loss_cfg,
                                            micro_batches=int(config.train.micro_batches), learning_rate_fn=rl_lr)
    shaping_cfg = shaping.ShapingConfig.from_config(config)
    advantages_fn = jax.jit(lambda r, l, rl: shaping.advantages(r, l, rl, shaping_cfg))

    def fresh_state(step: int, params) -> dict[str, Any]:
        """The state as saved after `step` steps: steps 1..sft_steps carry the SFT optimizer state."""
        opt = sft_opt if 0 < step <= sft_steps or (step == 0 and sft_steps > 0) else rl_opt
        return {"train": update_lib.TrainState.create(params, opt), "rng": jax.random.key(seed)}

    # --- resume --------------------------------------------------------------------------------------------
    checkpointer = ckpt_lib.Checkpointer(
        workdir, ckpt_lib.CheckpointConfig(save_every_steps=int(config.checkpoint.every_steps),
                                           keep_last=int(config.checkpoint.keep)),
    )
    start_step = checkpointer.latest_step() or 0
    state = fresh_state(start_step, params)
    eval_start: dict[str, float] = {}
    if start_step:
        restored = checkpointer.restore(jax.tree.map(lambda x: x, state))
        state = restored.state
        data_state = restored.data_state
        sft_iter.set_state(data_state["sft"])
        rl_iter.set_state(data_state["rl"])
        eval_start = data_state.get("eval_start", {})
        echo(f"resumed from step {start_step} in {workdir}")
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step or None)
    progress = metrics_lib.ConsoleProgress(total_steps, every=int(config.metrics.log_every))
    timer = metrics_lib.PhaseTimer()

    with RewardManager(build_reward_components(config)) as manager:
        eval_batches = _eval_batches(config, eval_source, processor, policy)
        step = start_step
        stopped_early = False
        while step < total_steps:
            in_sft = step < sft_steps
            if step == sft_steps and not eval_start:
                with timer.phase("eval"):
                    eval_start, samples = evaluate_rewards(policy, sampler, for_sampling(state["train"].params),
                                                           manager, eval_batches, config)
                writer.write_samples(step, samples[:8], tag="eval_start")
                echo("eval before RL: " + _fmt(eval_start))
            if step == sft_steps and sft_steps:  # the RL phase starts with a fresh optimizer
                state = {"train": update_lib.TrainState.create(state["train"].params, rl_opt), "rng": state["rng"]}
            if in_sft:
                with timer.phase("data"):
                    batch = next(sft_iter)
                    prompts = batches_lib.prompt_inputs(policy, batch)
                    train_batch = batches_lib.sft_batch(policy, batch, prompts, int(config.sampling.max_new_tokens))
                with timer.phase("update"):
                    train_state, metrics = sft_step(state["train"], placement.place_batch(train_batch, mesh))
                    state = {"train": train_state, "rng": state["rng"]}
                    scalars = _host_scalars(metrics)
                    scalars["sft/learning_rate"] = float(sft_lr(step))
            else:
                state, scalars, samples = _rl_step(
                    policy, sampler, state, rl_iter, manager, rl_update, advantages_fn, config, timer, G, P,
                    mesh=mesh, for_sampling=for_sampling,
                )
                if int(config.metrics.sample_every) and (step + 1) % int(config.metrics.sample_every) == 0:
                    writer.write_samples(step + 1, samples)
            step += 1
            scalars.update(timer.summary())
            scalars.update(sampler.metrics())
            writer.write_scalars(step, scalars)
            progress.update(step, {k: scalars[k] for k in CONSOLE_METRICS if k in scalars})
            if checkpointer.should_save(step) or step == total_steps:
                data_state = {"sft": sft_iter.get_state(), "rl": rl_iter.get_state(), "eval_start": eval_start}
                checkpointer.save(step, state, data_state=data_state, config=config.to_dict())
            if checkpointer.should_stop:
                stopped_early = True
                echo(f"stopping at step {step} after a preemption signal; checkpoint saved")
                break

        eval_end: dict[str, float] = {}
        export_dir = None
        if not stopped_early:
            final = for_sampling(state["train"].params)
            if not eval_start:  # no RL phase ran (or rl_steps == 0 with sft only)
                eval_start, _ = evaluate_rewards(policy, sampler, final, manager, eval_batches, config)
            eval_end, samples = evaluate_rewards(policy, sampler, final, manager, eval_batches, config)
            writer.write_samples(step, samples[:8], tag="eval_end")
            writer.write_scalars(step, {f"eval_end/{k}": v for k, v in eval_end.items()}
                                 | {f"eval_start/{k}": v for k, v in eval_start.items()})
            if config.checkpoint.export_hf:
                export_dir = str(workdir / "export_hf")
                _export(policy, graphdef, state["train"].params, export_dir)
    checkpointer.close()
    writer.close()
    return RunSummary(step, stopped_early, eval_start, eval_end, export_dir)


def _fmt(values: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def _rl_step(policy, sampler, state, rl_iter, manager, rl_update, advantages_fn, config, timer, G, P, *,
             mesh, for_sampling):
    """One RL step: sample G rollouts per prompt, judge, shape rewards into advantages, update.
    Returns (new state, scalars for the metric writers, one sample caption per prompt)."""
    with timer.phase("data"):
        batch = next(rl_iter)
        prompts = batches_lib.prompt_inputs(policy, batch)
    scfg = sampler_config(config, policy)
    rng, key = jax.random.split(state["rng"])
    params = for_sampling(state["train"].params)
    sample_start = time.perf_counter()
    with timer.phase("sample"):
        prepared = sampler.prepare_prompts(prompts, scfg)
        rollout = sampler.decode(params, sampler.prefill(params, prepared, scfg), scfg, key)
        rollout = jax.tree.map(np.asarray, rollout)
    sample_seconds = time.perf_counter() - sample_start
    with timer.phase("reward"):
        captions = batches_lib.completion_texts(policy, rollout)
        judged = manager.score_sync(batches_lib.reward_items(batch, captions, G))
    eos = (rollout.finish_reason == int(FinishReason.EOS)).astype(np.int32)
    lengths = (rollout.lengths - eos).reshape(P, G)
    ref_lengths = batches_lib.reference_lengths(policy, batch)
    with timer.phase("advantages"):
        advantages, shaped = advantages_fn(jnp.asarray(judged.rewards), jnp.asarray(lengths), jnp.asarray(ref_lengths))
        advantages = np.asarray(advantages)
    with timer.phase("update"):
        train_batch = build_training_batch(prepared, rollout, G, tile_vision=batches_lib.tile_vision_for(policy, batch))
        train_batch = {k: (v if k == "vision" else np.asarray(v)) for k, v in train_batch.items()}
        train_batch["advantages"] = advantages.reshape(-1)
        train_batch = placement.place_batch(train_batch, mesh)
        train_state = state["train"]
        metrics: dict[str, Any] = {}
        for _ in range(int(config.train.updates_per_batch)):
            train_state, metrics = rl_update(train_state, train_batch)
        scalars = {f"loss/{k}": v for k, v in _host_scalars(metrics).items()}
    tokens = int(rollout.lengths.sum())
    scalars.update(judged.scalars("reward"))
    scalars.update(metrics_lib.reward_component_stats(np.asarray(judged.rewards), list(judged.component_names)))
    scalars["reward/total_mean"] = float(np.nanmean(shaping.balanced_score(judged.rewards, config.rewards.weights)))
    scalars.update(metrics_lib.array_stats("advantages", advantages))
    scalars.update(metrics_lib.array_stats("length/tokens", lengths))
    scalars["length/ratio_mean"] = float(np.mean(lengths / np.maximum(ref_lengths[:, None], 1)))
    scalars["length/eos_fraction"] = float(eos.mean())
    scalars["sample/tokens"] = float(tokens)
    scalars["sample/tokens_per_s"] = tokens / max(sample_seconds, 1e-9)  # includes compiles on the first step
    samples = [
        {"image_id": batch["example_id"][n // G], "caption": captions[n], "reference": batch["references"][n // G][0],
         "rewards": {name: float(judged.rewards.reshape(-1, len(judged.component_names))[n, k])
                     for k, name in enumerate(judged.component_names)},
         "advantage": float(advantages.reshape(-1)[n])}
        for n in range(0, P * G, G)
    ]
    return {"train": train_state, "rng": rng}, scalars, samples


def _export(policy: Policy, graphdef, params, directory: str) -> None:
    model = nnx.merge(graphdef, params)
    policy.family.save(model, directory)
    if policy.vocab is not None:
        with open(os.path.join(directory, "vocab_subset.json"), "w") as f:
            f.write(policy.vocab.to_json())
