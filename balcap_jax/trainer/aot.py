"""Ahead-of-time compilation of a recipe's RL update step with abstract shapes: per-device memory, no weights.

    report = full_depth_estimate(get_config())     # configs/qwen7b.py, on the devices JAX sees (8 in tests)
    print(report.summary())                         # argument / output / temp / code bytes, peak estimate

Nothing here allocates a weight: the policy is built with `nnx.eval_shape`, the optimizer state with
`jax.eval_shape`, and both get the model family's *training* sharding layout (FSDP over `fsdp`, tensor-parallel
over `tensor`) on the recipe's mesh. The update step is the one the loop runs (`rl.update.make_update_step` on
`rl.policy_logprobs.make_log_prob_fn`), lowered on sharded `jax.ShapeDtypeStruct`s and compiled; XLA's
`memory_analysis()` of the partitioned program is per device.

Per-device figure: `peak = argument + output - alias + temp`: every input, output and temporary buffer of XLA's
plan counted as live at once, minus the outputs that reuse donated inputs (the train state is donated, so the
new params/optimizer state alias the old ones): an upper bound of that plan's live set.

Depth: a 7B step takes minutes to compile on a CPU, so `compile_update_step(..., depth=(text, vision))` compiles
a shallower policy of otherwise identical shapes, and `full_depth_estimate` extrapolates one such compile to the
full depth, per stack (decoder layers, vision blocks): state bytes exactly (abstract shapes); temp by each
layer's gradient + update buffer and, for rematerialised stacks, its checkpointed input. XLA:CPU's measured
per-layer temp is not usable for those stacks: its pipeline drops rematerialisation in unrolled layer loops
(barriers expanded, recomputation CSE'd into the forward pass), so it reports the no-remat footprint. Stacks
without remat use the slope XLA measures from a second compile. `extrapolate_by_depth` fits XLA's own slopes from
several compiles (the no-remat view). Caveats of CPU figures: experiments/results/memory.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from balcap_jax.models import registry
from balcap_jax.parallel.mesh import BATCH_AXES, MeshShape, make_mesh
from balcap_jax.rl import losses as losses_lib
from balcap_jax.rl import update as update_lib
from balcap_jax.rl.policy_logprobs import make_log_prob_fn

GIB = 1024**3


def _qwen_release(name: str):
    def build():
        from balcap_jax.models.qwen2_5_vl.config import RELEASED_CONFIGS, Qwen2_5_VLConfig

        return Qwen2_5_VLConfig.from_hf(RELEASED_CONFIGS[name])

    return build


def _llava_7b():
    from balcap_jax.models.llava.config import llava_1_5_7b

    return llava_1_5_7b()


# Released checkpoints whose shapes a recipe can name in `config.model.release` (used when `config.model.hf_dir`
# is unset or not on this machine). Values: (family name, () -> model config).
RELEASES: dict[str, tuple[str, Any]] = {
    "Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", _qwen_release("Qwen2.5-VL-3B-Instruct")),
    "Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", _qwen_release("Qwen2.5-VL-7B-Instruct")),
    "llava-1.5-7b-hf": ("llava", _llava_7b),
}

# Qwen2.5-VL: one patch is 14 x 14 pixels, one language-model token is a 2 x 2 merge unit of patches.
_QWEN_PATCH_PIXELS = 14 * 14
_QWEN_MERGE_UNIT = 4
# Text tokens of the captioning prompt around the image placeholders (system turn, instruction, vision
# start/end, assistant header), with slack: the prompt bucket must hold image tokens + this.
PROMPT_TEXT_TOKENS = 64


# ---------------------------------------------------------------------------------------------------------------
# What is compiled


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """Static shapes of one RL update, as the loop feeds `make_update_step`.

    sequences: B = prompts_per_batch * group_size rows. prompt_length: T_p, the largest prompt bucket (image
    placeholders included). completion_length: T_c = sampling.max_new_tokens. images: distinct images per batch
    (P). patches_per_image: vision-tower patches of the largest image (Qwen: max_pixels / 14²; LLaVA: unused).
    """

    sequences: int
    prompt_length: int
    completion_length: int
    images: int
    group_size: int
    patches_per_image: int = 0

    @property
    def total_length(self) -> int:
        return self.prompt_length + self.completion_length


def model_config_for(config: Any) -> tuple[registry.ModelFamily, Any]:
    """(family, model config) of a recipe: from `model.hf_dir`'s config.json when it exists, else from the
    released checkpoint named by `model.release`."""
    from pathlib import Path

    hf_dir = str(config.model.get("hf_dir", "") or "")
    if hf_dir and (Path(hf_dir).expanduser() / "config.json").is_file():
        from balcap_jax.models.hf_io import read_hf_config

        hf = read_hf_config(Path(hf_dir).expanduser())
        family = registry.family_for_hf_config(hf)
        return family, family.config_from_hf(hf)
    release = str(config.model.get("release", "") or "")
    if release not in RELEASES:
        raise ValueError(
            f"config.model.release={release!r} is not a known release and config.model.hf_dir={hf_dir!r} holds no "
            f"config.json; set model.release to one of {sorted(RELEASES)} or model.hf_dir to a local checkpoint"
        )
    name, build = RELEASES[release]
    if name != config.model.name:
        raise ValueError(
            f"config.model.release={release!r} is a {name!r} model but config.model.name={config.model.name!r}"
        )
    return registry.get(name), build()


def with_depth(model_config: Any, text_layers: int, vision_layers: int) -> Any:
    """The same model with `text_layers` decoder layers and `vision_layers` vision blocks (all else equal).

    Qwen2.5-VL keeps its full-attention vision blocks at the same period (every 8th block in the releases),
    so a shallow tower has the released mix of windowed and full blocks as closely as its depth allows.
    """
    if text_layers < 1 or vision_layers < 1:
        raise ValueError(f"depth must be >= 1 layer each; got text={text_layers}, vision={vision_layers}")
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


def step_shapes(config: Any, family: registry.ModelFamily, model_config: Any) -> StepShapes:
    """The update's shapes implied by the recipe's data/sampling fields; raises naming the field to change."""
    prompts, group = int(config.data.prompts_per_batch), int(config.sampling.group_size)
    prompt_length = int(max(config.data.prompt_buckets))
    if family.name == "qwen2_5_vl":
        patches = int(config.data.max_pixels) // _QWEN_PATCH_PIXELS
        image_tokens = patches // _QWEN_MERGE_UNIT
    else:
        patches, image_tokens = 0, int(model_config.image_seq_length)
    if image_tokens + PROMPT_TEXT_TOKENS > prompt_length:
        raise ValueError(
            f"config.data.prompt_buckets={tuple(config.data.prompt_buckets)}: the largest bucket ({prompt_length}) "
            f"cannot hold an image's {image_tokens} placeholder tokens plus ~{PROMPT_TEXT_TOKENS} text tokens; add a "
            f"bucket >= {image_tokens + PROMPT_TEXT_TOKENS} or lower data.max_pixels"
        )
    return StepShapes(
        sequences=prompts * group,
        prompt_length=prompt_length,
        completion_length=int(config.sampling.max_new_tokens),
        images=prompts,
        group_size=group,
        patches_per_image=patches,
    )


# ---------------------------------------------------------------------------------------------------------------
# Abstract state and batch


def abstract_model(family: registry.ModelFamily, model_config: Any, *, dtype: str, param_dtype: str, remat: bool):
    """The policy module with abstract (ShapeDtypeStruct) variables: built under `nnx.eval_shape`, no weight exists.

    remat=True also switches on submodules that support rematerialisation but whose parent does not forward the
    flag (Qwen2.5-VL's vision tower), so the compiled step is the one a remat run should execute.
    """

    def build():
        model = family.model_class(
            model_config, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), remat=remat
        )
        if remat:
            for _, module in nnx.iter_graph(model):
                if isinstance(module, nnx.Module) and hasattr(module, "remat"):
                    module.remat = True
        return model

    return nnx.eval_shape(build)


def abstract_policy(family: registry.ModelFamily, model_config: Any, *, dtype: str, param_dtype: str, remat: bool):
    """(graphdef, abstract param state) of `abstract_model`."""
    return nnx.split(abstract_model(family, model_config, dtype=dtype, param_dtype=param_dtype, remat=remat))


def _named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def abstract_train_state(
    params: Any, optimizer: optax.GradientTransformation, param_specs: Any, mesh: Mesh
) -> update_lib.TrainState:
    """`TrainState.create(params, optimizer)` as ShapeDtypeStructs with shardings: params and every
    param-shaped optimizer leaf (Adam's moments) in the params' layout, counters replicated."""
    from balcap_jax.parallel.sharding import abstract_with_shardings

    sharded_params = abstract_with_shardings(params, param_specs, mesh, on_indivisible="replicate")
    state = jax.eval_shape(lambda p: update_lib.TrainState.create(p, optimizer), params)
    param_sharding = jax.tree.map(lambda leaf: leaf.sharding, sharded_params)
    replicated = _named(mesh, P())

    def attach(leaf, sharding):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    opt_state = optax.tree_map_params(
        optimizer,
        attach,
        state.opt_state,
        param_sharding,
        transform_non_params=lambda leaf: attach(leaf, replicated),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return update_lib.TrainState(params=sharded_params, opt_state=opt_state, step=scalar, skipped_steps=scalar)


def _batch_struct(mesh: Mesh, shape: Sequence[int], dtype, batch_dim: int | None = 0) -> jax.ShapeDtypeStruct:
    spec = [None] * len(shape)
    if batch_dim is not None:
        spec[batch_dim] = BATCH_AXES
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=_named(mesh, P(*spec)))


def abstract_update_batch(
    family: registry.ModelFamily, model_config: Any, shapes: StepShapes, mesh: Mesh
) -> dict[str, Any]:
    """The update batch (`rl/update.py` layout) as sharded ShapeDtypeStructs: text arrays split over the batch
    axes; Qwen's vision inputs (one flat patch sequence, each image encoded once and its tokens gathered G
    times: `vision_host.prepare_vision_inputs(repeats=G)`) replicated; LLaVA's pixel_values one image per row,
    split like the batch."""
    b, t, tc = shapes.sequences, shapes.total_length, shapes.completion_length
    batch: dict[str, Any] = {
        "input_ids": _batch_struct(mesh, (b, t), jnp.int32),
        "attention_mask": _batch_struct(mesh, (b, t), bool),
        "completion_mask": _batch_struct(mesh, (b, tc), bool),
        "old_logprobs": _batch_struct(mesh, (b, tc), jnp.float32),
        "advantages": _batch_struct(mesh, (b,), jnp.float32),
    }
    if family.name == "qwen2_5_vl":
        from balcap_jax.models.qwen2_5_vl.vision_host import DEFAULT_PATCH_BUCKETS, choose_bucket

        vision = model_config.vision
        batch["positions"] = _batch_struct(mesh, (3, b, t), jnp.int32, batch_dim=1)
        patches = choose_bucket(
            shapes.images * shapes.patches_per_image, DEFAULT_PATCH_BUCKETS, multiple=vision.window_patches
        )
        tokens = shapes.group_size * patches // vision.merge_unit
        batch["vision"] = {
            "patches": _batch_struct(mesh, (patches, vision.patch_dim), jnp.float32, None),
            "window_segment_ids": _batch_struct(mesh, (patches,), jnp.int32, None),
            "full_segment_ids": _batch_struct(mesh, (patches,), jnp.int32, None),
            "rotary_cos": _batch_struct(mesh, (patches, vision.head_dim), jnp.float32, None),
            "rotary_sin": _batch_struct(mesh, (patches, vision.head_dim), jnp.float32, None),
            "inverse_window_index": _batch_struct(mesh, (tokens,), jnp.int32, None),
            "token_valid": _batch_struct(mesh, (tokens,), bool, None),
        }
    else:
        size = model_config.vision.image_size
        batch["positions"] = _batch_struct(mesh, (b, t), jnp.int32)
        batch["vision"] = {"pixel_values": _batch_struct(mesh, (b, size, size, 3), jnp.float32)}
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Memory report


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled program (XLA's `memory_analysis()` of the partitioned module).

    peak_bytes = argument + output - alias + temp (see the module docstring). extrapolated: the figures were
    fitted from reduced-depth compiles (`depths_compiled`) rather than read from one compile of this depth.
    """

    name: str
    devices: int
    mesh: dict[str, int]
    depth: tuple[int, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    compile_seconds: float
    extrapolated: bool = False
    depths_compiled: tuple[tuple[int, int], ...] = ()
    state_bytes: int = 0  # params + optimizer state, per device, from the abstract shapes (exact)
    notes: str = ""

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def fits(self, budget_bytes: float) -> bool:
        return self.peak_bytes <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["peak_bytes"] = self.peak_bytes
        return out

    def summary(self) -> str:
        g = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        how = f"extrapolated from depths {list(self.depths_compiled)}" if self.extrapolated else "compiled"
        return (
            f"{self.name} ({how}, depth text/vision={self.depth}, mesh {self.mesh}): per device "
            f"arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)}, aliased {g(self.alias_bytes)}, "
            f"temp {g(self.temp_bytes)}, code {self.generated_code_bytes / 2**20:.1f} MiB -> peak {g(self.peak_bytes)}"
        )


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def _report(name, compiled, mesh, depth, seconds, state_bytes) -> MemoryReport:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory_analysis() for compiled programs")
    return MemoryReport(
        name=name,
        devices=mesh.size,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        depth=depth,
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        generated_code_bytes=int(stats.generated_code_size_in_bytes),
        compile_seconds=seconds,
        state_bytes=state_bytes,
    )


# ---------------------------------------------------------------------------------------------------------------
# The update step


def optimizer_for(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The RL optimizer the loop builds from `config.optim` (AdamW, clipping, warm-up schedule)."""
    o = config.optim
    total = max(int(config.train.rl_steps) * int(config.train.updates_per_batch), 1)
    schedule = o.schedule if o.schedule != "cosine" or total > int(o.warmup_steps) else "constant"
    cfg = update_lib.OptimizerConfig(
        learning_rate=float(o.lr), schedule=schedule, warmup_steps=int(o.warmup_steps), total_steps=total,
        b1=float(o.b1), b2=float(o.b2), weight_decay=float(o.weight_decay),
        max_grad_norm=float(o.grad_clip) if o.grad_clip else None,
    )
    return update_lib.make_optimizer(cfg), update_lib.make_lr_schedule(cfg)


def loss_config_for(config: Any) -> losses_lib.LossConfig:
    l = config.loss  # noqa: E741
    return losses_lib.LossConfig(
        eps_low=float(l.eps_low), eps_high=float(l.eps_high), dual_clip=float(l.dual_clip) or None,
        kl_coef=float(l.kl_coef), aggregation=l.aggregation,
    )


def training_mesh(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    return make_mesh(MeshShape.from_config(config.mesh), devices=devices)


def compile_update_step(
    config: Any,
    *,
    depth: tuple[int, int] | None = None,
    mesh: Mesh | None = None,
    name: str | None = None,
) -> MemoryReport:
    """AOT-compiles the recipe's RL update step on abstract shapes and returns its per-device memory.

    depth: (decoder layers, vision blocks) to compile instead of the model's own (see `extrapolate_by_depth`).
    mesh: defaults to the recipe's `config.mesh` over all devices.
    """
    family, model_config = model_config_for(config)
    full_depth = model_depth(model_config)
    if depth is not None and tuple(depth) != full_depth:
        model_config = with_depth(model_config, *depth)
    mesh = training_mesh(config) if mesh is None else mesh
    shapes = step_shapes(config, family, model_config)
    if shapes.sequences % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(
            f"{shapes.sequences} sequences (data.prompts_per_batch * sampling.group_size) do not divide over the "
            f"{mesh.shape['data'] * mesh.shape['fsdp']} batch shards of mesh {dict(mesh.shape)}"
        )
    graphdef, params = abstract_policy(
        family, model_config, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
        remat=bool(config.model.get("remat", False)),
    )
    optimizer, schedule = optimizer_for(config)
    specs = family.sharding("training").param_specs(params)
    state = abstract_train_state(params, optimizer, specs, mesh)
    batch = abstract_update_batch(family, model_config, shapes, mesh)
    log_prob_fn = make_log_prob_fn(graphdef, temperature=max(float(config.sampling.temperature), 1e-6))
    step = update_lib.make_update_step(
        log_prob_fn, optimizer, loss_config_for(config), micro_batches=int(config.train.micro_batches),
        learning_rate_fn=schedule,
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    label = name or str(config.model.get("release", "") or config.model.name)
    state_bytes = per_device_bytes((state.params, state.opt_state))
    return _report(label, compiled, mesh, model_depth(model_config), seconds, state_bytes)


_FIELDS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes", "state_bytes")


def extrapolate_by_depth(reports: Sequence[MemoryReport], depth: tuple[int, int]) -> MemoryReport:
    """Fits every byte field as `a + b * text_layers + c * vision_blocks` through the reports (least squares;
    exact with three affinely independent depths, or two when text and vision depths move together) and
    evaluates it at `depth`."""
    if len(reports) < 2:
        raise ValueError("extrapolation needs at least two reduced-depth reports")
    depths = np.asarray([r.depth for r in reports], np.float64)
    design = np.column_stack([np.ones(len(reports)), depths])
    target = np.asarray([1.0, *depth])
    rank = np.linalg.matrix_rank(design)
    if rank < 3:
        # Depths vary along one line only: fit along it (text and vision scaled together).
        ratio = depths[:, 1] / depths[:, 0]
        if not np.allclose(ratio, ratio[0]) or not math.isclose(depth[1] / depth[0], ratio[0]):
            raise ValueError(
                f"depths {depths.tolist()} determine no plane; the target {depth} must lie on their line or add a "
                "compile that varies text and vision depth independently"
            )
        design, target = design[:, :2], target[:2]
    values = {}
    for field in _FIELDS:
        y = np.asarray([getattr(r, field) for r in reports], np.float64)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        values[field] = int(round(float(target @ coef)))
    first = reports[0]
    return dataclasses.replace(
        first,
        depth=tuple(depth),
        extrapolated=True,
        depths_compiled=tuple(r.depth for r in reports),
        compile_seconds=sum(r.compile_seconds for r in reports),
        **values,
    )


def _stack_slopes(family, model_config, config, mesh, optimizer, base: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Per-device (params, params + optimizer state) bytes that one more decoder layer / vision block adds,
    from abstract states only (exact: every layer of a stack has the same shapes)."""
    specs_of = family.sharding("training").param_specs

    def bytes_at(depth):
        _, params = abstract_policy(family, with_depth(model_config, *depth), dtype=config.model.dtype,
                                    param_dtype=config.model.param_dtype, remat=False)
        state = abstract_train_state(params, optimizer, specs_of(params), mesh)
        return per_device_bytes(state.params), per_device_bytes((state.params, state.opt_state))

    at_base = bytes_at(base)
    text = bytes_at((base[0] + 1, base[1]))
    vision = bytes_at((base[0], base[1] + 1))
    return {
        "text": (text[0] - at_base[0], text[1] - at_base[1]),
        "vision": (vision[0] - at_base[0], vision[1] - at_base[1]),
    }


def checkpoint_bytes_per_layer(
    family: registry.ModelFamily, model_config: Any, shapes: StepShapes, config: Any, mesh: Mesh
) -> dict[str, int]:
    """Per-device activation bytes a rematerialised layer keeps for the backward pass: its input only.

    text: one micro-batch's hidden states [B / micro_batches / batch shards, T, D] in the compute dtype (the
    rotary tables and the mask are shared by every layer). vision (Qwen): the tower's flat patch sequence
    [patches, D_vision], replicated on every device."""
    itemsize = jnp.dtype(config.model.dtype).itemsize
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = shapes.sequences // int(config.train.micro_batches) // shards
    text = rows * shapes.total_length * model_config.text.hidden_size * itemsize
    vision = 0
    if family.name == "qwen2_5_vl":
        from balcap_jax.models.qwen2_5_vl.vision_host import DEFAULT_PATCH_BUCKETS, choose_bucket

        patches = choose_bucket(
            shapes.images * shapes.patches_per_image, DEFAULT_PATCH_BUCKETS, multiple=model_config.vision.window_patches
        )
        vision = patches * model_config.vision.hidden_size * itemsize
    return {"text": text, "vision": vision}


def stacks_rematerialised(family: registry.ModelFamily, model_config: Any, config: Any) -> dict[str, bool]:
    """Whether the built policy's decoder / vision tower recompute their layers in the backward pass."""
    model = abstract_model(
        family, with_depth(model_config, 1, 2), dtype=config.model.dtype, param_dtype=config.model.param_dtype,
        remat=bool(config.model.get("remat", False)),
    )
    vision = getattr(model.model, "visual", None) or getattr(model.model, "vision_tower", None)
    return {
        "text": bool(getattr(model.model.language_model, "remat", False)),
        "vision": bool(getattr(vision, "remat", False)),
    }


def full_depth_estimate(
    config: Any,
    *,
    base_depth: tuple[int, int] = (1, 1),
    mesh: Mesh | None = None,
    name: str | None = None,
) -> MemoryReport:
    """The recipe's update-step memory per device at the model's full depth, from one compile at `base_depth`.

    arguments / outputs / aliased bytes grow by the exact per-layer state bytes (abstract shapes). temp grows per
    layer by what that layer keeps until the optimizer update: its gradient and an update buffer (2 x its
    per-device parameter bytes) plus, for a rematerialised stack, its checkpointed input
    (`checkpoint_bytes_per_layer`). A stack that is not rematerialised (LLaVA's CLIP tower) gets the per-layer
    temp slope XLA measures from a second compile one layer deeper instead.

    Why not the measured slope for rematerialised stacks too: XLA:CPU drops rematerialisation in unrolled layer
    loops (its pipeline expands the optimization barriers and CSEs the recomputation into the forward pass), so
    its per-layer temp is the no-remat activation footprint; see experiments/results/memory.md.
    """
    family, model_config = model_config_for(config)
    full = model_depth(model_config)
    mesh = training_mesh(config) if mesh is None else mesh
    base_depth = (base_depth[0], max(base_depth[1], 2) if family.name == "llava" else base_depth[1])
    base = compile_update_step(config, depth=base_depth, mesh=mesh, name=name)
    optimizer, _ = optimizer_for(config)
    slopes = _stack_slopes(family, model_config, config, mesh, optimizer, base_depth)
    shapes = step_shapes(config, family, model_config)
    checkpoint = checkpoint_bytes_per_layer(family, model_config, shapes, config, mesh)
    remat = stacks_rematerialised(family, model_config, config)
    compiled = [base]
    temp_slope = {}
    for stack in ("text", "vision"):
        params_bytes, _ = slopes[stack]
        if remat[stack]:
            temp_slope[stack] = checkpoint[stack] + 2 * params_bytes
        else:
            deeper_depth = (base_depth[0] + (stack == "text"), base_depth[1] + (stack == "vision"))
            deeper = compile_update_step(config, depth=deeper_depth, mesh=mesh, name=name)
            compiled.append(deeper)
            temp_slope[stack] = deeper.temp_bytes - base.temp_bytes
    extra = {"text": full[0] - base_depth[0], "vision": full[1] - base_depth[1]}
    state_growth = sum(extra[s] * slopes[s][1] for s in extra)
    temp_growth = sum(extra[s] * temp_slope[s] for s in extra)
    notes = "; ".join(
        f"{s}: +{extra[s]} layers x ({slopes[s][1] / 2**20:.1f} MiB state, {temp_slope[s] / 2**20:.1f} MiB temp, "
        f"{'remat: checkpoint + grad + update' if remat[s] else 'no remat: measured slope'})"
        for s in ("text", "vision")
    )
    return dataclasses.replace(
        base,
        depth=full,
        argument_bytes=base.argument_bytes + state_growth,
        output_bytes=base.output_bytes + state_growth,
        alias_bytes=base.alias_bytes + state_growth,
        temp_bytes=base.temp_bytes + temp_growth,
        state_bytes=base.state_bytes + state_growth,
        extrapolated=True,
        depths_compiled=tuple(r.depth for r in compiled),
        compile_seconds=sum(r.compile_seconds for r in compiled),
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------------
# The sampler (rollouts), with the same state the update step trains


def abstract_prompts(family: registry.ModelFamily, model_config: Any, shapes: StepShapes, mesh: Mesh) -> dict:
    """P prompt rows at the largest prompt bucket (the sampler's prefill input), batch-sharded like the sampler
    places them; Qwen's vision inputs (each image once) and LLaVA's pixel_values as in the update batch."""
    one_per_prompt = dataclasses.replace(shapes, sequences=shapes.images, completion_length=0, group_size=1)
    batch = abstract_update_batch(family, model_config, one_per_prompt, mesh)
    return {key: batch[key] for key in ("input_ids", "attention_mask", "positions", "vision")}


def sampler_config_for(config: Any, model_config: Any, shapes: StepShapes):
    """The recipe's rollout settings as the loop builds them (temperature sampling, bf16 cache)."""
    from balcap_jax.sampling.config import SamplerConfig
    from balcap_jax.sampling.strategies import Temperature, TopP

    s = config.sampling
    top_k = int(s.top_k) or None
    strategy = (TopP(float(s.top_p), float(s.temperature), top_k) if float(s.top_p) < 1.0
                else Temperature(float(s.temperature), top_k))
    blocked = tuple(int(getattr(model_config, f)) for f in
                    ("image_token_id", "vision_start_token_id", "vision_end_token_id") if hasattr(model_config, f))
    return SamplerConfig(
        max_new_tokens=shapes.completion_length, eos_ids=(0,), pad_id=0, strategy=strategy,
        group_size=shapes.group_size, prompt_buckets=(shapes.prompt_length,),
        cache_dtype="float32" if config.model.dtype == "float32" else "bfloat16", blocked_ids=blocked,
    )


def compile_sampler(
    config: Any, *, depth: tuple[int, int] | None = None, mesh: Mesh | None = None, name: str | None = None
) -> tuple[MemoryReport, MemoryReport]:
    """AOT-compiles the rollout's two programs (`sampling.sampler.prefill_and_tile` and `decode`) for the recipe
    and returns their per-device memory. Weights are the train state's params in the training layout (the loop
    samples with the params it trains); `state_bytes` is the optimizer state that stays resident meanwhile."""
    from balcap_jax.sampling.sampler import BatchLayout, decode, prefill_and_tile

    family, model_config = model_config_for(config)
    if depth is not None and tuple(depth) != model_depth(model_config):
        model_config = with_depth(model_config, *depth)
    mesh = training_mesh(config) if mesh is None else mesh
    shapes = step_shapes(config, family, model_config)
    graphdef, params = abstract_policy(
        family, model_config, dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=False
    )
    optimizer, _ = optimizer_for(config)
    state = abstract_train_state(params, optimizer, family.sharding("training").param_specs(params), mesh)
    sampler_config = sampler_config_for(config, model_config, shapes)
    layout = BatchLayout(mesh, BATCH_AXES)
    statics = dict(graphdef=graphdef, config=sampler_config, layout=layout)
    prompts = abstract_prompts(family, model_config, shapes, mesh)
    resident = per_device_bytes(state.opt_state)
    label = name or str(config.model.get("release", "") or config.model.name)

    with jax.set_mesh(mesh):
        prefill_jit = jax.jit(prefill_and_tile, static_argnames=tuple(statics))
        start = time.perf_counter()
        prefill = prefill_jit.lower(state.params, prompts, **statics).compile()
        prefill_seconds = time.perf_counter() - start
        start_shapes = jax.eval_shape(lambda p, x: prefill_and_tile(p, x, **statics), state.params, prompts)
        batch_sharded = lambda leaf, axis=0: jax.ShapeDtypeStruct(  # noqa: E731
            leaf.shape, leaf.dtype, sharding=_named(mesh, P(*([None] * axis), BATCH_AXES)))
        cache = start_shapes.cache.replace(
            k=batch_sharded(start_shapes.cache.k, 1), v=batch_sharded(start_shapes.cache.v, 1),
            valid=batch_sharded(start_shapes.cache.valid),
            index=jax.ShapeDtypeStruct((), jnp.int32, sharding=_named(mesh, P())),
        )
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=_named(mesh, P()))
        decode_jit = jax.jit(decode, static_argnames=tuple(statics), donate_argnums=(1,))
        start = time.perf_counter()
        decoded = decode_jit.lower(
            state.params, cache, batch_sharded(start_shapes.logits), batch_sharded(start_shapes.start_positions),
            key, **statics,
        ).compile()
        decode_seconds = time.perf_counter() - start
    depth_now = model_depth(model_config)
    return (
        _report(f"{label} prefill", prefill, mesh, depth_now, prefill_seconds, resident),
        _report(f"{label} decode", decoded, mesh, depth_now, decode_seconds, resident),
    )


def sampler_full_depth(
    config: Any, *, mesh: Mesh | None = None, name: str | None = None
) -> tuple[MemoryReport, MemoryReport]:
    """(prefill, decode) memory per device at full depth, fitted with `extrapolate_by_depth` from compiles at
    three reduced depths (rollouts keep no activations for a backward pass, so XLA's own slopes apply: weights,
    KV cache and the weights XLA gathers per layer). `peak_bytes + state_bytes` is the device's footprint
    while sampling: the program's own buffers plus the optimizer state that stays resident."""
    family, model_config = model_config_for(config)
    vision_base = 2 if family.name == "llava" else 1
    depths = [(1, vision_base), (2, vision_base), (1, vision_base + 1)]
    runs = [compile_sampler(config, depth=d, mesh=mesh, name=name) for d in depths]
    full = model_depth(model_config)
    return (
        extrapolate_by_depth([prefill for prefill, _ in runs], full),
        extrapolate_by_depth([decode for _, decode in runs], full),
    )


def memory_table_rows(reports: Mapping[str, MemoryReport]) -> list[str]:
    """Markdown table rows (GiB per device) for `experiments/memory_table.py` and logs."""
    g = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    rows = [
        "| recipe | mesh (data, fsdp, tensor) | depth (text, vision) | how | state | arguments | outputs | aliased "
        "| temp | code (MiB) | peak / device (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe, r in reports.items():
        how = f"extrapolated from {', '.join(str(d) for d in r.depths_compiled)}" if r.extrapolated else "compiled"
        mesh = f"({r.mesh['data']}, {r.mesh['fsdp']}, {r.mesh['tensor']})"
        rows.append(
            f"| {recipe} | {mesh} | {r.depth} | {how} | {g(r.state_bytes)} | {g(r.argument_bytes)} | "
            f"{g(r.output_bytes)} | {g(r.alias_bytes)} | {g(r.temp_bytes)} | {r.generated_code_bytes / 2**20:.1f} | "
            f"**{g(r.peak_bytes)}** |"
        )
    return rows
