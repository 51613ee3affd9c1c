"""Ahead-of-time compilation of the RL step's programs for a TPU or GPU target, on a machine without one.

    python -m balcap_jax.tools.aot --config=configs/qwen7b.py --target=tpu:v5p:4x4x2 [--config.x=...] [--json=FILE]
    python -m balcap_jax.tools.aot --config=configs/qwen7b.py --target=gpu:h100:1x2x8
    python -m balcap_jax.tools.aot --target=local          # the embedded default on this process's (CPU) devices

Targets (tools/aot_targets.py): tpu:<topology> (libtpu: `pip install 'balcap_jax[aot-tpu]'`),
gpu:<h100|h200>:<slices>x<hosts>x<gpus> (CUDA plugin: `balcap_jax[aot-gpu]`), and local: the devices this process
has, a quick check of shapes and shardings whose memory figures are XLA:CPU's plan, not an accelerator's.

What is compiled is what `trainer/loop.py` runs, built by the same code: the update step from
`builders.rl_update_step`, the rollout programs from the `Sampler`'s own jits (prefill + tile, while_loop decode),
and the training -> sampling weight reshard + cast (`placement.rollout_copy`, the loop's `for_sampling`: the very
jitted program the loop calls). Inputs are
sharded `jax.ShapeDtypeStruct`s on the recipe's mesh over the target's devices (no weight is ever allocated for a
released checkpoint; a from-scratch recipe builds its small policy as the loop does, vocabulary included).

Per chip, each program reports XLA's arguments, outputs, aliased (outputs reusing donated inputs), temp, the peak
`arguments + outputs - aliased + temp` (XLA's own estimate beside it), compile seconds and FLOPs (TPU only: XLA:GPU
gives no cost analysis; XLA counts a loop body once, so a scanned layer stack's layers, decode's tokens and
micro-batches are not multiplied in). Between programs the chip also holds what the running program does not
take as an argument: the train state while sampling, the optimizer state during the reshard. The verdict
compares the largest phase with the chip's HBM less a headroom (runtime reservations, fragmentation).

Depth: `--depth=text,vision` compiles a shallower policy of otherwise identical shapes (for hosts where a
full-depth compile is too slow); the report says which depth it compiled, and nothing is extrapolated from it.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Deviceless compiles need no accelerator runtime (and none exists here); both must precede importing jax.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        _xla_flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (_xla_flags + " --xla_force_host_platform_device_count=8").strip()

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from balcap_jax.models import image_shards, registry
from balcap_jax.models.attention import with_attention
from balcap_jax.parallel import hosts
from balcap_jax.parallel.mesh import BATCH_AXES
from balcap_jax.rl import update as update_lib
from balcap_jax.sampling.sampler import Sampler
from balcap_jax.tools.aot_targets import GIB, TargetSpec, host_count, parse_target, target_devices
from balcap_jax.trainer import builders, placement
from balcap_jax.trainer.policy import Policy

# ---------------------------------------------------------------------------------------------------------------
# The recipe's model


def _qwen_release(name: str):
    def build():
        from balcap_jax.models.qwen2_5_vl.config import RELEASED_CONFIGS, Qwen2_5_VLConfig

        return Qwen2_5_VLConfig.from_hf(RELEASED_CONFIGS[name])

    return build


def _llava_7b():
    from balcap_jax.models.llava.config import llava_1_5_7b

    return llava_1_5_7b()


@dataclasses.dataclass(frozen=True)
class Release:
    """A released checkpoint a recipe can name in `config.model.release` (used when `model.hf_dir` holds no
    config.json). eos_ids / pad_id: its tokenizer's (they are constants of the rollout programs, nothing more)."""

    family: str
    build: Callable[[], Any]
    eos_ids: tuple[int, ...]
    pad_id: int


_QWEN_IDS = dict(eos_ids=(151645, 151643), pad_id=151643)  # <|im_end|>, <|endoftext|>
RELEASES: dict[str, Release] = {
    "Qwen2.5-VL-3B-Instruct": Release("qwen2_5_vl", _qwen_release("Qwen2.5-VL-3B-Instruct"), **_QWEN_IDS),
    "Qwen2.5-VL-7B-Instruct": Release("qwen2_5_vl", _qwen_release("Qwen2.5-VL-7B-Instruct"), **_QWEN_IDS),
    "llava-1.5-7b-hf": Release("llava", _llava_7b, eos_ids=(2,), pad_id=32001),
}

