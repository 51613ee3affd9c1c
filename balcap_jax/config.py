"""The run-config schema and its validation: every field, its type, its allowed values, and the cross-field rules.

Recipes (`configs/*.py`) are plain `ml_collections.ConfigDict`s; `validate(config)` runs before anything
expensive and raises one `ConfigError` that lists every problem, each naming the field, the value it has and
what is allowed, e.g.

    config.advantage.kind='ppo' is not allowed; allowed values: 'grpo', 'gdpo'
    config.sampling.group_size=1: advantage.kind='gdpo' normalises within a group of samples of the same
      prompt, which needs at least 2; set sampling.group_size >= 2

The allowed values live here as constants so no other module spells them as magic strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from balcap_jax.rewards.components import COMPONENT_NAMES
from balcap_jax.rewards.judges import BACKENDS
from balcap_jax.rl.losses import AGGREGATIONS
from balcap_jax.rl.shaping import ADVANTAGE_KINDS, LENGTH_KINDS
from balcap_jax.rl.update import LR_SCHEDULES

MODEL_NAMES = ("qwen2_5_vl", "llava")
DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("shapes_world", "manifest")
REWARD_COMPONENTS = COMPONENT_NAMES  # allowed values live with the code that owns them
JUDGE_BACKENDS = BACKENDS
BATCH_STATS = ("sample", "token")
LOSS_AGGREGATIONS = AGGREGATIONS

_MISSING = object()  # get_field's "no default given"
_ABSENT = object()  # validate's "field not present"


class ConfigError(ValueError):
    """Invalid run config; `problems` holds one message per offending field."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(
            f"invalid config ({len(self.problems)} problem{'s' * (len(self.problems) != 1)}):\n  - "
            + "\n  - ".join(self.problems)
        )


# --------------------------------------------------------------------------------------------------------------
# Schema helpers
# --------------------------------------------------------------------------------------------------------------


def get_field(config: Any, path: str, default: Any = _MISSING) -> Any:
    """config["a"]["b"]["c"] for path "a.b.c" (ConfigDicts, dicts or attribute objects).

    Raises ConfigError naming the first missing part unless a default is given.
    """
    node = config
    for depth, part in enumerate(path.split(".")):
        if isinstance(node, Mapping) or hasattr(node, "keys"):
            found = part in node.keys()
            value = node[part] if found else None
        else:
            found = hasattr(node, part)
            value = getattr(node, part, None)
        if not found:
            if default is not _MISSING:
                return default
            parent = ".".join(path.split(".")[:depth]) or "<root>"
            raise ConfigError([f"config.{path} is missing (no field {part!r} under {parent})"])
        node = value
    return node


