"""Prompt batches for the sampler: validation and left-padding to a length bucket (host side, before jit).

A prompt batch is a `SequenceInputs` dict (see `balcap_jax.models.interface`): "input_ids" int32[B, T],
"attention_mask" bool[B, T], "positions" int32[B, T] or int32[3, B, T], optional "vision". Prompts must be
left-padded, so the last column holds every row's last prompt token: its hidden state predicts the first
completion token and decode slots follow the prompt with no gap.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from balcap_jax.models.interface import SequenceInputs

REQUIRED_KEYS = ("input_ids", "attention_mask", "positions")


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def validate_prompts(prompts: SequenceInputs) -> tuple[int, int]:
    """Checks keys, shapes and left padding; returns (batch, prompt_length). Raises ValueError naming the field."""
    missing = [k for k in REQUIRED_KEYS if k not in prompts]
    if missing:
        raise ValueError(f"prompt batch is missing {missing}; it needs {list(REQUIRED_KEYS)} (+ optional 'vision')")
    ids_shape = _shape(prompts["input_ids"])
    if len(ids_shape) != 2 or ids_shape[1] == 0:
        raise ValueError(f"prompts['input_ids'] must be [batch, length] with length >= 1, got shape {ids_shape}")
    if _shape(prompts["attention_mask"]) != ids_shape:
        raise ValueError(
            f"prompts['attention_mask'] has shape {_shape(prompts['attention_mask'])}, expected {ids_shape} "
            "(the shape of input_ids)"
        )
    pos_shape = _shape(prompts["positions"])
    if pos_shape not in (ids_shape, (3, *ids_shape)):
        raise ValueError(
            f"prompts['positions'] has shape {pos_shape}; expected {ids_shape} (1-D RoPE) or {(3, *ids_shape)} "
            "(M-RoPE t/h/w)"
        )
    last_column = np.asarray(jax.device_get(prompts["attention_mask"]))[:, -1]
    if not last_column.all():
        rows = np.flatnonzero(~last_column.astype(bool)).tolist()
        raise ValueError(
            f"prompt rows {rows} end in padding: the sampler needs LEFT-padded prompts (attention_mask[:, -1] "
            "all True); pad on the left, e.g. with balcap_jax.sampling.prompts.left_pad"
        )
    return ids_shape


def left_pad(prompts: SequenceInputs, length: int, pad_id: int) -> SequenceInputs:
    """Prepends padding columns so the prompt batch is `length` long; "vision" passes through untouched.

    Padded slots get `pad_id`, attention_mask False and position 0 (never attended to, never read).
    """
    current = _shape(prompts["input_ids"])[1]
    if length < current:
        raise ValueError(f"cannot left-pad prompts of length {current} to shorter length {length}")
    extra = length - current
    if extra == 0:
        return dict(prompts)

    def pad_last_axis(x, value):
        x = np.asarray(jax.device_get(x))
        widths = [(0, 0)] * (x.ndim - 1) + [(extra, 0)]
        return np.pad(x, widths, constant_values=value)

    padded = dict(prompts)
    padded["input_ids"] = pad_last_axis(prompts["input_ids"], pad_id).astype(np.int32)
    padded["attention_mask"] = pad_last_axis(prompts["attention_mask"], False).astype(bool)
    padded["positions"] = pad_last_axis(prompts["positions"], 0).astype(np.int32)
    return padded
