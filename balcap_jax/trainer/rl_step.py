"""One RL step — sample G rollouts per prompt → judge → advantages → update — as one object, used by the training
loop and by `experiments/bench_rl_step.py` alike (so the benchmark times what the loop runs).

Multi-process: each process samples into the global arrays, decodes and judges *its own* rows, and the rewards,
lengths and reference lengths are gathered so that every process computes the same advantages (c-GDPO's batch
statistics need all of them); each process then feeds its rows of the training batch.

A step is two halves, `sample` (rollouts, the training batch, the behaviour policy's log-probs, judging
submitted) and `finish` (wait for the rewards, advantages, update). `config.train.overlap="none"` runs them back
to back; "one_step_off" (`step_overlapped`) samples batch t+1 with the weights of version v while batch t (sampled
by version v - 1) is being judged, then updates on batch t: the judges' latency hides behind sampling and the
update, at the price of one version of staleness, which the ratio corrects exactly because pi_old is the
log-probs of the weights that sampled the batch, computed by the trainer right after sampling.

The update sees the completion columns up to a power-of-two bucket of the batch's longest generated row
(`rollout.completion_bucket`, agreed over processes), so short captions do not pay for the whole buffer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from balcap_jax import metrics as metrics_lib
from balcap_jax.parallel import hosts
from balcap_jax.rewards.manager import RewardManager
from balcap_jax.sampling.config import SamplerConfig
from balcap_jax.rl import losses as losses_lib
from balcap_jax.sampling.rollout import FinishReason, Rollout, build_training_batch, completion_bucket, trim_rollout
from balcap_jax.sampling.sampler import Sampler
from balcap_jax.trainer import batches as batches_lib
from balcap_jax.trainer import builders
from balcap_jax.trainer import placement
from balcap_jax.rl import shaping
from balcap_jax.trainer.policy import Policy


def caption_lengths(rollout: Rollout) -> np.ndarray:
    """Caption tokens per row, EOS excluded: int32[N] (host rollout)."""
    eos = (np.asarray(rollout.finish_reason) == int(FinishReason.EOS)).astype(np.int32)
    return np.asarray(rollout.lengths) - eos


@dataclasses.dataclass
class RLStepResult:
    """What one step produced. Global arrays (the same on every process): rewards [P, G, K], lengths [P, G],
    ref_lengths [P], advantages [P, G]. This process's rows: captions (P_local·G), batch (its host batch),
    rollout (host numpy)."""

    state: dict[str, Any]
    batch: Mapping[str, Any]
    rollout: Rollout
    captions: list[str]
    rewards: np.ndarray
    component_names: tuple[str, ...]
    judge_scalars: dict[str, float]
    lengths: np.ndarray
    ref_lengths: np.ndarray
    advantages: np.ndarray
    update_metrics: dict[str, float]
    sample_seconds: float
    tokens: int
    row_offset: int  # where this process's rows start in the global [P·G] order
    staleness: int = 0  # policy version at the update minus the version that sampled the batch
    completion_columns: int = 0  # completion columns the update ran on (after trimming)
    update_widths: int = 0  # distinct completion widths updated on so far (one compiled update each)


OVERLAP_MODES = ("none", "one_step_off")


def overlap_mode(config: Any) -> str:
    """config.train.overlap ("none" when absent), validated."""
    mode = config.train.get("overlap", "none")
    if mode not in OVERLAP_MODES:
        raise ValueError(
            f"config.train.overlap={mode!r} is not allowed; use 'none' (judge each batch before its update) or "
            "'one_step_off' (sample the next batch while this one is judged)"
        )
    return mode


def trimming_keeps_loss(loss_config: losses_lib.LossConfig) -> bool:
    """Whether cutting padded completion columns leaves the loss unchanged: always, except for the Dr. GRPO
    aggregation with no fixed norm_length, whose constant is then the batch's column count."""
    return loss_config.aggregation != "seq-mean-token-sum-norm" or loss_config.norm_length is not None


@dataclasses.dataclass
class SampledBatch:
    """A batch sampled and submitted to the judges, not yet updated on.

    batch: this process's host batch. rollout: this process's rows, host numpy, the full [N_local, T_new]
    buffers. captions: this process's completions. train_batch: the placed training batch (global arrays,
    completion columns trimmed to `columns`), without advantages. behaviour_logprobs: float32[N, columns] (global),
    the trainer's log-probs under the weights that sampled the batch, or None when the update takes pi_old
    from its own pass. version: RL updates applied to those weights. judging: the future of its RewardBatch."""

    batch: Mapping[str, Any]
    rollout: Rollout
    captions: list[str]
    train_batch: dict[str, Any]
    behaviour_logprobs: jax.Array | None
    version: int
    columns: int
    sample_seconds: float
    judging: concurrent.futures.Future


