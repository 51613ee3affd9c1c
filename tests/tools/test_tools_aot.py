"""The AOT tool (`python -m balcap_jax.tools.aot`): targets parse with clear errors, the verdict counts what stays
resident between programs, the tool compiles the embedded default for a TPU topology and a GPU topology (skipped
where the compiler is not installed), and its update program is the loop's, HLO for HLO."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from balcap_jax import default_config
from balcap_jax.data import pipeline as pipeline_lib
from balcap_jax.parallel import hosts
from balcap_jax.parallel.sharding import named_leaves
from balcap_jax.rl import update as update_lib
from balcap_jax.sampling.rollout import build_training_batch
from balcap_jax.sampling.sampler import Sampler
from balcap_jax.tools import aot
from balcap_jax.tools.aot_targets import GIB, GPU_MODELS, INSTALL_HINT, compiler_installed, parse_target, target_devices
from balcap_jax.trainer import batches as batches_lib
from balcap_jax.trainer import builders, placement
from balcap_jax.trainer.data_sources import corpus_texts, prepare_data
from balcap_jax.trainer.policy import build_policy

ROOT = Path(__file__).resolve().parents[2]
needs_tpu = pytest.mark.skipif(not compiler_installed("tpu"), reason=f"no TPU compiler here: {INSTALL_HINT['tpu']}")
needs_gpu = pytest.mark.skipif(not compiler_installed("gpu"), reason=f"no GPU compiler here: {INSTALL_HINT['gpu']}")


def small_default(tmp_path, *, prompts: int = 4, group: int = 8):
    """The embedded default recipe with a small world and batch (same model, sampler and update)."""
    config = default_config.get_config()
    config.data.shapes_world.num_train = 16
    config.data.shapes_world.num_eval = 4
    config.data.records_dir = str(tmp_path / "data")
    config.data.prompt_buckets = (128,)  # one bucket: the tool compiles the largest, the loop picks the fitting one
    config.data.prompts_per_batch = prompts
    config.sampling.group_size = group
    config.sampling.max_new_tokens = 8
    return config


# ---------------------------------------------------------------------------------------------------------------
# Targets


def test_targets_parse_to_chips_and_their_hbm():
    assert parse_target("tpu:v5p:4x4x2").hbm_bytes == 95 * GIB
    assert parse_target("tpu:v6e:8x8").topology == "v6e:8x8"
    h100 = parse_target("gpu:h100:1x2x8")
    assert (h100.kind, h100.chip, h100.topology) == ("gpu", "h100", "1x2x8")
    assert h100.hbm_bytes == GPU_MODELS["h100"].memory_bytes < parse_target("gpu:h200:1x1x8").hbm_bytes
    local = parse_target("local", local_hbm_bytes=12345)
    assert local.kind == "local" and local.hbm_bytes == 12345 and "quick check" in local.label


@pytest.mark.parametrize("text, fix", [
    ("tpu:v9:2x2", r"tpu:v5p:4x4x2"), ("tpu:v5p", r"tpu:<generation>:<topology>"),
    ("gpu:a100:1x1x8", r"known models: \['h100', 'h200'\]"), ("gpu:h100:16", r"<slices>x<hosts>x<gpus per host>"),
    ("cuda", r"use tpu:<topology>"),
])
def test_a_bad_target_names_the_fix(text, fix):
    with pytest.raises(ValueError, match=rf"--target='{text}'.*" + fix):
        parse_target(text)


def test_gpu_target_config_carries_the_cards_real_memory():
    text = GPU_MODELS["h200"].target_config()
    assert f"device_memory_size: {143771 * 2**20}" in text
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text and 'platform_name: "CUDA"' in text


# ---------------------------------------------------------------------------------------------------------------
# The report


def _program(name: str, **fields) -> aot.ProgramReport:
    base = dict(argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0, generated_code_bytes=0,
                xla_peak_bytes=0, compile_seconds=1.0, flops=None)
    return aot.ProgramReport(name=name, **(base | fields))


def _report(hbm_gib: float, headroom: float = 0.1) -> aot.AotReport:
    target = parse_target("local", local_hbm_bytes=int(hbm_gib * GIB))
    programs = {
        "reshard": _program("reshard", argument_bytes=2 * GIB, output_bytes=4 * GIB, temp_bytes=1 * GIB),
        "decode": _program("decode", argument_bytes=10 * GIB, output_bytes=3 * GIB, alias_bytes=3 * GIB,
                           temp_bytes=2 * GIB, xla_peak_bytes=1 * GIB),
        "update": _program("update", argument_bytes=7 * GIB, output_bytes=6 * GIB, alias_bytes=6 * GIB,
                           temp_bytes=9 * GIB, flops=3e12),
    }
    resident = aot.Resident(params=2 * GIB, opt_state=4 * GIB, rollout_weights=4 * GIB, kv_cache=3 * GIB)
    return aot.AotReport(target=target, chips=8, hosts=1, mesh={"data": 1, "fsdp": 8, "tensor": 1}, depth=(2, 2),
                         full_depth=(28, 32), programs=programs, resident=resident, headroom=headroom)


def test_each_phase_adds_what_stays_resident_outside_its_program():
    report = _report(hbm_gib=100)
    # reshard: its own 7 GiB + the optimizer state; decode: 12 GiB (XLA's lower "peak" is not used) + the train
    # state it does not take as an argument; update: the train state is its donated argument, nothing besides.
    assert report.phase_bytes() == {"reshard": 11 * GIB, "decode": 18 * GIB, "update": 16 * GIB}
    assert report.fits
    assert not _report(hbm_gib=19).fits and _report(hbm_gib=21).fits  # 18 GiB vs 90% of the HBM
    assert not _report(hbm_gib=21, headroom=0.2).fits


def test_report_json_has_the_documented_fields():
    out = _report(hbm_gib=100).to_dict()
    assert {"target", "chips", "hbm_bytes", "programs", "resident_bytes", "fits"} <= set(out)
    update = out["programs"]["update"]
    assert update["peak_bytes"] == 16 * GIB and update["temp_bytes"] == 9 * GIB and update["compile_seconds"] == 1.0
    assert out["resident_bytes"]["train_state"] == 6 * GIB and out["fits"] is True
    json.dumps(out)  # serialisable as written by --json
    table = _report(hbm_gib=19).table()
    assert "DOES NOT FIT" in table and "(2, 2) of (28, 32) (reduced)" in table and "| 3.00 |" in table


def test_bad_program_names_and_headroom_are_clear_errors(tmp_path):
    config = small_default(tmp_path)
    with pytest.raises(ValueError, match=r"--programs: unknown \['prefil'\]"):
        aot.run_target(config, parse_target("local"), programs=("prefil",))
    with pytest.raises(ValueError, match=r"--headroom=1.5"):
        aot.run_target(config, parse_target("local"), headroom=1.5)
    with pytest.raises(ValueError, match=r"--depth='2'.*'T,V'"):
        aot.parse_depth("2")


# ---------------------------------------------------------------------------------------------------------------
# Compiling for real targets


def _check_compiled_report(report: aot.AotReport, *, chips: int, hosts_: int) -> None:
    assert report.chips == chips and report.hosts == hosts_ and set(report.programs) == set(aot.PROGRAMS)
    assert report.mesh == {"data": 1, "fsdp": chips, "tensor": 1}
    for name, program in report.programs.items():
        assert program.peak_bytes > 0 and program.compile_seconds > 0, name
    # The KV cache is donated into decode and the train state into the update: their buffers are reused.
    assert report.programs["decode"].alias_bytes >= report.resident.kv_cache > 0
    assert report.programs["update"].alias_bytes >= report.resident.params
    assert report.fits  # a tiny model on an accelerator


@needs_tpu
@pytest.mark.slow
def test_tool_compiles_the_default_recipe_for_a_tpu_topology(tmp_path):
    report = aot.run_target(small_default(tmp_path), parse_target("tpu:v5p:2x2x1"), workdir=str(tmp_path))
    _check_compiled_report(report, chips=4, hosts_=1)
    assert report.target.hbm_bytes == 95 * GIB
    assert report.programs["update"].flops > report.programs["decode"].flops > 0  # TPU gives a cost analysis


@needs_gpu
@pytest.mark.slow
def test_tool_compiles_the_default_recipe_for_a_gpu_topology(tmp_path):
    # 4 prompts on 16 GPUs: the sampler replicates the prompt rows (they do not divide), as the loop does.
    report = aot.run_target(small_default(tmp_path), parse_target("gpu:h100:1x2x8"), workdir=str(tmp_path))
    _check_compiled_report(report, chips=16, hosts_=2)
    assert all(p.flops is None for p in report.programs.values())  # XLA:GPU gives no cost analysis


def _flash_programs(tmp_path, target: str, *, dtype: str):
    """The small default recipe with `model.attention="flash"`, its update and prefill lowered for `target`."""
    config = small_default(tmp_path)
    config.model.attention = "flash"
    config.model.dtype = dtype
    recipe = aot.RecipePrograms.build(config, target_devices(parse_target(target)), workdir=str(tmp_path))
    prefill, _ = recipe.compile_prefill()
    return recipe.lower_update().compile().as_text(), prefill.as_text()


@needs_tpu
@pytest.mark.slow
def test_flash_attention_compiles_to_the_pallas_kernel_for_tpu(tmp_path):
    """`model.attention="flash"` on a TPU target: the update and the prefill run the Mosaic (Pallas splash) kernel."""
    for text in _flash_programs(tmp_path, "tpu:v5p:2x2x1", dtype="float32"):
        assert "tpu_custom_call" in text


@needs_gpu
@pytest.mark.slow
def test_flash_attention_compiles_to_cudnn_for_gpu(tmp_path):
    """`model.attention="flash"` with bf16 on an H100 target: the update and the prefill call cuDNN's fused attention."""
    for text in _flash_programs(tmp_path, "gpu:h100:1x1x8", dtype="bfloat16"):
        assert "__cudnn$fmha" in text


