"""ShapesWorld: determinism, scene invariants, rendering matches the scene graph, facts, references, questions."""

import dataclasses

import numpy as np
import pytest

from balcap_jax.data import shapes_world as W


def test_same_seed_and_index_give_identical_examples():
    a, b = W.generate_example(7, 3), W.generate_example(7, 3)
    assert W.encode_png(a.image) == W.encode_png(b.image)
    assert a.references == b.references and a.questions == b.questions and a.scene == b.scene


def test_different_indices_give_different_scenes():
    scenes = {W.generate_example(0, i).scene for i in range(20)}
    assert len(scenes) == 20


@pytest.mark.parametrize("index", range(40))
def test_scene_invariants(index):
    config = W.WorldConfig()
    scene = W.generate_example(1, index, config).scene
    assert config.min_objects <= len(scene.objects) <= config.max_objects
    assert len({o.name for o in scene.objects}) == len(scene.objects), "(colour, shape) must be unique"
    assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects), "one object per cell"
    assert [(o.row, o.col) for o in scene.objects] == sorted((o.row, o.col) for o in scene.objects)
    cell = config.image_size / W.GRID
    for o in scene.objects:
        x, y = o.center_xy
        assert o.col * cell + o.radius <= x + 1e-6 and x + o.radius <= (o.col + 1) * cell + 1e-6
        assert o.row * cell + o.radius <= y + 1e-6 and y + o.radius <= (o.row + 1) * cell + 1e-6


@pytest.mark.parametrize("index", range(10))
def test_rendered_pixel_at_each_centre_has_the_object_colour(index):
    example = W.generate_example(2, index)
    pixels = np.asarray(example.image)
    assert pixels.shape == (112, 112, 3)
    for o in example.scene.objects:
        x, y = (int(round(v)) for v in o.center_xy)
        np.testing.assert_array_equal(pixels[y, x], W.COLOURS[o.colour])
    corner = pixels[0, 0] if all((o.row, o.col) != (0, 0) for o in example.scene.objects) else None
    if corner is not None:
        np.testing.assert_array_equal(corner, W.BACKGROUND)


def test_every_object_count_and_all_shapes_and_colours_occur():
    scenes = [W.generate_example(3, i).scene for i in range(200)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4, 5}
    assert {o.shape for s in scenes for o in s.objects} == set(W.SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(W.COLOURS)
    assert {o.size for s in scenes for o in s.objects} == set(W.SIZES)


def test_scene_graph_dict_round_trip_and_errors():
    scene = W.generate_example(0, 5).scene
    assert W.SceneGraph.from_dict(scene.to_dict()) == scene
    with pytest.raises(ValueError, match="objects"):
        W.SceneGraph.from_dict({"image_size": 112})
    bad = scene.to_dict()
    bad["objects"][0]["row"] = 7
    with pytest.raises(ValueError, match=r"objects\[0\]"):
        W.SceneGraph.from_dict(bad)
    dup = scene.to_dict()
    dup["objects"] = dup["objects"] * 2
    with pytest.raises(ValueError, match="unique"):
        W.SceneGraph.from_dict(dup)


def _obj(shape, colour, row, col, size="small"):
    return W.SceneObject(shape, colour, size, row, col, (0.0, 0.0), 1.0)


def test_relations_follow_grid_geometry():
    a, b, c = _obj("circle", "red", 0, 0), _obj("square", "blue", 0, 2), _obj("diamond", "green", 2, 0)
    assert W.relation_holds(a, "left of", b) and W.relation_holds(b, "right of", a)
    assert not W.relation_holds(a, "left of", c) and not W.relation_holds(a, "right of", c)
    assert W.relation_holds(a, "above", c) and W.relation_holds(c, "below", a)
    with pytest.raises(ValueError, match="relation"):
        W.relation_holds(a, "near", b)
    scene = W.SceneGraph((a, b, c), 112)
    assert [(x.name, r, y.name) for x, r, y in W.canonical_relations(scene)] == [
        ("red circle", "left of", "blue square"),
        ("blue square", "right of", "green diamond"),
    ]


def test_scene_facts_count():
    scene = W.generate_example(4, 0).scene
    n = len(scene.objects)
    assert len(W.scene_facts(scene)) == 1 + 3 * n + (n - 1)
    assert len(W.scene_facts(scene, include_relations=False)) == 1 + 3 * n
    assert ("count", n) in W.scene_facts(scene)


def test_references_mention_every_object_and_vary():
    example = W.generate_example(5, 2, W.WorldConfig(min_objects=3, max_objects=3))
    assert len(example.references) == 3 and len(set(example.references)) == 3
    for ref in example.references:
        for o in example.scene.objects:
            assert f"{o.size} {o.colour} {o.shape}" in ref
    families = {ref.split()[0] for i in range(30) for ref in W.generate_example(5, i).references}
    assert len(families) >= 3


def test_questions_cover_every_kind_in_balance():
    config = W.WorldConfig(min_objects=5, max_objects=5)
    kinds = [q["query"]["kind"] for i in range(20) for q in W.generate_example(9, i, config).questions]
    assert len(kinds) == 20 * 8
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert set(counts) == {"count", "colour", "size", "region", "exists", "relation"}
    assert max(counts.values()) <= 2 * 20 and counts["count"] == 20  # at most one count question per image


def test_questions_have_valid_answers_consistent_with_the_scene():
    for i in range(30):
        example = W.generate_example(6, i)
        scene = example.scene
        assert 1 <= len(example.questions) <= 8
        assert len({q["question"] for q in example.questions}) == len(example.questions)
        for q in example.questions:
            truth = q["choices"][q["answer"]]
            query = q["query"]
            if query["kind"] == "count":
                assert truth == str(len(scene.objects))
            elif query["kind"] == "exists":
                present = any((o.colour, o.shape) == (query["colour"], query["shape"]) for o in scene.objects)
                assert truth == ("yes" if present else "no")
            elif query["kind"] == "colour":
                (match,) = [o for o in scene.objects if o.shape == query["shape"]]
                assert truth == match.colour
            elif query["kind"] == "relation":
                by_name = {(o.colour, o.shape): o for o in scene.objects}
                holds = W.relation_holds(by_name[tuple(query["subject"])], query["relation"],
                                         by_name[tuple(query["object"])])
                assert truth == ("yes" if holds else "no")


@pytest.mark.parametrize(
    "field, value, match",
    [("min_objects", 0, "min_objects"), ("max_objects", 10, "max_objects"), ("image_size", 20, "image_size"),
     ("num_references", 0, "num_references")],
)
def test_world_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(W.WorldConfig(), **{field: value})


def test_custom_image_size_and_object_range():
    config = W.WorldConfig(image_size=224, min_objects=5, max_objects=5)
    example = W.generate_example(0, 0, config)
    assert example.image.size == (224, 224) and len(example.scene.objects) == 5
