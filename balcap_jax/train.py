"""Entry point: `python -m balcap_jax.train [--config=configs/<name>.py] [--workdir=DIR] [--config.x.y=...]`.

With no --config it runs the embedded default (configs/tiny.py: a small Qwen2.5-VL-architecture policy learning
ShapesWorld captions on CPU). Re-running with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Recipe file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, exports). Default: a new temp dir.")


def main(argv) -> int:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # tfds/orbax INFO lines would drown the progress output
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    from balcap_jax import config as config_lib
    from balcap_jax.trainer.loop import run

    config = flags.FLAGS.config
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return 2
    workdir = flags.FLAGS.workdir or tempfile.mkdtemp(prefix="balcap_")
    print(f"workdir: {workdir}", flush=True)
    summary = run(config, workdir)
    if summary.stopped_early:
        print(f"stopped at step {summary.final_step}; re-run with --workdir={workdir} to resume")
        return 0
    print("reward means on the held-out split (greedy captions):")
    for name in summary.eval_end:
        print(f"  {name:<11} start={summary.eval_start.get(name, float('nan')):.4f} end={summary.eval_end[name]:.4f}")
    if summary.export_dir:
        print(f"exported HF safetensors to {summary.export_dir}")
    gain = summary.gain()
    parts = [f"total={gain.get('total', float('nan')):.4f}"] + [
        f"{k}={v:.4f}" for k, v in gain.items() if k != "total"
    ]
    print("reward_gain " + " ".join(parts))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
