"""Sharding helpers shared by the models, the trainer and checkpoint restore.

Three ways to say how a state is laid out, all ending as a pytree of `PartitionSpec`s with the state's structure:
  * a spec pytree written by hand (a model's sharding dataclass builds one);
  * path rules: `[(regex over the dotted parameter path, PartitionSpec), ...]`, first full match wins;
  * logical axes: each parameter names its dimensions ("embed", "mlp", "heads", ...) and a rule table maps
    logical names to mesh axes, so one model description serves the training layout (FSDP + tensor) and the
    sampling layout (tensor only, no per-step all-gathers).
`abstract_with_shardings` then attaches `NamedSharding`s to an abstract state (from `nnx.eval_shape`) so
weights can be created, loaded (`models.hf_io`) or restored (`checkpoint`) directly in their sharded form.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from balcap_jax.parallel.mesh import BATCH_AXES, DATA, FSDP, TENSOR

_log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None
LogicalRules = Sequence[tuple[str, MeshAxes]]

# Logical dimension names -> mesh axes. Dimensions not named here are replicated.
TRAINING_RULES: LogicalRules = (
    ("batch", BATCH_AXES),
    ("vocab", TENSOR),
    ("embed", FSDP),
    ("mlp", TENSOR),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("head_dim", None),
)
# Sampling keeps weights whole along fsdp: decode would otherwise all-gather every layer at every token.
SAMPLING_RULES: LogicalRules = (
    ("batch", BATCH_AXES),
    ("vocab", TENSOR),
    ("embed", None),
    ("mlp", TENSOR),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("head_dim", None),
)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """Mesh axes each tensor-parallel dimension kind is split over (an empty tuple: replicated).

    heads: q heads (q_proj out, o_proj in); kv_heads: k/v heads (k/v_proj out, the KV cache's head axis), always
    a prefix of `heads` so each device's q heads read only the kv heads it holds; mlp: the MLP's hidden width;
    vocab: the embedding's and lm_head's vocabulary.
    """

    heads: tuple[str, ...]
    kv_heads: tuple[str, ...]
    mlp: tuple[str, ...]
    vocab: tuple[str, ...]

    @classmethod
    def uniform(cls, axes: Sequence[str]) -> "TensorPlan":
        """Every kind over the same `axes` (divisibility left to `fit_spec`)."""
        axes = tuple(axes)
        return cls(heads=axes, kv_heads=axes, mlp=axes, vocab=axes)

    def rows_axes(self, batch_axes: Sequence[str]) -> tuple[str, ...]:
        """The batch axes the KV cache's rows may still use: those its head axis does not."""
        return tuple(axis for axis in batch_axes if axis not in self.kv_heads)


def spec_entry(axes: Sequence[str]) -> MeshAxes:
    """A PartitionSpec entry for `axes`: None when empty, the name when one, the tuple otherwise."""
    axes = tuple(axes)
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def dividing_axes(count: int, axes: Sequence[str], mesh: Mesh, *, prefix: Sequence[str] = ()) -> tuple[str, ...]:
    """`prefix` + the sub-sequence of the other `axes` (order kept) whose mesh-size product is the largest with
    prod(prefix) * product dividing `count`; ties go to axes later in `axes` (the innermost, fastest links).
    Axes of size 1 are left out (they split nothing). E.g. 28 heads over fsdp=4 x tensor=2 -> ("fsdp",)
    (4 | 28, 8 does not); 4 KV heads over fsdp=8 -> () (replicated).
    """
    for name in (*axes, *prefix):
        if name not in mesh.shape:
            raise ValueError(f"mesh axis {name!r} does not exist; the mesh has axes {tuple(mesh.shape)}")
    prefix = tuple(prefix)
    base = math.prod(mesh.shape[a] for a in prefix)
    if count % base:
        raise ValueError(f"prefix axes {prefix} (size {base}) do not divide {count}")
    free = [a for a in axes if a not in prefix and mesh.shape[a] > 1]
    best: tuple[int, tuple[int, ...], tuple[str, ...]] = (1, (), ())
    for size in range(1, len(free) + 1):
        for combo in itertools.combinations(range(len(free)), size):
            product = math.prod(mesh.shape[free[i]] for i in combo)
            if count % (base * product):
                continue
            key = (product, tuple(sorted(combo, reverse=True)), tuple(free[i] for i in combo))
            if key[:2] > best[:2]:
                best = key
    return prefix + best[2]


def path_to_str(path: Sequence[Any]) -> str:
    """A pytree key path as a dotted name ("model.layers.0.self_attn.q_proj.kernel").

    NNX `Variable` wrappers (the trailing `.value` attribute) are dropped so the name matches the module tree.
    """
    parts: list[str] = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return ".".join(parts)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """[(dotted path, leaf)] in pytree order."""
    return [(path_to_str(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """tree.map with the dotted path of each leaf as the first argument."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_to_str(path), leaf), tree)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def specs_from_rules(tree: Any, rules: Sequence[tuple[str, P]], *, default: P | None = None) -> Any:
    """A PartitionSpec per leaf of `tree`: the first rule whose regex fully matches the dotted path.

    Leaves matched by no rule get `default`; with `default=None` that is an error naming the parameter, so a
    renamed module cannot silently end up replicated.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def pick(name: str, leaf: Any) -> P:
        for pattern, spec in compiled:
            if pattern.fullmatch(name):
                return spec
        if default is None:
            raise ValueError(
                f"no sharding rule matches parameter {name!r} (shape {getattr(leaf, 'shape', '?')}); add a rule "
                "for it or pass default=PartitionSpec() to replicate unmatched parameters"
            )
        return default

    return map_with_names(pick, tree)


def logical_to_spec(logical_axes: Sequence[str | None], rules: LogicalRules) -> P:
    """Maps logical dimension names to a PartitionSpec, e.g. ("embed", "mlp") -> P("fsdp", "tensor").

    A mesh axis is used at most once per spec (a later dimension asking for an axis already taken is
    replicated), as a PartitionSpec requires.
    """
    table = dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name in logical_axes:
        axes = table.get(name) if name is not None else None
        axes_tuple = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if any(axis in used for axis in axes_tuple):
            axes_tuple = ()
        used.update(axes_tuple)
        out.append(None if not axes_tuple else (axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple))
    return P(*out)


def specs_from_logical(logical_tree: Any, rules: LogicalRules) -> Any:
    """A pytree of logical-axis tuples (one tuple per parameter) -> pytree of PartitionSpecs."""
    return jax.tree.map(
        lambda axes: logical_to_spec(axes, rules),
        logical_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x),
    )


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    size = 1
    for name in names:
        if name not in mesh.shape:
            raise ValueError(f"mesh axis {name!r} does not exist; the mesh has axes {tuple(mesh.shape)}")
        size *= mesh.shape[name]
    return size


def fit_spec(
    name: str,
    shape: Sequence[int],
    spec: P,
    mesh: Mesh,
    *,
    on_indivisible: Literal["raise", "replicate"] = "raise",
) -> P:
    """Checks `spec` against `shape` on `mesh`: rank, known axes, and that each sharded dimension divides.

    on_indivisible="replicate" replaces a sharding that does not divide its dimension with None (useful for tiny
    test models whose odd sizes do not split); "raise" names the parameter, the dimension and the fix.
    """
    if len(spec) > len(shape):
        raise ValueError(f"{name}: PartitionSpec {spec} has {len(spec)} entries but the array has shape {tuple(shape)}")
    fitted: list[MeshAxes] = []
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        shards = _axis_size(mesh, axes)
        if size % shards:
            if on_indivisible == "raise":
                raise ValueError(
                    f"{name}: dimension {dim} of shape {tuple(shape)} has size {size}, not divisible by the "
                    f"{shards} shards of mesh axes {axes!r}; change the mesh or the PartitionSpec {spec}"
                )
            _log.warning("%s: replicating dim %d (size %d) instead of sharding over %r", name, dim, size, axes)
            axes = None
        fitted.append(axes)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def abstract_with_shardings(
    abstract_tree: Any,
    specs: Any,
    mesh: Mesh,
    *,
    on_indivisible: Literal["raise", "replicate"] = "raise",
) -> Any:
    """Attaches `NamedSharding(mesh, spec)` to every leaf of an abstract (or concrete) state.

    abstract_tree: pytree whose leaves have `.shape`/`.dtype` (e.g. `nnx.state(nnx.eval_shape(...))`).
    specs: a pytree of PartitionSpecs with the same structure (NNX `State`s of specs are fine), or a callable
      `(dotted_name, leaf) -> PartitionSpec`.
    Returns the same structure with `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` leaves: the restore /
    load / `jax.jit(out_shardings=...)` target.
    """

    def attach(name: str, leaf: Any, spec: P) -> jax.ShapeDtypeStruct:
        if not _is_spec(spec):
            raise TypeError(f"{name}: expected a PartitionSpec, got {type(spec).__name__} ({spec!r})")
        spec = fit_spec(name, leaf.shape, spec, mesh, on_indivisible=on_indivisible)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    if callable(specs) and not _is_spec(specs):
        return map_with_names(lambda name, leaf: attach(name, leaf, specs(name, leaf)), abstract_tree)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf, spec: attach(path_to_str(path), leaf, spec), abstract_tree, specs
    )


def shardings_of(tree: Any) -> Any:
    """The `.sharding` of every leaf (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda leaf: leaf.sharding, tree)


def shard_like(tree: Any, target: Any) -> Any:
    """Moves (reshards) a concrete pytree onto the shardings of `target` (same structure)."""
    return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), tree, target)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1, *, batch_dim: int = 0) -> NamedSharding:
    """Sharding of a batch array: `batch_dim` over ("data", "fsdp"), everything else replicated."""
    spec: list[MeshAxes] = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def describe(tree: Any, *, max_rows: int | None = 40) -> str:
    """A table of name, shape, dtype and spec per leaf — for logs when a layout needs checking."""
    rows = []
    for name, leaf in named_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
        rows.append(f"{name:<60} {str(tuple(leaf.shape)):<20} {str(leaf.dtype):<10} {spec}")
    if max_rows is not None and len(rows) > max_rows:
        rows = rows[:max_rows] + [f"... {len(rows) - max_rows} more"]
    return "\n".join(rows)


__all__ = [
    "DATA",
    "FSDP",
    "TENSOR",
    "TRAINING_RULES",
    "SAMPLING_RULES",
    "TensorPlan",
    "dividing_axes",
    "spec_entry",
    "abstract_with_shardings",
    "batch_sharding",
    "describe",
    "fit_spec",
    "logical_to_spec",
    "map_with_names",
    "named_leaves",
    "path_to_str",
    "replicated",
    "shard_like",
    "shardings_of",
    "specs_from_logical",
    "specs_from_rules",
]


class RuleShardingMixin:
    """Placement methods shared by the models' sharding dataclasses. A subclass provides `sharding_rules()`
    ((regex over dotted parameter names, PartitionSpec), first full match wins), and the fields `batch` (spec of
    a batch input's leading dims) and `kv_cache` (spec of KVCache.k / .v)."""

    def sharding_rules(self) -> Sequence[tuple[str, P]]:
        raise NotImplementedError

    def param_specs(self, params: Any) -> Any:
        """A PartitionSpec pytree for a Param state (real or abstract); unknown parameters raise."""
        return specs_from_rules(params, self.sharding_rules())

    def param_spec(self, name: str, leaf: Any) -> P:
        """The spec of one parameter by dotted name (the callable form `hf_io`/`abstract_with_shardings` take)."""
        for pattern, spec in self.sharding_rules():
            if re.fullmatch(pattern, name):
                return spec
        raise ValueError(f"no sharding rule matches parameter {name!r} (shape {getattr(leaf, 'shape', '?')})")

    def abstract_params(self, params: Any, mesh: Mesh, *, on_indivisible: str = "replicate") -> Any:
        """Abstract params with NamedShardings attached: the target for loading, initialising or restoring."""
        return abstract_with_shardings(params, self.param_specs(params), mesh, on_indivisible=on_indivisible)

    def shard_params(self, params: Any, mesh: Mesh) -> Any:
        """Move a concrete Param state onto this layout."""
        target = self.abstract_params(params, mesh)
        return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), params, target)

    def batch_sharding(self, mesh: Mesh, shape: tuple[int, ...], *, batch_dim: int = 0) -> NamedSharding:
        """`batch_dim` over the batch axes (e.g. positions [3, B, T]: batch_dim=1); replicated where it does not
        divide (e.g. an odd image count)."""
        spec = [None] * len(shape)
        spec[batch_dim] = tuple(self.batch)[0]
        return NamedSharding(mesh, fit_spec("batch input", shape, P(*spec), mesh, on_indivisible="replicate"))

    def cache_sharding(self, mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, fit_spec("kv_cache", shape, self.kv_cache, mesh, on_indivisible="replicate"))
