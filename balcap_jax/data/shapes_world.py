"""ShapesWorld: a procedural, seedable captioning world with an exactly checkable ground truth.

An image holds 1–5 flat shapes on a plain canvas divided into a 3×3 grid; each object occupies its own cell.
Every object has a shape, a colour, a size and a region (the grid cell, named "top left", "center", ...).
Within one image no two objects share (colour, shape), so "the red circle" always names exactly one object.

From the `SceneGraph` the world derives, with no model in the loop:
  - the image (PIL, RGB, `image_size` px square; 112 px gives a 4×4 merged-patch Qwen2.5-VL grid),
  - atomic facts (`scene_facts`): existence, size and region of every object, one spatial relation between
    each pair of objects consecutive in reading order, and the object count,
  - reference captions (`reference_captions`): fluent English, several template families, every fact stated
    once; the ShapesWorld judge scores them precision = recall = linguistic = 1,
  - multiple-choice questions (`multiple_choice_questions`) for the CapRL-style QA reward, each with a
    machine-readable `query` so the offline QA judge can answer it from a caption's parsed claims.

The vocabulary is small and closed (see `shapes_world_grammar`) so a tiny policy can learn it. Everything
here is a pure function of a `numpy.random.Generator` or of the scene graph: same seed, same world.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3
# Region names by (row, col); "center" is the middle cell.
REGIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
BACKGROUND = (245, 245, 240)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world. Defaults give 112 px images with 1–5 objects and three references each."""

    image_size: int = 112
    min_objects: int = 1
    max_objects: int = 5
    num_references: int = 3
    num_questions: int = 8
    include_relations: bool = True
    # The warm-start captioner's habit rates (`shapes_world_warm_start.CaptionerHabits` fields, in order); empty:
    # none, and the warm start is fitted to the first reference as before.
    captioner_habits: tuple[float, ...] = ()

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise ValueError(
                f"WorldConfig.min_objects/max_objects must satisfy 1 <= min <= max <= {GRID * GRID}; "
                f"got {self.min_objects}, {self.max_objects}"
            )
        if self.max_objects > len(SHAPES) * len(COLOURS):
            raise ValueError("WorldConfig.max_objects exceeds the number of distinct (colour, shape) pairs")
        if self.image_size < 3 * 12:
            raise ValueError(f"WorldConfig.image_size must be >= 36 px so shapes stay visible; got {self.image_size}")
        if self.num_references < 1:
            raise ValueError(f"WorldConfig.num_references must be >= 1; got {self.num_references}")
        if self.num_questions < 0:
            raise ValueError(f"WorldConfig.num_questions must be >= 0; got {self.num_questions}")
        if len(self.captioner_habits) not in (0, 4):
            raise ValueError(
                "WorldConfig.captioner_habits must be empty (no habits) or 4 probabilities (invented_object, "
                f"omitted_relations, wrong_attribute, repeated_sentence); got {tuple(self.captioner_habits)!r}"
            )


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape. `row`, `col` index the 3×3 grid cell; `center_xy` and `radius` are in pixels."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    center_xy: tuple[float, float]
    radius: float

    @property
    def region(self) -> str:
        return REGIONS[(self.row, self.col)]

    @property
    def name(self) -> str:
        """The unique identifier in its image, e.g. 'red circle'."""
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class SceneGraph:
    """Objects in reading order (row, then column) on a square canvas of `image_size` px."""

    objects: tuple[SceneObject, ...]
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what records and `RewardItem.metadata['scene_graph']` carry)."""
        return {
            "image_size": self.image_size,
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "row": o.row,
                    "col": o.col,
                    "center_xy": list(o.center_xy),
                    "radius": o.radius,
                }
                for o in self.objects
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "SceneGraph":
        """Inverse of `to_dict`; raises ValueError naming the bad field."""
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            raise ValueError("scene_graph must be a dict with an 'objects' list (see SceneGraph.to_dict)")
        objects = []
        for i, o in enumerate(data["objects"]):
            try:
                obj = SceneObject(
                    shape=str(o["shape"]),
                    colour=str(o["colour"]),
                    size=str(o["size"]),
                    row=int(o["row"]),
                    col=int(o["col"]),
                    center_xy=(float(o["center_xy"][0]), float(o["center_xy"][1])),
                    radius=float(o["radius"]),
                )
            except (KeyError, TypeError, IndexError, ValueError) as e:
                raise ValueError(f"scene_graph.objects[{i}] is malformed ({e!r}); expected SceneGraph.to_dict()") from e
            if (obj.row, obj.col) not in REGIONS:
                raise ValueError(f"scene_graph.objects[{i}] has row/col {(obj.row, obj.col)} outside the 3x3 grid")
            objects.append(obj)
        names = [o.name for o in objects]
        if len(set(names)) != len(names):
            raise ValueError(f"scene_graph objects must have unique (colour, shape); got {names}")
        return cls(objects=tuple(objects), image_size=int(data.get("image_size", 0)))


# ----------------------------------------------------------------------------------------------------------
# Sampling and rendering


def sample_scene(rng: np.random.Generator, config: WorldConfig = WorldConfig()) -> SceneGraph:
    """Draw a scene: object count, distinct cells, distinct (colour, shape) pairs, sizes, jittered centres."""
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    cell_px = config.image_size / GRID
    objects = []
    for cell, pair_index in zip(cells, chosen):
        row, col = divmod(int(cell), GRID)
        colour, shape = pairs[int(pair_index)]
        size = SIZES[int(rng.integers(len(SIZES)))]
        radius = cell_px * (0.22 if size == "small" else 0.42)
        slack = cell_px / 2 - radius - 1.0  # keep the shape inside its cell
        jitter = rng.uniform(-slack, slack, size=2) if slack > 0 else np.zeros(2)
        center = ((col + 0.5) * cell_px + jitter[0], (row + 0.5) * cell_px + jitter[1])
        objects.append(
            SceneObject(shape, colour, size, row, col, (float(center[0]), float(center[1])), float(radius))
        )
    objects.sort(key=lambda o: (o.row, o.col))
    return SceneGraph(objects=tuple(objects), image_size=config.image_size)


def _polygon(obj: SceneObject) -> list[tuple[float, float]]:
    cx, cy = obj.center_xy
    r = obj.radius
    if obj.shape == "square":
        h = r / math.sqrt(2) * 1.15
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if obj.shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    raise ValueError(f"no polygon for shape {obj.shape!r}")


def render_image(scene: SceneGraph) -> Image.Image:
    """Draw the scene on a plain canvas. Returns an RGB PIL image of scene.image_size² px."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            cx, cy = obj.center_xy
            draw.ellipse((cx - obj.radius, cy - obj.radius, cx + obj.radius, cy + obj.radius), fill=fill)
        else:
            draw.polygon(_polygon(obj), fill=fill)
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Facts


