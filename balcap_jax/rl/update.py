"""The policy update: `(TrainState, batch) -> (TrainState, metrics)`, jitted, donated, sharding-agnostic.

The batch is a dict of arrays (B sequences, T tokens, T_c <= T scored trailing positions):
  "input_ids"       int32[B, T]
  "attention_mask"  bool[B, T]
  "positions"       int32[B, T] or int32[3, B, T] (M-RoPE)
  "completion_mask" bool[B, T_c]    True on generated tokens that carry loss (aligned with input_ids[:, -T_c:])
  "old_logprobs"    float32[B, T_c] the *sampler's* log-probs of the sampled tokens (same temperature), as
                    `sampling/rollout.build_training_batch` writes them; used for TIS and the mismatch metrics only
  "advantages"      float32[B]      one per sequence (rl/advantages.py flattened over [P, G])
  "trainer_logprobs" float32[B, T_c] required when old_logprobs="batch": the trainer's log-probs under the
                    params before this batch's first update (`make_batch_logprobs`)
  "ref_logprobs"    float32[B, T_c] optional; required when LossConfig.kl_coef > 0 (`make_batch_logprobs` on a
                    `frozen_reference` of the initial policy)
  anything else     model inputs passed through to `hidden_states` (e.g. "vision")

The importance ratio is never taken against the sampler: a bf16 sampler (bf16 KV cache, one token at a time)
and the trainer's full forward disagree, so such a ratio is not 1 at the first update, clips tokens for nothing,
and makes clip_fraction / kl_to_old measure that mismatch instead of the update. Its denominator π_old is
  old_logprobs="current": the stop-gradient of this pass's own log-probs (ratio exactly 1; no extra forward).
                          Right for one update per batch, where π_old is the policy being differentiated.
  old_logprobs="batch":   batch["trainer_logprobs"], computed once before the batch's first update
                          (`make_batch_logprobs`). Needed for more updates per batch, where π_old must stay
                          fixed while the policy moves.
The sampler's log-probs enter only through LossConfig.tis_cap (truncated importance sampling) and the metrics
sampler_logprob_diff_mean / _max: |π_old − π_sampler| in log space over completion tokens.

Nothing here names a mesh axis: shard the batch and the state however you like (e.g. batch over
('data', 'fsdp'), params replicated or FSDP-sharded) and XLA keeps that layout; results match one device up to
float reassociation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from flax import struct

from balcap_jax.models import image_shards
from balcap_jax.rl.losses import LossConfig, LossDiagnostics, LossNormaliser, policy_loss
from balcap_jax.rl.policy_logprobs import TRAINER_LOGPROBS, LogProbFn, num_scored_positions

Array = jax.Array
Batch = dict[str, Any]
Metrics = dict[str, Array]
UpdateStep = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]
BatchLogProbs = Callable[[Any, Batch], Array]
OldLogprobs = Literal["current", "batch"]
OLD_LOGPROBS_MODES: tuple[str, ...] = ("current", "batch")


# ----------------------------------------------------------------------------------------------------------------
# State and optimizer
# ----------------------------------------------------------------------------------------------------------------


@struct.dataclass
class TrainState:
    """params: the differentiated policy state (e.g. from `nnx.split`); opt_state: optax state;
    step: int32[] update calls made (skipped ones included); skipped_steps: int32[] updates skipped because the
    loss or gradients were not finite. Applied updates = step − skipped_steps."""

    params: Any
    opt_state: optax.OptState
    step: Array
    skipped_steps: Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(
            params=params,
            opt_state=optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32),
        )


LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")  # after warm-up


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warmup + (cosine | constant) learning-rate schedule.

    learning_rate: peak rate (RL fine-tuning of VLMs: 1e-6 to 1e-5). warmup_steps: linear 0 -> peak.
    schedule: "constant" after warmup, or "cosine" decay to final_lr_ratio · peak at total_steps.
    max_grad_norm: clip the global gradient norm to this; None disables clipping.
    weight_decay: decoupled decay, applied to matrices only (ndim >= 2); norms, biases and scales are exempt.
    """

    learning_rate: float = 1e-6
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0; got {self.learning_rate}.")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule must be one of {LR_SCHEDULES}; got {self.schedule!r}.")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0; got {self.warmup_steps}.")
        if self.schedule == "cosine" and (self.total_steps is None or self.total_steps <= self.warmup_steps):
            raise ValueError(
                "OptimizerConfig.schedule='cosine' needs total_steps > warmup_steps; got "
                f"total_steps={self.total_steps}, warmup_steps={self.warmup_steps}."
            )
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"OptimizerConfig.final_lr_ratio must be in [0, 1]; got {self.final_lr_ratio}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"OptimizerConfig.max_grad_norm must be > 0 or None; got {self.max_grad_norm}.")
        if self.weight_decay < 0:
            raise ValueError(f"OptimizerConfig.weight_decay must be >= 0; got {self.weight_decay}.")


