"""The grain input pipeline: records -> decoded examples -> model inputs -> length-bucketed, host-sharded,
checkpointable batches.

    source = tfds_builder.open_split(data_dir, "shapes_world", "train")
    dataset = make_dataset(source, processor, PipelineConfig(batch_size=8, buckets=(64, 128, 256)))
    iterator = iter(dataset)
    batch = next(iterator)                    # dict: input_ids int32[B, L], attention_mask bool[B, L], ...
    state = iterator.get_state()              # JSON-able; iterator.set_state(state) resumes exactly

Order of operations: global shuffle (per-epoch reseeded, `seed`) and repeat on record indices, then every host
takes every `shard_count`-th record starting at `shard_index` (default: this JAX process), then decoding and
preprocessing in `num_threads` threads, then `LengthBucketedBatches`. The processor is the model-specific part
(image resize/patching, chat template, tokenisation, host-side M-RoPE positions): any callable
`CaptionExample -> {"input_ids": int[T], ...}`; see `bucketing.collate` for how its outputs are batched.

Bad data never stops the pipeline: records that fail to decode, processor errors and prompts longer than the
largest bucket become `Skipped` markers, logged where they happen and reported in the next batch's
"skipped" list of (record id, reason); `SkipCounter` totals them for metrics.

worker_count > 0 moves decoding, preprocessing and batching into that many grain worker processes (they read
absl flags, so flags must be parsed first, as `python -m balcap_jax.train` does); each worker batches its own
slice of the host's shard, so the order differs from worker_count=0 but stays seeded and restorable.

With several hosts and several buckets, hosts may pick different bucket lengths for the same step; call
`pad_to_common_length` on each local batch (a no-op with one process) before building global arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from balcap_jax.data.bucketing import (
    DEFAULT_SEQUENCE_PAD_VALUES,
    LengthBucketedBatches,
    Prepared,
    pad_last_axis,
    bucket_length,
    collate,
)
from balcap_jax.data.manifest import ImageLimits
from balcap_jax.data.records import CaptionExample, Skipped, decode_record

log = logging.getLogger(__name__)

Processor = Callable[[CaptionExample], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """batch_size is per host. buckets: allowed padded prompt lengths, ascending. num_epochs None = forever."""

    batch_size: int
    buckets: tuple[int, ...]
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    window_batches: int = 8
    drop_remainder: bool = False
    padding_side: str = "left"
    pad_id: int = 0
    num_threads: int = 2
    prefetch_buffer_size: int = 8
    worker_count: int = 0
    image_limits: ImageLimits = ImageLimits()
    concat_keys: tuple[str, ...] = ()  # features concatenated over the batch (see bucketing.collate)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"PipelineConfig.batch_size must be >= 1; got {self.batch_size}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"PipelineConfig.buckets must be positive, strictly increasing lengths; got {self.buckets}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"PipelineConfig.padding_side must be 'left' or 'right'; got {self.padding_side!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"PipelineConfig.num_epochs must be None (repeat forever) or >= 1; got {self.num_epochs}")
        if self.window_batches < 1:
            raise ValueError(f"PipelineConfig.window_batches must be >= 1; got {self.window_batches}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"PipelineConfig.seed must be in [0, 2**32); got {self.seed}")

    @property
    def pad_values(self) -> dict[str, Any]:
        return {**DEFAULT_SEQUENCE_PAD_VALUES, "input_ids": self.pad_id}


def prepare(
    example: CaptionExample | Skipped,
    processor: Processor,
    max_length: int,
    sequence_keys: Sequence[str] = tuple(DEFAULT_SEQUENCE_PAD_VALUES),
) -> Prepared | Skipped:
    """Run the processor; a processor error or a prompt over `max_length` tokens becomes a `Skipped`.
    A processor breaking its contract (no 1-D integer input_ids, or a per-token field in `sequence_keys` whose
    last axis is not the prompt length) raises ValueError: that is a bug to fix, not bad data."""
    if isinstance(example, Skipped):
        return example
    try:
        features = {k: np.asarray(v) for k, v in processor(example).items()}
    except Exception as e:  # a processor failing on one image must not stop a run; it is logged and counted
        log.warning("skipping record %s: preprocess_error (%s: %s)", example.example_id, type(e).__name__, e)
        return Skipped(example.example_id, "preprocess_error", f"{type(e).__name__}: {e}")
    input_ids = features.get("input_ids")
    if input_ids is None or input_ids.ndim != 1 or not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(
            "the processor must return 'input_ids' as a 1-D integer array (one prompt, unpadded); got "
            f"{None if input_ids is None else (input_ids.shape, input_ids.dtype)}"
        )
    length = int(input_ids.shape[0])
    for key in sequence_keys:
        if key in features and features[key].shape[-1:] != (length,):
            raise ValueError(
                f"the processor's per-token field {key!r} has shape {features[key].shape}; its last axis must be "
                f"the prompt length {length} (input_ids), since the pipeline pads it along that axis"
            )
    if length > max_length:
        detail = f"prompt has {length} tokens > largest bucket {max_length}"
        log.warning("skipping record %s: prompt_too_long (%s)", example.example_id, detail)
        return Skipped(example.example_id, "prompt_too_long", detail)
    return Prepared(example, features, length)


def _decode_and_prepare(record, processor: Processor, config: PipelineConfig) -> Prepared | Skipped:
    return prepare(decode_record(record, config.image_limits), processor, config.buckets[-1], tuple(config.pad_values))


def make_dataset(
    source: Sequence[Mapping[str, Any]],
    processor: Processor,
    config: PipelineConfig,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """The batched dataset of this host's shard of `source` (any random-access sequence of records)."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}); got {shard_index}")
    if len(source) < shard_count:
        raise ValueError(f"the source has {len(source)} records, fewer than the {shard_count} hosts reading it")
    ds = grain.MapDataset.source(source)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    ds = ds[shard_index::shard_count]
    ds = ds.map(functools.partial(_decode_and_prepare, processor=processor, config=config))
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    )
    batched: grain.IterDataset = LengthBucketedBatches(
        iter_ds,
        batch_size=config.batch_size,
        buckets=config.buckets,
        window_batches=config.window_batches,
        seed=config.seed,
        drop_remainder=config.drop_remainder,
        collate_fn=functools.partial(collate, padding_side=config.padding_side, pad_values=config.pad_values,
                                     concat_keys=config.concat_keys),
    )
    if config.worker_count > 0:
        batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return batched


