"""Length-bucketed batching as a checkpointable grain transformation.

Prompts of very different lengths padded to one length waste compute; padded to their own lengths they make
a new compiled shape per batch. `LengthBucketedBatches` does the usual compromise, deterministically:

  1. read a window of `window_batches × batch_size` usable examples from the parent iterator
     (`Skipped` markers met on the way are collected, not counted as examples);
  2. sort the window by prompt length (ties by arrival) and cut it into batches of `batch_size`;
  3. pad each batch to the smallest bucket length that fits its longest prompt;
  4. emit the window's batches in an order shuffled by (seed, window index); the first one carries the
     window's skipped records under "skipped".

Its state is (parent state at the window start, window index, batches already emitted): restoring re-reads
the window and skips what was emitted, so the next batch after a restore is exactly the one that would have
come. Elements longer than the largest bucket are turned into `Skipped` markers upstream (`prepare`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from balcap_jax.data.records import CaptionExample, Skipped

log = logging.getLogger(__name__)

# Default pad values of the per-token fields a processor may return; any of them is padded on its last axis.
DEFAULT_SEQUENCE_PAD_VALUES: Mapping[str, Any] = {
    "input_ids": 0,
    "attention_mask": False,
    "positions": 0,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A preprocessed example: features from the model's processor, and its prompt length in tokens."""

    example: CaptionExample
    features: dict[str, np.ndarray]
    length: int


