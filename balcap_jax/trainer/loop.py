"""The training run: data -> (SFT warm start) -> [sample G rollouts -> judge -> advantages -> update]* .

Steps are numbered globally: 1..sft_steps are supervised, then rl_steps RL steps. A checkpoint's step therefore
says which phase it belongs to, which fixes the optimizer-state shape to restore into. Everything a resumed run
needs to continue exactly (params, optimizer state, rng key, every data stream's position) is in the checkpoint.
With config.train.overlap="one_step_off" (see trainer/rl_step.py) each RL step samples the next batch before
updating on the current one; a checkpoint then also holds that batch sampled one step ahead (its rollout and
behaviour log-probs, with the data stream's position before it), which a restore redraws, rebuilds and rejudges.

One process or many: every process runs this same function (after `jax.distributed` is initialised); each loads
its share of every batch (`host_data`), judges its own rollouts, and the few host-side reductions (rewards for
the advantages, metrics, iterator states) are gathered. Metrics, samples and exports are written by process 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from balcap_jax import checkpoint as ckpt_lib
from balcap_jax import metrics as metrics_lib
from balcap_jax.data import pipeline as pipeline_lib
from balcap_jax.parallel import hosts
from balcap_jax.rewards.manager import RewardManager
from balcap_jax.rl import update as update_lib
from balcap_jax.sampling.sampler import Sampler
from balcap_jax.trainer import batches as batches_lib
from balcap_jax.trainer import builders
from balcap_jax.trainer import placement
from balcap_jax.rl import shaping
from balcap_jax.trainer import warm_start
from balcap_jax.trainer.data_sources import corpus_texts, eval_description, prepare_data
from balcap_jax.trainer.host_data import HostBatches, resolve_loader_shards
from balcap_jax.trainer.judges import build_reward_components
from balcap_jax.trainer.policy import Policy, build_policy
from balcap_jax.trainer.rl_step import (RLStep, overlap_mode, pending_arrays, pending_template, sample_records,
                                        step_metrics)
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
    "total", the weighted mean) on the held-out split before and after RL (greedy captions); empty when no
    evaluation is configured (`eval_on` is then '')."""

    final_step: int
    stopped_early: bool
    eval_start: dict[str, float]
    eval_end: dict[str, float]
    export_dir: str | None
    eval_on: str = ""

    def gain(self) -> dict[str, float]:
        return {k: self.eval_end[k] - self.eval_start[k] for k in self.eval_end if k in self.eval_start}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def eval_batch_size(config: Any) -> int:
    """Greedy captions per evaluation batch (global): config.eval.batch_size, default P * G (a row count the RL
    batch already divides over the mesh and the loader shards)."""
    size = int(config.get("eval", {}).get("batch_size", 0) or 0)
    return size or int(config.data.prompts_per_batch) * int(config.sampling.group_size)


