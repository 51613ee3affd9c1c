"""Where the run's arrays live on the (data, fsdp, tensor) mesh.

Weights: the policy family's training layout (FSDP + tensor parallel) for the update, its sampling layout (no
FSDP, so decode never all-gathers a layer per token) for rollouts: one reshard per RL step instead of one
all-gather per decoded token. Batches: rows split over the batch axes ("data", "fsdp"); the flat per-batch vision
inputs (one patch sequence for all images) are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from balcap_jax.parallel.mesh import BATCH_AXES

# Batch keys whose batch axis is not the leading one.
_BATCH_AXIS = {"positions": 1}


def _batch_axis(key: str, value: Any) -> int:
    return _BATCH_AXIS.get(key, 0) if np.ndim(value) == 3 or key != "positions" else 0


def place_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Host batch -> device arrays: rows over the batch axes, "vision" replicated. Batch sizes are validated up
    front (config rules), so every row count here divides the batch shards."""
    replicated = NamedSharding(mesh, PartitionSpec())
    out = {}
    for key, value in batch.items():
        if key == "vision":
            out[key] = jax.tree.map(lambda x: jax.device_put(np.asarray(x), replicated), value)
            continue
        value = np.asarray(value)
        spec = [None] * value.ndim
        spec[_batch_axis(key, value)] = BATCH_AXES
        out[key] = jax.device_put(value, NamedSharding(mesh, PartitionSpec(*spec)))
    return out


def param_shardings(family: Any, params: Any, mesh: Mesh, layout: str) -> Any:
    """NamedShardings of `params` in the family's `layout` ("training" | "sampling")."""
    abstract = family.sharding(layout).abstract_params(params, mesh)
    return jax.tree.map(lambda leaf: leaf.sharding, abstract)