def bucket_length(length: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= length (buckets sorted ascending), or None when none fits."""
    for b in buckets:
        if length <= b:
            return b
    return None


def group_window(
    lengths: Sequence[int], batch_size: int, seed: int, window_index: int, drop_remainder: bool
) -> tuple[list[list[int]], list[int]]:
    """Batches (lists of indices into `lengths`) of similar lengths in a seeded order, and the indices
    dropped as an incomplete last batch (only when drop_remainder)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    dropped: list[int] = []
    if batches and len(batches[-1]) < batch_size and drop_remainder:
        dropped = batches.pop()
    permutation = np.random.default_rng([seed, window_index]).permutation(len(batches))
    return [batches[int(k)] for k in permutation], dropped


def pad_last_axis(array: np.ndarray, length: int, value: Any, padding_side: str) -> np.ndarray:
    extra = length - array.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad a sequence of length {array.shape[-1]} down to {length}")
    widths = [(0, 0)] * (array.ndim - 1) + [(extra, 0) if padding_side == "left" else (0, extra)]
    return np.pad(array, widths, constant_values=value)


def collate(
    items: Sequence[Prepared],
    length: int,
    *,
    padding_side: str = "left",
    pad_values: Mapping[str, Any] = DEFAULT_SEQUENCE_PAD_VALUES,
    concat_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Stack a batch. Per-token fields (keys of `pad_values`) are padded on their last axis to `length`, and
    the batch axis goes just before it: input_ids [T] -> [B, L]; M-RoPE positions [3, T] -> [3, B, L].
    `concat_keys` are concatenated on their first axis instead (Qwen2.5-VL's pixel_values [N_i, D] ->
    [sum N_i, D] and image_grid_thw [1, 3] -> [B, 3], images in row order). Other arrays are stacked on a new leading axis when their shapes agree, else kept as a list (e.g.
    variable patch counts). attention_mask is bool[B, L] (built from lengths if the processor gave none);
    prompt_length int32[B]; example fields (ids, references, questions, metadata, encoded images) are lists,
    and each metadata dict also holds its row's questions (ready to be a `RewardItem.metadata`)."""
    batch: dict[str, Any] = {}
    for key in items[0].features:
        arrays = [np.asarray(p.features[key]) for p in items]
        if key in concat_keys:
            batch[key] = np.concatenate(arrays, axis=0)
        elif key in pad_values:
            padded = [pad_last_axis(a, length, pad_values[key], padding_side) for a in arrays]
            batch[key] = np.stack(padded, axis=padded[0].ndim - 1)
        elif all(a.shape == arrays[0].shape and a.dtype == arrays[0].dtype for a in arrays):
            batch[key] = np.stack(arrays)
        else:
            batch[key] = arrays
    lengths = np.asarray([p.length for p in items], np.int32)
    if "attention_mask" in batch:
        batch["attention_mask"] = batch["attention_mask"].astype(bool)
    else:
        positions = np.arange(length)[None, :]
        batch["attention_mask"] = (
            positions >= length - lengths[:, None] if padding_side == "left" else positions < lengths[:, None]
        )
    batch["prompt_length"] = lengths
    batch["example_id"] = [p.example.example_id for p in items]
    batch["references"] = [p.example.references for p in items]
    batch["questions"] = [p.example.questions for p in items]
    # Judges read the questions from RewardItem.metadata, so each row's metadata carries them too.
    batch["metadata"] = [{**p.example.metadata, "questions": list(p.example.questions)} for p in items]
    batch["image_bytes"] = [p.example.image_bytes for p in items]
    return batch


class LengthBucketedBatches(grain.IterDataset):
    """Window-sorted, bucket-padded batches of `Prepared` elements (see module docstring)."""

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        batch_size: int,
        buckets: Sequence[int],
        window_batches: int,
        seed: int,
        drop_remainder: bool,
        collate_fn: Callable[[Sequence[Prepared], int], dict[str, Any]],
    ):
        super().__init__(parent)
        if batch_size < 1 or window_batches < 1:
            raise ValueError(f"batch_size and window_batches must be >= 1; got {batch_size}, {window_batches}")
        if not buckets or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets must be non-empty, strictly increasing lengths; got {buckets}")
        self._kwargs = dict(batch_size=batch_size, buckets=tuple(buckets), window_batches=window_batches,
                            seed=seed, drop_remainder=drop_remainder, collate_fn=collate_fn)

    def __iter__(self) -> grain.DatasetIterator:
        return _BucketedIterator(self._parent.__iter__(), **self._kwargs)

    def __str__(self) -> str:
        return f"LengthBucketedBatches(batch_size={self._kwargs['batch_size']}, buckets={self._kwargs['buckets']})"


class _BucketedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, *, batch_size, buckets, window_batches, seed, drop_remainder,
                 collate_fn):
        super().__init__(parent)
        self._batch_size = batch_size
        self._buckets = buckets
        self._window_size = batch_size * window_batches
        self._seed = seed
        self._drop_remainder = drop_remainder
        self._collate = collate_fn
        self._window_start = self._parent.get_state()
        self._window_index = 0
        self._emitted = 0
        self._batches: list[dict[str, Any]] | None = None  # None: the window at _window_start is not read yet
        self._exhausted = False
        self.trailing_skipped: list[Skipped] = []  # skips after the last example of a finite dataset

    def _read_window(self) -> None:
        self._window_start = self._parent.get_state()
        items: list[Prepared] = []
        skipped: list[Skipped] = []
        while len(items) < self._window_size:
            try:
                element = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            (skipped if isinstance(element, Skipped) else items).append(element)
        groups, dropped = group_window([p.length for p in items], self._batch_size, self._seed, self._window_index,
                                       self._drop_remainder)
        skipped += [Skipped(items[i].example.example_id, "dropped_remainder", "incomplete final batch")
                    for i in dropped]
        batches = []
        for indices in groups:
            members = [items[i] for i in indices]
            length = bucket_length(max(p.length for p in members), self._buckets)
            batch = self._collate(members, length)
            batch["skipped"] = []
            batches.append(batch)
        if batches:
            batches[0]["skipped"] = [(s.record_id, s.reason) for s in skipped]
        elif skipped:
            self.trailing_skipped.extend(skipped)
            log.warning("%d records skipped after the last batch: %s", len(skipped),
                        [(s.record_id, s.reason) for s in skipped])
        self._batches = batches

    def __next__(self) -> dict[str, Any]:
        if self._batches is None:
            self._read_window()
        while self._emitted >= len(self._batches):
            if self._exhausted:
                raise StopIteration
            self._window_index += 1
            self._emitted = 0
            self._read_window()
        batch = self._batches[self._emitted]
        self._emitted += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"window_start": self._window_start, "window_index": self._window_index, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["window_start"])
        self._window_index = int(state["window_index"])
        self._emitted = int(state["emitted"])
        self._exhausted = False
        self._batches = None
