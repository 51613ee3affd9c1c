"""Token log-probabilities and the clipped policy-gradient loss.

Shapes: B sequences, T token positions, D hidden size, V vocabulary. `mask` is the completion mask bool[B, T]
(True on generated tokens that carry loss); `advantages` are per sequence, float[B].

Log-probabilities are of the *tempered* distribution softmax(logits / temperature): the sampler draws from it,
so the importance ratio must use it too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import chex
import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (the sampler's temperature); got {temperature}.")


def token_logprobs(logits: Array, targets: Array, temperature: float = 1.0) -> tuple[Array, Array]:
    """log softmax(logits / temperature)[targets] and the entropy of that distribution, from full logits.

    logits: float[B, T, V] (any float dtype; computed in fp32); targets: int[B, T], clipped into [0, V).
    Returns (logprobs float32[B, T], entropy float32[B, T]). Use `token_logprobs_from_hidden` when V is large.
    """
    _check_temperature(temperature)
    chex.assert_rank(logits, 3)
    chex.assert_shape(targets, logits.shape[:2])
    scaled = logits.astype(jnp.float32) / temperature
    log_probs = jax.nn.log_softmax(scaled, axis=-1)
    targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
    target_logprobs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return target_logprobs, entropy


@struct.dataclass
class _SoftmaxAccumulator:
    """Running statistics of softmax over vocabulary chunks, all float32[B, T].

    max: running max m of the tempered logits l (a shift for stability, a constant for gradients);
    sum_exp: Σ exp(l − m); sum_exp_centred: Σ exp(l − m) · (l − m) (for the entropy); target: the target's l.
    """

    max: Array
    sum_exp: Array
    sum_exp_centred: Array
    target: Array


def token_logprobs_from_hidden(
    hidden: Array,
    unembed: Array,
    targets: Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    vocab_axis: int = 1,
) -> tuple[Array, Array]:
    """Log-probs of `targets` and entropies from hidden states, never materialising fp32 [B, T, V] logits.

    hidden: float[B, T, D]; unembed: float[D, V] (vocab_axis=1) or float[V, D] (vocab_axis=0, a tied token
    embedding as stored: chunks are read in place, where a transposed view made XLA:CPU copy the whole
    [V, D] matrix, and its gradient back, every update); targets: int[B, T], clipped into [0, V).
    Scans over V in chunks of `chunk_size` columns keeping a running logsumexp; the scan body is rematerialised,
    so the backward pass also holds only one [B, T, chunk] fp32 block at a time. Matmuls accumulate in fp32
    whatever the input dtype. Returns (logprobs float32[B, T], entropy float32[B, T]).
    """
    _check_temperature(temperature)
    chex.assert_rank([hidden, unembed, targets], [3, 2, 2])
    chex.assert_shape(targets, hidden.shape[:2])
    if vocab_axis not in (0, 1):
        raise ValueError(f"vocab_axis must be 1 (unembed [D, V]) or 0 (unembed [V, D]); got {vocab_axis}.")
    if hidden.shape[-1] != unembed.shape[1 - vocab_axis]:
        layout = "[D, V]" if vocab_axis == 1 else "[V, D]"
        raise ValueError(f"unembed must be {layout} with D={hidden.shape[-1]} (hidden size); got {unembed.shape}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
    vocab = unembed.shape[vocab_axis]
    product = "btd,dv->btv" if vocab_axis == 1 else "btd,vd->btv"
    chunk_size = min(chunk_size, vocab)
    num_chunks = math.ceil(vocab / chunk_size)
    targets = jnp.clip(targets, 0, vocab - 1)

    @jax.checkpoint
    def body(acc: _SoftmaxAccumulator, start: Array) -> tuple[_SoftmaxAccumulator, None]:
        # Slice the unembedding in place (no padded or transposed copy of [D, V]). The last chunk is moved back to
        # end at V, so it overlaps its predecessor; the overlap columns were counted there and are masked here.
        offset = jnp.minimum(start, vocab - chunk_size)
        chunk = jax.lax.dynamic_slice_in_dim(unembed, offset, chunk_size, axis=vocab_axis)
        logits = jnp.einsum(product, hidden, chunk, preferred_element_type=jnp.float32) / temperature
        column = offset + jnp.arange(chunk_size)
        real = column >= start
        logits = jnp.where(real, logits, -jnp.inf)
        # The shift cancels exactly in logsumexp and the entropy, so its gradient is not needed.
        new_max = jax.lax.stop_gradient(jnp.maximum(acc.max, jnp.max(logits, axis=-1)))
        rescale = jnp.exp(acc.max - new_max)
        # Shifting an empty accumulator (sum_exp == 0, max still the -huge floor) would multiply 0 by -inf.
        shift = jnp.where(acc.sum_exp > 0, acc.max - new_max, 0.0)
        centred = jnp.where(real, logits - new_max[..., None], 0.0)
        weights = jnp.where(real, jnp.exp(centred), 0.0)
        in_chunk = (targets >= start) & (targets < start + chunk_size)
        local = jnp.clip(targets - offset, 0, chunk_size - 1)
        target_logit = jnp.take_along_axis(jnp.where(real, logits, 0.0), local[..., None], axis=-1)[..., 0]
        return (
            _SoftmaxAccumulator(
                max=new_max,
                sum_exp=acc.sum_exp * rescale + jnp.sum(weights, axis=-1),
                # Σ exp(l − m)(l − m) re-centred on the new max: rescale · (old + sum_exp · (m_old − m_new)).
                sum_exp_centred=rescale * (acc.sum_exp_centred + acc.sum_exp * shift)
                + jnp.sum(weights * centred, axis=-1),
                target=jnp.where(in_chunk, target_logit, acc.target),
            ),
            None,
        )

    batch_shape = hidden.shape[:2]
    init = _SoftmaxAccumulator(
        # A finite floor rather than -inf keeps exp(max_old - max_new) free of inf - inf.
        max=jnp.full(batch_shape, jnp.finfo(jnp.float32).min, jnp.float32),
        sum_exp=jnp.zeros(batch_shape, jnp.float32),
        sum_exp_centred=jnp.zeros(batch_shape, jnp.float32),
        target=jnp.zeros(batch_shape, jnp.float32),
    )
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
    acc, _ = jax.lax.scan(body, init, starts)
    log_normaliser = acc.max + jnp.log(acc.sum_exp)
    logprobs = acc.target - log_normaliser
    # H = logsumexp − E[l] = log Σ exp(l − m) − E[l − m]: centred on the max, so a peaked distribution's small
    # entropy is not the difference of two large numbers.
    entropy = jnp.log(acc.sum_exp) - acc.sum_exp_centred / acc.sum_exp
    return logprobs, entropy


# ----------------------------------------------------------------------------------------------------------------
# Policy loss
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The clipped policy-gradient objective (hashable: it is static under jit).

    eps_low / eps_high: the ratio is clipped to [1 − eps_low, 1 + eps_high] (eps_high > eps_low is DAPO's
      clip-higher).
    dual_clip: None, or c > 1: for negative advantages the per-token loss is capped at −c · A (dual-clip PPO),
      so a huge ratio on a bad token cannot blow up the loss.
    kl_coef: β of the k3 KL to the reference policy; 0 (default) needs no reference log-probs.
    entropy_coef: weight of an entropy bonus (subtracted from the loss); 0 by default.
    aggregation: how per-token losses become one scalar:
      "token-mean":              Σ_{b,t} l·m / Σ_{b,t} m                     (every token equal; DAPO, TRL)
      "seq-mean-token-mean":     mean_b [Σ_t l·m / Σ_t m]                    (every sequence equal; GRPO)
      "seq-mean-token-sum-norm": mean_b [Σ_t l·m / norm_length]              (Dr. GRPO; no length bias)
      Sequences with no completion tokens are left out of the means.
    norm_length: the constant of "seq-mean-token-sum-norm"; None uses T (the completion buffer length).
    tis_cap: truncated importance sampling against the sampler/trainer mismatch: 0 (default) is off; C >= 1
      multiplies each token's policy-gradient loss by min(π_old / π_sampler, C) (see `tis_weights`).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    aggregation: Aggregation = "token-mean"
    norm_length: int | None = None
    tis_cap: float = 0.0

    def __post_init__(self):
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"LossConfig.eps_low must be in [0, 1); got {self.eps_low}.")
        if not self.eps_high >= 0:
            raise ValueError(f"LossConfig.eps_high must be >= 0; got {self.eps_high}.")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"LossConfig.dual_clip must be None or > 1 (e.g. 3.0); got {self.dual_clip}.")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(
                f"LossConfig.kl_coef and entropy_coef must be >= 0; got {self.kl_coef}, {self.entropy_coef}."
            )
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"LossConfig.aggregation must be one of {AGGREGATIONS}; got {self.aggregation!r}.")
        if self.norm_length is not None and self.norm_length < 1:
            raise ValueError(f"LossConfig.norm_length must be None or >= 1; got {self.norm_length}.")
        # A cap below 1 would down-weight tokens on which sampler and trainer agree; NaN fails both tests.
        if not (self.tis_cap == 0 or self.tis_cap >= 1):
            raise ValueError(f"LossConfig.tis_cap must be 0 (off) or >= 1 (e.g. 2.0); got {self.tis_cap}.")


def k3_kl(logprobs: Array, ref_logprobs: Array) -> Array:
    """Per-token k3 estimator of KL(π ‖ π_ref): exp(ref − lp) − (ref − lp) − 1 >= 0. [B, T] -> float32[B, T]."""
    chex.assert_equal_shape([logprobs, ref_logprobs])
    log_ratio = ref_logprobs.astype(jnp.float32) - logprobs.astype(jnp.float32)
    return jnp.exp(log_ratio) - log_ratio - 1.0


def clipped_surrogate(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Array, Array, Array]:
    """Per-token clipped importance-ratio loss (to minimise).

    logprobs, old_logprobs: float[B, T]; advantages: float[B] (one per sequence, broadcast over tokens).
    loss = max(−A·r, −A·clip(r, 1 − eps_low, 1 + eps_high)), r = exp(logprobs − old_logprobs); with dual_clip c,
    loss = min(loss, −c·A) where A < 0.
    Returns (loss float32[B, T], clipped bool[B, T]: the clipped branch is active, dual_clipped bool[B, T]).
    """
    chex.assert_equal_shape([logprobs, old_logprobs])
    chex.assert_shape(advantages, logprobs.shape[:1])
    ratio = jnp.exp(logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32))
    adv = advantages.astype(jnp.float32)[:, None]
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if dual_clip is None:
        return loss, is_clipped, jnp.zeros_like(is_clipped)
    cap = -dual_clip * adv
    is_dual_clipped = (adv < 0) & (loss > cap)
    return jnp.where(is_dual_clipped, cap, loss), is_clipped, is_dual_clipped


def tis_weights(old_logprobs: Array, sampler_logprobs: Array, mask: Array, cap: float) -> Array:
    """Truncated importance-sampling weights min(exp(old − sampler), cap), float32[B, T], without gradient.

    old_logprobs: the trainer's log-probs of the sampled tokens before the update (π_old); sampler_logprobs:
    the sampler's (π_sampler, e.g. a bf16 KV-cache decode); mask: bool[B, T]. The rollouts were drawn from
    π_sampler, not π_old, so the policy gradient of token t is reweighted by π_old/π_sampler; the cap bounds the
    variance a token the sampler found unlikely would add. Off the mask the weight is 0, so padding (whose
    log-probs may be anything, NaN included) can never put NaN · 0 into the loss or its gradient. A NaN log-prob
    on the mask gives a NaN weight (the update step then skips the batch), never a silent 0 or 1.
    """
    chex.assert_equal_shape([old_logprobs, sampler_logprobs, mask])
    if not cap >= 1:
        raise ValueError(f"tis_weights needs cap >= 1 (LossConfig.tis_cap); got {cap}.")
    log_ratio = old_logprobs.astype(jnp.float32) - sampler_logprobs.astype(jnp.float32)
    weights = jnp.minimum(jnp.exp(jax.lax.stop_gradient(log_ratio)), cap)
    return jnp.where(mask.astype(bool), weights, 0.0)


@struct.dataclass
class LossNormaliser:
    """Denominators of the aggregation, computed once on the *whole* batch so that the gradients of
    micro-batches, each divided by them, sum to the gradient of the full batch.

    tokens: Σ mask (token-mean); sequences: number of sequences with >= 1 completion token (seq-mean-*).
    """

    tokens: Array
    sequences: Array

    @classmethod
    def from_mask(cls, mask: Array) -> "LossNormaliser":
        chex.assert_rank(mask, 2)
        mask = mask.astype(jnp.float32)
        return cls(tokens=jnp.sum(mask), sequences=jnp.sum(jnp.any(mask > 0, axis=-1).astype(jnp.float32)))


def aggregate_loss(
    per_token: Array,
    mask: Array,
    aggregation: Aggregation,
    *,
    normaliser: LossNormaliser | None = None,
    norm_length: int | None = None,
) -> Array:
    """Reduce a per-token loss float[B, T] with mask bool[B, T] to a scalar (see LossConfig.aggregation).

    normaliser: the whole batch's denominators when `per_token` is one micro-batch of it; None uses this batch.
    Returns 0 (not NaN) when there is no completion token.
    """
    chex.assert_equal_shape([per_token, mask])
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}.")
    normaliser = LossNormaliser.from_mask(mask) if normaliser is None else normaliser
    weights = mask.astype(jnp.float32)
    masked = jnp.where(mask, per_token.astype(jnp.float32), 0.0)
    if aggregation == "token-mean":
        return jnp.sum(masked) / jnp.maximum(normaliser.tokens, 1.0)
    if aggregation == "seq-mean-token-mean":
        per_seq = jnp.sum(masked, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
    else:
        per_seq = jnp.sum(masked, axis=-1) / float(norm_length or mask.shape[-1])
    return jnp.sum(per_seq) / jnp.maximum(normaliser.sequences, 1.0)


@struct.dataclass
class LossDiagnostics:
    """Masked sums and extrema over completion tokens; `merge` combines micro-batches exactly, `summary` turns
    them into the logged means. All fields are float32 scalars."""

    tokens: Array
    clipped: Array
    dual_clipped: Array
    ratio_sum: Array
    ratio_min: Array
    ratio_max: Array
    kl_sum: Array
    old_kl_sum: Array
    entropy_sum: Array
    sampler_diff_sum: Array  # Σ |old − sampler| (the trainer's vs the sampler's log-probs)
    sampler_diff_max: Array
    tis_weight_sum: Array
    tis_capped: Array  # tokens whose TIS weight hit the cap
    policy_loss: Array  # the aggregated policy-gradient term, already normalised (adds across micro-batches)
    kl_loss: Array
    entropy_loss: Array

    @classmethod
    def empty(cls) -> "LossDiagnostics":
        """The identity of `merge`: zero sums, extrema at ±inf (|Δ| >= 0, so its max starts at 0)."""
        zero = jnp.zeros((), jnp.float32)
        fields = {field.name: zero for field in dataclasses.fields(cls)}
        return cls(**{**fields, "ratio_min": jnp.asarray(jnp.inf), "ratio_max": jnp.asarray(-jnp.inf)})

    def merge(self, other: "LossDiagnostics") -> "LossDiagnostics":
        merged = jax.tree.map(jnp.add, self, other)
        return merged.replace(
            ratio_min=jnp.minimum(self.ratio_min, other.ratio_min),
            ratio_max=jnp.maximum(self.ratio_max, other.ratio_max),
            sampler_diff_max=jnp.maximum(self.sampler_diff_max, other.sampler_diff_max),
        )

    def summary(self) -> dict[str, Array]:
        tokens = jnp.maximum(self.tokens, 1.0)
        # Extrema over zero tokens are ±inf; report the neutral ratio 1 instead so metrics stay finite.
        any_tokens = self.tokens > 0
        return {
            "completion_tokens": self.tokens,
            "clip_fraction": self.clipped / tokens,
            "dual_clip_fraction": self.dual_clipped / tokens,
            "ratio_mean": self.ratio_sum / tokens,
            "ratio_min": jnp.where(any_tokens, self.ratio_min, 1.0),
            "ratio_max": jnp.where(any_tokens, self.ratio_max, 1.0),
            "kl": self.kl_sum / tokens,
            "kl_to_old": self.old_kl_sum / tokens,
            "entropy": self.entropy_sum / tokens,
            "sampler_logprob_diff_mean": self.sampler_diff_sum / tokens,
            "sampler_logprob_diff_max": self.sampler_diff_max,
            "tis_weight_mean": jnp.where(any_tokens, self.tis_weight_sum / tokens, 1.0),
            "tis_capped_fraction": self.tis_capped / tokens,
            "policy_loss": self.policy_loss,
            "kl_loss": self.kl_loss,
            "entropy_loss": self.entropy_loss,
        }


def policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    config: LossConfig,
    *,
    ref_logprobs: Array | None = None,
    entropy: Array | None = None,
    normaliser: LossNormaliser | None = None,
    sampler_logprobs: Array | None = None,
) -> tuple[Array, LossDiagnostics]:
    """The full objective: aggregated [TIS-weighted] clipped surrogate + kl_coef · k3 KL − entropy_coef · entropy.

    logprobs (differentiated), old_logprobs, ref_logprobs, entropy, sampler_logprobs: float[B, T];
    advantages: float[B]; mask: bool[B, T]. old_logprobs are the trainer's log-probs before the update (the
    ratio's denominator); sampler_logprobs the sampler's, required when config.tis_cap > 0 (see `tis_weights`)
    and, whenever given, compared with old_logprobs in the `sampler_logprob_diff_*` diagnostics.
    ref_logprobs is required when config.kl_coef > 0 (and used for the `kl` diagnostic whenever given); entropy
    is required when config.entropy_coef > 0 (and logged whenever given).
    `kl_to_old` in the diagnostics is the k3 estimate of KL(π ‖ π_old): how far this update moved the policy.
    Returns (loss scalar, LossDiagnostics). Diagnostics are computed on stopped gradients.
    """
    chex.assert_equal_shape([logprobs, old_logprobs, mask])
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("LossConfig.kl_coef > 0 needs ref_logprobs[B, T] (batch key 'ref_logprobs').")
    if config.tis_cap > 0 and sampler_logprobs is None:
        raise ValueError("LossConfig.tis_cap > 0 needs the sampler's log-probs: pass sampler_logprobs[B, T].")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError("LossConfig.entropy_coef > 0 needs the per-token entropy[B, T].")
    mask = mask.astype(bool)
    normaliser = LossNormaliser.from_mask(mask) if normaliser is None else normaliser
    aggregate = lambda x: aggregate_loss(  # noqa: E731
        x, mask, config.aggregation, normaliser=normaliser, norm_length=config.norm_length
    )
    per_token, clipped, dual_clipped = clipped_surrogate(
        logprobs, old_logprobs, advantages,
        eps_low=config.eps_low, eps_high=config.eps_high, dual_clip=config.dual_clip,
    )
    if config.tis_cap > 0:
        weights = tis_weights(old_logprobs, sampler_logprobs, mask, config.tis_cap)
        per_token = per_token * weights
    else:
        weights = mask.astype(jnp.float32)
    pg_loss = aggregate(per_token)
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else jnp.zeros_like(per_token)
    kl_loss = aggregate(kl) if config.kl_coef > 0 else jnp.zeros((), jnp.float32)
    entropy_loss = aggregate(-entropy) if config.entropy_coef > 0 else jnp.zeros((), jnp.float32)
    loss = pg_loss + config.kl_coef * kl_loss + config.entropy_coef * entropy_loss

    sg = jax.lax.stop_gradient
    ratio = jnp.exp(sg(logprobs).astype(jnp.float32) - old_logprobs.astype(jnp.float32))
    masked_sum = lambda x: jnp.sum(jnp.where(mask, x, 0.0).astype(jnp.float32))  # noqa: E731
    if sampler_logprobs is None:
        sampler_diff = jnp.zeros_like(ratio)
    else:
        sampler_diff = jnp.abs(sg(old_logprobs).astype(jnp.float32) - sampler_logprobs.astype(jnp.float32))
    diagnostics = LossDiagnostics(
        tokens=jnp.sum(mask.astype(jnp.float32)),
        clipped=masked_sum(clipped),
        dual_clipped=masked_sum(dual_clipped),
        ratio_sum=masked_sum(ratio),
        ratio_min=jnp.min(jnp.where(mask, ratio, jnp.inf)),
        ratio_max=jnp.max(jnp.where(mask, ratio, -jnp.inf)),
        kl_sum=masked_sum(sg(kl)),
        old_kl_sum=masked_sum(k3_kl(sg(logprobs), old_logprobs)),
        entropy_sum=masked_sum(sg(entropy)) if entropy is not None else jnp.zeros((), jnp.float32),
        sampler_diff_sum=masked_sum(sampler_diff),
        sampler_diff_max=jnp.max(jnp.where(mask, sampler_diff, 0.0)),
        tis_weight_sum=masked_sum(weights),
        tis_capped=masked_sum(weights >= config.tis_cap) if config.tis_cap > 0 else jnp.zeros((), jnp.float32),
        policy_loss=sg(pg_loss),
        kl_loss=sg(kl_loss),
        entropy_loss=sg(entropy_loss),
    )
    return loss, diagnostics
