"""A judge that runs one of our own JAX models in-process, with our sampler, on the local devices/mesh.

For users who want judges co-located with the policy on the same TPU/GPU mesh instead of a separate vLLM
server. Any `CausalLM` works; an `Encoder` turns a `JudgeRequest` into the model's prompt inputs
(`qwen2_5_vl_encoder` for Qwen2.5-VL text and VLM judges, `token_encoder` for any text model with a tokenize
function).

Concurrency: reward components await `generate` for hundreds of requests at once. Text-only requests with the
same sampling settings are gathered for `batch_window_s` into batches of exactly `batch_size` rows (short
batches are filled with copies, so every batch reuses one compiled program per prompt bucket); requests with
images run one at a time (vision inputs are model-specific pytrees). The sampler runs on one worker thread, so
the event loop (and any HTTP judges on it) stays responsive while the device works.

On a mesh: text batches have `batch_size` rows and image requests one row, and the sampler shards rows over its
batch axes; so pick `batch_size` as a multiple of the batch shards, and give a VLM judge a sampler built with
`batch_axes=()` (rows replicated, weights still sharded as the state says).

Request mapping: temperature 0 -> greedy, else temperature / nucleus sampling; `seed` (default 0) seeds the
batch; `max_tokens` truncates the completion (capped by `max_new_tokens`, the compiled buffer length); `stop`
strings cut the text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from balcap_jax.rewards.judges.protocol import JudgeReply, JudgeRequest, JudgeUnavailable, Message
from balcap_jax.sampling import DEFAULT_PROMPT_BUCKETS, Greedy, Sampler, SamplerConfig, Temperature, TopP

logger = logging.getLogger(__name__)

# One prompt row as a batch of one: "input_ids" int32[1, T], "attention_mask" bool[1, T], "positions" int32[1, T]
# or int32[3, 1, T], and optionally "vision" (model-specific).
PromptRow = dict[str, Any]
Encoder = Callable[[JudgeRequest], PromptRow]


@dataclasses.dataclass(frozen=True)
class JaxLocalConfig:
    """model: the judge's name (records, cache keys). eos_ids / pad_id: the tokenizer's. max_new_tokens: the
    completion buffer. batch_size: rows per text batch. batch_window_s: how long the first request of a batch
    waits for company. blocked_ids: never generated (e.g. image placeholder ids)."""

    model: str
    eos_ids: tuple[int, ...]
    pad_id: int
    max_new_tokens: int = 512
    batch_size: int = 8
    batch_window_s: float = 0.005
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    multimodal: bool = False
    blocked_ids: tuple[int, ...] = ()
    cache_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"JaxLocalConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.batch_window_s < 0:
            raise ValueError(f"JaxLocalConfig.batch_window_s must be >= 0, got {self.batch_window_s}")
        if not self.eos_ids:
            raise ValueError("JaxLocalConfig.eos_ids is empty; a judge must be able to stop (e.g. (151645,))")

    def sampler_config(self, request: JudgeRequest) -> SamplerConfig:
        if request.temperature == 0:
            strategy = Greedy()
        elif request.top_p < 1:
            strategy = TopP(top_p=request.top_p, temperature=request.temperature)
        else:
            strategy = Temperature(request.temperature)
        return SamplerConfig(
            max_new_tokens=self.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id, strategy=strategy,
            prompt_buckets=self.prompt_buckets, cache_dtype=self.cache_dtype, blocked_ids=self.blocked_ids,
        )  # fmt: skip


def _left_pad_rows(rows: Sequence[PromptRow], pad_id: int) -> dict[str, np.ndarray]:
    """Text-only rows (batches of one) left-padded to their longest and stacked: a [B, T] prompt batch."""
    length = max(row["input_ids"].shape[-1] for row in rows)
    ids, masks, positions = [], [], []
    for row in rows:
        extra = length - row["input_ids"].shape[-1]
        ids.append(np.pad(np.asarray(row["input_ids"], np.int32), ((0, 0), (extra, 0)), constant_values=pad_id))
        masks.append(np.pad(np.asarray(row["attention_mask"], bool), ((0, 0), (extra, 0))))
        pos = np.asarray(row["positions"], np.int32)
        positions.append(np.pad(pos, [(0, 0)] * (pos.ndim - 1) + [(extra, 0)]))
    batch_axis = positions[0].ndim - 2
    return {
        "input_ids": np.concatenate(ids, 0),
        "attention_mask": np.concatenate(masks, 0),
        "positions": np.concatenate(positions, batch_axis),
    }


def _truncate(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


@dataclasses.dataclass
class _Pending:
    request: JudgeRequest
    row: PromptRow
    future: asyncio.Future
    start: float


class JaxLocalJudge:
    """`Judge` backed by `sampler` and the weights `state` (an `nnx.State` of the sampler's graphdef)."""

    def __init__(
        self,
        sampler: Sampler,
        state: Any,
        *,
        encode: Encoder,
        decode_text: Callable[[Sequence[int]], str],
        config: JaxLocalConfig,
    ):
        self.sampler = sampler
        self.state = state
        self.encode = encode
        self.decode_text = decode_text
        self.config = config
        self.model = config.model
        self.multimodal = config.multimodal
        self.batches_run = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jax-judge")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[tuple, list[_Pending]] = {}
        self._flush_handles: dict[tuple, asyncio.TimerHandle] = {}

    def __repr__(self) -> str:
        return f"JaxLocalJudge(model={self.model!r}, batch_size={self.config.batch_size})"

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def generate(self, request: JudgeRequest) -> JudgeReply:
        if request.has_images and not self.multimodal:
            raise ValueError(f"judge {self.model!r} is text-only (multimodal=False) but the request carries images")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._queues, self._flush_handles = loop, {}, {}
        try:
            row = self.encode(request)
        except ValueError as error:
            raise JudgeUnavailable(f"{self.model}: cannot encode the request: {error}") from None
        pending = _Pending(request, row, loop.create_future(), time.perf_counter())
        solo = "vision" in row
        key = (request.temperature, request.top_p, request.seed, solo)
        queue = self._queues.setdefault(key, [])
        queue.append(pending)
        if solo or len(queue) >= self.config.batch_size:
            self._flush(key)
        elif key not in self._flush_handles:
            self._flush_handles[key] = loop.call_later(self.config.batch_window_s, self._flush, key)
        return await pending.future

    def _flush(self, key: tuple) -> None:
        handle = self._flush_handles.pop(key, None)
        if handle is not None:
            handle.cancel()
        queue = self._queues.pop(key, [])
        size = 1 if key[-1] else self.config.batch_size
        for i in range(0, len(queue), size):
            asyncio.ensure_future(self._run(queue[i : i + size]))

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            texts = await loop.run_in_executor(self._executor, self._generate_batch, batch)
        except Exception as error:  # a device/compile failure fails these requests, not the whole reward batch
            logger.exception("local judge %s failed on a batch of %d", self.model, len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(JudgeUnavailable(f"{self.model}: {type(error).__name__}: {error}"))
            return
        now = time.perf_counter()
        for item, text in zip(batch, texts):
            if not item.future.done():
                item.future.set_result(JudgeReply(text, cached=False, latency_s=now - item.start, attempts=1))

    def _generate_batch(self, batch: list[_Pending]) -> list[str]:
        """Runs on the worker thread: prompt batch -> sampler -> decoded, truncated texts (one per request)."""
        first = batch[0].request
        config = self.config.sampler_config(first)
        if "vision" in batch[0].row:
            prompts = batch[0].row
        else:
            rows = [item.row for item in batch]
            rows += [rows[0]] * (self.config.batch_size - len(rows))  # fixed batch shape: one compiled program
            prompts = _left_pad_rows(rows, self.config.pad_id)
        rollout = self.sampler(self.state, prompts, config, jax.random.key(first.seed or 0))
        tokens, lengths = jax.device_get((rollout.tokens, rollout.lengths))
        self.batches_run += 1
        texts = []
        eos = set(self.config.eos_ids)
        for index, item in enumerate(batch):
            ids = [int(t) for t in np.asarray(tokens[index, : int(lengths[index])])]
            ids = [t for t in ids if t not in eos][: item.request.max_tokens]
            texts.append(_truncate(self.decode_text(ids), item.request.stop))
        return texts


# --- encoders -------------------------------------------------------------------------------------------------


def plain_chat_text(messages: Sequence[Message]) -> str:
    """Role-tagged plain text, for text models without a chat format of their own."""
    return "".join(f"{m.role}: {m.text}\n" for m in messages) + "assistant: "


def token_encoder(
    tokenize: Callable[[str], Sequence[int]],
    *,
    render: Callable[[Sequence[Message]], str] = plain_chat_text,
    mrope: bool = False,
) -> Encoder:
    """Text-only encoder: render the messages, tokenize, positions 0..T-1 (broadcast to 3 axes for M-RoPE)."""

    def encode(request: JudgeRequest) -> PromptRow:
        if request.has_images:
            raise ValueError("token_encoder is text-only; use a model-specific encoder for images")
        ids = np.asarray(tokenize(render(request.messages)), np.int32)[None]
        if ids.shape[1] == 0:
            raise ValueError("the rendered prompt tokenized to zero tokens")
        positions = np.arange(ids.shape[1], dtype=np.int32)[None]
        if mrope:
            positions = np.broadcast_to(positions[None], (3, *positions.shape)).copy()
        return {"input_ids": ids, "attention_mask": np.ones(ids.shape, bool), "positions": positions}

    return encode


def qwen2_5_vl_encoder(
    model_config: Any, tokenizer: Any, image_config: Any = None, system_prompt: str | None = None
) -> Encoder:
    """Qwen2.5-VL chat encoder (text and images) built on the model package's processor.

    model_config: `Qwen2_5_VLConfig`; tokenizer: `processor.load_tokenizer()`; image_config:
    `processor.ImageProcessorConfig` (default: the checkpoints'). Images are decoded from the request's bytes.
    """
    from PIL import Image

    from balcap_jax.models.qwen2_5_vl import processor
    from balcap_jax.models.qwen2_5_vl.model import make_inputs

    image_config = image_config if image_config is not None else processor.ImageProcessorConfig()

    def encode(request: JudgeRequest) -> PromptRow:
        messages, images = [], []
        for message in request.messages:
            content = []
            for part in message.content:
                if isinstance(part, str):
                    content.append({"type": "text", "text": part})
                else:
                    images.append(Image.open(io.BytesIO(part.data)).convert("RGB"))
                    content.append({"type": "image"})
            messages.append({"role": message.role, "content": content})
        text = processor.format_chat(messages, system_prompt=system_prompt)
        encoded = processor.encode_prompt(tokenizer, text, images, image_config)
        ids = encoded["input_ids"][None]
        return make_inputs(
            model_config, ids, np.ones(ids.shape, bool), encoded.get("pixel_values"), encoded.get("image_grid_thw")
        )

    return encode


def chat_template_encoder(tokenizer: Any) -> Encoder:
    """Text-only encoder rendering the messages with the tokenizer's own chat template (e.g. SmolLM2's ChatML),
    ending with the assistant header; positions 0..T-1."""

    def tokenize(text: str) -> Sequence[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(messages: Sequence[Message]) -> str:
        turns = [{"role": m.role, "content": m.text} for m in messages]
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)

    return token_encoder(tokenize, render=render)


def llama_text_judge(
    model_dir: str,
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    prompt_buckets: tuple[int, ...] = (512, 1024, 2048, 4096),
    dtype: str = "float32",
    name: str | None = None,
) -> JaxLocalJudge:
    """A text judge on our Llama decoder from a local HF `LlamaForCausalLM` directory (config.json, safetensors,
    tokenizer with a chat template; e.g. the converted SmolLM2-135M-Instruct), on the first local device.

    EOS: the tokenizer's end-of-turn token and every `eos_token_id` of generation_config.json. name: the judge's
    name in records and cache keys (default 'jax_local:<model_dir>').
    """
    import jax.numpy as jnp
    import transformers

    from balcap_jax.models.llama_text import load_llama_text

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(
            f"rewards.judge.local_model_dir={model_dir!r} is not a Hugging Face model directory (no config.json); "
            "point it at a local LlamaForCausalLM checkpoint, e.g. the SmolLM2 one `python -m balcap_jax.tools.smollm2_checkpoint` prints"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer in {model_dir} has no chat template; a judge needs a chat model")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    generation = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(generation):
        with open(generation) as handle:
            extra = json.load(handle).get("eos_token_id")
        eos += [] if extra is None else (extra if isinstance(extra, list) else [extra])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    model = load_llama_text(model_dir, dtype=getattr(jnp, dtype), param_dtype=jnp.float32)
    sampler, state = Sampler.from_model(model)
    config = JaxLocalConfig(
        model=name or f"jax_local:{os.path.normpath(model_dir)}", eos_ids=tuple(dict.fromkeys(int(e) for e in eos)),
        pad_id=int(pad), max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_buckets=prompt_buckets,
        cache_dtype=dtype,
    )  # fmt: skip
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    return JaxLocalJudge(sampler, state, encode=chat_template_encoder(tokenizer), decode_text=decode, config=config)


class ImagesUnscorable:
    """A text-only judge standing in the visual role: requests carrying images are unscorable (`JudgeUnavailable`,
    so the component is NaN and the failure counted, never 0); text-only requests go to `judge`.

    Precision then scores nothing (no judge can see the image) while the text components train as usual.
    """

    multimodal = True

    def __init__(self, judge: Any):
        self.judge = judge
        self.model = judge.model
        self.refused = 0

    def __repr__(self) -> str:
        return f"ImagesUnscorable({self.judge!r})"

    async def generate(self, request: JudgeRequest) -> JudgeReply:
        if request.has_images:
            self.refused += 1
            raise JudgeUnavailable(
                f"{self.model} is text-only and no visual judge is configured: claims about the image cannot be "
                "verified (set rewards.judge.backend='openai' with a VLM to score precision)"
            )
        return await self.judge.generate(request)
