"""What a rollout returns, and the RL training batch built from it.

Rows are prompt-major: row p * G + g is completion g of prompt p, so `x.reshape(P, G, ...)` groups them the
way advantages (`rewards[P, G, K]`) expect.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from balcap_jax.models.interface import SequenceInputs

Array = jax.Array


class FinishReason(enum.IntEnum):
    """Why a row stopped: it emitted an EOS id, or it filled the `max_new_tokens` buffer."""

    EOS = 0
    LENGTH = 1


@struct.dataclass
class Rollout:
    """Completions for N = P * G rows, in fixed-size buffers of T_new = max_new_tokens columns.

    tokens:          int32[N, T_new] sampled ids; `pad_id` after the row's end.
    logprobs:        fp32[N, T_new] log_softmax(logits / T)[token] under the full tempered distribution
                     (see `strategies`); 0 after the row's end. They come from the sampling forward (bf16 KV
                     cache by default), so they match the trainer's fp32 recomputation to bf16 rounding, not
                     bit for bit; with an fp32 cache they agree to ~1e-5.
    completion_mask: bool[N, T_new] True on generated tokens, EOS included.
    lengths:         int32[N] number of generated tokens (== completion_mask.sum(-1)).
    finish_reason:   int32[N] `FinishReason` values.
    start_positions: int32[N] text position of the first generated token (completion j sits at start + j).
    decode_steps:    int32[] decode steps actually run (< T_new when every row ended early).
    """

    tokens: Array
    logprobs: Array
    completion_mask: Array
    lengths: Array
    finish_reason: Array
    start_positions: Array
    decode_steps: Array

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_new_tokens(self) -> int:
        return self.tokens.shape[1]


def completion_bucket(longest: int, max_new_tokens: int, min_columns: int = 16) -> int:
    """Completion columns the update keeps for a batch whose longest row has `longest` generated tokens: the
    smallest power of two >= max(longest, min_columns), capped at `max_new_tokens`. Powers of two bound the
    distinct update shapes (each is one compile) to about log2(max_new_tokens / min_columns) + 2, while
    wasting at most half the kept columns."""
    if longest < 0 or longest > max_new_tokens:
        raise ValueError(
            f"longest={longest}: a rollout's longest row must lie in [0, max_new_tokens={max_new_tokens}]; pass "
            "the maximum of Rollout.lengths (agreed over processes) of a rollout sampled with that buffer"
        )
    if min_columns < 1:
        raise ValueError(f"min_columns={min_columns}: keep at least 1 column (e.g. 16)")
    bucket = 1 << max(int(max(longest, min_columns)) - 1, 0).bit_length()
    return min(bucket, max_new_tokens)


def trim_rollout(rollout: Rollout, columns: int) -> Rollout:
    """The rollout cut to its first `columns` completion columns ([N, T_new] -> [N, columns]). Only padding
    may be dropped: every row's generated tokens must fit, so a training batch built from the trimmed rollout
    scores the same tokens as the untrimmed one (the dropped columns sit after every row's end, and a causal
    forward never lets them reach earlier columns)."""
    longest = int(np.max(np.asarray(rollout.lengths))) if rollout.num_rows else 0
    if not longest <= columns <= rollout.max_new_tokens:
        raise ValueError(
            f"columns={columns}: must lie in [longest row {longest}, max_new_tokens {rollout.max_new_tokens}]; "
            "use completion_bucket(longest, max_new_tokens) so no generated token is dropped"
        )
    if columns == rollout.max_new_tokens:
        return rollout
    cut = lambda x: x[:, :columns]  # noqa: E731
    return rollout.replace(tokens=cut(rollout.tokens), logprobs=cut(rollout.logprobs),
                           completion_mask=cut(rollout.completion_mask))


def tile_rows(x: Array, group_size: int, axis: int = 0) -> Array:
    """Repeats each row `group_size` times along `axis`, consecutively: [a, b] -> [a, a, b, b] for G=2."""
    return jnp.repeat(x, group_size, axis=axis, total_repeat_length=x.shape[axis] * group_size)


def completion_positions(start_positions: Array, num_tokens: int, rope_axes: int | None) -> Array:
    """Positions of completion tokens: start + j, int32[N, T_new], or [3, N, T_new] (same on t/h/w) for M-RoPE."""
    positions = start_positions[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None]
    if rope_axes is None:
        return positions
    return jnp.broadcast_to(positions[None], (rope_axes, *positions.shape))


def build_training_batch(
    prompts: SequenceInputs,
    rollout: Rollout,
    group_size: int,
    *,
    tile_vision: Callable[[Any, int], Any] | None = None,
) -> dict[str, Any]:
    """The RL training batch: each prompt row tiled G times, followed by its completion.

    prompts: the prompt batch *as the sampler ran it* (left-padded to its bucket: `Sampler.prepare_prompts`),
    with P rows of length T. Returns a dict:

      input_ids       int32[N, T + T_new]      prompt ++ completion (pad after a row's end)
      attention_mask  bool[N, T + T_new]       prompt mask ++ completion_mask
      positions       int32[N, T + T_new] or [3, N, T + T_new]: the prompt's positions ++ start + j
      vision          `tile_vision(prompts["vision"], G)` when the prompts carry images
      completion_ids  int32[N, T_new]          = rollout.tokens
      completion_mask bool[N, T_new]
      old_logprobs    fp32[N, T_new]           the sampler's log-probs (0 off the mask)

    Completion token j is input_ids[:, T + j] and is predicted by the hidden state at column T - 1 + j, i.e.
    `hidden[:, -(T_new + 1):-1]` of a full forward, which then lines up with `old_logprobs` token for token.
    `tile_vision(vision, G)` must return the vision inputs for the tiled batch (each prompt's images G times,
    prompt-major); it is model-specific, so there is no default.
    """
    ids, mask, positions = prompts["input_ids"], prompts["attention_mask"], prompts["positions"]
    num_prompts, _ = ids.shape
    chex.assert_equal(rollout.num_rows, num_prompts * group_size)
    num_new = rollout.max_new_tokens
    rope_axes = positions.shape[0] if positions.ndim == 3 else None
    batch_axis = 1 if rope_axes is not None else 0

    batch: dict[str, Any] = {
        "input_ids": jnp.concatenate([tile_rows(jnp.asarray(ids, jnp.int32), group_size), rollout.tokens], axis=1),
        "attention_mask": jnp.concatenate(
            [tile_rows(jnp.asarray(mask, bool), group_size), rollout.completion_mask], axis=1
        ),
        "positions": jnp.concatenate(
            [
                tile_rows(jnp.asarray(positions, jnp.int32), group_size, axis=batch_axis),
                completion_positions(rollout.start_positions, num_new, rope_axes),
            ],
            axis=-1,
        ),
        "completion_ids": rollout.tokens,
        "completion_mask": rollout.completion_mask,
        "old_logprobs": rollout.logprobs,
    }
    if prompts.get("vision") is not None:
        if tile_vision is None:
            raise ValueError(
                "the prompts carry 'vision' inputs; pass tile_vision=<fn(vision, group_size)> that repeats each "
                "prompt's images group_size times (prompt-major), e.g. the policy model's vision tiler"
            )
        batch["vision"] = tile_vision(prompts["vision"], group_size)
    return batch