# ---------------------------------------------------------------------------------------------------------------
# The tool's update program is the loop's


def loop_update_lowering(config, workdir: Path):
    """The loop's update step lowered on the loop's own state and a real RL batch, each built the way
    trainer/loop.py and trainer/rl_step.py build them."""
    mesh = builders.mesh(config)
    train, _ = prepare_data(config, workdir)
    policy = build_policy(config, corpus=corpus_texts(train), seed=int(config.seed), mesh=mesh)
    graphdef, params = nnx.split(policy.model)
    params = hosts.to_sharding(params, placement.param_shardings(policy.family, params, mesh, "training"))
    for_sampling = placement.rollout_copy(config, policy, params, mesh)
    rl_opt, _ = builders.rl_optimizer(config)
    state = hosts.globalize(update_lib.TrainState.create(params, rl_opt), mesh)
    sampler = Sampler(graphdef, mesh=for_sampling.mesh, cache_heads=for_sampling.cache_heads,
                      cache_rows=for_sampling.cache_rows)

    processor = batches_lib.PolicyPromptProcessor.for_policy(policy, config.data.prompt)
    cfg = pipeline_lib.PipelineConfig(batch_size=int(config.data.prompts_per_batch),
                                      buckets=tuple(config.data.prompt_buckets), shuffle=False, pad_id=policy.pad_id,
                                      concat_keys=policy.family.concat_keys, drop_remainder=True)
    batch = next(iter(pipeline_lib.make_dataset(train, processor, cfg)))
    scfg = builders.sampler_config(config, policy)
    prepared = sampler.prepare_prompts(batches_lib.prompt_inputs(policy, batch, sampler.layout.mesh), scfg)
    rollout_params = for_sampling(state.params)
    rollout = sampler.decode(rollout_params, sampler.prefill(rollout_params, prepared, scfg), scfg,
                             jax.random.key(0))
    rollout = batches_lib.local_rollout(rollout)
    group = int(config.sampling.group_size)
    tile = batches_lib.tile_vision_for(policy, batch, mesh, int(config.train.micro_batches))
    train_batch = build_training_batch(prepared, rollout, group, tile_vision=tile)
    train_batch = {k: (v if k == "vision" else np.asarray(v)) for k, v in train_batch.items()}
    train_batch["advantages"] = np.zeros((int(config.data.prompts_per_batch) * group,), np.float32)
    # The loop runs its programs under the mesh context (the models pin activations to the batch axes only there).
    with jax.set_mesh(mesh):
        return builders.rl_update_step(graphdef, config).lower(state, placement.place_batch(train_batch, mesh))


