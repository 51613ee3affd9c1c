"""The shipped warm start (balcap_jax/assets/shapes_world_warm_start) fits the embedded default recipe exactly:
the file the default's `train.init_from` names exists in the package, records how it was built, and loads into the
default's freshly built policy with the default world's own vocabulary (no row remapping needed)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from balcap_jax import default_config
from balcap_jax.data import shapes_world as world
from balcap_jax.models import registry
from balcap_jax.models.qwen2_5_vl import processor as qwen_processor
from balcap_jax.trainer import warm_start
from balcap_jax.trainer.data_sources import world_config
from balcap_jax.trainer.policy import corpus_vocab, tiny_qwen_config


def _default_corpus(config) -> list[str]:
    """The references of the default world's training split (what `corpus_texts` reads from its records)."""
    wc = world_config(config)
    n = int(config.data.shapes_world.num_train)
    return [ref for i in range(n) for ref in world.example_references(int(config.seed), i, wc)]


def test_references_without_rendering_are_the_examples_own():
    wc = world.WorldConfig(max_objects=2)
    for i in range(5):
        assert world.example_references(3, i, wc) == world.generate_example(3, i, wc).references


def test_the_default_recipe_names_a_shipped_warm_start_that_records_its_build():
    config = default_config.get_config()
    assert config.train.init_from == default_config.WARM_START and config.train.sft_steps == 0
    assert warm_start.config_problems(config) == []
    meta = warm_start.read_metadata(config.train.init_from)
    assert meta["command"].startswith("python -m experiments.build_warm_start ")
    assert f"--sft_steps={meta['sft_steps']}" in meta["command"] and f"--seed={meta['seed']}" in meta["command"]
    assert len(meta["git_commit"]) == 40 and meta["git_dirty"] is False
    sw = config.data.shapes_world
    assert meta["shapes_world"] == {k: (list(v) if isinstance(v, tuple) else v) for k, v in sw.items()}
    assert set(meta["held_out_greedy"]) >= {"precision", "recall", "linguistic", "b_capscore"}


def test_the_shipped_warm_start_loads_into_the_default_policy_row_for_row():
    """The default policy's vocabulary (built as `build_policy` builds it) is the file's, and every leaf of the
    default architecture (shapes only: `nnx.eval_shape`, no initialisation) is filled from the file unchanged."""
    config = default_config.get_config()
    tokenizer = qwen_processor.load_tokenizer()
    prompt = qwen_processor.caption_prompt(config.data.prompt, num_images=1)
    vocab = corpus_vocab(tokenizer, np.asarray(tokenizer.encode(prompt, add_special_tokens=False)),
                         _default_corpus(config))
    assert vocab.tokenizer_ids[1:].tolist() == warm_start.read_metadata(config.train.init_from)["vocab_tokenizer_ids"]
    qwen_config = tiny_qwen_config(config.model.tiny, vocab=vocab)
    model = nnx.eval_shape(lambda: registry.get("qwen2_5_vl").model_class(qwen_config, rngs=nnx.Rngs(0)))
    _, abstract = nnx.split(model)
    loaded = warm_start._flat(warm_start.load_into(abstract, vocab, config.train.init_from))
    npz, _ = warm_start.resolve(config.train.init_from)
    with np.load(npz) as data:
        assert set(loaded) == set(data.files)
        for key, leaf in loaded.items():
            np.testing.assert_array_equal(leaf, data[key])
