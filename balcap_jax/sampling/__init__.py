"""Jitted group rollouts: shared image prefill, tiled KV cache, while_loop decode, per-token log-probs."""

from balcap_jax.sampling.config import DEFAULT_PROMPT_BUCKETS, SamplerConfig
from balcap_jax.sampling.rollout import FinishReason, Rollout, build_training_batch, tile_rows
from balcap_jax.sampling.sampler import DecodeStart, Sampler
from balcap_jax.sampling.strategies import Greedy, Temperature, TopP, tempered_log_probs

__all__ = [
    "DEFAULT_PROMPT_BUCKETS",
    "DecodeStart",
    "FinishReason",
    "Greedy",
    "Rollout",
    "Sampler",
    "SamplerConfig",
    "Temperature",
    "TopP",
    "build_training_batch",
    "tempered_log_probs",
    "tile_rows",
]
