"""The tfds builder: manifest -> array_record without TensorFlow, bad lines counted, records round-trip; and
ShapesWorld manifests through the same builder."""

import importlib.util
import io
import json
import sys

import pytest
from PIL import Image

from balcap_jax.data import manifest as M
from balcap_jax.data import shapes_world as W
from balcap_jax.data.records import CaptionExample, decode_record
from balcap_jax.data.shapes_world_records import prepare_shapes_world, write_shapes_world_manifests
from balcap_jax.data.tfds_builder import ManifestCaptions, open_split, prepare_manifest_dataset


def jpeg(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    (root / "pic.jpg").write_bytes(jpeg((0, 200, 0)))
    lines = [
        M.write_manifest_line("a", ["A red box."], image_bytes=jpeg((200, 0, 0)),
                              questions=[{"question": "Colour?", "choices": ["red", "green"], "answer": 0}],
                              metadata={"source": "test", "ü": "ünïcode"}),
        M.write_manifest_line("b", ["A green box.", "Green."], image_path="pic.jpg"),
        M.write_manifest_line("c", ["Missing."], image_path="missing.jpg"),
        M.write_manifest_line("d", [""], image_path="pic.jpg"),
        json.dumps({"id": "e", "image_base64": "aGVsbG8=", "references": ["Corrupt."]}),
    ]
    train = root / "train.jsonl"
    train.write_bytes("\n".join(lines).encode() + b"\n\xc3\x28 not utf8\n")
    val = root / "val.jsonl"
    val.write_text(M.write_manifest_line("v", ["Val."], image_path="pic.jpg") + "\n")
    data_dir = str(root / "tfds")
    builder = prepare_manifest_dataset(data_dir, "toy", {"train": str(train), "validation": str(val)})
    return builder, data_dir


def test_builds_without_tensorflow(built):
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules
    builder, _ = built
    assert builder.info.splits["train"].num_examples == 2
    assert builder.info.splits["validation"].num_examples == 1
    assert any(f.endswith(".array_record-00000-of-00001") for f in builder.info.splits["train"].filenames)


def test_bad_lines_are_counted_by_reason_and_reported(built):
    builder, _ = built
    assert dict(builder.skip_tally.counts) == {
        "missing_image": 1, "empty_references": 1, "corrupt_image": 1, "non_utf8_line": 1}
    report = json.loads((builder.data_path / "skipped_records.json").read_text())
    assert report["counts"]["missing_image"] == 1
    assert {r[0] for r in report["records"]} == {"train.jsonl:3", "train.jsonl:4", "train.jsonl:5", "train.jsonl:6"}


def test_records_round_trip(built):
    _, data_dir = built
    source = open_split(data_dir, "toy", "train")
    records = {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}
    assert set(records) == {"a", "b"}
    a = decode_record(records["a"])
    assert isinstance(a, CaptionExample)
    assert a.image_bytes == jpeg((200, 0, 0)) and a.image.size == (24, 16)
    assert a.references == ("A red box.",) and a.metadata == {"source": "test", "ü": "ünïcode"}
    assert a.questions == ({"question": "Colour?", "choices": ["red", "green"], "answer": 0},)
    assert (int(records["a"]["width"]), int(records["a"]["height"])) == (24, 16)
    assert decode_record(records["b"]).references == ("A green box.", "Green.")


def test_open_split_and_builder_errors(tmp_path):
    with pytest.raises(ValueError, match="no prepared dataset"):
        open_split(str(tmp_path), "nothing", "train")
    with pytest.raises(ValueError, match="manifests"):
        ManifestCaptions(name="x", manifests={"train": str(tmp_path / "absent.jsonl")}, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="at least one split"):
        ManifestCaptions(name="x", manifests={}, data_dir=str(tmp_path))
    for bad_name in ("", "a/b", "a b", "../up"):
        with pytest.raises(ValueError, match="ManifestCaptions.name"):
            ManifestCaptions(name=bad_name, manifests={"train": __file__}, data_dir=str(tmp_path))


def test_shapes_world_dataset_keeps_scene_graphs_and_questions(tmp_path):
    paths = write_shapes_world_manifests(str(tmp_path / "m"), seed=3, split_sizes={"train": 6, "validation": 2})
    prepare_manifest_dataset(str(tmp_path / "tfds"), "shapes", paths)
    train = open_split(str(tmp_path / "tfds"), "shapes", "train")
    validation = open_split(str(tmp_path / "tfds"), "shapes", "validation")
    examples = [decode_record(train[i]) for i in range(len(train))]
    assert sorted(e.example_id for e in examples) == [f"shapes-3-{i:07d}" for i in range(6)]
    assert sorted(decode_record(validation[i]).example_id for i in range(2)) == ["shapes-3-0000006",
                                                                               "shapes-3-0000007"]
    for example in examples:
        original = W.generate_example(3, int(example.example_id.rsplit("-", 1)[1]))
        assert example.image_bytes == W.encode_png(original.image)
        assert W.SceneGraph.from_dict(example.metadata["scene_graph"]) == original.scene
        assert example.references == original.references
        assert list(example.questions) == [dict(q) for q in original.questions]
    with pytest.raises(ValueError, match="split_sizes"):
        write_shapes_world_manifests(str(tmp_path / "m2"), seed=0, split_sizes={"train": 0})


def test_prepare_shapes_world_names_worlds_by_their_spec_and_reuses_them(tmp_path):
    small = W.WorldConfig(max_objects=2)
    name = prepare_shapes_world(str(tmp_path), seed=0, split_sizes={"train": 4}, config=small)
    manifest = tmp_path / "manifests" / name / "train.jsonl"
    stamp = manifest.stat().st_mtime_ns
    assert prepare_shapes_world(str(tmp_path), seed=0, split_sizes={"train": 4}, config=small) == name
    assert manifest.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert prepare_shapes_world(str(tmp_path), seed=1, split_sizes={"train": 4}, config=small) != name
    assert prepare_shapes_world(str(tmp_path), seed=0, split_sizes={"train": 4}) != name
    assert len(open_split(str(tmp_path), name, "train")) == 4


def test_a_changed_manifest_is_rebuilt_and_an_unchanged_one_reused(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(M.write_manifest_line("a", ["A."], image_bytes=jpeg((1, 2, 3))) + "\n")
    data_dir = str(tmp_path / "tfds")
    prepare_manifest_dataset(data_dir, "grow", {"train": str(manifest)})
    info = tmp_path / "tfds" / "manifest_captions" / "grow" / "1.0.0" / "dataset_info.json"
    stamp = info.stat().st_mtime_ns
    prepare_manifest_dataset(data_dir, "grow", {"train": str(manifest)})
    assert info.stat().st_mtime_ns == stamp  # reused
    with manifest.open("a") as f:
        f.write(M.write_manifest_line("b", ["B."], image_bytes=jpeg((4, 5, 6))) + "\n")
    prepare_manifest_dataset(data_dir, "grow", {"train": str(manifest)})
    assert len(open_split(data_dir, "grow", "train")) == 2
