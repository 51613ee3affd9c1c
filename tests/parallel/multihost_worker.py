"""One process of a 2-process CPU "cluster" (run as a subprocess by test_infra_multihost.py, not collected).

usage: python infra_multihost_worker.py PROCESS_ID PORT HF_DIR OUT_DIR

Initialises jax.distributed through balcap_jax.parallel, builds a mesh spanning both processes, loads a HF
checkpoint into arrays that no single process fully holds, exports it back (gathered collectively, written by
process 0), and checkpoints/restores it through orbax onto a differently shaped mesh.
"""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from balcap_jax.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402
from balcap_jax.models import hf_io  # noqa: E402
from balcap_jax.parallel import (  # noqa: E402
    DistributedConfig,
    abstract_with_shardings,
    initialize_distributed,
    make_mesh,
    specs_from_rules,
)
from tests.models.tiny_lm import TRAINING_RULES, abstract_state  # noqa: E402


def main(process_id: int, port: int, hf_dir: str, out_dir: str) -> None:
    config = DistributedConfig(num_processes=2, process_id=process_id, coordinator_address=f"127.0.0.1:{port}")
    assert initialize_distributed(config)
    assert jax.process_count() == 2 and jax.device_count() == 2 * jax.local_device_count()
    mesh = make_mesh((2, -1, 2))  # data axis across the two processes
    abstract = abstract_state()
    target = abstract_with_shardings(abstract, specs_from_rules(abstract, TRAINING_RULES), mesh)
    state = hf_io.load_hf_state(hf_dir, target)
    kernel = state["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
    assert not kernel.is_fully_addressable
    hf_io.save_hf_state(state, f"{out_dir}/export", config=hf_io.read_hf_config(hf_dir), max_shard_size="30KB")

    with Checkpointer(f"{out_dir}/run", CheckpointConfig(save_on_signals=())) as ckpt:
        assert ckpt.should_save(3) is False  # the collective preemption check agrees on both processes
        ckpt.save(3, state, data_state={"process_count": 2}, wait=True)
    other = make_mesh((1, -1, 1))  # restore onto pure FSDP over all 2 * local devices
    target = abstract_with_shardings(abstract, specs_from_rules(abstract, [(r".*", jax.sharding.PartitionSpec())]), other)
    with Checkpointer(f"{out_dir}/run", CheckpointConfig(save_on_signals=())) as ckpt:
        restored = ckpt.restore(target)
    for (a, b) in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state)):
        gathered = multihost_utils.process_allgather(a, tiled=True)
        np.testing.assert_array_equal(gathered, np.asarray(b.addressable_data(0)))
    print(f"ok {process_id} devices={jax.device_count()} restored_step={restored.step}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
