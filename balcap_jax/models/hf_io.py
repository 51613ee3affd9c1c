"""Hugging Face checkpoints in and out: local safetensors directories <-> sharded JAX states.

Loading streams tensor by tensor straight into the target shardings: every safetensors file is memory-mapped,
and `jax.make_array_from_callback` asks each addressable device only for its own slice, so a host reads (and a
device holds) only its shards; no device ever sees the whole model. Exporting gathers one tensor at a time to
the host and writes `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` + `config.json`, a
directory that `transformers.AutoModel*.from_pretrained` (and vLLM) loads.

A model's `params.py` supplies only a `ParamMapping`: our NNX attribute names mirror HF module names, so the
default rules do the rest —
  `<module>.kernel`    <-> `<module>.weight`, HF `[out, in, *window]` <-> ours `[*window, in, out]`
  `<module>.scale`     <-> `<module>.weight` (norms)
  `<module>.embedding` <-> `<module>.weight` (embeddings)
  anything else (bias, ...) keeps its name and layout —
plus prefix renames, per-key special-case transforms, alternative checkpoint layouts and ignorable keys.

Layer stacks (`layer_stack.py`): a leaf under one of `ParamMapping.stacked` (e.g. `model.language_model.layers.`)
holds [L, ...], layer i being what HF stores under the per-layer name `...layers.{i}.<rest>`; every rule above
applies to those per-layer names. Loading reads each device's slice of every layer and stacks them on the host
(never the whole model, nor a whole stacked tensor unless the device holds all of it); exporting writes one
tensor per layer, sliced on device.

Safetensors is parsed here (header JSON + little-endian raw data) rather than through `safetensors.numpy`,
which cannot represent bfloat16; `ml_dtypes` (a JAX dependency) provides the numpy bfloat16/float8 types.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, Sharding, SingleDeviceSharding

from balcap_jax.parallel.sharding import named_leaves, path_to_str

_log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_DTYPE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}


class HFWeightsError(ValueError):
    """A checkpoint does not fit the model: the message lists every offending key."""


# --------------------------------------------------------------------------------------------------------------
# Reading safetensors
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and the absolute byte offset of its data."""

    key: str
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses one .safetensors file's header: ({key: TensorInfo}, __metadata__)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", {}) or {}
    infos = {}
    for key, entry in header.items():
        if entry["dtype"] not in _DTYPES:
            raise HFWeightsError(
                f"{path.name}: tensor {key!r} has dtype {entry['dtype']}, which this loader does not read "
                f"(supported: {sorted(_DTYPES)})"
            )
        begin, end = entry["data_offsets"]
        info = TensorInfo(key, path, _DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin)
        if info.nbytes != end - begin:
            raise HFWeightsError(f"{path.name}: tensor {key!r} header is inconsistent (shape vs byte range)")
        infos[key] = info
    return infos, metadata


