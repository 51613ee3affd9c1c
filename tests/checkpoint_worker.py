"""A stand-in training loop for the checkpoint process tests (run as a subprocess, not collected by pytest).

usage: python infra_checkpoint_worker.py WORKDIR SAVE_EVERY

State at step s is `expected_state(s)`, so a test can check any restored step without sharing memory. Prints
"step <s>" after each step; exits after a save-on-SIGTERM, printing "preempted <s>".
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from balcap_jax.checkpoint import CheckpointConfig, Checkpointer

SIZE = 256 * 1024  # 1 MiB of float32 per array: writes take long enough for a kill to land mid-write


def expected_state(step: int) -> dict:
    return {
        "params": {"w": jnp.full((SIZE,), float(step), jnp.float32), "b": jnp.arange(8, dtype=jnp.float32) * step},
        "step": jnp.asarray(step, jnp.int32),
        "rng": jax.random.fold_in(jax.random.key(0), step),
    }


def expected_data_state(step: int) -> dict:
    return {"records_seen": 16 * step, "epoch": step // 10}


def main(workdir: str, save_every: int) -> None:
    ckpt = Checkpointer(workdir, CheckpointConfig(save_every_steps=save_every, keep_last=3))
    restored = ckpt.restore(jax.eval_shape(lambda: expected_state(0)))
    step = 0 if restored is None else restored.step
    while True:
        step += 1
        state = expected_state(step)
        np.asarray(state["params"]["w"][:1])  # the "train step" finished
        if ckpt.should_save(step):
            ckpt.save(step, state, data_state=expected_data_state(step), config={"save_every": save_every})
        print(f"step {step}", flush=True)
        if ckpt.should_stop:
            ckpt.close()
            print(f"preempted {step}", flush=True)
            return
        time.sleep(0.02)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
