"""Where the run's arrays live on the (data, fsdp, tensor) mesh.

Weights: the policy family's training layout (FSDP + tensor parallel) for the update, its sampling layout (no
FSDP, so decode never all-gathers a layer per token; tensor parallel over `mesh.sampling_tensor_axes`, bf16 in
bf16 recipes: `rollout_copy`) for rollouts: one reshard per RL step instead of one all-gather per decoded token.
Batches: rows split over the batch axes ("data", "fsdp"), and images laid out by block of rows
(`models/image_shards.py`) split the same way, so each device holds and encodes its own rows' images; flat
vision inputs (one sequence for the whole batch, as tools and tests build them) are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from balcap_jax.parallel import hosts
from balcap_jax.sampling.sampler import place_vision
from balcap_jax.trainer import rollout_weights

# Batch keys whose batch axis is not the leading one.
_BATCH_AXIS = {"positions": 1}


def _batch_axis(key: str, value: Any) -> int:
    return _BATCH_AXIS.get(key, 0) if np.ndim(value) == 3 or key != "positions" else 0


def place_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Host batch -> global device arrays: the row-aligned fields hold this process's rows (all rows with one
    process) and are sharded over the batch axes; so is "vision" laid out by block of rows (flat vision is
    replicated). Batch sizes are validated up front (config rules), so every row count divides the batch shards."""
    out = {}
    for key, value in batch.items():
        if key == "vision":
            out[key] = place_vision(value, mesh)
            continue
        value = np.asarray(value)
        out[key] = hosts.global_rows(value, mesh, batch_axis=_batch_axis(key, value))
    return out


def param_shardings(family: Any, params: Any, mesh: Mesh, layout: str) -> Any:
    """NamedShardings of `params` in the family's `layout` ("training" | "sampling")."""
    abstract = family.sharding(layout).abstract_params(params, mesh)
    return jax.tree.map(lambda leaf: leaf.sharding, abstract)


def rollout_copy(config: Any, policy: Any, params: Any, mesh: Mesh) -> "rollout_weights.RolloutWeights":
    """The loop's `for_sampling`: training params -> the rollout copy (bf16 in bf16 recipes, tensor-parallel over
    `mesh.sampling_tensor_axes`), one jitted program; `trainer/rollout_weights.py`."""
    return rollout_weights.for_config(config, policy.family, policy.model_config, params, mesh)
