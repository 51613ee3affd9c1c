"""Sampler behaviour on the toy CausalLM: exactness against the full forward, groups, EOS, sharding, compiles."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from balcap_jax.parallel.mesh import make_mesh
from balcap_jax.sampling import FinishReason, Sampler, SamplerConfig, Temperature, TopP, build_training_batch
from tests.sampling.reference import completion_logprobs_full_forward, greedy_reference
from tests.sampling.toy_lm import IMAGE_TOKEN, ToyLM, make_toy
from tests.sampling.toy_prompts import EOS, PAD, tile_toy_vision, toy_prompts

LENGTHS = (9, 5, 12, 7)  # left padding of 3, 7, 0, 5 before bucketing, more after


def config(**overrides) -> SamplerConfig:
    # The toy reads every IMAGE_TOKEN as an image slot, so completions must never contain it.
    base = dict(
        max_new_tokens=8,
        eos_ids=(),
        pad_id=PAD,
        prompt_buckets=(16, 32),
        cache_dtype="float32",
        blocked_ids=(IMAGE_TOKEN,),
    )
    return SamplerConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def toy():
    model = make_toy()
    sampler, state = Sampler.from_model(model)
    return model, sampler, state


def test_greedy_equals_stepwise_argmax_of_full_forward(toy, highest_precision):
    model, sampler, state = toy
    prompts = toy_prompts(LENGTHS, images=3)
    rollout = sampler(state, prompts, config(), jax.random.key(0))
    expected = greedy_reference(model, prompts, num_new=8)
    np.testing.assert_array_equal(np.asarray(rollout.tokens), expected)
    assert np.asarray(rollout.completion_mask).all()
    np.testing.assert_array_equal(rollout.finish_reason, FinishReason.LENGTH)


def test_greedy_1d_positions_and_bf16_cache_match_reference(toy):
    model, sampler, state = toy
    prompts = toy_prompts(LENGTHS, mrope=False, seed=1)
    rollout = sampler(state, prompts, config(cache_dtype="bfloat16", max_new_tokens=4), jax.random.key(0))
    expected = greedy_reference(model, prompts, num_new=4)
    # bf16 keys/values perturb logits by ~1e-2; argmax agrees unless a row has a near-tie.
    assert (np.asarray(rollout.tokens) == expected).mean() >= 0.9


@pytest.mark.parametrize("strategy", [Temperature(temperature=0.7), TopP(top_p=0.8, temperature=1.3, top_k=10)])
def test_logprobs_equal_tempered_log_softmax_of_training_forward(toy, highest_precision, strategy):
    model, sampler, state = toy
    prompts = toy_prompts(LENGTHS, images=2, seed=2)
    cfg = config(strategy=strategy, group_size=3, eos_ids=(EOS,))
    rollout = sampler(state, prompts, cfg, jax.random.key(3))
    batch = build_training_batch(sampler.prepare_prompts(prompts, cfg), rollout, 3, tile_vision=tile_toy_vision)
    expected = completion_logprobs_full_forward(model, batch, strategy.temperature)
    np.testing.assert_allclose(np.asarray(rollout.logprobs), expected, atol=1e-5, rtol=0)
    assert np.asarray(rollout.logprobs)[np.asarray(rollout.completion_mask)].max() < 0


def test_prefill_runs_once_per_prompt_not_per_sample():
    seen_batches: list[int] = []

    class CountingToy(ToyLM):
        def prefill(self, inputs, cache):
            seen_batches.append(inputs["input_ids"].shape[0])
            return super().prefill(inputs, cache)

    sampler, state = Sampler.from_model(CountingToy(rngs=nnx.Rngs(0)))
    rollout = sampler(state, toy_prompts((4, 6)), config(group_size=4, max_new_tokens=2), jax.random.key(0))
    assert rollout.tokens.shape == (8, 2)
    assert seen_batches == [2]


def test_eos_stops_row_and_pads(toy):
    _, sampler, state = toy
    prompts = toy_prompts(LENGTHS, seed=6)
    free = np.asarray(sampler(state, prompts, config(), jax.random.key(0)).tokens)
    # Make row 0's third token an EOS id, provided it did not occur earlier in that row.
    eos = int(free[0, 2])
    assert eos not in free[0, :2]
    stopped = sampler(state, prompts, config(eos_ids=(eos,)), jax.random.key(0))
    tokens, mask = np.asarray(stopped.tokens), np.asarray(stopped.completion_mask)
    np.testing.assert_array_equal(tokens[0], [*free[0, :3], *[PAD] * 5])
    np.testing.assert_array_equal(mask[0], [True] * 3 + [False] * 5)
    np.testing.assert_array_equal(np.asarray(stopped.logprobs)[0, 3:], 0.0)
    assert int(stopped.lengths[0]) == 3 and int(stopped.finish_reason[0]) == FinishReason.EOS
    for row in range(1, len(LENGTHS)):
        hits = np.flatnonzero(free[row] == eos)
        length = hits[0] + 1 if hits.size else 8
        assert int(stopped.lengths[row]) == length
        np.testing.assert_array_equal(tokens[row, :length], free[row, :length])
        np.testing.assert_array_equal(mask[row], np.arange(8) < length)
        expected_reason = FinishReason.EOS if hits.size else FinishReason.LENGTH
        assert int(stopped.finish_reason[row]) == expected_reason
    np.testing.assert_array_equal(stopped.lengths, mask.sum(-1))


def test_loop_stops_early_when_every_row_ended(toy):
    _, sampler, state = toy
    prompts = toy_prompts(LENGTHS, seed=7)
    free = np.asarray(sampler(state, prompts, config(), jax.random.key(0)).tokens)
    eos_ids = tuple(sorted({int(t) for t in free[:, 1]}))
    stopped = sampler(state, prompts, config(eos_ids=eos_ids), jax.random.key(0))
    assert int(stopped.decode_steps) <= 2
    assert (np.asarray(stopped.lengths) <= 2).all()
    np.testing.assert_array_equal(stopped.finish_reason, FinishReason.EOS)
    np.testing.assert_array_equal(np.asarray(stopped.tokens)[:, 2:], PAD)


def test_deterministic_given_key(toy):
    _, sampler, state = toy
    prompts = toy_prompts(LENGTHS, seed=8)
    cfg = config(strategy=TopP(top_p=0.95), group_size=2)
    a = sampler(state, prompts, cfg, jax.random.key(11))
    b = sampler(state, prompts, cfg, jax.random.key(11))
    c = sampler(state, prompts, cfg, jax.random.key(12))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_identical_on_one_and_eight_devices(highest_precision):
    """Batch over 'data' on an 8-device mesh, prompts sharded too (8 prompts). The real-model tests cover
    the replicated-prefill case (fewer prompts than batch shards)."""
    model = make_toy(seed=1)
    prompts = toy_prompts((*LENGTHS, 6, 11, 3, 8), images=2, seed=9)
    cfg = config(strategy=Temperature(temperature=1.0), group_size=2, eos_ids=(EOS,))
    single, state = Sampler.from_model(model)
    one = single(state, prompts, cfg, jax.random.key(2))

    mesh = make_mesh((8, 1, 1))
    sharded_sampler = Sampler(nnx.graphdef(model), mesh=mesh)
    replicated_state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    eight = sharded_sampler(replicated_state, prompts, cfg, jax.random.key(2))
    assert len(eight.tokens.sharding.device_set) == 8
    assert eight.tokens.sharding.spec[0] is not None, "rollout rows should be sharded over the mesh"
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(eight.tokens))
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(eight.logprobs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(one.lengths), np.asarray(eight.lengths))


def test_compiled_variants_count_buckets_not_lengths():
    sampler, state = Sampler.from_model(make_toy(seed=2))
    cfg = config(max_new_tokens=3)
    key = jax.random.key(0)
    sampler(state, toy_prompts((5, 9)), cfg, key)
    assert sampler.compiled_variants == 2  # one prefill + one decode program
    sampler(state, toy_prompts((12, 3)), cfg, key)  # other lengths, same bucket (16)
    sampler(state, toy_prompts((16, 2)), cfg, jax.random.key(1))
    assert sampler.compiled_variants == 2
    sampler(state, toy_prompts((20, 3)), cfg, key)  # bucket 32
    assert sampler.compiled_variants == 4
    sampler(state, toy_prompts((5, 9)), config(max_new_tokens=4), key)  # a new static config
    assert sampler.compiled_variants == 6
    assert sampler.metrics()["sampler/compiled_variants"] == 6.0
    assert sampler.compile_seconds > 0


def test_training_batch_layout(toy):
    _, sampler, state = toy
    prompts = toy_prompts((5, 9), images=2, seed=10)
    cfg = config(group_size=2, max_new_tokens=4, strategy=Temperature(), eos_ids=(EOS,))
    rollout = sampler(state, prompts, cfg, jax.random.key(4))
    ran = sampler.prepare_prompts(prompts, cfg)
    batch = build_training_batch(ran, rollout, 2, tile_vision=tile_toy_vision)
    assert batch["input_ids"].shape == (4, 16 + 4)
    assert batch["positions"].shape == (3, 4, 20)
    np.testing.assert_array_equal(batch["input_ids"][:, :16], np.repeat(ran["input_ids"], 2, axis=0))
    np.testing.assert_array_equal(batch["input_ids"][:, 16:], rollout.tokens)
    np.testing.assert_array_equal(batch["attention_mask"][:, 16:], rollout.completion_mask)
    # Completion positions continue after the largest prompt position, identically on t/h/w.
    prompt_max = np.repeat(np.where(ran["attention_mask"][None], ran["positions"], -1).max(axis=(0, 2)), 2)
    expected = prompt_max[:, None] + 1 + np.arange(4)[None]
    for axis in range(3):
        np.testing.assert_array_equal(batch["positions"][axis, :, 16:], expected)
    with pytest.raises(ValueError, match="tile_vision"):
        build_training_batch(ran, rollout, 2)


def test_bad_prompts_raise_clear_errors(toy):
    _, sampler, state = toy
    prompts = toy_prompts((5, 9))
    right_padded = {k: np.asarray(v)[..., ::-1].copy() for k, v in prompts.items()}
    with pytest.raises(ValueError, match="LEFT-padded"):
        sampler(state, right_padded, config(), jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_buckets"):
        sampler(state, toy_prompts((40,)), config(), jax.random.key(0))
    with pytest.raises(ValueError, match="missing"):
        sampler(state, {"input_ids": prompts["input_ids"]}, config(), jax.random.key(0))
    mesh_sampler = Sampler(sampler.graphdef, mesh=make_mesh((8, 1, 1)))
    with pytest.raises(ValueError, match="batch shards"):
        mesh_sampler.prepare_prompts(toy_prompts((5, 9, 3)), config(group_size=2))


def test_blocked_ids_are_never_sampled(toy):
    _, sampler, state = toy
    prompts = toy_prompts(LENGTHS, seed=12)
    free = np.asarray(sampler(state, prompts, config(blocked_ids=()), jax.random.key(0)).tokens)
    blocked = tuple(sorted({int(t) for t in free[:, :3].ravel()}))
    cfg = config(blocked_ids=blocked, strategy=Temperature(temperature=2.0), group_size=4)
    tokens = np.asarray(sampler(state, prompts, cfg, jax.random.key(1)).tokens)
    assert not np.isin(tokens, blocked).any()


def test_decode_donates_and_updates_the_cache_in_place(toy):
    _, sampler, state = toy
    cfg = config(max_new_tokens=5)
    ran = sampler.prepare_prompts(toy_prompts(LENGTHS, seed=13), cfg)
    start = sampler.prefill(state, ran, cfg)
    cache_bytes = start.cache.k.nbytes + start.cache.v.nbytes
    compiled = sampler._decode.compiled_variant(
        state, start.cache, start.logits, start.start_positions, jax.random.key(0),
        graphdef=sampler.graphdef, config=cfg, layout=sampler.layout,
    )  # fmt: skip
    assert compiled.memory_analysis().alias_size_in_bytes >= cache_bytes
    rollout = sampler.decode(state, start, cfg, jax.random.key(0))
    assert rollout.tokens.shape == (len(LENGTHS), 5)
    assert start.cache.k.is_deleted() and start.cache.v.is_deleted()
