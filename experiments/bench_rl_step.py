"""One full RL step — sample G rollouts, score, c-GDPO advantages, policy update — balcap_jax vs TRL GRPOTrainer.

Both sides train the same random tiny Qwen2.5-VL (HF torch weights converted into ours, so the networks are
identical at step 0; the full 151,936-token Qwen vocabulary, because TRL feeds real Qwen tokenizer ids), on the
same prompts (a chat prompt with one real photograph each, 112-224 px, through the same Qwen image processing),
with the same settings:

  * P prompts x G rollouts per step, temperature-1 sampling over the full vocabulary (image token suppressed);
  * exactly `new_tokens` tokens per rollout on both sides (TRL: `min_new_tokens = max_completion_length`, which
    masks EOS; ours: no EOS ids), so both do the same work;
  * the same three cheap deterministic reward functions of the caption text (TRL `reward_funcs`; ours
    `RewardComponent`s through the `RewardManager`, giving rewards[P, G, K]);
  * c-GDPO advantages (TRL `multi_objective_aggregation="normalize_then_sum"`; ours `rl.shaping` with
    kind="gdpo", unbiased std, eps 1e-4, sample statistics), checked to agree on TRL's own rewards every step;
  * clipped token-level surrogate (eps 0.2, token-mean aggregation = TRL's default "dapo" loss), no KL,
    one update per batch, AdamW (constant lr, no weight decay, grad-norm clip 1.0), fp32 everywhere, no
    gradient checkpointing on either side.

Timing: one process. TRL runs its normal `trainer.train()` loop; a `TrainerCallback` times each TRL step from
`on_step_begin` to `on_step_end` (generation, reward functions, advantages, forward/backward, clip, optimizer
step), and at each `on_step_end` runs and times one of our steps on the same prompts — so the two sides are
interleaved step by step and see the same machine load. Our step is the production one (`trainer.rl_step.RLStep`,
what `python -m balcap_jax.train` runs), timed end to end from PIL images + instruction (host preprocessing,
vision + prefill, decode loop, detokenise, reward manager, advantages, training batch, jitted update, blocked
until the new parameters exist). Our first step compiles; it runs before TRL starts
and is reported separately. Then `--warmup` steps per side are discarded and the median of `--steps` steps
is reported. Memory: peak resident-set growth of the process during each side's steps (Linux VmHWM, reset
before each step).

Model size: by default the text decoder has Qwen2.5-0.5B's widths (hidden 896, MLP 4864, 14 heads / 2 KV heads
of 64) with 4 layers, about 60M non-embedding parameters next to the 136M of the (tied) 151,936-token embedding;
both counts are printed and written to the results.

Spread: the median and min-max of each side's measured steps, and the speed-up as the median (min-max) of the
per-step ratios TRL seconds / our seconds (each pair ran back to back under the same load).

Reproduce (the numbers in experiments/results/bench_rl_step.md), from the repository root:
    python -m experiments.bench_rl_step
The last line printed is `speedup_vs_trl=<float>` (median of the per-step ratios TRL seconds / ours).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Everything is built in-process: never reach for the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import PIL.Image  # noqa: E402
from flax import nnx  # noqa: E402

from balcap_jax.data.bucketing import DEFAULT_SEQUENCE_PAD_VALUES, bucket_length, collate  # noqa: E402
from balcap_jax.data.pipeline import prepare  # noqa: E402
from balcap_jax.data.qwen_inputs import QWEN_CONCAT_KEYS, QwenCaptionProcessor  # noqa: E402
from balcap_jax.data.records import CaptionExample  # noqa: E402
from balcap_jax.models import hf_io, registry  # noqa: E402
from balcap_jax.models.qwen2_5_vl import params as qwen_params  # noqa: E402
from balcap_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig  # noqa: E402
from balcap_jax.models.qwen2_5_vl.processor import (  # noqa: E402
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TOKEN_IDS,
    ImageProcessorConfig,
    load_tokenizer,
)
from balcap_jax.models.qwen2_5_vl.vision import hf_special_cases  # noqa: E402
from balcap_jax.parallel import hosts  # noqa: E402
from balcap_jax.rewards.manager import RewardManager  # noqa: E402
from balcap_jax.rewards.types import ComponentScore, RewardItem  # noqa: E402
from balcap_jax.rl import update as update_lib  # noqa: E402
from balcap_jax.sampling import Sampler  # noqa: E402
from balcap_jax.rl import shaping  # noqa: E402
from balcap_jax.trainer import builders  # noqa: E402
from balcap_jax.trainer.rl_step import RLStep  # noqa: E402
from balcap_jax.trainer.policy import Policy  # noqa: E402
from balcap_jax import default_config  # noqa: E402
from balcap_jax.metrics import PhaseTimer  # noqa: E402
from balcap_jax.trainer import placement  # noqa: E402
from experiments import bench_sampling, common  # noqa: E402

RESULTS = common.RESULTS
PeakRSS = common.PeakRSS
loadavg = common.loadavg
INSTRUCTION = "Describe the image in detail."
# (height, width) of the photographs fed to both processors, cycled over prompts: 112-224 px, several grids.
IMAGE_SIZES = ((224, 224), (168, 224), (224, 168), (112, 224), (196, 196), (140, 224))
QWEN_VOCAB = 151936
IM_END_ID = SPECIAL_TOKEN_IDS["<|im_end|>"]
ENDOFTEXT_ID = 151643
PROMPT_BUCKETS = (64, 96, 128, 160, 192, 256, 320, 384, 512)


# ---------------------------------------------------------------------------------------------------------------
# Reward functions: pure, deterministic, identical on both sides


def word_count_reward(text: str, target_words: int = 24) -> float:
    """min(#words, target) / target: rewards captions up to `target_words` whitespace-separated words."""
    return min(len(text.split()), target_words) / target_words


def distinct_word_reward(text: str) -> float:
    """#distinct words / #words (0 for an empty caption): penalises repetition."""
    words = text.split()
    return len(set(words)) / len(words) if words else 0.0


def letter_fraction_reward(text: str) -> float:
    """Fraction of non-space characters that are ASCII letters (0 for an empty caption)."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isascii() and c.isalpha() for c in chars) / len(chars) if chars else 0.0


REWARD_FUNCTIONS: tuple[tuple[str, Callable[[str], float]], ...] = (
    ("words", word_count_reward),
    ("distinct", distinct_word_reward),
    ("letters", letter_fraction_reward),
)


def completion_text(completion: Any) -> str:
    """TRL's completion for one rollout -> its text: a string (standard prompts) or, for conversational prompts,
    [{"role": "assistant", "content": str | [{"type": "text", "text": str}, ...]}]."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def trl_reward_func(name: str, fn: Callable[[str], float]) -> Callable[..., list[float]]:
    """A text reward as a TRL `reward_funcs` entry: (prompts, completions, **kwargs) -> list[float]."""

    def reward(prompts, completions, **kwargs) -> list[float]:
        return [float(fn(completion_text(c))) for c in completions]

    reward.__name__ = name
    return reward


@dataclasses.dataclass(frozen=True)
class TextReward:
    """A text reward as our `RewardComponent` (one column of rewards[P, G, K])."""

    name: str
    fn: Callable[[str], float]

    async def score(self, items: Sequence[RewardItem]) -> list[ComponentScore]:
        return [ComponentScore(float(self.fn(item.caption))) for item in items]


# ---------------------------------------------------------------------------------------------------------------
# The model, identical on both sides


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Text decoder and vision tower widths of the random Qwen2.5-VL (head_dim = hidden / heads)."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_heads: int = 2


def hf_config_dict(size: ModelSize) -> dict:
    """kwargs for `transformers.Qwen2_5_VLConfig`: the Qwen vocabulary and special ids, tied embeddings."""
    half = size.hidden // size.heads // 2
    t_section = max(half // 4, 1)
    hw = (half - t_section) // 2
    return dict(
        text_config=dict(
            vocab_size=QWEN_VOCAB, hidden_size=size.hidden, intermediate_size=size.intermediate,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
            rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                 mrope_section=[t_section, hw, half - t_section - hw]),
            bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID,
        ),
        vision_config=dict(
            depth=size.vision_depth, hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate,
            num_heads=size.vision_heads, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, out_hidden_size=size.hidden, fullatt_block_indexes=[size.vision_depth - 1],
        ),
        image_token_id=SPECIAL_TOKEN_IDS["<|image_pad|>"], video_token_id=151656,
        vision_start_token_id=SPECIAL_TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_TOKEN_IDS["<|vision_end|>"], tie_word_embeddings=True,
    )  # fmt: skip


def build_hf_model(size: ModelSize, seed: int):
    """The random torch `Qwen2_5_VLForConditionalGeneration` (fp32). Weights are redrawn with std 0.05 so the
    tiny model's next-token distribution depends on its input (HF's 0.02 init makes it nearly uniform)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**hf_config_dict(size)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.05 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = ENDOFTEXT_ID
    return model.float()


def our_model_from_hf(hf_model) -> tuple[Any, Qwen2_5_VLConfig]:
    """Our Qwen2_5_VL module holding exactly the torch model's weights (fp32)."""
    config = Qwen2_5_VLConfig.from_hf(hf_model.config.to_dict())
    tensors = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
    abstract = qwen_params.abstract_model(config, dtype=jnp.float32, param_dtype=jnp.float32)
    mapping = hf_io.ParamMapping(special_cases=hf_special_cases(), ignore_unexpected=(r"lm_head\.weight",))
    return qwen_params.from_hf_tensors(abstract, tensors, mapping), config


def parameter_counts(hf_model) -> dict[str, int]:
    """Parameters of the torch model by part: the (tied) token embedding, the text decoder without it (the
    "non-embedding" count of scaling papers), the vision tower."""
    counts = {"embedding": 0, "text_non_embedding": 0, "vision": 0}
    for name, param in hf_model.named_parameters():
        part = "vision" if ".visual." in f".{name}" else "embedding" if "embed_tokens" in name else "text_non_embedding"
        counts[part] += param.numel()
    counts["non_embedding"] = counts["text_non_embedding"] + counts["vision"]
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Prompts: the same photographs and chat prompt on both sides


def photographs(count: int) -> list[PIL.Image.Image]:
    """`count` RGB photographs from scikit-image's samples, resized to the sizes of IMAGE_SIZES in turn."""
    images = []
    for i, array in enumerate(common.photograph_arrays(count)):
        height, width = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        images.append(PIL.Image.fromarray(array).resize((width, height), PIL.Image.BICUBIC))
    return images


# A Qwen2.5-VL chat template for image + text user turns, rendering exactly what `processor.format_chat` does.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message.role != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_hf_processor(tokenizer, image_config: ImageProcessorConfig):
    """An image-only `Qwen2_5_VLProcessor` (the stock one also wants a video processor, which needs torchvision,
    absent here) over the offline Qwen tokenizer and HF's PIL image processor."""
    import transformers

    class ImageOnlyQwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    image_processor = transformers.Qwen2VLImageProcessorPil(
        min_pixels=image_config.min_pixels, max_pixels=image_config.max_pixels
    )
    return ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


def conversation(image: PIL.Image.Image | None = None) -> list[dict]:
    """One user turn: the image, then the instruction (TRL fills the image slot from the dataset's column)."""
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [image_part, {"type": "text", "text": INSTRUCTION}]}]


