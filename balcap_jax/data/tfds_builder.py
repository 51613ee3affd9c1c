"""A tfds builder turning local JSONL manifests into array_record files (no TensorFlow needed).

    builder = ManifestCaptions(name="my_captions", manifests={"train": "train.jsonl"}, data_dir="/data/tfds")
    builder.download_and_prepare()
    print(builder.skip_tally.summary())            # what was skipped, by reason
    source = open_split("/data/tfds", "my_captions", "train")   # a random-access source for the grain pipeline

Records hold the encoded image exactly as given (never re-encoded; decoded later by the pipeline, which skips
anything that fails to decode), the image size, the reference captions, and the questions and free metadata
as JSON text. Validation (`manifest.read_manifest`) happens while writing: corrupt, missing or oversized
images, empty references and unreadable lines are skipped, counted by reason in `skip_tally` and logged.

Verified with tensorflow-datasets 4.9.10 without TensorFlow installed: tfds writes array_record through its
numpy example serializer, and `as_data_source` reads it back through `array_record`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from balcap_jax.data.manifest import ImageLimits, ManifestExample, SkipTally, read_manifest

log = logging.getLogger(__name__)

FEATURE_DOCS = {
    "id": "stable example id (from the manifest, or '<manifest>:<line>')",
    "image_bytes": "the encoded image (PNG/JPEG/... as given in the manifest)",
    "width": "image width in pixels",
    "height": "image height in pixels",
    "references": "reference captions (at least one, non-empty)",
    "questions_json": "JSON list of multiple-choice questions {question, choices, answer}",
    "metadata_json": "JSON object of source-specific extras (e.g. the ShapesWorld scene graph)",
}


def record_from_example(example: ManifestExample) -> dict[str, Any]:
    """The tfds feature dict of one validated manifest example."""
    return {
        "id": example.example_id,
        "image_bytes": example.image_bytes,
        "width": np.int32(example.width),
        "height": np.int32(example.height),
        "references": list(example.references),
        "questions_json": json.dumps(list(example.questions), ensure_ascii=False),
        "metadata_json": json.dumps(example.metadata, ensure_ascii=False),
    }


class ManifestCaptions(tfds.core.GeneratorBasedBuilder):
    """Captioning records from local manifests. The builder config name is the dataset's name, so several
    manifests live side by side under one data_dir: <data_dir>/manifest_captions/<name>/<version>/."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded image, size, references, questions and metadata as JSON."}

    # tfds 4.9.10 locates a packaged builder's code through `importlib_resources`, a backport it only installs
    # on Python < 3.9; pointing at this file directly avoids that import (nothing else reads code_path).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        name: str,
        manifests: Mapping[str, str],
        limits: ImageLimits = ImageLimits(),
        file_format: str = "array_record",
        **kwargs: Any,
    ):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
            raise ValueError(f"ManifestCaptions.name must be letters, digits, '_', '.', '-' (it names a folder); "
                             f"got {name!r}")
        if not manifests:
            raise ValueError("ManifestCaptions.manifests must map at least one split name to a JSONL path")
        for split, path in manifests.items():
            if not os.path.isfile(path):
                raise ValueError(f"ManifestCaptions.manifests[{split!r}] = {path!r} is not a file")
        self._manifests = dict(manifests)
        self._limits = limits
        self.skip_tally = SkipTally()
        config = tfds.core.BuilderConfig(name=name, description=f"captions from {sorted(self._manifests)}")
        super().__init__(config=config, file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        f = tfds.features
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image captioning records built from a local JSONL manifest.",
            features=f.FeaturesDict(
                {
                    "id": f.Text(doc=FEATURE_DOCS["id"]),
                    "image_bytes": f.Tensor(shape=(), dtype=np.object_, doc=FEATURE_DOCS["image_bytes"]),
                    "width": f.Scalar(dtype=np.int32, doc=FEATURE_DOCS["width"]),
                    "height": f.Scalar(dtype=np.int32, doc=FEATURE_DOCS["height"]),
                    "references": f.Sequence(f.Text(), doc=FEATURE_DOCS["references"]),
                    "questions_json": f.Text(doc=FEATURE_DOCS["questions_json"]),
                    "metadata_json": f.Text(doc=FEATURE_DOCS["metadata_json"]),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing is downloaded
        return {split: self._generate_examples(path) for split, path in self._manifests.items()}

    def _generate_examples(self, manifest_path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        tally = SkipTally()
        for example in read_manifest(manifest_path, tally, self._limits):
            yield example.example_id, record_from_example(example)
        self.skip_tally.counts.update(tally.counts)
        self.skip_tally.records.extend(tally.records)
        if tally.total:
            log.warning("%s: %s", manifest_path, tally.summary())


def open_split(data_dir: str, name: str, split: str, version: str = "1.0.0"):
    """A random-access source (len + getitem returning feature dicts) of a prepared split; needs no builder
    code, only the files written by `ManifestCaptions`."""
    builder_dir = os.path.join(data_dir, "manifest_captions", name, version)
    if not os.path.isdir(builder_dir):
        raise ValueError(f"no prepared dataset at {builder_dir}; run ManifestCaptions(...).download_and_prepare()")
    return tfds.builder_from_directory(builder_dir).as_data_source(split=split)


def manifest_fingerprint(manifests: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Path, size and modification time of each split's manifest (cheap, and changes with any edit)."""
    out = {}
    for split, path in sorted(manifests.items()):
        stat = os.stat(path)
        out[split] = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return out


def prepare_manifest_dataset(data_dir: str, name: str, manifests: Mapping[str, str],
                             limits: ImageLimits = ImageLimits()) -> ManifestCaptions:
    """Build the array_record dataset of `manifests`, or reuse it when it was built from the same manifest files
    (same paths, sizes and modification times; otherwise it is rebuilt, with a log line). When records were
    skipped, the report is written next to the records as skipped_records.json ({counts, records})."""
    builder = ManifestCaptions(name=name, manifests=manifests, data_dir=data_dir, limits=limits)
    fingerprint = manifest_fingerprint(manifests)
    stamp_path = os.path.join(builder.data_dir, "manifest_fingerprint.json")
    download_config = None
    if os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json")):
        previous = None
        if os.path.isfile(stamp_path):
            with open(stamp_path, encoding="utf-8") as f:
                previous = json.load(f)
        if previous != fingerprint:
            log.warning("rebuilding %s: its manifests changed since it was built", builder.data_dir)
            download_config = tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD)
    builder.download_and_prepare(download_config=download_config)
    with open(stamp_path, "w", encoding="utf-8") as f:
        json.dump(fingerprint, f, indent=1)
    if builder.skip_tally.total:
        report = {"counts": dict(builder.skip_tally.counts), "records": builder.skip_tally.records}
        with open(os.path.join(builder.data_dir, "skipped_records.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return builder