# ----------------------------------------------------------------------------------------------------------
# After the iterator


def pad_batch_to_length(
    batch: dict[str, Any], length: int, *, padding_side: str = "left",
    pad_values: Mapping[str, Any] = DEFAULT_SEQUENCE_PAD_VALUES,
) -> dict[str, Any]:
    """Re-pad a collated batch's per-token fields (batch axis just before the last) to `length`."""
    out = dict(batch)
    for key, value in pad_values.items():
        if key in batch and isinstance(batch[key], np.ndarray):
            out[key] = pad_last_axis(batch[key], length, value, padding_side)
    return out


def pad_to_common_length(batch: dict[str, Any], *, padding_side: str = "left",
                         pad_values: Mapping[str, Any] = DEFAULT_SEQUENCE_PAD_VALUES) -> dict[str, Any]:
    """Pad this host's batch to the longest padded length over all JAX processes (collective: every process
    must call it for the same step). With one process, returns the batch unchanged."""
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    local = np.asarray(batch["input_ids"].shape[-1], np.int32)
    common = int(np.max(multihost_utils.process_allgather(local)))
    return pad_batch_to_length(batch, common, padding_side=padding_side, pad_values=pad_values)


@dataclasses.dataclass
class SkipCounter:
    """Running totals of the "skipped" entries of the batches seen (for metrics and end-of-run reports)."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    record_ids: list[str] = dataclasses.field(default_factory=list)

    def update(self, batch: Mapping[str, Any]) -> None:
        for record_id, reason in batch.get("skipped", ()):
            self.counts[reason] += 1
            self.record_ids.append(record_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


__all__ = [
    "PipelineConfig",
    "Processor",
    "SkipCounter",
    "bucket_length",
    "make_dataset",
    "pad_batch_to_length",
    "pad_to_common_length",
    "prepare",
]
