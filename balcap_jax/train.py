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
    from balcap_jax.trainer import warm_start
    from balcap_jax.trainer.loop import run

    config = flags.FLAGS.config
    try:
        # Before anything touches a JAX backend: validation asks JAX for the device count.
        distributed = initialize_from_config(config)
    except ValueError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return 2
    try:
        config_lib.validate(config)
        warm_start.check_config(config)  # train.init_from: the file, and that it fits this model
    except (config_lib.ConfigError, ValueError) as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return 2
    if distributed and not flags.FLAGS.workdir:
        print("invalid config: a multi-process run needs --workdir (the same directory on every process)",
              file=sys.stderr)
        return 2
    workdir = flags.FLAGS.workdir or tempfile.mkdtemp(prefix="balcap_")
    import jax

    chief = jax.process_index() == 0
    cache = config.train.get("compile_cache_dir", "")
    if cache != "off":  # a restarted or resumed run loads its compiled programs instead of recompiling them
        jax.config.update("jax_compilation_cache_dir", cache or os.path.join(workdir, "compile_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if chief:
        print(f"workdir: {workdir}", flush=True)
    summary = run(config, workdir)
    if not chief:
        return 0
    if summary.stopped_early:
        print(f"stopped at step {summary.final_step}; re-run with --workdir={workdir} to resume")
        return 0
    if not summary.eval_on:
        print("no evaluation configured (set config.data.eval_manifest or config.data.eval_fraction)")
        if summary.export_dir:
            print(f"exported HF safetensors to {summary.export_dir}")
        return 0
    print(f"reward means on {summary.eval_on} (greedy captions):")
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


def initialize_from_config(config) -> bool:
    """`jax.distributed.initialize` from config.distributed (a no-op for one process); returns whether it ran.
    CPU processes talk through gloo (what the 127.0.0.1 tests use); GPU and TPU use their own collectives."""
    import jax

    from balcap_jax.parallel.mesh import DistributedConfig, initialize_distributed

    section = config.get("distributed", None)
    if section is None:
        return False
    settings = DistributedConfig.from_config(section)
    if not settings.wanted:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    return initialize_distributed(settings)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
