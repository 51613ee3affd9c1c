"""Host <-> global-array plumbing for one or many JAX processes (multi-controller SPMD).

Every process runs the same program on its own share of the data. A *global* array spans the whole mesh; each
process can only read the shards on its own devices. The helpers here are the only places the loop crosses that
line, and each is a plain identity with one process, so single-host runs pay nothing:

  rows_of_process(mesh)       which rows of a batch-sharded global array this process holds (a contiguous block)
  global_rows(x, mesh, ...)   this process's rows (numpy) -> one global array sharded over the batch axes
  replicated(x, mesh)         the same host value on every process -> a replicated global array
  local_rows(x)               a batch-sharded global array -> this process's rows (numpy)
  row_blocks(mesh, rows)      into how many blocks, one per batch shard, this process cuts its rows
  global_blocks(tree, mesh)   this process's blocks (leading axis) of a pytree -> global arrays split like rows
  allgather(x)                numpy on each process -> their concatenation on every process (ragged allowed)
  allgather_objects(obj)      any JSON-able value of each process -> the list of all of them on every process
  barrier(name)               wait until every process reaches this point

Row order: the global batch is the concatenation of the processes' row blocks in process-index order. The mesh
helpers check that each process's devices hold one contiguous block of rows in that order (true for
`jax.make_mesh` on CPU, GPU and TPU slices); a mesh that interleaves processes is rejected with the fix.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from balcap_jax.parallel.mesh import batch_size_divisor
from balcap_jax.parallel.sharding import batch_sharding


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def rows_of_process(mesh: Mesh, num_rows: int, process: int | None = None) -> slice:
    """The block of rows [start, stop) of a `num_rows` batch-sharded array that `process` (default: this one)
    holds. Raises ValueError when the process's rows are not one block in process order (see module doc)."""
    process = jax.process_index() if process is None else process
    sharding = batch_sharding(mesh, 1)
    blocks: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map((num_rows,)).items():
        start, stop, _ = index[0].indices(num_rows)
        blocks.setdefault(device.process_index, set()).add((start, stop))
    spans = {}
    for proc, parts in blocks.items():
        parts = sorted(parts)
        lo, hi = parts[0][0], parts[-1][1]
        covered = sum(b - a for a, b in parts)
        if covered != hi - lo:
            raise ValueError(
                f"process {proc} holds rows {parts} of the batch, not one contiguous block; build the mesh with "
                "balcap_jax.parallel.make_mesh (jax.make_mesh device order) so each host's devices are adjacent "
                "on the batch axes"
            )
        spans[proc] = (lo, hi)
    order = sorted(spans)
    if [spans[p] for p in order] != sorted(spans.values()):
        raise ValueError(f"the batch rows of the processes are not in process order: {spans}")
    lo, hi = spans[process]
    return slice(lo, hi)


def global_rows(x: np.ndarray, mesh: Mesh, *, batch_axis: int = 0, sharding: NamedSharding | None = None) -> jax.Array:
    """This process's rows (its block of the batch axis) -> a global array sharded over the batch axes (or over
    `sharding`, whose batch axis must be `batch_axis`)."""
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim, batch_dim=batch_axis) if sharding is None else sharding
    if not is_multiprocess():
        return jax.device_put(x, sharding)
    shape = list(x.shape)
    shape[batch_axis] = x.shape[batch_axis] * jax.process_count()
    if _addressed_rows(sharding, tuple(shape), batch_axis) != x.shape[batch_axis]:
        # The layout does not split the rows by process (e.g. the sampling mesh's tensor-parallel rollout, whose
        # devices all see every prompt): every process needs every row, so gather them first.
        full = allgather(x, axis=batch_axis)
        return jax.make_array_from_callback(tuple(shape), sharding, lambda index: full[index])
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))


