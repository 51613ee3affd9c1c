"""Each process loads only its share of every global batch.

The record stream is read as `loader_shards` disjoint streams (stream i takes records i, i + L, i + 2L, ... of the
seeded shuffle); a global batch of B rows is the concatenation of one batch of B / L rows from every stream, in
stream order. Process k of N owns streams [k·L/N, (k+1)·L/N) and loads, decodes and preprocesses only those.
With `loader_shards` fixed, the global batches are the same for any process count that divides it (and for any
device count), which is what makes a 2-process run reproduce a 1-process run step for step.

What the processes must agree on is agreed here, collectively: the padded prompt length (the longest bucket any
process chose). Images stay with their rows: each process lays out only its own rows' images, one block per
batch shard (the family's `vision_inputs`, which agrees the blocks' padded sizes). Iterator states are gathered, so
process 0's checkpoint holds every stream's position and a restart on any process count that divides
`loader_shards` resumes exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from balcap_jax.data import pipeline as pipeline_lib
from balcap_jax.parallel import hosts

def resolve_loader_shards(requested: int, process_count: int) -> int:
    """`data.loader_shards` (0 = one stream per process) -> the stream count; must divide over the processes."""
    shards = process_count if requested == 0 else requested
    if shards % process_count:
        raise ValueError(
            f"config.data.loader_shards={requested} does not divide over {process_count} processes; use a multiple "
            f"of {process_count} (or 0 for one stream per process)"
        )
    return shards


def owned_shards(shards: int, process_count: int, process_index: int) -> range:
    per = shards // process_count
    return range(process_index * per, (process_index + 1) * per)


def concat_batches(batches: Sequence[Mapping[str, Any]], concat_keys: Sequence[str], pad_values: Mapping[str, Any],
                   length: int) -> dict[str, Any]:
    """Collated batches (same padded length or shorter) -> one batch, rows in order, padded to `length`."""
    padded = [pipeline_lib.pad_batch_to_length(dict(b), length, pad_values=pad_values) for b in batches]
    out: dict[str, Any] = {}
    for key, first in padded[0].items():
        values = [b[key] for b in padded]
        if isinstance(first, list):
            out[key] = [entry for v in values for entry in v]
        elif key in concat_keys:
            out[key] = np.concatenate(values, axis=0)
        else:
            axis = 1 if key == "positions" and np.ndim(first) == 3 else 0
            out[key] = np.concatenate(values, axis=axis)
    return out


@dataclasses.dataclass
class HostBatches:
    """Iterator of this process's rows of each global batch (see module doc). `next()` returns a collated batch
    of this process's rows, padded to the length every process agreed on; its `concat_keys` (Qwen's flat patch
    arrays) hold those rows' images."""

    iterators: list[Any]
    concat_keys: tuple[str, ...]
    pad_values: Mapping[str, Any]

    @classmethod
    def create(cls, source, processor, config: pipeline_lib.PipelineConfig, *, loader_shards: int,
               global_batch_size: int, process_count: int, process_index: int) -> "HostBatches":
        if global_batch_size % loader_shards:
            raise ValueError(
                f"a global batch of {global_batch_size} rows does not split into config.data.loader_shards="
                f"{loader_shards} equal streams; make the batch a multiple of the loader shards"
            )
        per_shard = dataclasses.replace(config, batch_size=global_batch_size // loader_shards)
        iterators = [
            iter(pipeline_lib.make_dataset(source, processor, per_shard, shard_index=i, shard_count=loader_shards))
            for i in owned_shards(loader_shards, process_count, process_index)
        ]
        return cls(iterators, tuple(config.concat_keys), config.pad_values)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def next_or_none(self) -> dict[str, Any] | None:
        """The next batch, or None once *any* process's stream is exhausted (collective, so every process stops
        at the same batch and none waits in a collective the others never enter)."""
        parts = []
        for it in self.iterators:
            try:
                parts.append(next(it))
            except StopIteration:
                break
        exhausted = len(parts) < len(self.iterators)
        if hosts.agree_max(int(exhausted)):
            return None
        local_length = max(int(p["input_ids"].shape[-1]) for p in parts)
        return concat_batches(parts, self.concat_keys, self.pad_values, hosts.agree_max(local_length))

    def __next__(self) -> dict[str, Any]:
        batch = self.next_or_none()
        if batch is None:
            raise StopIteration
        return batch

    def get_state(self) -> list[Any]:
        """Every stream's state, from all processes, in stream order (the same list on every process)."""
        local = [it.get_state() for it in self.iterators]
        return [state for per_process in hosts.allgather_objects(local) for state in per_process]

    def set_state(self, states: Sequence[Any], *, process_count: int, process_index: int) -> None:
        if len(states) % process_count or len(states) // process_count != len(self.iterators):
            raise ValueError(
                f"the checkpoint holds {len(states)} data-stream states; this run reads "
                f"{len(self.iterators) * process_count} (config.data.loader_shards) over {process_count} processes. "
                "Resume with the same config.data.loader_shards (any process count that divides it)"
            )
        for it, i in zip(self.iterators, owned_shards(len(states), process_count, process_index)):
            it.set_state(states[i])

