"""Model families by name: config parsing, module class, HF load/save, sharding layouts, processor, and the
per-family data behaviour the trainer needs (vision inputs, ids never to sample).

    family = registry.get("qwen2_5_vl")            # or registry.family_for_hf_dir("/ckpt/Qwen2.5-VL-7B")
    model = family.load(directory, mesh=mesh, sharding=family.sharding("training"))

Each family's object is built in `models/<family>/family.py`; importing the registry imports both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from balcap_jax.models.hf_io import read_hf_config
from balcap_jax.models.llava.family import FAMILY as LLAVA
from balcap_jax.models.model_family import ModelFamily
from balcap_jax.models.qwen2_5_vl.family import FAMILY as QWEN2_5_VL

__all__ = ["ModelFamily", "family_for_hf_config", "family_for_hf_dir", "get", "names"]

_FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (QWEN2_5_VL, LLAVA)}


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
    return family_for_hf_config(read_hf_config(directory))
