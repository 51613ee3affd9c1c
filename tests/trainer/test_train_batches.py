"""Host-side batch assembly of the trainer on a real ShapesWorld pipeline batch and a tiny policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from balcap_jax import default_config
from balcap_jax.data import pipeline as pipeline_lib
from balcap_jax.data.qwen_inputs import QWEN_CONCAT_KEYS, QwenCaptionProcessor
from balcap_jax.data.shapes_world_warm_start import WARM_START_KEY, sft_target
from balcap_jax.models.image_shards import IMAGES_PER_SHARD
from balcap_jax.sampling.rollout import build_training_batch, tile_rows
from balcap_jax.trainer import batches
from balcap_jax.trainer.data_sources import corpus_texts, prepare_data
from balcap_jax.trainer.policy import build_policy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = default_config.get_config()
    config.data.shapes_world.num_train = 8
    config.data.shapes_world.num_eval = 4
    config.data.records_dir = str(tmp_path_factory.mktemp("data"))
    train, _ = prepare_data(config, tmp_path_factory.mktemp("work"))
    policy = build_policy(config, corpus=corpus_texts(train), seed=0)
    processor = batches.PolicyPromptProcessor(
        QwenCaptionProcessor(policy.tokenizer, instruction=config.data.prompt, image_config=policy.image_config),
        policy,
    )
    cfg = pipeline_lib.PipelineConfig(batch_size=2, buckets=(64, 128), shuffle=False, pad_id=policy.pad_id,
                                      concat_keys=QWEN_CONCAT_KEYS)
    batch = next(iter(pipeline_lib.make_dataset(train, processor, cfg)))
    return config, policy, batch


def test_prompt_ids_are_in_the_policy_vocabulary_and_keep_image_slots(setup):
    _, policy, batch = setup
    prompts = batches.prompt_inputs(policy, batch)
    ids = prompts["input_ids"]
    assert ids.max() < policy.vocab.size
    real = ids[prompts["attention_mask"]]
    assert policy.vocab.unk_id not in real, "a prompt token fell outside the vocabulary subset"
    image_tokens = (ids == policy.model_config.image_token_id).sum(axis=1)
    grid = np.asarray(batch["image_grid_thw"])
    np.testing.assert_array_equal(image_tokens, grid.prod(axis=1) // 4)


def test_sft_batch_scores_exactly_the_warm_start_target_tokens_then_eos(setup):
    """Each row is fitted to its record's imperfect warm-start caption (the default world's captioner habits),
    else to its first reference."""
    _, policy, batch = setup
    prompts = batches.prompt_inputs(policy, batch)
    sft = batches.sft_batch(policy, batch, max_new_tokens=96)
    targets = [sft_target(meta, refs) for meta, refs in zip(batch["metadata"], batch["references"])]
    assert any(meta.get(WARM_START_KEY) for meta in batch["metadata"]), "the default world carries warm-start captions"
    for row, target in enumerate(targets):
        ids = sft["completion_ids"][row][sft["completion_mask"][row]]
        assert ids[-1] == policy.eos_id
        assert policy.decode(ids[:-1]) == target.strip()
    # completion positions continue the prompt's M-RoPE positions one by one
    prompt_len = prompts["input_ids"].shape[1]
    pos = sft["positions"][:, :, prompt_len:]
    assert np.all(np.diff(pos, axis=-1) == 1) and np.all(pos[0] == pos[1])


def test_repeated_vision_inputs_equal_tiling_the_images(setup):
    _, policy, batch = setup
    model = policy.model
    once = batches.vision_inputs(policy, batch, repeats=1)
    tiled = batches.vision_inputs(policy, batch, repeats=3)
    emb_once = np.asarray(model.model.visual(jax.tree.map(jnp.asarray, once)))[0]  # one block of rows
    emb_tiled = np.asarray(model.model.visual(jax.tree.map(jnp.asarray, tiled)))[0]
    per_image = int(np.asarray(batch["image_grid_thw"])[0].prod()) // 4
    n_images = len(batch["references"])
    expected = np.repeat(emb_once[: n_images * per_image].reshape(n_images, per_image, -1), 3, axis=0)
    np.testing.assert_allclose(emb_tiled[: 3 * n_images * per_image], expected.reshape(-1, expected.shape[-1]),
                               atol=1e-5)


def test_reward_items_group_captions_prompt_major(setup):
    _, _, batch = setup
    captions = [f"c{i}" for i in range(6)]
    groups = batches.reward_items(batch, captions, group_size=3)
    assert [[item.caption for item in group] for group in groups] == [["c0", "c1", "c2"], ["c3", "c4", "c5"]]
    assert groups[1][0].metadata["scene_graph"] == batch["metadata"][1]["scene_graph"]
    assert groups[0][0].image == batch["image_bytes"][0]


def test_training_batch_from_a_rollout_lines_up_with_the_policy_log_probs(setup):
    """The log-probs the trainer recomputes on an SFT-shaped batch equal a direct full-logit computation."""
    _, policy, batch = setup
    from balcap_jax.rl.policy_logprobs import make_log_prob_fn

    prompts = batches.prompt_inputs(policy, batch)
    rollout = batches.reference_completions(policy, [r[0] for r in batch["references"]], prompts, 40)
    train = build_training_batch(prompts, rollout, 1, tile_vision=batches.tile_vision_for(policy, batch))
    train = jax.tree.map(jnp.asarray, dict(train))
    graphdef, state = nnx.split(policy.model)
    with jax.default_matmul_precision("highest"):
        logprobs, _ = make_log_prob_fn(graphdef)(state, train)
        logits = policy.model(train)
    full = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = train["input_ids"][:, 1:]
    direct = jnp.take_along_axis(full, targets[..., None], axis=-1)[..., 0][:, -40:]
    mask = np.asarray(train["completion_mask"])
    np.testing.assert_allclose(np.asarray(logprobs)[mask], np.asarray(direct)[mask], atol=1e-4)


def _group_batch(policy, batch, group: int, new_tokens: int) -> dict:
    """The update batch (without vision) of each prompt's reference caption as G = `group` identical rollouts."""
    text = {k: np.asarray(tile_rows(jnp.asarray(v), group, axis=1 if k == "positions" else 0))
            for k, v in batches.text_inputs(batch).items()}
    references = [r[0] for r in batch["references"] for _ in range(group)]
    rollout = batches.reference_completions(policy, references, text, new_tokens)
    return build_training_batch(batches.text_inputs(batch), rollout, group)


