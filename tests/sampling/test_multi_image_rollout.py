"""Group rollouts of Qwen2.5-VL prompts holding several images each: the tiled (P * G rows) batches read the
same image features, row for row, as the un-tiled prompts.

Both prompts hold two images of different sizes, so repeating image by image (a a b b) instead of prompt by
prompt (a b a b) would hand row p * G + 1 the wrong image. References run the P prompts once, without tiling.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from balcap_jax.models.qwen2_5_vl import params as qwen_params
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import make_inputs
from balcap_jax.models.qwen2_5_vl.vision_host import images_per_prompt_from_tokens, prepare_vision_inputs
from balcap_jax.rl.policy_logprobs import make_log_prob_fn
from balcap_jax.sampling import Sampler, SamplerConfig, TopP, build_training_batch
from balcap_jax.sampling.rollout import Rollout, tile_rows
from tests.models import qwen_fixtures as fx

pytestmark = pytest.mark.usefixtures("highest_precision")

GROUP = 2
NEW_TOKENS = 5
# (text tokens, image grid) pieces of each prompt; the grids differ within and across prompts.
PROMPT_LAYOUTS = (
    ((5, (1, 8, 12)), (4, (1, 4, 4)), (6, None)),
    ((3, (1, 4, 8)), (2, (1, 8, 8)), (3, None)),
)


@pytest.fixture(scope="module")
def setup():
    hf_model = fx.tiny_qwen_hf_model(seed=11)
    config = Qwen2_5_VLConfig.from_hf(hf_model.config.to_dict())
    model = fx.load_hf_into(qwen_params.abstract_model(config), fx.hf_state_numpy(hf_model))
    rng = np.random.default_rng(12)
    rows, grids = [], []
    for layout in PROMPT_LAYOUTS:
        parts = []
        for text, grid in layout:
            parts.append(fx.random_text_ids(rng, text))
            if grid is not None:
                parts.append(fx.image_placeholder(grid))
                grids.append(grid)
        rows.append(np.concatenate(parts))
    length = max(r.size for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros(ids.shape, bool)
    for r, row in enumerate(rows):  # left-padded, as the sampler runs prompts
        ids[r, length - row.size :], mask[r, length - row.size :] = row, True
    pixels = fx.random_pixel_values(rng, grids, config.vision.patch_dim)
    grid_thw = np.asarray(grids, np.int64)
    prompts = make_inputs(config, ids, mask, pixels, grid_thw)
    images_per_prompt = images_per_prompt_from_tokens(
        ids, mask, grid_thw, image_token_id=config.image_token_id, spatial_merge_size=config.spatial_merge_size
    )
    np.testing.assert_array_equal(images_per_prompt, [2, 2])

    def tile_vision(_vision, group: int) -> dict:
        return prepare_vision_inputs(
            pixels, grid_thw, config.vision, repeats=group, images_per_prompt=images_per_prompt
        )

    return model, config, prompts, tile_vision


def _tiled_prompts(prompts: dict, vision: dict, group: int) -> dict:
    return {
        "input_ids": tile_rows(jnp.asarray(prompts["input_ids"]), group),
        "attention_mask": tile_rows(jnp.asarray(prompts["attention_mask"]), group),
        "positions": tile_rows(jnp.asarray(prompts["positions"]), group, axis=1),
        "vision": jax.tree.map(jnp.asarray, vision),
    }


def _completion_copy(rollout: Rollout, g: int) -> Rollout:
    """The P rows p * G + g of a prompt-major rollout: one completion of every prompt."""
    def rows_of_copy(x) -> np.ndarray:
        x = np.asarray(x)
        return x.reshape(-1, GROUP, *x.shape[1:])[:, g]

    fields = (f.name for f in dataclasses.fields(rollout) if f.name != "decode_steps")  # decode_steps is a scalar
    return rollout.replace(**{name: rows_of_copy(getattr(rollout, name)) for name in fields})


def test_tiled_prefill_reads_each_prompts_images_in_order(setup):
    """Every tiled row's embedded prompt and prefill hidden states equal its un-tiled prompt's."""
    model, _, prompts, tile_vision = setup
    once = jax.tree.map(jnp.asarray, prompts)
    tiled = _tiled_prompts(prompts, tile_vision(prompts["vision"], GROUP), GROUP)
    expected_embeds = np.repeat(np.asarray(model.embed_inputs(once)), GROUP, axis=0)
    np.testing.assert_allclose(np.asarray(model.embed_inputs(tiled)), expected_embeds, atol=1e-6, rtol=0)
    expected_hidden = np.repeat(np.asarray(model.hidden_states(once)), GROUP, axis=0)
    mask = np.asarray(tiled["attention_mask"])
    np.testing.assert_allclose(np.asarray(model.hidden_states(tiled))[mask], expected_hidden[mask], atol=1e-5)


def test_training_batch_log_probs_equal_per_prompt_forwards_and_the_sampler(setup):
    """The update's log-probs on the tiled training batch == the un-tiled prompts scored one completion copy
    at a time (rows p of copy g = completion p * G + g), and == the sampler's own log-probs."""
    model, config, prompts, tile_vision = setup
    strategy = TopP(top_p=0.95, temperature=0.9)
    sampler_config = SamplerConfig(
        max_new_tokens=NEW_TOKENS, eos_ids=(), pad_id=0, strategy=strategy, group_size=GROUP,
        prompt_buckets=(48, 96), cache_dtype="float32",
        blocked_ids=(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                     config.vision_end_token_id),
    )  # fmt: skip
    sampler, state = Sampler.from_model(model)
    rollout = sampler(state, prompts, sampler_config, jax.random.key(13))
    ran = sampler.prepare_prompts(prompts, sampler_config)
    batch = build_training_batch(ran, rollout, GROUP, tile_vision=tile_vision)
    graphdef, params = nnx.split(model)
    log_prob_fn = jax.jit(make_log_prob_fn(graphdef, temperature=strategy.temperature))
    tiled, _ = log_prob_fn(params, jax.tree.map(jnp.asarray, dict(batch)))
    tiled = np.asarray(tiled).reshape(-1, GROUP, NEW_TOKENS)

    completion_mask = np.asarray(rollout.completion_mask).reshape(-1, GROUP, NEW_TOKENS)
    for g in range(GROUP):
        rows = build_training_batch(ran, _completion_copy(rollout, g), 1, tile_vision=lambda vision, _: vision)
        reference, _ = log_prob_fn(params, jax.tree.map(jnp.asarray, dict(rows)))
        mask = completion_mask[:, g]
        np.testing.assert_allclose(tiled[:, g][mask], np.asarray(reference)[mask], atol=1e-5, rtol=0)
    sampled = np.asarray(rollout.logprobs).reshape(-1, GROUP, NEW_TOKENS)
    np.testing.assert_allclose(tiled[completion_mask], sampled[completion_mask], atol=1e-5, rtol=0)
    assert not np.array_equal(*np.asarray(rollout.tokens).reshape(-1, GROUP, NEW_TOKENS)[0]), "copies differ"
