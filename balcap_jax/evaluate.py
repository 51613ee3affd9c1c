"""Entry point: caption a split with a checkpoint and score it with DCScore-, CaptionQA-, CapArena-style and
ShapesWorld metrics.

  python -m balcap_jax.evaluate --config=configs/tiny.py --checkpoint=/runs/tiny --output=/evals/tiny \
      --protocols=shapes_world
  python -m balcap_jax.evaluate --checkpoint=/models/Qwen2.5-VL-7B-Instruct --output=/evals/qwen7b \
      --protocols=dcscore,captionqa,caparena --dcscore_data=decapbench.jsonl --captionqa_data=captionqa.jsonl \
      --caparena_data=caparena.jsonl --config.rewards.judge.backend=openai \
      --config.rewards.judge.llm_url=http://judge:8000/v1 --config.rewards.judge.llm_model=Qwen/Qwen2.5-72B-Instruct \
      --config.rewards.judge.vlm_url=http://vlm:8000/v1 --config.rewards.judge.vlm_model=Qwen/Qwen2.5-VL-72B-Instruct

--checkpoint is a training workdir (its latest checkpoint's parameters, policy rebuilt from its saved config) or
a local HF model directory; --captions=FILE (JSONL {"image_id", "caption"}) scores existing captions instead.
Benchmark file formats: balcap_jax/evaluation/{dcscore,captionqa,caparena}.py. Re-running with the same
--output resumes: finished captions and judged items are read back, never redone. Writes results.json and
summary.md into --output; the last line printed is "eval <protocol>_<metric>=<value> ...".
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Recipe file with get_config().", lock_config=True)
flags.DEFINE_string("checkpoint", "", "Training workdir or local HF model directory to caption with.")
flags.DEFINE_string("captions", "", "JSONL of existing captions {image_id, caption} (instead of --checkpoint).")
flags.DEFINE_string("output", None, "Output directory (results, caches, report).", required=True)
flags.DEFINE_list("protocols", ["shapes_world"], "Any of dcscore, captionqa, caparena, shapes_world.")
flags.DEFINE_enum("split", "validation", ["validation", "train"], "ShapesWorld split to caption and score.")
flags.DEFINE_string("dcscore_data", "", "DeCapBench-format JSONL (see balcap_jax/evaluation/dcscore.py).")
flags.DEFINE_string("captionqa_data", "", "CaptionQA-format JSONL (see balcap_jax/evaluation/captionqa.py).")
flags.DEFINE_string("caparena_data", "", "CapArena-format JSONL (see balcap_jax/evaluation/caparena.py).")
flags.DEFINE_enum("judge", "config", ["config", "openai", "scripted"],
                  "Judge backend: config.rewards.judge, or 'scripted' (deterministic rules, dry runs).")
flags.DEFINE_float("scripted_latency_s", 0.0, "Simulated latency per call of the scripted judge (dry runs).")
flags.DEFINE_integer("dcscore_votes", 3, "Judge asks per DCScore matching / verification decision (majority).")
flags.DEFINE_integer("captionqa_seed", 0, "Seed of the CaptionQA option shuffles.")
flags.DEFINE_integer("caparena_seed", 0, "Seed of the CapArena caption order (recorded in the results).")
flags.DEFINE_integer("max_items_in_flight", 16, "Items judged concurrently per protocol.")
flags.DEFINE_integer("batch_size", 8, "Images captioned per batch.")
flags.DEFINE_integer("max_new_tokens", 0, "Caption token budget; 0 = config.sampling.max_new_tokens.")


def main(argv) -> int:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    from balcap_jax.evaluation.benchmark_files import BenchmarkFormatError
    from balcap_jax.evaluation.driver import EvalOptions, headline, run_evaluation

    f = flags.FLAGS
    try:
        options = EvalOptions(
            config=f.config, output=f.output, protocols=tuple(f.protocols), checkpoint=f.checkpoint,
            captions=f.captions, split=f.split, dcscore_data=f.dcscore_data, captionqa_data=f.captionqa_data,
            caparena_data=f.caparena_data, judge=f.judge, scripted_latency_s=f.scripted_latency_s,
            dcscore_votes=f.dcscore_votes, captionqa_seed=f.captionqa_seed, caparena_seed=f.caparena_seed,
            max_items_in_flight=f.max_items_in_flight, batch_size=f.batch_size, max_new_tokens=f.max_new_tokens,
        )  # fmt: skip
        payload = run_evaluation(options)
    except (ValueError, FileNotFoundError, BenchmarkFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(f.output, 'results.json')} and summary.md")
    print(headline(payload))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
