"""Per-host data: loader streams, batch concatenation, held-out manifest splits, checkpoint restore rules."""

import json

import numpy as np
import pytest

from balcap_jax.trainer import data_sources
from balcap_jax.trainer.host_data import HostBatches, concat_batches, owned_shards, resolve_loader_shards
from balcap_jax.trainer.policy import generation_eos_ids


def test_loader_streams_divide_over_processes():
    assert resolve_loader_shards(0, 4) == 4
    assert resolve_loader_shards(8, 4) == 8
    with pytest.raises(ValueError, match="config.data.loader_shards=6 does not divide over 4 processes"):
        resolve_loader_shards(6, 4)
    assert [list(owned_shards(8, 4, p)) for p in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_concat_batches_pads_to_the_agreed_length_and_keeps_row_order():
    def batch(rows, length, start):
        return {
            "input_ids": np.arange(start, start + rows * length).reshape(rows, length),
            "attention_mask": np.ones((rows, length), bool),
            "positions": np.tile(np.arange(length), (3, rows, 1)),
            "pixel_values": np.full((rows * 4, 2), start),
            "example_id": [f"{start}-{i}" for i in range(rows)],
            "skipped": [(f"s{start}", "prompt_too_long")],
        }

    out = concat_batches([batch(2, 3, 0), batch(1, 5, 100)], ("pixel_values",),
                         {"input_ids": -1, "attention_mask": False, "positions": 0}, 6)
    assert out["input_ids"].shape == (3, 6) and out["positions"].shape == (3, 3, 6)
    np.testing.assert_array_equal(out["input_ids"][0], [-1, -1, -1, 0, 1, 2])  # left padding
    np.testing.assert_array_equal(out["input_ids"][2], [-1, 100, 101, 102, 103, 104])
    assert out["attention_mask"][0].tolist() == [False] * 3 + [True] * 3
    assert out["pixel_values"].shape == (12, 2) and out["pixel_values"][-1, 0] == 100
    assert out["example_id"] == ["0-0", "0-1", "100-0"]
    assert out["skipped"] == [("s0", "prompt_too_long"), ("s100", "prompt_too_long")]


def test_a_checkpoint_of_another_stream_count_is_refused_with_the_fix():
    batches = HostBatches(iterators=[object(), object()], concat_keys=(), pad_values={})
    with pytest.raises(ValueError, match="Resume with the same config.data.loader_shards"):
        batches.set_state([{}, {}, {}], process_count=1, process_index=0)


def test_held_out_split_is_seeded_stable_and_keeps_ids_and_paths(tmp_path):
    (tmp_path / "img").mkdir()
    lines = [{"image": f"img/{i}.png", "references": ["r"]} for i in range(200)]
    lines[3]["id"] = "named"
    manifest = tmp_path / "all.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    paths = data_sources.split_manifest(str(manifest), str(tmp_path / "split"), fraction=0.25, seed=7)
    train = [json.loads(l) for l in open(paths["train"]) if l.startswith("{")]
    val = [json.loads(l) for l in open(paths["validation"])]
    assert len(train) + len(val) == 200 and 30 < len(val) < 70
    ids = {row["id"] for row in train + val}
    assert "named" in ids and "all.jsonl:1" in ids  # the ids a whole-manifest read gives
    assert all(row["image"] == str(tmp_path / "img" / row["image"].rsplit("/", 1)[1]) for row in val)
    assert "not json" in open(paths["train"]).read()  # left for the builder to count and skip
    again = data_sources.split_manifest(str(manifest), str(tmp_path / "again"), fraction=0.25, seed=7)
    assert open(again["validation"]).read() == open(paths["validation"]).read()
    other = data_sources.split_manifest(str(manifest), str(tmp_path / "other"), fraction=0.25, seed=8)
    assert open(other["validation"]).read() != open(paths["validation"]).read()


def test_generation_config_eos_ids():
    assert generation_eos_ids({"eos_token_id": [151645, 151643]}) == (151645, 151643)
    assert generation_eos_ids({"eos_token_id": 2}) == (2,)
    assert generation_eos_ids({}) == ()