class SafetensorsDirectory:
    """All tensors of a local HF checkpoint directory (single file or sharded with an index), memory-mapped.

    `read(key, index)` returns only the requested slice; untouched bytes are never read from disk.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"HF weights directory {str(self.directory)!r} does not exist")
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(
                    f"{str(self.directory)!r} holds no {SINGLE_FILE}, no {INDEX_FILE} and no *.safetensors files; "
                    "point it at a Hugging Face model directory saved with safe_serialization"
                )
            files = found
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise FileNotFoundError(f"{INDEX_FILE} in {str(self.directory)!r} names {name}, which is missing")
            infos, _ = read_safetensors_header(path)
            self.tensors.update(infos)
        self._maps: dict[Path, np.memmap] = {}

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def view(self, key: str) -> np.ndarray:
        """A zero-copy read-only view of the whole tensor (memory-mapped; reading it pages data in)."""
        info = self.tensors[key]
        if info.path not in self._maps:
            self._maps[info.path] = np.memmap(info.path, dtype=np.uint8, mode="r")
        return np.ndarray(info.shape, dtype=info.dtype, buffer=self._maps[info.path], offset=info.offset)

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """A copy of tensor `key`, or of its slice `index`."""
        view = self.view(key)
        return np.array(view if index is None else view[index])


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: the HF weights directory must hold the model's {CONFIG_FILE}"
        )
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------------------
# Name and layout mapping
# --------------------------------------------------------------------------------------------------------------

NumpyFn = Callable[[np.ndarray], np.ndarray]


class Transform:
    """How one tensor's HF layout becomes ours (`to_ours`) and back (`to_hf`).

    Transforms that only permute axes (`axes_for` returns a tuple) let the loader read just each device's slice;
    any other transform reads the whole tensor into host memory once and slices it there.
    """

    def axes_for(self, ndim: int) -> tuple[int, ...] | None:
        return None

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        return hf.transpose(self.axes_for(hf.ndim))

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return ours.transpose(np.argsort(self.axes_for(ours.ndim)))

    def ours_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        axes = self.axes_for(len(hf_shape))
        return None if axes is None else tuple(hf_shape[a] for a in axes)


class Identity(Transform):
    def axes_for(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim))

    def __repr__(self) -> str:
        return "Identity()"


class HFKernel(Transform):
    """torch Linear/Conv `weight[out, in, *window]` <-> flax `kernel[*window, in, out]`."""

    def axes_for(self, ndim: int) -> tuple[int, ...]:
        if ndim < 2:
            raise HFWeightsError(f"a kernel needs at least 2 dimensions, got {ndim}")
        return (*range(2, ndim), 1, 0)

    def __repr__(self) -> str:
        return "HFKernel()"


@dataclasses.dataclass(frozen=True)
class Permute(Transform):
    """ours = hf.transpose(axes)."""

    axes: tuple[int, ...]

    def axes_for(self, ndim: int) -> tuple[int, ...]:
        if ndim != len(self.axes):
            raise HFWeightsError(f"Permute{self.axes} applied to a tensor with {ndim} dimensions")
        return self.axes


@dataclasses.dataclass(frozen=True)
class Custom(Transform):
    """Any pair of numpy functions (reshapes, splits of fused weights, ...); must be exact inverses."""

    to_ours_fn: NumpyFn
    to_hf_fn: NumpyFn

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        return self.to_ours_fn(hf)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return self.to_hf_fn(ours)


def as_transform(spec: Transform | tuple[NumpyFn, NumpyFn]) -> Transform:
    """Accepts a Transform or the `(to_ours, to_hf)` pair models return from `hf_special_cases()`."""
    if isinstance(spec, Transform):
        return spec
    to_ours, to_hf = spec
    return Custom(to_ours, to_hf)


# Leaf names of flax modules and the HF name/transform they correspond to.
DEFAULT_LEAF_RULES: Mapping[str, tuple[str, Transform]] = {
    "kernel": ("weight", HFKernel()),
    "scale": ("weight", Identity()),
    "embedding": ("weight", Identity()),
}


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """Our dotted parameter names <-> HF checkpoint keys, and the tensor transform for each.

    prefix_renames: (our prefix, HF prefix) pairs applied to our name after the leaf rename; first match wins.
    special_cases: HF key suffix -> Transform or (to_ours, to_hf); the longest matching suffix wins and
      overrides the default leaf transform (e.g. a Conv3d patch embedding stored as a flattened Linear).
    checkpoint_aliases: (alternative HF prefix, canonical HF prefix) pairs: checkpoint keys are rewritten with
      them when loading, so older/newer layouts of the same model load through one mapping.
    ignore_unexpected: regexes (full match) for checkpoint keys to skip without error (buffers, unused heads).
    leaf_rules: our leaf name -> (HF leaf name, Transform); defaults to DEFAULT_LEAF_RULES.
    stacked: our name prefixes of layer stacks (ending in "."): a leaf `<prefix><rest>` of shape [L, ...] is the
      L per-layer tensors named `<prefix><i>.<rest>` (models list theirs with `layer_stack.layer_stack_prefixes`).
    """

    prefix_renames: Sequence[tuple[str, str]] = ()
    special_cases: Mapping[str, Transform | tuple[NumpyFn, NumpyFn]] = dataclasses.field(default_factory=dict)
    checkpoint_aliases: Sequence[tuple[str, str]] = ()
    ignore_unexpected: Sequence[str] = ()
    leaf_rules: Mapping[str, tuple[str, Transform]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_LEAF_RULES)
    )
    stacked: Sequence[str] = ()

    def with_stacked(self, prefixes: Sequence[str]) -> "ParamMapping":
        """This mapping with `prefixes` added to `stacked`."""
        return dataclasses.replace(self, stacked=tuple(dict.fromkeys((*self.stacked, *prefixes))))

    def stack_prefix(self, our_name: str) -> str | None:
        """The `stacked` prefix `our_name` lies under (None: not in a layer stack)."""
        return next((p for p in self.stacked if our_name.startswith(p)), None)

    def layer_names(self, our_name: str, shape: Sequence[int]) -> list[str] | None:
        """The per-layer names `<prefix><i>.<rest>` (i < shape[0]) of a leaf of a layer stack; None otherwise."""
        prefix = self.stack_prefix(our_name)
        if prefix is None:
            return None
        if len(shape) == 0:
            raise HFWeightsError(f"{our_name!r} is under the layer stack {prefix!r} but is a scalar (no layer axis)")
        rest = our_name[len(prefix) :]
        return [f"{prefix}{i}.{rest}" for i in range(shape[0])]

    def hf_keys(self, our_name: str, shape: Sequence[int]) -> list[str]:
        """The checkpoint keys of one of our leaves: one per layer for a stacked leaf, else `[hf_key(name)]`."""
        return [self.hf_key(name) for name in self.layer_names(our_name, shape) or [our_name]]

    def hf_key(self, our_name: str) -> str:
        head, _, leaf = our_name.rpartition(".")
        hf_leaf = self.leaf_rules[leaf][0] if leaf in self.leaf_rules else leaf
        name = f"{head}.{hf_leaf}" if head else hf_leaf
        for ours, hf in self.prefix_renames:
            if name.startswith(ours):
                return hf + name[len(ours) :]
        return name

    def transform(self, our_name: str, hf_key: str) -> Transform:
        matches = [suffix for suffix in self.special_cases if hf_key.endswith(suffix)]
        if matches:
            return as_transform(self.special_cases[max(matches, key=len)])
        leaf = our_name.rpartition(".")[2]
        return self.leaf_rules[leaf][1] if leaf in self.leaf_rules else Identity()

    def canonical_checkpoint_key(self, key: str) -> str:
        for alias, canonical in self.checkpoint_aliases:
            if key.startswith(alias):
                return canonical + key[len(alias) :]
        return key

    def is_ignored(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.ignore_unexpected)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One of our leaves and the checkpoint tensor(s) it is read from: one key, or one per layer (`stacked`)."""

    name: str
    checkpoint_keys: tuple[str, ...]
    transform: Transform
    target: Any
    stacked: bool

    @property
    def checkpoint_key(self) -> str:
        return self.checkpoint_keys[0]


