"""Captioning with a checkpoint: a training workdir's parameters are restored into the policy rebuilt from its
saved config, captions equal the in-memory policy's, and a re-run captions nothing; an HF model directory
captions benchmark images end to end."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from balcap_jax import default_config
from balcap_jax.checkpoint import CheckpointConfig, Checkpointer
from balcap_jax.data import pipeline as pipeline_lib
from balcap_jax.data.qwen_inputs import QWEN_CONCAT_KEYS, QwenCaptionProcessor
from balcap_jax.evaluation.captioning import load_policy, sampler_for
from balcap_jax.evaluation.driver import EvalOptions, run_evaluation
from balcap_jax.rl.update import TrainState
from balcap_jax.sampling.sampler import Sampler
from balcap_jax.trainer import batches as batches_lib
from balcap_jax.trainer.builders import sampler_config
from balcap_jax.trainer.data_sources import corpus_texts, prepare_data
from balcap_jax.trainer.policy import build_policy
from tests.evaluation.eval_fixtures import make_benchmarks


def _tiny_run_config(data_dir):
    config = default_config.get_config()
    config.data.shapes_world.num_train = 6
    config.data.shapes_world.num_eval = 3
    config.data.records_dir = str(data_dir)
    config.sampling.max_new_tokens = 6
    return config


def _save_trained_looking_checkpoint(config, workdir):
    """A checkpoint as the trainer writes it, with parameters that differ from a fresh init of the same seed."""
    train, _ = prepare_data(config, workdir)
    policy = build_policy(config, corpus=corpus_texts(train), seed=int(config.seed))
    graphdef, params = nnx.split(policy.model)
    rng = np.random.default_rng(7)  # numpy: one jax op per leaf would compile one program per shape
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + rng.normal(0, 0.5, x.shape).astype(x.dtype)), params)
    state = {"train": TrainState.create(params, optax.adam(1e-3)), "rng": jax.random.key(0)}
    with Checkpointer(workdir, CheckpointConfig(save_every_steps=1)) as checkpointer:
        checkpointer.save(12, state, data_state={"sft": None}, config=config.to_dict(), wait=True)
    return policy, graphdef, params


@pytest.mark.slow
def test_workdir_checkpoint_captions_match_the_in_memory_policy_and_resume(tmp_path, monkeypatch):
    config = _tiny_run_config(tmp_path / "data")
    workdir = tmp_path / "run"
    policy, graphdef, params = _save_trained_looking_checkpoint(config, workdir)

    eval_config = default_config.get_config()  # a different recipe: the workdir's saved model/data sections win
    eval_config.sampling.max_new_tokens = 6
    loaded = load_policy(eval_config, str(workdir))
    assert loaded.fingerprint["step"] == 12
    assert loaded.config.data.shapes_world.num_eval == 3
    for restored, saved in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved))

    output = tmp_path / "eval"
    options = EvalOptions(config=eval_config, output=str(output), protocols=("shapes_world",), checkpoint=str(workdir),
                          batch_size=2)  # fmt: skip
    payload = run_evaluation(options)
    captions = {row["image_id"]: row["caption"] for row in payload["items"]["shapes_world"]}
    assert len(captions) == 3 and payload["settings"]["checkpoint_step"] == 12

    # the same greedy captions straight from the in-memory policy and parameters
    _, validation = prepare_data(config, workdir)
    prompts = QwenCaptionProcessor(policy.tokenizer, instruction=config.data.prompt, image_config=policy.image_config)
    processor = batches_lib.PolicyPromptProcessor(prompts, policy)
    pipeline = pipeline_lib.PipelineConfig(
        batch_size=2, buckets=tuple(config.data.prompt_buckets), shuffle=False, num_epochs=1, pad_id=policy.pad_id,
        concat_keys=QWEN_CONCAT_KEYS,
    )
    # the compiled programs are shared per model graph and shapes: only the parameters differ
    sample = sampler_for(graphdef)
    variants = sample.compiled_variants
    assert variants > 0, "the evaluation's sampler is the one cached for this model graph"
    expected = {}
    for batch in pipeline_lib.make_dataset(validation, processor, pipeline):
        rollout = sample(params, batches_lib.prompt_inputs(policy, batch),
                         sampler_config(config, policy, greedy=True, group_size=1), jax.random.key(0))
        expected |= dict(zip(map(str, batch["example_id"]), batches_lib.completion_texts(policy, rollout)))
    assert captions == expected
    assert sample.compiled_variants == variants, "no recompilation for the same graph and shapes"

    def no_sampling(*args, **kwargs):
        raise AssertionError("a re-run must read every caption back instead of sampling")

    monkeypatch.setattr(Sampler, "__call__", no_sampling)
    again = run_evaluation(options)
    assert again["counts"]["shapes_world"]["judged"] == 0 and again["metrics"] == payload["metrics"]


def _tiny_full_vocab_hf_dir(directory):
    """A random Qwen2.5-VL HF directory over the real Qwen vocabulary and tokenizer (what a user's checkpoint
    looks like, at toy size)."""
    from tests.trainer.real_path import qwen_hf_dir

    return qwen_hf_dir(directory)


@pytest.mark.slow
def test_hf_directory_checkpoint_captions_benchmark_images_end_to_end(tmp_path):
    hf_dir = _tiny_full_vocab_hf_dir(tmp_path / "hf")
    files = make_benchmarks(tmp_path / "bench", num_images=2)
    config = default_config.get_config()
    config.sampling.max_new_tokens = 4
    options = EvalOptions(config=config, output=str(tmp_path / "out"), protocols=("captionqa",), checkpoint=hf_dir,
                          captionqa_data=files["captionqa"], judge="scripted", batch_size=2)  # fmt: skip
    payload = run_evaluation(options)
    assert payload["settings"]["checkpoint"] == hf_dir
    assert payload["counts"]["captionqa"]["judged"] == 2 and not payload["counts"]["captionqa"]["missing_captions"]
    captions = [row["caption"] for row in payload["items"]["captionqa"]]
    assert all(isinstance(c, str) for c in captions)
    assert payload["metrics"]["captionqa"]["num_questions_scored"] == 6
