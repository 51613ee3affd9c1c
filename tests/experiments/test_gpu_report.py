"""experiments/gpu_report.py: FLOP accounting by hand, device lookup, and the tiny CPU run of the same code."""

import json
import re

from experiments import bench_sampling, gpu_report


def test_update_flops_by_hand():
    shape = bench_sampling.DecodeShape(rows=4, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=3,
                                       vocab=100)
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate/up 2x8x16 + down 16x8 = 64+32+32+64+256+128 = 576
    assert sum(a * b for a, b in shape.layer_matmuls()) == 576
    assert shape.flops() == 2 * 4 * (3 * 576 + 8 * 100)
    dense, unembed, attention = 6 * 2 * 10 * 3 * 576, 6 * 2 * 5 * 8 * 100, 6 * 2 * 3 * 2 * 10**2 * 2 * 4
    assert gpu_report.update_flops(shape, rows=2, length=10, completion=5) == dense + unembed + attention


def test_known_gpus_have_datasheet_figures():
    assert gpu_report.device_spec("NVIDIA H200") == (989e12, 4.8e12)
    assert gpu_report.device_spec("NVIDIA H100 80GB HBM3")[1] == 3.35e12
    assert gpu_report.device_spec("cpu") is None


def test_tiny_report_writes_a_table_and_prints_both_fractions(tmp_path, capsys):
    assert gpu_report.main(["--tiny", "--out-dir", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"decode_hbm_fraction=\d+\.\d+ update_mfu=\d+\.\d+", last), last
    result = json.loads((tmp_path / "gpu_report_tiny.json").read_text())
    assert result["decode_ms_per_step"]["count"] == 2 and result["update_s"]["count"] == 2
    assert 0 < result["update_mfu"]["median"] < 1
    assert result["kv_bytes"] == 2 * 2 * 4 * result["cache_slots"] * 2 * 16 * 4  # K+V, L, rows, slots, H_kv, Dh, fp32
    markdown = (tmp_path / "gpu_report_tiny.md").read_text()
    assert "| decode |" in markdown and "| RL update |" in markdown and "MFU" in markdown
