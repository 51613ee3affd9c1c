"""One builder for the OpenAI judge pair behind training, evaluation and the scoring CLI; the judge cache in
`<workdir>/judge_cache` by default; the new judge fields optional in configs."""

import os

import pytest

from balcap_jax.default_config import get_config
from balcap_jax.evaluation.judge_setup import build_judges
from balcap_jax.rewards import score
from balcap_jax.rewards.judges.openai_pair import openai_judge_pair_from_config
from balcap_jax.trainer.judges import build_reward_components


def openai_config(**judge):
    config = get_config()
    config.rewards.components = ("precision", "recall", "linguistic")
    servers = dict(llm_url="http://llm:8000/v1,http://llm2:8000/v1", llm_model="L", vlm_url="http://vlm:8001/v1",
                   vlm_model="V")  # fmt: skip
    config.rewards.judge.update(backend="openai", **(servers | judge))
    return config


def judges_of(components):
    precision = components[0]
    return precision.text_judge, precision.visual_judge


def test_the_cache_defaults_to_the_workdir_and_cache_dir_wins(tmp_path):
    text, visual = judges_of(build_reward_components(openai_config(), workdir=tmp_path / "run"))
    expected = os.path.join(tmp_path, "run", "judge_cache", "judge_cache.sqlite")
    assert text.cache is visual.cache and text.cache.path == expected and os.path.exists(expected)
    text, _ = judges_of(build_reward_components(openai_config()))
    assert text.cache is None  # no workdir, no cache_dir: nothing to cache into
    explicit = str(tmp_path / "shared")
    text, _ = judges_of(build_reward_components(openai_config(cache_dir=explicit), workdir=tmp_path / "run"))
    assert text.cache.path == os.path.join(explicit, "judge_cache.sqlite")


def test_training_evaluation_and_cli_build_the_same_judges(tmp_path):
    config = openai_config(cache_dir=str(tmp_path))
    train_text, train_visual = judges_of(build_reward_components(config))
    judges = build_judges("config", config)
    argv = ["--judge-url", "http://llm:8000/v1", "--judge-url", "http://llm2:8000/v1", "--judge-model", "L",
            "--vlm-judge-url", "http://vlm:8001/v1", "--vlm-judge-model", "V", "--input", "x", "--output", "y",
            "--max-concurrency", "64", "--timeout", "60", "--max-attempts", "5"]  # fmt: skip
    cli_text, cli_visual = judges_of(score.build_components(score.parse_args(argv)))
    assert train_text.config == judges.text.config == cli_text.config
    assert train_visual.config == judges.visual.config == cli_visual.config
    assert train_text.config.base_urls == ("http://llm:8000/v1", "http://llm2:8000/v1")
    assert not train_text.multimodal and train_visual.multimodal


def test_new_judge_fields_are_optional_and_reach_the_clients(tmp_path):
    config = openai_config()
    with config.unlocked():  # configs written before these fields still work
        del config.rewards.judge["image_max_side"], config.rewards.judge["response_format"]
    text, visual = openai_judge_pair_from_config(config.rewards.judge)
    assert (visual.config.image_max_side, visual.config.response_format) == (1024, "json_schema")
    config.rewards.judge.image_max_side = 0
    config.rewards.judge.response_format = "none"
    text, visual = openai_judge_pair_from_config(config.rewards.judge, workdir=tmp_path)
    assert (visual.config.image_max_side, text.config.response_format) == (0, "none")
    config.rewards.judge.response_format = "xml"
    with pytest.raises(ValueError, match="response_format"):
        openai_judge_pair_from_config(config.rewards.judge)


def test_without_a_vlm_the_text_judge_sees_images_and_errors_name_the_fields():
    config = openai_config(vlm_url="", vlm_model="")
    text, visual = judges_of(build_reward_components(config))
    assert text is visual and text.multimodal
    with pytest.raises(ValueError, match="llm_url and llm_model must be set for backend='openai'"):
        build_reward_components(openai_config(llm_model=""))
    with pytest.raises(ValueError, match="must be set to evaluate with judge backend 'openai'"):
        build_judges("config", openai_config(llm_url=""))
    with pytest.raises(ValueError, match="vlm_model must be set when vlm_url is"):
        build_judges("config", openai_config(vlm_model=""))
