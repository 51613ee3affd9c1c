"""The run's record sources: ShapesWorld generated into array_record, or a JSONL manifest (plus an evaluation
manifest, or a seeded held-out fraction of the training manifest) prepared into array_record.

Records are prepared once: process 0 first, then a barrier; the other processes then open what process 0 wrote
(a shared filesystem) or, on a host-local disk, build the same records themselves (the builds are deterministic
and reused when present).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax

from balcap_jax.data import shapes_world as world
from balcap_jax.data import tfds_builder
from balcap_jax.data.shapes_world_records import prepare_shapes_world
from balcap_jax.parallel import hosts

T = TypeVar("T")


def data_dir(config: Any, workdir: Path) -> str:
    return config.data.records_dir or str(Path(workdir) / "data")


def world_config(config: Any) -> world.WorldConfig:
    sw = config.data.shapes_world
    return world.WorldConfig(image_size=int(sw.image_size), max_objects=int(sw.max_objects),
                             captioner_habits=tuple(float(p) for p in sw.get("captioner_habits", ())))


def _once(prepare: Callable[[], T]) -> T:
    if jax.process_index() == 0:
        result = prepare()
    hosts.barrier("balcap_records_prepared")
    if jax.process_index() != 0:
        result = prepare()  # reuses process 0's records on a shared disk; builds its own on a local one
    return result


def held_out(example_id: str, fraction: float, seed: int) -> bool:
    """Whether a manifest line belongs to the held-out split: a seeded hash of its id, so the split is stable
    under reordering and appending and the same on every host."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_manifest(manifest: str, out_dir: str, *, fraction: float, seed: int) -> dict[str, str]:
    """Writes the train / validation parts of `manifest` (JSONL) under `out_dir`; returns their paths. Each line
    keeps its id (its "id" field, or the '<file name>:<line>' id it had in `manifest`) and relative image paths
    are made absolute, so records are the same as when the whole manifest is read. Unparseable lines go to the
    training part, where the builder counts and skips them."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "validation": os.path.join(out_dir, "validation.jsonl")}
    base_dir, name = os.path.dirname(os.path.abspath(manifest)), os.path.basename(manifest)
    with open(manifest, encoding="utf-8") as f, open(paths["train"] + ".tmp", "w", encoding="utf-8") as train, \
            open(paths["validation"] + ".tmp", "w", encoding="utf-8") as val:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entry.setdefault("id", f"{name}:{number}")
                if isinstance(entry.get("image"), str) and not os.path.isabs(entry["image"]):
                    entry["image"] = os.path.join(base_dir, entry["image"])
            except (json.JSONDecodeError, AttributeError, TypeError):
                train.write(line if line.endswith("\n") else line + "\n")
                continue
            out = val if held_out(str(entry["id"]), fraction, seed) else train
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
    for path in paths.values():
        os.replace(path + ".tmp", path)
    return paths


def eval_description(config: Any) -> str:
    """What the run evaluates on, in words (for the summary); '' when no evaluation is configured."""
    if config.data.source == "shapes_world":
        return f"{int(config.data.shapes_world.num_eval)} held-out ShapesWorld images"
    if config.data.get("eval_manifest", ""):
        return f"the evaluation manifest {config.data.eval_manifest}"
    fraction = float(config.data.get("eval_fraction", 0.0))
    if fraction > 0:
        return f"a held-out {fraction:.1%} of {config.data.manifest} (seeded by config.seed={int(config.seed)})"
    return ""


def prepare_data(config: Any, workdir: Path):
    """-> (train source, eval source or None). ShapesWorld is generated (once) into array_record; a manifest is
    prepared with its evaluation split, if one is configured (see `eval_description`)."""
    directory = data_dir(config, workdir)
    if config.data.source == "shapes_world":
        sw = config.data.shapes_world
        name = _once(lambda: prepare_shapes_world(
            directory, seed=int(config.seed),
            split_sizes={"train": int(sw.num_train), "validation": int(sw.num_eval)},
            config=world_config(config),
        ))
        return (tfds_builder.open_split(directory, name, "train"),
                tfds_builder.open_split(directory, name, "validation"))
    manifest = config.data.manifest
    if not manifest or not os.path.isfile(manifest):
        raise FileNotFoundError(f"config.data.manifest={manifest!r} is not a file; give a JSONL manifest path")
    eval_manifest = config.data.get("eval_manifest", "")
    fraction = float(config.data.get("eval_fraction", 0.0))
    name = "manifest_" + Path(manifest).stem
    if eval_manifest:
        if not os.path.isfile(eval_manifest):
            raise FileNotFoundError(f"config.data.eval_manifest={eval_manifest!r} is not a file")
        manifests = {"train": manifest, "validation": eval_manifest}
    elif fraction > 0:
        name += f"_heldout{int(round(fraction * 1000)):03d}_s{int(config.seed)}"
        manifests = None
    else:
        manifests = {"train": manifest}

    def prepare() -> dict[str, str]:
        files = manifests or split_manifest(manifest, os.path.join(directory, "splits", name),
                                            fraction=fraction, seed=int(config.seed))
        tfds_builder.prepare_manifest_dataset(directory, name, files)
        return files

    files = _once(prepare)
    train = tfds_builder.open_split(directory, name, "train")
    return train, (tfds_builder.open_split(directory, name, "validation") if "validation" in files else None)


def corpus_texts(source) -> list[str]:
    """Every reference caption of a source (for the vocabulary of from-scratch policies)."""
    texts = []
    for i in range(len(source)):
        for ref in source[i]["references"]:
            texts.append(ref.decode("utf-8", "replace") if isinstance(ref, bytes) else str(ref))
    return texts
