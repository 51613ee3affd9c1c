"""The in-process JAX judge end to end: prompt -> our sampler on a model -> text -> parsed reward; micro-batching
into fixed-size batches; failures become NaN + counted errors; a tiny random Qwen2.5-VL runs as a VLM judge."""

import asyncio
import math

import pytest

from balcap_jax.rewards.judges.jax_local import JaxLocalConfig, JaxLocalJudge, qwen2_5_vl_encoder, token_encoder
from balcap_jax.rewards.judges.protocol import ImagePart, JudgeUnavailable, generate_all, user_request
from balcap_jax.rewards.linguistic import LinguisticReward
from balcap_jax.rewards.judges.scripted import RuleBasedResponder, ScriptedJudge
from balcap_jax.rewards.precision import PrecisionConfig, PrecisionReward
from balcap_jax.rewards.structured_call import AskPolicy
from balcap_jax.rewards.types import RewardItem
from balcap_jax.sampling import Sampler
from tests.rewards.conftest import png_bytes
from tests.rewards.rewards_scripted_lm import ScriptedLM

ANSWER = '{"clarity": 8, "fluency": 9, "coherence": 7}'


def scripted_judge(script=ANSWER, **config):
    model = ScriptedLM(script)
    sampler, state = Sampler.from_model(model)
    defaults = dict(model="scripted-lm", eos_ids=(model.eos_id,), pad_id=0, max_new_tokens=len(script) + 4,
                    batch_size=4, prompt_buckets=(512, 1024, 2048), cache_dtype="float32")  # fmt: skip
    return JaxLocalJudge(
        sampler, state, encode=token_encoder(model.tokenize), decode_text=model.detokenize,
        config=JaxLocalConfig(**(defaults | config)),
    )  # fmt: skip


def test_linguistic_reward_from_an_in_process_model_end_to_end():
    judge = scripted_judge()
    items = [RewardItem(f"i{n}", f"A red ball number {n}.", ("ref",)) for n in range(6)]
    scores = asyncio.run(LinguisticReward(judge).score(items))
    assert [s.value for s in scores] == pytest.approx([((8 + 9 + 7) / 3 - 1) / 9] * 6)
    parsed = {"clarity": 8.0, "fluency": 9.0, "coherence": 7.0}
    assert all(s.errors == 0 and s.record["scores"] == parsed for s in scores)
    # 6 concurrent requests were micro-batched into fixed batches of 4 rows: 2 sampler calls, 1 compiled pair.
    assert judge.batches_run == 2 and judge.sampler.compiled_variants == 2
    judge.close()


def test_max_tokens_stop_strings_and_unusable_output():
    judge = scripted_judge()
    short, stopped = asyncio.run(generate_all(judge, [
        user_request("x", max_tokens=12), user_request("y", stop=(", ",)),
    ]))  # fmt: skip
    assert short.text == ANSWER[:12] and stopped.text == '{"clarity": 8'
    garbage = scripted_judge("I cannot rate this.")
    [score] = asyncio.run(LinguisticReward(garbage).score([RewardItem("i", "A ball.", ("r",))]))
    assert math.isnan(score.value) and score.errors == 1 and score.record["reasks"] == 2


def test_prompts_beyond_the_largest_bucket_fail_as_judge_errors():
    judge = scripted_judge(prompt_buckets=(64,))
    [result] = asyncio.run(generate_all(judge, [user_request("x" * 500)]))
    assert isinstance(result, JudgeUnavailable) and "bucket" in str(result)
    with pytest.raises(ValueError, match="multimodal=False"):
        asyncio.run(judge.generate(user_request(ImagePart(png_bytes()), "x")))


@pytest.mark.slow
def test_tiny_random_qwen2_5_vl_runs_as_a_visual_judge():
    from flax import nnx

    from balcap_jax.models.qwen2_5_vl import processor
    from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
    from balcap_jax.models.qwen2_5_vl.model import Qwen2_5_VL
    from tests.models.qwen_fixtures import tiny_qwen_config_dict

    hf = tiny_qwen_config_dict(text_layers=1, vision_depth=1)
    hf["text_config"]["vocab_size"] = 151936  # the real tokenizer's ids, special tokens included
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        hf.pop(name)
    config = Qwen2_5_VLConfig.from_hf(hf | hf["text_config"] | {"model_type": "qwen2_5_vl"})
    sampler, state = Sampler.from_model(Qwen2_5_VL(config, rngs=nnx.Rngs(0)))
    tokenizer = processor.load_tokenizer()
    image_config = processor.ImageProcessorConfig(min_pixels=56 * 56, max_pixels=56 * 56)
    visual_judge = JaxLocalJudge(
        sampler, state, encode=qwen2_5_vl_encoder(config, tokenizer, image_config),
        decode_text=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        config=JaxLocalConfig(model="tiny-qwen", eos_ids=(151645,), pad_id=151643, max_new_tokens=8,
                              multimodal=True, prompt_buckets=(512,), cache_dtype="float32",
                              blocked_ids=(config.image_token_id,)),
    )  # fmt: skip
    text_judge = ScriptedJudge(RuleBasedResponder(), multimodal=False)
    precision = PrecisionReward(text_judge, visual_judge, PrecisionConfig(policy=AskPolicy(parse_attempts=1)))
    item = RewardItem("img", "A red square. A blue circle.", ("A red square.",), png_bytes(size=56))
    [score] = asyncio.run(precision.score([item]))
    # The image went through the tiny VLM's vision tower and decoder; random weights write no JSON, so the
    # reward is NaN with the failed verification counted (never a zero).
    assert visual_judge.batches_run == 1 and sampler.compiled_variants == 2
    assert math.isnan(score.value) and score.errors == 1 and score.record["judge_calls"] == 2
    assert "verify: unusable answer" in score.record["failures"][0]
    visual_judge.close()
