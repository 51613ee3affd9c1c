"""Step wall-clock of the production training loop with train.overlap="none" against "one_step_off", judged by
a loopback OpenAI-compatible server whose latency roughly equals one step's sampling + update.

Both sides run `balcap_jax.trainer.loop.run` on the embedded default at a small size (same seed, same data
batches, the same number of captions judged per step, each run with its own judge cache so nothing is served
from another run's replies), interleaved none, one_step_off, none, ... The first RL step of every run (compiles,
the evaluation before RL) is left out; the step time is the loop's `time/step_wall_s` (the whole step, host work
included). The judge latency is calibrated first: a short "none" run measures the judges' wall time per step and
sampling + update per step at a probe latency, and the per-request latency is scaled so the two match.

    python experiments/bench_overlap.py                    # calibrate, then 1 interleaved pair of 11-step runs
    python experiments/bench_overlap.py --pairs=2 --latency-s=0.5

The last line is `wall_ratio=<one_step_off / none>` (ratio of the medians of all timed steps of each mode).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import jax  # noqa: E402

from balcap_jax import default_config  # noqa: E402
from balcap_jax.trainer.loop import run  # noqa: E402
from tests.rewards.rewards_fake_server import ServerSpec, serve_in_subprocess  # noqa: E402

MODES = ("none", "one_step_off")
PROBE_LATENCY_S = 0.2


def bench_config(mode: str, url: str, *, rl_steps: int, data_dir: str):
    """The embedded default, small: no SFT, no periodic evaluation or checkpoint, HTTP judges at `url`."""
    c = default_config.get_config()
    c.data.records_dir = data_dir
    c.data.shapes_world.num_train, c.data.shapes_world.num_eval = 64, 8
    c.data.prompts_per_batch, c.sampling.group_size = 2, 4
    c.train.sft_steps, c.train.rl_steps = 0, rl_steps
    c.train.overlap = mode
    c.checkpoint.every_steps, c.checkpoint.export_hf = 0, False
    c.metrics.sample_every = 0
    c.eval.max_images = 8
    c.rewards.judge.backend = "openai"
    c.rewards.judge.llm_url, c.rewards.judge.llm_model = url, "fake-llm"
    c.rewards.judge.vlm_url, c.rewards.judge.vlm_model = url, "fake-vlm"
    return c


def step_rows(workdir: Path) -> list[dict]:
    """metrics.jsonl rows of the RL steps after the first (the evaluation rows merged away)."""
    rows: dict[int, dict] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return [rows[s] for s in sorted(rows) if "time/step_wall_s" in rows[s]][1:]  # step 0: eval_start only


def run_mode(mode: str, url: str, *, rl_steps: int, data_dir: str, workdir: Path) -> list[dict]:
    config = bench_config(mode, url, rl_steps=rl_steps, data_dir=data_dir)
    run(config, workdir, echo=lambda *_: None, devices=jax.devices()[:1])
    return step_rows(workdir)


def calibrated_latency(rows: Sequence[dict], probe_s: float) -> float:
    """Per-request latency that makes the judges' wall time per step equal sampling + update per step, from a
    "none" run at `probe_s` (the judges' time there is the "reward" phase: the step waits on nothing else)."""
    judge = statistics.median(r["time/reward_s"] for r in rows)
    work = statistics.median(r.get("time/sample_s", 0.0) + r.get("time/old_logprobs_s", 0.0) + r["time/update_s"]
                             for r in rows)
    if judge <= 0:
        raise ValueError(f"the probe run's judges took {judge} s per step; check the judge server at probe_s={probe_s}")
    return probe_s * work / judge


@contextlib.contextmanager
def judge_server(latency_s: float):
    with serve_in_subprocess(ServerSpec(latency_s=latency_s)) as url:
        yield url


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=11, help="RL steps per run (the first is not timed)")
    parser.add_argument("--pairs", type=int, default=1, help="interleaved (none, one_step_off) pairs")
    parser.add_argument("--latency-s", type=float, default=0.0, help="judge latency per request; 0 = calibrate")
    parser.add_argument("--workdir", default="", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.pairs < 1:
        parser.error("--steps must be >= 2 (the first step is not timed) and --pairs >= 1")
    base = Path(args.workdir or tempfile.mkdtemp(prefix="bench_overlap_"))
    data_dir = str(base / "data")
    # Later runs reuse the first one's compiled programs, as a resumed training run does.
    jax.config.update("jax_compilation_cache_dir", str(base / "compile_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    latency = args.latency_s
    if latency <= 0:
        with judge_server(PROBE_LATENCY_S) as url:
            probe = run_mode("none", url, rl_steps=4, data_dir=data_dir, workdir=base / "calibrate")
        latency = calibrated_latency(probe, PROBE_LATENCY_S)
        print(f"calibrated judge latency: {latency:.3f} s per request", flush=True)

    walls: dict[str, list[float]] = {m: [] for m in MODES}
    calls: dict[str, list[float]] = {m: [] for m in MODES}
    with judge_server(latency) as url:
        for pair in range(args.pairs):
            for mode in MODES:
                rows = run_mode(mode, url, rl_steps=args.steps, data_dir=data_dir, workdir=base / f"{mode}_{pair}")
                walls[mode] += [r["time/step_wall_s"] for r in rows]
                calls[mode] += [sum(v for k, v in r.items() if k.endswith("/judge_calls")) for r in rows]
                print(f"pair {pair} {mode:>12}: median step {statistics.median(walls[mode][-len(rows):]):.3f} s "
                      f"over {len(rows)} steps, judge calls per step {statistics.median(calls[mode][-len(rows):])}",
                      flush=True)
    medians = {m: statistics.median(walls[m]) for m in MODES}
    result = {
        "latency_s": latency, "steps_timed": {m: len(walls[m]) for m in MODES}, "median_step_s": medians,
        "min_max_step_s": {m: [min(walls[m]), max(walls[m])] for m in MODES},
        "judge_calls_per_step": {m: statistics.median(calls[m]) for m in MODES},
        "wall_ratio": medians["one_step_off"] / medians["none"],
        "command": "python experiments/bench_overlap.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for mode in MODES:
        lo, hi = result["min_max_step_s"][mode]
        print(f"{mode:>12}: median {medians[mode]:.3f} s/step (min {lo:.3f}, max {hi:.3f})")
    print(f"wall_ratio={result['wall_ratio']:.3f}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
