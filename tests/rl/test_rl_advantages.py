"""Tests for balcap_jax/rl/advantages.py: hand-derived values (jit and no-jit) and hypothesis properties."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from balcap_jax.rl import advantages as adv

NAN = float("nan")
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)


def _z(x, eps=1e-4, ddof=1):
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / (x.std(ddof=ddof) + eps)


class GrpoTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("group", "batch", "none")
    def test_matches_hand_formula(self, scale):
        rewards = np.array(
            [[[0.1, 0.5], [0.9, 0.2], [0.4, 0.4]], [[1.0, 0.0], [0.0, 0.5], [0.3, 0.3]]], np.float32
        )
        weights = np.array([1.0, 0.5], np.float32)
        got = self.variant(functools.partial(adv.grpo_advantages, scale=scale))(rewards, weights)
        summed = (rewards * weights).sum(-1).astype(np.float64)
        centred = summed - summed.mean(axis=1, keepdims=True)
        if scale == "group":
            expected = centred / (summed.std(axis=1, ddof=1, keepdims=True) + 1e-4)
        elif scale == "batch":
            expected = centred / (summed.std(ddof=1) + 1e-4)
        else:
            expected = centred
        chex.assert_shape(got, (2, 3))
        np.testing.assert_allclose(got, expected, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nan_rows_and_small_groups(self):
        rewards = np.array(
            [
                [[1.0, NAN], [0.0, 1.0], [NAN, NAN], [0.5, 0.5]],  # partial NaN, unscorable row
                [[NAN, NAN], [0.3, NAN], [NAN, NAN], [NAN, NAN]],  # a single scorable sample
            ],
            np.float32,
        )
        weights = np.ones(2, np.float32)
        got = self.variant(adv.grpo_advantages)(rewards, weights)
        # sum_present: sums 1, 1, (excluded), 1 -> a constant group.
        np.testing.assert_array_equal(got, np.zeros((2, 4)))

        got = self.variant(functools.partial(adv.grpo_advantages, partial_nan="unscorable"))(rewards, weights)
        expected = np.zeros((2, 4))
        expected[0, [1, 3]] = _z([1.0, 1.0])  # only fully scored rows count; a constant pair -> 0
        np.testing.assert_allclose(got, expected, atol=1e-6)
        rewards[0, 3] = [0.0, 0.0]
        got = self.variant(functools.partial(adv.grpo_advantages, partial_nan="unscorable"))(rewards, weights)
        expected[0, [1, 3]] = _z([1.0, 0.0])
        np.testing.assert_allclose(got, expected, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mean_present_rescales_the_scored_components_to_the_full_weight(self):
        rewards = np.array([[[1.0, NAN, 0.5], [0.2, 0.4, 0.6], [NAN, NAN, NAN], [0.7, 0.1, NAN], [NAN, 0.9, NAN]]],
                           np.float32)  # fmt: skip
        weights = np.array([1.0, 2.0, 0.5], np.float32)
        got = self.variant(functools.partial(adv.grpo_advantages, partial_nan="mean_present"))(rewards, weights)
        # Σ_present w r · 3.5 / Σ_present w; a fully scored sample keeps its plain weighted sum.
        scores = [(1.0 + 0.25) * 3.5 / 1.5, 0.2 + 0.8 + 0.3, (0.7 + 0.2) * 3.5 / 3.0, 1.8 * 3.5 / 2.0]
        expected = np.zeros((1, 5))
        expected[0, [0, 1, 3, 4]] = _z(scores)
        np.testing.assert_allclose(got, expected, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mean_present_treats_only_zero_weight_components_scored_as_unscorable(self):
        rewards = np.array([[[NAN, 0.9], [0.1, 0.2], [0.6, 0.3]]], np.float32)
        got = self.variant(functools.partial(adv.grpo_advantages, partial_nan="mean_present"))(
            rewards, np.array([1.0, 0.0], np.float32)
        )
        np.testing.assert_allclose(got, [[0.0, *_z([0.1, 0.6])]], atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_offset_is_added_before_the_group_normalisation(self):
        rewards = np.array([[[0.5, 0.2], [0.9, 0.4], [0.1, 0.3]], [[0.3, 0.3], [0.6, 0.1], [0.2, 0.8]]], np.float32)
        offset = np.array([[-0.2, 0.0, -0.5], [0.0, np.inf, -0.1]], np.float32)
        got = self.variant(adv.grpo_advantages)(rewards, np.ones(2, np.float32), offset=offset)
        summed = rewards.sum(-1) + np.where(np.isfinite(offset), offset, 0.0)
        # A non-finite offset makes its sample unscorable: excluded from the statistics, advantage 0.
        expected = np.stack([_z(summed[0]), np.array([_z(summed[1, [0, 2]])[0], 0.0, _z(summed[1, [0, 2]])[1]])])
        np.testing.assert_allclose(got, expected, atol=1e-5)

    def test_rejects_bad_arguments(self):
        rewards = jnp.zeros((2, 3, 2))
        with pytest.raises(ValueError, match="partial_nan must be one of"):
            adv.grpo_advantages(rewards, jnp.ones(2), partial_nan="zero")
        with pytest.raises(ValueError, match="offset must be float"):
            adv.grpo_advantages(rewards, jnp.ones(2), offset=jnp.zeros((2,)))
        with pytest.raises(ValueError, match="one weight per reward component"):
            adv.grpo_advantages(rewards, jnp.ones(3))
        with pytest.raises(ValueError, match="scale must be"):
            adv.grpo_advantages(rewards, jnp.ones(2), scale="batchwise")
        with pytest.raises(ValueError, match="ddof"):
            adv.grpo_advantages(rewards, jnp.ones(2), ddof=2)
        with pytest.raises(ValueError, match="eps"):
            adv.grpo_advantages(rewards, jnp.ones(2), eps=0.0)
        with pytest.raises(ValueError, match="float array"):
            adv.grpo_advantages(jnp.zeros((2, 3, 2), jnp.int32), jnp.ones(2))


class GdpoTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_hand_formula(self):
        rewards = np.array(
            [[[0.1, 0.5], [0.9, 0.2], [0.4, 0.4]], [[1.0, 0.0], [0.0, 0.5], [0.3, 0.3]]], np.float32
        )
        weights = np.array([1.0, 2.0], np.float32)
        got = self.variant(adv.gdpo_advantages)(rewards, weights)
        z = np.stack([np.stack([_z(rewards[p, :, k]) for k in range(2)], -1) for p in range(2)])
        summed = (z * weights).sum(-1)
        np.testing.assert_allclose(got, _z(summed.ravel()).reshape(2, 3), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nan_components_are_excluded_per_component(self):
        rewards = np.array([[[0.2, 1.0], [0.6, NAN], [NAN, 0.0], [NAN, NAN]]], np.float32)
        got = self.variant(adv.gdpo_advantages)(rewards, np.ones(2, np.float32))
        # Component 0 scored on samples 0, 1; component 1 on samples 0, 2; sample 3 is unscorable.
        summed = np.array([_z([0.2, 0.6])[0] + _z([1.0, 0.0])[0], _z([0.2, 0.6])[1], _z([1.0, 0.0])[1]])
        np.testing.assert_allclose(got[0, :3], _z(summed), atol=1e-6)
        self.assertEqual(float(got[0, 3]), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_batch_stats_weight_samples_by_length(self):
        rewards = np.array([[[0.0], [1.0]], [[0.2], [0.8]]], np.float32)
        counts = np.array([[3, 1], [0, 2]], np.int32)
        got = self.variant(functools.partial(adv.gdpo_advantages, batch_stats="token"))(
            rewards, np.ones(1, np.float32), token_counts=counts
        )
        summed = np.array([[_z([0.0, 1.0])[0], _z([0.0, 1.0])[1]], [_z([0.2, 0.8])[0], _z([0.2, 0.8])[1]]])
        per_token = np.repeat(summed.ravel(), counts.ravel())  # the sample with 0 tokens drops out
        expected = (summed - per_token.mean()) / (per_token.std(ddof=1) + 1e-4)
        expected[1, 0] = 0.0
        np.testing.assert_allclose(got, expected, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_offset_is_added_after_the_group_and_before_the_batch_normalisation(self):
        rewards = np.array([[[0.1, 0.5], [0.9, 0.2], [0.4, 0.4]], [[1.0, 0.0], [0.0, 0.5], [0.3, 0.3]]], np.float32)
        offset = np.array([[0.0, -0.8, -0.1], [-0.3, 0.0, np.nan]], np.float32)
        got = self.variant(adv.gdpo_advantages)(rewards, np.ones(2, np.float32), offset=offset)
        z = np.stack([np.stack([_z(rewards[p, :, k]) for k in range(2)], -1) for p in range(2)])
        summed = (z.sum(-1) + np.nan_to_num(offset)).ravel()
        expected = np.zeros(6)
        expected[:5] = _z(summed[:5])  # the NaN offset makes sample (1, 2) unscorable for the batch statistics
        np.testing.assert_allclose(got, expected.reshape(2, 3), atol=1e-5)
        with pytest.raises(ValueError, match="offset must be float"):
            adv.gdpo_advantages(rewards, np.ones(2, np.float32), offset=np.zeros((3, 2), np.float32))

    def test_token_counts_required_exactly_with_token_stats(self):
        rewards, weights = jnp.zeros((2, 2, 1)), jnp.ones(1)
        with pytest.raises(ValueError, match="token_counts"):
            adv.gdpo_advantages(rewards, weights, batch_stats="token")
        with pytest.raises(ValueError, match="token_counts"):
            adv.gdpo_advantages(rewards, weights, token_counts=jnp.ones((2, 2)))


class LengthHandlingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_length_conditional_mask_gates_only_the_chosen_component(self):
        rewards = np.full((1, 4, 3), 0.7, np.float32)
        rewards[0, 3, 2] = NAN
        lengths = np.array([[50, 100, 200, 400]])
        ref_lengths = np.array([100])
        got = self.variant(
            functools.partial(adv.length_conditional_mask, ratio_min=0.6, ratio_max=1.5)
        )(rewards, lengths, ref_lengths)
        expected = rewards.copy()
        expected[0, [0, 2], 2] = 0.0  # ρ = 0.5 and 2.0 are outside [0.6, 1.5]; ρ = 4 is NaN and stays NaN
        np.testing.assert_array_equal(got, expected)

    @chex.variants(with_jit=True, without_jit=True)
    def test_length_conditional_mask_several_components_and_per_sample_refs(self):
        rewards = np.full((2, 2, 3), 0.5, np.float32)
        lengths = np.array([[10, 30], [10, 11]])  # rho = 1, 3 | inf, 2.2: outside the default band [0.5, 2.0]
        ref_lengths = np.array([[10, 10], [0, 5]])  # a reference length of 0 counts as out of band
        got = self.variant(
            functools.partial(adv.length_conditional_mask, component=(0, 2), masked_value=-1.0)
        )(rewards, lengths, ref_lengths)
        expected = rewards.copy()
        for p, g in [(0, 1), (1, 0), (1, 1)]:
            expected[p, g, [0, 2]] = -1.0
        np.testing.assert_array_equal(got, expected)

    def test_length_conditional_mask_validates(self):
        rewards = jnp.zeros((1, 2, 3))
        with pytest.raises(ValueError, match="component"):
            adv.length_conditional_mask(rewards, jnp.ones((1, 2)), jnp.ones(1), component=3)
        with pytest.raises(ValueError, match="ratio_min"):
            adv.length_conditional_mask(rewards, jnp.ones((1, 2)), jnp.ones(1), ratio_min=2.0, ratio_max=1.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_linear_length_penalty_tokens_and_ratio(self):
        lengths = np.array([[80, 130, 500]])
        got = self.variant(functools.partial(adv.linear_length_penalty, coef=0.01))(lengths, 100.0)
        np.testing.assert_allclose(got, [[0.0, -0.3, -4.0]], atol=1e-6)
        got = self.variant(functools.partial(adv.linear_length_penalty, coef=2.0, relative=True))(
            np.array([[80, 130], [10, 10]]), np.array([100.0, 0.0])
        )
        # No usable reference (length 0): the relative excess is undefined, so the term is NaN (unscorable).
        np.testing.assert_allclose(got, [[0.0, -0.6], [NAN, NAN]], atol=1e-6)
        with pytest.raises(ValueError, match="coef"):
            adv.linear_length_penalty(lengths, 100.0, coef=-1.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_linear_penalty_under_grpo_is_subtracted_from_the_sum(self):
        rewards = np.array([[[0.5, 0.2], [0.9, 0.4], [0.1, 0.3]]], np.float32)
        lengths = np.array([[120, 90, 150]])

        def penalised(r, lens):
            return adv.grpo_advantages(r, jnp.ones(2), offset=adv.linear_length_penalty(lens, 100.0, coef=0.01))

        got = self.variant(penalised)(rewards, lengths)
        summed = rewards.sum(-1) - 0.01 * np.maximum(lengths - 100, 0)
        np.testing.assert_allclose(got[0], _z(summed[0]), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_append_component_and_scorable_mask(self):
        rewards = np.array([[[0.1, NAN], [NAN, NAN]]], np.float32)
        got = self.variant(adv.append_component)(rewards, np.array([[2.0, 3.0]], np.float32))
        np.testing.assert_array_equal(got, np.array([[[0.1, NAN, 2.0], [NAN, NAN, NAN]]], np.float32))
        np.testing.assert_array_equal(self.variant(adv.scorable_mask)(rewards), [[True, False]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_caprl_length_reward_shape(self):
        lengths = np.array([[0, 100, 150, 200, 300]])
        got = self.variant(
            functools.partial(adv.caprl_length_reward, full_credit_len=100, zero_credit_len=200)
        )(lengths)
        np.testing.assert_allclose(got, [[1.0, 1.0, 0.5, 0.0, 0.0]])
        with pytest.raises(ValueError, match="full_credit_len"):
            adv.caprl_length_reward(lengths, full_credit_len=200, zero_credit_len=100)


# ------------------------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------------------------

GRID = st.integers(0, 8).map(lambda i: i / 8)  # rewards on a dyadic grid: sums and constant means are exact


# Shapes come from a small set so that the jitted functions below compile a handful of times, not per example;
# together they cover G = 1, pairs, larger groups, one and several prompts and components.
SHAPES = ((1, 1, 1), (1, 2, 3), (1, 5, 3), (3, 1, 3), (3, 2, 1), (3, 5, 3))


@st.composite
def reward_tensors(draw, elements, *, min_group=1, max_prompts=3):
    shape = draw(st.sampled_from([s for s in SHAPES if s[1] >= min_group and s[0] <= max_prompts]))
    return draw(hnp.arrays(np.float32, shape, elements=elements))


_STATIC = ("eps", "ddof", "scale", "partial_nan", "batch_stats")
grpo = jax.jit(adv.grpo_advantages, static_argnames=_STATIC[:4])
gdpo = jax.jit(adv.gdpo_advantages, static_argnames=_STATIC[:2] + _STATIC[4:])


def _weights(k):
    return np.linspace(0.5, 2.0, k).astype(np.float32)


# Finite float32 values whose weighted squares cannot overflow, or NaN.
FINITE_REWARD = st.floats(-(2.0**50), 2.0**50, width=32)
ANY_REWARD = st.one_of(FINITE_REWARD, st.just(NAN))


@jax.jit
def every_variant(rewards, weights, token_counts):
    """All advantage variants in one compiled function (one compile per shape keeps the properties fast)."""
    return {
        **{f"grpo_{s}": adv.grpo_advantages(rewards, weights, scale=s) for s in ("group", "batch", "none")},
        "grpo_ddof0": adv.grpo_advantages(rewards, weights, ddof=0),
        "grpo_unscorable": adv.grpo_advantages(rewards, weights, partial_nan="unscorable"),
        "grpo_mean_present": adv.grpo_advantages(rewards, weights, partial_nan="mean_present"),
        "gdpo": adv.gdpo_advantages(rewards, weights),
        "gdpo_ddof0": adv.gdpo_advantages(rewards, weights, ddof=0),
        "gdpo_token": adv.gdpo_advantages(rewards, weights, batch_stats="token", token_counts=token_counts),
    }


def _token_counts(rewards):
    return np.arange(rewards.shape[0] * rewards.shape[1]).reshape(rewards.shape[:2]) % 5


@PROPERTY_SETTINGS
@given(reward_tensors(ANY_REWARD))
def test_no_nan_or_inf_out_for_any_input(rewards):
    outputs = every_variant(rewards, _weights(rewards.shape[-1]), _token_counts(rewards))
    for name, out in outputs.items():
        chex.assert_shape(out, rewards.shape[:2])
        assert np.all(np.isfinite(out)), (name, out)
        # Unscorable samples get exactly 0.
        assert np.all(np.asarray(out)[np.all(np.isnan(rewards), -1)] == 0.0), name


@PROPERTY_SETTINGS
@given(reward_tensors(GRID, min_group=2), st.data())
def test_gdpo_is_invariant_to_per_component_affine_rescaling(rewards, data):
    k = rewards.shape[-1]
    scale = np.array(data.draw(st.lists(st.sampled_from([0.25, 0.5, 2.0, 8.0]), min_size=k, max_size=k)))
    shift = np.array(data.draw(st.lists(GRID.map(lambda x: 4 * x - 2), min_size=k, max_size=k)))
    weights = _weights(k)
    # eps only guards division by zero; a small one makes the invariance exact up to float rounding.
    base = gdpo(rewards, weights, eps=1e-7)
    rescaled = gdpo((rewards * scale + shift).astype(np.float32), weights, eps=1e-7)
    np.testing.assert_allclose(rescaled, base, atol=1e-4)


@PROPERTY_SETTINGS
@given(reward_tensors(GRID, min_group=2), st.data())
def test_constant_groups_get_zero_advantage(rewards, data):
    constant = data.draw(st.lists(st.booleans(), min_size=rewards.shape[0], max_size=rewards.shape[0]))
    rewards = np.where(np.array(constant)[:, None, None], rewards[:, :1], rewards)
    outputs = every_variant(rewards, _weights(rewards.shape[-1]), _token_counts(rewards))
    for name in ("grpo_group", "grpo_batch", "grpo_none", "grpo_ddof0", "grpo_unscorable", "grpo_mean_present"):
        np.testing.assert_array_equal(np.asarray(outputs[name])[np.array(constant)], 0.0, err_msg=name)
    # GDPO: constant groups have z = 0; batch centring moves them only by the batch mean of s, which is 0 up to
    # rounding because every other group's z sums to 0; an all-constant batch is exactly 0.
    out = np.asarray(outputs["gdpo"])
    np.testing.assert_allclose(out[np.array(constant)], 0.0, atol=1e-5)
    if all(constant):
        np.testing.assert_array_equal(out, 0.0)


@PROPERTY_SETTINGS
@given(reward_tensors(GRID, min_group=2))
def test_gdpo_batch_mean_zero_std_one(rewards):
    weights = _weights(rewards.shape[-1])
    out = np.asarray(gdpo(rewards, weights), np.float64)
    constant = np.all(rewards == rewards[:, :1], axis=(1, 2))
    assume(not constant.all())
    assert abs(out.mean()) < 1e-5
    # std is std_s / (std_s + eps): 1 up to eps / std_s, and std_s >= ~0.1 for rewards on a 1/8 grid.
    assert abs(out.std(ddof=1) - 1.0) < 2e-3


@PROPERTY_SETTINGS
@given(reward_tensors(FINITE_REWARD))
def test_grpo_partial_nan_modes_agree_exactly_on_fully_scored_samples(rewards):
    outputs = every_variant(rewards, _weights(rewards.shape[-1]), _token_counts(rewards))
    np.testing.assert_array_equal(outputs["grpo_mean_present"], outputs["grpo_group"])
    np.testing.assert_array_equal(outputs["grpo_unscorable"], outputs["grpo_group"])


def test_grpo_collapses_where_gdpo_separates_binary_example():
    """METHOD.md: groups (0,1)/(1,1) and (0,0)/(1,1) tie under GRPO and differ under GDPO."""
    rewards = np.array([[[0.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]], np.float32)
    weights = np.ones(2, np.float32)
    summed_first = np.asarray(grpo(rewards, weights))
    normalised_first = np.asarray(gdpo(rewards, weights))
    np.testing.assert_allclose(summed_first[0], summed_first[1], atol=1e-3)
    assert np.all(np.abs(normalised_first[1]) > np.abs(normalised_first[0]) + 0.5)
    np.testing.assert_allclose(normalised_first[1], 2 * normalised_first[0], atol=1e-3)


@PROPERTY_SETTINGS
@given(st.sampled_from([2, 5]).flatmap(lambda g: hnp.arrays(np.float32, (g,), elements=st.sampled_from([0.0, 1.0]))))
def test_grpo_collapses_where_gdpo_separates_for_any_binary_group(column):
    assume(column.min() != column.max())
    # Group A: component 2 always satisfied; group B: both components move together.
    rewards = np.stack([np.stack([column, np.ones_like(column)], -1), np.stack([column, column], -1)])
    weights = np.ones(2, np.float32)
    summed_first = np.asarray(grpo(rewards, weights))
    normalised_first = np.asarray(gdpo(rewards, weights))
    # Sums c + 1 and 2c z-score identically; GDPO keeps that group B satisfies both rewards together.
    np.testing.assert_allclose(summed_first[0], summed_first[1], atol=1e-3)
    np.testing.assert_allclose(normalised_first[1], 2 * normalised_first[0], atol=1e-3)
    assert np.max(np.abs(normalised_first[1] - normalised_first[0])) > 0.1


@PROPERTY_SETTINGS
@given(reward_tensors(GRID, max_prompts=1), st.data())
def test_nan_samples_are_excluded_not_zero(rewards, data):
    """A group with unscorable samples scores exactly like the group without them; they get 0."""
    g = rewards.shape[1]
    unscorable = np.array(data.draw(st.lists(st.booleans(), min_size=g, max_size=g)))
    with_nan = rewards.copy()
    with_nan[0, unscorable] = NAN
    weights = _weights(rewards.shape[-1])
    kept = rewards[:, ~unscorable]
    for fn in (grpo, gdpo):
        out = np.asarray(fn(with_nan, weights))
        np.testing.assert_array_equal(out[0, unscorable], 0.0)
        if kept.shape[1]:
            np.testing.assert_allclose(out[0, ~unscorable], np.asarray(fn(kept, weights))[0], atol=1e-6)


@PROPERTY_SETTINGS
@given(reward_tensors(GRID, min_group=2, max_prompts=1), st.data())
def test_gdpo_nan_component_is_excluded_from_that_component_only(rewards, data):
    """A NaN in component k changes only component k's statistics: with one component, it equals dropping it."""
    rewards = rewards[..., :1]
    g = rewards.shape[1]
    missing = np.array(data.draw(st.lists(st.booleans(), min_size=g, max_size=g)))
    with_nan = rewards.copy()
    with_nan[0, missing, 0] = NAN
    out = np.asarray(gdpo(with_nan, np.ones(1, np.float32)))
    np.testing.assert_array_equal(out[0, missing], 0.0)
    if (~missing).sum():
        expected = np.asarray(gdpo(rewards[:, ~missing], np.ones(1, np.float32)))[0]
        np.testing.assert_allclose(out[0, ~missing], expected, atol=1e-6)


@PROPERTY_SETTINGS
@given(reward_tensors(GRID))
def test_groups_with_fewer_than_two_scorable_samples_contribute_zero(rewards):
    rewards = rewards.copy()
    rewards[:, 1:] = NAN  # at most one scorable sample per group
    outputs = every_variant(rewards, _weights(rewards.shape[-1]), _token_counts(rewards))
    # GDPO too: every z is 0, so every summed score is 0 and batch normalisation of a constant is 0.
    for name, out in outputs.items():
        np.testing.assert_array_equal(out, 0.0, err_msg=name)
