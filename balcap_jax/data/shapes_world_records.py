"""ShapesWorld as manifests and array_record datasets, so the synthetic world goes through the same pipeline as
real data.

    name = prepare_shapes_world("/tmp/sw", seed=0, split_sizes={"train": 512, "validation": 64})
    train = tfds_builder.open_split("/tmp/sw", name, "train")      # then pipeline.make_dataset(train, ...)

Splits take consecutive, disjoint index ranges of the same seeded world (train first), so no image is shared.
Each record's metadata holds the scene graph and the world config; its questions are the world's multiple-choice
questions (with their machine-readable `query`, which the offline QA judge reads). A world with
`captioner_habits` also stores each training image's imperfect caption under `metadata["warm_start_caption"]`
(`shapes_world_warm_start.sft_target` reads it: the SFT target of a warm start flawed like a base captioner).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Mapping

from balcap_jax.data import shapes_world as world
from balcap_jax.data import shapes_world_warm_start as warm_start
from balcap_jax.data.manifest import write_manifest_line
from balcap_jax.data.tfds_builder import ManifestCaptions, prepare_manifest_dataset


def shapes_world_manifest_line(example: world.ShapesWorldExample, config: world.WorldConfig,
                               warm_start_caption: str = "") -> str:
    metadata = {"scene_graph": example.scene.to_dict(), "world": dataclasses.asdict(config)}
    if warm_start_caption:
        metadata[warm_start.WARM_START_KEY] = warm_start_caption
    return write_manifest_line(
        example.image_id,
        list(example.references),
        image_bytes=world.encode_png(example.image),
        questions=list(example.questions),
        metadata=metadata,
    )


def warm_start_caption(seed: int, index: int, example: world.ShapesWorldExample, config: world.WorldConfig) -> str:
    """The imperfect SFT target of example `index` ('' for a world without captioner habits)."""
    if not config.captioner_habits:
        return ""
    habits = warm_start.CaptionerHabits(*(float(p) for p in config.captioner_habits))
    return warm_start.imperfect_caption(example.scene, warm_start.habit_rng(seed, index), habits)


def write_shapes_world_manifests(
    directory: str, *, seed: int, split_sizes: Mapping[str, int], config: world.WorldConfig = world.WorldConfig()
) -> dict[str, str]:
    """Write <directory>/<split>.jsonl for each split; returns {split: path}."""
    os.makedirs(directory, exist_ok=True)
    paths, start = {}, 0
    for split, size in split_sizes.items():
        if size < 1:
            raise ValueError(f"split_sizes[{split!r}] must be >= 1; got {size}")
        path = os.path.join(directory, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for index in range(start, start + size):
                example = world.generate_example(seed, index, config)
                caption = warm_start_caption(seed, index, example, config)
                f.write(shapes_world_manifest_line(example, config, caption) + "\n")
        paths[split], start = path, start + size
    return paths


def prepare_shapes_world(
    data_dir: str, *, seed: int, split_sizes: Mapping[str, int], config: world.WorldConfig = world.WorldConfig()
) -> str:
    """Write the manifests and build the array_record dataset of a ShapesWorld (reused when already built).
    Returns the dataset name for `tfds_builder.open_split(data_dir, name, split)`; the name encodes the seed,
    split sizes and world config, so different worlds never share records."""
    spec = json.dumps({"seed": seed, "splits": dict(split_sizes), "world": dataclasses.asdict(config)},
                      sort_keys=True)
    name = f"shapes_world_{hashlib.sha1(spec.encode()).hexdigest()[:12]}"
    info = os.path.join(data_dir, "manifest_captions", name, str(ManifestCaptions.VERSION), "dataset_info.json")
    if not os.path.isfile(info):  # tfds writes this last: a build killed half-way is redone
        manifests = write_shapes_world_manifests(os.path.join(data_dir, "manifests", name), seed=seed,
                                                 split_sizes=split_sizes, config=config)
        prepare_manifest_dataset(data_dir, name, manifests)
    return name
