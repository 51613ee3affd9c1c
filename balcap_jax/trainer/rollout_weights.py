"""The rollout copy of the weights: training params -> the sampling layout, in the compute dtype, one program.

Each RL step the loop turns its training params (FSDP + tensor layout, fp32 master weights) into the copy the
sampler reads, and drops that copy after decode. Two things make the copy small:
  * bf16 recipes (`model.dtype == "bfloat16"`) store its matrices (`*.kernel`, `*.embedding`) in bf16; the
    model casts them to bf16 at use anyway, so rollouts compute exactly what the training forward computes.
    Norm scales and biases (tiny) keep their dtype, because the norms multiply in the scale's dtype.
  * tensor parallelism over `mesh.sampling_tensor_axes` (default ("fsdp", "tensor")), so the copy is split over
    those devices instead of replicated over fsdp. The copy lives on `parallel.mesh.sampling_mesh`: the same
    devices with those axes renamed `<axis>_tp`, so the models' row constraints (over data, fsdp) leave the
    tensor-parallel devices to the weights and decode never all-gathers a weight per token. Each dimension kind
    takes the largest sub-product of those axes that divides it in whole units
    (`parallel.sharding.dividing_axes`): KV heads first (never split finer than the model has them; when nothing
    divides they are replicated), q heads as the KV axes plus what else divides (each device's q heads then
    read only the KV heads it holds), MLP width and vocabulary on their own. E.g. Qwen2.5-VL-7B (28 q / 4 KV
    heads) on fsdp=8: k/v and q/o replicated, MLP and vocabulary 8-way; LLaVA-1.5-7B (32 / 32): all 8-way.
The sampler runs on that mesh and its KV cache follows the k/v heads
(`Sampler(mesh=RolloutWeights.mesh, cache_heads=RolloutWeights.cache_heads)`).

`build` makes the one jitted program (`RolloutWeights.program`) the loop calls as `for_sampling` and the AOT
tool (`tools/aot.py`) compiles, so the tool measures the program the loop runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from balcap_jax.parallel.mesh import DEFAULT_SAMPLING_TENSOR_AXES, MESH_AXES, sampling_mesh, tensor_axes_from, tp_axis
from balcap_jax.parallel.sharding import TensorPlan, dividing_axes, map_with_names

# Parameters the model casts to its compute dtype at use (Linear kernels, embeddings): stored in that dtype
# they give bit-identical rollouts. Others (norm scales, biases) enter arithmetic in their own dtype.
_CAST_SUFFIXES = (".kernel", ".embedding")


def sampling_tensor_axes(config: Any) -> tuple[str, ...]:
    """`config.mesh.sampling_tensor_axes` (default ("fsdp", "tensor")), checked against the mesh axes."""
    mesh_config = config.mesh
    raw = mesh_config.get("sampling_tensor_axes", None) if hasattr(mesh_config, "get") else None
    axes = tensor_axes_from(raw)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown or len(set(axes)) != len(axes):
        raise ValueError(
            f"config.mesh.sampling_tensor_axes={tuple(axes)!r}: give distinct mesh axes from {list(MESH_AXES)}, "
            f"e.g. {DEFAULT_SAMPLING_TENSOR_AXES!r} (or ('tensor',) to keep the rollout copy whole over fsdp)"
        )
    return axes


def rollout_dtype(config: Any) -> Any | None:
    """bf16 for bf16-compute recipes; None (keep the params' dtype) otherwise."""
    return jnp.bfloat16 if str(config.model.dtype) == "bfloat16" else None


def decoder_plan(text_config: Any, mesh: Mesh, axes: Sequence[str]) -> TensorPlan:
    """The sampling `TensorPlan` of a decoder (`DecoderConfig`: num_heads, num_kv_heads, intermediate_size,
    vocab_size) over `axes` of `mesh` (see the module docstring)."""
    kv = dividing_axes(int(text_config.num_kv_heads), axes, mesh)
    return TensorPlan(
        heads=dividing_axes(int(text_config.num_heads), axes, mesh, prefix=kv),
        kv_heads=kv,
        mlp=dividing_axes(int(text_config.intermediate_size), axes, mesh),
        vocab=dividing_axes(int(text_config.vocab_size), axes, mesh),
    )


def cast_leaf(name: str, leaf: Any, dtype: Any | None) -> Any:
    """The dtype a parameter has in the rollout copy: `dtype` for floating kernels / embeddings, else its own."""
    if dtype is None or not name.endswith(_CAST_SUFFIXES) or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return leaf.dtype
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class RolloutWeights:
    """The rollout copy's layout and the program that makes it.

    mesh: the sampling mesh (`parallel.mesh.sampling_mesh`) the copy, the sampler and its KV cache live on;
    plan: the tensor parallelism of the copy (axes of `mesh`); shardings: NamedSharding per parameter; dtypes:
    dtype per parameter; program: jitted `training params -> rollout copy` (one reshard + cast, no donation:
    the training params live on into the update)."""

    mesh: Mesh
    plan: TensorPlan
    shardings: Any
    dtypes: Any
    program: Any

    @property
    def cache_heads(self) -> tuple[str, ...]:
        """The mesh axes of the KV cache's head axis (those of k/v_proj)."""
        return self.plan.kv_heads

    @property
    def cache_rows(self) -> tuple[str, ...]:
        """Tensor-parallel axes the KV heads do not use: the KV cache splits its rows over them instead (e.g.
        Qwen2.5-VL-7B's 4 KV heads on fsdp=32: heads replicated, rows 32-way), so it is never replicated."""
        return tuple(a for a in self.mesh.axis_names if a not in MESH_AXES and a not in self.plan.kv_heads
                     and self.mesh.shape[a] > 1)

    def __call__(self, params: Any) -> Any:
        return self.program(params)

    def abstract(self, params: Any) -> Any:
        """ShapeDtypeStructs of the copy (shape of `params`, the copy's dtype and sharding)."""
        return jax.tree.map(lambda leaf, d, s: jax.ShapeDtypeStruct(leaf.shape, d, sharding=s), params,
                            self.dtypes, self.shardings)


def build(family: Any, model_config: Any, params: Any, mesh: Mesh, *, tensor_axes: Sequence[str],
          dtype: Any | None) -> RolloutWeights:
    """The rollout weights of `params` (a Param state on the training `mesh`, concrete or abstract) for
    `family`."""
    target = sampling_mesh(mesh, tuple(tensor_axes))
    plan = decoder_plan(model_config.text, target, [tp_axis(a) for a in tensor_axes])
    sharding = type(family.sharding("sampling")).sampling(plan)
    abstract = sharding.abstract_params(params, target)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract)
    dtypes = map_with_names(lambda name, leaf: cast_leaf(name, leaf, dtype), params)

    def to_rollout(p: Any) -> Any:
        return jax.tree.map(lambda x, d: x.astype(d), p, dtypes)

    return RolloutWeights(target, plan, shardings, dtypes, jax.jit(to_rollout, out_shardings=shardings))


def for_config(config: Any, family: Any, model_config: Any, params: Any, mesh: Mesh) -> RolloutWeights:
    """`build` with the recipe's `mesh.sampling_tensor_axes` and compute dtype: what the loop and the AOT tool
    call."""
    return build(family, model_config, params, mesh, tensor_axes=sampling_tensor_axes(config),
                 dtype=rollout_dtype(config))
