"""Our bf16 models against HF's bf16 models (torch, CPU, eager attention), for Qwen2.5-VL and LLaVA-1.5.

Each family: one tiny random checkpoint (the fixtures of the fp32 parity tests, saved with `save_pretrained`)
loaded by HF with `from_pretrained(dtype=torch.bfloat16)` and by us with dtype = param_dtype = bfloat16, so
both hold the same rounded weights. (`from_pretrained` keeps the rotary `inv_freq` buffers in fp32, as a
deployed bf16 model has them; `model.to(torch.bfloat16)` would also round those and shift every angle.)
On a left-padded batch with images and a prompt of a few hundred tokens, our prefill and a few greedy steps
through the bf16 KV cache are compared with HF's bf16 forward over the prompt plus our generated tokens.

Tolerances come from bf16 itself. The noise floor is HF-bf16 against HF-fp32 on the same tokens: what bf16
rounding does to this model. A bf16 implementation that merely works lands about one floor away from HF-bf16
(its own rounding noise); one that rounds where HF rounds lands far inside it. The tests require the latter:
ours-bf16 vs HF-bf16, over the prompt and over the decode steps, within `FLOOR_FRACTION_KL` of the floor's
mean per-token KL (over all those positions), no farther than the floor in max |logit| difference (a guard
against outliers), and every greedy token equal to HF-bf16's argmax. Measured over batch seeds 0-3: 0.01-0.36
of the floor's mean KL with the roundings matched, 0.56-1.1 with fp32-style roundings (flax's linear, fp32
attention logits, bf16-composed activations).

Our programs are compiled with `TORCH_LIKE_XLA_CPU` (test_bf16_parity_layers.py): by default XLA CPU may keep
fused bf16 intermediates in fp32 and fuses softmax exps into YNNPACK kernels, which is arithmetic torch does not
perform. HF's bf16 `lm_head` rounds the logits to bf16; ours keeps them in fp32 for log-probs, so they are
rounded the same way before comparing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from balcap_jax.models.interface import KVCache, next_text_positions  # noqa: E402
from balcap_jax.tools import parity_llava as llava_parity  # noqa: E402
from balcap_jax.models.llava import processor as llava_processor  # noqa: E402
from balcap_jax.models.llava.params import load_llava  # noqa: E402
from balcap_jax.models.qwen2_5_vl.model import make_inputs  # noqa: E402
from balcap_jax.models.qwen2_5_vl.params import load_qwen2_5_vl  # noqa: E402
from balcap_jax.tools import parity  # noqa: E402
from tests.models import qwen_fixtures as fx  # noqa: E402
from tests.models.test_bf16_parity_layers import torch_like_jit  # noqa: E402
from tests.models.test_llava_parity import _hf_config as tiny_llava_hf_config  # noqa: E402
from tests.models.test_llava_parity import _redraw as redraw_llava_weights  # noqa: E402

QWEN_GRIDS = ((1, 8, 12), (1, 16, 8), (1, 4, 4))  # as in the fp32 parity test: one image spans two windows
PROMPT_TOKENS = 300
DECODE_STEPS = 8
FLOOR_FRACTION_KL = 0.5
FLOOR_FRACTION_ABS = 1.0


@dataclasses.dataclass(frozen=True)
class Generation:
    """Our bf16 prefill + greedy decoding. prompt_logits [B, T, V], step_logits [B, S-1, V] (after feeding
    generated tokens 0..S-2), tokens int[B, S]."""

    prompt_logits: np.ndarray
    step_logits: np.ndarray
    tokens: np.ndarray


def _greedy(model, inputs: dict, steps: int) -> Generation:
    """Prefill the prompt into a bf16 KV cache, then `steps` greedy tokens, one compiled program per phase."""
    graphdef, state = nnx.split(model)
    batch, length = inputs["input_ids"].shape
    spec = model.cache_spec()

    @torch_like_jit
    def prefill(state, inputs):
        m = nnx.merge(graphdef, state)
        cache = KVCache.zeros(num_layers=spec.num_layers, batch=batch, max_len=length + steps,
                              num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=jnp.bfloat16)
        hidden, cache = m.prefill(inputs, cache)
        return m.logits(hidden), cache

    @torch_like_jit
    def decode(state, tokens, positions, cache):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.decode(tokens, positions, cache)
        return m.logits(hidden), cache

    inputs = jax.tree.map(jnp.asarray, inputs)
    prompt_logits, cache = prefill(state, inputs)
    assert cache.k.dtype == jnp.bfloat16
    position = next_text_positions(inputs["positions"], inputs["attention_mask"])
    tokens, step_logits = [jnp.argmax(prompt_logits[:, -1], axis=-1).astype(jnp.int32)], []
    for step in range(steps - 1):
        logits, cache = decode(state, tokens[-1], position + step, cache)
        step_logits.append(logits)
        tokens.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return Generation(
        np.asarray(prompt_logits), np.asarray(jnp.stack(step_logits, 1)), np.asarray(jnp.stack(tokens, 1))
    )


def _as_bf16(logits: np.ndarray) -> np.ndarray:
    """fp32 logits rounded as HF's bf16 lm_head output is (then back to fp32 for `parity.compare`)."""
    return np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Comparison:
    prefill: parity.ParityReport  # ours-bf16 vs HF-bf16 over the real prompt tokens
    decode: parity.ParityReport  # ours-bf16 vs HF-bf16 after each fed-back generated token
    floor: parity.ParityReport  # HF-bf16 vs HF-fp32 over all of those positions
    tokens_match: np.ndarray  # bool[B, S]: our greedy token == HF-bf16's argmax

    def __str__(self) -> str:
        def line(name: str, r: parity.ParityReport) -> str:
            return (f"  {name:34s} max|dlogit| {r.max_abs_logit_diff:.4f}  per-token KL mean {r.mean_kl:.2e} "
                    f"max {r.max_kl:.2e}  ({r.num_tokens} tokens)")

        return "\n".join([
            line("prefill  ours-bf16 vs HF-bf16", self.prefill),
            line("decode   ours-bf16 vs HF-bf16", self.decode),
            line("floor    HF-bf16 vs HF-fp32", self.floor),
            f"  greedy tokens equal to HF-bf16's argmax: {int(self.tokens_match.sum())}/{self.tokens_match.size}",
        ])  # fmt: skip