@pytest.mark.slow
def test_the_tools_update_program_is_the_loops(tmp_path):
    config = small_default(tmp_path, prompts=8, group=2)
    loop_text = loop_update_lowering(config, tmp_path / "loop").as_text()
    tool = aot.RecipePrograms.build(config, jax.devices(), workdir=str(tmp_path / "tool"))
    tool_text = tool.lower_update().as_text()
    assert "stablehlo.dot_general" in tool_text  # the model's matmuls, not an empty module
    assert tool_text == loop_text


def test_the_tools_reshard_program_is_the_loops(tmp_path):
    """The tool compiles the loop's `for_sampling` (`placement.rollout_copy`, the same builder): the same lowered
    program, bf16 out in a bf16 recipe, on the rollout copy's sampling mesh."""
    config = small_default(tmp_path)
    config.model.dtype = "bfloat16"
    mesh = builders.mesh(config)
    train, _ = prepare_data(config, tmp_path / "loop")
    policy = build_policy(config, corpus=corpus_texts(train), seed=int(config.seed), mesh=mesh)
    _, params = nnx.split(policy.model)
    params = hosts.to_sharding(params, placement.param_shardings(policy.family, params, mesh, "training"))
    with jax.set_mesh(mesh):
        loop_text = placement.rollout_copy(config, policy, params, mesh).program.lower(params).as_text()
    tool = aot.RecipePrograms.build(config, jax.devices(), workdir=str(tmp_path / "tool"))
    assert tool.lower_reshard().as_text() == loop_text
    assert "bf16" in loop_text and tool.sampler.layout.mesh == tool.for_sampling.mesh
    kernels = [leaf for name, leaf in named_leaves(tool.rollout_params) if name.endswith(".kernel")]
    assert kernels and all(leaf.dtype == jax.numpy.bfloat16 for leaf in kernels)


@pytest.mark.slow
def test_command_line_writes_the_json_report_for_the_local_target(tmp_path):
    out = tmp_path / "report.json"
    args = [sys.executable, "-m", "balcap_jax.tools.aot", "--target=local", "--programs=reshard,decode",
            f"--json={out}", f"--workdir={tmp_path}", "--config.data.shapes_world.num_train=16",
            "--config.data.shapes_world.num_eval=4", "--config.data.prompt_buckets=(128,)",
            "--config.sampling.max_new_tokens=8"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["target"] == "local" and report["chips"] == 8 and report["fits"] is True
    assert set(report["programs"]) == {"reshard", "decode"}
    assert "a quick check only" in done.stdout
