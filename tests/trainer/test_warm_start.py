"""The shipped warm start (trainer/warm_start.py): save -> load round trip, the vocabulary and shape checks, and
`config.train.init_from` validation."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from flax import nnx

from balcap_jax.trainer import warm_start
from balcap_jax.trainer.vocab_subset import VocabSubset


def _state(seed: int, features: int = 3):
    """A small NNX state with nested keys (kernel + bias under a sub-module)."""

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(4, features, rngs=rngs)
            self.scale = nnx.Param(np.full((features,), float(seed), np.float32))

    return nnx.split(Tiny(nnx.Rngs(seed)))[1]


def _leaves(state) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(state)]


VOCAB = VocabSubset.from_corpus([[11, 5, 7]], always=[151645])


def _config(init_from: str, **tiny) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(name="qwen2_5_vl", hf_dir="", tiny=dict(hidden_size=8, **tiny)))
    c.train = ml_collections.ConfigDict(dict(init_from=init_from))
    return c


def test_round_trip_replaces_every_leaf(tmp_path):
    trained, fresh = _state(1), _state(2)
    npz, meta = warm_start.save(tmp_path / "ws", trained, VOCAB, {"seed": 1, "command": "x"})
    assert npz.name == "ws.npz" and meta.name == "ws.json"
    loaded = warm_start.load_into(fresh, VOCAB, str(tmp_path / "ws.npz"))
    for a, b, c in zip(_leaves(loaded), _leaves(trained), _leaves(fresh)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert any(not np.array_equal(b, c) for b, c in zip(_leaves(trained), _leaves(fresh)))
    record = json.loads(meta.read_text())
    assert record["seed"] == 1 and record["vocab_tokenizer_ids"] == [5, 7, 11, 151645]
    assert record["leaves"]["proj/kernel"] == [[4, 3], "float32"]


def _embedding_state(vocab: VocabSubset, seed: int, width: int = 3):
    """An NNX state shaped like a policy's vocabulary-indexed leaves: embed_tokens [V', D], lm_head [D, V']."""

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed_tokens = nnx.Embed(vocab.size, width, rngs=rngs)
            self.lm_head = nnx.Linear(width, vocab.size, rngs=rngs)

    return nnx.split(Model(nnx.Rngs(seed)))[1]


def _flat_numpy(state) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in warm_start._flat(state).items()}


def test_a_different_vocabulary_is_mapped_token_by_token(tmp_path):
    """Rows follow the Qwen token id: shared tokens keep the warm start's trained rows wherever their compact ids
    moved, a token only this run has keeps its fresh row, and the unk row carries over."""
    saved_vocab = VocabSubset.from_corpus([[11, 5, 7]], always=[151645])  # compact: unk, 5, 7, 11, 151645
    ours = VocabSubset.from_corpus([[11, 6, 5]], always=[151645])  # compact: unk, 5, 6, 11, 151645
    trained, fresh = _embedding_state(saved_vocab, 1), _embedding_state(ours, 2)
    warm_start.save(tmp_path / "ws", trained, saved_vocab, {})
    loaded = _flat_numpy(warm_start.load_into(fresh, ours, str(tmp_path / "ws")))
    t, f = _flat_numpy(trained), _flat_numpy(fresh)
    rows = warm_start.vocab_rows(saved_vocab, ours)
    np.testing.assert_array_equal(rows, [0, 1, -1, 3, 4])
    emb, head = "embed_tokens/embedding", "lm_head/kernel"
    for ours_id, saved_id in ((0, 0), (1, 1), (3, 3), (4, 4)):
        np.testing.assert_array_equal(loaded[emb][ours_id], t[emb][saved_id])
        np.testing.assert_array_equal(loaded[head][:, ours_id], t[head][:, saved_id])
        np.testing.assert_array_equal(loaded["lm_head/bias"][ours_id], t["lm_head/bias"][saved_id])
    np.testing.assert_array_equal(loaded[emb][2], f[emb][2])  # token 6: never seen by the warm start
    np.testing.assert_array_equal(loaded[head][:, 2], f[head][:, 2])
    assert warm_start.vocab_rows(saved_vocab, saved_vocab) is None
    # A smaller corpus (fewer scenes) is a subset: every row is a trained one.
    subset = VocabSubset.from_corpus([[5, 11]], always=[151645])
    np.testing.assert_array_equal(warm_start.vocab_rows(saved_vocab, subset), [0, 1, 3, 4])
    small = _flat_numpy(warm_start.load_into(_embedding_state(subset, 3), subset, str(tmp_path / "ws")))
    np.testing.assert_array_equal(small[emb], t[emb][[0, 1, 3, 4]])


def test_another_embedding_width_is_refused(tmp_path):
    vocab = VocabSubset.from_corpus([[11, 5, 7]], always=[151645])
    warm_start.save(tmp_path / "ws", _embedding_state(vocab, 1, width=3), vocab, {})
    other = VocabSubset.from_corpus([[11, 6, 5]], always=[151645])
    with pytest.raises(ValueError, match=r"config\.train\.init_from.*embed_tokens/embedding"):
        warm_start.load_into(_embedding_state(other, 2, width=4), other, str(tmp_path / "ws"))


def test_another_architecture_is_refused(tmp_path):
    warm_start.save(tmp_path / "ws", _state(1, features=3), VOCAB, {})
    with pytest.raises(ValueError, match=r"config\.train\.init_from.*proj/bias.*\(3,\).*\(5,\)"):
        warm_start.load_into(_state(2, features=5), VOCAB, str(tmp_path / "ws"))


def test_an_hf_policy_is_refused(tmp_path):
    warm_start.save(tmp_path / "ws", _state(1), VOCAB, {})
    with pytest.raises(ValueError, match=r"config\.train\.init_from.*config\.model\.hf_dir"):
        warm_start.load_into(_state(2), None, str(tmp_path / "ws"))


def test_config_validation_names_the_field(tmp_path, monkeypatch):
    assert warm_start.config_problems(_config("")) == []
    missing = warm_start.config_problems(_config(str(tmp_path / "nope")))
    assert len(missing) == 1 and "config.train.init_from" in missing[0] and "nope.npz does not exist" in missing[0]
    warm_start.save(tmp_path / "ws", _state(1), VOCAB, {"architecture": {"hidden_size": 8}, "model_name": "qwen2_5_vl"})
    assert warm_start.config_problems(_config(str(tmp_path / "ws"))) == []
    wrong = warm_start.config_problems(_config(str(tmp_path / "ws"), num_hidden_layers=4))
    assert len(wrong) == 1 and "config.model.tiny" in wrong[0] and "config.train.init_from" in wrong[0]
    hf = _config(str(tmp_path / "ws"))
    hf.model.hf_dir = "/some/checkpoint"
    assert "config.model.hf_dir" in warm_start.config_problems(hf)[0]
    with pytest.raises(ValueError, match="config.train.init_from"):
        warm_start.check_config(_config(str(tmp_path / "nope")))
    # A relative path is read against the package, so an installed package finds its shipped asset.
    monkeypatch.setattr(warm_start, "PACKAGE_DIR", Path(tmp_path))
    assert warm_start.resolve("ws") == (tmp_path / "ws.npz", tmp_path / "ws.json")