def _float_kind(dtype: np.dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, np.floating)


def _plan(reader: SafetensorsDirectory, abstract: Any, mapping: ParamMapping) -> list[_Planned]:
    """Matches every leaf of `abstract` to a checkpoint key; raises one HFWeightsError listing every problem."""
    by_canonical: dict[str, str] = {}
    for key in reader.keys():
        canonical = mapping.canonical_checkpoint_key(key)
        if canonical in by_canonical:
            raise HFWeightsError(
                f"checkpoint keys {by_canonical[canonical]!r} and {key!r} both map to {canonical!r} "
                "(check ParamMapping.checkpoint_aliases)"
            )
        by_canonical[canonical] = key
    planned, missing, problems = [], [], []
    used: set[str] = set()
    for name, target in named_leaves(abstract):
        layer_names = mapping.layer_names(name, target.shape)
        # A stacked leaf [L, ...] is checked layer by layer against its per-layer tensors.
        parts = [(name, tuple(target.shape))] if layer_names is None else [
            (layer_name, tuple(target.shape[1:])) for layer_name in layer_names
        ]
        keys: list[str] = []
        transform = None
        for part_name, part_shape in parts:
            hf_key = mapping.hf_key(part_name)
            if hf_key not in by_canonical:
                missing.append(f"{hf_key!r} (for our parameter {part_name!r}, shape {part_shape})")
                continue
            key = by_canonical[hf_key]
            used.add(key)
            keys.append(key)
            info = reader.tensors[key]
            transform = mapping.transform(part_name, hf_key)
            if _float_kind(info.dtype) != _float_kind(np.dtype(target.dtype)):
                problems.append(
                    f"{key!r}: checkpoint dtype {info.dtype} cannot load into {part_name!r} of dtype "
                    f"{np.dtype(target.dtype)} (only floating <-> floating casts are done)"
                )
            expected = transform.ours_shape(info.shape)
            if expected is not None and expected != part_shape:
                problems.append(
                    f"{key!r}: checkpoint shape {info.shape} becomes {expected} under {transform!r}, but our "
                    f"parameter {part_name!r} has shape {part_shape}; the config does not match the checkpoint"
                )
        if len(keys) == len(parts):
            planned.append(_Planned(name, tuple(keys), transform, target, stacked=layer_names is not None))
    unexpected = [k for k in reader.keys() if k not in used and not mapping.is_ignored(k)]
    if missing or unexpected or problems:
        lines = [f"HF checkpoint {str(reader.directory)!r} does not match the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s): " + "; ".join(missing[:20]))
        if unexpected:
            lines.append(
                f"  {len(unexpected)} unexpected key(s): {unexpected[:20]} "
                "(add to ParamMapping.ignore_unexpected if the model should not use them)"
            )
        lines.extend(f"  {p}" for p in problems[:20])
        raise HFWeightsError("\n".join(lines))
    return planned


