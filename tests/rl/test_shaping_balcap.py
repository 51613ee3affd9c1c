"""rl/shaping.py on the cases BalCapRL cares about: unscorable components, EOS-only captions, the linear
length penalty as METHOD.md defines it, NaN masking, and b-CapScore. Expected values are computed by hand here."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from balcap_jax.rl import shaping

COMPONENTS = ("precision", "recall", "linguistic")
NAN = float("nan")


def _cfg(**kw):
    return shaping.ShapingConfig(components=COMPONENTS, weights=(1.0, 1.0, 1.0), **kw)


def _z(x, eps=1e-4, ddof=1):
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / (x.std(ddof=ddof) + eps)


def _weighted_z(x, counts, eps=1e-4):
    """Token-level whitening: every sample repeated once per token."""
    per_token = np.repeat(np.ravel(x), np.ravel(counts))
    return (np.asarray(x, np.float64) - per_token.mean()) / (per_token.std(ddof=1) + eps)


def _group_z(rewards):
    """Per-prompt, per-component z-scores over the scored (non-NaN) entries; 0 where NaN. float64[P, G, K]."""
    out = np.zeros(rewards.shape)
    for p in range(rewards.shape[0]):
        for k in range(rewards.shape[2]):
            scored = ~np.isnan(rewards[p, :, k])
            out[p, scored, k] = _z(rewards[p, scored, k])
    return out


def _advantages(rewards, lengths, ref, **kw):
    a, _ = shaping.advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(lengths), jnp.asarray(ref), _cfg(**kw))
    return np.asarray(a)


IN_BAND = dict(lengths=np.full((1, 4), 20), ref=np.array([20]))
# Sample 0 has the best precision and recall but its linguistic judge failed; the others are fluent and worse.
PARTIAL = np.array([[[1.0, 1.0, NAN], [0.8, 0.8, 0.9], [0.7, 0.9, 0.9], [0.9, 0.7, 1.0]]], np.float32)


def test_grpo_default_does_not_penalise_an_unscorable_component():
    got = _advantages(PARTIAL, **IN_BAND, kind="grpo", length_kind="none")
    # mean_present: (1 + 1) / 2 scaled to the full weight 3 -> 3.0; the others are plain sums.
    np.testing.assert_allclose(got[0], _z([3.0, 2.5, 2.5, 2.6]), atol=1e-5)
    assert got[0, 0] > 0


def test_grpo_sum_present_reads_the_unscorable_component_as_zero():
    got = _advantages(PARTIAL, **IN_BAND, kind="grpo", length_kind="none", grpo_partial_nan="sum_present")
    np.testing.assert_allclose(got[0], _z([2.0, 2.5, 2.5, 2.6]), atol=1e-5)
    assert got[0, 0] < 0


def _run_config(**advantage):
    c = ml_collections.ConfigDict()
    c.rewards = dict(components=COMPONENTS, weights=(1.0, 1.0, 1.0))
    c.advantage = dict(kind="grpo", eps=1e-4, ddof=1, batch_stats="sample", **advantage)
    c.length = dict(kind="mask", component="linguistic", ratio_min=0.5, ratio_max=2.0, masked_value=0.0, coef=0.1)
    return c


def test_from_config_reads_partial_nan_and_old_configs_get_mean_present():
    assert shaping.ShapingConfig.from_config(_run_config()).grpo_partial_nan == "mean_present"
    assert shaping.ShapingConfig.from_config(_run_config(partial_nan="sum_present")).grpo_partial_nan == "sum_present"
    with pytest.raises(ValueError, match="config.advantage.partial_nan"):
        shaping.ShapingConfig.from_config(_run_config(partial_nan="zero"))


def test_eos_only_caption_with_the_worst_rewards_is_penalised_under_token_stats():
    rewards = np.array([[[0.0, 0.0, 0.0], [0.6, 0.5, 0.7], [0.9, 0.8, 0.6]],
                        [[0.3, 0.2, 0.4], [0.5, 0.9, 0.8], [0.7, 0.4, 0.5]]], np.float32)  # fmt: skip
    lengths = np.array([[0, 12, 20], [7, 15, 9]])  # sample (0, 0) is EOS only
    got = _advantages(rewards, lengths, np.array([15, 15]), kind="gdpo", batch_stats="token", length_kind="none")
    summed = _group_z(rewards).sum(-1)
    np.testing.assert_allclose(got, _weighted_z(summed, lengths + 1), atol=1e-5)  # the EOS token counts
    assert got[0, 0] < 0


LENGTHS = np.array([[10, 30, 20, 45]])  # ρ = 0.5, 1.5, 1.0, 2.25 against a reference of 20 tokens
REF = np.array([20])
EXCESS = np.array([[0.0, 0.5, 0.0, 1.25]])
REWARDS = np.array([[[0.5, 0.4, 0.9], [0.9, 0.8, 0.7], [0.3, 0.6, 0.8], [0.8, 0.9, 0.6]]], np.float32)


def test_linear_penalty_under_grpo_is_subtracted_from_the_summed_reward():
    got = _advantages(REWARDS, LENGTHS, REF, kind="grpo", length_kind="linear", length_coef=0.3)
    np.testing.assert_allclose(got[0], _z(REWARDS.sum(-1)[0] - 0.3 * EXCESS[0]), atol=1e-5)


def test_linear_penalty_under_gdpo_is_subtracted_after_the_group_normalisation():
    rewards = np.concatenate([REWARDS, REWARDS[:, ::-1] * 0.5], axis=0)
    lengths = np.concatenate([LENGTHS, LENGTHS], axis=0)
    got = _advantages(rewards, lengths, np.array([20, 20]), kind="gdpo", length_kind="linear", length_coef=0.3)
    excess = np.concatenate([EXCESS, EXCESS], axis=0)
    summed = _group_z(rewards).sum(-1) - 0.3 * excess
    np.testing.assert_allclose(got, _z(summed.ravel()).reshape(2, 4), atol=1e-5)


def test_gdpo_penalty_strength_grows_with_lambda():
    """Were the penalty a group-z-scored component, λ would divide out; now the gap between two captions that
    differ only in length grows with λ."""
    rewards = np.array([[[0.6, 0.7, 0.8], [0.6, 0.7, 0.8], [0.2, 0.3, 0.5], [0.9, 0.4, 0.6]],
                        [[0.4, 0.5, 0.6], [0.8, 0.2, 0.9], [0.5, 0.5, 0.5], [0.1, 0.9, 0.3]]], np.float32)  # fmt: skip
    lengths = np.array([[20, 40, 20, 20], [20, 20, 20, 20]])  # (0, 1) is a twice-as-long copy of (0, 0)

    def gap(coef):
        a = _advantages(rewards, lengths, np.array([20, 20]), kind="gdpo", length_kind="linear", length_coef=coef)
        return a[0, 0] - a[0, 1]

    small, large = gap(0.1), gap(1.0)
    assert small > 0.02 and large > 5 * small


def test_linear_penalty_without_a_usable_reference_makes_the_prompt_unscorable():
    rewards = np.concatenate([REWARDS, REWARDS * 0.5], axis=0)
    lengths = np.concatenate([LENGTHS, LENGTHS], axis=0)
    for kind in ("grpo", "gdpo"):
        got = _advantages(rewards, lengths, np.array([20, 0]), kind=kind, length_kind="linear", length_coef=0.3)
        assert np.all(np.isfinite(got)), kind
        np.testing.assert_array_equal(got[1], 0.0, err_msg=kind)
        assert np.abs(got[0]).max() > 0.5, kind


# Band [0.5, 1.25] against a 20-token reference: samples 1 (ρ = 1.5) and 3 (ρ = 2.25) are out of band.
BAND = dict(length_kind="mask", ratio_min=0.5, ratio_max=1.25, masked_value=NAN)


def test_nan_mask_makes_the_gated_component_unscorable_under_gdpo():
    rewards = np.concatenate([REWARDS, REWARDS[:, ::-1] * 0.5], axis=0)
    lengths = np.concatenate([LENGTHS, LENGTHS], axis=0)
    shaped, _ = shaping.shape_rewards(jnp.asarray(rewards), jnp.asarray(lengths), jnp.array([20, 20]), _cfg(**BAND))
    masked = rewards.copy()
    masked[:, [1, 3], 2] = NAN
    np.testing.assert_array_equal(np.asarray(shaped), masked)
    got = _advantages(rewards, lengths, np.array([20, 20]), kind="gdpo", **BAND)
    # The linguistic statistics of each group come from its two in-band samples only.
    np.testing.assert_allclose(got, _z(_group_z(masked).sum(-1).ravel()).reshape(2, 4), atol=1e-5)


def test_nan_mask_under_grpo_neither_rewards_nor_penalises_the_gated_component():
    got = _advantages(REWARDS, LENGTHS, REF, kind="grpo", **BAND)
    p, r, l = REWARDS[0].T.astype(np.float64)
    scores = np.where([False, True, False, True], (p + r) / 2 * 3, p + r + l)
    np.testing.assert_allclose(got[0], _z(scores), atol=1e-5)


def test_masked_value_must_be_finite_or_nan():
    with pytest.raises(ValueError, match="config.length.masked_value"):
        _cfg(masked_value=float("-inf"))


def test_b_capscore_is_the_harmonic_mean_of_the_three_rewards():
    rewards = np.array([[0.5, 0.25, 1.0, 0.3], [1.0, 1.0, 1.0, 0.0], [0.0, 0.5, 0.5, 0.9], [0.4, NAN, 0.0, 0.5]])
    got = shaping.b_capscore(rewards, ("precision", "recall", "linguistic", "caprl_qa"))
    np.testing.assert_allclose(got[:3], [3 / (2 + 4 + 1), 1.0, 0.0])
    assert np.isnan(got[3])  # NaN wins over 0: the score is undefined
    # Order follows the component names, and a missing component makes the score undefined.
    np.testing.assert_allclose(shaping.b_capscore(rewards[:1, [2, 0, 1]], ("linguistic", "precision", "recall")),
                               [3 / 7])
    assert np.isnan(shaping.b_capscore(rewards[:, :2], ("precision", "recall"))).all()


def test_b_capscore_rejects_mismatched_names_and_negative_rewards():
    with pytest.raises(ValueError, match="one value per component"):
        shaping.b_capscore(np.zeros((2, 3)), ("precision", "recall"))
    with pytest.raises(ValueError, match="masked_value"):
        shaping.b_capscore(np.array([[0.5, 0.5, -1.0]]), COMPONENTS)
