"""Builds the shipped warm start: the default recipe's SFT phase only, saved for `config.train.init_from`.

  python -m experiments.build_warm_start --out=balcap_jax/assets/shapes_world_warm_start --sft_steps=4000 --seed=0

Runs `trainer.loop.run` on the embedded default (balcap_jax/default_config.py) with `train.sft_steps=N`,
`train.rl_steps=0` and `train.init_from=''` (always from random weights, so a rebuild never depends on an older
asset), then writes `<out>.npz` + `<out>.json` (trainer/warm_start.py). The JSON records the command, seed, steps,
git commit (and whether the tree had uncommitted changes), the architecture and the held-out rewards of the
warm start's greedy captions. On one machine the same command, seed and commit rebuild the same file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> tuple[str, bool]:
    """(HEAD commit, whether the work tree differs from it); ('unknown', True) outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return head.stdout.strip(), bool(dirty.stdout.strip())


def warm_start_config(sft_steps: int, seed: int) -> Any:
    """The default recipe with only its SFT phase, from random weights."""
    from balcap_jax import default_config

    if sft_steps < 1:
        raise ValueError(f"--sft_steps={sft_steps}: a warm start needs at least one SFT step")
    config = default_config.get_config()
    config.seed = seed
    config.train.sft_steps = sft_steps
    config.train.rl_steps = 0
    config.train.init_from = ""
    config.checkpoint.every_steps = sft_steps
    config.checkpoint.export_hf = True
    config.metrics.log_every = 250
    return config


def build(out: str, sft_steps: int, seed: int, workdir: str, command: str) -> dict[str, Any]:
    """Runs the SFT phase in `workdir` and saves the warm start at `out` (a stem); returns its metadata."""
    from flax import nnx

    from balcap_jax import config as config_lib
    from balcap_jax.models.qwen2_5_vl.params import load_qwen2_5_vl
    from balcap_jax.trainer import warm_start
    from balcap_jax.trainer.data_sources import corpus_texts, prepare_data
    from balcap_jax.trainer.loop import run
    from balcap_jax.trainer.policy import build_policy

    config = warm_start_config(sft_steps, seed)
    config_lib.validate(config)
    commit, dirty = git_commit()
    started = time.perf_counter()
    summary = run(config, workdir)
    wall = time.perf_counter() - started
    # The run's export is the SFT'd model; it is read back into the policy exactly as `run` builds it.
    train_source, _ = prepare_data(config, Path(workdir))
    policy = build_policy(config, corpus=corpus_texts(train_source), seed=seed)
    model = load_qwen2_5_vl(summary.export_dir, config=policy.model_config)
    _, state = nnx.split(model)
    metadata = {
        "command": command,
        "seed": seed,
        "sft_steps": sft_steps,
        "git_commit": commit,
        "git_dirty": dirty,
        "architecture": dict(config.model.tiny),
        "model_name": str(config.model.name),
        "shapes_world": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.data.shapes_world.items()},
        "sft_lr": float(config.train.sft_lr),
        "sft_batch_size": int(config.train.sft_batch_size),
        "held_out_greedy": summary.eval_end,
        "build_wall_s": round(wall, 1),
    }
    npz, meta = warm_start.save(out, state, policy.vocab, metadata)
    print(f"warm start written: {npz} ({npz.stat().st_size / 1e6:.2f} MB) and {meta}")
    print("held-out greedy rewards of the warm start: "
          + " ".join(f"{k}={v:.4f}" for k, v in summary.eval_end.items()))
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output stem: writes <out>.npz and <out>.json")
    parser.add_argument("--sft_steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="run directory; default: a new temp dir")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="balcap_warm_start_")
    command = ("python -m experiments.build_warm_start "
               f"--out={args.out} --sft_steps={args.sft_steps} --seed={args.seed}")
    build(args.out, args.sft_steps, args.seed, workdir, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