def _target_sharding(target: Any, default: Sharding) -> Sharding:
    sharding = getattr(target, "sharding", None)
    return sharding if isinstance(sharding, Sharding) else default


def _hf_layout_sharding(sharding: Sharding, axes: tuple[int, ...]) -> Sharding | None:
    """The sharding of the HF-layout tensor whose `transpose(axes)` has `sharding`; None if not expressible.

    ours dim i is HF dim axes[i], so HF dim axes[i] takes our dim i's mesh axes: the transpose is then local
    to every device (no communication).
    """
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    if not isinstance(sharding, NamedSharding):
        return None
    ours = tuple(sharding.spec) + (None,) * (len(axes) - len(sharding.spec))
    hf: list[Any] = [None] * len(axes)
    for our_dim, hf_dim in enumerate(axes):
        hf[hf_dim] = ours[our_dim]
    return NamedSharding(sharding.mesh, P(*hf))


@functools.lru_cache(maxsize=None)
def _device_transpose(axes: tuple[int, ...], dtype: np.dtype, out_sharding: Sharding) -> Callable[[jax.Array], jax.Array]:
    # XLA transposes (and casts) an order of magnitude faster than numpy's strided copies, on CPU too.
    return jax.jit(lambda x: x.transpose(axes).astype(dtype), out_shardings=out_sharding)


def _hf_reader(reader: SafetensorsDirectory, plan: _Planned) -> tuple[tuple[int, ...], Callable[[tuple], np.ndarray]]:
    """(shape, read(index)) of the planned tensor in HF layout; a stacked leaf reads as [L, *per-layer shape],
    each call stacking only the requested slice of the requested layers (one tensor: a memory-mapped view)."""
    views = [reader.view(key) for key in plan.checkpoint_keys]
    if not plan.stacked:
        return views[0].shape, lambda index: views[0][index]

    def read(index: tuple) -> np.ndarray:
        layers, rest = index[0], tuple(index[1:])
        return np.stack([views[i][rest] for i in range(len(views))[layers]])

    return (len(views), *views[0].shape), read


def _load_one(reader: SafetensorsDirectory, plan: _Planned, default_sharding: Sharding) -> jax.Array:
    shape, dtype = tuple(plan.target.shape), np.dtype(plan.target.dtype)
    sharding = _target_sharding(plan.target, default_sharding)
    layer_hf_shape = reader.tensors[plan.checkpoint_key].shape
    axes = plan.transform.axes_for(len(layer_hf_shape))
    if axes is not None:
        hf_shape, read = _hf_reader(reader, plan)
        if plan.stacked:  # the layer axis leads on both sides and is never permuted
            axes = (0, *(a + 1 for a in axes))
        hf_sharding = _hf_layout_sharding(sharding, axes) if axes != tuple(range(len(axes))) else None
        if hf_sharding is not None:
            # each device reads its HF-layout slice (no host transpose), then transposes on device
            raw = jax.make_array_from_callback(hf_shape, hf_sharding, lambda index: np.array(read(tuple(index))))
            return _device_transpose(axes, dtype, sharding)(raw)

        def read_shard(index: tuple[slice, ...]) -> np.ndarray:
            hf_index: list[slice] = [slice(None)] * len(axes)
            for our_dim, hf_dim in enumerate(axes):
                hf_index[hf_dim] = index[our_dim]
            return np.ascontiguousarray(read(tuple(hf_index)).transpose(axes), dtype=dtype)

        return jax.make_array_from_callback(shape, sharding, read_shard)

    layers = [np.asarray(plan.transform.to_ours(reader.read(key))) for key in plan.checkpoint_keys]
    whole = np.stack(layers) if plan.stacked else layers[0]
    if whole.shape != shape:
        raise HFWeightsError(
            f"{plan.checkpoint_key!r}: checkpoint shape {layer_hf_shape} becomes "
            f"{whole.shape} under its special-case transform, but our parameter {plan.name!r} has shape {shape}"
        )
    return jax.make_array_from_callback(
        shape, sharding, lambda index: np.ascontiguousarray(whole[index], dtype=dtype)
    )


