"""The length-conditional mask defaults to the paper's band [0.5, 2.0] with masked value 0 (METHOD.md), in
rl/advantages.py and in the shaping config built from it."""

import jax.numpy as jnp
import numpy as np
import pytest

from balcap_jax.rl import advantages as adv
from balcap_jax.rl import shaping

# length ratios rho = len / ref_len of five captions against a 20-token reference
RATIOS = np.array([0.45, 0.5, 1.8, 2.0, 2.1], np.float32)
INSIDE = np.array([False, True, True, True, False])


def _masked_linguistic(mask_fn) -> np.ndarray:
    rewards = jnp.full((1, len(RATIOS), 3), 0.7, jnp.float32)
    lengths = jnp.asarray(RATIOS[None] * 20.0)
    return np.asarray(mask_fn(rewards, lengths, jnp.asarray([20.0])))[0, :, 2]


def test_default_band_is_the_papers_and_masks_to_zero():
    got = _masked_linguistic(adv.length_conditional_mask)
    np.testing.assert_array_equal(got, np.where(INSIDE, 0.7, 0.0).astype(np.float32))


def test_shaping_config_defaults_to_the_papers_band():
    cfg = shaping.ShapingConfig(components=("precision", "recall", "linguistic"), weights=(1.0, 1.0, 1.0))
    assert (cfg.ratio_min, cfg.ratio_max, cfg.masked_value) == (0.5, 2.0, 0.0)
    shaped, _ = shaping.shape_rewards(jnp.full((1, 5, 3), 0.7), jnp.asarray(RATIOS[None] * 20.0),
                                      jnp.asarray([20.0]), cfg)
    np.testing.assert_array_equal(np.asarray(shaped)[0, :, 2], np.where(INSIDE, 0.7, 0.0).astype(np.float32))


@pytest.mark.parametrize("band", [(0.75, 1.25), (0.5, 1.5)])
def test_other_bands_remain_available_as_arguments(band):
    got = _masked_linguistic(lambda r, l, ref: adv.length_conditional_mask(r, l, ref, ratio_min=band[0],
                                                                          ratio_max=band[1]))
    inside = (RATIOS >= band[0]) & (RATIOS <= band[1])
    np.testing.assert_array_equal(got, np.where(inside, 0.7, 0.0).astype(np.float32))
