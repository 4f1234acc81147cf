"""Salience, sensitivity, per-row z-scores and fusion (docs/METHOD.md §4-§6) on hand-computed tensors."""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import ConfigError, ShapeMismatchError
from model_tailor.kernel.scoring import fuse_scores, salience, sensitivity, zscore_rows


def test_salience_is_absolute_delta():
    base = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    ft = torch.tensor([[1.5, -3.0], [0.5, -0.25]])
    assert torch.equal(salience(base, ft), torch.tensor([[0.5, 1.0], [0.0, 0.25]]))


def test_salience_of_bf16_inputs_is_fp32():
    base = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert salience(base, base + 1).dtype == torch.float32


def test_sensitivity_weight_and_revert():
    W = torch.tensor([[2.0, -1.0, 3.0]])
    U_diag = torch.tensor([1.0, 0.5, 2.0])
    base = torch.tensor([[1.0, -1.0, 1.0]])
    torch.testing.assert_close(sensitivity(W, U_diag), torch.tensor([[4.0, 4.0, 2.25]]))
    torch.testing.assert_close(sensitivity(W, U_diag, base=base, kind="revert"), torch.tensor([[1.0, 0.0, 1.0]]))


def test_sensitivity_rejects_bad_kind_missing_base_and_wrong_diag():
    W = torch.ones(2, 3)
    with pytest.raises(ConfigError):
        sensitivity(W, torch.ones(3), kind="grad")
    with pytest.raises(ConfigError, match="base"):
        sensitivity(W, torch.ones(3), kind="revert")
    with pytest.raises(ShapeMismatchError):
        sensitivity(W, torch.ones(2))


def test_zscore_rows_uses_unbiased_std_per_row():
    A = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 16.0]])
    z = zscore_rows(A)
    torch.testing.assert_close(z[0], torch.tensor([-1.0, 0.0, 1.0]))
    # row 2: mean 12, unbiased std sqrt((4+4+16)/2) = sqrt(12)
    s = 12.0**0.5
    torch.testing.assert_close(z[1], torch.tensor([-2 / s, -2 / s, 4 / s]))


def test_zscore_is_zero_where_sigma_is_zero_and_for_one_column():
    A = torch.tensor([[5.0, 5.0, 5.0], [0.0, 0.0, 0.0]])
    assert torch.equal(zscore_rows(A), torch.zeros(2, 3))
    assert torch.equal(zscore_rows(torch.tensor([[3.0], [4.0]])), torch.zeros(2, 1))


def test_fuse_scores_combines_z_scores():
    sal = torch.tensor([[1.0, 2.0, 3.0]])
    sens = torch.tensor([[3.0, 2.0, 1.0]])
    torch.testing.assert_close(fuse_scores(sal, sens, 0.8), torch.tensor([[-0.6, 0.0, 0.6]]))
    torch.testing.assert_close(fuse_scores(sal, sens, 1.0), zscore_rows(sal))
    torch.testing.assert_close(fuse_scores(sal, sens, 0.0), zscore_rows(sens))


def test_fuse_scores_alpha_one_ignores_sensitivity_entirely():
    sal = torch.tensor([[1.0, 2.0]])
    assert torch.isfinite(fuse_scores(sal, torch.full((1, 2), float("nan")), 1.0)).all()


def test_fused_score_is_invariant_to_sensitivity_scale():
    g = torch.Generator().manual_seed(0)
    sal, sens = torch.rand(4, 8, generator=g), torch.rand(4, 8, generator=g)
    torch.testing.assert_close(fuse_scores(sal, sens, 0.5), fuse_scores(sal, 1000.0 * sens, 0.5))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_fuse_scores_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        fuse_scores(torch.ones(1, 2), torch.ones(1, 2), alpha)


def test_fapm_salience_by_hand_ranks_a_change_against_its_own_weight():
    # mean |W_pre| = (1 + 2 + 4 + 0.5) / 4 = 1.875; score = |d| - 1.875 * |d| / |W_pre|
    base = torch.tensor([[1.0, -2.0], [4.0, 0.5]], dtype=torch.float64)
    delta = torch.tensor([[0.5, -1.0], [1.0, 0.25]], dtype=torch.float64)
    got = salience(base, base + delta, kind="fapm")
    assert got.dtype == torch.float64  # fp64 oracles stay fp64
    expected = torch.tensor([[0.5 - 0.9375, 1.0 - 0.9375], [1.0 - 0.46875, 0.25 - 0.9375]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    # magnitude ties (0, 1) and (1, 0); FAPM prefers the change that is small against its own weight
    assert salience(base, base + delta)[0, 1] == salience(base, base + delta)[1, 0]
    assert got[1, 0] > got[0, 1]


def test_fapm_salience_of_a_zero_base_weight_is_the_lowest_finite_score():
    # mean |W_pre| = 1.5; (0, 0) changes a zero weight: -inf in FAPM, the matrix's lowest finite score here
    base = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    delta = torch.tensor([[0.1, 1.0], [0.5, 0.2]])
    got = salience(base, base + delta, kind="fapm")
    expected = torch.tensor([[0.05, 0.25], [0.125, 0.05]])
    torch.testing.assert_close(got, expected)
    assert bool(torch.isfinite(got).all())


def test_salience_rejects_an_unknown_kind():
    with pytest.raises(ConfigError, match="salience: kind must be one of"):
        salience(torch.zeros(2, 2), torch.ones(2, 2), kind="relative")
