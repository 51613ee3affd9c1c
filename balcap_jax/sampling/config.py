"""`SamplerConfig`: everything that fixes the shape and the program of a rollout, hashable for `jax.jit`.

The config is a static argument of the jitted prefill and decode functions, so two calls with equal configs
and equal prompt shapes reuse one compiled program. Keep per-call data (prompts, rng keys, weights) out of it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from balcap_jax.sampling.strategies import STRATEGIES, Greedy, Strategy

DEFAULT_PROMPT_BUCKETS: tuple[int, ...] = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static rollout settings.

    strategy:        Greedy(), Temperature(t, top_k) or TopP(p, t, top_k).
    max_new_tokens:  length of the fixed completion buffer; rows that do not emit EOS stop here ("length").
    eos_ids:         token ids that end a row (the EOS token itself is part of the completion). May be empty.
    pad_id:          written after a row's end, and used to left-pad prompts up to a bucket.
    group_size:      G completions per prompt; rows are prompt-major (row p * G + g).
    prompt_buckets:  allowed padded prompt lengths (ascending); a prompt batch is left-padded to the smallest
                     bucket that holds it, so prompt lengths inside a bucket share one compiled program.
    cache_dtype:     KV cache dtype name ("bfloat16" for rollouts, "float32" for parity tests).
    blocked_ids:     ids never sampled, e.g. image placeholder tokens a completion must not contain (the
                     training forward would read them as image slots). Like top-k/top-p this only restricts the
                     draw: reported log-probs stay under the full tempered distribution.
    """

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    strategy: Strategy = Greedy()
    group_size: int = 1
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    cache_dtype: str = "bfloat16"
    blocked_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"SamplerConfig.max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
        if not isinstance(self.strategy, STRATEGIES):
            raise ValueError(
                f"SamplerConfig.strategy={self.strategy!r} must be one of "
                f"{[cls.__name__ for cls in STRATEGIES]} (from balcap_jax.sampling.strategies)"
            )
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"SamplerConfig.group_size={self.group_size!r} must be an int >= 1")
        if not isinstance(self.eos_ids, tuple) or not all(isinstance(t, int) and t >= 0 for t in self.eos_ids):
            raise ValueError(
                f"SamplerConfig.eos_ids={self.eos_ids!r} must be a tuple of non-negative ints, e.g. (151645,); "
                "use () for length-only stopping"
            )
        if not isinstance(self.blocked_ids, tuple) or not all(
            isinstance(t, int) and t >= 0 for t in self.blocked_ids
        ):
            raise ValueError(
                f"SamplerConfig.blocked_ids={self.blocked_ids!r} must be a tuple of non-negative ints, e.g. the "
                "image placeholder id (151655,)"
            )
        if not (isinstance(self.pad_id, int) and self.pad_id >= 0):
            raise ValueError(f"SamplerConfig.pad_id={self.pad_id!r} must be a non-negative int")
        buckets = self.prompt_buckets
        if (
            not isinstance(buckets, tuple)
            or not buckets
            or not all(isinstance(b, int) and b >= 1 for b in buckets)
            or list(buckets) != sorted(set(buckets))
        ):
            raise ValueError(
                f"SamplerConfig.prompt_buckets={buckets!r} must be a non-empty, strictly increasing tuple of "
                "positive ints, e.g. (256, 512, 1024)"
            )
        try:
            jnp.dtype(self.cache_dtype)
        except TypeError as err:
            raise ValueError(
                f"SamplerConfig.cache_dtype={self.cache_dtype!r} is not a dtype name; use 'bfloat16' or 'float32'"
            ) from err

    @property
    def temperature(self) -> float:
        """Temperature of the distribution that reported log-probs come from."""
        return self.strategy.temperature

    @property
    def is_greedy(self) -> bool:
        return isinstance(self.strategy, Greedy)

    def bucket_for(self, prompt_length: int) -> int:
        """The smallest bucket >= prompt_length."""
        for bucket in self.prompt_buckets:
            if bucket >= prompt_length:
                return bucket
        raise ValueError(
            f"prompt length {prompt_length} exceeds the largest bucket in SamplerConfig.prompt_buckets="
            f"{self.prompt_buckets}; add a larger bucket or shorten the prompts"
        )
