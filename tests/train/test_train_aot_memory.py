"""AOT compilation of the RL update step on abstract shapes over the 8-device fake CPU mesh: the memory figures are
per device, the state is laid out by the training sharding, and each real-scale recipe fits 80 GB per device."""

from __future__ import annotations

import json
import math

import jax
import pytest
from flax import nnx

from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from balcap_jax.parallel.mesh import MeshShape, make_mesh
from balcap_jax.trainer import aot
from tests.models.qwen_fixtures import tiny_qwen_config_dict
from tests.train.test_train_aot_recipes import load_recipe

BUDGET_BYTES = 80e9  # an 80 GB accelerator


def tiny_recipe(tmp_path):
    """The qwen7b recipe pointed at a tiny Qwen2.5-VL checkpoint directory (config.json only), small shapes."""
    config = load_recipe("qwen7b")
    hf = Qwen2_5_VLConfig.from_hf(dict(tiny_qwen_config_dict(), model_type="qwen2_5_vl")).to_hf()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config.model.hf_dir = str(tmp_path)
    config.data.max_pixels = 112 * 112  # 64 patches, 16 image tokens per image
    config.data.prompt_buckets = (96,)
    config.data.prompts_per_batch = 8
    config.sampling.group_size = 2
    config.sampling.max_new_tokens = 16
    return config


def test_tiny_step_memory_is_per_device_and_state_is_sharded(tmp_path):
    config = tiny_recipe(tmp_path)
    sharded = aot.compile_update_step(config)  # recipe mesh: fsdp over all 8 devices
    single = aot.compile_update_step(config, mesh=make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1]))
    assert sharded.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and sharded.devices == 8 and single.devices == 1

    # The state is donated: its buffers are reused for the new state (aliased), and they are all arguments.
    for report in (sharded, single):
        assert report.alias_bytes >= report.state_bytes > 0
        assert report.argument_bytes >= report.state_bytes and report.temp_bytes > 0
        assert report.peak_bytes == report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes

    # Per device: FSDP over 8 devices leaves each about 1/8 of the state (norms and biases are replicated), and
    # XLA's argument bytes are those of one device's shards.
    assert single.state_bytes / 8 <= sharded.state_bytes < single.state_bytes / 4
    assert sharded.argument_bytes < single.argument_bytes / 3

    # The state really holds params + two AdamW moments in fp32.
    _, model_config = aot.model_config_for(config)
    _, params = aot.abstract_policy(aot.registry.get("qwen2_5_vl"), model_config, dtype="bfloat16",
                                    param_dtype="float32", remat=False)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    assert single.state_bytes == 3 * 4 * count


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
    assert isinstance(nnx.state(model, nnx.Param), nnx.State)


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
