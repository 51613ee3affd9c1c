"""ShapesWorld exact metrics: the offline judge (`rewards.shapes_world.components`) on a held-out split.

Per caption, from the scene graph, with no model in the loop: precision (correct pointable claims, duplicates
counted once), recall (reference facts covered), F1 of the two, linguistic quality (rated 1-10 on clarity,
fluency and coherence, as the training judge does), b-CapScore (the paper's headline: the harmonic mean of
precision, recall and linguistic), QA accuracy on the image's multiple-choice questions read off the caption
(cannot-answer credit 0), and the caption's length in words.
Reported: means over the split, x100 (length in words, unscaled).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np

from balcap_jax.data import shapes_world as world
from balcap_jax.data.records import CaptionExample, decode_record
from balcap_jax.data.shapes_world_grammar import parse_caption
from balcap_jax.evaluation.dcscore import f1
from balcap_jax.evaluation.results_store import item_key
from balcap_jax.rewards.shapes_world import components as judge
from balcap_jax.rewards.shapes_world.rating import rated_linguistic
from balcap_jax.rl.shaping import b_capscore

NAME = "shapes_world"
METRIC_VERSION = 2  # bump when the offline judge's rules change, so cached results are not reused
METRICS = ("precision", "recall", "f1", "linguistic", "b_capscore", "qa")


@dataclasses.dataclass(frozen=True)
class ShapesWorldItem:
    image_id: str
    scene_graph: dict[str, Any]
    questions: tuple[dict[str, Any], ...]


def items_from_source(source: Sequence[Any]) -> list[ShapesWorldItem]:
    """The split's items (records as `tfds_builder.open_split` returns them); records that do not decode or have
    no scene graph raise, naming the record (a ShapesWorld split is generated, so that is a bug, not data)."""
    items = []
    for index in range(len(source)):
        example = decode_record(source[index])
        if not isinstance(example, CaptionExample):
            raise ValueError(f"ShapesWorld record {index} did not decode: {example}")
        if "scene_graph" not in example.metadata:
            raise ValueError(f"record {example.example_id!r} has no metadata['scene_graph']; is it ShapesWorld data?")
        items.append(ShapesWorldItem(example.example_id, example.metadata["scene_graph"], example.questions))
    return items


def score_caption(caption: str, scene_graph: dict[str, Any], questions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{metric: value in [0, 1]} (qa NaN without questions) plus the caption's word count."""
    scene = world.SceneGraph.from_dict(scene_graph)
    parsed = parse_caption(caption)
    precision, verdicts = judge.precision(parsed, scene)
    recall, _ = judge.recall(verdicts, scene)
    linguistic, _ = rated_linguistic(parsed)
    b_cap = float(b_capscore([precision, recall, linguistic], ("precision", "recall", "linguistic")))
    qa = judge.qa_accuracy(parsed, questions, 0.0)[0] if questions else math.nan
    return {"precision": precision, "recall": recall, "f1": f1(precision, recall), "linguistic": linguistic,
            "b_capscore": b_cap, "qa": qa, "words": len(caption.split())}  # fmt: skip


def aggregate_scores(per_item: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"num_items": len(per_item)}
    for metric in METRICS:
        values = np.array([r.get(metric, math.nan) for r in per_item], dtype=np.float64)  # rows of older versions
        finite = values[~np.isnan(values)]
        out[metric] = float(finite.mean() * 100) if finite.size else math.nan
    out["words_mean"] = float(np.mean([r["words"] for r in per_item])) if per_item else math.nan
    return out


class ShapesWorldExact:
    name = NAME

    def __init__(self, items: Sequence[ShapesWorldItem]):
        self.items = list(items)

    def item_key(self, item: ShapesWorldItem, caption: str) -> str:
        return item_key(protocol=NAME, image_id=item.image_id, caption=caption, version=METRIC_VERSION,
                        scene=json.dumps(item.scene_graph, sort_keys=True))  # fmt: skip

    async def judge_item(self, item: ShapesWorldItem, caption: str) -> dict[str, Any]:
        return score_caption(caption, item.scene_graph, item.questions)

    def aggregate(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return aggregate_scores(results)
