"""Host M-RoPE positions against HF `get_rope_index` (given `mm_token_type_ids`, as the HF forward needs)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
import torch

from balcap_jax.models.qwen2_5_vl.rope_index import get_rope_index, image_token_count, text_positions
from tests.models import qwen_fixtures as fx

MERGE = 2


@pytest.fixture(scope="module")
def hf_model():
    return fx.tiny_qwen_hf_model(seed=0)


def _row(rng, grids, text_lengths):
    """text, image, text, image, ..., text with the given lengths."""
    parts = [fx.random_text_ids(rng, text_lengths[0])]
    for grid, text_len in zip(grids, text_lengths[1:]):
        parts += [fx.image_placeholder(grid, MERGE), fx.random_text_ids(rng, text_len)]
    return np.concatenate(parts)


def _pad_batch(rows, side_per_row, pad_id=0):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), bool)
    for i, (row, side) in enumerate(zip(rows, side_per_row)):
        sl = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, sl], mask[i, sl] = row, True
    return ids, mask


def _hf_rope_index(hf_model, ids, mask, grids):
    token_types = (ids == fx.IMAGE_TOKEN_ID).astype(np.int64)
    positions, deltas = hf_model.model.get_rope_index(
        torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy(token_types),
        image_grid_thw=torch.tensor(grids, dtype=torch.long) if len(grids) else None,
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
    )
    return positions.numpy(), deltas.numpy()[:, 0]


CASES = {
    "one_image": ([[(1, 4, 6)]], ["right"]),
    "three_sizes_one_row": ([[(1, 4, 6), (1, 8, 4), (1, 2, 2)]], ["right"]),
    "mixed_left_padding": ([[(1, 6, 4)], [], [(1, 2, 4), (1, 4, 4)]], ["left", "left", "left"]),
    "mixed_right_padding": ([[(1, 6, 4)], [(1, 4, 8), (1, 2, 2)], []], ["right", "right", "right"]),
    "temporal_grid": ([[(2, 4, 4)]], ["right"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_hf_get_rope_index(hf_model, case):
    row_grids, sides = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    rows = [_row(rng, grids, rng.integers(1, 40, size=len(grids) + 1)) for grids in row_grids]
    ids, mask = _pad_batch(rows, sides)
    grids = [g for gs in row_grids for g in gs]
    if all(len(gs) == 0 for gs in row_grids):
        pytest.skip("HF needs at least one image")
    expected_pos, expected_delta = _hf_rope_index(hf_model, ids, mask, grids)
    positions, deltas = get_rope_index(
        ids, mask, np.asarray(grids) if grids else None, image_token_id=fx.IMAGE_TOKEN_ID,
        spatial_merge_size=MERGE,
    )
    assert positions.dtype == np.int32 and positions.shape == (3, *ids.shape)
    np.testing.assert_array_equal(positions[:, mask], expected_pos[:, mask])
    np.testing.assert_array_equal(positions[:, ~mask], 0)
    np.testing.assert_array_equal(deltas, expected_delta)


def test_padding_side_does_not_change_real_positions():
    rng = np.random.default_rng(0)
    rows = [_row(rng, [(1, 4, 6)], [5, 9]), _row(rng, [], [30])]
    left_ids, left_mask = _pad_batch(rows, ["left", "left"])
    right_ids, right_mask = _pad_batch(rows, ["right", "right"])
    kw = dict(image_token_id=fx.IMAGE_TOKEN_ID, spatial_merge_size=MERGE)
    left, left_d = get_rope_index(left_ids, left_mask, np.array([(1, 4, 6)]), **kw)
    right, right_d = get_rope_index(right_ids, right_mask, np.array([(1, 4, 6)]), **kw)
    np.testing.assert_array_equal(left[:, left_mask], right[:, right_mask])
    np.testing.assert_array_equal(left_d, right_d)


def test_text_only_batch_is_arange_on_all_axes():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], bool)
    ids = np.where(mask, 7, 0)
    positions, deltas = get_rope_index(ids, mask, None, image_token_id=fx.IMAGE_TOKEN_ID, spatial_merge_size=2)
    expected = text_positions(mask)
    np.testing.assert_array_equal(expected, [[0, 0, 0, 1, 2], [0, 1, 2, 3, 0]])
    for axis in range(3):
        np.testing.assert_array_equal(positions[axis], expected)
    np.testing.assert_array_equal(deltas, [0, 0])


def test_image_position_layout_by_hand():
    # 2 text tokens, one 1x4x6 image (2x3 merged), 1 text token.
    ids = np.array([[1, 2] + [fx.IMAGE_TOKEN_ID] * 6 + [3]])
    positions, deltas = get_rope_index(ids, None, np.array([[1, 4, 6]]), image_token_id=fx.IMAGE_TOKEN_ID,
                                       spatial_merge_size=2)
    np.testing.assert_array_equal(positions[0, 0], [0, 1, 2, 2, 2, 2, 2, 2, 5])
    np.testing.assert_array_equal(positions[1, 0], [0, 1, 2, 2, 2, 3, 3, 3, 5])
    np.testing.assert_array_equal(positions[2, 0], [0, 1, 2, 3, 4, 2, 3, 4, 5])
    assert deltas[0] == 6 - 9


@pytest.mark.parametrize(
    "n_tokens, grids, match",
    [
        (5, [[1, 4, 6]], "needs 6"),
        (6, [[1, 4, 6], [1, 2, 2]], "needs 7"),
        (6, [[1, 3, 6]], "divisible"),
    ],
)
def test_token_count_mismatch_is_a_clear_error(n_tokens, grids, match):
    ids = np.array([[1] + [fx.IMAGE_TOKEN_ID] * n_tokens + [2]])
    with pytest.raises(ValueError, match=match):
        get_rope_index(ids, None, np.array(grids), image_token_id=fx.IMAGE_TOKEN_ID, spatial_merge_size=2)


def test_split_image_run_is_a_clear_error():
    ids = np.array([[fx.IMAGE_TOKEN_ID] * 3 + [1] + [fx.IMAGE_TOKEN_ID] * 3])
    with pytest.raises(ValueError, match="consecutive"):
        get_rope_index(ids, None, np.array([[1, 4, 6]]), image_token_id=fx.IMAGE_TOKEN_ID, spatial_merge_size=2)


def test_image_token_count():
    np.testing.assert_array_equal(image_token_count(np.array([[1, 4, 6], [2, 2, 2]]), 2), [6, 2])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_layouts_match_hf(hf_model, data):
    """Random rows (0-3 images of random even grids, random text runs, left or right padding) vs HF."""
    n_rows = data.draw(st.integers(1, 3))
    side = data.draw(st.sampled_from(["left", "right"]))
    grid = st.tuples(st.just(1), st.integers(1, 5).map(lambda v: 2 * v), st.integers(1, 5).map(lambda v: 2 * v))
    row_grids = [data.draw(st.lists(grid, max_size=3)) for _ in range(n_rows)]
    if not any(row_grids):
        row_grids[0] = [(1, 2, 2)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    rows = [_row(rng, grids, rng.integers(0, 12, size=len(grids) + 1) + (0 if grids else 1)) for grids in row_grids]
    ids, mask = _pad_batch(rows, [side] * n_rows)
    grids = [g for gs in row_grids for g in gs]
    expected_pos, expected_delta = _hf_rope_index(hf_model, ids, mask, grids)
    positions, deltas = get_rope_index(ids, mask, np.asarray(grids), image_token_id=fx.IMAGE_TOKEN_ID,
                                       spatial_merge_size=MERGE)  # fmt: skip
    np.testing.assert_array_equal(positions[:, mask], expected_pos[:, mask])
    np.testing.assert_array_equal(deltas, expected_delta)
