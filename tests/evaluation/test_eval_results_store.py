"""The append-only per-item results store: round trip, resume, and recovery from a write cut by a kill."""

import json

from balcap_jax.evaluation.results_store import ResultsStore, item_key


def test_put_get_and_resume(tmp_path):
    path = tmp_path / "p.items.jsonl"
    with ResultsStore(path) as store:
        store.put("k1", "a", {"score": 1.0, "tags": ("x",)})
        assert store.get("k1") == {"score": 1.0, "tags": ["x"]} and "k2" not in store
    with ResultsStore(path) as store:
        assert store.resumed == 1 and store.get("k1")["score"] == 1.0
        store.put("k2", "b", {"score": float("nan")})
    with ResultsStore(path) as store:
        assert len(store) == 2 and store.get("k2")["score"] != store.get("k2")["score"]  # NaN survives


def test_a_line_cut_by_a_kill_is_dropped_and_truncated(tmp_path):
    path = tmp_path / "p.items.jsonl"
    good = json.dumps({"key": "k1", "item_id": "a", "result": {"v": 1}}) + "\n"
    path.write_text(good + '{"key": "k2", "item_id": "b", "res')
    with ResultsStore(path) as store:
        assert store.resumed == 1 and "k2" not in store
        store.put("k3", "c", {"v": 3})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["k1", "k3"]


def test_item_key_depends_on_every_field_and_not_on_order():
    assert item_key(a=1, b="x") == item_key(b="x", a=1)
    assert item_key(a=1, b="x") != item_key(a=1, b="y")