def eval_batch_limit(config: Any) -> int | None:
    """How many evaluation batches run: config.eval.max_images // eval batch size (at least 1); None = all."""
    cap = int(config.get("eval", {}).get("max_images", 0) or 0)
    return max(cap // eval_batch_size(config), 1) if cap else None


def evaluate_rewards(
    policy: Policy, sampler: Sampler, params: Any, manager: RewardManager, batches, config: Any,
    *, limit: int | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy captions of the held-out batches (streamed from `batches`, a fresh `HostBatches`; at most `limit`
    of them), judged: mean per component and the weighted total over every process's images. `params` should be
    in the sampling layout. Returns (means, this process's sample records)."""
    scfg = builders.sampler_config(config, policy, greedy=True)
    all_rewards, samples, count = [], [], 0
    while limit is None or count < limit:
        batch = batches.next_or_none()
        if batch is None:
            break
        count += 1
        captions = batches_lib.greedy_captions(policy, sampler, params, batch, scfg)
        judged = manager.score_sync(batches_lib.reward_items(batch, captions, 1))
        all_rewards.append(hosts.allgather(judged.rewards.reshape(-1, judged.rewards.shape[-1])))
        samples += [{"image_id": i, "caption": c, "reference": r[0]}
                    for i, c, r in zip(batch["example_id"], captions, batch["references"])]
    if not all_rewards:
        raise ValueError(
            "the held-out split yields no full batch: it must hold at least config.eval.batch_size images (default "
            "prompts_per_batch * group_size); add images (config.data.shapes_world.num_eval, the eval manifest or "
            "config.data.eval_fraction) or lower config.eval.batch_size"
        )
    rewards = np.concatenate(all_rewards)
    names = manager.component_names
    out = {name: float(np.nanmean(rewards[:, k])) for k, name in enumerate(names)}
    out["total"] = float(np.nanmean(shaping.balanced_score(rewards, config.rewards.weights)))
    b_cap = shaping.mean_b_capscore(rewards, names)
    if b_cap is not None:
        out["b_capscore"] = b_cap
    return out, samples


# ---------------------------------------------------------------------------------------------------------------
# The run


def run(config: Any, workdir: str | os.PathLike, *, echo=print, devices=None) -> RunSummary:
    """Runs (or resumes) the recipe `config` in `workdir` on a mesh of `devices` (default: all devices of all
    processes, which the config's mesh shape must cover)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    process_count, process_index = jax.process_count(), jax.process_index()
    chief = process_index == 0
    say = echo if chief else (lambda *_: None)
    seed = int(config.seed)
    sft_steps, rl_steps = int(config.train.sft_steps), int(config.train.rl_steps)
    total_steps = sft_steps + rl_steps
    G, P = int(config.sampling.group_size), int(config.data.prompts_per_batch)
    eval_every = int(config.metrics.eval_every)
    overlap = overlap_mode(config)

    warm_start.check_config(config)  # before any data or model is built
    train_source, eval_source = prepare_data(config, workdir)
    eval_on = eval_description(config) if eval_source is not None else ""
    mesh = builders.mesh(config, devices)
    corpus = corpus_texts(train_source) if not config.model.hf_dir else None
    policy = build_policy(config, corpus=corpus, seed=seed, mesh=mesh)
    graphdef, params = nnx.split(policy.model)
    if config.train.get("init_from", ""):  # a shipped warm start replaces the random weights (before SFT and RL)
        params = warm_start.load_into(params, policy.vocab, str(config.train.init_from))
    params = hosts.to_sharding(params, placement.param_shardings(policy.family, params, mesh, "training"))
    # One program reshards (and casts) every leaf into the rollout copy; the AOT tool compiles the same one.
    for_sampling = placement.rollout_copy(config, policy, params, mesh)
    sampler = Sampler(graphdef, mesh=for_sampling.mesh, cache_heads=for_sampling.cache_heads,
                      cache_rows=for_sampling.cache_rows)
    processor = batches_lib.PolicyPromptProcessor.for_policy(policy, config.data.prompt)
    loader_shards = resolve_loader_shards(int(config.data.get("loader_shards", 0)), process_count)

    def batches(source, global_batch: int, phase_seed: int, *, shuffle: bool = True,
                num_epochs: int | None = None) -> HostBatches:
        cfg = pipeline_lib.PipelineConfig(
            batch_size=global_batch, buckets=tuple(config.data.prompt_buckets), seed=phase_seed,
            pad_id=policy.pad_id, concat_keys=policy.family.concat_keys, drop_remainder=True,
            shuffle=shuffle, num_epochs=num_epochs,
        )
        return HostBatches.create(source, processor, cfg, loader_shards=loader_shards, global_batch_size=global_batch,
                                  process_count=process_count, process_index=process_index)

    sft_iter = batches(train_source, int(config.train.sft_batch_size), seed)
    rl_iter = batches(train_source, P, seed + 1)
    eval_batches: Callable[[], HostBatches] | None = None
    if eval_source is not None:
        eval_batches = lambda: batches(eval_source, eval_batch_size(config), seed, shuffle=False, num_epochs=1)  # noqa: E731

    sft_opt, sft_lr = builders.sft_optimizer(config)
    rl_opt, _ = builders.rl_optimizer(config)
    sft_step = make_sft_step(builders.sft_log_prob_fn(graphdef), sft_opt)
    rl_update = builders.rl_update_step(graphdef, config)

    use_reference = float(config.loss.kl_coef) > 0
    reference_dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else None

    def reference_of(params) -> Any:
        """The frozen KL reference: the policy as RL starts, in the sampling layout (and bf16 in bf16 recipes)."""
        return update_lib.frozen_reference(for_sampling(params), reference_dtype)

    def fresh_state(step: int, params) -> dict[str, Any]:
        """The state as saved after `step` steps: steps 1..sft_steps carry the SFT optimizer state; RL steps
        carry the frozen reference when the loss has a KL term (it cannot be rebuilt from a moved policy)."""
        opt = sft_opt if 0 < step <= sft_steps or (step == 0 and sft_steps > 0) else rl_opt
        state = {"train": update_lib.TrainState.create(params, opt), "rng": jax.random.key(seed)}
        if use_reference and step > sft_steps:
            state["reference"] = reference_of(params)
        return hosts.globalize(state, mesh)

    # --- resume --------------------------------------------------------------------------------------------
    checkpointer = ckpt_lib.Checkpointer(
        workdir, ckpt_lib.CheckpointConfig(save_every_steps=int(config.checkpoint.every_steps),
                                           keep_last=int(config.checkpoint.keep)),
    )
    start_step = checkpointer.latest_step() or 0
    state = fresh_state(start_step, params)
    del params
    eval_start: dict[str, float] = {}
    # With train.overlap="one_step_off" a checkpoint also holds the batch sampled one step ahead (its rollout
    # and behaviour log-probs; its iterator state is the one before it was drawn): restored and rejudged.
    restored_pending: tuple[dict[str, Any], int] | None = None
    if start_step:
        target = jax.tree.map(lambda x: x, state)
        pending_version = checkpointer.restore_data_state(start_step).get("rl_pending_version")
        if pending_version is not None:
            if overlap == "none":
                raise ValueError(
                    f"the checkpoint at step {start_step} in {workdir} holds a batch sampled one step ahead "
                    "(saved with config.train.overlap='one_step_off'); resume with "
                    "--config.train.overlap=one_step_off"
                )
            target["pending"] = pending_template(mesh, P * G, int(config.sampling.max_new_tokens))
        restored = checkpointer.restore(target)
        state = restored.state
        if pending_version is not None:
            restored_pending = (state.pop("pending"), int(pending_version))
        data_state = restored.data_state
        sft_iter.set_state(data_state["sft"], process_count=process_count, process_index=process_index)
        rl_iter.set_state(data_state["rl"], process_count=process_count, process_index=process_index)
        eval_start = data_state.get("eval_start", {})
        say(f"resumed from step {start_step} in {workdir}")
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step or None)
    progress = metrics_lib.ConsoleProgress(total_steps, every=int(config.metrics.log_every))
    timer = metrics_lib.PhaseTimer()

    # The models pin activations to the batch axes only under a mesh context (`layers.constrain_batch`), and the
    # AOT tool compiles under the same context (tests/tools/test_tools_aot.py: identical update programs).
    with jax.set_mesh(mesh), RewardManager(build_reward_components(config, workdir=workdir)) as manager:
        rl_step = RLStep(policy, sampler, rl_update, manager, config, mesh, for_sampling)
        pending, pending_data_state = None, None  # the batch sampled one step ahead; rl_iter's state before it
        if restored_pending is not None:
            pending_data_state = data_state["rl"]
            arrays, version = restored_pending
            pending = rl_step.restore_pending(arrays, next(rl_iter), version)

        def evaluate(tag: str, step: int) -> dict[str, float]:
            with timer.phase("eval"):
                means, samples = evaluate_rewards(policy, sampler, for_sampling(state["train"].params), manager,
                                                  eval_batches(), config, limit=eval_batch_limit(config))
            writer.write_samples(step, samples[:8], tag=tag)
            writer.write_scalars(step, {f"{tag}/{k}": v for k, v in means.items()})
            return means

        step = start_step
        stopped_early = False
        last_write = time.perf_counter()
        while step < total_steps:
            in_sft = step < sft_steps
            if step == sft_steps and eval_batches is not None and not eval_start:
                eval_start = evaluate("eval_start", step)
                say("eval before RL: " + _fmt(eval_start))
            if step == sft_steps and sft_steps:  # the RL phase starts with a fresh optimizer
                state = {"train": hosts.globalize(update_lib.TrainState.create(state["train"].params, rl_opt), mesh),
                         "rng": state["rng"]}
            if step == sft_steps and use_reference and "reference" not in state:
                state["reference"] = reference_of(state["train"].params)
            if in_sft:
                with timer.phase("data"):
                    batch = next(sft_iter)
                    train_batch = batches_lib.sft_batch(policy, batch, int(config.sampling.max_new_tokens), mesh=mesh)
                with timer.phase("update"):
                    train_state, metrics = sft_step(state["train"], placement.place_batch(train_batch, mesh))
                    state = {"train": train_state, "rng": state["rng"]}
                    scalars = {k: float(hosts.host_value(v)) for k, v in metrics.items()}
                    scalars["sft/learning_rate"] = float(sft_lr(step))
            else:
                if overlap == "none":
                    with timer.phase("data"):
                        batch = next(rl_iter)
                    result = rl_step(state, batch, timer)
                else:
                    version = step - sft_steps  # RL updates applied to the current weights
                    if pending is None:  # the first RL step: its own batch is sampled now
                        with timer.phase("data"):
                            batch = next(rl_iter)
                        pending, state = rl_step.sample(state, batch, timer, version=version)
                    next_batch = None
                    if step + 1 < total_steps:
                        with timer.phase("data"):
                            pending_data_state, next_batch = rl_iter.get_state(), next(rl_iter)
                    result, pending = rl_step.step_overlapped(state, pending, next_batch, timer, version=version)
                state = result.state
                scalars = step_metrics(result, config.rewards.weights)
                if int(config.metrics.sample_every) and (step + 1) % int(config.metrics.sample_every) == 0:
                    writer.write_samples(step + 1, sample_records(result, G))
            step += 1
            scalars.update(timer.summary())
            now = time.perf_counter()  # the phases leave host work untimed; this is the whole step, as a user waits
            scalars["time/step_wall_s"], last_write = now - last_write, now
            scalars.update(sampler.metrics())
            writer.write_scalars(step, scalars)
            progress.update(step, {k: scalars[k] for k in CONSOLE_METRICS if k in scalars})
            rl_done = step - sft_steps
            if (eval_batches is not None and eval_every and step > sft_steps and rl_done % eval_every == 0
                    and step < total_steps):
                say(f"eval at step {step}: " + _fmt(evaluate("eval", step)))
            if checkpointer.should_save(step) or step == total_steps:
                saved = state
                data_state = {"sft": sft_iter.get_state(), "rl": rl_iter.get_state(), "eval_start": eval_start}
                if pending is not None:  # saved with the step, rejudged after a restore: never lost nor counted twice
                    saved = {**state, "pending": pending_arrays(pending, mesh)}
                    data_state.update(rl=pending_data_state, rl_pending_version=pending.version)
                checkpointer.save(step, saved, data_state=data_state, config=config.to_dict())
            if checkpointer.should_stop:
                stopped_early = True
                say(f"stopping at step {step} after a preemption signal; checkpoint saved")
                break

        eval_end: dict[str, float] = {}
        export_dir = None
        if not stopped_early:
            if eval_batches is not None:
                if not eval_start:  # no RL phase ran: the start is the end
                    eval_start = evaluate("eval_start", step)
                eval_end = evaluate("eval_end", step)
            if config.checkpoint.export_hf:
                export_dir = str(workdir / "export_hf")
                _export(policy, graphdef, state["train"].params, export_dir, str(config.model.hf_dir or ""))
    checkpointer.close()
    writer.close()
    return RunSummary(step, stopped_early, eval_start, eval_end, export_dir, eval_on)


def _fmt(values: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


# What an HF checkpoint holds besides weights and config.json: copied into the export so it loads and serves as
# the original did (vLLM, transformers, `python -m balcap_jax.evaluate --checkpoint=<export>`).
_HF_SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja")


def _export(policy: Policy, graphdef, params, directory: str, hf_dir: str = "") -> None:
    model = nnx.merge(graphdef, params)
    policy.family.save(model, directory)  # collective: every process takes part, process 0 writes
    if jax.process_index() != 0:
        return
    if policy.vocab is not None:
        with open(os.path.join(directory, "vocab_subset.json"), "w") as f:
            f.write(policy.vocab.to_json())
    if hf_dir:
        policy.tokenizer.save_pretrained(directory)
        for name in _HF_SIDE_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy(os.path.join(hf_dir, name), os.path.join(directory, name))
