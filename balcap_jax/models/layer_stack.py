"""Layer stacks: N identical layers held as ONE module whose parameters carry a leading [N] layer axis, applied
by one `jax.lax.scan`, so a jitted program holds (and XLA compiles) the layer body once whatever the depth.

    self.layers = stacked(lambda rngs: DecoderLayer(config, rngs=rngs), config.num_layers, rngs)
    carry, ys = scan_layers(self.layers, step, carry, xs, remat=self.remat)   # step(layer, carry, x)

A stack is an ordinary NNX module (here a `DecoderLayer` whose every parameter is [N, ...]), so `nnx.split` /
`nnx.merge` at jit boundaries, checkpoints and sharding rules see plain pure state. Parameter names lose the
per-layer index (`layers.self_attn.q_proj.kernel` [N, D, H*Dh] instead of `layers.3.self_attn.q_proj.kernel`);
modules that hold stacks list the attributes in a `layer_stacks` class attribute, from which
`layer_stack_prefixes` finds them, e.g. for `hf_io.ParamMapping.stacked` (HF checkpoints keep per-layer keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from balcap_jax.models.remat import Remat

M = TypeVar("M", bound=nnx.Module)
Carry = TypeVar("Carry")


def stacked(make_layer: Callable[[nnx.Rngs], M], count: int, rngs: nnx.Rngs) -> M:
    """`count` independently initialised layers `make_layer(rngs)` as one module with [count, ...] parameters.

    The layer is built under `jax.vmap` over `count` keys drawn from `rngs.params()`, so only the stacked
    arrays are ever allocated (and nothing at all under `nnx.eval_shape`).
    """
    if count < 1:
        raise ValueError(f"a layer stack needs at least one layer, got count={count}")
    keys = jax.random.split(rngs.params(), count)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_layer(nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(make_layer(nnx.Rngs(params=key))))(keys)
    return nnx.merge(graphdef, state)


def stack_depth(layers: nnx.Module) -> int:
    """N, the length of the leading layer axis of a stack."""
    return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def scan_layers(
    layers: nnx.Module,
    step: Callable[[Any, Carry, Any], tuple[Carry, Any]],
    carry: Carry,
    xs: Any = None,
    *,
    remat: Remat = Remat.NONE,
) -> tuple[Carry, Any]:
    """`carry, y_i = step(layer_i, carry, x_i)` for i = 0..N-1, as one `lax.scan` over the stack.

    xs: a pytree of [N, ...] per-layer inputs (or None); the ys come back stacked [N, ...]. `step` gets each layer
    as an ordinary module (parameters without the layer axis) and must be pure: a stack's state is read, never
    written, inside the scan. `remat` checkpoints the whole body (see `remat.Remat`).
    """
    graphdef, state = nnx.split(layers)

    def body(carry: Carry, inputs: tuple[Any, Any]) -> tuple[Carry, Any]:
        layer_state, x = inputs
        return step(nnx.merge(graphdef, layer_state), carry, x)

    return jax.lax.scan(remat.apply(body), carry, (state, xs))


def layer_at(layers: nnx.Module, index: int) -> nnx.Module:
    """Layer `index` of a stack as a standalone module (its own copy of that layer's parameters), e.g. to test
    one layer against a reference implementation."""
    depth = stack_depth(layers)
    if not -depth <= index < depth:
        raise IndexError(f"layer {index} is outside a stack of {depth} layers")
    graphdef, state = nnx.split(layers)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[index], state))


def leading(layers: nnx.Module, count: int) -> nnx.Module:
    """The first `count` layers of a stack (a sliced copy of their parameters; the stack itself when whole)."""
    depth = stack_depth(layers)
    if not 0 <= count <= depth:
        raise ValueError(f"cannot take the first {count} layers of a stack of {depth}")
    if count == depth:
        return layers
    graphdef, state = nnx.split(layers)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[:count], state))


def layer_stack_prefixes(module: nnx.Module) -> tuple[str, ...]:
    """Dotted name prefixes ("model.language_model.layers.") of every layer stack inside `module`: the attributes
    its submodules list in their `layer_stacks` class attribute."""
    prefixes = []
    for path, submodule in nnx.iter_modules(module):
        for attribute in getattr(type(submodule), "layer_stacks", ()):
            prefixes.append(".".join(str(part) for part in (*path, attribute)) + ".")
    return tuple(sorted(prefixes))


def layer_indices(count: int) -> jax.Array:
    """int32[count] 0..count-1: the scan input that tells each layer step its own index (KV-cache layer)."""
    return jnp.arange(count, dtype=jnp.int32)
