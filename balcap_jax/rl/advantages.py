"""Per-sample advantages from multi-component rewards: GRPO, (c-)GDPO, and the length handling around them.

Every function here is pure `jnp`, jit-able and free of Python loops over samples. Shapes:

  rewards:  float[P, G, K]  P prompts, G sampled captions per prompt, K reward components.
                            NaN marks a component that could not be scored ("unscorable").
  weights:  float[K]        component weights (α, β, γ, ... in docs/METHOD.md).
  lengths:  int/float[P, G] generated caption lengths in tokens.

NaN semantics (shared by every function, and equal to TRL 1.16 `GRPOTrainer` under the defaults):
  * a NaN component is excluded from every mean and standard deviation; it is never read as 0 in a statistic.
    GRPO must still turn a partially scored sample into one number (`partial_nan`): TRL's "sum_present" sums the
    scored components, which reads the missing one as 0 and penalises the sample; "mean_present" (the training
    default in rl/shaping.py) rescales the weighted mean of the scored components to the full weight, so a
    missing component neither helps nor hurts; "unscorable" drops the sample;
  * a sample whose components are all NaN is unscorable: it is excluded from statistics and gets advantage 0;
  * a statistic over fewer than 2 valid values (a group with < 2 scorable samples, a batch with < 2) is
    undefined and the values it would normalise contribute 0, so no NaN or inf ever leaves these functions.

Standard deviations use `ddof` (1 = unbiased, TRL's choice) and normalisation divides by `std + eps`, so a
component that is constant within a group gets z = 0 / (0 + eps) = 0 — exactly 0: statistics are computed
relative to a member of the set, so rounding in the mean cannot leave noise for 1/eps to amplify. That is the one
difference from TRL (tests/rl/test_rl_advantages_trl_golden.py checks equality to 1e-6 everywhere else).
"""

from __future__ import annotations

from typing import Literal, Sequence

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
GroupScale = Literal["group", "batch", "none"]
BatchStats = Literal["sample", "token"]
PartialNaN = Literal["mean_present", "sum_present", "unscorable"]
PARTIAL_NAN_MODES = ("mean_present", "sum_present", "unscorable")

# Index of the linguistic-quality component in the standard (precision, recall, linguistic) reward stack that
# rewards/ builds; rl/ does not import rewards/, so the order is restated here and is an argument everywhere.
LINGUISTIC_COMPONENT = 2
# Default band for length-conditional masking: the paper's [0.5, 2.0] (docs/METHOD.md, "What a detailed summary of the
# paper adds"); configuration everywhere it is used, other bands are named ablations (experiments/ablations.py).
DEFAULT_RATIO_MIN = 0.5
DEFAULT_RATIO_MAX = 2.0


# ----------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------


def _masked_mean_std(x: Array, weight: Array, ddof: int) -> tuple[Array, Array, Array]:
    """Weighted mean and std of `x` over all axes, counting only entries with weight > 0.

    x: float[...] (may hold NaN where weight == 0); weight: float[...] (0 excludes, an integer count repeats a
    value, as for token-level statistics). Returns (mean, std, defined): `defined` is False when the total weight
    is < 2 or <= ddof, in which case mean/std are finite placeholders (0 and 1) that callers must not use.
    """
    included = weight > 0
    # Shift by one included value before summing: a constant input then has deviations of exactly 0. A plain
    # Σx / n can round to a mean a few ulps off, and dividing that by std + eps = 1e-4 turns rounding noise into
    # advantages of ~1e-3 for groups that carry no signal (TRL 1.16 does this).
    shift = jnp.ravel(x)[jnp.argmax(jnp.ravel(included))]
    x = jnp.where(included, x - shift, 0.0)
    total = jnp.sum(weight)
    mean = jnp.sum(weight * x) / jnp.maximum(total, 1.0)
    sq_dev = jnp.sum(weight * jnp.square(x - mean))
    mean = mean + jnp.where(jnp.isfinite(shift), shift, 0.0)
    defined = (total >= 2) & (total > ddof)
    var = sq_dev / jnp.where(defined, total - ddof, 1.0)
    std = jnp.sqrt(var)
    return jnp.where(defined, mean, 0.0), jnp.where(defined, std, 1.0), defined


