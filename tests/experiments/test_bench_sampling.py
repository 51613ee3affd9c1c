"""experiments/bench_sampling.py at tiny size: the interleaved race writes spreads and the roofline fraction."""

import json
import re

import pytest

from experiments import bench_sampling


def test_matmul_skeleton_runs_every_product_of_a_step():
    shape = bench_sampling.DecodeShape(rows=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=2,
                                       vocab=32)
    out = bench_sampling.matmul_skeleton(shape, "float32")()
    assert out.shape == () and float(out) != 0.0


def test_command_line_rejects_a_single_token():
    with pytest.raises(SystemExit, match="new-tokens"):
        bench_sampling.parse_args(["--new-tokens", "1"])


@pytest.mark.slow
def test_tiny_interleaved_race(tmp_path, capsys):
    argv = ["--preset", "tiny", "--prompts", "1", "--group", "2", "--new-tokens", "4", "--runs", "2", "--warmup",
            "1", "--max-pixels", str(112 * 112), "--out-dir", str(tmp_path)]  # fmt: skip
    assert bench_sampling.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup_vs_hf=\d+\.\d+ roofline_fraction=\d+\.\d+ ceiling_vs_hf=\d+\.\d+", last), last
    r = json.loads((tmp_path / "bench_sampling.json").read_text())
    assert r["order"] == ["ours", "hf", "ours_stages", "matmul_skeleton"]
    assert all(len(v) == 2 for v in r["seconds"].values())  # warm-up round discarded on every side
    ratios = [h / o for h, o in zip(r["seconds"]["hf"], r["seconds"]["ours"])]
    assert r["speedup_vs_hf"]["low"] == pytest.approx(min(ratios))
    assert 0 < r["roofline"]["fraction"]["median"]
    floor = 3 * min(r["seconds"]["matmul_skeleton"])  # 4 new tokens: 3 decode steps
    assert r["ceiling"]["ceiling_vs_hf"] == pytest.approx(r["hf"]["seconds"]["median"] / floor)
    assert "speedup_vs_hf" in (tmp_path / "bench_sampling.md").read_text()
