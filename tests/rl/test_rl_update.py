"""Tests for balcap_jax/rl/update.py: optimizer factory, micro-batching, non-finite guard, donation, and RL on a
toy policy on 1 device and on an 8-device ('data', 'fsdp') mesh."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from balcap_jax.rl import advantages as adv
from balcap_jax.rl.losses import LossConfig
from balcap_jax.rl.policy_logprobs import make_log_prob_fn
from balcap_jax.rl.update import (
    OptimizerConfig,
    TrainState,
    make_lr_schedule,
    make_optimizer,
    make_update_step,
    split_micro_batches,
)
from tests.rl.rl_toy_lm import ToyCausalLM

VOCAB, DIM = 16, 8


def _toy(seed=0):
    graphdef, params = nnx.split(ToyCausalLM(VOCAB, DIM, 8, rngs=nnx.Rngs(seed)))
    return graphdef, params


def _batch(size=8, length=6, scored=3, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        "input_ids": jax.random.randint(keys[0], (size, length), 0, VOCAB),
        "attention_mask": jnp.ones((size, length), bool),
        "positions": jnp.broadcast_to(jnp.arange(length), (size, length)),
        "completion_mask": jax.random.uniform(keys[1], (size, scored)) < 0.8,
        "old_logprobs": jnp.full((size, scored), -np.log(VOCAB), jnp.float32),
        "advantages": jax.random.normal(keys[2], (size,)),
        "ref_logprobs": jnp.full((size, scored), -np.log(VOCAB), jnp.float32),
    }


# ------------------------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------------------------


class OptimizerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_constant_schedule_with_warmup(self):
        schedule = self.variant(make_lr_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=4)))
        np.testing.assert_allclose([schedule(s) for s in (0, 2, 4, 100)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cosine_schedule(self):
        config = OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=10, total_steps=110,
                                 final_lr_ratio=0.1)
        schedule = self.variant(make_lr_schedule(config))
        halfway = 1e-4 + (1e-3 - 1e-4) * 0.5
        np.testing.assert_allclose([schedule(s) for s in (5, 10, 60, 110)], [5e-4, 1e-3, halfway, 1e-4], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_clipping_and_decoupled_weight_decay_on_matrices_only(self):
        params = {"matrix": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
        optimizer = make_optimizer(OptimizerConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=1.0))
        state = optimizer.init(params)
        grads = {"matrix": jnp.full((2, 2), 100.0), "bias": jnp.zeros((2,))}
        updates, _ = self.variant(optimizer.update)(grads, state, params)
        # Adam's first step is lr * sign(g) whatever the clipping; decay adds lr * wd * p on the matrix only.
        np.testing.assert_allclose(updates["matrix"], -0.1 * (1.0 + 0.5), rtol=1e-5)
        np.testing.assert_allclose(updates["bias"], 0.0, atol=1e-12)
        clip_only = make_optimizer(OptimizerConfig(learning_rate=0.1, max_grad_norm=1.0))
        inner = optax.clip_by_global_norm(1.0)
        clipped, _ = inner.update(grads, inner.init(params))
        np.testing.assert_allclose(optax.global_norm(clipped), 1.0, rtol=1e-6)
        assert isinstance(clip_only, optax.GradientTransformation)

    @parameterized.parameters(
        dict(learning_rate=0.0), dict(schedule="linear"), dict(schedule="cosine", total_steps=None),
        dict(warmup_steps=-1), dict(max_grad_norm=0.0), dict(weight_decay=-0.1), dict(final_lr_ratio=2.0),
    )
    def test_config_validation_names_the_field(self, **kwargs):
        with pytest.raises(ValueError, match="OptimizerConfig"):
            OptimizerConfig(**kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Micro-batching and the step
# ------------------------------------------------------------------------------------------------------------------


class MicroBatchTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_split_is_strided_and_handles_mrope_positions(self):
        batch = {
            "input_ids": jnp.arange(6)[:, None] * jnp.ones((1, 3), jnp.int32),
            "positions": jnp.arange(6)[None, :, None] * jnp.ones((3, 1, 3), jnp.int32),
            "vision": {"features": jnp.arange(6.0)},
        }
        split = self.variant(functools.partial(split_micro_batches, micro_batches=2))(batch)
        chex.assert_shape(split["input_ids"], (2, 3, 3))
        chex.assert_shape(split["positions"], (2, 3, 3, 3))
        np.testing.assert_array_equal(split["input_ids"][1, :, 0], [1, 3, 5])
        np.testing.assert_array_equal(split["positions"][1, 0, :, 0], [1, 3, 5])
        np.testing.assert_array_equal(split["vision"]["features"][0], [0, 2, 4])

    def test_split_rejects_unbatched_leaves_and_indivisible_sizes(self):
        batch = _batch(size=8)
        with pytest.raises(ValueError, match="not divisible"):
            split_micro_batches(batch, 3)
        with pytest.raises(ValueError, match="use micro_batches=1"):
            split_micro_batches({**batch, "vision": jnp.ones((20, 4))}, 2)


SCHEDULE_CONFIG = OptimizerConfig(learning_rate=1e-2, warmup_steps=2)
OPTIMIZER = make_optimizer(SCHEDULE_CONFIG)
LOSS_CONFIG = LossConfig(kl_coef=0.1, entropy_coef=0.01, aggregation="seq-mean-token-mean")


@functools.cache
def _toy_step(micro_batches: int, donate: bool):
    """Update steps shared by the tests below, so each variant compiles once per session."""
    graphdef, _ = _toy()
    return make_update_step(
        make_log_prob_fn(graphdef, chunk_size=5), OPTIMIZER, LOSS_CONFIG, micro_batches=micro_batches,
        donate=donate, learning_rate_fn=make_lr_schedule(SCHEDULE_CONFIG),
    )


def _fresh_state():
    return TrainState.create(_toy()[1], OPTIMIZER)


def test_micro_batches_give_the_same_update_as_one_batch():
    batch = _batch()
    state_1, metrics_1 = _toy_step(1, False)(_fresh_state(), batch)
    state_4, metrics_4 = _toy_step(4, False)(_fresh_state(), batch)
    state_1, metrics_1 = _toy_step(1, False)(state_1, _batch(seed=1))  # past warmup step 0 (lr 0)
    state_4, metrics_4 = _toy_step(4, False)(state_4, _batch(seed=1))
    chex.assert_trees_all_close(state_4.params, state_1.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(metrics_4, metrics_1, atol=1e-6, rtol=1e-5)
    assert float(metrics_1["grad_norm"]) > 0 and float(metrics_1["skipped"]) == 0.0
    assert float(metrics_1["learning_rate"]) > 0
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state_1.params), jax.tree.leaves(_toy()[1]))
    )


def test_non_finite_step_is_skipped_and_counted_then_training_resumes():
    step = _toy_step(4, True)
    state = _fresh_state()
    initial = jax.tree.map(jnp.copy, state)  # `state` itself is donated to the step
    bad = _batch()
    bad["advantages"] = bad["advantages"].at[3].set(jnp.nan)
    skipped_state, metrics = step(state, bad)
    state = initial
    assert float(metrics["skipped"]) == 1.0 and int(skipped_state.skipped_steps) == 1
    assert int(skipped_state.step) == 1
    chex.assert_trees_all_equal(skipped_state.params, state.params)
    chex.assert_trees_all_equal(skipped_state.opt_state, state.opt_state)

    resumed, metrics = step(skipped_state, _batch())
    assert float(metrics["skipped"]) == 0.0 and int(resumed.skipped_steps) == 1 and int(resumed.step) == 2
    # The schedule follows applied updates: the skipped step did not advance the warmup (0, then 1e-2 / 2).
    np.testing.assert_allclose(metrics["learning_rate"], 0.0)
    moved, metrics = step(resumed, _batch(seed=1))
    np.testing.assert_allclose(metrics["learning_rate"], 5e-3, rtol=1e-6)
    assert int(moved.step) == 3 and int(moved.skipped_steps) == 1
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(moved.params), jax.tree.leaves(state.params))
    )


def test_state_is_donated():
    state = _fresh_state()
    kept, _ = _toy_step(1, False)(state, _batch())
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    _toy_step(4, True)(kept, _batch())
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(kept.params))


def test_batch_validation():
    state, batch = _fresh_state(), _batch()
    step = _toy_step(1, False)
    with pytest.raises(ValueError, match="missing keys"):
        step(state, {k: v for k, v in batch.items() if k != "advantages"})
    with pytest.raises(ValueError, match="ref_logprobs"):  # LOSS_CONFIG has kl_coef > 0
        step(state, {k: v for k, v in batch.items() if k != "ref_logprobs"})
    with pytest.raises(ValueError, match=r"batch\['advantages'\] has shape \(8, 3\), expected \(8,\)"):
        step(state, {**batch, "advantages": jnp.zeros((8, 3))})
    with pytest.raises(ValueError, match="old_logprobs"):
        step(state, {**batch, "old_logprobs": jnp.zeros((8, 4))})
    with pytest.raises(ValueError, match="micro_batches"):
        make_update_step(make_log_prob_fn(_toy()[0]), OPTIMIZER, LOSS_CONFIG, micro_batches=0)


# ------------------------------------------------------------------------------------------------------------------
# RL on a toy policy: one prompt token, one sampled answer token, two reward components.
# ------------------------------------------------------------------------------------------------------------------

PROMPTS, GROUP = 4, 8
GOOD = jnp.array([3, 7, 11, 14])  # the rewarded answer per prompt
WEIGHTS = jnp.array([1.0, 0.5])


def _token_rewards():
    """rewards[P, V, K]: component 0 = the answer is right, component 1 = the answer is in the lower half."""
    tokens = jnp.arange(VOCAB)
    right = (tokens[None, :] == GOOD[:, None]).astype(jnp.float32)
    lower = jnp.broadcast_to((tokens < VOCAB // 2).astype(jnp.float32), right.shape)
    return jnp.stack([right, lower], -1)


def _rl_batch(params, graphdef, log_prob_fn, key):
    """Sample GROUP answers per prompt from the policy and build the update batch (GDPO advantages)."""
    model = nnx.merge(graphdef, params)
    prompt = {
        "input_ids": jnp.repeat(jnp.arange(PROMPTS), GROUP)[:, None],
        "attention_mask": jnp.ones((PROMPTS * GROUP, 1), bool),
        "positions": jnp.zeros((PROMPTS * GROUP, 1), jnp.int32),
    }
    answers = jax.random.categorical(key, model.logits(model.hidden_states(prompt))[:, 0])
    batch = {
        "input_ids": jnp.concatenate([prompt["input_ids"], answers[:, None]], axis=1),
        "attention_mask": jnp.ones((PROMPTS * GROUP, 2), bool),
        "positions": jnp.broadcast_to(jnp.arange(2), (PROMPTS * GROUP, 2)),
        "completion_mask": jnp.ones((PROMPTS * GROUP, 1), bool),
    }
    old_logprobs, _ = log_prob_fn(params, batch)
    rewards = _token_rewards()[jnp.repeat(jnp.arange(PROMPTS), GROUP), answers].reshape(PROMPTS, GROUP, 2)
    advantages = adv.gdpo_advantages(rewards, WEIGHTS).reshape(-1)
    return {**batch, "old_logprobs": old_logprobs, "ref_logprobs": old_logprobs, "advantages": advantages}


def _expected_reward(params, graphdef):
    """Exact E_policy[Σ_k w_k r_k], averaged over prompts."""
    model = nnx.merge(graphdef, params)
    prompt = {
        "input_ids": jnp.arange(PROMPTS)[:, None],
        "attention_mask": jnp.ones((PROMPTS, 1), bool),
        "positions": jnp.zeros((PROMPTS, 1), jnp.int32),
    }
    probs = jax.nn.softmax(model.logits(model.hidden_states(prompt))[:, 0], axis=-1)
    return jnp.mean(jnp.sum(probs * (_token_rewards() @ WEIGHTS), axis=-1))


def _train(mesh: Mesh | None, steps: int = 12):
    graphdef, params = _toy(seed=1)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=0.05, warmup_steps=2))
    log_prob_fn = make_log_prob_fn(graphdef, chunk_size=6)
    update = make_update_step(log_prob_fn, optimizer, LossConfig(eps_high=0.28, kl_coef=0.01), micro_batches=2)
    make_batch = jax.jit(functools.partial(_rl_batch, graphdef=graphdef, log_prob_fn=log_prob_fn))
    expected_reward = jax.jit(functools.partial(_expected_reward, graphdef=graphdef))
    if mesh is not None:
        # FSDP: shard every parameter whose leading dimension divides over 'fsdp'; replicate the rest.
        fsdp = mesh.shape["fsdp"]
        params = jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp") if x.shape[0] % fsdp == 0 else P())), params
        )
    state = jax.jit(TrainState.create, static_argnums=1)(params, optimizer)
    rewards, metrics = [float(expected_reward(state.params))], []
    for key in jax.random.split(jax.random.key(42), steps):
        batch = make_batch(state.params, key=key)
        if mesh is not None:
            batch = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
        state, step_metrics = update(state, batch)
        metrics.append(step_metrics)
        rewards.append(float(expected_reward(state.params)))
    return state, np.array(rewards), jax.tree.map(lambda *x: np.stack(x), *metrics)


@pytest.mark.slow
def test_toy_policy_learns_identically_on_one_and_eight_devices():
    single_state, single_rewards, single_metrics = _train(mesh=None)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    mesh_state, mesh_rewards, mesh_metrics = _train(mesh=mesh)

    # The policy learns: the exact expected reward rises well above where it started.
    assert single_rewards[-1] > single_rewards[0] + 0.4, single_rewards
    assert np.all(single_metrics["skipped"] == 0)
    # ... and the sharded run is the same computation: same rewards, metrics and parameters up to float rounding.
    np.testing.assert_allclose(mesh_rewards, single_rewards, atol=1e-5)
    for key in ("loss", "grad_norm", "clip_fraction", "kl", "entropy"):
        np.testing.assert_allclose(mesh_metrics[key], single_metrics[key], atol=1e-5, rtol=1e-4, err_msg=key)
    chex.assert_trees_all_close(mesh_state.params, single_state.params, atol=1e-5, rtol=1e-5)
    sharded = [leaf.sharding for leaf in jax.tree.leaves(mesh_state.params)]
    assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in sharded), "params must stay FSDP"
