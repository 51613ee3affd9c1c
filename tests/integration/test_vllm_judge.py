"""Our judges against a real vLLM server (CPU, SmolLM2-135M-Instruct, text-only) on 127.0.0.1.

- the scoring CLI on captions of real photographs: the text components are scored; precision, whose claims
  are checked against the image, is unscorable (the server refuses images for a text-only model) and counted;
- a short embedded-default run (ShapesWorld policy) whose text components come from the server;
- an outage: the server is killed after one RL step and restarted two steps later; the run neither crashes nor
  trains on fabricated zeros (every reward of the outage steps is NaN, counted, with zero advantages) and is
  scored again once the server is back.

Slow on 2 CPU cores (vLLM generates a few dozen tokens/s there): bounded timeouts, few captions, few steps.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

pytest.importorskip("skimage")

from balcap_jax import default_config, metrics  # noqa: E402
from balcap_jax.rewards import score  # noqa: E402
from balcap_jax.trainer.loop import run  # noqa: E402
from tests.trainer import real_path  # noqa: E402

pytestmark = [pytest.mark.real_server, pytest.mark.slow]

TEXT_COMPONENTS = ("recall", "linguistic")
CAPTIONS = {
    "astronaut": "A woman in a white space suit smiles in front of an American flag.",
    "coffee": "A cup of coffee on a saucer sits on a wooden table.",
    "chelsea": "An orange tabby cat looks to the left.",
}


def test_scoring_cli_on_photographs_scores_text_and_counts_the_visual_component(live_vllm, tmp_path, capsys):
    train, _ = real_path.photo_manifests(tmp_path, num_train=len(CAPTIONS), num_eval=0)
    rows = [json.loads(line) for line in open(train)]
    source = tmp_path / "captions.jsonl"
    source.write_text("".join(json.dumps(row | {"caption": CAPTIONS[row["id"].split("_", 1)[1]]}) + "\n"
                              for row in rows))  # fmt: skip
    out = tmp_path / "scored.jsonl"
    argv = ["--judge-url", live_vllm.base_url, "--judge-model", live_vllm.options.served_name,
            "--vlm-judge-url", live_vllm.base_url, "--vlm-judge-model", live_vllm.options.served_name,
            "--input", str(source), "--output", str(out), "--max-concurrency", "8", "--timeout", "300",
            "--max-attempts", "2", "--backoff", "0.1"]  # fmt: skip
    assert score.main(argv) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    print(f"\nvLLM scoring CLI: {summary}")
    assert len(scored) == len(CAPTIONS)
    # Images to a text-only model: refused (HTTP 400), so precision is unscorable and counted, never 0.
    assert all(row["rewards"]["precision"] is None and row["errors"]["precision"] >= 1 for row in scored)
    assert f"precision mean=n/a unscorable={len(CAPTIONS)}" in summary
    for name in TEXT_COMPONENTS:
        values = [row["rewards"][name] for row in scored]
        assert all(v is None or 0.0 <= v <= 1.0 for v in values), (name, values)
        assert any(v is not None for v in values), f"{name}: no caption scored by the real server: {scored}"
        assert sum(v is None for v in values) == int(summary.split(f"{name} mean=")[1].split("unscorable=")[1].split()[0])


def server_config(base_url: str, served: str, data_dir: str, *, rl_steps: int):
    """The embedded default at toy size (1 prompt x 2 captions of 8 tokens), judged by the real server."""
    config = default_config.get_config()
    config.data.records_dir = data_dir
    config.data.shapes_world.update(num_train=8, num_eval=2)
    config.data.prompts_per_batch = 1
    config.sampling.update(group_size=2, max_new_tokens=8)
    config.train.update(sft_steps=1, sft_batch_size=2, rl_steps=rl_steps)
    config.checkpoint.update(every_steps=100, export_hf=False)
    config.metrics.update(log_every=1, sample_every=1)
    config.eval.update(max_images=1, batch_size=1)
    config.rewards.judge.update(backend="openai", llm_url=base_url, llm_model=served, vlm_url=base_url,
                                vlm_model=served, max_concurrency=8, timeout_s=300.0, max_retries=1)  # fmt: skip
    return config


def step_rows(workdir) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        merged.setdefault(row["step"], {}).update(row)
    return merged


def scored_count(row: dict, name: str, samples: int) -> int:
    return samples - int(row[f"reward/{name}/nan_count"])


def test_a_short_default_run_takes_its_text_rewards_from_the_server(live_vllm, tmp_path):
    config = server_config(live_vllm.base_url, live_vllm.options.served_name, str(tmp_path / "data"), rl_steps=2)
    summary = run(config, tmp_path / "run", echo=lambda *_: None, devices=jax.devices()[:1])
    assert summary.final_step == 3 and not summary.stopped_early
    rows = step_rows(tmp_path / "run")
    rl = [rows[s] for s in (2, 3)]
    assert all(r["reward/precision/nan_count"] == 2 for r in rl)  # text-only server: every image claim unscorable
    assert sum(r["reward/linguistic/judge_calls"] for r in rl) >= 4  # the real server was asked
    assert sum(scored_count(r, n, 2) for r in rl for n in TEXT_COMPONENTS) >= 1, rl


def test_outage_mid_run_is_unscorable_not_zero_and_recovers(live_vllm, tmp_path, monkeypatch):
    sft, outage, back = 1, (3, 4), 5  # server killed after step 2, restarted after step 4 (steps are 1-based)
    events: list[tuple[int, str]] = []
    original = metrics.MetricsWriter.write_scalars

    def write_and_act(writer, step, scalars):
        original(writer, step, scalars)
        if not any(k.startswith("reward/") for k in scalars):  # SFT and evaluation rows
            return
        if step == outage[0] - 1:
            live_vllm.stop()
            events.append((step, "stopped"))
        elif step == outage[-1]:
            live_vllm.start()
            events.append((step, "restarted"))

    monkeypatch.setattr(metrics.MetricsWriter, "write_scalars", write_and_act)
    config = server_config(live_vllm.base_url, live_vllm.options.served_name, str(tmp_path / "data"), rl_steps=5)
    # Random weights: the shipped warm start writes the same 8 tokens at every step, so the workdir's response
    # cache would (rightly) score them through the outage and there would be no outage to see.
    config.train.init_from = ""
    summary = run(config, tmp_path / "run", echo=lambda *_: None, devices=jax.devices()[:1])
    assert summary.final_step == sft + 5 and events == [(2, "stopped"), (4, "restarted")]
    rows = step_rows(tmp_path / "run")
    samples = 2
    for step in outage:
        row = rows[step]
        for name in ("precision", *TEXT_COMPONENTS):
            assert row[f"reward/{name}/nan_count"] == samples, (step, name)  # unscorable, counted
            assert row[f"reward/{name}/errors"] >= 1 or row[f"reward/{name}/judge_calls"] == 0, (step, name)
            mean = row.get(f"reward/{name}/mean")  # NaN is written as null
            assert mean is None or math.isnan(mean), (step, name, mean)  # no fabricated 0 among the scores
        assert row["advantages_min"] == row["advantages_max"] == 0.0, step  # nothing to learn from, nothing learnt
    logged = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    for sample in (s for s in logged if s["step"] in outage):
        assert all(v is None or (isinstance(v, float) and math.isnan(v)) for v in sample["rewards"].values()), sample
    recovered = [s for s in range(back, sft + 6) if sum(scored_count(rows[s], n, samples) for n in TEXT_COMPONENTS)]
    assert recovered, {s: {k: v for k, v in rows[s].items() if "nan_count" in k} for s in range(back, sft + 6)}
    unscorable = int(sum(rows[s][f"reward/{n}/nan_count"] for s in outage for n in TEXT_COMPONENTS))
    errors = int(sum(rows[s][f"reward/{n}/errors"] for s in outage for n in TEXT_COMPONENTS))
    print(f"\noutage: steps {outage} unscorable text rewards {unscorable}/{2 * samples * len(outage)}, failed judge "
          f"calls {errors}; server restarted in {live_vllm.starts[-1]:.0f} s; recovered at steps {recovered}")
    losses = [v for s in range(sft + 1, sft + 6) for k, v in rows[s].items() if k.startswith("loss/")]
    assert losses and np.isfinite(losses).all()  # the update ran on every step, outage included
