"""Group rollouts: vision + prompt prefill once per prompt, KV cache tiled G times, `lax.while_loop` decode.

Two compiled stages, both pure functions of the policy state (`nnx.split` at the boundary):

  1. `prefill_and_tile(state, prompts) -> DecodeStart`: runs the vision tower and the prompt through the model
     once per prompt (P rows, bucket length T) into a KV cache of exactly T slots, computes the next-token logits
     from the last column, then tiles cache, logits and start positions G times (prompt-major rows) and extends
     the cache by T_new - 1 empty slots for the completion. The G samples of a prompt never re-run its image.
  2. `decode(state, cache, logits, start_positions, key) -> (Rollout, cache)`: samples column 0 from the prefill
     logits, then each loop iteration decodes the previous token (writing one cache slot for all rows) and
     samples the next column: T_new - 1 decode steps for T_new tokens. The loop stops at `max_new_tokens` or as
     soon as every row has emitted an EOS id. The KV cache (the largest buffer) is donated and returned, so the
     loop updates it in place and decode holds one cache, never two.

Both stages are compiled ahead of time by `CountingJit`, keyed on the static `SamplerConfig` and the input
shapes; `compiled_variants` exposes how many programs exist (one pair per prompt bucket in steady state).

Randomness: column j draws with `fold_in(key, j)`, over the whole [N, V] batch at once. With JAX's partitionable
threefry the draws do not depend on how the batch is sharded, so a rollout is identical on 1 or 8 devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from balcap_jax.models import image_shards
from balcap_jax.models.interface import KVCache, SequenceInputs, next_text_positions
from balcap_jax.parallel import hosts
from balcap_jax.parallel.mesh import BATCH_AXES
from balcap_jax.sampling.compiled import CountingJit
from balcap_jax.sampling.config import SamplerConfig
from balcap_jax.sampling.prompts import left_pad, validate_prompts
from balcap_jax.sampling.rollout import FinishReason, Rollout, tile_rows
from balcap_jax.sampling.strategies import tempered_log_probs

Array = jax.Array


@struct.dataclass
class DecodeStart:
    """The state decode starts from, N = P * G rows.

    cache:           KVCache [L, N, T + T_new - 1, H_kv, D]; slots [0, T) hold the prompt, `index` = T.
    logits:          fp32[N, V] next-token logits after the prompt.
    start_positions: int32[N] text position of the first completion token.
    """

    cache: KVCache
    logits: Array
    start_positions: Array


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Where the batch axis lives: sharded over `axes` of `mesh`, or nowhere (single device, no mesh).

    cache_heads: mesh axes the KV cache's head axis is split over, those of the rollout weights' k/v_proj (so
    each device attends with the heads it projects); the cache's rows then use the batch axes left over and
    `cache_rows`: tensor-parallel axes the KV heads could not take (so a cache whose heads do not divide is
    still split, not replicated).
    """

    mesh: Mesh | None = None
    axes: tuple[str, ...] = ()
    cache_heads: tuple[str, ...] = ()
    cache_rows: tuple[str, ...] = ()

    @property
    def num_shards(self) -> int:
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in self.axes)

    def sharding(self, ndim: int, batch_axis: int = 0) -> NamedSharding | None:
        if self.mesh is None:
            return None
        spec = [None] * ndim
        spec[batch_axis] = self.axes or None
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def constrain(self, x: Array, batch_axis: int = 0) -> Array:
        """Pins the batch axis of an array inside jit (a no-op without a mesh)."""
        sharding = self.sharding(x.ndim, batch_axis)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    def cache_sharding(self, ndim: int, batch_axis: int, head_axis: int | None = None) -> NamedSharding | None:
        """KVCache.k / .v [L, N, S, H_kv, Dh] (batch_axis=1, head_axis=3) or .valid [N, S] (batch_axis=0): heads
        over `cache_heads`, rows over the batch axes they leave."""
        if self.mesh is None:
            return None
        rows = tuple(a for a in (*self.axes, *self.cache_rows) if a not in self.cache_heads)
        spec: list[Any] = [None] * ndim
        spec[batch_axis] = rows or None
        if head_axis is not None:
            spec[head_axis] = self.cache_heads or None
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def constrain_cache(self, cache: KVCache) -> KVCache:
        def pin(x: Array, batch_axis: int, head_axis: int | None = None) -> Array:
            sharding = self.cache_sharding(x.ndim, batch_axis, head_axis)
            return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

        return cache.replace(k=pin(cache.k, 1, 3), v=pin(cache.v, 1, 3), valid=pin(cache.valid, 0))