def load_hf_state(
    directory: str | os.PathLike,
    abstract_state: Any,
    mapping: ParamMapping = ParamMapping(),
    *,
    default_sharding: Sharding | None = None,
    max_workers: int = 1,
) -> Any:
    """Loads a local HF checkpoint into a pytree shaped like `abstract_state`.

    abstract_state: pytree (e.g. `nnx.state(nnx.eval_shape(...))`) of leaves with `.shape` and `.dtype`; a
      leaf's `.sharding` (see `parallel.abstract_with_shardings`) is where its array is created. Leaves
      without one go to `default_sharding` (default: the first device).
    Checkpoint floats are cast to each leaf's dtype (bf16 checkpoints into fp32 models and back).
    Raises HFWeightsError listing missing/unexpected keys, shape and dtype mismatches before reading any data.
    max_workers > 1 reads that many tensors concurrently (may help cold reads from network filesystems; on a
    busy 2-core machine it was slower than 1, hence the default).
    """
    reader = SafetensorsDirectory(directory)
    plans = {plan.name: plan for plan in _plan(reader, abstract_state, mapping)}
    default = default_sharding or SingleDeviceSharding(jax.devices()[0])
    loaded_bytes = sum(reader.tensors[key].nbytes for p in plans.values() for key in p.checkpoint_keys)
    _log.info("loading %d tensors (%.1f MB) from %s", len(plans), loaded_bytes / 2**20, reader.directory)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        futures = {name: pool.submit(_load_one, reader, plan, default) for name, plan in plans.items()}
        return jax.tree_util.tree_map_with_path(lambda path, _: futures[path_to_str(path)].result(), abstract_state)


# --------------------------------------------------------------------------------------------------------------
# Exporting
# --------------------------------------------------------------------------------------------------------------


def _to_host(x: Any) -> np.ndarray:
    """One whole tensor on the host; in multi-process runs every process must call this (it is collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _export_one(array: Any, transform: Transform, out_dtype: np.dtype | None) -> np.ndarray:
    """One of our parameters in HF layout and `out_dtype`, on the host (collective in multi-process runs)."""
    axes = transform.axes_for(len(array.shape))
    if isinstance(array, jax.Array) and axes is not None:
        hf_sharding = _hf_layout_sharding(array.sharding, axes)
        if hf_sharding is not None:  # permute (and cast) on device: local to each shard, fast
            inverse = tuple(int(a) for a in np.argsort(axes))
            return _to_host(_device_transpose(inverse, out_dtype or np.dtype(array.dtype), hf_sharding)(array))
    hf = np.asarray(transform.to_hf(_to_host(array)))
    return hf.astype(out_dtype) if out_dtype is not None else hf


@functools.lru_cache(maxsize=None)
def _layer_slicer(out_sharding: Sharding | None) -> Callable[[jax.Array, Any], jax.Array]:
    take = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)  # noqa: E731
    # One traced index: a single compiled slicer per sharding serves every layer.
    return jax.jit(take) if out_sharding is None else jax.jit(take, out_shardings=out_sharding)


def _layer_of(stack: Any, index: int) -> Any:
    """Layer `index` of a stacked leaf [L, ...], sliced where it lies (the layer axis is never sharded, so the
    slice is local to every device and keeps the other dimensions' sharding)."""
    if not isinstance(stack, jax.Array):
        return np.asarray(stack)[index]
    sharding = stack.sharding
    if isinstance(sharding, NamedSharding):
        out: Sharding | None = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    else:
        out = sharding if isinstance(sharding, SingleDeviceSharding) else None
    return _layer_slicer(out)(stack, np.int32(index))


@dataclasses.dataclass(frozen=True)
class _Export:
    """One HF tensor to write: `name` is our (per-layer) name, `leaf` our array (the whole stack when `layer`
    is set)."""

    name: str
    key: str
    leaf: Any
    layer: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.leaf.shape[1:] if self.layer is not None else self.leaf.shape)

    def array(self) -> Any:
        return self.leaf if self.layer is None else _layer_of(self.leaf, self.layer)


