"""`python -m balcap_jax.rewards.score` end to end against the loopback server: output rows, nulls for
unscorable items, the summary line, exit codes, the response cache across runs."""

import json
import os
import subprocess
import sys

import pytest

from balcap_jax.rewards import score
from tests.rewards.conftest import png_bytes
from tests.rewards.rewards_fake_server import ServerSpec

ROWS = [
    {"image": "red.png", "reference": "A red ball lies on the floor. A wooden box stands behind.",
     "caption": "A red ball lies on the floor. A purple dragon sits in the box."},
    {"image": "red.png", "reference": "A red ball lies on the floor. A wooden box stands behind.", "caption": ""},
    {"image": "red.png", "references": ["A red ball.", "A wooden box stands behind it."],
     "caption": "A wooden box stands behind a red ball.", "image_id": "red-2"},
]  # fmt: skip


def write_input(tmp_path, rows=ROWS):
    (tmp_path / "red.png").write_bytes(png_bytes())
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_scores_every_row_and_caches_across_runs(fake_server, tmp_path, capsys):
    server = fake_server()
    source = write_input(tmp_path)
    out = tmp_path / "scored.jsonl"
    argv = ["--judge-url", server.base_url, "--judge-model", "judge-m", "--input", str(source),
            "--output", str(out), "--cache", str(tmp_path / "cache.sqlite")]  # fmt: skip
    assert score.main(argv) == 0
    rows = read_output(out)
    assert [r["caption"] for r in rows] == [r["caption"] for r in ROWS]
    first, empty, third = rows
    assert first["rewards"] == {"precision": 0.5, "recall": 0.5, "linguistic": pytest.approx((24 / 3 - 1) / 9)}
    assert empty["rewards"] == {"precision": 0.0, "recall": 0.0, "linguistic": 0.0}
    assert third["rewards"]["recall"] == 1.0
    assert first["errors"] == {"precision": 0, "recall": 0, "linguistic": 0}
    assert [c["credited"] for c in first["records"]["precision"]["claims"]] == [True, False]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("scored 3 captions in ") and "precision mean=0.5000 unscorable=0 errors=0" in summary
    requests = server.http_requests
    assert score.main(argv) == 0  # same inputs again: every judge call is a cache hit
    again = read_output(out)
    assert server.http_requests == requests and [r["rewards"] for r in again] == [r["rewards"] for r in rows]
    assert again[0]["records"]["precision"]["cache_hits"] == again[0]["records"]["precision"]["judge_calls"] == 2


def test_cli_exits_zero_with_nulls_when_the_judge_is_down(fake_server, tmp_path, capsys):
    server = fake_server(ServerSpec(forced_fault="http_500"))
    out = tmp_path / "scored.jsonl"
    code = score.main(["--judge-url", server.base_url, "--judge-model", "m", "--input", str(write_input(tmp_path)),
                       "--output", str(out), "--max-attempts", "2", "--backoff", "0.01",
                       "--components", "linguistic,recall"])  # fmt: skip
    assert code == 0
    first, empty, _ = read_output(out)
    assert first["rewards"] == {"linguistic": None, "recall": None} and first["errors"]["linguistic"] == 1
    assert empty["rewards"]["linguistic"] == 0.0  # an empty caption needs no judge
    summary = capsys.readouterr().out
    assert "linguistic mean=0.0000 unscorable=2 errors=2" in summary and "recall mean=n/a unscorable=3" in summary


def test_cli_rejects_bad_input_naming_the_line(tmp_path, capsys):
    source = write_input(tmp_path, ROWS[:1] + [{"image": "red.png", "reference": "r"}])
    argv = ["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--input", str(source),
            "--output", str(tmp_path / "o.jsonl")]  # fmt: skip
    assert score.main(argv) == 2
    assert "captions.jsonl:2: 'caption' must be a string" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        score.main(argv + ["--components", "precision,bleu"])
    with pytest.raises(SystemExit):
        score.main(argv + ["--vlm-judge-url", "http://127.0.0.1:9/v1"])
    with pytest.raises(SystemExit):
        score.main(argv + ["--judge-api", "completions"])
    assert "completions API cannot carry" in capsys.readouterr().err


def test_cli_runs_as_a_module_with_a_separate_vlm_judge(fake_server, tmp_path):
    text_server, vlm_server = fake_server(), fake_server()
    out = tmp_path / "scored.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "balcap_jax.rewards.score", "--judge-url", text_server.base_url, "--judge-model", "llm",
         "--vlm-judge-url", vlm_server.base_url, "--vlm-judge-model", "vlm", "--input", str(write_input(tmp_path)),
         "--output", str(out), "--components", "precision"],
        capture_output=True, text=True, timeout=60, cwd=os.getcwd(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("scored 3 captions")
    assert {b["model"] for b in vlm_server.bodies} == {"vlm"} and {b["model"] for b in text_server.bodies} == {"llm"}
    assert all(isinstance(m["content"], list) for b in vlm_server.bodies for m in b["messages"])  # image parts
    assert [r["rewards"]["precision"] for r in read_output(out)] == [0.5, 0.0, 1.0]
