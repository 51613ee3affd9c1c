"""experiments/bench_vs_tunix.py: what both sides of each race are given, the argument checks and the report,
in the main venv (no tunix); and one tiny GRPO-step race where tunix is importable (.venv-tunix)."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

from experiments import bench_vs_tunix
from balcap_jax.trainer import builders

HAS_TUNIX = importlib.util.find_spec("tunix") is not None
TINY = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "2", "--kv-heads", "1",
        "--head-dim", "32", "--prompts", "2", "--group", "2", "--new-tokens", "4"]  # fmt: skip


def test_default_shape_is_qwen2_5_0_5b_widths_with_qwen2_biases():
    config = bench_vs_tunix.Shape().ours()
    assert (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.vocab_size) == (896, 4864, 14, 2, 64, 151936)  # fmt: skip
    assert config.qkv_bias and config.tie_word_embeddings and not config.uses_mrope


def test_grpo_policy_decoder_has_the_raced_shape_and_tunix_rope_theta():
    from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

    shape = bench_vs_tunix.Shape(layers=3)
    text = Qwen2_5_VLConfig.from_hf(shape.ours_policy()).text
    assert (text.hidden_size, text.intermediate_size, text.num_layers, text.num_heads, text.num_kv_heads,
            text.head_dim, text.vocab_size) == (896, 4864, 3, 14, 2, 64, 151936)  # fmt: skip
    assert text.qkv_bias and text.tie_word_embeddings and text.rope_theta == 1_000_000
    assert sum(text.mrope_section) == shape.head_dim // 2


def test_prompt_strings_are_deterministic_words():
    a, b = bench_vs_tunix.prompt_strings(3, seed=1), bench_vs_tunix.prompt_strings(3, seed=1)
    assert a == b and len(a) == 3 and all(8 <= len(s.split()) < 24 for s in a)


def test_random_rewards_are_one_fixed_seed_stream_in_unit_interval():
    a, b = bench_vs_tunix.random_rewards(3), bench_vs_tunix.random_rewards(3)
    first, second = a(4), a(4)
    assert first == b(4) and second == b(4) and first != second
    assert all(0.0 <= r < 1.0 for r in first + second)
    assert bench_vs_tunix.random_rewards(4)(4) != first


def test_both_grpo_steps_get_the_same_settings():
    s = bench_vs_tunix.StepSettings(prompts=3, group=5, new_tokens=7, lr=3e-6, seed=2)
    theirs = bench_vs_tunix.tunix_grpo_settings(s)
    ours = bench_vs_tunix.our_grpo_config(s)
    rollout, algo = theirs["rollout"], theirs["algo"]
    assert (rollout["max_tokens_to_generate"], algo["num_generations"]) == (7, 5)
    assert (ours.sampling.max_new_tokens, ours.sampling.group_size) == (7, 5)
    assert rollout["temperature"] == ours.sampling.temperature == 1.0
    assert rollout["top_p"] == ours.sampling.top_p == 1.0 and rollout["top_k"] is None and ours.sampling.top_k == 0
    assert rollout["eos_tokens"] == [-1]  # never sampled: every row runs to the budget, as ours with eos_ids=()
    assert rollout["max_prompt_length"] == tuple(ours.data.prompt_buckets)[0] == bench_vs_tunix.PROMPT_BUCKET
    assert rollout["kv_cache_size"] == bench_vs_tunix.PROMPT_BUCKET + 7
    assert algo["beta"] == ours.loss.kl_coef == 0.0  # no reference model on either side
    assert algo["epsilon"] == ours.loss.eps_low == ours.loss.eps_high == 0.2 and ours.loss.dual_clip == 0.0
    assert algo["loss_agg_mode"] == ours.loss.aggregation == "token-mean"
    assert algo["num_iterations"] == ours.train.updates_per_batch == 1
    assert algo["advantage_estimator"] == ours.advantage.kind == "grpo"
    assert (ours.advantage.ddof, ours.advantage.eps, ours.length.kind) == (1, 1e-6, "none")
    assert theirs["optimizer"]["learning_rate"] == ours.optim.lr == 3e-6
    assert ours.model.dtype == ours.model.param_dtype == "float32"


def test_our_grpo_config_builds_the_production_pieces_as_adam_without_extra_passes():
    import jax
    import jax.numpy as jnp
    import optax

    s = bench_vs_tunix.StepSettings(prompts=2, group=2, new_tokens=4, lr=1e-3)
    config = bench_vs_tunix.our_grpo_config(s)
    assert builders.old_logprobs_mode(config) == "current"  # pi_old = the update's own forward, as tunix's
    shaping = builders.shaping_config(config)
    assert (shaping.kind, shaping.components, shaping.length_kind) == ("grpo", ("random",), "none")
    ours, _ = builders.rl_optimizer(config)
    adam = optax.adam(1e-3)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: 100.0 * jnp.cos(p), params)  # large: clipping would show
    a, _ = ours.update(grads, ours.init(params), params)
    b, _ = adam.update(grads, adam.init(params), params)
    for k in params:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-6)


class _Tokenizer:
    def __call__(self, text):
        return {"input_ids": [100 + len(w) for w in text.split()]}


def test_text_prompt_batch_left_pads_with_text_positions_and_no_image():
    batch = bench_vs_tunix.text_prompt_batch(_Tokenizer(), ["a bb ccc", "dddd"], bucket=6, pad_id=7)
    np.testing.assert_array_equal(batch["input_ids"], [[7, 7, 7, 101, 102, 103], [7, 7, 7, 7, 7, 104]])
    np.testing.assert_array_equal(batch["attention_mask"], [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    assert batch["positions"].shape == (3, 2, 6)
    np.testing.assert_array_equal(batch["positions"][0], [[0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 0, 0]])
    assert (batch["positions"] == batch["positions"][:1]).all()  # M-RoPE with text positions = 1-D RoPE
    assert batch["image_grid_thw"].shape == (0, 3) and batch["pixel_values"].shape[0] == 0
    np.testing.assert_array_equal(batch["prompt_length"], [3, 1])
    assert len(batch["references"]) == len(batch["metadata"]) == len(batch["example_id"]) == 2


def test_text_prompt_batch_rejects_a_prompt_longer_than_the_bucket():
    with pytest.raises(ValueError, match="more than the 2-token bucket"):
        bench_vs_tunix.text_prompt_batch(_Tokenizer(), ["a b c"], bucket=2, pad_id=0)


def test_check_lengths_demands_exactly_the_new_token_count_on_every_row():
    bench_vs_tunix.check_lengths({"tunix": [4, 4], "ours": [4]}, 4)
    with pytest.raises(RuntimeError, match=r"'ours': \[3, 4\]"):
        bench_vs_tunix.check_lengths({"tunix": [4, 4], "ours": [4, 3]}, 4)


def test_arguments_default_to_both_races_and_are_validated():
    args = bench_vs_tunix.parse_args([])
    assert args.race == "both" and bench_vs_tunix.shape_of(args) == bench_vs_tunix.Shape()
    assert bench_vs_tunix.parse_args(["--race", "sampler", "--group", "1"]).group == 1
    bad = {("--race", "grpo", "--group", "1"): "must be >= 2",
           ("--group", "1"): "must be >= 2",
           ("--race", "grpo", "--hidden", "100"): "must equal --hidden=100",
           ("--heads", "14", "--kv-heads", "3"): "must divide",
           ("--head-dim", "63", "--race", "sampler"): "must be even",
           ("--runs", "0"): "--runs=0 must be >= 1",
           ("--warmup", "-1"): "must be >= 0",
           ("--lr", "0"): "must be > 0"}  # fmt: skip
    for argv, message in bad.items():
        with pytest.raises(SystemExit, match=message):
            bench_vs_tunix.parse_args(list(argv))
    with pytest.raises(SystemExit):
        bench_vs_tunix.parse_args(["--race", "trl"])


def _spread(median):
    return {"median": median, "low": median - 0.1, "high": median + 0.1, "count": 3}


def _result(sampler: bool, grpo: bool) -> dict:
    r = dict(shape=dataclasses.asdict(bench_vs_tunix.Shape()), prompts=2, group=4, rows=8, new_tokens=32,
             prompt_bucket=64, runs=3, warmup=1, jax="0.10.2", backend="cpu", device="cpu", tunix="0.1.7",
             loadavg=dict(start=[1.0], end=[2.0]))  # fmt: skip
    if sampler:
        r.update(seconds={"tunix": [3.0, 2.0, 4.0], "ours": [1.0, 1.0, 2.0]},
                 tokens_per_s={"tunix": _spread(80.0), "ours": _spread(256.0)}, sampler_ratio=_spread(1.5))
    if grpo:
        r.update(grpo_seconds={"tunix": [5.0, 6.0, 7.0], "ours": [2.0, 3.0, 2.5]},
                 grpo_first_step_s={"tunix": 20.0, "ours": 30.0}, grpo_step_ratio=_spread(2.25),
                 grpo_settings=dict(clip_eps=0.2, lr=1e-5))
    return r


def test_summary_line_keeps_the_sampler_key_and_adds_the_grpo_one():
    assert bench_vs_tunix.summary_line(_result(True, True)) == "tunix_sampler_ratio=1.500 tunix_grpo_step_ratio=2.250"
    assert bench_vs_tunix.summary_line(_result(True, False)) == "tunix_sampler_ratio=1.500"
    assert bench_vs_tunix.summary_line(_result(False, True)) == "tunix_grpo_step_ratio=2.250"


def test_markdown_has_a_section_per_race_that_ran():
    both = bench_vs_tunix.render_markdown(_result(True, True), "python -m experiments.bench_vs_tunix")
    assert "tunix_sampler_ratio = 1.50 (1.40-1.60)x" in both and "tunix_grpo_step_ratio = 2.25 (2.15-2.35)x" in both
    assert "| 6.000 (5.000-7.000) | 20.000 |" in both and "| 2.500 (2.000-3.000) | 30.000 |" in both
    grpo_only = bench_vs_tunix.render_markdown(_result(False, True), "cmd")
    assert "GRPO step" in grpo_only and "Sampler (strings out)" not in grpo_only and "not raced" not in grpo_only


@pytest.mark.skipif(HAS_TUNIX, reason="tunix is installed in this venv")
def test_without_tunix_it_says_which_venv_to_use():
    with pytest.raises(SystemExit, match=r"\.venv-tunix"):
        bench_vs_tunix.main(["--runs", "1"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TUNIX, reason="google-tunix is not importable here: run in .venv-tunix")
def test_one_tiny_round_of_the_grpo_race(tmp_path, capsys):
    assert bench_vs_tunix.main([*TINY, "--race", "grpo", "--runs", "1", "--warmup", "0", "--out-dir",
                                str(tmp_path), "--out-name", "tiny"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert set(result["grpo_seconds"]) == {"tunix", "ours"} and "sampler_ratio" not in result
    assert all(len(v) == 1 and v[0] > 0 for v in result["grpo_seconds"].values())
    ratio = result["grpo_seconds"]["tunix"][0] / result["grpo_seconds"]["ours"][0]
    assert result["grpo_step_ratio"]["median"] == pytest.approx(ratio)
    assert "tunix_grpo_step_ratio" in (tmp_path / "tiny.md").read_text()
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"tunix_grpo_step_ratio={ratio:.3f}"


def test_our_grpo_step_runs_text_only_prompts_on_the_registered_family():
    """The production RLStep on the plain qwen2_5_vl family with image-less prompts (its vision hook gives no
    vision inputs), in the main venv: every row generates the requested tokens."""
    from balcap_jax.models.qwen2_5_vl.processor import load_tokenizer

    args = bench_vs_tunix.parse_args(TINY)
    settings = bench_vs_tunix.StepSettings(args.prompts, args.group, args.new_tokens, args.lr, args.seed)
    step, manager = bench_vs_tunix.build_our_grpo(bench_vs_tunix.shape_of(args), settings, load_tokenizer())
    with manager:
        lengths = step()
    assert lengths == [args.new_tokens] * (args.prompts * args.group)