def caption_examples(images: Sequence[PIL.Image.Image]) -> list[CaptionExample]:
    """Our pipeline's view of the same prompts (the reference text is unused by these rewards)."""
    examples = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        examples.append(CaptionExample(f"photo_{i}", image, buffer.getvalue(), ("a photograph",), (), {}))
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Our RL step


@dataclasses.dataclass(frozen=True)
class StepSettings:
    prompts: int
    group: int
    new_tokens: int
    learning_rate: float


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """state: the updated TrainState; phases: {phase: seconds}; rewards: float32[P, G, K];
    lengths: int32[P * G] completion tokens per rollout."""

    state: update_lib.TrainState
    phases: dict[str, float]
    rewards: np.ndarray
    lengths: np.ndarray
    prompt_lengths: tuple[int, ...]  # each prompt's real tokens (before padding to a bucket)


@dataclasses.dataclass
class OurStep:
    """balcap_jax's production RL step — `trainer.rl_step.RLStep`, the object the training loop runs — fed this
    benchmark's prompts. Building the batch from the examples (preprocessing, collation) is inside the timing,
    as TRL's own preprocessing is on its side."""

    rl_step: RLStep
    processor: QwenCaptionProcessor
    settings: StepSettings

    @property
    def sampler(self) -> Sampler:
        return self.rl_step.sampler

    def __call__(self, state: update_lib.TrainState, examples: Sequence[CaptionExample], key: jax.Array) -> StepOutput:
        """One step on P examples (donates `state`); `key` is the step's rng."""
        policy = self.rl_step.policy
        start = time.perf_counter()
        prepared = [prepare(ex, self.processor, PROMPT_BUCKETS[-1]) for ex in examples]
        length = bucket_length(max(p.length for p in prepared), PROMPT_BUCKETS)
        batch = collate(prepared, length, concat_keys=QWEN_CONCAT_KEYS,
                        pad_values={**DEFAULT_SEQUENCE_PAD_VALUES, "input_ids": policy.pad_id})  # fmt: skip
        timer = PhaseTimer()
        host_inputs = time.perf_counter() - start
        with jax.set_mesh(self.rl_step.mesh):  # the loop runs its steps under the mesh context too
            result = self.rl_step({"train": state, "rng": key}, batch, timer)
            jax.block_until_ready(result.state["train"])
        phases = {"host_inputs": host_inputs}
        phases |= {k.removeprefix("phase/").removesuffix("_s"): v for k, v in timer.summary(prefix="phase").items()
                   if k != "phase/total_s"}
        return StepOutput(result.state["train"], phases, result.rewards, np.asarray(result.rollout.lengths),
                          tuple(int(p.length) for p in prepared))


