"""Checkpointer: round trip, keep-last-k, restore onto another mesh, SIGTERM save and kill -9 safety."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from balcap_jax.checkpoint import CheckpointConfig, Checkpointer
from balcap_jax.parallel import abstract_with_shardings, make_mesh
from tests.checkpoint_worker import expected_data_state, expected_state

WORKER = Path(__file__).with_name("checkpoint_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _train_state():
    params = {"layer": {"kernel": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), "bias": jnp.ones(32)}}
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7, jnp.int32), "rng": jax.random.key(42)}


def _assert_trees_equal(a, b):
    a_leaves, a_def = jax.tree.flatten(a)
    b_leaves, b_def = jax.tree.flatten(b)
    assert a_def == b_def
    for x, y in zip(a_leaves, b_leaves):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_data_config_and_rng(tmp_path):
    state = _train_state()
    config = ml_collections.ConfigDict({"rl": {"group_size": 8, "advantage": "gdpo"}, "mesh": {"fsdp": -1}})
    grain_like_state = b'{"next_index": 17}'
    with Checkpointer(tmp_path, CheckpointConfig(save_every_steps=5)) as ckpt:
        assert ckpt.restore(jax.eval_shape(lambda: state)) is None
        assert ckpt.save(5, state, data_state=grain_like_state, config=config)
        assert not ckpt.save(5, state), "a step already saved is not saved twice"
    with Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(jax.eval_shape(lambda: state))
    assert restored.step == 5
    _assert_trees_equal(restored.state, state)
    assert restored.data_state == grain_like_state
    assert restored.config == config.to_dict()
    # the restored key draws the same numbers as the original
    np.testing.assert_array_equal(
        jax.random.uniform(restored.state["rng"], (3,)), jax.random.uniform(state["rng"], (3,))
    )


def test_periodic_policy_and_keep_last_k(tmp_path):
    state = {"w": jnp.zeros(4)}
    with Checkpointer(tmp_path, CheckpointConfig(save_every_steps=2, keep_last=2)) as ckpt:
        decisions = [ckpt.should_save(step) for step in range(1, 9)]
        assert decisions == [False, True, False, True, False, True, False, True]
        for step in range(1, 9):
            if ckpt.should_save(step):
                ckpt.save(step, {"w": jnp.full(4, float(step))}, data_state={"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [6, 8]
        restored = ckpt.restore(jax.eval_shape(lambda: state), step=6)
        np.testing.assert_array_equal(restored.state["w"], np.full(4, 6.0))
        assert restored.data_state == {"step": 6}
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 2.*\[6, 8\]"):
            ckpt.restore(jax.eval_shape(lambda: state), step=2)
        ckpt.request_preemption()
        assert ckpt.preemption_requested and not ckpt.should_stop, "no stop before the preemption save"
        assert ckpt.should_save(9)
        ckpt.save(9, state)
        assert ckpt.should_stop


def test_restore_onto_a_different_mesh(tmp_path):
    value = jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32)
    fsdp_only = make_mesh((1, 8, 1))
    saved = {"kernel": jax.device_put(value, NamedSharding(fsdp_only, P("fsdp"))), "rng": jax.random.key(1)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, saved)

    mesh = make_mesh((2, 2, 2))
    abstract = jax.eval_shape(lambda: saved)
    specs = {"kernel": P("fsdp", "tensor"), "rng": P()}
    with Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(abstract_with_shardings(abstract, specs, mesh)).state
        single = ckpt.restore(abstract).state  # no shardings given: one device
    assert restored["kernel"].sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    assert {s.data.shape for s in restored["kernel"].addressable_shards} == {(32, 16)}
    np.testing.assert_array_equal(np.asarray(restored["kernel"]), np.asarray(value))
    assert len(single["kernel"].sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(single["kernel"]), np.asarray(value))
    _assert_trees_equal(restored["rng"], saved["rng"])


def _start_worker(workdir: Path, save_every: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(workdir), str(save_every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_step(proc: subprocess.Popen, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited early: {proc.stderr.read()[-2000:]}")
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return
    raise AssertionError("worker too slow")


def _check_restorable(workdir: Path, step: int) -> None:
    with Checkpointer(workdir) as ckpt:
        restored = ckpt.restore(jax.eval_shape(lambda: expected_state(0)), step=step)
    _assert_trees_equal(restored.state, expected_state(step))
    assert restored.data_state == expected_data_state(step)


@pytest.mark.slow
def test_sigterm_saves_then_stops(tmp_path):
    proc = _start_worker(tmp_path, save_every=10_000)  # no periodic saves: only the signal can cause one
    try:
        _wait_for_step(proc, 3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    preempted_at = int(out.strip().splitlines()[-1].split()[1])
    assert out.strip().splitlines()[-1] == f"preempted {preempted_at}"
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [preempted_at]
    _check_restorable(tmp_path, preempted_at)


@pytest.mark.slow
def test_kill_9_mid_training_leaves_last_complete_checkpoint_usable(tmp_path):
    proc = _start_worker(tmp_path, save_every=1)
    try:
        _wait_for_step(proc, 4)
        proc.send_signal(signal.SIGKILL)  # most likely while an async write is in flight
        proc.wait(timeout=30)
    finally:
        proc.kill()
    with Checkpointer(tmp_path) as ckpt:
        steps = ckpt.all_steps()
    # a write cut short leaves "<step>.orbax-checkpoint-tmp" (removed in the background on open): never a step
    partial = [int(p.name.split(".")[0]) for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
    assert not set(partial) & set(steps), f"a partial write was listed as a checkpoint: {partial}"
    assert steps and steps[-1] >= 2
    _check_restorable(tmp_path, steps[-1])

    # a resumed run continues from that step
    proc = _start_worker(tmp_path, save_every=1)
    try:
        first = proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.communicate()
    assert first == f"step {steps[-1] + 1}"