def _compare(ours: Generation, hf16: np.ndarray, hf32: np.ndarray, prompt_mask: np.ndarray) -> Comparison:
    """hf16/hf32: HF logits [B, T + S, V] over the prompt followed by our S generated tokens."""
    length, steps = prompt_mask.shape[1], ours.tokens.shape[1]
    prompt, decoded = slice(0, length), slice(length, length + steps - 1)
    every_row = np.ones(ours.step_logits.shape[:2], bool)
    compared = np.concatenate([prompt_mask, every_row], axis=1)
    greedy_from = slice(length - 1, length + steps - 1)  # the logits each generated token was chosen from
    return Comparison(
        prefill=parity.compare(hf16[:, prompt], _as_bf16(ours.prompt_logits), prompt_mask),
        decode=parity.compare(hf16[:, decoded], _as_bf16(ours.step_logits), every_row),
        floor=parity.compare(hf32[:, : length + steps - 1], hf16[:, : length + steps - 1], compared),
        tokens_match=hf16[:, greedy_from].argmax(-1) == ours.tokens,
    )


def _assert_within_floor(result: Comparison) -> None:
    floor = result.floor
    assert floor.mean_kl > 0, "HF bf16 equals HF fp32: the bf16 reference did not run in bf16"
    for name, report in (("prefill", result.prefill), ("decode", result.decode)):
        detail = f"{name}: ours-bf16 vs HF-bf16\n{report}\nfloor HF-bf16 vs HF-fp32\n{floor}"
        assert report.mean_kl <= FLOOR_FRACTION_KL * floor.mean_kl, detail
        assert report.max_abs_logit_diff <= FLOOR_FRACTION_ABS * floor.max_abs_logit_diff, detail
    mismatches = np.argwhere(~result.tokens_match)
    assert not len(mismatches), f"greedy tokens differ from HF-bf16's argmax at (row, step) {mismatches.tolist()}"


# ------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(HF fp32, HF bf16, ours bf16) from one saved tiny checkpoint."""
    hf32 = fx.tiny_qwen_hf_model(seed=1)
    directory = tmp_path_factory.mktemp("qwen_hf")
    hf32.save_pretrained(directory)
    hf16 = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        directory, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    return hf32, hf16, load_qwen2_5_vl(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def test_qwen_bf16_prefill_decode_and_greedy_tokens_match_hf_bf16(qwen):
    hf32, hf16, ours = qwen
    config = ours.config
    batch = parity.build_batch(config, seed=0, prompt_tokens=PROMPT_TOKENS, image_grids=QWEN_GRIDS)
    assert batch.input_ids.shape[1] >= PROMPT_TOKENS and (~batch.attention_mask).any()  # a left-padded text row
    generation = _greedy(ours, make_inputs(config, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                           batch.image_grid_thw), DECODE_STEPS)  # fmt: skip
    extended = dataclasses.replace(
        batch,
        input_ids=np.concatenate([batch.input_ids, generation.tokens.astype(np.int64)], 1),
        attention_mask=np.concatenate([batch.attention_mask, np.ones(generation.tokens.shape, bool)], 1),
    )
    hf = {m: parity.hf_logits(m, extended, image_token_id=config.image_token_id) for m in (hf16, hf32)}
    result = _compare(generation, hf[hf16], hf[hf32], batch.attention_mask)
    print(f"\nQwen2.5-VL bf16\n{result}")
    _assert_within_floor(result)


# ------------------------------------------------------------------------------------------------------------
# LLaVA-1.5
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(HF fp32, HF bf16, ours bf16) from one saved tiny checkpoint (the fp32 parity test's model)."""
    torch.manual_seed(0)
    hf32 = transformers.LlavaForConditionalGeneration(tiny_llava_hf_config()).eval().float()
    redraw_llava_weights(hf32, seed=0)
    directory = tmp_path_factory.mktemp("llava_hf")
    hf32.save_pretrained(directory)
    hf16 = transformers.LlavaForConditionalGeneration.from_pretrained(
        directory, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    return hf32, hf16, load_llava(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def test_llava_bf16_prefill_decode_and_greedy_tokens_match_hf_bf16(llava):
    hf32, hf16, ours = llava
    batch = llava_parity.build_batch(ours.config, seed=0, prompt_tokens=PROMPT_TOKENS)
    assert batch["input_ids"].shape[1] >= PROMPT_TOKENS and (~batch["attention_mask"]).any()
    generation = _greedy(ours, batch, DECODE_STEPS)
    mask = np.concatenate([batch["attention_mask"], np.ones(generation.tokens.shape, bool)], 1)
    extended = dict(batch, input_ids=np.concatenate([batch["input_ids"], generation.tokens], 1), attention_mask=mask,
                    positions=llava_processor.padded_positions(mask))  # fmt: skip
    hf = {m: llava_parity.hf_logits(m, extended) for m in (hf16, hf32)}
    result = _compare(generation, hf[hf16], hf[hf32], batch["attention_mask"])
    print(f"\nLLaVA-1.5 bf16\n{result}")
    _assert_within_floor(result)
