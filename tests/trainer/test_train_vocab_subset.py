import numpy as np
import pytest

from balcap_jax.trainer.vocab_subset import VocabSubset


def test_round_trip_and_unknown_ids():
    vocab = VocabSubset.from_corpus([[5, 9, 9, 100], [42]], always=[151645])
    assert vocab.size == 6  # unk + {5, 9, 42, 100, 151645}
    ids = np.array([[9, 5], [151645, 42]])
    compact = vocab.from_tokenizer(ids)
    assert compact.dtype == np.int32 and compact.min() >= 1
    np.testing.assert_array_equal(vocab.to_tokenizer(compact), ids)
    assert vocab.from_tokenizer(np.array([7, 0, 10**6])).tolist() == [vocab.unk_id] * 3
    assert vocab.to_tokenizer(np.array([vocab.unk_id]))[0] == -1


def test_compact_raises_for_missing_token_and_json_round_trip():
    vocab = VocabSubset.from_corpus([[3, 4]])
    with pytest.raises(KeyError, match="not in the vocabulary subset"):
        vocab.compact(99)
    again = VocabSubset.from_json(vocab.to_json())
    np.testing.assert_array_equal(again.tokenizer_ids, vocab.tokenizer_ids)