def prefill_and_tile(
    state: nnx.State,
    prompts: SequenceInputs,
    *,
    graphdef: nnx.GraphDef,
    config: SamplerConfig,
    layout: BatchLayout,
) -> DecodeStart:
    """Stage 1 (see module docstring). prompts: P left-padded rows of bucket length T."""
    model = nnx.merge(graphdef, state)
    num_prompts, prompt_length = prompts["input_ids"].shape
    spec = model.cache_spec()
    cache = KVCache.zeros(
        num_layers=spec.num_layers,
        batch=num_prompts,
        max_len=prompt_length,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=jnp.dtype(config.cache_dtype),
    )
    hidden, cache = model.prefill(prompts, cache)
    chex.assert_shape(hidden, (num_prompts, prompt_length, None))
    next_logits = model.logits(hidden[:, -1]).astype(jnp.float32)

    group, extra_slots = config.group_size, config.max_new_tokens - 1

    def tile_and_extend(x: Array, batch_axis: int, slot_axis: int) -> Array:
        widths = [(0, 0)] * x.ndim
        widths[slot_axis] = (0, extra_slots)
        return jnp.pad(tile_rows(x, group, axis=batch_axis), widths)

    decode_cache = KVCache(
        k=tile_and_extend(cache.k, batch_axis=1, slot_axis=2),
        v=tile_and_extend(cache.v, batch_axis=1, slot_axis=2),
        valid=tile_and_extend(cache.valid, batch_axis=0, slot_axis=1),
        index=jnp.asarray(prompt_length, jnp.int32),
    )
    start_positions = next_text_positions(prompts["positions"], prompts["attention_mask"])
    return DecodeStart(
        cache=layout.constrain_cache(decode_cache),
        logits=layout.constrain(tile_rows(next_logits, group)),
        start_positions=layout.constrain(tile_rows(start_positions, group)),
    )


@struct.dataclass
class _LoopState:
    step: Array  # int32[]: the completion column to sample next
    previous: Array  # int32[N]: the token sampled at column step - 1
    done: Array  # bool[N]: the row has emitted an EOS id
    lengths: Array  # int32[N]
    tokens: Array  # int32[N, T_new]
    logprobs: Array  # fp32[N, T_new]
    cache: KVCache


def decode(
    state: nnx.State,
    cache: KVCache,
    first_logits: Array,
    start_positions: Array,
    key: Array,
    *,
    graphdef: nnx.GraphDef,
    config: SamplerConfig,
    layout: BatchLayout,
) -> tuple[Rollout, KVCache]:
    """Stage 2 (see module docstring), from the fields of a `DecodeStart`.

    Returns the fixed-size `Rollout` (N rows x max_new_tokens) and the final cache. Returning the cache lets the
    donated input cache alias the loop's cache (XLA updates it in place), so decode holds one cache, not two.
    """
    num_rows = first_logits.shape[0]
    num_new = config.max_new_tokens
    strategy, temperature = config.strategy, config.temperature
    eos_ids = jnp.asarray(config.eos_ids, jnp.int32)
    blocked_ids = jnp.asarray(config.blocked_ids, jnp.int32)

    def emit(logits: Array, step: Array, done: Array) -> tuple[Array, Array]:
        selectable = logits.at[:, blocked_ids].set(-jnp.inf) if config.blocked_ids else logits
        token = strategy.select(selectable, jax.random.fold_in(key, step))
        logprob = tempered_log_probs(logits, token, temperature)
        return jnp.where(done, config.pad_id, token), jnp.where(done, 0.0, logprob)

    def is_eos(token: Array) -> Array:
        if not config.eos_ids:
            return jnp.zeros(token.shape, bool)
        return jnp.any(token[:, None] == eos_ids[None, :], axis=-1)

    def write_column(buffer: Array, column: Array, step: Array) -> Array:
        return layout.constrain(jax.lax.dynamic_update_slice_in_dim(buffer, column[:, None], step, axis=1))

    not_done = jnp.zeros((num_rows,), bool)
    first, first_logprob = emit(first_logits, jnp.int32(0), not_done)
    initial = _LoopState(
        step=jnp.int32(1),
        previous=first,
        done=is_eos(first),
        lengths=jnp.ones((num_rows,), jnp.int32),
        tokens=write_column(jnp.full((num_rows, num_new), config.pad_id, jnp.int32), first, jnp.int32(0)),
        logprobs=write_column(jnp.zeros((num_rows, num_new), jnp.float32), first_logprob, jnp.int32(0)),
        cache=cache,
    )

    def keep_going(loop: _LoopState) -> Array:
        return (loop.step < num_new) & ~jnp.all(loop.done)

    def step_once(loop: _LoopState) -> _LoopState:
        model = nnx.merge(graphdef, state)
        positions = start_positions + loop.step - 1
        hidden, cache = model.decode(loop.previous, positions, loop.cache)
        logits = model.logits(hidden).astype(jnp.float32)
        token, logprob = emit(logits, loop.step, loop.done)
        return _LoopState(
            step=loop.step + 1,
            previous=token,
            done=loop.done | is_eos(token),
            lengths=loop.lengths + (~loop.done).astype(jnp.int32),
            tokens=write_column(loop.tokens, token, loop.step),
            logprobs=write_column(loop.logprobs, logprob, loop.step),
            cache=layout.constrain_cache(cache),
        )

    final = jax.lax.while_loop(keep_going, step_once, initial)
    columns = jnp.arange(num_new, dtype=jnp.int32)[None, :]
    rollout = Rollout(
        tokens=final.tokens,
        logprobs=final.logprobs,
        completion_mask=layout.constrain(columns < final.lengths[:, None]),
        lengths=final.lengths,
        finish_reason=jnp.where(final.done, FinishReason.EOS.value, FinishReason.LENGTH.value).astype(jnp.int32),
        start_positions=start_positions,
        decode_steps=final.step,
    )
    return rollout, final.cache


