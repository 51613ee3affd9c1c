"""The grain pipeline: bucketing and padding, host sharding, exact restore, seeded order, and bad records
(corrupt image, empty references, processor errors, over-long prompts) reported in the batches, never lost."""

import asyncio
import io
import json

import numpy as np
import pytest
from PIL import Image

from balcap_jax.data import bucketing
from balcap_jax.data.pipeline import (
    PipelineConfig,
    SkipCounter,
    make_dataset,
    pad_batch_to_length,
    pad_to_common_length,
    prepare,
)
from balcap_jax.data.records import CaptionExample
from balcap_jax.data.shapes_world_records import write_shapes_world_manifests
from balcap_jax.data.tfds_builder import open_split, prepare_manifest_dataset
from balcap_jax.rewards.shapes_world.components import shapes_world_components
from balcap_jax.rewards.types import RewardItem


def png(width):
    buffer = io.BytesIO()
    Image.new("RGB", (width, 8), (width, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def record(i, width=None, references=("A caption.",), image=None):
    return {"id": f"r{i:03d}".encode(), "image_bytes": png(width or 8 + 4 * (i % 13)) if image is None else image,
            "references": [r.encode() for r in references], "questions_json": b"[]",
            "metadata_json": json.dumps({"index": i}).encode()}


def processor(example: CaptionExample):
    """Toy processor: the prompt length is a function of the image width (like image tokens), 3..15 tokens."""
    n = example.image.size[0] // 4 + 1
    if example.image.size[0] == 60:
        raise RuntimeError("this processor cannot handle width 60")
    start = int(example.metadata["index"]) * 100
    return {"input_ids": np.arange(start, start + n, dtype=np.int32),
            "positions": np.tile(np.arange(n, dtype=np.int32), (3, 1)),
            "pixel_values": np.asarray(example.image, np.float32)[:, :4]}


SOURCE = [record(i) for i in range(40)]
CONFIG = PipelineConfig(batch_size=4, buckets=(4, 8, 16), window_batches=2, num_threads=1, seed=3)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_are_bucketed_and_left_padded():
    for batch in take(iter(make_dataset(SOURCE, processor, CONFIG)), 12):
        lengths = batch["prompt_length"]
        ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["positions"]
        assert ids.shape == (4, bucketing.bucket_length(int(lengths.max()), CONFIG.buckets))
        assert positions.shape == (3, *ids.shape) and mask.dtype == bool
        for row, (n, index) in enumerate(zip(lengths, (m["index"] for m in batch["metadata"]))):
            np.testing.assert_array_equal(mask[row], np.arange(ids.shape[1]) >= ids.shape[1] - n)
            np.testing.assert_array_equal(ids[row, -n:], np.arange(index * 100, index * 100 + n))
            assert (ids[row, : ids.shape[1] - n] == CONFIG.pad_id).all()
        assert batch["pixel_values"].shape == (4, 8, 4, 3)
        assert len(batch["image_bytes"]) == len(batch["references"]) == 4


def test_right_padding_and_ragged_features_stay_lists():
    config = PipelineConfig(batch_size=3, buckets=(16,), padding_side="right", pad_id=-1, num_threads=1)

    def ragged(example):
        features = processor(example)
        return {**features, "patches": np.zeros((len(features["input_ids"]), 2))}

    batch = next(iter(make_dataset(SOURCE, ragged, config)))
    for row, n in enumerate(batch["prompt_length"]):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["input_ids"][row, n:] == -1).all()
    assert isinstance(batch["patches"], list) and [p.shape[0] for p in batch["patches"]] == list(batch["prompt_length"])


def test_one_epoch_yields_every_record_once_or_reports_why():
    bad = {
        "r100": record(100, image=b"\x89PNG corrupt"),
        "r101": record(101, references=("", "  ")),
        "r102": record(102, width=60),  # the processor raises on it
        "r103": record(103, width=80),  # 21 tokens > largest bucket 16
    }
    source = SOURCE[:21] + list(bad.values())
    config = PipelineConfig(batch_size=4, buckets=(8, 16), window_batches=2, num_epochs=1, num_threads=1)
    counter, seen = SkipCounter(), []
    for batch in make_dataset(source, processor, config):
        counter.update(batch)
        seen += batch["example_id"]
    assert sorted(seen) == sorted(r["id"].decode() for r in SOURCE[:21])
    assert sorted(counter.record_ids) == sorted(bad)
    assert dict(counter.counts) == {"corrupt_image": 1, "empty_references": 1, "preprocess_error": 1,
                                    "prompt_too_long": 1}


def test_drop_remainder_reports_the_dropped_examples():
    config = PipelineConfig(batch_size=4, buckets=(16,), window_batches=8, num_epochs=1, drop_remainder=True,
                            num_threads=1)
    counter, seen = SkipCounter(), []
    for batch in make_dataset(SOURCE[:10], processor, config):
        assert len(batch["example_id"]) == 4
        counter.update(batch)
        seen += batch["example_id"]
    assert len(seen) == 8 and dict(counter.counts) == {"dropped_remainder": 2}
    assert sorted(seen + counter.record_ids) == sorted(r["id"].decode() for r in SOURCE[:10])


def test_host_shards_partition_an_epoch():
    config = PipelineConfig(batch_size=2, buckets=(16,), num_epochs=1, num_threads=1)
    shards = [[i for b in make_dataset(SOURCE, processor, config, shard_index=k, shard_count=3)
               for i in b["example_id"]] for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(r["id"].decode() for r in SOURCE)
    assert all(abs(len(s) - len(SOURCE) / 3) < 1 for s in shards)
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset(SOURCE, processor, config, shard_index=3, shard_count=3)


@pytest.mark.parametrize("consumed", [0, 1, 2, 5])  # start, mid-window, window boundary, later window
def test_restoring_state_gives_the_same_next_batches(consumed):
    dataset = make_dataset(SOURCE, processor, CONFIG)
    iterator = iter(dataset)
    take(iterator, consumed)
    state = json.loads(json.dumps(iterator.get_state()))  # must survive a JSON checkpoint
    expected = take(iterator, 4)
    restored = iter(make_dataset(SOURCE, processor, CONFIG))
    restored.set_state(state)
    for a, b in zip(expected, take(restored, 4)):
        assert a["example_id"] == b["example_id"] and a["skipped"] == b["skipped"]
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_order_is_a_function_of_the_seed_and_epochs_are_reshuffled():
    def ids(seed, n=10, source=SOURCE):
        config = PipelineConfig(batch_size=4, buckets=(16,), window_batches=1, seed=seed, num_threads=1)
        return [b["example_id"] for b in take(iter(make_dataset(source, processor, config)), n)]

    assert ids(1) == ids(1) and ids(1) != ids(2)
    epochs = sum(ids(1, n=10, source=SOURCE[:20]), [])
    assert sorted(epochs[:20]) == sorted(epochs[20:]) and epochs[:20] != epochs[20:]


def test_group_window_sorts_by_length_and_is_seeded():
    lengths = [5, 1, 4, 2, 3, 9, 7]
    batches, dropped = bucketing.group_window(lengths, 2, seed=0, window_index=0, drop_remainder=False)
    assert sorted(map(sorted, batches)) == sorted(map(sorted, [[1, 3], [4, 2], [0, 6], [5]]))
    assert dropped == []
    batches, dropped = bucketing.group_window(lengths, 2, seed=0, window_index=0, drop_remainder=True)
    assert dropped == [5] and len(batches) == 3
    orders = {tuple(map(tuple, bucketing.group_window(lengths, 2, 0, w, False)[0])) for w in range(10)}
    assert len(orders) > 1
    assert bucketing.bucket_length(9, (4, 8, 16)) == 16 and bucketing.bucket_length(17, (4, 8, 16)) is None


def test_padding_helpers():
    batch = next(iter(make_dataset(SOURCE, processor, CONFIG)))
    wider = pad_batch_to_length(batch, 32)
    assert wider["input_ids"].shape == (4, 32) and wider["positions"].shape == (3, 4, 32)
    np.testing.assert_array_equal(wider["input_ids"][:, -batch["input_ids"].shape[1]:], batch["input_ids"])
    assert wider["attention_mask"][:, : 32 - batch["input_ids"].shape[1]].sum() == 0
    assert pad_to_common_length(batch) is batch  # one process: nothing to agree on


def test_processor_contract_violation_is_a_clear_error():
    example = CaptionExample("x", Image.new("RGB", (4, 4)), b"", ("A.",), (), {})
    with pytest.raises(ValueError, match="input_ids"):
        prepare(example, lambda e: {"tokens": np.zeros(3, np.int32)}, 16)
    with pytest.raises(ValueError, match="1-D integer"):
        prepare(example, lambda e: {"input_ids": np.zeros((1, 3), np.int32)}, 16)
    with pytest.raises(ValueError, match="'positions'"):
        prepare(example, lambda e: {"input_ids": np.zeros(3, np.int32), "positions": np.zeros((3, 4))}, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"batch_size": 0}, "batch_size"), ({"buckets": (8, 4)}, "buckets"), ({"buckets": ()}, "buckets"),
     ({"padding_side": "middle"}, "padding_side"), ({"num_epochs": 0}, "num_epochs"), ({"seed": -1}, "seed")],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig(**{"batch_size": 2, "buckets": (8,), **kwargs})