def _fmt(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its expected type and constraints.

    kind: "int", "float", "bool", "str", "bool_or_str", "str_tuple", "float_tuple", "int_tuple".
    choices: allowed values (for str) or allowed members (for str_tuple).
    low/high: inclusive bounds; low_open/high_open make them exclusive.
    """

    path: str
    kind: str
    doc: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    allow_nan: bool = False

    def check(self, value: Any) -> list[str]:
        name = f"config.{self.path}={_fmt(value)}"
        scalar_kind = {"int_tuple": "int", "float_tuple": "float", "str_tuple": "str"}.get(self.kind)
        if scalar_kind is not None:
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                return [f"{name} must be a tuple of {scalar_kind}s ({self.doc})"]
            problems = []
            for item in value:
                problems += _check_scalar(f"{name} (item {item!r})", item, scalar_kind, self)
            return problems
        return _check_scalar(name, value, self.kind, self)


def _check_scalar(name: str, value: Any, kind: str, field: Field) -> list[str]:
    types: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                          "bool_or_str": (bool, str)}
    if isinstance(value, bool) and kind not in ("bool", "bool_or_str") or not isinstance(value, types[kind]):
        return [f"{name} must be a {kind} ({field.doc})"]
    if field.choices is not None and value not in field.choices:
        allowed = ", ".join(repr(c) for c in field.choices)
        close = difflib.get_close_matches(str(value), [str(c) for c in field.choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [f"{name} is not allowed; allowed values: {allowed}{hint}"]
    if kind in ("int", "float"):
        if isinstance(value, float) and math.isnan(value) and field.allow_nan:
            return []  # NaN means "unscorable" here, and no bound applies to it
        if isinstance(value, float) and not math.isfinite(value):
            return [f"{name} must be finite{' or NaN' if field.allow_nan else ''} ({field.doc})"]
        if field.low is not None and (value <= field.low if field.low_open else value < field.low):
            return [f"{name} must be {'>' if field.low_open else '>='} {field.low} ({field.doc})"]
        if field.high is not None and (value >= field.high if field.high_open else value > field.high):
            return [f"{name} must be {'<' if field.high_open else '<='} {field.high} ({field.doc})"]
    return []


def _f(path, kind, doc, **kw) -> Field:
    return Field(path, kind, doc, **kw)


SCHEMA: tuple[Field, ...] = (
    _f("seed", "int", "base seed of every rng stream", low=0),
    # model
    _f("model.name", "str", "policy architecture", choices=MODEL_NAMES),
    _f("model.hf_dir", "str", "local Hugging Face model directory; empty = random init from model.tiny"),
    _f("model.dtype", "str", "activation dtype", choices=DTYPES),
    _f("model.param_dtype", "str", "parameter dtype", choices=DTYPES),
    _f("model.remat", "bool_or_str", "activations the scanned layers keep for the backward pass: False/'none' all, "
       "True/'full' only each layer's input (recompute the rest), 'save_dots' the matmul outputs",
       choices=(False, True, "none", "full", "save_dots"), optional=True),
    _f("model.attention", "str", "attention kernel: 'reference' (the einsum, rounds as HF) or 'flash' (the platform's "
       "fused kernel: TPU Pallas splash, GPU cuDNN in bf16; CPU keeps the reference)", choices=("reference", "flash"),
       optional=True),
    _f("model.release", "str", "released checkpoint whose shapes AOT tools use when hf_dir is unset", optional=True),
    # processes (multi-host); absent or num_processes <= 1: one process
    _f("distributed.num_processes", "int", "JAX processes in the run (one per host); 0 or 1 = single process",
       low=0, optional=True),
    _f("distributed.process_id", "int", "this process's rank in [0, num_processes)", low=0, optional=True),
    _f("distributed.coordinator_address", "str", "'host:port' of process 0", optional=True),
    _f("distributed.local_device_ids", "int_tuple", "devices this process drives; empty = all local", low=0,
       optional=True),
    _f("distributed.auto_detect", "bool", "let JAX detect the cluster (TPU pods, SLURM) instead of the fields above",
       optional=True),
    # mesh
    _f("mesh.data", "int", "data-parallel axis size (-1 = all remaining devices)", low=-1),
    _f("mesh.fsdp", "int", "FSDP axis size (-1 = all remaining devices)", low=-1),
    _f("mesh.tensor", "int", "tensor-parallel axis size (-1 = all remaining devices)", low=-1),
    _f("mesh.sampling_tensor_axes", "str_tuple", "mesh axes the rollout copy of the weights is tensor-parallel over "
       "(each dimension takes the largest sub-product that divides it; trainer/rollout_weights.py); absent = "
       "('fsdp', 'tensor')", choices=("data", "fsdp", "tensor"), optional=True),
    # data
    _f("data.source", "str", "where images and references come from", choices=DATA_SOURCES),
    _f("data.manifest", "str", "JSONL manifest path (data.source='manifest')"),
    _f("data.records_dir", "str", "array_record directory; empty = <workdir>/data"),
    _f("data.eval_manifest", "str", "JSONL manifest of the held-out evaluation images (data.source='manifest')",
       optional=True),
    _f("data.eval_fraction", "float", "held-out fraction of data.manifest evaluated on when no eval_manifest is "
       "given (seeded by config.seed); 0 = no evaluation", low=0, high=1, high_open=True, optional=True),
    _f("data.loader_shards", "int", "disjoint data streams a global batch is read in (0 = one per process); keep "
       "it fixed to reproduce a run on another process count", low=0, optional=True),
    _f("data.prompts_per_batch", "int", "P: images per RL batch, global across hosts", low=1),
    _f("data.prompt", "str", "the captioning instruction"),
    _f("data.prompt_buckets", "int_tuple", "padded prompt lengths, ascending", low=1),
    _f("data.min_pixels", "int", "smallest image area after resizing", low=1),
    _f("data.max_pixels", "int", "largest image area after resizing", low=1),
    _f("data.max_image_bytes", "int", "encoded images larger than this are skipped", low=1),
    # sampling
    _f("sampling.group_size", "int", "G: captions sampled per image", low=1),
    _f("sampling.max_new_tokens", "int", "caption token budget", low=1),
    _f("sampling.temperature", "float", "sampling temperature (also used by the trainer's log-probs)", low=0, low_open=True),
    _f("sampling.top_p", "float", "nucleus mass; 1.0 disables", low=0, high=1, low_open=True),
    _f("sampling.top_k", "int", "top-k cut; 0 disables", low=0),
    # rewards
    _f("rewards.components", "str_tuple", "reward components, in rewards[..., K] order", choices=REWARD_COMPONENTS),
    _f("rewards.weights", "float_tuple", "one non-negative weight per component", low=0),
    _f("rewards.judge.backend", "str", "who scores the captions", choices=JUDGE_BACKENDS),
    _f("rewards.judge.max_concurrency", "int", "judge requests in flight", low=1),
    _f("rewards.judge.timeout_s", "float", "per-request timeout", low=0, low_open=True),
    _f("rewards.judge.max_retries", "int", "retries per judge request", low=0),
    _f("rewards.judge.image_max_side", "int", "longest side (px) of images sent to HTTP judges; 0 keeps the size",
       low=0, optional=True),
    _f("rewards.judge.response_format", "str", "how each prompt's JSON Schema is sent to HTTP judges",
       choices=("json_schema", "json_object", "none"), optional=True),
    _f("rewards.judge.local_model_dir", "str", "backend='jax_local': local HF LlamaForCausalLM directory (with a chat "
       "template) run in-process as the text judge", optional=True),
    _f("rewards.judge.local_max_new_tokens", "int", "backend='jax_local': the judge's completion buffer (tokens)",
       low=1, optional=True),
    # advantages, length handling, loss
    _f("advantage.kind", "str", "advantage estimator", choices=ADVANTAGE_KINDS),
    _f("advantage.eps", "float", "std floor in the normalisations", low=0, low_open=True),
    _f("advantage.ddof", "int", "std degrees of freedom (1 = unbiased, TRL)", choices=(0, 1)),
    _f("advantage.batch_stats", "str", "batch normalisation statistics over samples or tokens", choices=BATCH_STATS),
    _f("advantage.partial_nan", "str", "how GRPO scores a sample with some unscorable components: 'mean_present' "
       "never reads one as 0, 'sum_present' is TRL's (reads it as 0), 'unscorable' drops the sample",
       choices=("mean_present", "sum_present", "unscorable"), optional=True),
    _f("length.kind", "str", "length handling", choices=LENGTH_KINDS),
    _f("length.component", "str", "the component gated by the length mask", choices=REWARD_COMPONENTS),
    _f("length.ratio_min", "float", "lowest allowed caption/reference length ratio", low=0),
    _f("length.ratio_max", "float", "highest allowed caption/reference length ratio", low=0, low_open=True),
    _f("length.masked_value", "float", "value a gated component takes outside the band; NaN makes it unscorable "
       "(left out of the statistics) instead of penalised", allow_nan=True),
    _f("length.coef", "float", "linear length penalty λ per unit of relative excess max(0, ρ − 1), subtracted from "
       "the score before normalisation", low=0),
    _f("loss.eps_low", "float", "lower clip of the importance ratio: 1 - eps_low", low=0, high=1, high_open=True),
    _f("loss.eps_high", "float", "upper clip of the importance ratio: 1 + eps_high", low=0),
    _f("loss.dual_clip", "float", "dual-clip constant c > 1; 0 disables", low=0),
    _f("loss.kl_coef", "float", "k3 KL coefficient to the reference policy; 0 needs no reference", low=0),
    _f("loss.aggregation", "str", "how per-token losses are reduced", choices=LOSS_AGGREGATIONS),
    _f("loss.tis_cap", "float", "truncated importance sampling: each token's policy-gradient loss is weighted by "
       "min(pi_trainer / pi_sampler, C) against sampler/trainer mismatch (e.g. 2.0 with bf16 sampling); 0 disables",
       low=0, optional=True),
    # optimisation and loop
    _f("optim.lr", "float", "peak learning rate", low=0, low_open=True),
    _f("optim.warmup_steps", "int", "linear warm-up steps", low=0),
    _f("optim.schedule", "str", "learning-rate schedule after warm-up", choices=LR_SCHEDULES),
    _f("optim.weight_decay", "float", "AdamW decoupled weight decay", low=0),
    _f("optim.grad_clip", "float", "global-norm gradient clip; 0 disables", low=0),
    _f("optim.b1", "float", "Adam beta1", low=0, high=1, high_open=True),
    _f("optim.b2", "float", "Adam beta2", low=0, high=1, high_open=True),
    _f("train.rl_steps", "int", "RL steps (batches)", low=0),
    _f("train.updates_per_batch", "int", "optimizer updates per sampled batch", low=1),
    _f("train.micro_batches", "int", "gradient-accumulation micro-batches per update", low=1),
    _f("train.sft_steps", "int", "supervised warm-start steps; 0 skips SFT", low=0),
    _f("train.sft_batch_size", "int", "SFT batch size, global", low=1),
    _f("train.sft_lr", "float", "SFT learning rate", low=0, low_open=True),
    _f("train.overlap", "str", "'one_step_off' samples batch t+1 while batch t is judged (one version of staleness, "
       "pi_old from the weights that sampled); 'none' judges each batch before its update",
       choices=("none", "one_step_off"), optional=True),
    _f("train.compile_cache_dir", "str", "persistent XLA compilation cache; '' = <workdir>/compile_cache, 'off' "
       "disables", optional=True),
    _f("train.init_from", "str", "warm start loaded into the from-scratch policy before SFT/RL (a .npz + .json "
       "from `python -m experiments.build_warm_start`; relative paths are read against the package); '' = random",
       optional=True),
    _f("eval.max_images", "int", "held-out images evaluated (whole batches); 0 = the whole split", low=0,
       optional=True),
    _f("eval.batch_size", "int", "greedy captions per evaluation batch, global; 0 = prompts_per_batch * group_size",
       low=0, optional=True),
    _f("checkpoint.every_steps", "int", "save every N steps (SFT and RL steps alike); 0 = only on preemption and at "
       "the end", low=0),
    _f("checkpoint.keep", "int", "checkpoints kept (most recent)", low=1),
    _f("checkpoint.export_hf", "bool", "export the final policy as HF safetensors"),
    _f("metrics.log_every", "int", "scalar logging interval", low=1),
    _f("metrics.sample_every", "int", "sample-caption logging interval; 0 disables", low=0),
    _f("metrics.eval_every", "int", "evaluation interval; 0 disables", low=0),
)
SCHEMA_BY_PATH: dict[str, Field] = {field.path: field for field in SCHEMA}


def _leaf_paths(config: Any, prefix: str = "") -> list[str]:
    out = []
    for key in config.keys():
        value = config[key]
        path = f"{prefix}{key}"
        if hasattr(value, "keys") and not isinstance(value, (str, bytes)):
            out += _leaf_paths(value, path + ".")
        else:
            out.append(path)
    return out


def misspelled_fields(config: Any, known: Sequence[str] = tuple(SCHEMA_BY_PATH)) -> list[str]:
    """Fields absent from the schema whose name is one edit away from a schema field (likely typos).

    Fields the schema does not know and that resemble nothing are left alone: recipes may carry extras.
    """
    problems = []
    present = set(_leaf_paths(config))
    for path in sorted(present - set(known)):
        section, _, leaf = path.rpartition(".")
        # only schema fields of the same section that the config lacks: a typo leaves its intended field unset
        absent = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section and k not in present}
        close = difflib.get_close_matches(leaf, list(absent), n=1, cutoff=0.8)
        if close:
            problems.append(f"config.{path} is not a known field; did you mean config.{absent[close[0]]}?")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Cross-field rules
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Environment:
    """Facts about where the run happens that some rules depend on."""

    device_count: int
    process_count: int = 1
    check_paths: bool = True
    environ: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(os.environ))


Rule = Callable[[Any, Environment], list[str]]


def _group_size_rule(c: Any, env: Environment) -> list[str]:
    kind, g = get_field(c, "advantage.kind"), get_field(c, "sampling.group_size")
    if kind in ADVANTAGE_KINDS and isinstance(g, int) and g < 2:
        return [
            f"config.sampling.group_size={g}: advantage.kind={kind!r} normalises rewards within a group of "
            "samples of the same prompt, which needs at least 2; set sampling.group_size >= 2 (8 is typical)"
        ]
    return []


def _rewards_rule(c: Any, env: Environment) -> list[str]:
    components, weights = list(get_field(c, "rewards.components")), list(get_field(c, "rewards.weights"))
    problems = []
    if not components:
        problems.append(f"config.rewards.components is empty; choose from {REWARD_COMPONENTS}")
    if len(set(components)) != len(components):
        problems.append(f"config.rewards.components={tuple(components)!r} lists a component twice")
    if len(weights) != len(components):
        problems.append(
            f"config.rewards.weights has {len(weights)} entries but rewards.components has {len(components)}; "
            "give one weight per component, in the same order"
        )
    elif weights and all(isinstance(w, (int, float)) for w in weights) and sum(weights) <= 0:
        problems.append("config.rewards.weights are all 0: at least one component must count")
    return problems


def _length_rule(c: Any, env: Environment) -> list[str]:
    kind = get_field(c, "length.kind")
    problems = []
    lo, hi = get_field(c, "length.ratio_min"), get_field(c, "length.ratio_max")
    if kind == "mask":
        if all(isinstance(x, (int, float)) for x in (lo, hi)) and lo >= hi:
            problems.append(f"config.length.ratio_min={lo!r} must be below length.ratio_max={hi!r}")
        component = get_field(c, "length.component")
        if component not in tuple(get_field(c, "rewards.components")):
            problems.append(
                f"config.length.component={component!r} is not among rewards.components="
                f"{tuple(get_field(c, 'rewards.components'))!r}; the mask can only gate a component that is scored"
            )
    return problems


def _loss_rule(c: Any, env: Environment) -> list[str]:
    problems = []
    dual = get_field(c, "loss.dual_clip")
    if isinstance(dual, (int, float)) and dual != 0 and dual <= 1:
        problems.append(f"config.loss.dual_clip={dual!r} must be 0 (off) or > 1 (e.g. 3.0)")
    tis = get_field(c, "loss.tis_cap", 0.0)
    if isinstance(tis, (int, float)) and 0 < tis < 1:
        problems.append(f"config.loss.tis_cap={tis!r} must be 0 (off) or >= 1 (e.g. 2.0)")
    return problems


def max_patches_per_image(max_pixels: int, patch_size: int = 14, merge_size: int = 2) -> int:
    """The most vision patches one image resized under `max_pixels` can have (Qwen2.5-VL smart resize rounds
    each side to a multiple of patch_size * merge_size, keeping the area <= max_pixels)."""
    unit = patch_size * merge_size
    return (max_pixels // (unit * unit)) * merge_size * merge_size


def _vision_bucket_rule(c: Any, env: Environment) -> list[str]:
    """Every block of rows' images (`models/image_shards.py`: one block per batch shard of the mesh the batch
    runs on, times the update's micro-batches) must fit the largest vision patch bucket."""
    if get_field(c, "model.name") != "qwen2_5_vl":
        return []
    from balcap_jax.models.image_shards import plan_row_shards
    from balcap_jax.models.qwen2_5_vl.vision_host import DEFAULT_PATCH_BUCKETS
    from balcap_jax.parallel.mesh import tensor_axes_from

    try:
        data, fsdp, _ = _mesh_sizes(c, env)
    except ValueError:
        return []  # _mesh_rule reports it
    tensor_axes = tensor_axes_from(get_field(c, "mesh.sampling_tensor_axes", None))
    rollout_shards = (1 if "data" in tensor_axes else data) * (1 if "fsdp" in tensor_axes else fsdp)
    per_image = max_patches_per_image(int(get_field(c, "data.max_pixels")))
    largest = DEFAULT_PATCH_BUCKETS[-1]
    prompts, group = int(get_field(c, "data.prompts_per_batch")), int(get_field(c, "sampling.group_size"))
    micro = int(get_field(c, "train.micro_batches"))
    eval_batch = int(get_field(c, "eval.batch_size", 0) or 0) or prompts * group
    # (field, prompts, rows per prompt, blocks over all processes)
    batches = [("data.prompts_per_batch", prompts, 1, rollout_shards),
               ("data.prompts_per_batch", prompts, group, data * fsdp * micro),
               ("eval.batch_size", eval_batch, 1, rollout_shards)]
    if int(get_field(c, "train.sft_steps")) > 0:
        batches.append(("train.sft_batch_size", int(get_field(c, "train.sft_batch_size")), 1, data * fsdp))
    problems = []
    for name, count, rows, blocks in batches:
        try:
            plan = plan_row_shards(count, rows, blocks)
        except ValueError:
            continue  # _mesh_rule reports batches that do not divide
        images = max(shard.stop - shard.first for shard in plan)
        if images * per_image > largest:
            fit = max(largest // per_image, 1)
            problems.append(
                f"config.{name}={count}: {images} images of up to {per_image} patches (data.max_pixels="
                f"{get_field(c, 'data.max_pixels')}) on one batch shard can exceed the largest vision bucket of "
                f"{largest} patches; hold at most {fit} images per shard (more devices on the batch axes, fewer "
                "per batch, or a smaller data.max_pixels)"
            )
    return list(dict.fromkeys(problems))


def _distributed_rule(c: Any, env: Environment) -> list[str]:
    n = get_field(c, "distributed.num_processes", 0) or 0
    if get_field(c, "distributed.auto_detect", False) or n <= 1:
        return []
    problems = []
    pid = get_field(c, "distributed.process_id", None)
    if pid is None or not 0 <= pid < n:
        problems.append(f"config.distributed.process_id={pid!r} must be this process's rank in [0, {n})")
    address = get_field(c, "distributed.coordinator_address", "")
    if not address or ":" not in address:
        problems.append(
            f"config.distributed.coordinator_address={address!r}: set it to 'host:port' of process 0 (or set "
            "distributed.auto_detect=True on a TPU pod or SLURM allocation)"
        )
    return problems


def _eval_rule(c: Any, env: Environment) -> list[str]:
    if get_field(c, "data.source") != "manifest":
        return []
    eval_manifest = get_field(c, "data.eval_manifest", "")
    problems = []
    if eval_manifest and env.check_paths and not Path(eval_manifest).expanduser().is_file():
        problems.append(f"config.data.eval_manifest={eval_manifest!r} does not exist")
    if eval_manifest and get_field(c, "data.eval_fraction", 0.0):
        problems.append("config.data.eval_manifest and data.eval_fraction are both set; choose one held-out split")
    return problems


def _pixels_rule(c: Any, env: Environment) -> list[str]:
    lo, hi = get_field(c, "data.min_pixels"), get_field(c, "data.max_pixels")
    buckets = list(get_field(c, "data.prompt_buckets"))
    problems = []
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        problems.append(f"config.data.min_pixels={lo} is larger than data.max_pixels={hi}")
    if not buckets:
        problems.append("config.data.prompt_buckets is empty; give at least one padded prompt length")
    elif buckets != sorted(set(buckets)):
        problems.append(f"config.data.prompt_buckets={tuple(buckets)!r} must be strictly ascending")
    return problems


def _mesh_sizes(c: Any, env: Environment) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of `config.mesh` on this environment's devices; ValueError when they do not fit."""
    from balcap_jax.parallel.mesh import MeshShape

    return MeshShape(*(get_field(c, f"mesh.{axis}") for axis in ("data", "fsdp", "tensor"))).resolve(env.device_count)


def _mesh_rule(c: Any, env: Environment) -> list[str]:
    try:
        data, fsdp, _ = _mesh_sizes(c, env)
    except ValueError as error:
        return [f"config.mesh: {error}"]
    shards = data * fsdp
    problems = []
    prompts, group = get_field(c, "data.prompts_per_batch"), get_field(c, "sampling.group_size")
    micro = get_field(c, "train.micro_batches")
    sft_batch = get_field(c, "train.sft_batch_size")
    if prompts % shards:
        problems.append(
            f"config.data.prompts_per_batch={prompts} is not divisible by the {shards} batch shards of the mesh "
            f"(mesh.data*mesh.fsdp = {data}*{fsdp}); use a multiple of {shards}"
        )
    requested = get_field(c, "data.loader_shards", 0) or 0
    loaders = requested or env.process_count
    if loaders % env.process_count:
        problems.append(
            f"config.data.loader_shards={requested} does not divide over the {env.process_count} processes; use a "
            f"multiple of {env.process_count} (or 0 for one stream per process)"
        )
    eval_batch = get_field(c, "eval.batch_size", 0) or 0
    batches = {"data.prompts_per_batch": prompts, "eval.batch_size": eval_batch or prompts * group}
    if get_field(c, "train.sft_steps") > 0:
        batches["train.sft_batch_size"] = sft_batch
    for name, size in batches.items():
        if size % loaders:
            problems.append(
                f"config.{name}={size} is not divisible by the {loaders} data streams (data.loader_shards, or one "
                f"per process); each stream loads an equal share, so use a multiple of {loaders}"
            )
    if (eval_batch or prompts * group) % shards:
        problems.append(
            f"config.eval.batch_size={eval_batch or prompts * group} is not divisible by the {shards} batch shards "
            f"of the mesh; use a multiple of {shards}"
        )
    sequences = prompts * group
    if sequences % micro or (sequences // micro) % shards:
        problems.append(
            f"config.train.micro_batches={micro}: the {sequences} sequences per batch (prompts_per_batch * "
            f"group_size) must split into {micro} micro-batches that are each a multiple of the {shards} "
            "batch shards; change train.micro_batches, data.prompts_per_batch or the mesh"
        )
    if get_field(c, "train.sft_steps") > 0 and sft_batch % shards:
        problems.append(
            f"config.train.sft_batch_size={sft_batch} is not divisible by the {shards} batch shards of the mesh; "
            f"use a multiple of {shards}"
        )
    return problems


def _paths_rule(c: Any, env: Environment) -> list[str]:
    if not env.check_paths:
        return []
    problems = []
    hf_dir = get_field(c, "model.hf_dir")
    if hf_dir:
        path = Path(hf_dir).expanduser()
        if not path.is_dir():
            problems.append(f"config.model.hf_dir={hf_dir!r} does not exist; point it at a local HF model directory")
        elif not (path / "config.json").exists():
            problems.append(
                f"config.model.hf_dir={hf_dir!r} has no config.json; it must be a Hugging Face model directory "
                "(config.json + *.safetensors)"
            )
    elif get_field(c, "model.tiny", None) is None:
        problems.append(
            "config.model.hf_dir is empty and there is no config.model.tiny to initialise from: set model.hf_dir "
            "to a local HF weights directory (e.g. a downloaded Qwen2.5-VL-7B-Instruct)"
        )
    if get_field(c, "data.source") == "manifest":
        manifest = get_field(c, "data.manifest")
        if not manifest:
            problems.append("config.data.manifest is empty but data.source='manifest'; set it to a JSONL manifest")
        elif not Path(manifest).expanduser().is_file():
            problems.append(f"config.data.manifest={manifest!r} does not exist")
    return problems


def _judge_rule(c: Any, env: Environment) -> list[str]:
    if get_field(c, "rewards.judge.backend") == "jax_local":
        return _local_judge_rule(c, env)
    if get_field(c, "rewards.judge.backend") != "openai":
        return []
    problems = []
    for role in ("llm", "vlm"):
        url = get_field(c, f"rewards.judge.{role}_url", "")
        model = get_field(c, f"rewards.judge.{role}_model", "")
        if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            problems.append(
                f"config.rewards.judge.{role}_url={url!r}: judge.backend='openai' needs the base URL of an "
                "OpenAI-compatible server (e.g. 'http://localhost:8000/v1' for vLLM or SGLang)"
            )
        if not model:
            problems.append(f"config.rewards.judge.{role}_model is empty; set the model name the server serves")
    key_env = get_field(c, "rewards.judge.api_key_env", "")
    if key_env and key_env not in env.environ:
        problems.append(
            f"config.rewards.judge.api_key_env={key_env!r} names an environment variable that is not set; "
            "export it or set api_key_env='' for servers without keys"
        )
    return problems


def _local_judge_rule(c: Any, env: Environment) -> list[str]:
    model_dir = get_field(c, "rewards.judge.local_model_dir", "")
    if not model_dir:
        return [
            "config.rewards.judge.local_model_dir is empty: judge.backend='jax_local' runs a local HF Llama chat "
            "checkpoint in-process; set it (e.g. to the directory `python -m balcap_jax.tools.smollm2_checkpoint` "
            "prints)"
        ]
    if env.check_paths and not (Path(model_dir).expanduser() / "config.json").is_file():
        return [f"config.rewards.judge.local_model_dir={model_dir!r} has no config.json; point it at a local HF "
                "model directory"]  # fmt: skip
    return []


RULES: tuple[Rule, ...] = (
    _group_size_rule,
    _rewards_rule,
    _length_rule,
    _loss_rule,
    _vision_bucket_rule,
    _distributed_rule,
    _eval_rule,
    _pixels_rule,
    _mesh_rule,
    _paths_rule,
    _judge_rule,
)


def validate(
    config: Any,
    *,
    device_count: int | None = None,
    process_count: int | None = None,
    check_paths: bool = True,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Checks every schema field and cross-field rule; raises ConfigError listing all problems found.

    device_count / process_count default to JAX's view (call after multi-host initialisation).
    check_paths=False skips filesystem checks (for validating a recipe on another machine).
    """
    problems: list[str] = []
    for field in SCHEMA:
        value = get_field(config, field.path, _ABSENT)
        if value is _ABSENT:
            if not field.optional:
                problems.append(f"config.{field.path} is missing ({field.doc})")
            continue
        problems += field.check(value)
    problems += misspelled_fields(config)
    field_problems = bool(problems)
    if device_count is None or process_count is None:
        import jax

        device_count = jax.device_count() if device_count is None else device_count
        process_count = jax.process_count() if process_count is None else process_count
    env = Environment(
        device_count=device_count,
        process_count=process_count,
        check_paths=check_paths,
        environ=dict(os.environ) if environ is None else environ,
    )
    for rule in RULES:
        try:
            problems += rule(config, env)
        except (ConfigError, TypeError, ValueError, AttributeError, ZeroDivisionError):
            if not field_problems:
                raise
            # a field the rule reads is missing or ill-typed: already reported above
    if problems:
        raise ConfigError(problems)


def describe_schema() -> str:
    """One line per field: path, type, constraints and meaning (for --help style output and docs)."""
    lines = []
    for f in SCHEMA:
        constraint = ""
        if f.choices is not None:
            constraint = " in {" + ", ".join(repr(c) for c in f.choices) + "}"
        elif f.low is not None or f.high is not None:
            lo = "" if f.low is None else f"{'(' if f.low_open else '['}{f.low}"
            hi = "" if f.high is None else f"{f.high}{')' if f.high_open else ']'}"
            constraint = f" {lo or '(-inf'}, {hi or 'inf)'}"
        lines.append(f"{f.path:<32} {f.kind:<12}{constraint:<40} {f.doc}")
    return "\n".join(lines)
