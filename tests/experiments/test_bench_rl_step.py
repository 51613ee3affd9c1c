"""experiments/bench_rl_step.py: its building blocks at toy size, and one tiny end-to-end run against TRL."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from balcap_jax.rewards.manager import RewardManager
from balcap_jax.rewards.types import RewardItem
from tests.experiments.script_module import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench_rl_step.py"


@pytest.fixture(scope="module")
def bench():
    with script_module(SCRIPT, "bench_rl_step") as module:
        yield module


@pytest.fixture(scope="module")
def tokenizer(bench):
    tok = bench.load_tokenizer()
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def image_config(bench):
    return bench.ImageProcessorConfig(min_pixels=56 * 56, max_pixels=224 * 224)


def test_reward_functions_on_hand_computed_captions(bench):
    assert bench.word_count_reward("a b c", target_words=4) == pytest.approx(0.75)
    assert bench.word_count_reward("a b c d e f", target_words=4) == 1.0
    assert bench.word_count_reward("   ") == 0.0
    assert bench.distinct_word_reward("red red blue blue") == pytest.approx(0.5)
    assert bench.distinct_word_reward("") == 0.0
    assert bench.letter_fraction_reward("ab 1!") == pytest.approx(0.5)  # 2 letters of 4 non-space characters
    assert bench.letter_fraction_reward("ü é") == 0.0  # ASCII letters only
    assert bench.letter_fraction_reward("") == 0.0


def test_trl_reward_adapter_reads_every_completion_layout(bench):
    fn = bench.trl_reward_func("distinct", bench.distinct_word_reward)
    completions = [
        [{"role": "assistant", "content": "a a b b"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "a b "}, {"type": "text", "text": "c"}]}],
        "x x x",
    ]
    assert fn.__name__ == "distinct"
    assert fn(prompts=[None] * 3, completions=completions) == pytest.approx([0.5, 1.0, 1 / 3])


def test_text_rewards_fill_the_reward_tensor_in_component_order(bench):
    captions = [["a cat on a mat", "dog dog"], ["", "Zebra 42"]]
    groups = [[RewardItem(f"img{p}", c, ("ref",)) for c in row] for p, row in enumerate(captions)]
    with RewardManager([bench.TextReward(n, f) for n, f in bench.REWARD_FUNCTIONS]) as manager:
        rewards = manager.score_sync(groups).rewards
    expected = np.array([[[f(c) for _, f in bench.REWARD_FUNCTIONS] for c in row] for row in captions])
    assert rewards.shape == (2, 2, 3)
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)


def test_our_advantages_are_c_gdpo_with_trl_statistics(bench):
    rewards = np.random.default_rng(0).uniform(size=(3, 4, 3))
    rewards[1, :, 2] = 0.5  # a component constant within a group contributes 0
    z = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-4)
    summed = z.sum(-1)
    expected = (summed - summed.mean()) / (summed.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(bench.our_advantages(rewards), expected, rtol=1e-4, atol=1e-5)


def test_trl_last_batch_reads_the_newest_rows_of_trl_logs(bench):
    from collections import deque
    from types import SimpleNamespace

    names = [name for name, _ in bench.REWARD_FUNCTIONS]
    logs = {"rewards": {n: deque([9.0, 9.0] + [k + 0.1 * r for r in range(4)]) for k, n in enumerate(names)},
            "advantages": deque([9.0, 9.0, 1.0, -1.0, 0.5, -0.5])}  # fmt: skip
    rewards, advantages = bench.trl_last_batch(SimpleNamespace(_logs=logs), rows=4)
    np.testing.assert_allclose(rewards, [[k + 0.1 * r for k in range(3)] for r in range(4)])
    np.testing.assert_allclose(advantages, [1.0, -1.0, 0.5, -0.5])


def test_peak_rss_sees_an_allocation(bench):
    with bench.PeakRSS() as peak:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert peak.growth_mib >= 48


@pytest.mark.parametrize("index", [0, 3])  # a 224x224 and a 112x224 photograph
def test_hf_processor_gives_our_prompt_token_for_token(bench, tokenizer, image_config, index):
    processor = bench.build_hf_processor(tokenizer, image_config)
    image = bench.photographs(index + 1)[index]
    hf = processor.apply_chat_template(conversation=[bench.conversation(image)], add_generation_prompt=True,
                                       tokenize=True, return_dict=True, return_tensors="np")  # fmt: skip
    ours = bench.QwenCaptionProcessor(tokenizer, bench.INSTRUCTION, image_config)(bench.caption_examples([image])[0])
    np.testing.assert_array_equal(hf["input_ids"][0], ours["input_ids"])
    np.testing.assert_array_equal(hf["image_grid_thw"], ours["image_grid_thw"])
    np.testing.assert_allclose(hf["pixel_values"], ours["pixel_values"], atol=1e-5)
    height, width = bench.IMAGE_SIZES[index]
    assert tuple(ours["image_grid_thw"][0]) == (1, height // 14, width // 14)


def test_both_sides_start_from_the_same_network(bench, tokenizer, image_config, highest_precision):
    hf_model = bench.build_hf_model(bench.ModelSize(hidden=32, intermediate=64, layers=1, vision_depth=1), seed=1)
    ours, config = bench.our_model_from_hf(hf_model)
    assert config.text.vocab_size == bench.QWEN_VOCAB and config.image_token_id == 151655
    processor = bench.build_hf_processor(tokenizer, image_config)
    gap = bench.max_logit_gap(hf_model, ours, config, processor, bench.photographs(2)[1])
    assert gap < 1e-4


def test_step_matmul_flops_by_hand(bench):
    """One layer of hidden 8 (2 heads of 4, 1 KV head), MLP 16; one prompt of 3 real tokens x G 2, 2 new tokens."""
    size = bench.ModelSize(hidden=8, intermediate=16, layers=1, heads=2, kv_heads=1)
    settings = bench.StepSettings(prompts=1, group=2, new_tokens=2, learning_rate=1e-5)
    per_token = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16)  # q, k and v, o, gate/up/down
    unembed = 2 * 8 * bench.QWEN_VOCAB
    pair = 4 * 8  # scores + values over 2 heads of 4
    # prefill: 3 tokens, 6 causal pairs, first-token logits; one decode step per row, attending 3 + 1 keys
    sample = 3 * per_token + pair * 6 + unembed + 2 * (per_token + unembed + pair * 4)
    # update: 2 rows of 5 tokens (15 causal pairs each), logits on the 2 completion columns, x3 for backward
    update = 3 * 2 * (5 * per_token + pair * 15 + 2 * unembed)
    flops = bench.step_matmul_flops(size, settings, prompt_lengths=(3,))
    assert flops == dict(sample=float(sample), update=float(update), total=float(sample + update))
    # Linear in prompts: two prompts count as the sum of each alone.
    two = bench.step_matmul_flops(size, dataclasses.replace(settings, prompts=2), prompt_lengths=(3, 7))
    seven = bench.step_matmul_flops(size, settings, prompt_lengths=(7,))
    assert two["total"] == flops["total"] + seven["total"]


def test_command_line_rejects_settings_trl_cannot_run(bench):
    with pytest.raises(SystemExit, match="group"):
        bench.parse_args(["--group", "1"])
    with pytest.raises(SystemExit, match="hidden"):
        bench.parse_args(["--hidden", "36"])
    assert bench.parse_args([]).threads == 2


@pytest.mark.slow
def test_tiny_side_by_side_run_writes_results_and_prints_speedup(bench, tmp_path, capsys):
    argv = ["--prompts", "1", "--group", "2", "--new-tokens", "3", "--warmup", "1", "--steps", "1",
            "--hidden", "32", "--layers", "1", "--max-pixels", str(112 * 112), "--out-dir", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup_vs_trl=\d+\.\d+ ceiling_vs_trl=\d+\.\d+", last), last
    result = json.loads((tmp_path / "bench_rl_step.json").read_text())
    ceiling = result["ceiling"]
    assert ceiling["ceiling_vs_trl"] == pytest.approx(result["trl"]["median_s"] / ceiling["floor_s"])
    assert float(last.split("=")[2]) == pytest.approx(ceiling["ceiling_vs_trl"], abs=1e-3)
    assert len(result["trl"]["seconds"]) == len(result["ours"]["seconds"]) == 2  # warm-up + measured, interleaved
    assert result["speedup_vs_trl"] == pytest.approx(result["trl"]["median_s"] / result["ours"]["median_s"])
    assert float(last.split("=")[1].split()[0]) == pytest.approx(result["speedup_vs_trl"], abs=1e-3)
    assert result["advantage_parity_max_abs"] < 1e-4
    assert result["model"]["step0_max_logit_gap"] < 1e-3
    for side in ("trl", "ours"):
        means = np.asarray(result[side]["reward_means"])
        assert means.shape == (2, 3) and np.all((means >= 0) & (means <= 1))
    assert set(result["ours"]["phase_medians"]) == {"host_inputs", "sample", "reward", "advantages", "update"}
    markdown = (tmp_path / "bench_rl_step.md").read_text()
    assert "| TRL 1.16" in markdown and "| balcap_jax" in markdown and "speedup_vs_trl" in markdown
