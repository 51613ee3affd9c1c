"""Device meshes with the three axes every model and step in balcap_jax shards over.

Axes (outermost first, so the fastest interconnect serves the most communication-hungry axis):
  data:   pure data parallelism (whole model replicated per slice, gradients all-reduced).
  fsdp:   data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3 style).
  tensor: tensor (model) parallelism inside a layer; innermost, so it lands on devices that share a fast link.

The batch is sharded over ("data", "fsdp") together (`BATCH_AXES`); weights over "fsdp" and "tensor".
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES: tuple[str, str, str] = (DATA, FSDP, TENSOR)
BATCH_AXES: tuple[str, str] = (DATA, FSDP)

FILL = -1  # an axis size of -1 takes whatever the other axes leave of the device count
# config.mesh fields that say how arrays use the axes, not how large they are (trainer/rollout_weights.py).
LAYOUT_FIELDS: tuple[str, ...] = ("sampling_tensor_axes",)
DEFAULT_SAMPLING_TENSOR_AXES: tuple[str, ...] = (FSDP, TENSOR)  # config.mesh.sampling_tensor_axes when unset


def tensor_axes_from(raw: Any) -> tuple[str, ...]:
    """`config.mesh.sampling_tensor_axes` as written (None: the default; one name: that axis) -> a tuple."""
    if raw is None:
        return DEFAULT_SAMPLING_TENSOR_AXES
    return (raw,) if isinstance(raw, str) else tuple(raw)

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the (data, fsdp, tensor) axes. At most one may be -1 ("all remaining devices")."""

    data: int = 1
    fsdp: int = FILL
    tensor: int = 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "MeshShape":
        """Reads `data`, `fsdp`, `tensor` from a mapping or attribute container (e.g. `config.mesh`)."""
        get = config.get if isinstance(config, Mapping) else lambda k, d: getattr(config, k, d)
        unknown = set(config.keys() if hasattr(config, "keys") else ()) - set(MESH_AXES) - set(LAYOUT_FIELDS)
        if unknown:
            raise ValueError(
                f"mesh config has unknown field(s) {sorted(unknown)}; allowed fields are "
                f"{list(MESH_AXES) + list(LAYOUT_FIELDS)}"
            )
        return cls(**{axis: int(get(axis, getattr(cls, axis))) for axis in MESH_AXES})

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, device_count: int) -> tuple[int, int, int]:
        """Concrete axis sizes for `device_count` devices; raises ValueError naming the axis and the fix."""
        sizes = self.as_tuple()
        for axis, size in zip(MESH_AXES, sizes):
            if size == 0 or size < FILL:
                raise ValueError(f"mesh.{axis}={size} is invalid: use a positive size, or -1 to fill the rest")
        fill_axes = [axis for axis, size in zip(MESH_AXES, sizes) if size == FILL]
        if len(fill_axes) > 1:
            raise ValueError(
                f"mesh axes {fill_axes} are all -1; at most one axis may be -1 (it takes the remaining devices)"
            )
        fixed = math.prod(size for size in sizes if size != FILL)
        if fill_axes:
            if device_count % fixed:
                raise ValueError(
                    f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {fixed}, which does not "
                    f"divide the {device_count} available devices, so mesh.{fill_axes[0]}=-1 cannot be filled; "
                    f"choose fixed sizes whose product divides {device_count}"
                )
            return tuple(device_count // fixed if size == FILL else size for size in sizes)  # type: ignore[return-value]
        if fixed != device_count:
            raise ValueError(
                f"mesh data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {fixed}, but {device_count} devices "
                f"are available; the sizes must multiply to the device count (set one axis to -1 to fill the rest)"
            )
        return sizes


def make_mesh(
    shape: MeshShape | Sequence[int] = MeshShape(),
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_type: AxisType = AxisType.Auto,
) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    Axis types default to `Auto` (shardings propagate through jit from in/out shardings and constraints);
    pass `AxisType.Explicit` for sharding-in-types.
    """
    mesh_shape = shape if isinstance(shape, MeshShape) else MeshShape(*shape)
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape.resolve(len(devices))
    axis_types = (axis_type,) * len(MESH_AXES)
    if len(devices) == jax.device_count() and devices == list(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink islands on GPU).
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES, axis_types=axis_types)


def batch_size_divisor(mesh: Mesh) -> int:
    """The number of batch shards: every global batch dimension must be a multiple of this."""
    return mesh.shape[DATA] * mesh.shape[FSDP]


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process (multi-host) settings. `num_processes` <= 1 means single process: nothing to initialise.

    coordinator_address: "host:port" of process 0; None lets JAX auto-detect it on TPU pods, SLURM and other
    clusters it knows (then `num_processes`/`process_id` may also be None).
    """

    num_processes: int | None = None
    process_id: int | None = None
    coordinator_address: str | None = None
    local_device_ids: tuple[int, ...] | None = None
    auto_detect: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "DistributedConfig":
        get = config.get if isinstance(config, Mapping) else lambda k, d: getattr(config, k, d)
        local = get("local_device_ids", None)
        return cls(
            num_processes=get("num_processes", None),
            process_id=get("process_id", None),
            coordinator_address=get("coordinator_address", None) or None,
            local_device_ids=tuple(local) if local else None,
            auto_detect=bool(get("auto_detect", False)),
        )

    @property
    def wanted(self) -> bool:
        return self.auto_detect or (self.num_processes is not None and self.num_processes > 1)


def initialize_distributed(config: DistributedConfig) -> bool:
    """Calls `jax.distributed.initialize` when several processes are configured; returns whether it did.

    Must run before anything touches a JAX device (e.g. `jax.devices()`), once per process. Validates the
    explicit settings first so a typo fails with a message rather than a hang waiting for the coordinator.
    """
    if not config.wanted:
        return False
    if not config.auto_detect:
        n, pid = config.num_processes, config.process_id
        if pid is None or not 0 <= pid < n:
            raise ValueError(
                f"distributed.process_id={pid} is invalid for distributed.num_processes={n}: "
                f"set it to this process's rank in [0, {n})"
            )
        if not config.coordinator_address or ":" not in config.coordinator_address:
            raise ValueError(
                f"distributed.coordinator_address={config.coordinator_address!r}: set it to 'host:port' of "
                "process 0 (or set distributed.auto_detect=True on a cluster JAX can detect)"
            )
    if jax.distributed.is_initialized():
        _log.info("jax.distributed already initialised; leaving it as it is")
        return True
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
        local_device_ids=list(config.local_device_ids) if config.local_device_ids else None,
    )
    _log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def tp_axis(axis: str) -> str:
    """The sampling mesh's name for training axis `axis` when the rollout copy is tensor-parallel over it."""
    return f"{axis}_tp"


