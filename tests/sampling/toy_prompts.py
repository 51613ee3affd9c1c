"""Left-padded prompt batches (with fake images and M-RoPE positions) for the toy LM."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tests.sampling.toy_lm import IMAGE_TOKEN

PAD = 0
EOS = 1
FIRST_TEXT_TOKEN = 4  # ids below are reserved: pad, eos, unused, image


def toy_prompts(
    lengths: tuple[int, ...], *, vocab: int = 64, images: int = 0, dim: int = 32, mrope: bool = True, seed: int = 0
) -> dict:
    """One row per entry of `lengths` (real tokens, `images` image tokens included), left-padded to the max.

    M-RoPE positions: text advances all three axes together; the image tokens of a row share one temporal
    position and spread over a 2-wide height/width grid, so the next text position is max + 1 as in Qwen.
    """
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), bool)
    positions = np.zeros((3, len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        tokens = rng.integers(FIRST_TEXT_TOKEN, vocab, size=length).astype(np.int32)
        if images:
            tokens[1 : 1 + images] = IMAGE_TOKEN
        ids[row, width - length :] = tokens
        mask[row, width - length :] = True
        pos, t = [], 0
        for i in range(length):
            if images and 1 <= i < 1 + images:
                k = i - 1
                pos.append((t, t + k // 2, t + k % 2))
                if k == images - 1:
                    t = max(pos[-1]) + 1
            else:
                pos.append((t, t, t))
                t += 1
        positions[:, row, width - length :] = np.asarray(pos, np.int32).T
    batch = {"input_ids": ids, "attention_mask": mask, "positions": positions if mrope else positions[0]}
    if images:
        batch["vision"] = {"features": rng.normal(size=(len(lengths), images, dim)).astype(np.float32)}
    return batch


def tile_toy_vision(vision: dict, group_size: int) -> dict:
    return {"features": jnp.repeat(jnp.asarray(vision["features"]), group_size, axis=0)}
