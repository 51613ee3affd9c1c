"""`rewards.judge.backend = "jax_local"`: a training config builds the in-process judge (our Llama decoder on the
real SmolLM2-135M-Instruct weights) and scores a caption; the model is text-only, so the visual component is
unscorable and counted, never 0."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")

from balcap_jax.config import ConfigError, validate  # noqa: E402
from balcap_jax.default_config import get_config  # noqa: E402
from balcap_jax.rewards.manager import RewardManager  # noqa: E402
from balcap_jax.rewards.types import RewardItem  # noqa: E402
from balcap_jax.trainer.judges import build_reward_components  # noqa: E402
from tests.models.smollm2_fixture import smollm2_hf_dir  # noqa: E402,F401  (session fixture)
from tests.rewards.conftest import png_bytes  # noqa: E402


def local_config(model_dir: str):
    config = get_config()
    with config.unlocked():  # the embedded default predates the local-judge fields
        config.rewards.judge.update(backend="jax_local", local_model_dir=model_dir, local_max_new_tokens=48)
    return config


def test_validation_names_the_missing_or_wrong_model_dir(tmp_path):
    with pytest.raises(ConfigError, match=r"local_model_dir is empty: judge.backend='jax_local'"):
        validate(local_config(""), device_count=1, process_count=1)
    with pytest.raises(ConfigError, match=r"local_model_dir=.*has no config.json"):
        validate(local_config(str(tmp_path)), device_count=1, process_count=1)
    with pytest.raises(ValueError, match="local_model_dir must be set for backend='jax_local'"):
        build_reward_components(local_config(""))


@pytest.mark.slow
def test_a_jax_local_training_config_scores_text_components_and_counts_the_visual_one(smollm2_hf_dir):
    config = local_config(str(smollm2_hf_dir))
    validate(config, device_count=1, process_count=1)
    components = build_reward_components(config)
    assert [c.name for c in components] == ["precision", "recall", "linguistic"]
    item = RewardItem("photo", "A red ball lies on a wooden floor next to a box.",
                      ("A red ball lies on the floor. A wooden box stands behind it.",), png_bytes())  # fmt: skip
    with RewardManager(components) as manager:
        batch = manager.score_sync([[item]])
    precision, recall, linguistic = (batch.scores[k][0] for k in range(3))
    # The image claims went to a text-only model: unscorable (NaN) with the failed calls counted.
    assert math.isnan(precision.value) and batch.metrics["precision"].nan_count == 1
    assert precision.errors >= 1 and components[0].visual_judge.refused >= 1
    # The text side ran on the in-process decoder: its replies were generated (calls made), and whatever the
    # 135M model wrote, each component is either a score in [0, 1] or NaN counted as unscorable.
    text_judge = components[1].text_judge
    assert text_judge.batches_run >= 1 and batch.metrics["linguistic"].judge_calls >= 1
    for name, score in (("recall", recall), ("linguistic", linguistic)):
        assert math.isnan(score.value) == (batch.metrics[name].nan_count == 1), name
        assert math.isnan(score.value) or 0.0 <= score.value <= 1.0, (name, score.value)
    print(f"\njax_local SmolLM2 judge: recall={recall.value} linguistic={linguistic.value} "
          f"(batches {text_judge.batches_run}, precision refused {components[0].visual_judge.refused})")
    text_judge.close()
