"""Meshes, multi-host initialisation and sharding helpers (see mesh.py and sharding.py)."""

from balcap_jax.parallel.mesh import (
    BATCH_AXES,
    DATA,
    FSDP,
    MESH_AXES,
    TENSOR,
    DistributedConfig,
    MeshShape,
    batch_size_divisor,
    initialize_distributed,
    make_mesh,
)
from balcap_jax.parallel.sharding import (
    SAMPLING_RULES,
    TRAINING_RULES,
    abstract_with_shardings,
    batch_sharding,
    fit_spec,
    logical_to_spec,
    path_to_str,
    specs_from_logical,
    specs_from_rules,
)

__all__ = [
    "BATCH_AXES",
    "DATA",
    "FSDP",
    "MESH_AXES",
    "SAMPLING_RULES",
    "TENSOR",
    "TRAINING_RULES",
    "DistributedConfig",
    "MeshShape",
    "abstract_with_shardings",
    "batch_sharding",
    "batch_size_divisor",
    "fit_spec",
    "initialize_distributed",
    "logical_to_spec",
    "make_mesh",
    "path_to_str",
    "specs_from_logical",
    "specs_from_rules",
]
