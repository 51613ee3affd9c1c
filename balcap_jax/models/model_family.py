"""`ModelFamily`: everything the rest of the package needs to know about one policy architecture, as real
callables (so go-to-definition and `inspect` reach the code). Each family builds its object in
`models/<family>/family.py`; `models/registry.py` finds them by name or by a checkpoint's config.json.

It lives apart from the registry because the family modules build it and the registry imports them.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One policy architecture. `model_config` below is the family's config dataclass (what `config_from_hf`
    returns); `batch` is a data-pipeline batch of prompt features for P prompts."""

    name: str
    hf_model_types: tuple[str, ...]  # `model_type` values of config.json this family loads
    config_from_hf: Callable[[Mapping[str, Any]], Any]  # (hf config dict) -> model_config
    model_class: type  # (model_config, *, rngs, dtype, param_dtype, remat) -> CausalLM module
    load: Callable[..., Any]  # (directory, *, dtype, param_dtype, remat, mesh, sharding, config) -> module
    save: Callable[..., Any]  # (module, directory, *, dtype, max_shard_size) -> files
    sharding: Callable[[str], Any]  # ("training" | "sampling") -> the family's sharding dataclass
    processor: types.ModuleType  # image preprocessing + chat formatting for this family
    concat_keys: tuple[str, ...]  # batch keys collated by concatenation on axis 0 instead of stacking
    # (model_config, batch) -> int[P]: how many consecutive images of the batch each prompt owns.
    images_per_prompt: Callable[[Any, Mapping[str, Any]], np.ndarray]
    # (model_config, batch, repeats, shards) -> this process's vision inputs in `shards` blocks of rows, each
    # prompt's rows `repeats` copies (prompt-major); padded sizes agreed over processes. None for a batch with
    # no image on any process (text only; the family may refuse such batches instead).
    vision_inputs: Callable[[Any, Mapping[str, Any], int, int], dict[str, np.ndarray] | None]
    blocked_ids: Callable[[Any], tuple[int, ...]]  # (model_config) -> token ids a caption must never sample
