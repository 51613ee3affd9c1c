"""Qwen2.5-VL weights: HF checkpoint <-> our NNX state.

Our attribute names mirror `Qwen2_5_VLForConditionalGeneration`, so the generic rules of `models.hf_io`
(`kernel[in, out]` <-> `weight[out, in]`, `scale`/`embedding` <-> `weight`, `bias` unchanged) map every tensor;
the vision tower declares its one exception (the Conv3d patch embedding) in `vision.hf_special_cases`.
This file adds what is Qwen-specific:
  * two key layouts: the flat one of checkpoint files (`model.layers.*`, `visual.*`; the released repos, and what
    transformers 5 `save_pretrained` still writes) and the nested module one (`model.language_model.*`,
    `model.visual.*`; `state_dict()` names). Both load; exports write the flat one by default;
  * the tied `lm_head.weight` that some checkpoints still carry for tied models (3B), ignored on load;
  * the layer stacks (decoder layers, vision blocks: one [L, ...] leaf per parameter kind, HF's per-layer keys),
    found from the module by `layer_stack.layer_stack_prefixes`, so mappings built by hand work too;
  * loading straight into sharded arrays (`load_qwen2_5_vl`), exporting (`save_qwen2_5_vl`), and an in-memory
    converter for torch state dicts (`from_hf_tensors`, used by tests and the parity tool).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from balcap_jax.models import hf_io
from balcap_jax.models.layer_stack import layer_stack_prefixes
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from balcap_jax.models.qwen2_5_vl.sharding import QwenSharding
from balcap_jax.models.qwen2_5_vl.vision import hf_special_cases
from balcap_jax.parallel.sharding import map_with_names, named_leaves

# Checkpoint files keep the flat key layout (`model.layers.*`, `visual.*`, `lm_head.*`): the released repos use
# it and transformers 5 still writes it on save (its modules nest as `model.language_model.*` /
# `model.visual.*`, which is also what `state_dict()` returns and what we mirror).
# (file prefix, module prefix) pairs, applied to checkpoints in the flat layout when loading:
FLAT_CHECKPOINT_ALIASES: tuple[tuple[str, str], ...] = (
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
)
# (module prefix, file prefix) pairs, applied when exporting in the flat layout:
FLAT_EXPORT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)
Layout = Literal["flat", "nested"]


def is_flat_layout(checkpoint_keys: Iterable[str]) -> bool:
    """True for checkpoints with flat `model.layers.*` / `visual.*` keys (no `model.language_model.` nesting)."""
    keys = list(checkpoint_keys)
    return any(k.startswith("visual.") for k in keys) or any(
        k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")) for k in keys
    )


def qwen2_5_vl_mapping(
    config: Qwen2_5_VLConfig, checkpoint_keys: Iterable[str] = (), *, export_layout: Layout = "flat"
) -> hf_io.ParamMapping:
    """The ParamMapping for a `Qwen2_5_VL` module. Loading: pass the checkpoint's keys (both layouts load).
    Exporting: `export_layout` picks the key names written ("flat", as transformers saves, or "nested")."""
    if export_layout not in ("flat", "nested"):
        raise ValueError(f"export_layout must be 'flat' or 'nested', got {export_layout!r}")
    return hf_io.ParamMapping(
        prefix_renames=FLAT_EXPORT_PREFIXES if export_layout == "flat" else (),
        special_cases=hf_special_cases(),
        checkpoint_aliases=FLAT_CHECKPOINT_ALIASES if is_flat_layout(checkpoint_keys) else (),
        ignore_unexpected=(r"lm_head\.weight",) if config.text.tie_word_embeddings else (),
    )


def abstract_model(
    config: Qwen2_5_VLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False
) -> Qwen2_5_VL:
    """The module with shape-only parameters (`nnx.eval_shape`): nothing is allocated."""
    return nnx.eval_shape(
        lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat)
    )


def _merge(abstract: nnx.Module, params: nnx.State) -> nnx.Module:
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    return nnx.merge(graphdef, params, rest)


def load_qwen2_5_vl(
    directory: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool | str = False,
    mesh: Mesh | None = None,
    sharding: QwenSharding | None = None,
    config: Qwen2_5_VLConfig | None = None,
) -> Qwen2_5_VL:
    """A local HF Qwen2.5-VL directory (config.json + safetensors) -> `Qwen2_5_VL`, streamed tensor by tensor.

    With a `mesh`, every parameter is created directly in its `sharding` layout (default: the training layout),
    so no device ever holds the whole model; without one, on the first device. Checkpoint floats are cast to
    `param_dtype` (bf16 checkpoints into fp32 models and back). `config` overrides the directory's config.json.
    """
    config = config or Qwen2_5_VLConfig.from_hf(hf_io.read_hf_config(directory))
    abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    target = nnx.state(abstract, nnx.Param)
    if mesh is not None:
        target = (sharding or QwenSharding.training()).abstract_params(target, mesh)
    keys = hf_io.SafetensorsDirectory(directory).keys()
    # names resolve in the module layout
    mapping = qwen2_5_vl_mapping(config, keys, export_layout="nested").with_stacked(layer_stack_prefixes(abstract))
    return _merge(abstract, hf_io.load_hf_state(directory, target, mapping))


def save_qwen2_5_vl(
    model: Qwen2_5_VL,
    directory: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    hf_config: Mapping[str, Any] | None = None,
    layout: Layout = "flat",
) -> list:
    """Export to a HF directory that `Qwen2_5_VLForConditionalGeneration.from_pretrained` (and vLLM) load.

    `hf_config` (e.g. the config.json the model was loaded from) is written as config.json; by default the
    config is regenerated from `model.config`. A tied model writes no `lm_head.weight`. `layout="flat"` writes
    the keys as transformers' own `save_pretrained` does (`model.layers.*`, `visual.*`).
    """
    params = nnx.state(model, nnx.Param)
    config = dict(hf_config) if hf_config is not None else model.config.to_hf()
    config["torch_dtype"] = _torch_dtype_name(params, dtype)
    mapping = qwen2_5_vl_mapping(model.config, export_layout=layout).with_stacked(layer_stack_prefixes(model))
    return hf_io.save_hf_state(
        params, directory, mapping, config=config, dtype=dtype, max_shard_size=max_shard_size
    )


def _torch_dtype_name(params: Any, dtype: Any) -> str:
    """The config.json `torch_dtype` matching the exported tensors (the widest float dtype among them)."""
    dtypes = {jnp.dtype(dtype)} if dtype is not None else {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)}
    for candidate, name in ((jnp.float32, "float32"), (jnp.bfloat16, "bfloat16"), (jnp.float16, "float16")):
        if jnp.dtype(candidate) in dtypes:
            return name
    raise ValueError(f"cannot export parameters of dtypes {sorted(map(str, dtypes))} to a HF checkpoint")


def from_hf_tensors(
    abstract: nnx.Module,
    tensors: Mapping[str, Any],
    mapping: hf_io.ParamMapping,
    *,
    hf_prefix: str = "",
) -> nnx.Module:
    """In-memory conversion: a concrete module from `abstract` (or a real module) and HF tensors (numpy or torch).

    `hf_prefix` selects a sub-module's tensors, e.g. "model.language_model.layers.0." for a single
    `DecoderLayer`. The module's layer stacks are added to `mapping` (each stacked leaf gathers its per-layer
    tensors). Raises HFWeightsError naming missing keys and shape mismatches.
    """
    mapping = mapping.with_stacked(layer_stack_prefixes(abstract))
    params = nnx.state(abstract, nnx.Param)
    canonical = {mapping.canonical_checkpoint_key(k): k for k in tensors}
    problems: list[str] = []

    def convert_one(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        key = hf_prefix + mapping.hf_key(name)
        if key not in canonical:
            problems.append(f"missing {key!r} (for our {name!r})")
            return None
        array = np.asarray(mapping.transform(name, key).to_ours(_numpy(tensors[canonical[key]])))
        if array.shape != shape:
            problems.append(f"{key!r}: shape {array.shape} after transform, ours {name!r} is {shape}")
            return None
        return array

    def convert(name: str, leaf: Any) -> jax.Array:
        layer_names = mapping.layer_names(name, leaf.shape)
        if layer_names is None:
            array = convert_one(name, tuple(leaf.shape))
        else:
            layers = [convert_one(layer_name, tuple(leaf.shape[1:])) for layer_name in layer_names]
            array = None if any(layer is None for layer in layers) else np.stack(layers)
        return leaf if array is None else jnp.asarray(array, dtype=leaf.dtype)

    converted = map_with_names(convert, params)
    if problems:
        raise hf_io.HFWeightsError("tensors do not match the model:\n  " + "\n  ".join(problems[:20]))
    return _merge(abstract, converted)


def to_hf_tensors(model: nnx.Module, mapping: hf_io.ParamMapping) -> dict[str, np.ndarray]:
    """In-memory export: {HF key: numpy array} for every parameter of `model` (one per layer of a stack)."""
    mapping = mapping.with_stacked(layer_stack_prefixes(model))
    out = {}
    for name, leaf in named_leaves(nnx.state(model, nnx.Param)):
        host = np.asarray(jax.device_get(leaf))
        layer_names = mapping.layer_names(name, host.shape)
        parts = [(name, host)] if layer_names is None else list(zip(layer_names, host))
        for part_name, array in parts:
            key = mapping.hf_key(part_name)
            out[key] = np.ascontiguousarray(mapping.transform(part_name, key).to_hf(array))
    return out


def _numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):  # torch
        return tensor.detach().cpu().float().numpy() if str(tensor.dtype) == "torch.bfloat16" else (
            tensor.detach().cpu().numpy())
    return np.asarray(tensor)
