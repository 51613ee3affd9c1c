"""The warm-start captioner's habits: clean when off, each habit at its rate and with the effect on the judge it is
meant to have, reference vocabulary only, deterministic, carried by the records, read by `sft_target`."""

import json
import os

import numpy as np
import pytest

from balcap_jax.data import shapes_world as W
from balcap_jax.data import shapes_world_grammar as grammar
from balcap_jax.data import shapes_world_records as records
from balcap_jax.data import shapes_world_warm_start as S
from balcap_jax.rewards.shapes_world import components as J

TWO = W.WorldConfig(min_objects=2, max_objects=2)


def _scores(caption: str, scene: W.SceneGraph) -> tuple[float, float, float]:
    parsed = grammar.parse_caption(caption)
    p, verdicts = J.precision(parsed, scene)
    r, _ = J.recall(verdicts, scene)
    return p, r, J.linguistic(parsed)[0]


def _scenes(n: int, config: W.WorldConfig = TWO) -> list[W.SceneGraph]:
    return [W.generate_example(0, i, config).scene for i in range(n)]


@pytest.mark.parametrize("index", range(12))
def test_no_habits_gives_a_perfect_caption(index):
    scene = W.generate_example(0, index, W.WorldConfig(max_objects=4)).scene
    caption = S.imperfect_caption(scene, S.habit_rng(0, index), S.CaptionerHabits(0, 0, 0, 0))
    assert _scores(caption, scene) == (1.0, 1.0, 1.0)


def test_same_seed_and_index_give_the_same_caption_and_streams_differ_from_the_world():
    scene = _scenes(1)[0]
    a = S.imperfect_caption(scene, S.habit_rng(3, 0))
    b = S.imperfect_caption(scene, S.habit_rng(3, 0))
    assert a == b
    captions = {S.imperfect_caption(s, S.habit_rng(0, i)) for i, s in enumerate(_scenes(20))}
    assert len(captions) == 20


def _rate(habit: str, effect, n: int = 300) -> float:
    """Fraction of captions with only `habit` switched on (p = 0.5) that show `effect(p, r, l)`."""
    fields = {"invented_object": 0.0, "omitted_relations": 0.0, "wrong_attribute": 0.0, "repeated_sentence": 0.0}
    habits = S.CaptionerHabits(**{**fields, habit: 0.5})
    hits = [effect(*_scores(S.imperfect_caption(s, S.habit_rng(1, i), habits), s)) for i, s in enumerate(_scenes(n))]
    return float(np.mean(hits))


@pytest.mark.parametrize(
    "habit, effect",
    [
        # an invented object is wrong but leaves coverage whole
        ("invented_object", lambda p, r, l: p < 1 and r == 1 and l == 1),
        # terseness: every claim right, the relation not covered
        ("omitted_relations", lambda p, r, l: p == 1 and r < 1 and l == 1),
        # a repeat costs linguistic quality only (the repeated claim is a duplicate, not a wrong claim)
        ("repeated_sentence", lambda p, r, l: p == 1 and r == 1 and l < 1),
    ],
)
def test_each_habit_occurs_at_its_rate_with_its_effect_on_the_judge(habit, effect):
    # 300 draws at p = 0.5: the binomial standard error is 0.029; 0.1 is over 3 of them
    assert abs(_rate(habit, effect) - 0.5) < 0.1


def test_a_wrong_attribute_lowers_precision_and_recall():
    habits = S.CaptionerHabits(0, 0, 1.0, 0)
    scores = [_scores(S.imperfect_caption(s, S.habit_rng(2, i), habits), s) for i, s in enumerate(_scenes(60))]
    assert all(p < 1 and r < 1 for p, r, _ in scores)


def test_default_habits_use_only_the_references_vocabulary():
    examples = [W.generate_example(0, i, W.WorldConfig(max_objects=2)) for i in range(300)]
    reference_words = {w for e in examples for ref in e.references for w in grammar.tokenize(ref)}
    caption_words = {w for i, e in enumerate(examples)
                     for w in grammar.tokenize(S.imperfect_caption(e.scene, S.habit_rng(0, i)))}
    assert caption_words <= reference_words, caption_words - reference_words


def test_default_habits_make_the_warm_start_targets_imperfect_on_average():
    scenes = _scenes(300)
    scores = np.array([_scores(S.imperfect_caption(s, S.habit_rng(0, i)), s) for i, s in enumerate(scenes)])
    p, r, l = scores.mean(0)
    assert 0.6 < p < 0.95 and 0.6 < r < 0.98 and l < 1.0


@pytest.mark.parametrize("field", ["invented_object", "omitted_relations", "wrong_attribute", "repeated_sentence"])
def test_a_habit_rate_outside_0_1_names_the_field(field):
    with pytest.raises(ValueError, match=f"CaptionerHabits.{field}"):
        S.CaptionerHabits(**{field: 1.5})


def test_world_config_rejects_a_wrong_number_of_habit_rates():
    with pytest.raises(ValueError, match="captioner_habits"):
        W.WorldConfig(captioner_habits=(0.5, 0.5))


def _metadata(directory: str, config: W.WorldConfig) -> list[dict]:
    paths = records.write_shapes_world_manifests(directory, seed=0, split_sizes={"train": 4}, config=config)
    with open(paths["train"]) as f:
        return [json.loads(line)["metadata"] for line in f]


def test_records_carry_the_warm_start_caption_only_for_a_world_with_habits(tmp_path):
    plain = _metadata(os.path.join(tmp_path, "plain"), W.WorldConfig(max_objects=2))
    assert all(S.WARM_START_KEY not in m for m in plain)
    habits = (0.6, 0.6, 0.1, 0.2)
    flawed = _metadata(os.path.join(tmp_path, "flawed"), W.WorldConfig(max_objects=2, captioner_habits=habits))
    for index, meta in enumerate(flawed):
        scene = W.SceneGraph.from_dict(meta["scene_graph"])
        expected = S.imperfect_caption(scene, S.habit_rng(0, index), S.CaptionerHabits(*habits))
        assert meta[S.WARM_START_KEY] == expected


def test_sft_target_prefers_the_warm_start_caption_and_falls_back_to_the_first_reference():
    assert S.sft_target({S.WARM_START_KEY: "A flawed caption."}, ["The reference."]) == "A flawed caption."
    assert S.sft_target({"scene_graph": {}}, ["The reference.", "Another."]) == "The reference."
    assert S.sft_target(None, ("The reference.",)) == "The reference."
    with pytest.raises(ValueError, match="warm_start_caption"):
        S.sft_target({}, [])