def make_lr_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the applied-update count."""
    peak = config.learning_rate
    if config.schedule == "constant":
        if config.warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, config.warmup_steps), optax.constant_schedule(peak)],
            [config.warmup_steps],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.final_lr_ratio * peak,
    )


def _matrices_only(params: Any) -> Any:
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule) as one optax chain (see OptimizerConfig)."""
    adamw = optax.adamw(
        make_lr_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=_matrices_only,
    )
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


# ----------------------------------------------------------------------------------------------------------------
# Micro-batching
# ----------------------------------------------------------------------------------------------------------------

REQUIRED_KEYS = ("input_ids", "attention_mask", "positions", "completion_mask", "old_logprobs", "advantages")


def _batch_axis(key: str, leaf: Array) -> int:
    # M-RoPE positions are [3, B, T]; every other leaf carries the batch first.
    return 1 if key == "positions" and leaf.ndim == 3 else 0


def micro_batch_groups(batch: Batch, micro_batches: int) -> int:
    """g of `split_micro_batches`: the rows form g groups of micro_batches equal runs, and micro-batch m takes run
    m of every group. Rows one by one (g = B / M: micro-batch m takes rows m, m + M, ...) unless the batch's
    images are laid out by block of rows (`models/image_shards.py`): then its K blocks are the runs (g = K / M),
    so every micro-batch carries whole blocks and the images its rows read."""
    size = batch["input_ids"].shape[0]
    if size % micro_batches:
        raise ValueError(f"batch size {size} is not divisible by micro_batches={micro_batches}.")
    vision = batch.get("vision")
    if not image_shards.is_sharded(vision):
        return size // micro_batches
    blocks = vision[image_shards.IMAGES_PER_SHARD].shape[0]
    if blocks % micro_batches or size % blocks:
        raise ValueError(
            f"the batch's images are laid out in {blocks} blocks of rows, which do not split into micro_batches="
            f"{micro_batches} (or the {size} rows into the blocks); build them with micro_batches=M "
            "(trainer.batches.vision_inputs)"
        )
    return blocks // micro_batches


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """Give every leaf a leading micro-batch axis: [B, ...] -> [M, B / M, ...] (positions [3, B, T] ->
    [M, 3, B / M, T]; vision blocks [K, ...] -> [M, K / M, ...]).

    The rows form g groups (`micro_batch_groups`) of M equal runs, and micro-batch m takes run m of every group:
    rows m, m + M, ... (g = B / M), or whole blocks of rows with their images. With the batch sharded in
    contiguous blocks over devices, every device then holds an equal share of every micro-batch, so no step of
    the scan idles a device or moves rows between them (the loss normaliser is global, so which rows go
    together does not change the result). `merge_micro_batches` puts rows back.
    """
    size = batch["input_ids"].shape[0]
    groups = micro_batch_groups(batch, micro_batches)
    blocks = image_shards.is_sharded(batch.get("vision"))

    def split(path, leaf):
        key = path[0].key if path and hasattr(path[0], "key") else ""
        if key == "vision" and blocks:  # [K, ...] -> [g, M, ...] -> [M, g, ...]
            return jnp.moveaxis(leaf.reshape(groups, micro_batches, *leaf.shape[1:]), 1, 0)
        axis = _batch_axis(key, leaf)
        if leaf.ndim <= axis or leaf.shape[axis] != size:
            raise ValueError(
                f"batch[{jax.tree_util.keystr(path)}] has shape {leaf.shape}, without the batch size {size} on axis "
                f"{axis}; micro-batching needs every leaf batched on axis 0 (positions [3, B, T] on axis 1). Pad "
                "per-example inputs to [B, ...] or use micro_batches=1."
            )
        run = size // (groups * micro_batches)
        shape = leaf.shape[:axis] + (groups, micro_batches, run) + leaf.shape[axis + 1 :]
        moved = jnp.moveaxis(leaf.reshape(shape), axis + 1, 0)  # [M, ..., g, run, ...]
        return moved.reshape(micro_batches, *leaf.shape[:axis], groups * run, *leaf.shape[axis + 1 :])

    return jax.tree_util.tree_map_with_path(split, batch)


