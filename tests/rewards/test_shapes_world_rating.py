"""The ShapesWorld linguistic rater: integer 1-10 ratings per axis, (mean - 1) / 9, what each axis reacts to."""

import pytest

from balcap_jax.data import shapes_world as W
from balcap_jax.data.shapes_world_grammar import parse_caption
from balcap_jax.rewards.shapes_world import rating as R


@pytest.mark.parametrize("share, rating", [(0.0, 1), (1.0, 10), (0.5, 5), (0.95, 10), (0.04, 1), (0.3, 4)])
def test_shares_map_onto_the_ten_point_scale(share, rating):
    assert R.to_rating(share) == rating


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_0_1_is_rejected(share):
    with pytest.raises(ValueError, match="rating share"):
        R.to_rating(share)


def test_scores_are_on_ten_levels_per_axis_and_in_0_1():
    assert R.from_ratings({"clarity": 10, "fluency": 10, "coherence": 10}) == 1.0
    assert R.from_ratings({"clarity": 1, "fluency": 1, "coherence": 1}) == 0.0
    assert R.from_ratings({"clarity": 4, "fluency": 7, "coherence": 10}) == pytest.approx(18 / 27)


@pytest.mark.parametrize("index", range(8))
def test_every_reference_is_rated_ten_on_every_axis(index):
    for ref in W.generate_example(5, index).references:
        assert R.linguistic_ratings(parse_caption(ref)) == {"clarity": 10, "fluency": 10, "coherence": 10}


def test_each_axis_reacts_to_its_own_flaw():
    clean = "There is a small red circle in the top left. There is a large blue square in the center."
    repeated = clean + " There is a large blue square in the center."
    ungrammatical = "There is small red circle in the top left. There is a large blue square in the center."
    unclear = "there is a small red circle in the top left. There is a large blue square in the center"
    rated = {name: R.linguistic_ratings(parse_caption(c))
             for name, c in [("clean", clean), ("repeated", repeated), ("ungrammatical", ungrammatical),
                             ("unclear", unclear)]}
    assert rated["clean"] == {"clarity": 10, "fluency": 10, "coherence": 10}
    assert rated["repeated"]["coherence"] < 10 and rated["repeated"]["fluency"] == 10
    assert rated["ungrammatical"]["fluency"] < 10 and rated["ungrammatical"]["coherence"] == 10
    assert rated["unclear"]["clarity"] < 10 and rated["unclear"]["fluency"] == 10


def test_an_empty_caption_is_rated_lowest():
    assert R.rated_linguistic(parse_caption(""))[0] == 0.0