def relation_holds(subject: SceneObject, relation: str, other: SceneObject) -> bool:
    """Grid-cell geometry: 'left of' means a strictly smaller column, 'above' a strictly smaller row."""
    if relation == "left of":
        return subject.col < other.col
    if relation == "right of":
        return subject.col > other.col
    if relation == "above":
        return subject.row < other.row
    if relation == "below":
        return subject.row > other.row
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def canonical_relations(scene: SceneGraph) -> list[tuple[SceneObject, str, SceneObject]]:
    """One relation per pair of objects consecutive in reading order: horizontal if their columns differ,
    else vertical (reading order makes the earlier object the left or upper one)."""
    out = []
    for a, b in zip(scene.objects, scene.objects[1:]):
        if a.col != b.col:
            out.append((a, "left of" if a.col < b.col else "right of", b))
        else:
            out.append((a, "above", b))
    return out


# A fact is a tuple: ("object", colour, shape) | ("size", colour, shape, size) | ("region", colour, shape, region)
# | ("relation", (colour, shape), relation, (colour, shape)) | ("count", n).
Fact = tuple


def scene_facts(scene: SceneGraph, include_relations: bool = True) -> list[Fact]:
    """The atomic facts a complete caption states (what recall is measured against)."""
    facts: list[Fact] = [("count", len(scene.objects))]
    for o in scene.objects:
        facts.append(("object", o.colour, o.shape))
        facts.append(("size", o.colour, o.shape, o.size))
        facts.append(("region", o.colour, o.shape, o.region))
    if include_relations:
        for a, rel, b in canonical_relations(scene):
            facts.append(("relation", (a.colour, a.shape), rel, (b.colour, b.shape)))
    return facts


