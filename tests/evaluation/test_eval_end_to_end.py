"""`python -m balcap_jax.evaluate` end to end with the scripted judge, and resume after kill -9 mid-evaluation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from balcap_jax import default_config
from balcap_jax.evaluation.driver import EvalOptions, headline, run_evaluation
from tests.evaluation.eval_fixtures import make_benchmarks

ROOT = Path(__file__).resolve().parents[2]
JUDGED = ("dcscore", "captionqa", "caparena")


def _options(files, output, **overrides):
    fields = dict(config=default_config.get_config(), output=str(output), protocols=JUDGED, captions=files["captions"],
                  dcscore_data=files["dcscore"], captionqa_data=files["captionqa"], caparena_data=files["caparena"],
                  judge="scripted")  # fmt: skip
    return EvalOptions(**(fields | overrides))


def test_scripted_judges_end_to_end(tmp_path):
    files = make_benchmarks(tmp_path / "bench")
    payload = run_evaluation(_options(files, tmp_path / "out"))
    metrics = payload["metrics"]
    # DCScore, per image (image n has caption n % 3; even images decompose the reference into the facts {dog,
    # ball, grass}, odd ones give the oracle facts {dog, ball}):
    #   "A brown dog sits on grass. A purple dragon flies.": P 1/2 (the dragon is wrong); R 1/3 | 1/2
    #   "A brown dog sits. A ball is red. The sky seems peaceful.": P 1; R (2 + 1 novel) / (3 + 1) | (2+1)/(2+1)
    #   "A red ball.": matches the ball fact (every word of it longer than three letters): P 1; R 1/3 | 1/2
    precisions = [0.5, 1, 1, 0.5, 1, 1]
    recalls = [1 / 3, 1, 1 / 3, 1 / 2, 3 / 4, 1 / 2]
    assert metrics["dcscore"]["precision"] == pytest.approx(sum(precisions) / 6 * 100)
    assert metrics["dcscore"]["recall"] == pytest.approx(sum(recalls) / 6 * 100)
    assert metrics["dcscore"]["num_scored"] == 6
    # CaptionQA: colour (red in captions 2,3 -> 1; caption 1 has no colour word of the options... "brown" is not an
    # option -> cannot answer 1/3+0.05); animal: dog in captions 1,2 -> 1, caption 3 -> 1/2+0.05; rain: yes/no,
    # never answerable -> the scripted judge says "A", which is right when "no" is shown first
    items = payload["items"]["captionqa"]
    colour = [q["score"] for item in items for q in item["questions"][:1]]
    animal = [q["score"] for item in items for q in item["questions"][1:2]]
    assert colour == pytest.approx([1 / 3 + 0.05, 1, 1] * 2)
    assert animal == pytest.approx([1, 1, 0.55] * 2)
    every = [q["score"] for item in items for q in item["questions"]]
    assert metrics["captionqa"]["overall"] == pytest.approx(sum(every) / len(every) * 100)
    assert set(metrics["captionqa"]["per_domain"]) == {"natural", "document"}
    # CapArena, merit = correct - wrong sentences: captions 0, 3, 1 (by n % 3); baselines "short" 1, "wrong" -2
    per_baseline = metrics["caparena"]["per_baseline"]
    assert per_baseline["short"] == {"wins": 2, "losses": 2, "ties": 2, "unscored": 0, "score": 0.0}
    assert per_baseline["wrong"] == {"wins": 6, "losses": 0, "ties": 0, "unscored": 0, "score": 3.0}
    assert metrics["caparena"]["score"] == pytest.approx(1.5)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## dcscore" in summary and "| short | 0.00 | 2 | 2 | 2 | 0 |" in summary
    assert json.loads((tmp_path / "out" / "results.json").read_text())["metrics"] == metrics
    assert headline(payload).startswith("eval dcscore_f1=")
    # a second run reads everything back and judges nothing
    again = run_evaluation(_options(files, tmp_path / "out"))
    assert again["counts"]["dcscore"] == {"judged": 0, "resumed": 6, "retry_next_run": 0, "missing_captions": []}
    assert again["metrics"] == metrics


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_resume_after_kill_minus_nine_judges_only_unfinished_items_and_matches(tmp_path):
    files = make_benchmarks(tmp_path / "bench", num_images=8)
    reference = run_evaluation(_options(files, tmp_path / "uninterrupted"))
    output = tmp_path / "killed"
    command = [sys.executable, "-m", "balcap_jax.evaluate", f"--output={output}", f"--captions={files['captions']}",
               f"--protocols={','.join(JUDGED)}", "--judge=scripted", "--max_items_in_flight=1",
               *(f"--{p}_data={files[p]}" for p in JUDGED)]  # fmt: skip
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(command + ["--scripted_latency_s=0.2"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    store = output / "dcscore.items.jsonl"
    deadline = time.monotonic() + 120
    try:
        while _lines(store) < 2:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no DCScore item finished within 2 minutes"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = _lines(store)
    assert 2 <= finished < 8, f"kill came too late to test resuming ({finished} of 8 finished)"

    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.splitlines()[-1] == headline(reference)
    payload = json.loads((output / "results.json").read_text())
    counts = payload["counts"]["dcscore"]
    assert counts["resumed"] >= finished and counts["judged"] == 8 - counts["resumed"]
    keys = [json.loads(line)["key"] for line in store.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 8, "every item was judged exactly once across the two runs"
    assert payload["metrics"] == json.loads(json.dumps(reference["metrics"]))


def test_shapes_world_from_a_captions_file_scores_reference_captions_100(tmp_path):
    from balcap_jax.data import shapes_world as world
    from balcap_jax.evaluation import shapes_world_eval
    from balcap_jax.trainer.data_sources import prepare_data

    config = default_config.get_config()
    config.data.shapes_world.num_train = 2
    config.data.shapes_world.num_eval = 3
    config.data.records_dir = str(tmp_path / "data")
    _, validation = prepare_data(config, tmp_path)
    items = shapes_world_eval.items_from_source(validation)
    scene = {item.image_id: world.SceneGraph.from_dict(item.scene_graph) for item in items}
    # the first reference of each validation image, regenerated from its scene graph
    captions = {i: world.reference_captions(scene[i], np.random.default_rng(0))[0] for i in scene}
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in captions.items()))
    payload = run_evaluation(EvalOptions(config=config, output=str(tmp_path / "out"), protocols=("shapes_world",),
                                         captions=str(path)))  # fmt: skip
    metrics = payload["metrics"]["shapes_world"]
    assert metrics["num_items"] == 3
    assert metrics["precision"] == metrics["recall"] == metrics["linguistic"] == metrics["qa"] == 100.0


def test_bad_options_fail_with_the_flag_to_fix(tmp_path):
    files = make_benchmarks(tmp_path / "bench", num_images=1)
    with pytest.raises(ValueError, match="--dcscore_data"):
        _options(files, tmp_path / "o", dcscore_data="")
    with pytest.raises(ValueError, match="exactly one of --checkpoint"):
        _options(files, tmp_path / "o", checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="names a protocol twice"):
        _options(files, tmp_path / "o", protocols=("dcscore", "dcscore"))