# Qwen2.5-VL: one patch is 14 x 14 pixels, one language-model token is a 2 x 2 merge unit of patches.
_QWEN_PATCH_PIXELS = 14 * 14
_QWEN_MERGE_UNIT = 4
# Text tokens of the captioning prompt around the image placeholders (system turn, instruction, vision
# start/end, assistant header), with slack: the prompt bucket must hold image tokens + this.
PROMPT_TEXT_TOKENS = 64


def model_config_for(config: Any) -> tuple[registry.ModelFamily, Any]:
    """(family, model config) of a real-scale recipe: from `model.hf_dir`'s config.json when it exists, else from
    the released checkpoint named by `model.release`."""
    hf_dir = str(config.model.get("hf_dir", "") or "")
    if hf_dir and (Path(hf_dir).expanduser() / "config.json").is_file():
        from balcap_jax.models.hf_io import read_hf_config

        hf = read_hf_config(Path(hf_dir).expanduser())
        family = registry.family_for_hf_config(hf)
        return family, family.config_from_hf(hf)
    release = _release(config)
    return registry.get(release.family), release.build()


def _release(config: Any) -> Release:
    name = str(config.model.get("release", "") or "")
    hf_dir = str(config.model.get("hf_dir", "") or "")
    if name not in RELEASES:
        raise ValueError(
            f"config.model.release={name!r} is not a known release and config.model.hf_dir={hf_dir!r} holds no "
            f"config.json; set model.release to one of {sorted(RELEASES)} or model.hf_dir to a local checkpoint"
        )
    release = RELEASES[name]
    if release.family != config.model.name:
        raise ValueError(
            f"config.model.release={name!r} is a {release.family!r} model but config.model.name={config.model.name!r}"
        )
    return release


def with_depth(model_config: Any, text_layers: int, vision_layers: int) -> Any:
    """The same model with `text_layers` decoder layers and `vision_layers` vision blocks (all else equal).

    Qwen2.5-VL keeps its full-attention vision blocks at the same period (every 8th block in the releases),
    so a shallow tower has the released mix of windowed and full blocks as closely as its depth allows.
    """
    if text_layers < 1 or vision_layers < 1:
        raise ValueError(f"--depth must be >= 1 layer each; got text={text_layers}, vision={vision_layers}")
    text = dataclasses.replace(model_config.text, num_layers=text_layers)
    vision = model_config.vision
    if hasattr(vision, "fullatt_block_indexes"):
        full = tuple(vision.fullatt_block_indexes)
        period = (full[1] - full[0]) if len(full) > 1 else vision.depth
        indexes = tuple(i for i in range(vision_layers) if i % period == period - 1) or (vision_layers - 1,)
        vision = dataclasses.replace(vision, depth=vision_layers, fullatt_block_indexes=indexes)
    else:  # CLIP: the feature layer (-2) needs at least two layers
        vision = dataclasses.replace(vision, num_hidden_layers=max(vision_layers, 2))
    return dataclasses.replace(model_config, text=text, vision=vision)


def model_depth(model_config: Any) -> tuple[int, int]:
    """(decoder layers, vision blocks)."""
    vision = model_config.vision
    return model_config.text.num_layers, getattr(vision, "depth", getattr(vision, "num_hidden_layers", 0))


def _from_scratch(config: Any) -> bool:
    return not str(config.model.get("hf_dir", "") or "") and not str(config.model.get("release", "") or "")


