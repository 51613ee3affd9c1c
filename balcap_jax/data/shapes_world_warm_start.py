"""Imperfect captions of ShapesWorld scenes: the SFT targets of a warm start that is flawed like a base captioner.

A warm start fitted to the references is already a perfect ShapesWorld captioner, and RL then has nothing to
fix. Base captioners are flawed in a few recurring ways; each is a *habit* here, drawn per caption from a seeded
generator, from the scene graph alone (no model in the loop), using only the world's reference vocabulary (so a
from-scratch policy, whose vocabulary is the references', can say every word of them):

  invented_object       verbose-and-wrong: one sentence about an object that is not in the image (precision)
  omitted_relations     terse: the relation sentences are left out (recall)
  wrong_attribute       per object, one attribute (colour, size or region) stated wrongly (precision and recall)
  repeated_sentence     one sentence said twice (linguistic)

Why these rates (`CaptionerHabits()`): a habit is what a captioner does *most of the time*, so the two
length-related habits (one makes captions longer and wrong, the other shorter and incomplete) are majority
behaviours, p = 0.6: the warm start's greedy caption shows them and sampling at temperature 1 still finds the
alternative in ~40 % of rollouts. Slips (a wrong attribute, a repeat) are occasional. The rates were fixed before
any run and are not tuned on results; every one is configuration.

Captions on the same (seed, index) are identical on every machine; the generator stream is separate from the one
that draws the scene and references, so adding habits never changes the world.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from balcap_jax.data import shapes_world as world

# A fixed stream id so the habits' generator never shares a state with the scene's `default_rng([seed, index])`.
_HABIT_STREAM = 0x5EED_CA9


@dataclasses.dataclass(frozen=True)
class CaptionerHabits:
    """Probabilities (each in [0, 1]) of the warm-start captioner's habits; see the module docstring."""

    invented_object: float = 0.6
    omitted_relations: float = 0.6
    wrong_attribute: float = 0.1
    repeated_sentence: float = 0.2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
                raise ValueError(f"CaptionerHabits.{field.name} must be a probability in [0, 1]; got {value!r}")

    @property
    def clean(self) -> bool:
        return all(getattr(self, f.name) == 0 for f in dataclasses.fields(self))


def habit_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of example `index`'s imperfect caption in the world with `seed`."""
    return np.random.default_rng([seed, index, _HABIT_STREAM])


def _with_wrong_attribute(obj: world.SceneObject, scene: world.SceneGraph, rng: np.random.Generator
                          ) -> world.SceneObject:
    """`obj` with one of colour / size / region replaced by a wrong value that keeps names unique."""
    taken_cells = {(o.row, o.col) for o in scene.objects}
    taken_names = {o.name for o in scene.objects}
    kind = ("colour", "size", "region")[int(rng.integers(3))]
    if kind == "size":
        return dataclasses.replace(obj, size=next(s for s in world.SIZES if s != obj.size))
    if kind == "colour":
        options = [c for c in world.COLOURS if c != obj.colour and f"{c} {obj.shape}" not in taken_names]
        return dataclasses.replace(obj, colour=options[int(rng.integers(len(options)))]) if options else obj
    cells = [cell for cell in world.REGIONS if cell not in taken_cells]
    if not cells:
        return obj
    row, col = cells[int(rng.integers(len(cells)))]
    return dataclasses.replace(obj, row=row, col=col)


def _invented_object(scene: world.SceneGraph, rng: np.random.Generator) -> world.SceneObject | None:
    """An object the image does not hold: a (colour, shape) absent from it, in a free cell; None if full."""
    names = {o.name for o in scene.objects}
    pairs = [(c, s) for c in world.COLOURS for s in world.SHAPES if f"{c} {s}" not in names]
    cells = [cell for cell in world.REGIONS if cell not in {(o.row, o.col) for o in scene.objects}]
    if not pairs or not cells:
        return None
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    row, col = cells[int(rng.integers(len(cells)))]
    size = world.SIZES[int(rng.integers(len(world.SIZES)))]
    return world.SceneObject(shape, colour, size, row, col, (0.0, 0.0), 0.0)


def imperfect_caption(scene: world.SceneGraph, rng: np.random.Generator,
                      habits: CaptionerHabits = CaptionerHabits()) -> str:
    """One caption of `scene` in the references' sentence shapes, with each habit drawn from `rng`.

    Sentence order: count, objects (reading order), the invented object, relations. With `CaptionerHabits` all
    0 the caption states every fact of `scene_facts` once (a reference caption of template family 0).
    """
    family = 0
    objects = [(_with_wrong_attribute(o, scene, rng) if rng.random() < habits.wrong_attribute else o)
               for o in scene.objects]
    sentences = [world._count_sentence(len(scene.objects), family)]
    sentences += [world._object_sentence(o, family) for o in objects]
    if rng.random() < habits.invented_object:
        invented = _invented_object(scene, rng)
        if invented is not None:
            sentences.append(world._object_sentence(invented, family))
    if not rng.random() < habits.omitted_relations:
        # relations are stated about the true layout: the slip above is about one attribute, not the whole scene
        sentences += [world._relation_sentence(a, r, b, family) for a, r, b in world.canonical_relations(scene)]
    if rng.random() < habits.repeated_sentence and len(sentences) > 1:
        k = 1 + int(rng.integers(len(sentences) - 1))  # an object or relation sentence, said again right after
        sentences.insert(k + 1, sentences[k])
    return " ".join(sentences)


# The metadata key under which ShapesWorld records carry the imperfect caption (shapes_world_records).
WARM_START_KEY = "warm_start_caption"


def sft_target(metadata: object, references: "list[str] | tuple[str, ...]") -> str:
    """What the warm start is fitted to for one record: its imperfect caption when the record carries one
    (`metadata[WARM_START_KEY]`), else its first reference caption."""
    caption = metadata.get(WARM_START_KEY) if isinstance(metadata, dict) else None
    if caption:
        return str(caption)
    if not references:
        raise ValueError("a record has neither metadata['warm_start_caption'] nor a reference caption to fit")
    return str(references[0])