def merge_micro_batches(per_micro: Array, groups: int) -> Array:
    """Inverse of `split_micro_batches` for a per-row result: [M, B / M, ...] -> [B, ...] in the batch's order."""
    micro_batches, rows = per_micro.shape[:2]
    run = rows // groups
    blocks = per_micro.reshape(micro_batches, groups, run, *per_micro.shape[2:])
    return jnp.moveaxis(blocks, 0, 1).reshape(micro_batches * rows, *per_micro.shape[2:])


def _check_batch(batch: Batch, loss_config: LossConfig, old_logprobs: OldLogprobs) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in batch]
    if loss_config.kl_coef > 0 and "ref_logprobs" not in batch:
        missing.append("ref_logprobs (needed because LossConfig.kl_coef > 0; compute it with make_batch_logprobs "
                       "on a frozen_reference of the initial policy)")
    if old_logprobs == "batch" and TRAINER_LOGPROBS not in batch:
        missing.append(f"{TRAINER_LOGPROBS} (needed because old_logprobs='batch'; compute it once per batch, before "
                       "its first update, with make_batch_logprobs(log_prob_fn)(state.params, batch))")
    if missing:
        raise ValueError(f"update batch is missing keys {missing}; see balcap_jax/rl/update.py for the layout.")
    size, scored = batch["input_ids"].shape[0], num_scored_positions(batch)
    expected = {"completion_mask": (size, scored), "old_logprobs": (size, scored), "advantages": (size,)}
    for key in ("ref_logprobs", TRAINER_LOGPROBS):
        if key in batch:
            expected[key] = (size, scored)
    for key, shape in expected.items():
        if tuple(batch[key].shape) != shape:
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {shape} (B={size} sequences, "
                f"T_c={scored} scored positions); advantages are one per sequence, the others [B, T_c]."
            )


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------


