"""The AOT tool's local check (`--target=local`: the 8 fake CPU devices) on a real-scale recipe pointed at a tiny
checkpoint: figures are per chip, the state is laid out by the training sharding, the rollout weights by the
sampling one, and the donated buffers (train state, KV cache) are reused. The numbers are XLA:CPU's plan, so
nothing here judges a recipe against an accelerator: that is `--target=tpu:...` / `gpu:...` (tests/tools)."""

from __future__ import annotations

import json
import math

import jax
import pytest

from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.tools import aot
from balcap_jax.tools.aot_targets import parse_target
from tests.models.qwen_fixtures import tiny_qwen_config_dict
from balcap_jax.recipes import load_recipe


def tiny_recipe(tmp_path):
    """The qwen7b recipe pointed at a tiny Qwen2.5-VL checkpoint directory (config.json only), small shapes."""
    config = load_recipe("qwen7b")
    tiny = tiny_qwen_config_dict(text_layers=1, vision_depth=1)
    hf = Qwen2_5_VLConfig.from_hf(dict(tiny, model_type="qwen2_5_vl")).to_hf()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config.model.hf_dir = str(tmp_path)
    config.data.max_pixels = 112 * 112  # 64 patches, 16 image tokens per image
    config.data.prompt_buckets = (96,)
    config.data.prompts_per_batch = 8
    config.sampling.group_size = 2
    config.sampling.max_new_tokens = 16
    return config


def _whole_params(recipe: aot.RecipePrograms) -> int:
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(recipe.train_state.params))


@pytest.mark.slow
def test_local_update_figures_are_per_chip_and_the_state_is_donated(tmp_path):
    config = tiny_recipe(tmp_path)
    report = aot.run_target(config, parse_target("local"), programs=("update",))
    update = report.programs["update"]
    assert report.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and report.chips == 8
    assert update.peak_bytes == update.argument_bytes + update.output_bytes - update.alias_bytes + update.temp_bytes
    # Params + two AdamW moments in fp32; FSDP over 8 leaves each chip about 1/8 (norms and biases replicated).
    recipe = aot.RecipePrograms.build(config, jax.devices())
    whole_state = 3 * _whole_params(recipe)
    state = report.resident.train_state
    assert whole_state / 8 <= state < whole_state / 4
    # XLA's arguments are this chip's shards of the state and of the batch (jit drops the inputs the update never
    # reads, e.g. completion_ids), far below the global sizes.
    batch = aot.update_batch_structs(recipe.policy, recipe.shapes, recipe.mesh)
    global_batch = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(batch))
    assert state < update.argument_bytes <= state + aot.per_chip_bytes(batch)
    assert update.argument_bytes < 0.6 * (whole_state + global_batch)
    # The state is donated: (nearly all of) its buffers are reused for the new state.
    assert 0.95 * report.resident.params <= update.alias_bytes <= update.output_bytes


def test_moments_follow_the_params_and_rollout_weights_drop_fsdp(tmp_path):
    recipe = aot.RecipePrograms.build(tiny_recipe(tmp_path), jax.devices())
    param_specs = [leaf.sharding.spec for leaf in jax.tree.leaves(recipe.train_state.params)]
    assert any(spec and spec[0] == "fsdp" for spec in param_specs)  # FSDP really shards something
    moments = [s for s in jax.tree.leaves(recipe.train_state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
               if hasattr(s, "mu")]
    assert moments, "AdamW state not found"
    for tree in (moments[0].mu, moments[0].nu):
        assert [leaf.sharding.spec for leaf in jax.tree.leaves(tree)] == param_specs
    rollout_specs = [leaf.sharding.spec for leaf in jax.tree.leaves(recipe.rollout_params)]
    # Decode never all-gathers a layer: no rollout weight is split over the FSDP axis (the sampling mesh's
    # tensor-parallel axes are renamed "<axis>_tp", e.g. "fsdp_tp", and split whole heads / columns instead).
    named = {name for spec in rollout_specs for entry in spec if entry
             for name in (entry if isinstance(entry, tuple) else (entry,))}
    assert "fsdp" not in named and named <= {"data_tp", "fsdp_tp", "tensor_tp", "tensor"}, named
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(recipe.train_state))


def test_remat_reaches_both_stacks_as_the_loader_builds_them(tmp_path):
    config = tiny_recipe(tmp_path)
    model = aot.recipe_policy(config).model
    assert model.model.visual.remat and model.model.language_model.remat
    config.model.remat = False
    model = aot.recipe_policy(config).model
    assert not model.model.visual.remat and not model.model.language_model.remat


@pytest.mark.slow
def test_local_rollout_programs_reuse_the_donated_kv_cache(tmp_path):
    config = tiny_recipe(tmp_path)
    report = aot.run_target(config, parse_target("local"), programs=("prefill", "decode"))
    recipe = aot.RecipePrograms.build(config, jax.devices())
    spec = recipe.policy.model_config.text.cache_spec()
    rows = recipe.shapes.sequences // 8  # the decode batch is split over the 8 devices
    cache = 2 * spec.num_layers * rows * (recipe.shapes.total_length - 1) * spec.num_kv_heads * spec.head_dim * 2
    assert report.resident.kv_cache >= cache  # bf16 K and V (+ the validity mask)
    prefill, decode = report.programs["prefill"], report.programs["decode"]
    # Decode updates the donated cache in place; prefill produces it (an output, nothing to alias).
    assert decode.alias_bytes >= cache and prefill.output_bytes >= cache and prefill.alias_bytes == 0
    assert report.phase_bytes()["decode"] == decode.peak_bytes + report.resident.train_state
