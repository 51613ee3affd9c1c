"""One RL step — sample G rollouts per prompt → judge → advantages → update — as one object, used by the training
loop and by `experiments/bench_rl_step.py` alike (so the benchmark times what the loop runs).

Multi-process: each process samples into the global arrays, decodes and judges *its own* rows, and the rewards,
lengths and reference lengths are gathered so that every process computes the same advantages (c-GDPO's batch
statistics need all of them); each process then feeds its rows of the training batch.
"""

from __future__ import annotations

import dataclasses
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
from balcap_jax.sampling.rollout import FinishReason, Rollout, build_training_batch
from balcap_jax.sampling.sampler import Sampler
from balcap_jax.trainer import batches as batches_lib
from balcap_jax.trainer import builders
from balcap_jax.trainer import placement
from balcap_jax.trainer import shaping
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
        self.recompute_old = builders.old_logprobs_mode(self.config) == "batch"
        self.use_reference = float(self.config.loss.kl_coef) > 0
        needs_forward = self.recompute_old or self.use_reference
        self.batch_logprobs = builders.rl_batch_logprobs(self.sampler.graphdef, self.config) if needs_forward else None

    def __call__(self, state: dict[str, Any], batch: Mapping[str, Any], timer: metrics_lib.PhaseTimer) -> RLStepResult:
        G, policy, scfg = self.group_size, self.policy, self.sampler_config
        prompts = batches_lib.prompt_inputs(policy, batch)
        rng, key = jax.random.split(state["rng"])
        params = self.for_sampling(state["train"].params)
        start = time.perf_counter()
        with timer.phase("sample"):
            prepared = self.sampler.prepare_prompts(prompts, scfg)
            rollout = self.sampler.decode(params, self.sampler.prefill(params, prepared, scfg), scfg, key)
            rollout = batches_lib.local_rollout(rollout)
        del params
        sample_seconds = time.perf_counter() - start
        with timer.phase("reward"):
            captions = batches_lib.completion_texts(policy, rollout)
            judged = self.manager.score_sync(batches_lib.reward_items(batch, captions, G))
            rewards = hosts.allgather(judged.rewards)
        lengths = hosts.allgather(caption_lengths(rollout).reshape(-1, G))
        ref_lengths = hosts.allgather(batches_lib.reference_lengths(policy, batch))
        with timer.phase("advantages"):
            advantages, _ = self._advantages(jnp.asarray(rewards), jnp.asarray(lengths), jnp.asarray(ref_lengths))
            advantages = np.asarray(advantages)
        with timer.phase("update"):
            train_batch = build_training_batch(prepared, rollout, G,
                                               tile_vision=batches_lib.tile_vision_for(policy, batch))
            train_batch = {k: (v if k == "vision" else np.asarray(v)) for k, v in train_batch.items()}
            mine = hosts.rows_of_process(self.mesh, advantages.size)
            train_batch["advantages"] = advantages.reshape(-1)[mine]
            train_batch = placement.place_batch(train_batch, self.mesh)
            if self.recompute_old:  # pi_old once per batch, by the trainer's forward (not the sampler's)
                train_batch["trainer_logprobs"] = self.batch_logprobs(state["train"].params, train_batch)
            if self.use_reference:
                train_batch["ref_logprobs"] = self.batch_logprobs(state["reference"], train_batch)
            train_state, metrics = state["train"], {}
            for _ in range(self.updates_per_batch):
                train_state, metrics = self.update(train_state, train_batch)
            update_metrics = {k: float(hosts.host_value(v)) for k, v in metrics.items()}
        tokens = int(hosts.allgather(np.asarray([rollout.lengths.sum()], np.int64)).sum())
        return RLStepResult(
            state={**state, "train": train_state, "rng": rng}, batch=batch, rollout=rollout, captions=captions,
            rewards=rewards, component_names=tuple(judged.component_names), judge_scalars=judge_scalars(judged, rewards),
            lengths=lengths, ref_lengths=ref_lengths, advantages=advantages, update_metrics=update_metrics,
            sample_seconds=sample_seconds, tokens=tokens, row_offset=mine.start,
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