class Sampler:
    """Jitted group rollouts for one policy architecture (one `graphdef`); weights come per call as `state`.

        sampler = Sampler(graphdef, mesh=mesh)            # or Sampler(graphdef) on one device
        rollout = sampler(state, prompts, config, key)    # Rollout with P * G rows
        batch = build_training_batch(sampler.prepare_prompts(prompts, config), rollout, config.group_size, ...)

    mesh: shard the rollout batch over `batch_axes` of `mesh` (default: the mesh's data-parallel axes present
    in it, `("data", "fsdp")`); weights keep whatever sharding `state` carries (use the sampling layout: no FSDP
    on weights, so decode does not all-gather them every step). cache_heads: the mesh axes the rollout weights
    split k/v heads over (`trainer.rollout_weights.RolloutWeights.cache_heads`); the KV cache follows them, and
    splits its rows over `cache_rows` (`RolloutWeights.cache_rows`) too.
    """

    def __init__(self, graphdef: nnx.GraphDef, *, mesh: Mesh | None = None, batch_axes: tuple[str, ...] | None = None,
                 cache_heads: tuple[str, ...] = (), cache_rows: tuple[str, ...] = ()):
        if mesh is not None:
            axes = tuple(a for a in (BATCH_AXES if batch_axes is None else batch_axes) if a in mesh.shape)
            unknown = set(batch_axes or ()) - set(mesh.shape)
            if unknown:
                raise ValueError(f"batch_axes {sorted(unknown)} are not axes of the mesh {dict(mesh.shape)}")
            unknown = (set(cache_heads) | set(cache_rows)) - set(mesh.shape)
            if unknown:
                raise ValueError(f"cache_heads / cache_rows {sorted(unknown)} are not axes of the mesh "
                                 f"{dict(mesh.shape)}")
            self.layout = BatchLayout(mesh, axes, tuple(cache_heads), tuple(cache_rows))
        else:
            self.layout = BatchLayout()
        self.graphdef = graphdef
        self._prefill = CountingJit(prefill_and_tile, static_argnames=("graphdef", "config", "layout"))
        self._decode = CountingJit(decode, static_argnames=("graphdef", "config", "layout"), donate_argnums=(1,))

    @classmethod
    def from_model(cls, model: nnx.Module, **kwargs: Any) -> tuple["Sampler", nnx.State]:
        graphdef, state = nnx.split(model)
        return cls(graphdef, **kwargs), state

    # -- compile accounting ---------------------------------------------------------------------------------
    @property
    def compiled_variants(self) -> int:
        """Programs compiled so far (prefill + decode); stays flat in steady state."""
        return self._prefill.stats.variants + self._decode.stats.variants

    @property
    def compile_seconds(self) -> float:
        return self._prefill.stats.seconds + self._decode.stats.seconds

    def metrics(self) -> dict[str, float]:
        return {
            "sampler/compiled_variants": float(self.compiled_variants),
            "sampler/compile_seconds": self.compile_seconds,
        }

    # -- host-side preparation ------------------------------------------------------------------------------
    def prepare_prompts(self, prompts: SequenceInputs, config: SamplerConfig) -> SequenceInputs:
        """Validates the prompt batch and left-pads it to its bucket (the batch the sampler actually runs)."""
        num_prompts, length = validate_prompts(prompts)
        num_prompts *= jax.process_count()  # host prompts are this process's share of the global batch
        rows = num_prompts * config.group_size
        if rows % self.layout.num_shards:
            raise ValueError(
                f"{num_prompts} prompts x group_size {config.group_size} = {rows} rows do not divide over the "
                f"{self.layout.num_shards} batch shards of mesh axes {self.layout.axes}; change the prompt batch "
                "size or the group size"
            )
        return left_pad(prompts, config.bucket_for(length), config.pad_id)

    def _place(self, prompts: SequenceInputs) -> SequenceInputs:
        """Puts prompt arrays on the mesh: batch-sharded when the prompt count divides, replicated otherwise.
        Host (numpy) rows are this process's share of the batch (`parallel.hosts`); "vision" laid out by block
        of rows (`models/image_shards.py`) is split like the rows, flat vision is replicated."""
        if self.layout.mesh is None:
            return jax.tree.map(jnp.asarray, prompts)
        mesh = self.layout.mesh
        num_prompts = prompts["input_ids"].shape[0] * jax.process_count()
        shard = num_prompts % self.layout.num_shards == 0
        if not shard and jax.process_count() > 1:
            raise ValueError(
                f"{num_prompts} prompts do not divide over the {self.layout.num_shards} batch shards; with several "
                "processes every prompt batch must (each process holds only its rows)"
            )

        def place(name: str, x: Any) -> Any:
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return x  # already a global array
            if not shard:
                return hosts.replicated(np.asarray(x), mesh)
            batch_axis = 1 if name == "positions" and jnp.ndim(x) == 3 else 0
            sharding = self.layout.sharding(jnp.ndim(x), batch_axis)
            if hosts.is_multiprocess():
                return hosts.global_rows(np.asarray(x), mesh, batch_axis=batch_axis, sharding=sharding)
            return jax.device_put(x, sharding)

        out = {name: jax.tree.map(lambda x, n=name: place(n, x), value) for name, value in prompts.items()
               if name != "vision"}
        if prompts.get("vision") is not None:
            out["vision"] = place_vision(prompts["vision"], mesh, sharding=self.layout.sharding)
        return out

    # -- the two stages ---------------------------------------------------------------------------------------
    def mesh_context(self) -> Any:
        """The mesh context the stages trace and run under: the sampler's mesh (the models pin activation rows
        to its batch axes, `layers.constrain_batch`), whatever mesh the caller has set."""
        return contextlib.nullcontext() if self.layout.mesh is None else jax.set_mesh(self.layout.mesh)

    def prefill(self, state: nnx.State, prompts: SequenceInputs, config: SamplerConfig) -> DecodeStart:
        """Stage 1 on a prepared (bucketed) prompt batch."""
        placed = self._place(prompts)
        with self.mesh_context():
            return self._prefill(state, placed, graphdef=self.graphdef, config=config, layout=self.layout)

    def decode(self, state: nnx.State, start: DecodeStart, config: SamplerConfig, key: Array) -> Rollout:
        """Stage 2; `start.cache` is donated (its buffers are invalid afterwards)."""
        if self.layout.mesh is not None:  # the caller's key may live on another mesh of the same devices
            replicated = NamedSharding(self.layout.mesh, PartitionSpec())
            if isinstance(key, jax.Array) and not key.is_fully_addressable:  # a global key of another mesh
                key = jax.jit(lambda k: k, out_shardings=replicated)(key)
            elif hosts.is_multiprocess():  # a process-local key (every process makes the same one)
                key = hosts.replicated(key, self.layout.mesh)
            else:
                key = jax.device_put(key, replicated)
        with self.mesh_context():
            rollout, _ = self._decode(
                state,
                start.cache,
                start.logits,
                start.start_positions,
                key,
                graphdef=self.graphdef,
                config=config,
                layout=self.layout,
            )
        return rollout

    def __call__(self, state: nnx.State, prompts: SequenceInputs, config: SamplerConfig, key: Array) -> Rollout:
        """P prompts -> Rollout of P * G rows; deterministic given `key`."""
        start = self.prefill(state, self.prepare_prompts(prompts, config), config)
        return self.decode(state, start, config, key)


def place_vision(vision: Any, mesh: Mesh, sharding: Any = None) -> Any:
    """Host vision inputs -> global arrays on `mesh`: blocks of rows (`image_shards.is_sharded`) split like the
    rows (`hosts.global_blocks`; `sharding(ndim)` for a layout's own batch axes; replicated when the blocks do
    not divide over them), flat inputs replicated (every process must then hold the same ones). Inputs already
    global pass through."""
    if all(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(vision)):
        return vision
    if image_shards.is_sharded(vision):
        return hosts.global_blocks(vision, mesh, sharding=sharding)
    return hosts.replicated(jax.tree.map(np.asarray, vision), mesh)
