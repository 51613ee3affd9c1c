"""The real recipes run end to end as a user runs them: `python -m balcap_jax.train --config=configs/qwen3b.py`
(and llava7b.py) on a local HF checkpoint, a JSONL manifest of real photographs with an evaluation manifest, and
two OpenAI-compatible judge servers on 127.0.0.1 — with overrides only for paths, sizes and step counts.

The Qwen run is made twice: 1 process x 8 devices uninterrupted, and 2 processes x 4 devices (jax.distributed
on 127.0.0.1) killed with SIGKILL after a checkpoint and restarted. Both must write the same per-step metrics
and export the same weights; then `python -m balcap_jax.evaluate` scores each family's export.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("skimage")

from tests.trainer import real_path  # noqa: E402

# Sizes only: 8 prompts x 2 rollouts of 8 tokens, photographs resized under 64 image tokens, 3 RL steps.
SIZES = [
    "--config.data.prompts_per_batch=8", "--config.sampling.group_size=2", "--config.sampling.max_new_tokens=8",
    "--config.data.min_pixels=3136", "--config.data.max_pixels=50176", "--config.data.prompt_buckets=(128,256)",
    "--config.eval.batch_size=8", "--config.eval.max_images=8", "--config.train.rl_steps=3",
    "--config.checkpoint.every_steps=2", "--config.metrics.eval_every=2", "--config.data.loader_shards=2",
]
COMPARED = ("reward/", "advantages_", "loss/", "length/", "eval", "sample/tokens")
SKIPPED = ("latency_s", "tokens_per_s", "judge_calls", "cache_hits")  # work done, not results: hosts dedupe apart
# bf16 rounding noise, not results: the sampler-vs-trainer log-prob gap is that noise by definition, and the
# 2-process run encodes its rollout images in one block per process (one block in all with 1 process) and sums
# the vision gradients over devices in another order; at step 1 the clipped gradient nearly cancels (loss ~1e-8),
# so its norm moves by ~1 bf16 ulp (0.4 %). Rewards, advantages, losses and the exported weights stay tight.
BF16_NOISE = {"loss/sampler_logprob_diff_max": dict(rtol=0, atol=2e-3),
              "loss/sampler_logprob_diff_mean": dict(rtol=0, atol=5e-4), "loss/grad_norm": dict(rtol=1e-2, atol=0)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_path")
    train, evaluation = real_path.photo_manifests(root / "data")
    with real_path.judge_servers() as (llm, vlm):
        yield {
            "root": root, "train": train, "eval": evaluation, "judges": real_path.judge_flags(llm, vlm),
            "qwen": real_path.qwen_hf_dir(root / "qwen"), "llava": real_path.llava_hf_dir(root / "llava"),
        }


def _flags(assets, recipe: str, family: str) -> list[str]:
    return [f"--config=configs/{recipe}.py", f"--config.model.hf_dir={assets[family]}",
            f"--config.data.manifest={assets['train']}", f"--config.data.eval_manifest={assets['eval']}",
            *assets["judges"], *SIZES]


def _by_step(rows: list[dict]) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(row)
    return merged


def _assert_same_metrics(expected: list[dict], actual: list[dict]) -> int:
    a, b = _by_step(expected), _by_step(actual)
    assert sorted(a) == sorted(b)
    compared = 0
    for step in sorted(a):
        for key, value in a[step].items():
            if not key.startswith(COMPARED) or key.endswith(SKIPPED) or not isinstance(value, (int, float)):
                continue
            assert key in b[step], (step, key)
            tolerance = BF16_NOISE.get(key, dict(rtol=1e-4, atol=1e-5))
            np.testing.assert_allclose(b[step][key], value, **tolerance, err_msg=f"step {step} {key}")
            compared += 1
    return compared


def _evaluate(assets, checkpoint: str, out, recipe: str) -> dict:
    from tests.evaluation.eval_fixtures import make_benchmarks

    files = make_benchmarks(out / "bench", num_images=2)
    command = [sys.executable, "-m", "balcap_jax.evaluate", f"--config=configs/{recipe}.py",
               f"--checkpoint={checkpoint}", f"--output={out / 'eval'}", "--protocols=captionqa",
               f"--captionqa_data={files['captionqa']}", "--judge=scripted", "--config.sampling.max_new_tokens=6",
               "--config.data.max_pixels=50176"]
    done = subprocess.run(command, cwd=real_path.ROOT, capture_output=True, text=True, timeout=600,
                          env={**real_path.os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("eval captionqa_")
    return json.loads((out / "eval" / "results.json").read_text())


@pytest.mark.slow
def test_qwen3b_recipe_one_process_and_two_processes_with_kill_and_resume_agree(assets, tmp_path):
    flags = _flags(assets, "qwen3b", "qwen")
    single = real_path.Launch(flags, tmp_path / "single", num_processes=1, devices=8)
    single.wait(900)

    multi = real_path.Launch(flags, tmp_path / "multi", num_processes=2, devices=4)
    multi.kill_after_checkpoint(2, timeout=900)
    resumed = real_path.Launch(flags, tmp_path / "multi", num_processes=2, devices=4)
    logs = resumed.wait(900)
    assert "resumed from step 2" in logs[0]
    assert "workdir:" not in logs[1] and "reward_gain" not in logs[1]  # process 1 prints and writes nothing

    expected, actual = real_path.metric_rows(tmp_path / "single"), real_path.metric_rows(tmp_path / "multi")
    steps = [row["step"] for row in actual if "reward/total_mean" in row]
    assert steps == [1, 2, 3]  # written once per step, the killed run's later rows truncated
    assert _assert_same_metrics(expected, actual) > 60
    final = _by_step(actual)[3]
    assert {"eval_start/total", "eval/total", "eval_end/total", "eval_end/b_capscore"} <= set(_by_step(actual)[0]) | \
        set(_by_step(actual)[2]) | set(final)
    assert final["reward/precision_nan_count"] == 0 and final["reward/linguistic_nan_count"] == 0

    weights_a = real_path.safetensors_weights(tmp_path / "single" / "export_hf")
    weights_b = real_path.safetensors_weights(tmp_path / "multi" / "export_hf")
    assert sorted(weights_a) == sorted(weights_b)
    for name, value in weights_a.items():
        np.testing.assert_allclose(weights_b[name].astype(np.float32), value.astype(np.float32), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    results = _evaluate(assets, str(tmp_path / "multi" / "export_hf"), tmp_path, "qwen3b")
    assert results["counts"]["captionqa"]["judged"] == 2


@pytest.mark.slow
def test_llava7b_recipe_trains_evaluates_and_exports(assets, tmp_path):
    flags = _flags(assets, "llava7b", "llava")
    launch = real_path.Launch(flags, tmp_path / "run", num_processes=1, devices=8)
    log = launch.wait(900)[0]
    assert "reward means on the evaluation manifest" in log and "reward_gain" in log
    rows = _by_step(real_path.metric_rows(tmp_path / "run"))
    assert all(rows[s]["reward/precision_nan_count"] == 0 for s in (1, 2, 3))
    results = _evaluate(assets, str(tmp_path / "run" / "export_hf"), tmp_path, "llava7b")
    assert results["counts"]["captionqa"]["judged"] == 2
