"""Model families by name: config parsing, module class, HF load/save, sharding layouts, processor.

    family = registry.get("qwen2_5_vl")            # or registry.family_for_hf_dir("/ckpt/Qwen2.5-VL-7B")
    model = family.load(directory, mesh=mesh, sharding=family.sharding("training"))

Families import their modules lazily, so importing the registry costs nothing and a family whose optional
dependencies are missing does not break the others.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One policy architecture; the callables are resolved from "module:attribute" strings on first use."""

    name: str
    hf_model_types: tuple[str, ...]  # `model_type` values of config.json this family loads
    config_from_hf_ref: str  # (hf config dict) -> config
    model_class_ref: str  # (config, *, rngs, dtype, param_dtype, remat) -> CausalLM module
    load_ref: str  # (directory, *, dtype, param_dtype, remat, mesh, sharding, config) -> module
    save_ref: str  # (module, directory, *, dtype, max_shard_size) -> files
    sharding_ref: str  # class with .training() / .sampling() / .layout(name)
    processor_module: str  # image preprocessing + chat formatting for this family

    @property
    def config_from_hf(self) -> Callable[[Mapping[str, Any]], Any]:
        return _resolve(self.config_from_hf_ref)

    @property
    def model_class(self) -> type:
        return _resolve(self.model_class_ref)

    @property
    def load(self) -> Callable[..., Any]:
        return _resolve(self.load_ref)

    @property
    def save(self) -> Callable[..., Any]:
        return _resolve(self.save_ref)

    def sharding(self, layout: str) -> Any:
        """The family's sharding dataclass for layout "training" or "sampling"."""
        return _resolve(self.sharding_ref).layout(layout)

    @property
    def processor(self):
        return importlib.import_module(self.processor_module)


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    value: Any = importlib.import_module(module)
    for part in attr.split("."):
        value = getattr(value, part)
    return value


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def names() -> list[str]:
    return sorted(_FAMILIES)


def get(name: str) -> ModelFamily:
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; registered: {names()}")
    return _FAMILIES[name]


def family_for_hf_config(config: Mapping[str, Any]) -> ModelFamily:
    """The family whose `hf_model_types` contains config.json's `model_type`."""
    model_type = config.get("model_type")
    for family in _FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in _FAMILIES.values() for t in f.hf_model_types)
    raise ValueError(f"config.json model_type={model_type!r} matches no registered family (known: {known})")


def family_for_hf_dir(directory: str | os.PathLike) -> ModelFamily:
    from balcap_jax.models.hf_io import read_hf_config

    return family_for_hf_config(read_hf_config(directory))


register(
    ModelFamily(
        name="qwen2_5_vl",
        hf_model_types=("qwen2_5_vl",),
        config_from_hf_ref="balcap_jax.models.qwen2_5_vl.config:Qwen2_5_VLConfig.from_hf",
        model_class_ref="balcap_jax.models.qwen2_5_vl.model:Qwen2_5_VL",
        load_ref="balcap_jax.models.qwen2_5_vl.params:load_qwen2_5_vl",
        save_ref="balcap_jax.models.qwen2_5_vl.params:save_qwen2_5_vl",
        sharding_ref="balcap_jax.models.qwen2_5_vl.sharding:QwenSharding",
        processor_module="balcap_jax.models.qwen2_5_vl.processor",
    )
)
register(
    ModelFamily(
        name="llava",
        hf_model_types=("llava",),
        config_from_hf_ref="balcap_jax.models.llava.config:LlavaConfig.from_hf_dict",
        model_class_ref="balcap_jax.models.llava.model:LlavaForCausalLM",
        load_ref="balcap_jax.models.llava.params:load_llava",
        save_ref="balcap_jax.models.llava.params:save_llava",
        sharding_ref="balcap_jax.models.llava.sharding:LlavaSharding",
        processor_module="balcap_jax.models.llava.processor",
    )
)
