"""Text-only Llama (`models.llama_text`) vs HF `LlamaForCausalLM` on tiny random checkpoints, and its config errors.

The reference is built in-process (2 layers, GQA 4/2, weights redrawn with std 0.1 so logits depend on the
input) and saved with HF's own `save_pretrained`, so every parity test also exercises the loader. The real
checkpoint (SmolLM2-135M) is checked in test_smollm2_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from balcap_jax.models.hf_io import iter_hf_tensors  # noqa: E402
from balcap_jax.models.llama_text import llama_config_from_hf, load_llama_text  # noqa: E402
from balcap_jax.tools.parity import compare  # noqa: E402
from tests.models.smollm2_fixture import left_padded_batch  # noqa: E402

VOCAB = 256
PAD_ID = 0


def _tiny_hf_model(*, tied: bool, seed: int) -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, pad_token_id=PAD_ID,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval().float()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def _batch(seed: int) -> dict[str, np.ndarray]:
    """Two rows, 520 and 130 real tokens (long enough to expose rotary bugs; the short one left-padded)."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, VOCAB, size=n).tolist() for n in (520, 130)]
    return left_padded_batch(rows, PAD_ID)


def _hf_logits(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
            attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
            position_ids=torch.from_numpy(batch["positions"].astype(np.int64)),
        ).logits.numpy()


@nnx.jit
def _forward(model, batch):
    return model(batch)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_llama_logits_match_hf(tied, tmp_path, highest_precision):
    hf_model = _tiny_hf_model(tied=tied, seed=3)
    hf_model.save_pretrained(tmp_path)
    # A tied checkpoint stores no head; an untied one must load it (not fall back to the embedding).
    assert ("lm_head.weight" in dict(iter_hf_tensors(tmp_path))) is not tied
    ours = load_llama_text(tmp_path)
    assert hasattr(ours, "lm_head") is not tied
    batch = _batch(seed=4)
    report = compare(_hf_logits(hf_model, batch), np.asarray(_forward(ours, jax.tree.map(jnp.asarray, batch))),
                     batch["attention_mask"])  # fmt: skip
    assert report.num_tokens == 650
    assert report.max_abs_logit_diff < 1e-4, report
    assert report.max_kl < 1e-8, report


def test_config_reads_transformers_defaults_and_rope_parameters():
    """A 5.x config.json (rotary base only inside `rope_parameters`) with most keys left out."""
    minimal = {
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 96, "num_attention_heads": 6,
        "num_key_value_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    }  # fmt: skip
    config = llama_config_from_hf(minimal)
    reference = transformers.LlamaConfig(**minimal)
    assert config.rope_theta == reference.rope_parameters["rope_theta"]
    assert config.rms_norm_eps == reference.rms_norm_eps
    assert config.intermediate_size == reference.intermediate_size
    assert config.num_layers == reference.num_hidden_layers
    assert (config.num_kv_heads, config.head_dim) == (2, 16)
    assert not config.qkv_bias and not config.o_bias and not config.tie_word_embeddings


@pytest.mark.parametrize(
    "hf, message",
    [
        ({"model_type": "qwen2"}, "model_type must be 'llama'"),
        ({"model_type": "llama", "text_config": {}, "vision_config": {}}, "multimodal"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
         "rope type 'llama3' is not supported"),
    ],
    ids=["other-architecture", "llava-config", "scaled-rope"],
)
def test_bad_config_names_the_field(hf, message):
    with pytest.raises(ValueError, match=message):
        llama_config_from_hf(hf)


def test_vision_inputs_are_rejected(tmp_path):
    _tiny_hf_model(tied=True, seed=0).save_pretrained(tmp_path)
    ours = load_llama_text(tmp_path)
    batch = jax.tree.map(jnp.asarray, _batch(seed=0)) | {"vision": {"pixel_values": jnp.zeros((1, 8, 8, 3))}}
    with pytest.raises(ValueError, match="takes no inputs\\['vision'\\]"):
        ours(batch)