def _export_items(state: Any, mapping: ParamMapping) -> list[_Export]:
    """Every HF tensor of `state`, a stacked leaf giving one per layer, in HF's order: a stack's tensors layer by
    layer (all of layer 0, then layer 1, ...) where its first leaf stands, other tensors in pytree order."""
    ranked: list[tuple[tuple[int, int, int], _Export]] = []
    stack_rank: dict[str, int] = {}
    for position, (name, leaf) in enumerate(named_leaves(state)):
        layer_names = mapping.layer_names(name, leaf.shape)
        if layer_names is None:
            ranked.append(((position, 0, 0), _Export(name, mapping.hf_key(name), leaf)))
            continue
        rank = stack_rank.setdefault(mapping.stack_prefix(name), position)
        for layer, layer_name in enumerate(layer_names):
            ranked.append(((rank, layer, position), _Export(layer_name, mapping.hf_key(layer_name), leaf, layer)))
    return [item for _, item in sorted(ranked, key=lambda entry: entry[0])]


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: use bytes (int) or a string like '500MB' or '5GB'")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Writes one .safetensors file atomically (temp file + rename), in key order, 8-byte aligned header."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, array in tensors.items():
        if np.dtype(array.dtype) not in _DTYPE_NAMES:
            raise HFWeightsError(f"tensor {key!r} has dtype {array.dtype}, which safetensors cannot store")
        header[key] = {
            "dtype": _DTYPE_NAMES[np.dtype(array.dtype)],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for array in tensors.values():
            # safetensors is little-endian; "<" is a no-op on every host JAX supports.
            f.write(np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<")).tobytes())
    os.replace(tmp, path)


def _shard_groups(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy contiguous packing of tensors into files of at most `max_bytes` (a bigger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    current = 0
    for name, nbytes in sizes:
        if groups[-1] and current + nbytes > max_bytes:
            groups.append([])
            current = 0
        groups[-1].append(name)
        current += nbytes
    return groups


def save_hf_state(
    state: Any,
    directory: str | os.PathLike,
    mapping: ParamMapping = ParamMapping(),
    *,
    config: Mapping[str, Any] | None = None,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    extra_files: Mapping[str, str] | None = None,
) -> list[Path]:
    """Exports `state` (pytree of arrays, sharded or not) as a HF safetensors directory.

    Each tensor is gathered to the host on its own, transformed to the HF layout and cast to `dtype` (default:
    keep each array's dtype). Files are `model.safetensors` or `model-0000i-of-0000N.safetensors` +
    `model.safetensors.index.json`, with `config` written as config.json and `extra_files` (name -> text,
    e.g. generation_config.json) beside them. In multi-process runs every process must call this (tensors are
    gathered collectively); only process 0 writes. Returns the weight files written.
    """
    directory = Path(directory)
    items = _export_items(state, mapping)
    out_dtype = None if dtype is None else np.dtype(dtype)
    by_key: dict[str, _Export] = {}
    for item in items:
        if item.key in by_key:
            raise HFWeightsError(
                f"two parameters map to the HF key {item.key!r} ({by_key[item.key].name!r} and {item.name!r}); "
                "fix the ParamMapping"
            )
        by_key[item.key] = item
    sizes = [(item.key, math.prod(item.shape) * (out_dtype or np.dtype(item.leaf.dtype)).itemsize) for item in items]
    groups = _shard_groups(sizes, _parse_size(max_shard_size))
    writer = jax.process_index() == 0
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(groups):
        filename = SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key in group:
            item = by_key[key]
            hf = _export_one(item.array(), mapping.transform(item.name, key), out_dtype)
            if hf.size != math.prod(item.shape):
                raise HFWeightsError(
                    f"{key!r}: the to_hf transform changed the element count ({item.shape} -> {hf.shape})"
                )
            tensors[key] = hf
            weight_map[key] = filename
            total += tensors[key].nbytes
        if writer:
            write_safetensors(directory / filename, tensors, {"format": "pt"})
        files.append(directory / filename)
    if writer:
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if config is not None:
            (directory / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (directory / name).write_text(text)
    if jax.process_count() > 1:  # nobody reads the directory before process 0 has finished writing it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"balcap_jax.hf_io.save_hf_state:{directory}")
    _log.info("exported %d tensors (%.1f MB) in %d file(s) to %s", len(items), total / 2**20, len(files), directory)
    return files


def expected_hf_keys(abstract_state: Any, mapping: ParamMapping = ParamMapping()) -> list[str]:
    """The HF keys a state maps to, in export order (for a model's own mapping tests)."""
    return [item.key for item in _export_items(abstract_state, mapping)]


def iter_hf_tensors(directory: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(key, numpy array) for every tensor of a checkpoint, one at a time (for inspection and tests)."""
    reader = SafetensorsDirectory(directory)
    for key in reader.keys():
        yield key, reader.read(key)
