"""The evaluation run behind `python -m balcap_jax.evaluate`: load benchmarks, caption, judge, report.

Output directory:
  captions.jsonl            finished captions (append-only; a re-run captions only what is missing)
  <protocol>.items.jsonl    finished per-item results (append-only; a re-run judges only what is missing)
  results.json              settings, aggregates, per-protocol counts and per-item results
  summary.md                one table per protocol
  data/                     array_record copies of the benchmark images (and the ShapesWorld split when the
                            checkpoint is an HF directory or captions come from a file)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from balcap_jax.evaluation import caparena, captionqa, dcscore, shapes_world_eval
from balcap_jax.evaluation.benchmark_files import BenchmarkFormatError, read_jsonl, required_str
from balcap_jax.evaluation.judge_setup import build_judges
from balcap_jax.evaluation.report import write_report
from balcap_jax.evaluation.results_store import ResultsStore
from balcap_jax.evaluation.runner import ProtocolRun, run_protocol

PROTOCOLS = ("dcscore", "captionqa", "caparena", "shapes_world")
JUDGED = ("dcscore", "captionqa", "caparena")
SPLITS = ("validation", "train")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What `python -m balcap_jax.evaluate` was asked to do (see its flags)."""

    config: Any
    output: str
    protocols: tuple[str, ...]
    checkpoint: str = ""
    captions: str = ""
    split: str = "validation"
    dcscore_data: str = ""
    captionqa_data: str = ""
    caparena_data: str = ""
    judge: str = "config"
    scripted_latency_s: float = 0.0
    dcscore_votes: int = 3
    captionqa_seed: int = 0
    caparena_seed: int = 0
    max_items_in_flight: int = 16
    batch_size: int = 8
    max_new_tokens: int = 0  # 0: config.sampling.max_new_tokens

    def __post_init__(self):
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"--protocols: unknown {unknown}; choose from {PROTOCOLS}")
        if len(set(self.protocols)) != len(self.protocols):
            raise ValueError(f"--protocols={','.join(self.protocols)} names a protocol twice")
        if bool(self.checkpoint) == bool(self.captions):
            raise ValueError("give exactly one of --checkpoint (caption with a model) and --captions (a JSONL file)")
        if self.split not in SPLITS:
            raise ValueError(f"--split={self.split!r}: use one of {SPLITS}")
        for protocol in JUDGED:
            if protocol in self.protocols and not getattr(self, f"{protocol}_data"):
                raise ValueError(f"--protocols includes {protocol!r}: give its benchmark file with --{protocol}_data")
        if self.batch_size < 1 or self.max_items_in_flight < 1 or self.dcscore_votes < 1:
            raise ValueError("--batch_size, --max_items_in_flight and --dcscore_votes must be >= 1")


def read_captions(path: str) -> dict[str, str]:
    """A captions JSONL: one {"image_id": str, "caption": str} per line."""
    captions: dict[str, str] = {}
    for where, row in read_jsonl(path):
        image_id = required_str(row, "image_id", where)
        if not isinstance(row.get("caption"), str):
            raise BenchmarkFormatError(f"{where}: 'caption' must be a string")
        if image_id in captions:
            raise BenchmarkFormatError(f"{where}: image_id {image_id!r} appears twice")
        captions[image_id] = row["caption"]
    return captions


def build_judged_protocols(options: EvalOptions) -> dict[str, Any]:
    """{name: protocol} for the requested judged protocols (benchmark files read and validated here, before any
    model is loaded, so a bad file fails fast)."""
    if not any(p in JUDGED for p in options.protocols):
        return {}
    judges = build_judges(options.judge, options.config, scripted_latency_s=options.scripted_latency_s)
    protocols: dict[str, Any] = {}
    if "dcscore" in options.protocols:
        config = dcscore.DCScoreConfig(votes=options.dcscore_votes)
        protocols["dcscore"] = dcscore.DCScore(dcscore.load_items(options.dcscore_data), judges, config)
    if "captionqa" in options.protocols:
        config = captionqa.CaptionQAConfig(seed=options.captionqa_seed)
        protocols["captionqa"] = captionqa.CaptionQA(captionqa.load_items(options.captionqa_data), judges, config)
    if "caparena" in options.protocols:
        config = caparena.CapArenaConfig(seed=options.caparena_seed)
        protocols["caparena"] = caparena.CapArena(caparena.load_items(options.caparena_data), judges, config)
    return protocols


def _shapes_world_source(config: Any, data_workdir: str, split: str):
    from balcap_jax.trainer.data_sources import prepare_data

    if config.data.source != "shapes_world":
        raise ValueError(f"--protocols includes 'shapes_world' but config.data.source={config.data.source!r}")
    train, validation = prepare_data(config, Path(data_workdir))
    return validation if split == "validation" else train