def _tree_all_finite(tree: Any) -> Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_update_step(
    log_prob_fn: LogProbFn,
    optimizer: optax.GradientTransformation,
    loss_config: LossConfig,
    *,
    micro_batches: int = 1,
    donate: bool = True,
    learning_rate_fn: optax.Schedule | None = None,
    old_logprobs: OldLogprobs = "current",
) -> UpdateStep:
    """Build the jitted update `(state, batch) -> (state, metrics)`.

    log_prob_fn: `(params, batch) -> (logprobs[B, T_c], entropy[B, T_c])`, e.g. from
      `policy_logprobs.make_log_prob_fn`. optimizer: e.g. `make_optimizer(OptimizerConfig(...))`.
    micro_batches: gradient accumulation: the batch is split into this many micro-batches (see
      `split_micro_batches`) and their gradients are summed in fp32 inside a `lax.scan`; each micro-batch loss is
      normalised by the whole batch's token/sequence count, so any micro_batches gives the same update.
    donate: donate the input state's buffers to the output (the caller must not reuse the old state).
    learning_rate_fn: the optimizer's schedule, only to report "learning_rate" in the metrics.
    old_logprobs: the ratio's denominator π_old (see the module docstring): "current" for one update per
      batch, "batch" (batch["trainer_logprobs"]) for more.

    A step whose loss or gradient is not finite leaves params and opt_state untouched, increments
    `skipped_steps`, and reports skipped = 1. metrics are float32 scalars: loss, grad_norm (before clipping),
    skipped, skipped_steps, the LossDiagnostics summary, and learning_rate if given.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1; got {micro_batches}.")
    if old_logprobs not in OLD_LOGPROBS_MODES:
        raise ValueError(
            f"old_logprobs must be one of {OLD_LOGPROBS_MODES}; got {old_logprobs!r}. Use 'current' with one update "
            "per batch and 'batch' (with batch['trainer_logprobs']) with more."
        )

    def micro_loss(params: Any, batch: Batch, normaliser: LossNormaliser) -> tuple[Array, LossDiagnostics]:
        logprobs, entropy = log_prob_fn(params, batch)
        if old_logprobs == "current":
            proximal = jax.lax.stop_gradient(logprobs)
        else:
            proximal = batch[TRAINER_LOGPROBS]
        return policy_loss(
            logprobs,
            proximal,
            batch["advantages"],
            batch["completion_mask"],
            loss_config,
            ref_logprobs=batch.get("ref_logprobs"),
            entropy=entropy,
            normaliser=normaliser,
            sampler_logprobs=batch["old_logprobs"],
        )

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulated_grads(params: Any, batch: Batch) -> tuple[Array, Any, LossDiagnostics]:
        normaliser = LossNormaliser.from_mask(batch["completion_mask"])
        if micro_batches == 1:
            (loss, diagnostics), grads = grad_fn(params, batch, normaliser)
            return loss, grads, diagnostics

        def body(carry, micro_batch):
            loss_sum, grad_sum, diagnostics = carry
            (loss, micro_diagnostics), grads = grad_fn(params, micro_batch, normaliser)
            grad_sum = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_sum, grads)
            return (loss_sum + loss, grad_sum, diagnostics.merge(micro_diagnostics)), None

        # Gradients accumulate in fp32 whatever the parameter dtype; the model is traced once, inside the scan.
        zeros = (
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
            LossDiagnostics.empty(),
        )
        (loss, grads, diagnostics), _ = jax.lax.scan(body, zeros, split_micro_batches(batch, micro_batches))
        grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, params)
        return loss, grads, diagnostics

    def update_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        _check_batch(batch, loss_config, old_logprobs)
        loss, grads, diagnostics = accumulated_grads(state.params, batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & _tree_all_finite(grads)

        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        skipped = (~finite).astype(jnp.int32)
        new_state = TrainState(
            params=keep_if_finite(new_params, state.params),
            opt_state=keep_if_finite(new_opt_state, state.opt_state),
            step=state.step + 1,
            skipped_steps=state.skipped_steps + skipped,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "skipped": skipped.astype(jnp.float32),
            "skipped_steps": new_state.skipped_steps.astype(jnp.float32),
            "advantage_mean": jnp.mean(batch["advantages"].astype(jnp.float32)),
            **diagnostics.summary(),
        }
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(
                learning_rate_fn(state.step - state.skipped_steps), jnp.float32
            )
        return new_state, metrics

    return jax.jit(update_step, donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------------------------------------------
# Log-probs outside the update: π_old for old_logprobs="batch", π_ref for the KL
# ----------------------------------------------------------------------------------------------------------------


def make_batch_logprobs(log_prob_fn: LogProbFn, *, micro_batches: int = 1) -> BatchLogProbs:
    """Build the jitted `(params, batch) -> logprobs float32[B, T_c]`: a forward pass, no gradient.

    With the policy's params before a batch's first update it gives batch["trainer_logprobs"]
    (old_logprobs="batch"); with a `frozen_reference` it gives batch["ref_logprobs"]. It runs the update's own
    log_prob_fn, but as a separately compiled program: in fp32 it matches the update's forward to ~1e-6, in bf16
    only up to rounding that fuses differently (up to ~0.04 nats measured on tiny LLaVA, CPU), which the first
    "batch"-mode update of each batch shows as ratio_min / ratio_max != 1. micro_batches: run the forward over
    this many strided micro-batches in a `lax.map` (as the update splits them) to bound activation memory; rows
    come back in the batch's order.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1; got {micro_batches}.")

    def batch_logprobs(params: Any, batch: Batch) -> Array:
        if micro_batches == 1:
            return log_prob_fn(params, batch)[0]
        per_micro = jax.lax.map(lambda micro: log_prob_fn(params, micro)[0], split_micro_batches(batch, micro_batches))
        return merge_micro_batches(per_micro, micro_batch_groups(batch, micro_batches))

    return jax.jit(batch_logprobs)


def frozen_reference(params: Any, dtype: Any = None) -> Any:
    """A copy of `params` for the KL reference π_ref, e.g. `frozen_reference(state.params, jnp.bfloat16)` at the
    start of RL.

    Floating leaves are cast to `dtype` (None keeps theirs); every leaf is a new buffer, so donating the train
    state to the update (which deletes its buffers) can never delete the reference. Shardings are kept.
    """

    def freeze(leaf: Array) -> Array:
        cast = leaf.astype(dtype) if dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
        return jnp.copy(leaf) if cast is leaf else cast

    return jax.tree.map(freeze, params)
