"""AOT compilation of the RL update step on abstract shapes over the 8-device fake CPU mesh: the memory figures are
per device, the state is laid out by the training sharding, and each real-scale recipe fits 80 GB per device."""

from __future__ import annotations

import json
import math

import jax
import pytest

from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.trainer import aot
from tests.models.qwen_fixtures import tiny_qwen_config_dict
from tests.train.test_train_aot_recipes import load_recipe

BUDGET_BYTES = 80e9  # an 80 GB accelerator


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


@pytest.mark.slow
def test_tiny_step_memory_is_per_device_and_state_is_sharded(tmp_path):
    config = tiny_recipe(tmp_path)
    report = aot.compile_update_step(config)  # recipe mesh: fsdp over all 8 devices
    assert report.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and report.devices == 8
    assert report.peak_bytes == report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes
    assert report.temp_bytes > 0

    # The whole state, unsharded: params + two AdamW moments in fp32.
    family, model_config = aot.model_config_for(config)
    _, params = aot.abstract_policy(family, model_config, dtype="bfloat16", param_dtype="float32", remat=False)
    whole_state = 3 * 4 * sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    # FSDP over 8 devices leaves each about 1/8 of it (norms and biases are replicated) ...
    assert whole_state / 8 <= report.state_bytes < whole_state / 4
    # ... and XLA's figures are those of one device: its arguments are exactly this device's shards of the state
    # (+ the two int32 step counters) and of the batch, well below the global sizes. (jit drops inputs the program
    # never reads: this one-block tower has only full attention, so its window segment ids go.)
    shapes = aot.step_shapes(config, family, model_config)
    batch = aot.abstract_update_batch(family, model_config, shapes, aot.training_mesh(config))
    batch_bytes = aot.per_device_bytes(batch)
    global_batch_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(batch))
    unread = math.prod(batch["vision"]["window_segment_ids"].shape) * 4
    assert report.argument_bytes == report.state_bytes + 8 + batch_bytes - unread
    assert report.argument_bytes < 0.6 * (whole_state + global_batch_bytes)
    # The state is donated: (nearly all of) its buffers are reused for the new state.
    assert 0.95 * report.state_bytes <= report.alias_bytes <= report.output_bytes


def test_abstract_train_state_puts_adam_moments_in_the_param_layout(tmp_path):
    config = tiny_recipe(tmp_path)
    family, model_config = aot.model_config_for(config)
    mesh = aot.training_mesh(config)
    _, params = aot.abstract_policy(family, model_config, dtype="bfloat16", param_dtype="float32", remat=True)
    optimizer, _ = aot.optimizer_for(config)
    state = aot.abstract_train_state(params, optimizer, family.sharding("training").param_specs(params), mesh)
    param_shardings = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
    assert any(spec and spec[0] == "fsdp" for spec in param_shardings)  # FSDP really shards something
    moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert moments, "AdamW state not found"
    for tree in (moments[0].mu, moments[0].nu):
        assert [leaf.sharding.spec for leaf in jax.tree.leaves(tree)] == param_shardings
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(state))  # nothing allocated


def test_remat_reaches_the_vision_tower(tmp_path):
    config = tiny_recipe(tmp_path)
    family, model_config = aot.model_config_for(config)
    assert aot.stacks_rematerialised(family, model_config, config) == {"text": True, "vision": True}
    config.model.remat = False
    assert aot.stacks_rematerialised(family, model_config, config) == {"text": False, "vision": False}
    model = aot.abstract_model(family, model_config, dtype="bfloat16", param_dtype="float32", remat=True)
    assert model.model.visual.remat and model.model.language_model.remat


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3b", "qwen7b", "llava7b"])
def test_recipe_update_step_fits_80gb_per_device(name, capsys):
    config = load_recipe(name)
    report = aot.full_depth_estimate(config, name=name)
    with capsys.disabled():
        print(f"\n{report.summary()}\n  {report.notes}")
    family, model_config = aot.model_config_for(config)
    assert report.depth == aot.model_depth(model_config) and report.extrapolated
    assert report.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    # The state extrapolated to full depth is the exact abstract count: params + two moments, fp32, over 8.
    _, params = aot.abstract_policy(family, model_config, dtype="bfloat16", param_dtype="float32", remat=False)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    assert count > 3e9
    assert 12 * count / 8 <= report.state_bytes < 1.02 * 12 * count / 8
    assert report.fits(BUDGET_BYTES), report.summary()


@pytest.mark.slow
def test_tiny_rollout_programs_compile_with_a_donated_cache(tmp_path):
    config = tiny_recipe(tmp_path)
    prefill, decode = aot.compile_sampler(config)
    family, model_config = aot.model_config_for(config)
    shapes = aot.step_shapes(config, family, model_config)
    spec = model_config.text.cache_spec()
    rows = shapes.sequences // 8  # the decode batch is split over the 8 devices
    cache_bytes = 2 * spec.num_layers * rows * (shapes.total_length - 1) * spec.num_kv_heads * spec.head_dim * 2
    # Decode updates the donated bf16 KV cache in place; prefill produces it (an output, nothing to alias).
    assert decode.alias_bytes >= cache_bytes and prefill.output_bytes >= cache_bytes and prefill.alias_bytes == 0
    for program in (prefill, decode):
        assert program.state_bytes > 0 and program.argument_bytes > 0  # resident optimizer state; params shards
        assert program.depth == aot.model_depth(model_config)


@pytest.mark.slow
def test_qwen7b_rollout_programs_fit_80gb_per_device(capsys):
    prefill, decode = aot.sampler_full_depth(load_recipe("qwen7b"), name="qwen7b")
    with capsys.disabled():
        for program in (prefill, decode):
            print(f"\n{program.summary()} + resident optimizer state {program.state_bytes / aot.GIB:.2f} GiB")
    for program in (prefill, decode):
        assert program.extrapolated and program.depth == (28, 32)
        assert program.peak_bytes + program.state_bytes <= BUDGET_BYTES