@pytest.mark.parametrize("blocks", [2, 3, 6])
def test_images_in_blocks_of_rows_give_the_log_probs_of_one_block(setup, blocks):
    """The update batch's images laid out per block of rows (2 prompts x G=3 rows: whole groups per block, a group
    straddling two blocks, one row per block) score every token as the single-block layout does."""
    _, policy, batch = setup
    from balcap_jax.rl.policy_logprobs import make_log_prob_fn

    group = 3
    train = _group_batch(policy, batch, group, 40)
    family = policy.family
    graphdef, state = nnx.split(policy.model)
    log_probs = jax.jit(make_log_prob_fn(graphdef))
    scores = {}
    for k in (1, blocks):
        vision = family.vision_inputs(policy.model_config, batch, group, k)
        assert vision["patches"].shape[0] == k and vision[IMAGES_PER_SHARD].sum() >= len(batch["references"])
        with jax.default_matmul_precision("highest"):
            scores[k] = np.asarray(log_probs(state, jax.tree.map(jnp.asarray, {**train, "vision": vision}))[0])
    mask = np.asarray(train["completion_mask"])
    np.testing.assert_allclose(scores[blocks][mask], scores[1][mask], atol=2e-5)


def test_qwen_micro_batches_over_image_blocks_give_the_one_batch_update(setup):
    """Micro-batches take whole blocks of rows with their images (vision blocks = shards x micro-batches): the
    accumulated update equals the one-batch update (fp32)."""
    import optax

    from balcap_jax.rl import update as update_lib
    from balcap_jax.rl.losses import LossConfig
    from balcap_jax.rl.policy_logprobs import make_log_prob_fn

    _, policy, batch = setup
    group = 4
    train = _group_batch(policy, batch, group, 24)
    train["advantages"] = np.linspace(-1.0, 1.0, len(train["input_ids"])).astype(np.float32)
    graphdef, state = nnx.split(policy.model)
    log_prob_fn = make_log_prob_fn(graphdef)
    results = {}
    for micro in (1, 2, 4):
        step = update_lib.make_update_step(log_prob_fn, optax.sgd(1.0), LossConfig(), micro_batches=micro,
                                           donate=False)
        vision = policy.family.vision_inputs(policy.model_config, batch, group, 2 * micro)  # 2 "shards"
        full = jax.tree.map(jnp.asarray, {**train, "vision": vision})
        with jax.default_matmul_precision("highest"):
            new_state, metrics = step(update_lib.TrainState.create(state, optax.sgd(1.0)), full)
        results[micro] = (new_state.params, float(metrics["loss"]), float(metrics["grad_norm"]))
    for micro in (2, 4):
        assert results[micro][1] == pytest.approx(results[1][1], rel=1e-5, abs=1e-7)
        assert results[micro][2] == pytest.approx(results[1][2], rel=1e-4)
        for a, b in zip(jax.tree.leaves(results[micro][0]), jax.tree.leaves(results[1][0])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