def fact_to_text(fact: Fact) -> str:
    """A short English statement of one fact (for logs and judge records)."""
    kind = fact[0]
    if kind == "count":
        return f"there are {fact[1]} objects"
    if kind == "object":
        return f"there is a {fact[1]} {fact[2]}"
    if kind == "size":
        return f"the {fact[1]} {fact[2]} is {fact[3]}"
    if kind == "region":
        return f"the {fact[1]} {fact[2]} is in the {region_phrase(fact[3])}"
    if kind == "relation":
        return f"the {' '.join(fact[1])} is {relation_phrase(fact[2])} the {' '.join(fact[3])}"
    raise ValueError(f"unknown fact kind {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# Reference captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def region_phrase(region: str) -> str:
    return {"top": "top middle", "bottom": "bottom middle", "left": "middle left", "right": "middle right"}.get(
        region, region
    )


def relation_phrase(relation: str) -> str:
    return {"left of": "to the left of", "right of": "to the right of"}.get(relation, relation)


def _count_sentence(n: int, family: int) -> str:
    if n == 1:
        return ("There is exactly one shape in the image.", "The picture contains a single shape.",
                "Only one object appears in the image.")[family]
    word = NUMBER_WORDS[n]
    return (f"There are {word} shapes in the image.", f"The picture contains {word} shapes.",
            f"{word.capitalize()} objects appear in the image.")[family]


def _object_sentence(o: SceneObject, family: int) -> str:
    np_ = f"{_article(o.size)} {o.size} {o.colour} {o.shape}"
    where = f"the {region_phrase(o.region)}"
    if family == 0:
        return f"There is {np_} in {where}."
    if family == 1:
        return f"In {where}, there is {np_}."
    return f"{np_.capitalize()} sits in {where}."


def _relation_sentence(a: SceneObject, relation: str, b: SceneObject, family: int) -> str:
    phrase = relation_phrase(relation)
    if family == 2 and relation in ("left of", "right of"):
        inverse = {"left of": "right of", "right of": "left of"}[relation]
        return f"The {b.name} is {relation_phrase(inverse)} the {a.name}."
    if family == 1:
        return f"The {a.name} appears {phrase} the {b.name}."
    return f"The {a.name} is {phrase} the {b.name}."


def reference_captions(
    scene: SceneGraph, rng: np.random.Generator, num_references: int = 3, include_relations: bool = True
) -> list[str]:
    """`num_references` captions, each stating every fact of `scene_facts` exactly once.

    Template families differ in sentence shapes (existential, fronted region, subject-verb), relation wording
    (including stating the inverse relation) and object order (reading order or shuffled).
    """
    captions = []
    first_family = int(rng.integers(3))
    for i in range(num_references):
        family = (first_family + i) % 3
        order = list(scene.objects)
        if i % 2 == 1:
            order = [order[j] for j in rng.permutation(len(order))]
        sentences = [_count_sentence(len(scene.objects), family)]
        sentences += [_object_sentence(o, (family + k) % 3) for k, o in enumerate(order)]
        if include_relations:
            sentences += [_relation_sentence(a, r, b, family) for a, r, b in canonical_relations(scene)]
        captions.append(" ".join(sentences))
    return captions


# ----------------------------------------------------------------------------------------------------------
# Multiple-choice questions


def _question(text: str, choices: Sequence[str], answer: str, query: dict[str, Any], rng) -> dict[str, Any]:
    order = list(rng.permutation(len(choices)))
    shuffled = [choices[k] for k in order]
    return {"question": text, "choices": shuffled, "answer": shuffled.index(answer), "query": query}


def multiple_choice_questions(
    scene: SceneGraph, rng: np.random.Generator, num_questions: int = 8
) -> list[dict[str, Any]]:
    """Questions answerable from a complete caption. Each is {question, choices, answer (index), query}.

    query kinds: {"kind": "colour", "shape"} (asked only when that shape is unique in the image),
    {"kind": "size" | "region", "colour", "shape"}, {"kind": "count"},
    {"kind": "exists", "colour", "shape"} (half present, half absent objects),
    {"kind": "relation", "subject": [c, s], "relation", "object": [c, s]} (yes/no).
    """
    objects = scene.objects
    shape_counts = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    candidates: list[dict[str, Any]] = []
    count_choices = [str(n) for n in range(1, len(NUMBER_WORDS))]
    candidates.append(
        _question("How many shapes are in the image?", count_choices, str(len(objects)), {"kind": "count"}, rng)
    )
    for o in objects:
        if shape_counts[o.shape] == 1:
            candidates.append(_question(f"What colour is the {o.shape}?", list(COLOURS), o.colour,
                                        {"kind": "colour", "shape": o.shape}, rng))
        candidates.append(_question(f"What size is the {o.name}?", list(SIZES), o.size,
                                    {"kind": "size", "colour": o.colour, "shape": o.shape}, rng))
        candidates.append(_question(f"Where in the image is the {o.name}?", [region_phrase(r) for r in REGIONS.values()],
                                    region_phrase(o.region), {"kind": "region", "colour": o.colour, "shape": o.shape},
                                    rng))
        candidates.append(_question(f"Is there {_article(o.colour)} {o.name} in the image?", ["yes", "no"], "yes",
                                    {"kind": "exists", "colour": o.colour, "shape": o.shape}, rng))
    present = {(o.colour, o.shape) for o in objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    for j in rng.permutation(len(absent))[: len(objects)]:
        c, s = absent[int(j)]
        candidates.append(_question(f"Is there {_article(c)} {c} {s} in the image?", ["yes", "no"], "no",
                                    {"kind": "exists", "colour": c, "shape": s}, rng))
    for a in objects:
        for b in objects:
            if a is b:
                continue
            for rel in RELATIONS:
                holds = relation_holds(a, rel, b)
                candidates.append(_question(f"Is the {a.name} {relation_phrase(rel)} the {b.name}?", ["yes", "no"],
                                            "yes" if holds else "no",
                                            {"kind": "relation", "subject": [a.colour, a.shape], "relation": rel,
                                             "object": [b.colour, b.shape]}, rng))
    return _balanced_pick(candidates, num_questions, rng)


def _balanced_pick(candidates: list[dict[str, Any]], count: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Up to `count` distinct questions, taking kinds in turn (in a random order) so that the many relation
    questions of a busy scene do not crowd out the others."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for q in candidates:
        by_kind.setdefault(q["query"]["kind"], []).append(q)
    pools = [[pool[int(k)] for k in rng.permutation(len(pool))] for pool in by_kind.values()]
    pools = [pools[int(k)] for k in rng.permutation(len(pools))]
    picked: list[dict[str, Any]] = []
    while len(picked) < count and any(pools):
        for pool in pools:
            if pool and len(picked) < count:
                picked.append(pool.pop())
    return picked


# ----------------------------------------------------------------------------------------------------------
# Examples


@dataclasses.dataclass(frozen=True)
class ShapesWorldExample:
    """One generated image with everything the pipeline and judges need."""

    image_id: str
    image: Image.Image
    scene: SceneGraph
    references: tuple[str, ...]
    questions: tuple[dict[str, Any], ...]

    def metadata(self) -> dict[str, Any]:
        """What `RewardItem.metadata` carries for the ShapesWorld judges."""
        return {"scene_graph": self.scene.to_dict(), "questions": list(self.questions)}


def _scene_and_references(seed: int, index: int, config: WorldConfig
                          ) -> tuple[np.random.Generator, SceneGraph, list[str]]:
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, config)
    return rng, scene, reference_captions(scene, rng, config.num_references, config.include_relations)


def example_references(seed: int, index: int, config: WorldConfig = WorldConfig()) -> tuple[str, ...]:
    """The reference captions of example `index` without rendering its image (a corpus for vocabularies)."""
    return tuple(_scene_and_references(seed, index, config)[2])


def generate_example(seed: int, index: int, config: WorldConfig = WorldConfig()) -> ShapesWorldExample:
    """Example `index` of the world with `seed`; a pure function of (seed, index, config)."""
    rng, scene, refs = _scene_and_references(seed, index, config)
    questions = multiple_choice_questions(scene, rng, config.num_questions)
    return ShapesWorldExample(
        image_id=f"shapes-{seed}-{index:07d}",
        image=render_image(scene),
        scene=scene,
        references=tuple(refs),
        questions=tuple(questions),
    )


def generate_examples(seed: int, count: int, config: WorldConfig = WorldConfig()) -> Iterator[ShapesWorldExample]:
    for index in range(count):
        yield generate_example(seed, index, config)
