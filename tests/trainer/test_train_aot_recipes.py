"""The real-scale recipes (configs/qwen3b.py, qwen7b.py, llava7b.py): required fields fail validation with clear
messages, filled-in recipes validate on an 8-device mesh, the regime matches METHOD.md, and the AOT tool reads
their shapes (model, depth, step) without any weight."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest
from flax import nnx

from balcap_jax import config as config_lib
from balcap_jax.recipes import load_recipe
from balcap_jax.tools import aot

RECIPES = ("qwen3b", "qwen7b", "llava7b")


def release_config_json(config) -> dict:
    """The config.json of the checkpoint a recipe names (what a user's hf_dir holds)."""
    family, model_config = aot.model_config_for(config)
    if family.name == "qwen2_5_vl":
        return model_config.to_hf()
    return model_config.to_hf_dict()


def fill_required(config, tmp_path: Path):
    """Point a recipe at a local 'checkpoint' (config.json only), a manifest and two judge servers."""
    hf_dir = tmp_path / "weights"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(release_config_json(config)))
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text('{"image": "a.jpg", "captions": ["A red square."]}\n')
    config.model.hf_dir = str(hf_dir)
    config.data.manifest = str(manifest)
    config.rewards.judge.llm_url = "http://localhost:8000/v1"
    config.rewards.judge.llm_model = "judge-llm"
    config.rewards.judge.vlm_url = "http://localhost:8001/v1"
    config.rewards.judge.vlm_model = "judge-vlm"
    return config


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_names_every_unset_required_field(name):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(load_recipe(name), device_count=8, process_count=1, environ={})
    problems = "\n".join(error.value.problems)
    for field in ("config.model.hf_dir", "config.data.manifest", "config.rewards.judge.llm_url",
                  "config.rewards.judge.vlm_url", "config.rewards.judge.llm_model", "config.rewards.judge.vlm_model"):
        assert field in problems, f"{name}: no message for {field}:\n{problems}"
    assert len(error.value.problems) == 6, problems  # nothing else is wrong with the recipe


@pytest.mark.parametrize("name", RECIPES)
def test_filled_recipe_validates_and_reads_shapes_from_hf_dir(name, tmp_path):
    config = fill_required(load_recipe(name), tmp_path)
    config_lib.validate(config, device_count=8, process_count=1, environ={})
    # Shapes come from hf_dir's config.json now, and they are the release's.
    family_from_dir, from_dir = aot.model_config_for(config)
    release_only = load_recipe(name)
    family_from_release, from_release = aot.model_config_for(release_only)
    assert family_from_dir.name == family_from_release.name == config.model.name
    assert from_dir == from_release


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_follows_the_paper_regime(name):
    c = load_recipe(name)
    assert c.sampling.group_size == 8 and c.sampling.temperature == 1.0
    assert 1e-6 <= c.optim.lr <= 1e-5
    assert (c.model.dtype, c.model.param_dtype, c.model.remat) == ("bfloat16", "float32", True)
    assert c.rewards.judge.backend == "openai"
    assert c.advantage.kind == "gdpo" and c.length.kind == "mask"
    shapes = aot.step_shapes(c, aot.recipe_policy(c))
    assert shapes.sequences == c.data.prompts_per_batch * 8
    assert shapes.sequences % 8 == 0 and (shapes.sequences // c.train.micro_batches) % 8 == 0


@pytest.mark.parametrize(
    "name, layers, hidden, vocab",
    [("qwen3b", 36, 2048, 151936), ("qwen7b", 28, 3584, 152064), ("llava7b", 32, 4096, 32064)],
)
def test_recipe_release_has_real_shapes(name, layers, hidden, vocab):
    _, model_config = aot.model_config_for(load_recipe(name))
    text = model_config.text
    assert (text.num_layers, text.hidden_size, text.vocab_size) == (layers, hidden, vocab)


def test_step_shapes_reject_a_bucket_too_small_for_the_image():
    c = load_recipe("qwen7b")
    c.data.prompt_buckets = (256,)
    with pytest.raises(ValueError, match=r"data\.prompt_buckets.*512 placeholder tokens"):
        aot.step_shapes(c, aot.recipe_policy(c))


def test_unknown_release_without_hf_dir_is_a_clear_error():
    c = load_recipe("qwen7b")
    c.model.release = "Qwen9-VL"
    with pytest.raises(ValueError, match=r"config\.model\.release='Qwen9-VL'.*model\.hf_dir"):
        aot.model_config_for(c)


def test_with_depth_keeps_the_full_attention_period():
    _, model_config = aot.model_config_for(load_recipe("qwen7b"))
    shallow = aot.with_depth(model_config, 3, 16)
    assert aot.model_depth(shallow) == (3, 16)
    assert shallow.vision.fullatt_block_indexes == (7, 15)
    assert shallow.text.hidden_size == model_config.text.hidden_size
    assert aot.with_depth(model_config, 1, 2).vision.fullatt_block_indexes == (1,)


def test_recipe_policy_of_a_release_is_abstract_at_the_requested_depth():
    c = load_recipe("qwen7b")
    policy = aot.recipe_policy(c, depth=(2, 3))
    leaves = jax.tree.leaves(nnx.state(policy.model))
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)  # no weight exists
    assert aot.model_depth(policy.model_config) == (2, 3)
    assert policy.eos_ids == (151645, 151643) and policy.family.name == "qwen2_5_vl"
    with pytest.raises(ValueError, match=r"--depth must be >= 1"):
        aot.recipe_policy(c, depth=(0, 3))