def _zscore_1d(x: Array, valid: Array, *, eps: float, ddof: int, scale: bool = True) -> Array:
    """(x - mean) / (std + eps) over the valid entries of a 1-D vector; 0 where invalid or undefined.

    x: float[N]; valid: bool[N]. With scale=False only the mean is removed.
    """
    mean, std, defined = _masked_mean_std(x, valid.astype(x.dtype), ddof)
    centred = jnp.where(valid, x, 0.0) - mean
    z = centred / (std + eps) if scale else centred
    return jnp.where(valid & defined, z, 0.0)


def _check_rewards(rewards: Array, weights: Array, eps: float, ddof: int) -> None:
    chex.assert_rank(rewards, 3)
    chex.assert_rank(weights, 1)
    if rewards.shape[-1] != weights.shape[0]:
        raise ValueError(
            f"weights has {weights.shape[0]} entries but rewards[P, G, K] has K={rewards.shape[-1]} components; "
            "pass one weight per reward component."
        )
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        raise ValueError(f"rewards must be a float array (NaN marks unscorable), got dtype {rewards.dtype}.")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 so constant groups give 0, not inf; got {eps}.")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (unbiased std, TRL's choice); got {ddof}.")


def scorable_mask(rewards: Array) -> Array:
    """bool[P, G]: True where at least one component of the sample was scored (is not NaN)."""
    chex.assert_rank(rewards, 3)
    return jnp.any(~jnp.isnan(rewards), axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# GRPO and GDPO
# ----------------------------------------------------------------------------------------------------------------


def _check_offset(offset: Array | None, rewards: Array) -> Array:
    """The per-sample additive term as float32[P, G] (zeros when None)."""
    if offset is None:
        return jnp.zeros(rewards.shape[:2], jnp.float32)
    if offset.shape != rewards.shape[:2]:
        raise ValueError(
            f"offset must be float[P, G] = {tuple(rewards.shape[:2])} (one term per sample, e.g. the linear length "
            f"penalty), got shape {tuple(offset.shape)}."
        )
    return offset.astype(jnp.float32)


def _grpo_sum(rewards: Array, weights: Array, partial_nan: PartialNaN) -> tuple[Array, Array]:
    """The per-sample GRPO score and where it is defined: (float32[P, G], bool[P, G]).

    rewards: float32[P, G, K] with NaN; weights: float32[K]. See grpo_advantages for the three modes.
    """
    nan = jnp.isnan(rewards)
    summed = jnp.sum(jnp.where(nan, 0.0, rewards) * weights, axis=-1)
    if partial_nan == "sum_present":
        return summed, ~jnp.all(nan, axis=-1)
    if partial_nan == "unscorable":
        return summed, ~jnp.any(nan, axis=-1)
    # mean_present: Σ_present w r · (Σ|w| / Σ_present |w|). The factor is set to exactly 1 for a fully scored
    # sample (not computed), so such a sample keeps the bit-identical weighted sum of the other modes.
    magnitude = jnp.abs(weights)
    present_weight = jnp.sum(jnp.where(nan, 0.0, magnitude), axis=-1)
    valid = present_weight > 0  # only zero-weight components scored: nothing to take a mean of
    factor = jnp.where(
        jnp.any(nan, axis=-1), jnp.sum(magnitude) / jnp.where(valid, present_weight, 1.0), 1.0
    )
    return summed * factor, valid


def grpo_advantages(
    rewards: Array,
    weights: Array,
    *,
    eps: float = 1e-4,
    ddof: int = 1,
    scale: GroupScale = "group",
    partial_nan: PartialNaN = "sum_present",
    offset: Array | None = None,
) -> Array:
    """GRPO ("sum then normalise"): s = Σ_k w_k r_k + offset, A = (s − mean_G(s)) / (std(s) + eps).

    rewards: float[P, G, K] (NaN = unscorable component); weights: float[K]; offset: None or float[P, G], a
    per-sample term added to the score before normalisation (the linear length penalty −λ·excess). Returns
    float32[P, G].

    scale: "group" divides by the group std (GRPO), "batch" by the std over all scorable samples of the batch
      (PPO-Lite), "none" only centres on the group mean (Dr. GRPO). The mean is always the group mean.
    partial_nan: how a sample with some (not all) NaN components is scored.
      "mean_present": the weighted mean of the scored components times the total weight,
        Σ_present w_k r_k · Σ_k |w_k| / Σ_present |w_k|; a fully scored sample gets exactly Σ_k w_k r_k, and an
        unscorable component counts as the sample's own average instead of 0, so it is never penalised. A sample
        whose scored components all have weight 0 is unscorable. The training default (rl/shaping.py).
      "sum_present" (TRL, and this function's default so TRL parity holds): sums the scored components only,
        i.e. an unscorable component lowers the score as if it were 0.
      "unscorable": the score is undefined, so the sample is excluded and gets 0.
    Unscorable samples get 0; a group with < 2 scorable samples gets 0 (for scale="group"). A non-finite offset
    makes its sample unscorable (excluded, advantage 0) rather than poisoning its group's statistics.
    """
    _check_rewards(rewards, weights, eps, ddof)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none'; got {scale!r}.")
    if partial_nan not in PARTIAL_NAN_MODES:
        raise ValueError(f"partial_nan must be one of {PARTIAL_NAN_MODES}; got {partial_nan!r}.")
    rewards = rewards.astype(jnp.float32)
    offset = _check_offset(offset, rewards)
    summed, valid = _grpo_sum(rewards, weights.astype(jnp.float32), partial_nan)  # [P, G]
    valid = valid & jnp.isfinite(offset)
    summed = jnp.where(valid, summed + offset, 0.0)

    per_group = jax.vmap(lambda s, v: _zscore_1d(s, v, eps=eps, ddof=ddof, scale=scale == "group"))
    advantages = per_group(summed, valid)
    if scale == "batch":
        _, batch_std, defined = _masked_mean_std(summed, valid.astype(jnp.float32), ddof)
        advantages = jnp.where(defined, advantages / (batch_std + eps), 0.0)
    return advantages


def gdpo_advantages(
    rewards: Array,
    weights: Array,
    *,
    eps: float = 1e-4,
    ddof: int = 1,
    batch_stats: BatchStats = "sample",
    token_counts: Array | None = None,
    offset: Array | None = None,
) -> Array:
    """GDPO / c-GDPO ("normalise then sum"): per-component group z-scores, weighted sum, batch normalisation.

    z_k = (r_k − mean_G(r_k)) / (std_G(r_k) + eps) per prompt and component (NaN entries excluded, and they add 0
    to the sum); s = Σ_k w_k z_k + offset; A = (s − mean_B(s)) / (std_B(s) + eps) over the scorable samples of
    the batch.

    rewards: float[P, G, K] (NaN = unscorable component); weights: float[K]. Returns float32[P, G].
    offset: None or float[P, G], a per-sample term added after the group normalisation and before the batch one,
      so it is not z-scored away within the group: the linear length penalty −λ·excess keeps its scale λ
      relative to the unit-variance component z-scores. A non-finite offset makes its sample unscorable.
    batch_stats: "sample" (TRL) gives every scorable sample weight 1 in mean_B/std_B; "token" (verl-style
      whitening) weights each sample by its number of loss-carrying tokens, i.e. statistics over tokens; it needs
      token_counts: int[P, G], which must count every token the loss sees (EOS included: an EOS-only caption
      has 1); a sample with 0 tokens carries no loss and is excluded. ddof then counts tokens.
    A component constant within a group contributes 0; a component with < 2 scored samples in a group
    contributes 0 for that group; unscorable samples get 0.
    """
    _check_rewards(rewards, weights, eps, ddof)
    if batch_stats not in ("sample", "token"):
        raise ValueError(f"batch_stats must be 'sample' or 'token'; got {batch_stats!r}.")
    if (batch_stats == "token") != (token_counts is not None):
        raise ValueError(
            "token_counts[P, G] is required with batch_stats='token' (completion lengths in tokens) and must be "
            f"None with batch_stats='sample'; got batch_stats={batch_stats!r}, "
            f"token_counts={'None' if token_counts is None else 'an array'}."
        )
    rewards = rewards.astype(jnp.float32)
    offset = _check_offset(offset, rewards)
    scored = ~jnp.isnan(rewards)

    # vmap over components (axis 2 -> per-group column) and then over prompts.
    zscore_group = jax.vmap(lambda r, v: _zscore_1d(r, v, eps=eps, ddof=ddof), in_axes=(1, 1), out_axes=1)
    z = jax.vmap(zscore_group)(rewards, scored)  # [P, G, K], 0 where not scored
    sample_ok = jnp.any(scored, axis=-1) & jnp.isfinite(offset)
    summed = jnp.where(sample_ok, jnp.sum(z * weights.astype(jnp.float32), axis=-1) + offset, 0.0)  # [P, G]

    if token_counts is None:
        batch_weight = sample_ok.astype(jnp.float32)
    else:
        chex.assert_shape(token_counts, rewards.shape[:2])
        batch_weight = jnp.where(sample_ok, jnp.maximum(token_counts, 0), 0).astype(jnp.float32)
    mean, std, defined = _masked_mean_std(summed, batch_weight, ddof)
    advantages = (summed - mean) / (std + eps)
    return jnp.where(defined & (batch_weight > 0), advantages, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Length handling
# ----------------------------------------------------------------------------------------------------------------


def _length_ratio(lengths: Array, ref_lengths: Array) -> Array:
    """ρ = len / ref_len, float32[P, G]; +inf where the reference length is <= 0 (no usable reference)."""
    chex.assert_rank(lengths, 2)
    if ref_lengths.ndim == 1:
        chex.assert_shape(ref_lengths, lengths.shape[:1])
        ref_lengths = ref_lengths[:, None]
    else:
        chex.assert_equal_shape([ref_lengths, lengths])
    ref = ref_lengths.astype(jnp.float32)
    return jnp.where(ref > 0, lengths.astype(jnp.float32) / jnp.where(ref > 0, ref, 1.0), jnp.inf)


def length_conditional_mask(
    rewards: Array,
    lengths: Array,
    ref_lengths: Array,
    *,
    component: int | Sequence[int] = LINGUISTIC_COMPONENT,
    ratio_min: float = DEFAULT_RATIO_MIN,
    ratio_max: float = DEFAULT_RATIO_MAX,
    masked_value: float = 0.0,
) -> Array:
    """BalCapRL's length-conditional reward masking: gate chosen components by the length ratio.

    ρ = lengths / ref_lengths (generated caption tokens over reference caption tokens). Where ρ is outside
    [ratio_min, ratio_max], the gated component(s) are replaced by `masked_value`: an overlong (or too short)
    caption earns no credit for them, while the other components (correctness, coverage) are untouched.

    rewards: float[P, G, K]; lengths: [P, G]; ref_lengths: [P] (one reference per prompt) or [P, G].
    component: index or indices into K; default the linguistic component (index 2 of precision, recall,
      linguistic). masked_value: 0.0 (no credit, the paper's intent); NaN instead makes the component
      unscorable, i.e. excluded from the statistics rather than penalised.
    A reference length <= 0 gives ρ = inf (masked). A NaN (unscorable) entry stays NaN: the gate never invents a
    score for a sample the judge could not score. Returns rewards with the same shape and dtype.
    """
    chex.assert_rank(rewards, 3)
    chex.assert_shape(lengths, rewards.shape[:2])
    if not 0.0 <= ratio_min <= ratio_max:
        raise ValueError(f"need 0 <= ratio_min <= ratio_max; got ratio_min={ratio_min}, ratio_max={ratio_max}.")
    indices = (component,) if isinstance(component, int) else tuple(component)
    num_components = rewards.shape[-1]
    if not indices or any(not -num_components <= k < num_components for k in indices):
        raise ValueError(f"component must index the K={num_components} reward components; got {component!r}.")
    gated = jnp.zeros((num_components,), bool).at[jnp.asarray(indices)].set(True)

    ratio = _length_ratio(lengths, ref_lengths)
    out_of_band = (ratio < ratio_min) | (ratio > ratio_max)  # [P, G]
    replace = out_of_band[..., None] & gated & ~jnp.isnan(rewards)
    return jnp.where(replace, jnp.asarray(masked_value, rewards.dtype), rewards)


def append_component(rewards: Array, component: Array) -> Array:
    """Append a per-sample reward term as component K (float[P, G, K] + float[P, G] -> float[P, G, K + 1]).

    The new column is NaN where the sample is unscorable (all its components NaN), so a term computed from
    lengths alone never makes a sample the judges could not score look scorable.
    """
    chex.assert_rank(rewards, 3)
    chex.assert_shape(component, rewards.shape[:2])
    column = jnp.where(scorable_mask(rewards), component.astype(rewards.dtype), jnp.nan)
    return jnp.concatenate([rewards, column[..., None]], axis=-1)


def linear_length_penalty(
    lengths: Array,
    target: Array | float,
    *,
    coef: float,
    relative: bool = False,
) -> Array:
    """The linear length-penalty baseline as a per-sample additive term: −coef · max(0, excess), float32[P, G].

    lengths: [P, G]. excess = lengths − target (tokens) or, with relative=True, ρ − 1 = lengths / target − 1
    (target is then the reference length). target: scalar L_target, [P] (per prompt) or [P, G].
    Pass the result as `offset=` so it is subtracted from the score, as docs/METHOD.md defines the baseline:
      * GRPO: s = Σ_k w_k r_k − coef · excess, then the group normalisation;
      * c-GDPO: s = Σ_k w_k z_k − coef · excess, then the batch normalisation. It is deliberately not a reward
        component: a group z-score would divide out coef and leave only the within-group length ranking.
    A relative excess against a reference length <= 0 is undefined: the term is NaN there, which the advantage
    functions treat as unscorable (excluded, advantage 0), never as some penalty.
    """
    if coef < 0:
        raise ValueError(f"coef (λ) must be >= 0; a negative penalty would reward length. Got {coef}.")
    chex.assert_rank(lengths, 2)
    target = jnp.asarray(target, jnp.float32)
    if relative:
        excess = _length_ratio(lengths, target if target.ndim else jnp.full(lengths.shape[:1], target)) - 1.0
    else:
        target = target[:, None] if target.ndim == 1 else target
        excess = lengths.astype(jnp.float32) - target
    penalty = jnp.where(jnp.isfinite(excess), -coef * jnp.maximum(excess, 0.0), jnp.nan)
    return jnp.broadcast_to(penalty, lengths.shape)


def caprl_length_reward(lengths: Array, *, full_credit_len: float, zero_credit_len: float) -> Array:
    """CapRL++ length reward: 1 up to `full_credit_len` tokens, linear down to 0 at `zero_credit_len`, 0 after.

    lengths: [P, G] (any shape). Returns float32 of the same shape. CapRL++ sums it with weight 0.2 before
    normalisation: `append_component(rewards, caprl_length_reward(...))` with weight 0.2.
    """
    if not 0 <= full_credit_len < zero_credit_len:
        raise ValueError(
            f"need 0 <= full_credit_len < zero_credit_len; got {full_credit_len} and {zero_credit_len}."
        )
    lengths = lengths.astype(jnp.float32)
    return jnp.clip((zero_credit_len - lengths) / (zero_credit_len - full_credit_len), 0.0, 1.0)