def test_shapes_world_end_to_end_to_the_judge(tmp_path):
    paths = write_shapes_world_manifests(str(tmp_path / "m"), seed=0, split_sizes={"train": 8})
    prepare_manifest_dataset(str(tmp_path / "tfds"), "sw", paths)
    source = open_split(str(tmp_path / "tfds"), "sw", "train")

    def caption_processor(example):
        return {"input_ids": np.asarray([ord(ch) for ch in "Describe the image."] + [7] * 16, np.int32)}

    config = PipelineConfig(batch_size=4, buckets=(64,), num_epochs=1, num_threads=1)
    batches = list(make_dataset(source, caption_processor, config))
    assert sum(len(b["example_id"]) for b in batches) == 8
    batch = batches[0]
    assert batch["input_ids"].shape == (4, 64) and all(len(r) == 3 for r in batch["references"])
    items = [RewardItem(i, refs[0], refs, image=img, metadata=meta)
             for i, refs, img, meta in zip(batch["example_id"], batch["references"], batch["image_bytes"],
                                           batch["metadata"])]
    for component in shapes_world_components(with_qa=True):
        assert [s.value for s in asyncio.run(component.score(items))] == [1.0] * 4


@pytest.mark.slow
def test_worker_processes_are_deterministic_and_restorable():
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (train.py parses them)
        flags.FLAGS.mark_as_parsed()
    config = PipelineConfig(batch_size=4, buckets=(4, 8, 16), window_batches=2, seed=3, worker_count=1,
                            num_threads=1)
    first = iter(make_dataset(SOURCE, processor, config))
    try:
        take(first, 3)
        state = first.get_state()
        expected = [b["example_id"] for b in take(first, 3)]
    finally:
        first.close()
    restored = iter(make_dataset(SOURCE, processor, config))
    try:
        restored.set_state(state)
        assert [b["example_id"] for b in take(restored, 3)] == expected
    finally:
        restored.close()


