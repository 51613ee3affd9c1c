"""Rematerialisation (activation checkpointing) of a model's scanned layer body, as configuration.

`model.remat` in a config, and the `remat=` argument of every model constructor, accepts
    False / "none"    keep every activation the backward pass needs (fastest, most memory);
    True / "full"     keep only each layer's input and recompute the layer in the backward pass;
    "save_dots"       keep the outputs of the weight matmuls (`jax.checkpoint_policies.
                      dots_with_no_batch_dims_saveable`, plus the biased projections of `layers.Linear`, which
                      it cannot see through: projections yes, attention products no) and recompute the rest
                      (norms, activations, softmax, attention): less recompute than "full" for more memory.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TypeVar

import jax

from balcap_jax.models.layers import BIASED_MATMUL_NAME

F = TypeVar("F", bound=Callable)


class Remat(enum.Enum):
    """Which activations a scanned layer body keeps for the backward pass. Falsy for NONE, so `if model.remat:`
    reads as before the policies existed."""

    NONE = "none"
    FULL = "full"
    SAVE_DOTS = "save_dots"

    def __bool__(self) -> bool:
        return self is not Remat.NONE

    @classmethod
    def parse(cls, value: "bool | str | Remat | None") -> "Remat":
        """False/None -> NONE, True -> FULL, or a policy name ("none" | "full" | "save_dots")."""
        if isinstance(value, Remat):
            return value
        if value is None or value is False:
            return cls.NONE
        if value is True:
            return cls.FULL
        if isinstance(value, str) and value in {m.value for m in cls}:
            return cls(value)
        raise ValueError(
            f"remat={value!r} is not a remat policy; set model.remat to False, True, or one of "
            f"{[m.value for m in cls]}"
        )

    def apply(self, fn: F) -> F:
        """`fn` wrapped in `jax.checkpoint` with this policy (unchanged for NONE). Meant for a `lax.scan` body,
        which already keeps XLA from merging recomputation with the forward pass, hence prevent_cse=False."""
        if self is Remat.NONE:
            return fn
        return jax.checkpoint(fn, policy=_POLICIES[self], prevent_cse=False)


_POLICIES = {
    Remat.FULL: None,  # jax.checkpoint's default: save nothing but the inputs
    Remat.SAVE_DOTS: jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(BIASED_MATMUL_NAME),
    ),
}