def step_config(settings: StepSettings) -> ml_collections.ConfigDict:
    """The run config of the raced step: the embedded default with the benchmark's sizes, TRL's settings
    (clip 0.2 both sides, no KL, token-mean, constant lr, grad clip 1) and c-GDPO without length handling."""
    c = default_config.get_config()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.data.prompt_buckets = PROMPT_BUCKETS
    c.sampling = ml_collections.ConfigDict(dict(group_size=settings.group, max_new_tokens=settings.new_tokens,
                                                temperature=1.0, top_p=1.0, top_k=0))
    c.rewards.components = tuple(name for name, _ in REWARD_FUNCTIONS)
    c.rewards.weights = (1.0,) * len(REWARD_FUNCTIONS)
    c.advantage = ml_collections.ConfigDict(dict(kind="gdpo", eps=1e-4, ddof=1, batch_stats="sample"))
    c.length.kind = "none"
    c.loss = ml_collections.ConfigDict(dict(eps_low=0.2, eps_high=0.2, dual_clip=0.0, kl_coef=0.0,
                                            aggregation="token-mean"))
    c.optim = ml_collections.ConfigDict(dict(lr=settings.learning_rate, warmup_steps=0, schedule="constant",
                                             weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999))
    c.train.rl_steps, c.train.updates_per_batch, c.train.micro_batches = 1000, 1, 1
    return c


