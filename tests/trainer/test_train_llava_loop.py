"""The training loop drives a LLaVA-1.5 policy loaded from a local HF directory (tiny random model built here)."""

import json

import jax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from balcap_jax import default_config  # noqa: E402
from balcap_jax.trainer.loop import run  # noqa: E402
from tests.trainer.real_path import llava_hf_dir  # noqa: E402


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return llava_hf_dir(tmp_path_factory.mktemp("llava_tiny"))


@pytest.mark.slow
def test_llava_policy_trains_end_to_end_and_exports(llava_dir, tmp_path):
    config = default_config.get_config()
    config.model.name = "llava"
    config.model.hf_dir = str(llava_dir)
    config.train.init_from = ""  # the shipped warm start is a from-scratch Qwen policy's
    config.data.records_dir = str(tmp_path / "data")
    config.data.shapes_world.num_train = 16
    config.data.shapes_world.num_eval = 8
    config.data.prompts_per_batch = 2
    config.data.prompt_buckets = (64, 128)
    config.sampling.group_size = 4
    config.sampling.max_new_tokens = 8
    config.train.sft_steps = 2
    config.train.sft_batch_size = 4
    config.train.rl_steps = 2
    summary = run(config, tmp_path / "work", echo=lambda *_: None, devices=jax.devices()[:1])

    assert summary.final_step == 4 and not summary.stopped_early
    assert set(summary.eval_end) == {"precision", "recall", "linguistic", "total", "b_capscore"}
    rows = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if "reward/precision_mean" in r]
    assert len(rl_rows) == 2 and all(r["reward/precision_nan_count"] == 0 for r in rl_rows)
    sft_rows = [r for r in rows if "sft/nll" in r]
    assert len(sft_rows) == 2 and all(r["sft/nll"] > 0 for r in sft_rows)
    exported = transformers.LlavaForConditionalGeneration.from_pretrained(summary.export_dir)
    assert exported.config.image_token_index == transformers.AutoConfig.from_pretrained(llava_dir).image_token_index