@pytest.mark.parametrize(
    "broken, reason",
    [({"image_bytes": None}, "missing_image"), ({"references": 5}, "bad_record"),
     ({"references": []}, "empty_references"), ({"questions_json": b"{not json"}, "bad_json"),
     ({"metadata_json": b"[1]"}, "bad_json"), ({"image_bytes": b"\x00" * 10}, "corrupt_image")],
)
def test_malformed_records_decode_to_skips(broken, reason, caplog):
    from balcap_jax.data.records import Skipped, decode_record

    result = decode_record({**record(7), **broken})
    assert isinstance(result, Skipped) and (result.record_id, result.reason) == ("r007", reason)
    assert any("r007" in m for m in caplog.messages)


def test_oversized_images_are_skipped_at_read_time():
    from balcap_jax.data.manifest import ImageLimits

    config = PipelineConfig(batch_size=4, buckets=(16,), num_epochs=1, num_threads=1,
                            image_limits=ImageLimits(max_pixels=40 * 8))
    counter, seen = SkipCounter(), 0
    for batch in make_dataset(SOURCE[:13], processor, config):
        counter.update(batch)
        seen += len(batch["example_id"])
    widths = [8 + 4 * (i % 13) for i in range(13)]
    assert seen == sum(w <= 40 for w in widths) and dict(counter.counts) == {"oversized_image": sum(w > 40 for w in widths)}
