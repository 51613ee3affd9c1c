"""A compact vocabulary for small policies trained from scratch on a closed world (ShapesWorld).

Qwen's tokenizer has ~152k ids; a from-scratch tiny policy that only ever sees a few hundred of them would spend
almost all of its compute on the vocabulary projection. `VocabSubset` keeps the real Qwen tokenizer and chat
template (so prompts, image placeholders and M-RoPE positions are exactly those of Qwen2.5-VL) and renumbers
the ids that occur in the world's corpus to 0..V'-1. Ids outside the corpus map to one `unk` id. The policy is
a genuine Qwen2.5-VL-architecture model with vocab_size = V'; `to_tokenizer` maps its samples back for decoding.

Real checkpoints never use a subset (`VocabSubset` is only built for from-scratch recipes).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class VocabSubset:
    """tokenizer_ids: int64[V'] the Qwen id of each compact id (sorted; index 0 is the `unk` stand-in)."""

    tokenizer_ids: np.ndarray

    @classmethod
    def from_corpus(cls, id_sequences: Iterable[Sequence[int]], always: Iterable[int] = ()) -> "VocabSubset":
        """All ids occurring in `id_sequences` plus `always` (special tokens); compact id 0 is reserved for unk."""
        seen: set[int] = set(int(i) for i in always)
        for ids in id_sequences:
            seen.update(int(i) for i in ids)
        ordered = np.asarray(sorted(seen), np.int64)
        return cls(np.concatenate([[-1], ordered]))  # -1: the unk stand-in, never a real tokenizer id

    @property
    def size(self) -> int:
        return int(self.tokenizer_ids.shape[0])

    @property
    def unk_id(self) -> int:
        return 0

    def from_tokenizer(self, ids: np.ndarray) -> np.ndarray:
        """Qwen ids (any shape) -> compact ids; ids outside the subset -> unk."""
        ids = np.asarray(ids)
        known = self.tokenizer_ids[1:]
        position = np.searchsorted(known, ids)
        position = np.clip(position, 0, len(known) - 1)
        hit = known[position] == ids
        return np.where(hit, position + 1, self.unk_id).astype(np.int32)

    def to_tokenizer(self, ids: np.ndarray) -> np.ndarray:
        """Compact ids (any shape) -> Qwen ids (unk -> the tokenizer's id 0 is never produced: it maps to -1,
        which callers drop before decoding)."""
        return self.tokenizer_ids[np.asarray(ids)]

    def compact(self, token_id: int) -> int:
        """One required token (e.g. <|im_end|>) -> its compact id; KeyError if the subset lacks it."""
        mapped = int(self.from_tokenizer(np.asarray([token_id]))[0])
        if mapped == self.unk_id:
            raise KeyError(f"token id {token_id} is not in the vocabulary subset")
        return mapped

    def to_json(self) -> str:
        return json.dumps(self.tokenizer_ids[1:].tolist())

    @classmethod
    def from_json(cls, text: str) -> "VocabSubset":
        return cls(np.concatenate([[-1], np.asarray(json.loads(text), np.int64)]))
