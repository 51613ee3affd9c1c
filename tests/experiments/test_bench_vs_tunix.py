"""experiments/bench_vs_tunix.py outside its own venv: the shape it races and its error without tunix."""

import importlib.util

import pytest

from experiments import bench_vs_tunix


def test_default_shape_is_qwen2_5_0_5b_widths_with_qwen2_biases():
    config = bench_vs_tunix.Shape().ours()
    assert (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.vocab_size) == (896, 4864, 14, 2, 64, 151936)  # fmt: skip
    assert config.qkv_bias and config.tie_word_embeddings and not config.uses_mrope


def test_prompt_strings_are_deterministic_words():
    a, b = bench_vs_tunix.prompt_strings(3, seed=1), bench_vs_tunix.prompt_strings(3, seed=1)
    assert a == b and len(a) == 3 and all(8 <= len(s.split()) < 24 for s in a)


@pytest.mark.skipif(importlib.util.find_spec("tunix") is not None, reason="tunix is installed in this venv")
def test_without_tunix_it_says_which_venv_to_use():
    with pytest.raises(SystemExit, match=r"\.venv-tunix"):
        bench_vs_tunix.main(["--runs", "1"])
