"""LLaVA model plumbing: image-feature scatter order, padding, interface methods and input errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from balcap_jax.models.llava import config as llava_config
from balcap_jax.models.llava.model import LlavaForCausalLM



@pytest.fixture(scope="module")
def model():
    return LlavaForCausalLM(llava_config.tiny(), rngs=nnx.Rngs(0))


def test_interface_shapes_and_untied_head(model):
    cfg = model.config
    spec = model.cache_spec()
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 16)
    assert model.output_embedding().shape == (cfg.text.hidden_size, cfg.text.vocab_size)
    logits = model.logits(jnp.ones((3, cfg.text.hidden_size), jnp.bfloat16))
    assert logits.shape == (3, cfg.text.vocab_size) and logits.dtype == jnp.float32


def test_tied_embeddings_share_the_input_table():
    cfg = llava_config.tiny()
    tied_config = llava_config.LlavaConfig(
        vision=cfg.vision, text=cfg.text, image_token_id=cfg.image_token_id, tie_word_embeddings=True
    )
    tied = LlavaForCausalLM(tied_config, rngs=nnx.Rngs(0))
    assert not hasattr(tied, "lm_head")
    np.testing.assert_array_equal(
        np.asarray(tied.output_embedding()), np.asarray(tied.model.language_model.embed_tokens.embedding[...]).T
    )


def test_missing_inputs_and_wrong_image_size_are_named(model):
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(KeyError, match="positions"):
        model.hidden_states({"input_ids": ids, "attention_mask": jnp.ones((1, 4), bool)})
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 28, 28, 3\]"):
        model.model.image_features(jnp.zeros((1, 3, 28, 28)))


def test_fp16_checkpoint_loads_into_an_fp32_model(model, tmp_path):
    """llava-hf publishes float16 weights; they load into any float dtype."""
    from balcap_jax.models.llava import params as llava_params

    llava_params.save_llava(model, tmp_path, dtype=jnp.float16)
    loaded = llava_params.load_llava(tmp_path)
    got = loaded.model.multi_modal_projector.linear_1.kernel[...]
    expected = model.model.multi_modal_projector.linear_1.kernel[...].astype(jnp.float16).astype(jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_two_instances_share_one_graphdef(model):
    """Static attributes compare equal across instances, so jitted steps keyed on the graphdef are reused."""
    other = LlavaForCausalLM(llava_config.tiny(), rngs=nnx.Rngs(1))
    assert nnx.graphdef(model) == nnx.graphdef(other)
    assert hash(nnx.graphdef(model)) == hash(nnx.graphdef(other))