def shaping_config() -> shaping.ShapingConfig:
    """c-GDPO with TRL's normalize_then_sum statistics: per-component group z-scores (unbiased std, eps 1e-4),
    weighted sum, batch z-score over samples; no length handling (TRL has none)."""
    return shaping.ShapingConfig(
        components=tuple(name for name, _ in REWARD_FUNCTIONS), weights=(1.0,) * len(REWARD_FUNCTIONS),
        kind="gdpo", eps=1e-4, ddof=1, batch_stats="sample", length_kind="none",
    )  # fmt: skip


def build_our_step(model, config: Qwen2_5_VLConfig, tokenizer, image_config: ImageProcessorConfig,
                   settings: StepSettings, manager: RewardManager) -> tuple[OurStep, update_lib.TrainState]:
    graphdef, params = nnx.split(model)
    policy = Policy(registry.get("qwen2_5_vl"), config, model, tokenizer, image_config, None,
                    eos_id=IM_END_ID, pad_id=ENDOFTEXT_ID)  # fmt: skip
    run_config = step_config(settings)
    mesh = builders.mesh(run_config, devices=jax.devices()[:1])
    # As trainer/loop.py builds it: training layout, the rollout copy program, a sampler whose cache follows it.
    params = jax.device_put(params, placement.param_shardings(policy.family, params, mesh, "training"))
    for_sampling = placement.rollout_copy(run_config, policy, params, mesh)
    sampler = Sampler(graphdef, mesh=mesh, cache_heads=for_sampling.cache_heads)
    step = RLStep(policy, sampler, builders.rl_update_step(graphdef, run_config), manager, run_config, mesh,
                  for_sampling)
    # Equal work on both sides: TRL samples exactly new_tokens tokens per rollout, so ours ignores EOS too.
    step.sampler_config = dataclasses.replace(step.sampler_config, eos_ids=())
    optimizer, _ = builders.rl_optimizer(run_config)
    # As the loop does: step counters and optimizer counts replicated on the mesh, so the second step reuses the
    # first step's update program instead of compiling another for differently placed counters.
    state = hosts.globalize(update_lib.TrainState.create(params, optimizer), mesh)
    return OurStep(step, QwenCaptionProcessor(tokenizer, INSTRUCTION, image_config), settings), state


@jax.jit
def c_gdpo_advantages(rewards: jax.Array) -> jax.Array:
    """rewards float32[P, G, K] -> our c-GDPO advantages float32[P, G] (`shaping_config`; the caption lengths
    `rl.shaping` takes are unused without length handling)."""
    no_lengths = jnp.zeros(rewards.shape[:2], jnp.int32)
    return shaping.advantages(rewards, no_lengths, no_lengths[:, 0], shaping_config())[0]


def our_advantages(rewards: np.ndarray) -> np.ndarray:
    """c_gdpo_advantages on host rewards float[P, G, K] (the parity check against TRL's advantages)."""
    return np.asarray(c_gdpo_advantages(jnp.asarray(rewards, jnp.float32)))


# ---------------------------------------------------------------------------------------------------------------
# TRL


def build_trl_trainer(hf_model, processor, images: Sequence[PIL.Image.Image], settings: StepSettings,
                      total_steps: int, seed: int, output_dir: str, callbacks: Sequence[Any] = ()):
    """GRPOTrainer configured like our step (see module docstring); dataset rows are used in order."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    dataset = datasets.Dataset.from_dict({"prompt": [conversation() for _ in images], "image": list(images)})
    args = GRPOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=seed, data_seed=seed,
        max_steps=total_steps, per_device_train_batch_size=settings.prompts * settings.group,
        gradient_accumulation_steps=1, num_generations=settings.group, max_completion_length=settings.new_tokens,
        generation_kwargs={"min_new_tokens": settings.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, beta=0.0, epsilon=0.2,
        loss_type="dapo", num_iterations=1, multi_objective_aggregation="normalize_then_sum",
        reward_weights=[1.0] * len(REWARD_FUNCTIONS), shuffle_dataset=False, dataloader_num_workers=0,
        log_completions=False,
    )  # fmt: skip
    return GRPOTrainer(
        model=hf_model, reward_funcs=[trl_reward_func(n, f) for n, f in REWARD_FUNCTIONS], args=args,
        train_dataset=dataset, processing_class=processor, callbacks=list(callbacks),
    )  # fmt: skip


def trl_last_batch(trainer, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rewards float[rows, K], advantages float[rows]) of the trainer's last generation batch (its logs)."""
    names = [name for name, _ in REWARD_FUNCTIONS]
    rewards = np.stack([np.asarray(list(trainer._logs["rewards"][n])[-rows:]) for n in names], axis=-1)
    return rewards, np.asarray(list(trainer._logs["advantages"])[-rows:])


