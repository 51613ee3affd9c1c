"""KL to a frozen reference (rl/update.py `frozen_reference` + `make_batch_logprobs` -> batch["ref_logprobs"]):
zero KL and zero KL gradient while the policy is the reference, a KL gradient that pulls the policy back once it
has moved, and a reference that survives the train state's donation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from balcap_jax.rl.losses import LossConfig
from balcap_jax.rl.policy_logprobs import make_log_prob_fn
from balcap_jax.rl.update import (
    OptimizerConfig,
    TrainState,
    frozen_reference,
    make_batch_logprobs,
    make_optimizer,
    make_update_step,
)
from tests.rl.rl_toy_lm import ToyCausalLM

VOCAB, DIM, SIZE, LENGTH, SCORED = 16, 8, 8, 6, 3
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-2, max_grad_norm=None))


@functools.cache
def _toy():
    graphdef, params = nnx.split(ToyCausalLM(VOCAB, DIM, 8, rngs=nnx.Rngs(0)))
    log_prob_fn = make_log_prob_fn(graphdef, chunk_size=5)
    return graphdef, params, log_prob_fn, make_batch_logprobs(log_prob_fn)


@functools.cache
def _kl_step(kl_coef: float, donate: bool = False):
    return make_update_step(_toy()[2], OPTIMIZER, LossConfig(kl_coef=kl_coef), donate=donate)


def _batch():
    """Zero advantages: the policy-gradient term is exactly 0, so every gradient below is the KL's."""
    keys = jax.random.split(jax.random.key(0), 2)
    return {
        "input_ids": jax.random.randint(keys[0], (SIZE, LENGTH), 0, VOCAB),
        "attention_mask": jnp.ones((SIZE, LENGTH), bool),
        "positions": jnp.broadcast_to(jnp.arange(LENGTH), (SIZE, LENGTH)),
        "completion_mask": (jax.random.uniform(keys[1], (SIZE, SCORED)) < 0.8).at[:, 0].set(True),
        "old_logprobs": jnp.zeros((SIZE, SCORED), jnp.float32),
        "advantages": jnp.zeros((SIZE,), jnp.float32),
    }


def _moved(params, scale=0.3):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noise = [scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, [leaf + n for leaf, n in zip(leaves, noise)])


def test_policy_equal_to_reference_has_zero_kl_and_zero_kl_gradient():
    _, params, _, batch_logprobs = _toy()
    reference = frozen_reference(params)
    batch = {**_batch(), "ref_logprobs": batch_logprobs(reference, _batch())}
    _, metrics = _kl_step(0.5)(TrainState.create(params, OPTIMIZER), batch)
    np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics["grad_norm"], 0.0, atol=1e-6)


def test_kl_gradient_pulls_a_moved_policy_back_to_the_reference():
    _, params, _, batch_logprobs = _toy()
    reference = frozen_reference(params)
    batch = {**_batch(), "ref_logprobs": batch_logprobs(reference, _batch())}
    state = TrainState.create(_moved(params), OPTIMIZER)

    _, no_kl = _kl_step(0.0)(state, batch)
    assert float(no_kl["grad_norm"]) == 0.0, "with zero advantages and no KL nothing may move the policy"

    pulled, metrics = _kl_step(0.5)(state, batch)
    assert float(metrics["kl"]) > 1e-3 and float(metrics["grad_norm"]) > 1e-3
    np.testing.assert_allclose(metrics["kl_loss"], metrics["kl"], rtol=1e-5)  # token-mean of the same k3 values
    _, after = _kl_step(0.5)(pulled, batch)
    assert float(after["kl"]) < float(metrics["kl"]), (float(after["kl"]), float(metrics["kl"]))


def test_bf16_reference_is_a_separate_cast_copy_that_survives_donation():
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    _, params, _, batch_logprobs = _toy()
    params = jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp") if x.shape[0] % 8 == 0 else P())), params
    )
    reference = frozen_reference(params, jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(reference))
    for ref_leaf, leaf in zip(jax.tree.leaves(reference), jax.tree.leaves(params)):
        assert ref_leaf.sharding.is_equivalent_to(leaf.sharding, leaf.ndim)
        np.testing.assert_array_equal(ref_leaf, leaf.astype(jnp.bfloat16))
    same_dtype = frozen_reference(params)
    assert all(a is not b for a, b in zip(jax.tree.leaves(same_dtype), jax.tree.leaves(params)))

    batch = {**_batch(), "ref_logprobs": batch_logprobs(reference, _batch())}
    state = TrainState.create(params, OPTIMIZER)
    _kl_step(0.5, donate=True)(state, batch)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((reference, same_dtype)))
    # bf16 weights give nearby but not identical log-probs: a real (small) KL to the fp32 policy.
    fp32 = np.asarray(batch_logprobs(same_dtype, _batch()))
    np.testing.assert_allclose(batch["ref_logprobs"], fp32, atol=0.1)