def sampling_mesh(mesh: Mesh, tensor_axes: Sequence[str]) -> Mesh:
    """The same devices with each axis of `tensor_axes` moved behind the (data, fsdp, tensor) axes under its
    `tp_axis` name, those three keeping size 1 where they moved.

    The models pin activations' rows to ("data", "fsdp") under a mesh context (`layers.constrain_batch`); on this
    mesh those axes hold only what is not tensor-parallel, so rollout activations are replicated over the
    tensor-parallel devices (Megatron style: one reduction per block) and XLA never gathers a weight per token.
    E.g. (data=1, fsdp=8, tensor=2) with ("fsdp", "tensor") -> (1, 1, 1, fsdp_tp=8, tensor_tp=2), same device
    order, so every device keeps its place on the interconnect.
    """
    unknown = [a for a in tensor_axes if a not in MESH_AXES]
    if unknown or len(set(tensor_axes)) != len(tensor_axes):
        raise ValueError(f"sampling tensor axes {tuple(tensor_axes)!r}: give distinct axes from {list(MESH_AXES)}")
    moved = [MESH_AXES.index(a) for a in tensor_axes]
    devices = np.moveaxis(mesh.devices, moved, list(range(len(MESH_AXES) - len(moved), len(MESH_AXES))))
    kept_shape = [1 if axis in tensor_axes else mesh.shape[axis] for axis in MESH_AXES]
    devices = devices.reshape(*kept_shape, *(mesh.shape[a] for a in tensor_axes))
    names = (*MESH_AXES, *(tp_axis(a) for a in tensor_axes))
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))