def row_blocks(mesh: Mesh | None, rows: int, *, micro_batches: int = 1) -> int:
    """How many equal blocks of consecutive rows this process cuts its `rows` rows into so that each lies on one
    batch shard of `mesh` (and, with `micro_batches`, in one micro-batch): the batch shards per process times
    the micro-batches. Falls back to fewer blocks (down to one) when the rows do not divide; the arrays built
    per block are then gathered or replicated where needed (`global_rows`)."""
    shards = 1 if mesh is None else max(batch_size_divisor(mesh) // jax.process_count(), 1)
    for blocks in (shards * micro_batches, micro_batches):
        if rows % blocks == 0:
            return blocks
    return 1


def global_blocks(tree: Any, mesh: Mesh, *, sharding: Any = None) -> Any:
    """A pytree whose leaves all lead with this process's blocks of rows (`row_blocks`) -> global arrays, the
    block axis split over the batch axes like the rows (`sharding(ndim)`, default `batch_sharding`), or
    replicated when the blocks do not divide over them (fewer blocks than shards: every device then works
    through all of them, as a flat batch would)."""
    sharding = sharding or (lambda ndim: batch_sharding(mesh, ndim))

    def put(leaf):
        leaf = np.asarray(leaf)
        split = sharding(leaf.ndim)
        if (leaf.shape[0] * jax.process_count()) % leading_shards(split):
            split = NamedSharding(mesh, PartitionSpec())
        return global_rows(leaf, mesh, batch_axis=0, sharding=split)

    return jax.tree.map(put, tree)


def leading_shards(sharding: NamedSharding) -> int:
    """Into how many pieces `sharding` cuts an array's leading axis."""
    entry = sharding.spec[0] if len(sharding.spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1


def _addressed_rows(sharding: NamedSharding, shape: tuple[int, ...], batch_axis: int) -> int:
    """How many distinct rows (along `batch_axis`) this process's devices hold under `sharding`."""
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map(shape).items():
        if device.process_index == jax.process_index():
            rows.update(range(*index[batch_axis].indices(shape[batch_axis])))
    return len(rows)


def replicated(x: Any, mesh: Mesh) -> Any:
    """A pytree of host values that is identical on every process -> replicated global arrays. Accepts jax
    arrays living on one local device (e.g. a freshly made rng key) as well as numpy."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(leaf):
        if not is_multiprocess():
            return jax.device_put(leaf, sharding)
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(leaf))
            impl = jax.random.key_impl(leaf)
            return jax.random.wrap_key_data(put(data), impl=impl)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, x)


def to_sharding(x: Any, shardings: Any) -> Any:
    """A pytree -> global arrays with `shardings`. Leaves that are already global arrays are resharded; leaves
    every process holds in full (e.g. a model initialised from the same seed on each process) are placed
    without any cross-process transfer."""
    if not is_multiprocess():
        return jax.device_put(x, shardings)

    def put(leaf, sharding):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, x, shardings)


def globalize(tree: Any, mesh: Mesh) -> Any:
    """Every leaf not already laid out on `mesh` (step counters, optimizer counts, rng keys made on one device)
    -> replicated on `mesh`, so jitted programs over the mesh accept the whole tree on any process count."""

    def fix(leaf):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return leaf
        return replicated(leaf, mesh)

    return jax.tree.map(fix, tree)


def local_rows(x: jax.Array | np.ndarray, *, batch_axis: int = 0) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in row order (replicas on other axes dropped)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    pieces: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        start = shard.index[batch_axis].start or 0
        pieces.setdefault(start, np.asarray(shard.data))
    rows = np.concatenate([pieces[k] for k in sorted(pieces)], axis=batch_axis)
    total = x.shape[batch_axis]
    if rows.shape[batch_axis] == total and jax.process_count() > 1:
        # Rows replicated over the processes (a layout that does not split them by process): this process's
        # block is its process-order share, as `global_rows` took it in.
        share = total // jax.process_count()
        rows = np.take(rows, np.arange(jax.process_index() * share, (jax.process_index() + 1) * share), axis=batch_axis)
    return rows


def host_value(x: Any) -> np.ndarray:
    """A replicated global array (e.g. a metric) -> numpy, readable on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def allgather(x: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """Concatenate every process's `x` along `axis`, in process order; sizes along `axis` may differ."""
    x = np.asarray(x)
    if not is_multiprocess():
        return x
    from jax.experimental import multihost_utils

    sizes = multihost_utils.process_allgather(np.asarray(x.shape[axis], np.int64)).reshape(-1)
    pad = int(sizes.max()) - x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    padded = np.pad(x, widths) if pad else x
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, ...]
    parts = [np.take(gathered[p], np.arange(int(n)), axis=axis) for p, n in enumerate(sizes)]
    return np.concatenate(parts, axis=axis)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, as a list in process order (the same list on every process)."""
    if not is_multiprocess():
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    sizes = allgather(np.asarray([data.size], np.int64))
    flat = allgather(data)
    out, offset = [], 0
    for n in sizes:
        out.append(json.loads(bytes(flat[offset: offset + int(n)]).decode("utf-8")))
        offset += int(n)
    return out


def agree_max(value: int) -> int:
    """The largest `value` over all processes (e.g. a padded length every process must use)."""
    return int(np.max(allgather(np.asarray([value], np.int64))))


def barrier(name: str) -> None:
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)



