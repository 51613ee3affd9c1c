import jax.numpy as jnp
import numpy as np
import pytest

from balcap_jax.rl import advantages as adv
from balcap_jax.rl import shaping

COMPONENTS = ("precision", "recall", "linguistic")


def _cfg(**kw):
    return shaping.ShapingConfig(components=COMPONENTS, weights=(1.0, 1.0, 1.0), **kw)


def _rewards():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.uniform(size=(3, 4, 3)), jnp.float32)


def test_mask_gates_only_the_linguistic_component_outside_the_band():
    rewards = _rewards()
    lengths = jnp.array([[10, 30, 5, 20]] * 3)
    ref = jnp.array([20, 20, 20])
    shaped, weights = shaping.shape_rewards(rewards, lengths, ref, _cfg(ratio_min=0.5, ratio_max=1.25))
    assert weights.shape == (3,)
    out_of_band = np.array([False, True, True, False])  # ratios 0.5, 1.5, 0.25, 1.0
    np.testing.assert_array_equal(np.asarray(shaped[..., :2]), np.asarray(rewards[..., :2]))
    np.testing.assert_array_equal(np.asarray(shaped[:, out_of_band, 2]), 0.0)
    np.testing.assert_array_equal(np.asarray(shaped[:, ~out_of_band, 2]), np.asarray(rewards[:, ~out_of_band, 2]))


def test_linear_penalty_is_a_per_sample_offset_and_none_is_identity():
    rewards = _rewards()
    lengths = jnp.full((3, 4), 40)
    ref = jnp.array([20, 20, 20])
    cfg = _cfg(length_kind="linear", length_coef=0.5)
    shaped, weights = shaping.shape_rewards(rewards, lengths, ref, cfg)
    assert shaped.shape == (3, 4, 3) and weights.tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(np.asarray(shaped), np.asarray(rewards))
    np.testing.assert_allclose(np.asarray(shaping.length_offset(lengths, ref, cfg)), -0.5 * (40 / 20 - 1))
    assert shaping.length_offset(lengths, ref, _cfg(length_kind="mask")) is None
    same, _ = shaping.shape_rewards(rewards, lengths, ref, _cfg(length_kind="none"))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(rewards))


def test_advantages_dispatch_to_grpo_and_gdpo():
    rewards = _rewards()
    lengths = jnp.full((3, 4), 20)
    ref = jnp.array([20, 20, 20])
    w = jnp.ones(3)
    a_gdpo, _ = shaping.advantages(rewards, lengths, ref, _cfg(kind="gdpo"))
    a_grpo, _ = shaping.advantages(rewards, lengths, ref, _cfg(kind="grpo"))
    np.testing.assert_allclose(np.asarray(a_gdpo), np.asarray(adv.gdpo_advantages(rewards, w)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(a_grpo), np.asarray(adv.grpo_advantages(rewards, w)), atol=1e-6)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(kind="ppo"), "config.advantage.kind"),
        (dict(length_kind="cubic"), "config.length.kind"),
        (dict(length_component="style"), "config.length.component"),
    ],
)
def test_bad_settings_name_the_config_field(kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**kw)


def test_balanced_score_skips_nan_components():
    rewards = np.array([[[1.0, 0.0, np.nan], [np.nan, np.nan, np.nan]]])
    score = shaping.balanced_score(rewards, (1.0, 1.0, 2.0))
    assert score[0, 0] == pytest.approx(0.5)
    assert np.isnan(score[0, 1])