# ---------------------------------------------------------------------------------------------------------------
# The side-by-side run


@dataclasses.dataclass
class Record:
    """Per-step measurements of both sides, in step order (warm-up steps included)."""

    trl_seconds: list[float] = dataclasses.field(default_factory=list)
    ours_seconds: list[float] = dataclasses.field(default_factory=list)
    ours_phases: list[dict[str, float]] = dataclasses.field(default_factory=list)
    trl_peak_mib: list[float] = dataclasses.field(default_factory=list)
    ours_peak_mib: list[float] = dataclasses.field(default_factory=list)
    advantage_gap: list[float] = dataclasses.field(default_factory=list)
    ours_reward_means: list[list[float]] = dataclasses.field(default_factory=list)
    trl_reward_means: list[list[float]] = dataclasses.field(default_factory=list)
    ours_lengths: list[int] = dataclasses.field(default_factory=list)
    trl_lengths: list[int] = dataclasses.field(default_factory=list)
    ours_prompt_lengths: list[tuple[int, ...]] = dataclasses.field(default_factory=list)


def make_interleaving_callback(our_step: OurStep, state_box: dict, examples: Sequence[CaptionExample],
                               settings: StepSettings, record: Record, seed: int):
    """A TrainerCallback timing each TRL step, then running (and timing) our step on the same prompts."""
    from transformers import TrainerCallback

    rows = settings.prompts * settings.group

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self._peak = PeakRSS().start()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record.trl_seconds.append(time.perf_counter() - self._start)
            record.trl_peak_mib.append(self._peak.stop())
            trainer = state_box["trainer"]
            trl_rewards, trl_advantages = trl_last_batch(trainer, rows)
            ours_on_trl = our_advantages(trl_rewards.reshape(settings.prompts, settings.group, -1)).reshape(-1)
            record.advantage_gap.append(float(np.max(np.abs(ours_on_trl - trl_advantages))))
            record.trl_reward_means.append(np.nanmean(trl_rewards, axis=0).tolist())
            logged = trainer._metrics["train"]  # this step's completion-length extremes, from TRL's own metrics
            record.trl_lengths += [int(logged["completions/min_length"][-1]), int(logged["completions/max_length"][-1])]

            step = state.global_step  # 1-based: TRL just finished step `step` on rows (step-1)*P .. step*P
            batch = examples[(step - 1) * settings.prompts : step * settings.prompts]
            key = jax.random.fold_in(jax.random.key(seed), step)
            with PeakRSS() as peak:
                start = time.perf_counter()
                out = our_step(state_box["ours"], batch, key)
                record.ours_seconds.append(time.perf_counter() - start)
            state_box["ours"] = out.state
            record.ours_peak_mib.append(peak.growth_mib)
            record.ours_phases.append(out.phases)
            record.ours_lengths.extend(out.lengths.tolist())
            record.ours_prompt_lengths.append(out.prompt_lengths)
            record.ours_reward_means.append(np.nanmean(out.rewards.reshape(-1, out.rewards.shape[-1]), 0).tolist())
            print(f"step {step}: TRL {record.trl_seconds[-1]:.2f} s, ours {record.ours_seconds[-1]:.2f} s",
                  file=sys.stderr, flush=True)  # fmt: skip

    return Interleave()


def step_matmul_flops(size: ModelSize, settings: StepSettings, prompt_lengths: Sequence[int]) -> dict[str, float]:
    """A lower bound on one RL step's FLOPs: the text decoder's and the unembedding's matmuls only, on each
    prompt's real tokens (no padding), causal attention counted as the triangle it is (the vision tower, norms,
    softmaxes, sampling and the optimizer are left out, so the bound only errs low).

    Sampling: each prompt's prefill (its last position's logits give the first token), then new_tokens - 1
    decode steps per row, step j attending prompt + j keys. Update: forward + backward (3x the forward's
    matmuls) over each row's prompt + new tokens, with the unembedding on the completion columns only (what
    both stacks compute).
    """
    shape = bench_sampling.DecodeShape(rows=1, hidden=size.hidden, heads=size.heads, kv_heads=size.kv_heads,
                                       head_dim=size.hidden // size.heads, intermediate=size.intermediate,
                                       layers=size.layers, vocab=QWEN_VOCAB)  # fmt: skip
    per_token_layer = 2 * sum(a * b for a, b in shape.layer_matmuls())
    unembed = 2 * shape.hidden * shape.vocab
    pair = 4 * shape.heads * shape.head_dim * shape.layers  # one query-key pair: scores and values, every layer
    group, new = settings.group, settings.new_tokens

    def causal(length: int) -> int:  # query-key pairs of a causal pass over `length` tokens
        return length * (length + 1) // 2

    sample = update = 0
    for prompt in prompt_lengths:
        sample += prompt * size.layers * per_token_layer + pair * causal(prompt) + unembed
        decode_keys = sum(prompt + j for j in range(1, new))
        sample += group * ((new - 1) * (size.layers * per_token_layer + unembed) + pair * decode_keys)
        total = prompt + new
        update += 3 * group * (total * size.layers * per_token_layer + pair * causal(total) + new * unembed)
    return dict(sample=float(sample), update=float(update), total=float(sample + update))