def recipe_policy(config: Any, *, depth: tuple[int, int] | None = None, workdir: str | None = None) -> Policy:
    """The policy the loop would train, with abstract (ShapeDtypeStruct) weights for real-scale recipes.

    Real-scale (model.hf_dir / model.release): the family's model class on the checkpoint's config, built under
    `nnx.eval_shape` (no weight exists). From scratch (model.tiny): `build_policy` exactly as the loop calls it,
    on the recipe's ShapesWorld corpus prepared under `workdir` (its vocabulary fixes the embedding shapes)."""
    if _from_scratch(config):
        if depth is not None:
            raise ValueError("--depth applies to released checkpoints; set config.model.tiny.num_hidden_layers / "
                             "vision_depth for a from-scratch recipe")
        from balcap_jax.trainer.data_sources import corpus_texts, prepare_data
        from balcap_jax.trainer.policy import build_policy

        workdir = workdir or tempfile.mkdtemp(prefix="balcap_aot_")
        train, _ = prepare_data(config, Path(workdir))
        return build_policy(config, corpus=corpus_texts(train), seed=int(config.seed))
    family, model_config = model_config_for(config)
    if depth is not None:
        model_config = with_depth(model_config, *depth)
    model_config = with_attention(model_config, config.model.get("attention", "reference"))
    dtype, param_dtype = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
    remat = config.model.get("remat", False)
    model = nnx.eval_shape(lambda: family.model_class(model_config, rngs=nnx.Rngs(0), dtype=dtype,
                                                      param_dtype=param_dtype, remat=remat))
    release = RELEASES.get(str(config.model.get("release", "") or ""))
    eos_ids, pad_id = (release.eos_ids, release.pad_id) if release else ((0,), 0)
    return Policy(family, model_config, model, tokenizer=None, image_config=None, vocab=None, eos_id=eos_ids[0],
                  pad_id=pad_id, extra_eos_ids=eos_ids[1:])


# ---------------------------------------------------------------------------------------------------------------
# Inputs as the loop places them (sharded ShapeDtypeStructs)


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """Static shapes of one RL step as the loop runs it.

    prompts: P images per batch, one prompt each; sequences: N = P * G rows of the update. prompt_length: T_p, the
    largest prompt bucket. completion_length: T_c = sampling.max_new_tokens. patches_per_image: the vision
    tower's patches of the largest image (Qwen: max_pixels / 14²; LLaVA: 0, fixed crops).
    """

    prompts: int
    group_size: int
    prompt_length: int
    completion_length: int
    patches_per_image: int = 0

    @property
    def sequences(self) -> int:
        return self.prompts * self.group_size

    @property
    def total_length(self) -> int:
        return self.prompt_length + self.completion_length


def step_shapes(config: Any, policy: Policy) -> StepShapes:
    """The step's shapes implied by the recipe's data/sampling fields; raises naming the field to change."""
    prompt_length = int(max(config.data.prompt_buckets))
    if policy.family.name == "qwen2_5_vl":
        patches = int(config.data.max_pixels) // _QWEN_PATCH_PIXELS
        image_tokens = patches // _QWEN_MERGE_UNIT
    else:
        patches, image_tokens = 0, int(policy.model_config.image_seq_length)
    if image_tokens + PROMPT_TEXT_TOKENS > prompt_length:
        raise ValueError(
            f"config.data.prompt_buckets={tuple(config.data.prompt_buckets)}: the largest bucket ({prompt_length}) "
            f"cannot hold an image's {image_tokens} placeholder tokens plus ~{PROMPT_TEXT_TOKENS} text tokens; add a "
            f"bucket >= {image_tokens + PROMPT_TEXT_TOKENS} or lower data.max_pixels"
        )
    return StepShapes(
        prompts=int(config.data.prompts_per_batch), group_size=int(config.sampling.group_size),
        prompt_length=prompt_length, completion_length=int(config.sampling.max_new_tokens), patches_per_image=patches,
    )


