"""The sampler on the real policies (tiny Qwen2.5-VL and LLaVA-1.5) with images and left-padded prompts.

Reference = our own full (non-cached) training forward, which tests/models checks against HF transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import pytest
from flax import nnx

from balcap_jax.models.llava import config as llava_config
from balcap_jax.models.llava import processor as llava_processor
from balcap_jax.models.llava.model import LlavaForCausalLM
from balcap_jax.models.qwen2_5_vl import params as qwen_params
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.models.qwen2_5_vl.model import make_inputs
from balcap_jax.models.llava.sharding import LlavaSharding
from balcap_jax.models.qwen2_5_vl.sharding import QwenSharding
from balcap_jax.parallel.mesh import make_mesh
from balcap_jax.parallel.sharding import named_leaves
from balcap_jax.sampling import Greedy, Sampler, SamplerConfig, TopP, build_training_batch
from balcap_jax.tools import parity
from tests.models import qwen_fixtures as fx
from tests.sampling.reference import completion_logprobs_full_forward, greedy_reference

pytestmark = pytest.mark.usefixtures("highest_precision")

GROUP = 2
Q_KERNEL = "model.language_model.layers.self_attn.q_proj.kernel"
NEW_TOKENS = 6


@dataclasses.dataclass
class Policy:
    """A tiny policy, a left-padded prompt batch with images, and how to repeat its images per row."""

    model: nnx.Module
    prompts: dict
    blocked_ids: tuple[int, ...]  # image placeholder ids: a completion holding one would be read as an image
    repeat_rows: Callable[[int], dict]  # G -> the prompt batch with every row (and its images) repeated G times
    eos_id: int


def _qwen() -> Policy:
    hf_model = fx.tiny_qwen_hf_model(seed=3)
    config = Qwen2_5_VLConfig.from_hf(hf_model.config.to_dict())
    model = fx.load_hf_into(qwen_params.abstract_model(config), fx.hf_state_numpy(hf_model))
    # Row 0: two images of different sizes; row 1: a shorter text-only prompt, left-padded.
    batch = parity.build_batch(config, seed=4, prompt_tokens=40, image_grids=((1, 8, 12), (1, 4, 4)))

    def repeat_rows(group: int) -> dict:
        return make_inputs(
            config,
            np.repeat(batch.input_ids, group, axis=0),
            np.repeat(batch.attention_mask, group, axis=0),
            np.tile(batch.pixel_values, (group, 1)),  # only row 0 has images: its images, G times
            np.tile(batch.image_grid_thw, (group, 1)),
        )

    specials = (config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)
    return Policy(model, repeat_rows(1), specials, repeat_rows, eos_id=fx.TEXT_TOKEN_MAX + 1)


def _llava() -> Policy:
    config = llava_config.tiny()
    model = LlavaForCausalLM(config, rngs=nnx.Rngs(5))
    rng = np.random.default_rng(6)
    image = config.image_token_id
    rows = []
    for length in (30, 17):  # one image per row, different prompt lengths -> left padding
        ids = list(rng.integers(1, image - 1, size=length))
        ids[2 : 2 + config.image_seq_length] = [image] * config.image_seq_length
        rows.append(ids)
    pixels = rng.normal(size=(2, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)

    def repeat_rows(group: int) -> dict:
        return llava_processor.make_batch(
            [row for row in rows for _ in range(group)], np.repeat(pixels, group, axis=0), config, pad_id=0
        )

    return Policy(model, repeat_rows(1), (image,), repeat_rows, eos_id=2)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava"])
def policy(request) -> Policy:
    return {"qwen2_5_vl": _qwen, "llava": _llava}[request.param]()


def _config(policy: Policy, **overrides) -> SamplerConfig:
    base = dict(
        max_new_tokens=NEW_TOKENS,
        eos_ids=(policy.eos_id,),
        pad_id=0,
        prompt_buckets=(48, 96),
        cache_dtype="float32",
        blocked_ids=policy.blocked_ids,
    )
    return SamplerConfig(**{**base, **overrides})


def test_greedy_equals_stepwise_argmax_of_full_forward(policy):
    sampler, state = Sampler.from_model(policy.model)
    config = _config(policy, strategy=Greedy(), eos_ids=())
    rollout = sampler(state, policy.prompts, config, jax.random.key(0))
    ran = sampler.prepare_prompts(policy.prompts, config)
    expected = greedy_reference(policy.model, ran, NEW_TOKENS, blocked_ids=policy.blocked_ids)
    np.testing.assert_array_equal(np.asarray(rollout.tokens), expected)


def test_sampled_logprobs_equal_training_forward_and_tiling_equals_separate_prefills(policy):
    """Group tiling (one prefill per prompt) == every row prefilled separately, and the training batch built
    from the rollout recomputes the sampler's log-probs token for token."""
    sampler, state = Sampler.from_model(policy.model)
    strategy = TopP(top_p=0.9, temperature=0.8)
    key = jax.random.key(7)
    tiled = sampler(state, policy.prompts, _config(policy, strategy=strategy, group_size=GROUP), key)
    separate = sampler(state, policy.repeat_rows(GROUP), _config(policy, strategy=strategy, group_size=1), key)
    np.testing.assert_array_equal(np.asarray(tiled.tokens), np.asarray(separate.tokens))
    np.testing.assert_allclose(np.asarray(tiled.logprobs), np.asarray(separate.logprobs), atol=1e-5)
    groups = np.asarray(tiled.tokens).reshape(-1, GROUP, NEW_TOKENS)
    assert any(not np.array_equal(rows[0], rows[1]) for rows in groups), "a group's samples share the prefill only"

    config = _config(policy, strategy=strategy, group_size=GROUP)
    repeated = sampler.prepare_prompts(policy.repeat_rows(GROUP), config)
    batch = build_training_batch(
        sampler.prepare_prompts(policy.prompts, config), tiled, GROUP, tile_vision=lambda _, g: repeated["vision"]
    )
    np.testing.assert_array_equal(np.asarray(batch["input_ids"])[:, : repeated["input_ids"].shape[1]],
                                  repeated["input_ids"])  # fmt: skip
    expected = completion_logprobs_full_forward(policy.model, batch, strategy.temperature)
    np.testing.assert_allclose(np.asarray(tiled.logprobs), expected, atol=1e-5, rtol=0)


def test_identical_on_one_and_eight_devices_with_sampling_layout(policy):
    """Weights in the sampling layout (tensor-parallel, no FSDP) on a (data=4, tensor=2) mesh."""
    graphdef, state = nnx.split(policy.model)
    config = _config(policy, strategy=TopP(top_p=0.95), group_size=GROUP)
    one = Sampler(graphdef)(state, policy.prompts, config, jax.random.key(9))

    mesh = make_mesh((4, 1, 2))
    layout = LlavaSharding if isinstance(policy.model, LlavaForCausalLM) else QwenSharding
    params = layout.sampling().shard_params(nnx.state(policy.model, nnx.Param), mesh)
    model = nnx.merge(graphdef, state)
    nnx.update(model, params)
    sharded_state = nnx.state(model)
    assert not dict(named_leaves(sharded_state))[Q_KERNEL].sharding.is_fully_replicated
    eight = Sampler(graphdef, mesh=mesh)(sharded_state, policy.prompts, config, jax.random.key(9))
    assert len(eight.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(eight.tokens))
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(eight.logprobs), atol=1e-5)