def max_logit_gap(hf_model, our_model, config: Qwen2_5_VLConfig, processor, image) -> float:
    """max |logits_ours − logits_torch| over one prompt at step 0 (both fp32): the weights are the same network."""
    import torch

    from balcap_jax.models.qwen2_5_vl.model import make_inputs

    inputs = processor.apply_chat_template(conversation=[conversation(image)], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        hf_logits = hf_model(**inputs).logits.float().numpy()
    ours_inputs = make_inputs(config, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(),
                              inputs["pixel_values"].numpy(), inputs["image_grid_thw"].numpy())  # fmt: skip
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(our_model(jax.tree.map(jnp.asarray, ours_inputs)))
    return float(np.max(np.abs(logits - hf_logits)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    settings = StepSettings(args.prompts, args.group, args.new_tokens, args.lr)
    size = ModelSize(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                     kv_heads=args.kv_heads)
    total_steps = args.warmup + args.steps
    load_start = loadavg()

    tokenizer = load_tokenizer()
    tokenizer.padding_side = "left"
    image_config = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=args.max_pixels)
    processor = build_hf_processor(tokenizer, image_config)
    images = photographs(settings.prompts * total_steps)
    examples = caption_examples(images)

    hf_model = build_hf_model(size, args.seed)
    our_model, config = our_model_from_hf(hf_model)
    n_params = sum(p.numel() for p in hf_model.parameters())
    counts = parameter_counts(hf_model)
    print(f"parameters: {counts}")
    logit_gap = max_logit_gap(hf_model, our_model, config, processor, images[0])
    print(f"model: {n_params / 1e6:.2f}M parameters; step-0 max |logit gap| ours vs torch = {logit_gap:.2e}")

    record = Record()
    with RewardManager([TextReward(n, f) for n, f in REWARD_FUNCTIONS]) as manager, \
            tempfile.TemporaryDirectory() as output_dir:  # fmt: skip
        our_step, our_state = build_our_step(our_model, config, tokenizer, image_config, settings, manager)
        # Our first step compiles the sampler and the update: timed on its own, before TRL starts.
        start = time.perf_counter()
        first = our_step(our_state, examples[: settings.prompts], jax.random.key(args.seed))
        ours_first_s = time.perf_counter() - start
        state_box = {"ours": first.state}
        callback = make_interleaving_callback(our_step, state_box, examples, settings, record, args.seed)
        trainer = build_trl_trainer(hf_model, processor, images, settings, total_steps, args.seed, output_dir,
                                    callbacks=[callback])  # fmt: skip
        state_box["trainer"] = trainer
        trainer.train()
        trl_optimizer = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                             else trainer.optimizer).__name__  # fmt: skip
        compile_s = our_step.sampler.compile_seconds
        sampler_programs = our_step.sampler.compiled_variants

    # Equal work: every rollout on both sides has exactly new_tokens tokens.
    lengths = {"trl_min": min(record.trl_lengths), "trl_max": max(record.trl_lengths),
               "ours_min": min(record.ours_lengths), "ours_max": max(record.ours_lengths)}  # fmt: skip
    if set(lengths.values()) != {settings.new_tokens}:
        raise RuntimeError(f"rollout lengths differ from --new-tokens={settings.new_tokens}: {lengths}")
    measured = slice(args.warmup, None)
    trl_times, ours_times = record.trl_seconds[measured], record.ours_seconds[measured]
    if len(trl_times) < 1 or len(ours_times) < 1:
        raise RuntimeError(f"no measured steps: TRL ran {len(record.trl_seconds)}, ours {len(record.ours_seconds)}")
    trl_median, ours_median = statistics.median(trl_times), statistics.median(ours_times)
    phase_names = list(record.ours_phases[0])
    # The most any engine could gain over TRL here: the step's matmul FLOPs at this machine's matmul rate.
    # The measured step with the fewest prompt tokens: the bound holds for every measured step.
    prompt_lengths = min(record.ours_prompt_lengths[measured], key=sum)
    flops = step_matmul_flops(size, settings, prompt_lengths)
    # This machine's fp32 rate on the update's largest matmul shape, [tokens x D] x [D x I].
    rates = common.matmul_rates(settings.group * sum(p + settings.new_tokens for p in prompt_lengths),
                                size.hidden, size.intermediate, jnp.float32, runs=5)  # fmt: skip
    rate = common.Spread.of([r / 1e9 for r in rates]).to_dict()
    floor_s = flops["total"] / (rate["high"] * 1e9)
    ceiling = dict(prompt_lengths=list(prompt_lengths), flops=flops, matmul_gflops=rate, floor_s=floor_s,
                   ceiling_vs_trl=trl_median / floor_s)  # fmt: skip
    return dict(
        model=dict(family="qwen2_5_vl", parameters=int(n_params), counts=counts, size=dataclasses.asdict(size), vocab=QWEN_VOCAB,
                   image_grids=sorted({tuple(int(x) for x in g) for g in _grids(examples, our_step)}),
                   step0_max_logit_gap=logit_gap),
        settings=dict(dataclasses.asdict(settings), rows=settings.prompts * settings.group, warmup=args.warmup,
                      measured_steps=args.steps, rewards=[n for n, _ in REWARD_FUNCTIONS], advantage="c-GDPO",
                      trl_multi_objective_aggregation="normalize_then_sum", loss="token-mean (TRL dapo)",
                      clip_eps=0.2, kl=0.0, dtype="float32", completion_lengths=lengths),
        machine=dict(backend=jax.default_backend(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     processor=platform.processor() or platform.machine(), loadavg_start=load_start,
                     loadavg_end=loadavg()),
        versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                      trl=trl.__version__),
        trl=dict(seconds=record.trl_seconds, median_s=trl_median, first_step_s=record.trl_seconds[0],
                 peak_rss_growth_mib=_nanmax(record.trl_peak_mib[measured]), optimizer=trl_optimizer,
                 reward_means=record.trl_reward_means),
        ours=dict(seconds=record.ours_seconds, median_s=ours_median, first_step_s=ours_first_s,
                  sampler_compile_s=compile_s, sampler_programs=sampler_programs, first_step_phases=first.phases,
                  phase_medians={k: statistics.median(p[k] for p in record.ours_phases[measured]) for k in phase_names},
                  peak_rss_growth_mib=_nanmax(record.ours_peak_mib[measured]), reward_means=record.ours_reward_means),
        advantage_parity_max_abs=max(record.advantage_gap),
        spreads=dict(trl=common.Spread.of(trl_times).to_dict(), ours=common.Spread.of(ours_times).to_dict(),
                     speedup=common.paired_ratios(trl_times, ours_times).to_dict()),
        speedup_vs_trl=common.paired_ratios(trl_times, ours_times).median,
        ceiling=ceiling,
    )  # fmt: skip


def _nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else float("nan")


def _grids(examples: Sequence[CaptionExample], step: OurStep) -> list[np.ndarray]:
    return [step.processor(ex)["image_grid_thw"][0] for ex in examples]


def _fmt_spread(d: dict, digits: int = 3) -> str:
    return common.Spread(d["median"], d["low"], d["high"], d["count"]).format(digits)


def render_markdown(r: dict, command: str) -> str:
    s, m, trl, ours, c = r["settings"], r["machine"], r["trl"], r["ours"], r["ceiling"]
    phases = ", ".join(f"{k} {v:.3f}" for k, v in ours["phase_medians"].items())
    lines = [
        "# One full RL step: balcap_jax vs TRL `GRPOTrainer`",
        "",
        f"Random Qwen2.5-VL, {r['model']['parameters'] / 1e6:.2f}M parameters: "
        f"**{r['model']['counts']['non_embedding'] / 1e6:.1f}M non-embedding** (text decoder "
        f"{r['model']['counts']['text_non_embedding'] / 1e6:.1f}M, vision tower {r['model']['counts']['vision'] / 1e6:.1f}M)"
        f" + {r['model']['counts']['embedding'] / 1e6:.1f}M tied embedding (Qwen vocabulary {r['model']['vocab']}); "
        f"text hidden {r['model']['size']['hidden']}, MLP {r['model']['size']['intermediate']}, "
        f"{r['model']['size']['heads']}/{r['model']['size']['kv_heads']} heads, {r['model']['size']['layers']} layers, "
        f"{r['model']['size']['vision_depth']}-block vision tower of width {r['model']['size']['vision_hidden']}, identical weights on both sides (step-0 max "
        f"|logit gap| {r['model']['step0_max_logit_gap']:.1e}). Per step: {s['prompts']} prompts x G={s['group']} = "
        f"{s['rows']} rollouts of exactly {s['new_tokens']} tokens (checked on both sides), one photograph per prompt "
        f"(grids t,h,w: {[tuple(g) for g in r['model']['image_grids']]}), rewards {s['rewards']} (pure-Python "
        f"text functions), {s['advantage']} (TRL `multi_objective_aggregation=\"normalize_then_sum\"`), "
        f"{s['loss']} clipped surrogate (eps {s['clip_eps']}), no KL, AdamW lr {s['learning_rate']}, {s['dtype']}.",
        "",
        f"Machine: {m['backend']} backend, {m['cpu_count']} CPU cores (shared), torch threads {m['torch_threads']}, "
        f"load average {m['loadavg_start']} at start, {m['loadavg_end']} at end. Steps interleaved (TRL, ours, TRL, "
        f"...) in one process; {s['warmup']} warm-up steps per side discarded, median of {s['measured_steps']}.",
        "",
        "| stack | s / step, median (min-max) | first step s | peak RSS growth / step | notes |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| TRL {r['versions']['trl']} `GRPOTrainer` (torch {r['versions']['torch']}, transformers "
        f"{r['versions']['transformers']}) | {_fmt_spread(r['spreads']['trl'])} | {trl['first_step_s']:.3f} | "
        f"{trl['peak_rss_growth_mib']:.0f} MiB | HF `generate` (G copies of each prompt and image), eager "
        f"forward/backward, {trl['optimizer']} |",
        f"| balcap_jax (jax {r['versions']['jax']}, production `RLStep`) | {_fmt_spread(r['spreads']['ours'])} | {ours['first_step_s']:.3f} (compile "
        f"included; sampler: {ours['sampler_programs']} programs, {ours['sampler_compile_s']:.1f} s to compile) | "
        f"{ours['peak_rss_growth_mib']:.0f} MiB | "
        f"phase medians (s): {phases} |",
        "",
        f"**speedup_vs_trl = {_fmt_spread(r['spreads']['speedup'], 2)}x** (per step: TRL s / our s; median, min-max). "
        "Advantage parity: our c-GDPO on "
        f"TRL's own rewards differs from TRL's advantages by at most {r['advantage_parity_max_abs']:.1e}.",
        "",
        f"**Ceiling: {c['ceiling_vs_trl']:.2f}x.** The step's text matmuls alone (prompts of {c['prompt_lengths']} "
        f"real tokens, no padding, causal attention as a triangle; sampling {c['flops']['sample'] / 1e9:.1f} + update "
        f"{c['flops']['update'] / 1e9:.1f} GFLOP, a lower bound: vision, norms, softmaxes, sampling and the optimizer "
        "left out) take "
        f"{c['floor_s']:.3f} s at the fastest rate this machine reached on the update's largest matmul in this run "
        f"({_fmt_spread(c['matmul_gflops'], 1)} GFLOP/s, fp32 [G x (prompt+new) x {r['model']['size']['hidden']}]"
        f" x [{r['model']['size']['hidden']} x {r['model']['size']['intermediate']}]). So no engine could run this "
        f"step faster than TRL's median / {c['floor_s']:.3f} s = {c['ceiling_vs_trl']:.2f}x TRL on this machine.",
        "",
        f"Per-step seconds, TRL: {[round(x, 3) for x in trl['seconds']]}; ours: "
        f"{[round(x, 3) for x in ours['seconds']]} (ours after its first, compiling step; a warm-up step that meets a "
        "new prompt-length or image-patch bucket compiles one more program, which is why warm-up steps are "
        "discarded).",
        "",
        "Both sides do the same work per step except where the designs differ: TRL encodes each image G times "
        "(once per rollout) in generation and again in the training forward; ours encodes it once for sampling "
        "(the KV cache is tiled G times) and once in the update (its embeddings gathered G times). Ours pads prompts "
        "to a length bucket (more tokens, not fewer). The timing of our step includes host preprocessing from the "
        "PIL image; TRL's data-loader fetch (outside `on_step_begin`..`on_step_end`) is not included in its time.",
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2, help="P prompts per step")
    parser.add_argument("--group", type=int, default=4, help="G rollouts per prompt")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens per rollout (forced on both sides)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=2, help="steps per side discarded before measuring")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per side (median reported)")
    parser.add_argument("--hidden", type=int, default=896, help="text hidden size (head_dim = hidden / heads)")
    parser.add_argument("--intermediate", type=int, default=4864, help="text MLP width")
    parser.add_argument("--layers", type=int, default=4, help="text decoder layers")
    parser.add_argument("--heads", type=int, default=None,
                        help="text attention heads (default: head_dim 64 when --hidden is a multiple of 128, else 4)")
    parser.add_argument("--kv-heads", type=int, default=2, help="text KV heads (must divide --heads)")
    parser.add_argument("--max-pixels", type=int, default=224 * 224)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--out-name", default="bench_rl_step")
    args = parser.parse_args(argv)
    if args.heads is None:
        args.heads = args.hidden // 64 if args.hidden % 128 == 0 else 4
    for name in ("prompts", "new_tokens", "steps", "hidden", "intermediate", "layers", "heads", "kv_heads", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.group < 2:
        raise SystemExit(f"--group={args.group} must be >= 2 (GRPO needs at least 2 rollouts per prompt)")
    if args.warmup < 0:
        raise SystemExit(f"--warmup={args.warmup} must be >= 0")
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        raise SystemExit(f"--hidden={args.hidden} must be a multiple of 2 * --heads={args.heads} (even head_dim)")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--kv-heads={args.kv_heads} must divide --heads={args.heads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = common.command_line("bench_rl_step", argv)
    (out_dir / f"{args.out_name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{args.out_name}.md").write_text(render_markdown(result, command.strip()))
    print(json.dumps({k: result[k] for k in ("trl", "ours", "advantage_parity_max_abs")}, indent=2, default=str))
    print(f"speedup_vs_trl={result['speedup_vs_trl']:.3f} ceiling_vs_trl={result['ceiling']['ceiling_vs_trl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
