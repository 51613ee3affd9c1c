"""Ahead-of-time compiled jit functions that count their compiled variants and the time spent compiling.

`jax.jit` recompiles silently whenever a static argument or an input shape/dtype/sharding changes. Rollouts must
not recompile every step (prompt buckets and fixed output buffers exist for that), so the sampler compiles each
variant explicitly (`lower(...).compile()`), keyed on exactly what jit keys on, and exposes the count and the
compile seconds for metrics. A growing count during training is a bug worth seeing on a dashboard.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax


def _leaf_signature(x: Any) -> Hashable:
    if isinstance(x, jax.Array):
        return (x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return (tuple(x.shape), x.dtype, False, None)
    return (type(x), x)


def abstract_key(args: tuple[Any, ...]) -> Hashable:
    """What a compiled program depends on: tree structure + per-leaf (shape, dtype, weak type, sharding)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(_leaf_signature(x) for x in leaves)


@dataclasses.dataclass
class CompileStats:
    variants: int = 0
    seconds: float = 0.0
    last_seconds: float = 0.0


class CountingJit:
    """`jax.jit(fn)` whose variants are compiled ahead of time, counted and timed.

    `static` arguments (hashable) are passed by keyword and fixed at compile time; positional arguments are
    traced; `donate_argnums` index the positional arguments.
    """

    def __init__(
        self, fn: Callable[..., Any], *, static_argnames: tuple[str, ...], donate_argnums: tuple[int, ...] = ()
    ):
        self._jitted = jax.jit(fn, static_argnames=static_argnames, donate_argnums=donate_argnums)
        self._static_argnames = static_argnames
        self._compiled: dict[Hashable, Any] = {}
        self.stats = CompileStats()

    def compiled_variant(self, *args: Any, **static: Any) -> Any:
        """The compiled executable for these arguments, compiling (and counting) it on first use; also useful
        for `memory_analysis()` / `cost_analysis()`."""
        if set(static) != set(self._static_argnames):
            raise TypeError(f"expected static keyword arguments {self._static_argnames}, got {sorted(static)}")
        key = (tuple(static[name] for name in self._static_argnames), abstract_key(args))
        compiled = self._compiled.get(key)
        if compiled is None:
            start = time.perf_counter()
            compiled = self._jitted.lower(*args, **static).compile()
            elapsed = time.perf_counter() - start
            self._compiled[key] = compiled
            self.stats.variants += 1
            self.stats.seconds += elapsed
            self.stats.last_seconds = elapsed
        return compiled

    def __call__(self, *args: Any, **static: Any) -> Any:
        return self.compiled_variant(*args, **static)(*args)
