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


def test_a_different_vocabulary_is_refused(tmp_path):
    warm_start.save(tmp_path / "ws", _state(1), VOCAB, {})
    other = VocabSubset.from_corpus([[11, 5, 8]], always=[151645])
    with pytest.raises(ValueError, match=r"config\.train\.init_from.*vocabulary subset.*1 only here, 1 only in"):
        warm_start.load_into(_state(2), other, str(tmp_path / "ws"))


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