def _struct(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _rows(mesh: Mesh, shape: Sequence[int], dtype: Any, batch_dim: int = 0) -> jax.ShapeDtypeStruct:
    """A batch array split over the batch axes (`hosts.global_rows`)."""
    spec = [None] * len(shape)
    spec[batch_dim] = BATCH_AXES
    return _struct(shape, dtype, NamedSharding(mesh, P(*spec)))


def _replicated(mesh: Mesh, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    return _struct(shape, dtype, NamedSharding(mesh, P()))


def vision_structs(policy: Policy, shapes: StepShapes, mesh: Mesh, *, repeats: int, micro_batches: int = 1,
                   sharding: Any = None) -> dict[str, Any]:
    """The vision inputs of the step's P prompts (each prompt's `repeats` rows) as `sampling.sampler.place_vision`
    puts them for the update and the rollouts: one block of rows per batch shard of `mesh` x micro-batch
    (`hosts.row_blocks`), each holding its prompts' images once, padded to the bucket of its largest images (Qwen) or its most crops
    (LLaVA); blocks split over the batch axes (`sharding(ndim)`, default `_rows`), replicated when they do not
    divide over them."""
    rows = shapes.prompts * repeats
    blocks = hosts.row_blocks(mesh, rows, micro_batches=micro_batches)
    plan = image_shards.plan_row_shards(shapes.prompts, repeats, blocks)
    images = max(shard.stop - shard.first for shard in plan)  # one image per prompt
    runs = max(int(shard.rows.sum()) for shard in plan)
    vision = policy.model_config.vision
    if policy.family.name == "qwen2_5_vl":
        from balcap_jax.models.qwen2_5_vl.vision_host import DEFAULT_PATCH_BUCKETS, choose_bucket, empty_vision_inputs

        padded = choose_bucket(images * shapes.patches_per_image, DEFAULT_PATCH_BUCKETS,
                               multiple=vision.window_patches)
        max_repeats = max(int(shard.rows.max()) for shard in plan)
        # Host numpy for one block: its shapes are every block's.
        layout = {k: (v.shape, v.dtype) for k, v in empty_vision_inputs(vision, padded, repeats=max_repeats).items()}
    else:
        layout = {"pixel_values": ((images, vision.image_size, vision.image_size, 3), np.float32),
                  "image_index": ((runs,), np.int32)}
    layout[image_shards.IMAGES_PER_SHARD] = ((), np.int32)

    def place(shape, dtype):
        full = (blocks, *shape)
        split = sharding(len(full)) if sharding is not None else _rows(mesh, full, dtype).sharding
        if blocks % hosts.leading_shards(split):
            return _replicated(mesh, full, dtype)
        return _struct(full, dtype, split)

    return {key: place(shape, dtype) for key, (shape, dtype) in layout.items()}


def _positions(policy: Policy, rows: int, length: int, mesh: Mesh, *, sharded: bool) -> jax.ShapeDtypeStruct:
    mrope = policy.family.name == "qwen2_5_vl"
    shape = (3, rows, length) if mrope else (rows, length)
    if not sharded:
        return _replicated(mesh, shape, jnp.int32)
    return _rows(mesh, shape, jnp.int32, batch_dim=1 if mrope else 0)


def update_batch_structs(policy: Policy, shapes: StepShapes, mesh: Mesh, micro_batches: int = 1) -> dict[str, Any]:
    """The update batch of `RLStep` (`build_training_batch` + advantages, placed by `placement.place_batch`); its
    images in blocks of the batch shards x `micro_batches` (`train.micro_batches`)."""
    n, t, tc = shapes.sequences, shapes.total_length, shapes.completion_length
    return {
        "input_ids": _rows(mesh, (n, t), jnp.int32),
        "attention_mask": _rows(mesh, (n, t), bool),
        "positions": _positions(policy, n, t, mesh, sharded=True),
        "completion_ids": _rows(mesh, (n, tc), jnp.int32),
        "completion_mask": _rows(mesh, (n, tc), bool),
        "old_logprobs": _rows(mesh, (n, tc), jnp.float32),
        "vision": vision_structs(policy, shapes, mesh, repeats=shapes.group_size, micro_batches=micro_batches),
        "advantages": _rows(mesh, (n,), jnp.float32),
    }


def prompt_structs(policy: Policy, shapes: StepShapes, mesh: Mesh, sampler: Sampler) -> dict[str, Any]:
    """The sampler's prefill input as `Sampler._place` lays it out: P prompt rows split over the batch axes when
    P divides them, replicated otherwise (e.g. 16 prompts on a 32-chip FSDP mesh); vision in blocks of rows."""
    p, t = shapes.prompts, shapes.prompt_length
    sharded = p % sampler.layout.num_shards == 0
    place = (lambda shape, dtype: _rows(mesh, shape, dtype)) if sharded else (
        lambda shape, dtype: _replicated(mesh, shape, dtype))
    return {
        "input_ids": place((p, t), jnp.int32),
        "attention_mask": place((p, t), bool),
        "positions": _positions(policy, p, t, mesh, sharded=sharded),
        "vision": vision_structs(policy, shapes, mesh, repeats=1, sharding=sampler.layout.sharding),
    }


def abstract_params(params: Any, shardings: Any) -> Any:
    """Param state (concrete or abstract) -> ShapeDtypeStructs carrying `shardings`."""
    return jax.tree.map(lambda leaf, s: _struct(leaf.shape, leaf.dtype, s), params, shardings)


def train_state_structs(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh) -> update_lib.TrainState:
    """`TrainState.create(params, optimizer)` as the loop places it: every param-shaped optimizer leaf (Adam's
    moments) in its param's layout (`zeros_like` keeps the sharding), counters replicated (`hosts.globalize`)."""
    state = jax.eval_shape(lambda p: update_lib.TrainState.create(p, optimizer), params)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
    replicated = NamedSharding(mesh, P())
    opt_state = optax.tree_map_params(
        optimizer,
        lambda leaf, sharding: _struct(leaf.shape, leaf.dtype, sharding),
        state.opt_state,
        shardings,
        transform_non_params=lambda leaf: _struct(leaf.shape, leaf.dtype, replicated),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    counter = _replicated(mesh, (), jnp.int32)
    return update_lib.TrainState(params=params, opt_state=opt_state, step=counter, skipped_steps=counter)


def per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a pytree of sharded ShapeDtypeStructs (its shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


# ---------------------------------------------------------------------------------------------------------------
# Reports


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """Per-chip figures of one compiled program (XLA's `memory_analysis()` / `cost_analysis()`).

    peak_bytes: `arguments + outputs - aliased + temp`, every buffer of XLA's plan live at once (an upper bound
    of that plan), the figure the verdict uses. xla_peak_bytes: the compiler's own peak estimate, shown beside it
    but not trusted: XLA:TPU and XLA:CPU report values below their own temp size for some programs (while-loop
    decode, the update), so it is no bound. flops: None where the compiler gives no cost analysis (XLA:GPU)."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    xla_peak_bytes: int
    compile_seconds: float
    flops: float | None

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"peak_bytes": self.peak_bytes}


def program_report(name: str, compiled: Any, seconds: float) -> ProgramReport:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"the compiler for {name!r} gives no memory_analysis()")
    try:
        cost = compiled.cost_analysis()
    except Exception:  # XLA:GPU raises or returns nothing: "no cost analysis", not an error of the tool
        cost = None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = float(cost["flops"]) if isinstance(cost, Mapping) and "flops" in cost else None
    return ProgramReport(
        name=name,
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        generated_code_bytes=int(stats.generated_code_size_in_bytes),
        xla_peak_bytes=int(getattr(stats, "peak_memory_in_bytes", 0) or 0),
        compile_seconds=seconds,
        flops=flops,
    )


@dataclasses.dataclass(frozen=True)
class Resident:
    """Per-chip bytes of what lives between programs: params (training layout), optimizer state, the rollout
    copy of the weights (sampling layout, bf16 in bf16 recipes; from the reshard until decode ends: the loop
    drops it before the update), the decode KV cache."""

    params: int
    opt_state: int
    rollout_weights: int
    kv_cache: int

    @property
    def train_state(self) -> int:
        return self.params + self.opt_state

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self) | {"train_state": self.train_state}


# Per phase: the resident bytes held besides the program's own arguments / outputs / temp.
_OUTSIDE: dict[str, Callable[[Resident], int]] = {
    "reshard": lambda r: r.opt_state,  # params are the reshard's argument, the rollout copy its output
    "prefill": lambda r: r.train_state,  # rollout weights are arguments, the KV cache an output
    "decode": lambda r: r.train_state,  # rollout weights and the (donated) cache are arguments
    "update": lambda r: 0,  # the train state is its (donated) argument; the rollout copy is gone
}


@dataclasses.dataclass(frozen=True)
class AotReport:
    target: TargetSpec
    chips: int
    hosts: int
    mesh: dict[str, int]
    depth: tuple[int, int]
    full_depth: tuple[int, int]
    programs: dict[str, ProgramReport]
    resident: Resident
    headroom: float

    @property
    def budget_bytes(self) -> int:
        return int(self.target.hbm_bytes * (1.0 - self.headroom))

    def phase_bytes(self) -> dict[str, int]:
        """Per chip while each program runs: its peak + what stays resident outside it."""
        return {name: p.peak_bytes + _OUTSIDE[name](self.resident) for name, p in self.programs.items()}

    @property
    def fits(self) -> bool:
        return max(self.phase_bytes().values()) <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.text, "kind": self.target.kind, "chips": self.chips, "hosts": self.hosts,
            "mesh": self.mesh, "depth": list(self.depth), "full_depth": list(self.full_depth),
            "hbm_bytes": self.target.hbm_bytes, "headroom": self.headroom, "budget_bytes": self.budget_bytes,
            "programs": {name: p.to_dict() for name, p in self.programs.items()},
            "resident_bytes": self.resident.to_dict(), "phase_bytes": self.phase_bytes(), "fits": self.fits,
        }

    def table(self) -> str:
        g = lambda n: f"{n / GIB:.3f}"  # noqa: E731
        depth = f"{self.depth}" + ("" if self.depth == self.full_depth else f" of {self.full_depth} (reduced)")
        phases = self.phase_bytes()
        lines = [
            f"target {self.target.label}: {self.chips} chips on {self.hosts} host(s), mesh {self.mesh}, "
            f"depth (text, vision) {depth}",
            "",
            "| program | arguments | outputs | aliased | temp | peak | (XLA's peak) | + resident | phase total | TFLOP "
            "| compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, p in self.programs.items():
            flops = "n/a" if p.flops is None else f"{p.flops / 1e12:.2f}"
            lines.append(
                f"| {name} | {g(p.argument_bytes)} | {g(p.output_bytes)} | {g(p.alias_bytes)} | {g(p.temp_bytes)} "
                f"| {g(p.peak_bytes)} | ({g(p.xla_peak_bytes)}) | {g(_OUTSIDE[name](self.resident))} "
                f"| **{g(phases[name])}** | {flops} "
                f"| {p.compile_seconds:.1f} |"
            )
        r = self.resident
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines += [
            "",
            f"GiB per chip. Resident between programs: params {g(r.params)}, optimizer state {g(r.opt_state)}, "
            f"rollout weights {g(r.rollout_weights)}, KV cache {g(r.kv_cache)}.",
            f"Verdict: {verdict}: largest phase {g(max(phases.values()))} GiB vs {g(self.target.hbm_bytes)} GiB HBM "
            f"less {self.headroom:.0%} headroom = {g(self.budget_bytes)} GiB.",
        ]
        if self.target.kind == "local":
            lines.append("(local target: XLA:CPU's memory plan on this process's devices, a quick check only.)")
        if any(p.flops is not None for p in self.programs.values()):
            lines.append("(TFLOP per chip as XLA counts them: a loop body (scanned layer stack, decode's while "
                         "loop, micro-batch scan) is counted once.)")
        if self.target.kind == "gpu":
            lines.append("(XLA:GPU does not fail when memory runs out: the verdict above is the check.)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Compiling the loop's programs


PROGRAMS = ("reshard", "prefill", "decode", "update")


@dataclasses.dataclass
class RecipePrograms:
    """The loop's programs for one recipe on one mesh, ready to lower: built once, lowered per program."""

    config: Any
    policy: Policy
    mesh: Mesh
    graphdef: Any
    train_state: update_lib.TrainState
    rollout_params: Any
    shapes: StepShapes
    sampler: Sampler
    for_sampling: Any  # trainer.rollout_weights.RolloutWeights: the loop's reshard program

    @classmethod
    def build(cls, config: Any, devices: Sequence[jax.Device], *, depth: tuple[int, int] | None = None,
              workdir: str | None = None) -> "RecipePrograms":
        policy = recipe_policy(config, depth=depth, workdir=workdir)
        mesh = builders.mesh(config, devices)
        graphdef, params = nnx.split(policy.model)
        training = abstract_params(params, placement.param_shardings(policy.family, params, mesh, "training"))
        for_sampling = placement.rollout_copy(config, policy, training, mesh)
        rollout = for_sampling.abstract(training)
        optimizer, _ = builders.rl_optimizer(config)
        shapes = step_shapes(config, policy)
        batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if shapes.sequences % batch_shards:
            raise ValueError(
                f"{shapes.sequences} sequences (data.prompts_per_batch * sampling.group_size) do not divide over the "
                f"{batch_shards} batch shards of mesh {dict(mesh.shape)}; change data.prompts_per_batch or config.mesh"
            )
        return cls(config, policy, mesh, graphdef, train_state_structs(training, optimizer, mesh), rollout, shapes,
                   Sampler(graphdef, mesh=for_sampling.mesh, cache_heads=for_sampling.cache_heads,
                           cache_rows=for_sampling.cache_rows), for_sampling)

    @property
    def sampler_config(self):
        return builders.sampler_config(self.config, self.policy)

    def _statics(self) -> dict[str, Any]:
        return dict(graphdef=self.graphdef, config=self.sampler_config, layout=self.sampler.layout)

    def lower_update(self) -> Any:
        """`builders.rl_update_step` (the loop's `rl_update`) lowered on the train state and the update batch."""
        step = builders.rl_update_step(self.graphdef, self.config)
        with jax.set_mesh(self.mesh):
            batch = update_batch_structs(self.policy, self.shapes, self.mesh, int(self.config.train.micro_batches))
            return step.lower(self.train_state, batch)

    def lower_reshard(self) -> Any:
        """The loop's `for_sampling` (`placement.rollout_copy`): training params -> the rollout copy."""
        with jax.set_mesh(self.mesh):
            return self.for_sampling.program.lower(self.train_state.params)

    def prompts(self) -> dict[str, Any]:
        """The prompt batch on the sampler's mesh (the rollout copy's `sampling_mesh`), as `Sampler._place` puts it."""
        return prompt_structs(self.policy, self.shapes, self.sampler.layout.mesh, self.sampler)

    def compile_prefill(self) -> tuple[Any, float]:
        """The Sampler's own prefill jit, compiled on the rollout weights and the prompt batch."""
        program = self.sampler._prefill  # the CountingJit the loop's `sampler.prefill` calls
        with self.sampler.mesh_context():
            compiled = program.compiled_variant(self.rollout_params, self.prompts(), **self._statics())
        return compiled, program.stats.last_seconds

    def decode_inputs(self) -> tuple[Any, ...]:
        """decode's arguments as the loop passes them: prefill's outputs, with the shardings prefill pins them to
        (`BatchLayout.constrain*`: rows over the batch axes), and the step's replicated rng key."""
        from balcap_jax.sampling.sampler import prefill_and_tile

        statics, layout = self._statics(), self.sampler.layout
        with self.sampler.mesh_context():
            start = jax.eval_shape(lambda p, x: prefill_and_tile(p, x, **statics), self.rollout_params,
                                   self.prompts())

        def rows(leaf, batch_axis=0):
            return _struct(leaf.shape, leaf.dtype, layout.sharding(len(leaf.shape), batch_axis))

        def cache_part(leaf, batch_axis, head_axis=None):
            return _struct(leaf.shape, leaf.dtype, layout.cache_sharding(len(leaf.shape), batch_axis, head_axis))

        cache = start.cache.replace(
            k=cache_part(start.cache.k, 1, 3), v=cache_part(start.cache.v, 1, 3),
            valid=cache_part(start.cache.valid, 0),
            index=_replicated(layout.mesh, start.cache.index.shape, start.cache.index.dtype),
        )
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = _struct(key.shape, key.dtype, NamedSharding(layout.mesh, P()))  # `Sampler.decode` puts it there
        return cache, rows(start.logits), rows(start.start_positions), key

    def compile_decode(self) -> tuple[Any, float]:
        """The Sampler's own decode jit (while_loop, donated KV cache)."""
        program = self.sampler._decode
        cache, logits, starts, key = self.decode_inputs()
        with self.sampler.mesh_context():
            compiled = program.compiled_variant(self.rollout_params, cache, logits, starts, key, **self._statics())
        return compiled, program.stats.last_seconds

    def resident(self) -> Resident:
        cache, *_ = self.decode_inputs()
        return Resident(
            params=per_chip_bytes(self.train_state.params),
            opt_state=per_chip_bytes((self.train_state.opt_state, self.train_state.step,
                                      self.train_state.skipped_steps)),
            rollout_weights=per_chip_bytes(self.rollout_params),
            kv_cache=per_chip_bytes(cache),
        )

    def compile(self, name: str) -> ProgramReport:
        if name in ("prefill", "decode"):
            compiled, seconds = self.compile_prefill() if name == "prefill" else self.compile_decode()
            return program_report(name, compiled, seconds)
        lower = {"update": self.lower_update, "reshard": self.lower_reshard}[name]
        start = time.perf_counter()
        compiled = lower().compile()
        return program_report(name, compiled, time.perf_counter() - start)


def run_target(
    config: Any,
    target: TargetSpec,
    *,
    depth: tuple[int, int] | None = None,
    programs: Sequence[str] = PROGRAMS,
    headroom: float = 0.1,
    workdir: str | None = None,
    echo: Callable[[str], None] = lambda _: None,
) -> AotReport:
    """Compiles `programs` of the recipe for `target` and returns the per-chip report."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"--programs: unknown {unknown}; choose from {list(PROGRAMS)}")
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"--headroom={headroom}: a fraction of HBM kept free, in [0, 1)")
    devices = target_devices(target)
    recipe = RecipePrograms.build(config, devices, depth=depth, workdir=workdir)
    reports = {}
    for name in programs:
        echo(f"compiling {name} for {target.text} ...")
        reports[name] = recipe.compile(name)
        echo(f"  {name}: peak {reports[name].peak_bytes / GIB:.2f} GiB/chip, {reports[name].compile_seconds:.1f} s")
    model_config = recipe.policy.model_config
    full = model_depth(model_config_for(config)[1]) if not _from_scratch(config) else model_depth(model_config)
    return AotReport(
        target=target, chips=len(devices), hosts=host_count(devices),
        mesh={k: int(v) for k, v in recipe.mesh.shape.items()},
        depth=model_depth(model_config), full_depth=full, programs=reports, resident=recipe.resident(),
        headroom=headroom,
    )


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_depth(text: str) -> tuple[int, int] | None:
    """'' -> None (the model's own depth); 'T,V' -> (T, V)."""
    if not text:
        return None
    try:
        text_layers, vision_layers = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(
            f"--depth={text!r}: give decoder layers and vision blocks as 'T,V', e.g. --depth=2,2"
        ) from None
    return text_layers, vision_layers


def main(argv: Sequence[str]) -> int:
    from absl import flags

    del argv
    f = flags.FLAGS
    target = parse_target(f.target, local_hbm_bytes=int(f.hbm_gib * GIB) if f.hbm_gib else 80 * 10**9)
    if f.hbm_gib:
        target = dataclasses.replace(target, hbm_bytes=int(f.hbm_gib * GIB))
    report = run_target(
        f.config, target, depth=parse_depth(f.depth), programs=tuple(p for p in f.programs.split(",") if p),
        headroom=f.headroom, workdir=f.workdir, echo=lambda s: print(s, flush=True),
    )
    print(report.table())
    if f.json:
        Path(f.json).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {f.json}")
    return 0 if report.fits else 1


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "default_config.py")
    config_flags.DEFINE_config_file("config", default, "Recipe file with get_config().", lock_config=True)
    flags.DEFINE_string("target", "local", "tpu:<topology> | gpu:<h100|h200>:<slices>x<hosts>x<gpus> | local")
    flags.DEFINE_string("json", "", "Also write the report as JSON to this file.")
    flags.DEFINE_string("depth", "", "Compile 'T,V' decoder layers / vision blocks instead of the model's own.")
    flags.DEFINE_string("programs", ",".join(PROGRAMS), f"Comma-separated subset of {','.join(PROGRAMS)}.")
    flags.DEFINE_float("headroom", 0.1, "Fraction of HBM kept free for the runtime (the verdict's margin).")
    flags.DEFINE_float("hbm_gib", 0.0, "Override the chip's HBM (GiB); for local, the budget (default 80 GB).")
    flags.DEFINE_string("workdir", None, "From-scratch recipes: where their corpus is prepared (default: a temp dir).")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