# What a checkpoint holds of a sampled batch still waiting for its update (the rest is rebuilt from its data
# batch, which the restored iterator yields again): the rollout's rows and the behaviour log-probs.
_PENDING_ROW_FIELDS = ("tokens", "logprobs", "completion_mask", "lengths", "finish_reason", "start_positions")


def pending_template(mesh: jax.sharding.Mesh, rows: int, max_new_tokens: int) -> dict[str, jax.Array]:
    """Arrays shaped and sharded like `pending_arrays` of a batch of `rows` global rows (a restore target)."""
    local = rows // jax.process_count()
    shapes = {"tokens": ((local, max_new_tokens), np.int32), "logprobs": ((local, max_new_tokens), np.float32),
              "completion_mask": ((local, max_new_tokens), bool), "lengths": ((local,), np.int32),
              "finish_reason": ((local,), np.int32), "start_positions": ((local,), np.int32),
              "behaviour_logprobs": ((local, max_new_tokens), np.float32)}
    out = {k: hosts.global_rows(np.zeros(shape, dtype), mesh) for k, (shape, dtype) in shapes.items()}
    out["decode_steps"] = hosts.replicated(np.zeros((), np.int32), mesh)
    return out


def pending_arrays(sampled: SampledBatch, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """The checkpointed part of a pending batch, as global arrays (behaviour log-probs padded to T_new)."""
    if sampled.behaviour_logprobs is None:
        raise ValueError("a pending batch needs its behaviour log-probs to be checkpointed (train.overlap set)")
    out = {k: hosts.global_rows(np.asarray(getattr(sampled.rollout, k)), mesh) for k in _PENDING_ROW_FIELDS}
    behaviour = hosts.local_rows(sampled.behaviour_logprobs)
    pad = sampled.rollout.max_new_tokens - behaviour.shape[1]
    out["behaviour_logprobs"] = hosts.global_rows(np.pad(behaviour, ((0, 0), (0, pad))), mesh)
    out["decode_steps"] = hosts.replicated(np.asarray(sampled.rollout.decode_steps, np.int32), mesh)
    return out


@dataclasses.dataclass
class RLStep:
    """Callable `(state, batch, timer) -> RLStepResult`; `state` is {"train": TrainState, "rng": key} plus
    "reference" (the frozen reference policy's params) when `loss.kl_coef > 0`.

    for_sampling: training params -> the rollout copy of the weights (the sampling layout)."""

    policy: Policy
    sampler: Sampler
    update: Callable[..., Any]
    manager: RewardManager
    config: Any
    mesh: jax.sharding.Mesh
    for_sampling: Callable[[Any], Any]

    def __post_init__(self):
        self.group_size = int(self.config.sampling.group_size)
        self.sampler_config: SamplerConfig = builders.sampler_config(self.config, self.policy)
        shaping_cfg = builders.shaping_config(self.config)
        self._advantages = jax.jit(lambda r, l, rl: shaping.advantages(r, l, rl, shaping_cfg))
        self.updates_per_batch = int(self.config.train.updates_per_batch)
        self.overlap = overlap_mode(self.config)
        self.behaviour_forward = builders.old_logprobs_mode(self.config) == "batch"
        if self.overlap != "none" and not self.behaviour_forward:
            raise ValueError(
                f"config.train.overlap={self.overlap!r} updates on batches the previous weights sampled, so pi_old "
                "must be the behaviour policy's log-probs: builders.old_logprobs_mode must return 'batch' whenever "
                "train.overlap is not 'none' (it returned 'current'); or set config.train.overlap='none'"
            )
        self.use_reference = float(self.config.loss.kl_coef) > 0
        needs_forward = self.behaviour_forward or self.use_reference
        self.batch_logprobs = builders.rl_batch_logprobs(self.sampler.graphdef, self.config) if needs_forward else None
        self.trim = trimming_keeps_loss(builders.loss_config(self.config))
        self.update_widths: set[int] = set()

    def __call__(self, state: dict[str, Any], batch: Mapping[str, Any], timer: metrics_lib.PhaseTimer) -> RLStepResult:
        """One step without overlap: sample, wait for the judges, update."""
        sampled, state = self.sample(state, batch, timer, version=0)
        return self.finish(state, sampled, timer, version=0)

    def step_overlapped(
        self, state: dict[str, Any], pending: SampledBatch, next_batch: Mapping[str, Any] | None,
        timer: metrics_lib.PhaseTimer, *, version: int,
    ) -> tuple[RLStepResult, SampledBatch | None]:
        """One "one_step_off" step: sample `next_batch` (None at the last step) with the weights of `version`
        while `pending` is being judged, then update on `pending`. Returns (its result, the new pending batch)."""
        upcoming = None
        if next_batch is not None:
            upcoming, state = self.sample(state, next_batch, timer, version=version)
        return self.finish(state, pending, timer, version=version), upcoming

    def sample(
        self, state: dict[str, Any], batch: Mapping[str, Any], timer: metrics_lib.PhaseTimer, *, version: int,
    ) -> tuple[SampledBatch, dict[str, Any]]:
        """Rollouts of `batch` under state's weights (policy `version`), submitted to the judges at once, and
        the training batch with the behaviour log-probs. Returns (the sampled batch, state with its rng advanced)."""
        policy, scfg = self.policy, self.sampler_config
        prompts = batches_lib.prompt_inputs(policy, batch, self.sampler.layout.mesh)
        rng, key = jax.random.split(state["rng"])
        params = self.for_sampling(state["train"].params)
        start = time.perf_counter()
        with timer.phase("sample"):
            prepared = self.sampler.prepare_prompts(prompts, scfg)
            rollout = self.sampler.decode(params, self.sampler.prefill(params, prepared, scfg), scfg, key)
            rollout = batches_lib.local_rollout(rollout)
        del params
        sample_seconds = time.perf_counter() - start
        sampled = self._submit(batch, prepared, rollout, version, sample_seconds)
        behaviour = None
        if self.behaviour_forward:
            with timer.phase("old_logprobs"):  # dispatched asynchronously: it runs while the judges work
                behaviour = self.batch_logprobs(state["train"].params, sampled.train_batch)
        return dataclasses.replace(sampled, behaviour_logprobs=behaviour), {**state, "rng": rng}

    def restore_pending(self, arrays: Mapping[str, Any], batch: Mapping[str, Any], version: int) -> SampledBatch:
        """The pending batch of a checkpoint (`pending_arrays`), its data batch `batch` drawn again from the
        restored iterator: rebuilt exactly and resubmitted to the judges (its judging never reached the save)."""
        rows = {k: hosts.local_rows(arrays[k]) for k in _PENDING_ROW_FIELDS}
        rollout = Rollout(**rows, decode_steps=np.asarray(hosts.host_value(arrays["decode_steps"]), np.int32))
        prompts = batches_lib.prompt_inputs(self.policy, batch, self.sampler.layout.mesh)
        prepared = self.sampler.prepare_prompts(prompts, self.sampler_config)
        sampled = self._submit(batch, prepared, rollout, version, math.nan)  # sampled before the restart: unknown
        behaviour = hosts.local_rows(arrays["behaviour_logprobs"])[:, : sampled.columns]
        return dataclasses.replace(sampled, behaviour_logprobs=hosts.global_rows(behaviour, self.mesh))

    def _submit(self, batch: Mapping[str, Any], prepared: Mapping[str, Any], rollout: Rollout, version: int,
                sample_seconds: float) -> SampledBatch:
        captions = batches_lib.completion_texts(self.policy, rollout)
        judging = self.manager.submit(batches_lib.reward_items(batch, captions, self.group_size))
        columns = rollout.max_new_tokens
        if self.trim:  # every process must cut to the same width: the longest row over all of them
            columns = completion_bucket(hosts.agree_max(int(np.max(rollout.lengths))), rollout.max_new_tokens)
        train_batch = build_training_batch(prepared, trim_rollout(rollout, columns), self.group_size,
                                           tile_vision=batches_lib.tile_vision_for(
                                               self.policy, batch, self.mesh, int(self.config.train.micro_batches)))
        train_batch = {k: (v if k == "vision" else np.asarray(v)) for k, v in train_batch.items()}
        return SampledBatch(batch=batch, rollout=rollout, captions=captions,
                            train_batch=placement.place_batch(train_batch, self.mesh), behaviour_logprobs=None,
                            version=version, columns=columns, sample_seconds=sample_seconds, judging=judging)

    def finish(self, state: dict[str, Any], sampled: SampledBatch, timer: metrics_lib.PhaseTimer, *,
               version: int) -> RLStepResult:
        """Waits for `sampled`'s rewards, computes the advantages and updates the weights (of `version`)."""
        G, policy, batch, rollout = self.group_size, self.policy, sampled.batch, sampled.rollout
        with timer.phase("reward"):
            judged = sampled.judging.result()
            rewards = hosts.allgather(judged.rewards)
        lengths = hosts.allgather(caption_lengths(rollout).reshape(-1, G))
        ref_lengths = hosts.allgather(batches_lib.reference_lengths(policy, batch))
        with timer.phase("advantages"):
            advantages, _ = self._advantages(jnp.asarray(rewards), jnp.asarray(lengths), jnp.asarray(ref_lengths))
            advantages = np.asarray(advantages)
        with timer.phase("update"):
            mine = hosts.rows_of_process(self.mesh, advantages.size)
            train_batch = {**sampled.train_batch,
                           **placement.place_batch({"advantages": advantages.reshape(-1)[mine]}, self.mesh)}
            if sampled.behaviour_logprobs is not None:  # pi_old: the weights that sampled the batch
                train_batch["trainer_logprobs"] = sampled.behaviour_logprobs
            if self.use_reference:
                train_batch["ref_logprobs"] = self.batch_logprobs(state["reference"], train_batch)
            train_state, metrics = state["train"], {}
            for _ in range(self.updates_per_batch):
                train_state, metrics = self.update(train_state, train_batch)
            update_metrics = {k: float(hosts.host_value(v)) for k, v in metrics.items()}
        self.update_widths.add(sampled.columns)
        tokens = int(hosts.allgather(np.asarray([rollout.lengths.sum()], np.int64)).sum())
        return RLStepResult(
            state={**state, "train": train_state}, batch=batch, rollout=rollout, captions=sampled.captions,
            rewards=rewards, component_names=tuple(judged.component_names), judge_scalars=judge_scalars(judged, rewards),
            lengths=lengths, ref_lengths=ref_lengths, advantages=advantages, update_metrics=update_metrics,
            sample_seconds=sampled.sample_seconds, tokens=tokens, row_offset=mine.start,
            staleness=version - sampled.version, completion_columns=sampled.columns,
            update_widths=len(self.update_widths),
        )


_SUMMED = ("errors", "judge_calls", "cache_hits", "nan_count")


def judge_scalars(judged: Any, rewards: np.ndarray, prefix: str = "reward") -> dict[str, float]:
    """The judges' scalars over every process: counts summed, latencies the slowest process's, and each
    component's mean/std over `rewards` (every process's scores, [P, G, K]; the same on every process)."""
    local = judged.scalars(prefix)
    if not hosts.is_multiprocess():
        return local
    keys = sorted(local)
    table = hosts.allgather(np.asarray([[local[k] for k in keys]], np.float64))  # [processes, keys]
    out = {k: float(table[:, i].sum() if k.endswith(_SUMMED) else table[:, i].max()) for i, k in enumerate(keys)}
    rewards = np.asarray(rewards, np.float64).reshape(-1, len(judged.component_names))
    for k, name in enumerate(judged.component_names):
        scored = rewards[:, k][~np.isnan(rewards[:, k])]
        out[f"{prefix}/{name}/mean"] = float(scored.mean()) if scored.size else float("nan")
        out[f"{prefix}/{name}/std"] = float(scored.std()) if scored.size else float("nan")
    return out


def step_metrics(result: RLStepResult, weights) -> dict[str, float]:
    """The scalars one RL step logs (every process computes the same values from the gathered arrays)."""
    scalars = {f"loss/{k}": v for k, v in result.update_metrics.items()}
    scalars.update(result.judge_scalars)
    scalars.update(metrics_lib.reward_component_stats(result.rewards, list(result.component_names)))
    scalars["reward/total_mean"] = float(np.nanmean(shaping.balanced_score(result.rewards, weights)))
    b_cap = shaping.mean_b_capscore(result.rewards, result.component_names)
    if b_cap is not None:
        scalars["reward/b_capscore_mean"] = b_cap
    scalars.update(metrics_lib.array_stats("advantages", result.advantages))
    scalars.update(metrics_lib.array_stats("length/tokens", result.lengths))
    scalars["length/ratio_mean"] = float(np.mean(result.lengths / np.maximum(result.ref_lengths[:, None], 1)))
    eos = np.asarray(result.rollout.finish_reason) == int(FinishReason.EOS)
    scalars["length/eos_fraction"] = float(hosts.allgather(eos.astype(np.float32)).mean())
    scalars["sample/tokens"] = float(result.tokens)
    scalars["sample/tokens_per_s"] = result.tokens / max(result.sample_seconds, 1e-9)  # first step: with compiles
    scalars["overlap/staleness"] = float(result.staleness)
    scalars["update/completion_columns"] = float(result.completion_columns)
    scalars["update/compiled_widths"] = float(result.update_widths)  # bounded by the power-of-two buckets
    return scalars


def sample_records(result: RLStepResult, group_size: int) -> list[dict[str, Any]]:
    """One logged caption per prompt of this process (the first of its group), with its rewards and advantage."""
    names = result.component_names
    local_rewards = result.rewards.reshape(-1, len(names))
    offset = result.row_offset
    advantages = result.advantages.reshape(-1)
    batch = result.batch
    return [
        {"image_id": batch["example_id"][n // group_size], "caption": result.captions[n],
         "reference": batch["references"][n // group_size][0],
         "rewards": {name: float(local_rewards[offset + n, k]) for k, name in enumerate(names)},
         "advantage": float(advantages[offset + n])}
        for n in range(0, len(result.captions), group_size)
    ]
