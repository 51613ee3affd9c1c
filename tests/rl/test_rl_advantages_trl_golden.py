"""Golden test: our GRPO / GDPO advantages equal TRL 1.16's `GRPOTrainer` on the same reward tensors.

TRL computes advantages inline in `GRPOTrainer._generate_and_score_completions`, between the line that marks
unscorable rows and the `nan_to_num` that zeroes them. We run TRL's own source of that block (read from the
installed package, not copied) with TRL's own `nanstd`, on a stand-in `self` that holds only the attributes the
block reads. If TRL moves the block, the test fails and says so rather than silently comparing with nothing.
"""

import ast
import importlib.util
import pathlib
import textwrap
import types

import jax
import numpy as np
import pytest

from balcap_jax.rl import advantages as adv

torch = pytest.importorskip("torch")
trl_utils = pytest.importorskip("trl.trainer.utils")

BLOCK_START = "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)"
BLOCK_END = "advantages = torch.nan_to_num(advantages, nan=0.0)"


def _trl_advantage_block() -> types.CodeType:
    path = pathlib.Path(importlib.util.find_spec("trl").submodule_search_locations[0]) / "trainer/grpo_trainer.py"
    tree = ast.parse(path.read_text())
    method = next(
        node for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == "_generate_and_score_completions"
    )
    source = ast.get_source_segment(path.read_text(), method)
    start, end = source.find(BLOCK_START), source.find(BLOCK_END)
    assert start >= 0 and end > start, f"TRL's advantage block moved in {path}; update the markers of this test."
    # Re-indent from the start of the marker's line so the block dedents cleanly.
    line_start = source.rfind("\n", 0, start) + 1
    block = textwrap.dedent(source[line_start : end + len(BLOCK_END)])
    return compile(block, f"{path}:advantages", "exec")


TRL_BLOCK = _trl_advantage_block()


def trl_advantages(rewards: np.ndarray, weights: np.ndarray, aggregation: str, scale_rewards: str) -> np.ndarray:
    num_prompts, group_size, num_components = rewards.shape
    trainer = types.SimpleNamespace(
        multi_objective_aggregation=aggregation,
        scale_rewards=scale_rewards,
        reward_weights=torch.tensor(weights, dtype=torch.float32),
        reward_funcs=[None] * num_components,
    )
    namespace = {
        "self": trainer,
        "torch": torch,
        "nanstd": trl_utils.nanstd,
        "rewards_per_func": torch.tensor(rewards.reshape(-1, num_components), dtype=torch.float32),
        "num_generations": group_size,
        "device": "cpu",
    }
    exec(TRL_BLOCK, namespace)
    return namespace["advantages"].numpy().reshape(num_prompts, group_size)


def _reward_tensor(seed: int, shape: tuple[int, int, int], nan_fraction: float, constant: str) -> np.ndarray:
    """Continuous rewards with every NaN situation: unscorable components, an unscorable sample, a group with a
    single scorable sample; group 0 on a 1/8 grid (ties, as in CapRL's 8-question accuracy).
    constant: "none", "dyadic" (group 1 constant at a multiple of 1/8) or "float" (constant at a float value)."""
    rng = np.random.default_rng(seed)
    rewards = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    rewards[0] = np.round(rewards[0] * 8) / 8
    rewards[0, 0] = 1.0 - rewards[0, 1]  # no component of group 0 is constant by accident
    rewards[rng.uniform(size=shape) < nan_fraction] = np.nan
    rewards[-1, 0] = np.nan  # an unscorable sample
    if shape[0] > 2:
        rewards[2, 1:] = np.nan  # a group with a single scorable sample
    if constant != "none":
        rewards[1] = np.float32(0.625) if constant == "dyadic" else rng.uniform(0.0, 1.0, shape[-1])
    return rewards


@jax.jit
def ours(rewards, weights):
    """Every variant under test in one compiled function: one compile per shape keeps this file fast."""
    return {
        **{scale: adv.grpo_advantages(rewards, weights, scale=scale) for scale in ("group", "batch", "none")},
        "gdpo": adv.gdpo_advantages(rewards, weights),
    }


SHAPES = [((4, 8, 3), 0.0), ((4, 8, 3), 0.15), ((6, 4, 2), 0.3), ((3, 2, 4), 0.1), ((5, 6, 1), 0.2)]
CASES = [(seed, shape, nan) for seed, (shape, nan) in enumerate(SHAPES)]


@pytest.mark.parametrize("seed,shape,nan_fraction", CASES)
@pytest.mark.parametrize("constant", ["none", "dyadic"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_equals_trl_sum_then_normalize(seed, shape, nan_fraction, constant, scale):
    rewards = _reward_tensor(seed, shape, nan_fraction, constant)
    weights = np.linspace(0.5, 1.5, shape[-1]).astype(np.float32)
    got = np.asarray(ours(rewards, weights)[scale])
    theirs = trl_advantages(rewards, weights, "sum_then_normalize", scale)
    np.testing.assert_allclose(got, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed,shape,nan_fraction", CASES)
@pytest.mark.parametrize("constant", ["none", "dyadic"])
def test_gdpo_equals_trl_normalize_then_sum(seed, shape, nan_fraction, constant):
    rewards = _reward_tensor(seed, shape, nan_fraction, constant)
    weights = np.linspace(0.5, 1.5, shape[-1]).astype(np.float32)
    got = np.asarray(ours(rewards, weights)["gdpo"])
    theirs = trl_advantages(rewards, weights, "normalize_then_sum", "group")
    np.testing.assert_allclose(got, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed,shape,nan_fraction", CASES)
def test_constant_group_is_exactly_zero_where_trl_keeps_rounding_noise(seed, shape, nan_fraction):
    """The one deliberate difference from TRL. TRL's plain float32 mean of G identical values can land a few ulps
    off the value, and dividing by std + eps = 0 + 1e-4 turns that into an advantage of up to ~1e-2 (GDPO then
    spreads it through the batch statistics). Our mean is shifted by a member of the group, so a constant group
    gets exactly 0; on the rest of the batch GRPO still equals TRL to 1e-6."""
    rewards = _reward_tensor(seed, shape, nan_fraction, "float")
    weights = np.linspace(0.5, 1.5, shape[-1]).astype(np.float32)
    got = np.asarray(ours(rewards, weights)["group"])
    theirs = trl_advantages(rewards, weights, "sum_then_normalize", "group")
    np.testing.assert_array_equal(got[1], 0.0)
    np.testing.assert_allclose(theirs[1], 0.0, atol=1e-2)
    rest = np.arange(shape[0]) != 1
    np.testing.assert_allclose(got[rest], theirs[rest], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours(rewards, weights)["gdpo"][1], 0.0, atol=1e-5)


def test_golden_cases_exercise_the_nan_paths():
    """Guards the test data itself: the cases above must contain every situation the semantics cover."""
    rewards = _reward_tensor(*CASES[2], "dyadic")
    scored = ~np.isnan(rewards)
    assert (~scored.any(-1)).any(), "needs an unscorable sample"
    assert (scored.any(-1) & ~scored.all(-1)).any(), "needs a partially scored sample"
    assert (scored.any(-1).sum(-1) == 1).any(), "needs a group with one scorable sample"
    assert np.all(rewards[1] == rewards[1, :1]), "needs a constant group"