def _benchmark_source(protocols: Sequence[Any], output: str):
    """The benchmark images as an array_record split (through the training data pipeline's manifest builder)."""
    from balcap_jax.data.manifest import write_manifest_line
    from balcap_jax.data.tfds_builder import open_split, prepare_manifest_dataset

    images: dict[str, str] = {}
    for protocol in protocols:
        for item in getattr(protocol, "items", ()):
            if hasattr(item, "image_path"):
                previous = images.setdefault(item.image_id, item.image_path)
                if previous != item.image_path:
                    raise BenchmarkFormatError(
                        f"image_id {item.image_id!r} names two different images ({previous}, {item.image_path}) "
                        "across the benchmark files; ids must identify one image"
                    )
    if not images:
        return None
    lines = [write_manifest_line(i, [i], image_path=p) for i, p in sorted(images.items())]  # ids as placeholder refs
    text = "\n".join(lines) + "\n"
    name = "eval_images_" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    directory = os.path.join(output, "data")
    manifest = os.path.join(directory, "manifests", f"{name}.jsonl")
    os.makedirs(os.path.dirname(manifest), exist_ok=True)
    if not os.path.isfile(manifest):
        with open(manifest, "w", encoding="utf-8") as handle:
            handle.write(text)
    prepare_manifest_dataset(directory, name, {"eval": manifest})
    return open_split(directory, name, "eval")


def run_evaluation(options: EvalOptions) -> dict[str, Any]:
    """Runs the whole evaluation (resuming whatever the output directory already holds); returns results.json."""
    os.makedirs(options.output, exist_ok=True)
    protocols = build_judged_protocols(options)
    config = options.config
    loaded = None
    if options.checkpoint:
        from balcap_jax.evaluation.captioning import is_workdir, load_policy

        loaded = load_policy(config, options.checkpoint)
        config = loaded.config
    shapes_source = None
    if "shapes_world" in options.protocols:
        reuse = loaded is not None and is_workdir(options.checkpoint)
        shapes_source = _shapes_world_source(config, options.checkpoint if reuse else options.output, options.split)
        items = shapes_world_eval.items_from_source(shapes_source)
        protocols["shapes_world"] = shapes_world_eval.ShapesWorldExact(items)
    protocols = [protocols[name] for name in options.protocols]

    if loaded is None:
        captions = read_captions(options.captions)
    else:
        from balcap_jax.evaluation.captioning import caption_source

        max_new_tokens = options.max_new_tokens or int(config.sampling.max_new_tokens)
        captions = {}
        with ResultsStore(os.path.join(options.output, "captions.jsonl")) as store:
            for source in (shapes_source, _benchmark_source(protocols, options.output)):
                if source is None:
                    continue
                new = caption_source(loaded, source, store, batch_size=options.batch_size,
                                     max_new_tokens=max_new_tokens)  # fmt: skip
                if clash := sorted(new.keys() & captions.keys()):
                    raise BenchmarkFormatError(
                        f"image ids {clash[:5]} name both a ShapesWorld image and a benchmark image; rename them"
                    )
                captions |= new

    async def judge_all() -> list[ProtocolRun]:
        stores = [ResultsStore(os.path.join(options.output, f"{p.name}.items.jsonl")) for p in protocols]
        try:
            return list(await asyncio.gather(*(
                run_protocol(p, captions, s, max_items_in_flight=options.max_items_in_flight)
                for p, s in zip(protocols, stores)
            )))  # fmt: skip
        finally:
            for store in stores:
                store.close()

    runs = asyncio.run(judge_all())
    judges = next((p.judges.fingerprint() for p in protocols if hasattr(p, "judges")), {})
    settings = {
        "checkpoint": options.checkpoint or None,
        "checkpoint_step": None if loaded is None else loaded.fingerprint.get("step"),
        "captions_file": options.captions or None,
        "split": options.split if "shapes_world" in options.protocols else None,
        "protocols": list(options.protocols),
        **judges,
        "dcscore_votes": options.dcscore_votes,
        "captionqa_option_seed": options.captionqa_seed,
        "caparena_order_seed": options.caparena_seed,
        "benchmark_files": {p: getattr(options, f"{p}_data") for p in JUDGED if p in options.protocols},
    }
    return write_report(options.output, runs, settings)


def headline(payload: dict[str, Any]) -> str:
    """One line with each protocol's main number (the last line `python -m balcap_jax.evaluate` prints)."""
    main = {"dcscore": "f1", "captionqa": "overall", "caparena": "score", "shapes_world": "f1"}
    parts = []
    for name, metrics in payload["metrics"].items():
        value = metrics.get(main[name])
        parts.append(f"{name}_{main[name]}={'n/a' if value is None else format(value, '.2f')}")
    return "eval " + " ".join(parts)

