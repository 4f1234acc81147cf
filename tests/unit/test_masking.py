"""Exact keep counts, stable ties and granularities (docs/METHOD.md §7, D9-D10)."""

from __future__ import annotations

import warnings

import pytest
import torch

from model_tailor.errors import ConfigError, NumericalError
from model_tailor.kernel.masking import keep_count, select_keep_mask, select_keep_masks_global


@pytest.mark.parametrize(
    ("density", "m", "k"),
    [(0.29, 100, 29), (0.1, 10, 1), (0.1, 9, 0), (0.5, 3, 1), (1.0, 7, 7), (0.07, 100, 7), (0.3, 10, 3)],
)
def test_keep_count_is_floor_robust_to_float_error(density, m, k):
    assert keep_count(density, m) == k


def test_keep_count_tolerance_is_named():
    assert keep_count(0.3, 10, tolerance="absolute") == 3  # 2.9999999999999996 snaps under both rules
    with pytest.raises(ConfigError, match="tolerance"):
        keep_count(0.3, 10, tolerance="loose")


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_density_outside_unit_interval_raises(density):
    with pytest.raises(ConfigError, match="density"):
        keep_count(density, 10)
    with pytest.raises(ConfigError, match="density"):
        select_keep_mask(torch.zeros(2, 2), density)


@pytest.mark.parametrize("granularity", ["block", "row", "tensor"])
def test_all_tied_scores_keep_exact_counts(granularity):
    scores = torch.zeros(6, 10)
    keep = select_keep_mask(scores, 0.3, granularity=granularity, block_size=4)
    if granularity == "tensor":
        assert int(keep.sum()) == 18
        # ties: lower flat index wins, so the first 18 entries in row-major order
        assert keep.reshape(-1)[:18].all() and not keep.reshape(-1)[18:].any()
    elif granularity == "row":
        assert keep.sum(dim=1).tolist() == [3] * 6
        assert keep[:, :3].all() and not keep[:, 3:].any()
    else:  # blocks of 4, 4, 2 columns: floor(0.3*24)=7, 7, floor(0.3*12)=3
        assert [int(keep[:, b:e].sum()) for b, e in ((0, 4), (4, 8), (8, 10))] == [7, 7, 3]
        assert keep[:, :4].reshape(-1)[:7].all()  # row-major inside the block


def test_row_granularity_keeps_the_k_best_per_row():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0], [9.0, 0.0, 8.0, 7.0]])
    keep = select_keep_mask(scores, 0.5, granularity="row")
    assert keep.tolist() == [[False, True, True, False], [True, False, True, False]]


def test_block_granularity_pools_rows_within_a_block():
    scores = torch.tensor([[1.0, 2.0, 10.0, 0.0], [3.0, 4.0, 0.0, 0.0]])
    keep = select_keep_mask(scores, 0.5, granularity="block", block_size=2)
    # block 2 = [[10, 0], [0, 0]]: 10, then the tie at 0 goes to the lowest flat index (row 0)
    assert keep.tolist() == [[False, False, True, True], [True, True, False, False]]


def test_density_one_keeps_everything():
    scores = torch.randn(5, 7)
    for granularity in ("block", "row", "tensor"):
        assert select_keep_mask(scores, 1.0, granularity=granularity, block_size=3).all()


def test_zero_keep_count_gives_empty_group_and_one_warning():
    with pytest.warns(UserWarning, match="keeps 0 entries"):
        keep = select_keep_mask(torch.randn(2, 4), 0.1, granularity="row")
    assert not keep.any()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        select_keep_mask(torch.randn(1, 40), 0.1, granularity="block", block_size=4)  # 10 empty blocks
    assert len(caught) == 1


def test_nan_scores_and_bad_options_raise():
    with pytest.raises(NumericalError):
        select_keep_mask(torch.tensor([[float("nan"), 1.0]]), 0.5)
    with pytest.raises(ConfigError, match="granularity"):
        select_keep_mask(torch.zeros(2, 2), 0.5, granularity="global")


def test_global_selection_is_one_exact_top_k_across_tensors():
    scores = {"a": torch.tensor([[1.0, 9.0], [2.0, 3.0]]), "b": torch.tensor([[8.0, 0.0, 7.0]])}
    keep = select_keep_masks_global(scores, 3 / 7)
    assert keep["a"].tolist() == [[False, True], [False, False]]
    assert keep["b"].tolist() == [[True, False, True]]


def test_global_ties_follow_mapping_order_then_flat_index():
    scores = {"x": torch.zeros(2, 2), "y": torch.zeros(1, 4)}
    keep = select_keep_masks_global(scores, 0.75)  # 6 of 8
    assert keep["x"].all()
    assert keep["y"].tolist() == [[True, True, False, False]]
    assert select_keep_masks_global({}, 0.5) == {}
