"""Preserve-aware target and low-rank structure (docs/METHOD.md §14-§15) against least-squares and SVD oracles."""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import ConfigError
from model_tailor.kernel.compensation import reconstruction_error
from model_tailor.kernel.hessian import factor_hessian, normalize_hessian
from model_tailor.kernel.objective import preserve_target
from model_tailor.kernel.structure import lowrank_patch, tailor_weight_structured
from model_tailor.kernel.tailor import tailor_weight


def _data(rows=6, cols=8, seed=0, tokens=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X_t = torch.randn(cols, tokens, generator=g, dtype=dtype) * torch.linspace(0.5, 2, cols, dtype=dtype)[:, None]
    X_o = torch.randn(cols, tokens, generator=g, dtype=dtype) + 0.5
    base = torch.randn(rows, cols, generator=g, dtype=dtype)
    ft = base + 0.3 * torch.randn(rows, cols, generator=g, dtype=dtype)
    return base, ft, X_t, X_o


def _combined(W, base, ft, X_t, X_o, lam):
    """J(W) with each data set scaled to unit mean eigenvalue, as preserve_target normalises them."""
    s_t = float((X_t @ X_t.T).diagonal().mean())
    s_o = float((X_o @ X_o.T).diagonal().mean())
    return float(((W - ft) @ X_t).square().sum()) / s_t + lam * float(((W - base) @ X_o).square().sum()) / s_o


def test_lam_zero_gives_finetuned_and_reduces_to_plain_tailoring():
    base, ft, X_t, X_o = _data(dtype=torch.float32)
    H_t, H_o = X_t @ X_t.T, X_o @ X_o.T
    W_star, H_c = preserve_target(base, ft, H_t, H_o, 0.0)
    assert torch.equal(W_star, ft)
    assert torch.equal(H_c, normalize_hessian(H_t))
    a = tailor_weight(base, ft, H_c, target=W_star, density=0.25, block_size=4)
    b = tailor_weight(base, ft, normalize_hessian(H_t), density=0.25, block_size=4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.keep_mask, b.keep_mask)


@pytest.mark.parametrize("lam", [0.3, 1.0, 5.0])
def test_dense_closed_form_equals_least_squares_of_the_combined_objective(lam):
    base, ft, X_t, X_o = _data(seed=1)
    W_star, _ = preserve_target(base, ft, X_t @ X_t.T, X_o @ X_o.T, lam, percdamp=0.0)
    # Stack both terms into one least-squares problem: W [Xt', sqrt(lam) Xo'] ~ [ft Xt', sqrt(lam) base Xo']
    s_t = float((X_t @ X_t.T).diagonal().mean()) ** 0.5
    s_o = float((X_o @ X_o.T).diagonal().mean()) ** 0.5
    Z = torch.cat([X_t / s_t, lam**0.5 * X_o / s_o], dim=1)
    Y = torch.cat([ft @ X_t / s_t, lam**0.5 * base @ X_o / s_o], dim=1)
    W_ls = torch.linalg.lstsq(Z.T, Y.T).solution.T
    torch.testing.assert_close(W_star, W_ls, rtol=1e-9, atol=1e-10)


def test_damped_closed_form_adds_a_pull_towards_finetuned():
    base, ft, X_t, X_o = _data(seed=2)
    lam, percdamp = 2.0, 0.05
    W_star, H_c = preserve_target(base, ft, X_t @ X_t.T, X_o @ X_o.T, lam, percdamp=percdamp)
    d = percdamp * float(H_c.diagonal().mean())
    s_t = float((X_t @ X_t.T).diagonal().mean()) ** 0.5
    s_o = float((X_o @ X_o.T).diagonal().mean()) ** 0.5
    eye = torch.eye(8, dtype=torch.float64)
    Z = torch.cat([X_t / s_t, lam**0.5 * X_o / s_o, d**0.5 * eye], dim=1)
    Y = torch.cat([ft @ X_t / s_t, lam**0.5 * base @ X_o / s_o, d**0.5 * ft], dim=1)
    torch.testing.assert_close(W_star, torch.linalg.lstsq(Z.T, Y.T).solution.T, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("compensation", ["obs", "official", "exact", "none"])
def test_sparse_result_never_beats_the_masked_oracle_of_the_combined_objective(compensation):
    base, ft, X_t, X_o = _data(seed=3)
    lam = 1.5
    W_star, H_c = preserve_target(base, ft, X_t @ X_t.T, X_o @ X_o.T, lam, percdamp=0.0)
    out = tailor_weight(
        base, ft, H_c, target=W_star, density=0.4, block_size=4, compensation=compensation, percdamp=0.0
    )
    keep = out.keep_mask
    s_t = float((X_t @ X_t.T).diagonal().mean()) ** 0.5
    s_o = float((X_o @ X_o.T).diagonal().mean()) ** 0.5
    Z = torch.cat([X_t / s_t, lam**0.5 * X_o / s_o], dim=1)
    Y = torch.cat([ft @ X_t / s_t, lam**0.5 * base @ X_o / s_o], dim=1)
    oracle = base.clone()
    for i in range(base.shape[0]):  # w_K free, w_P = base: lstsq on the kept columns of the residual
        K, P = keep[i], ~keep[i]
        if K.any():
            resid = Y[i] - base[i, P] @ Z[P]
            oracle[i, K] = torch.linalg.lstsq(Z[K].T, resid[:, None]).solution[:, 0]
    assert _combined(out.weight, base, ft, X_t, X_o, lam) >= _combined(oracle, base, ft, X_t, X_o, lam) * (1 - 1e-9)
    # Undamped, the kernel's objective is J up to a constant, so the exact decorator reaches the oracle.
    if compensation == "exact":
        torch.testing.assert_close(out.weight, oracle, rtol=1e-6, atol=1e-8)


def test_lowrank_at_full_rank_reproduces_target():
    base, ft, X_t, _ = _data(rows=5, cols=7)
    A, B = lowrank_patch(base, ft, X_t @ X_t.T, rank=5)
    assert A.shape == (5, 5) and B.shape == (5, 7)
    torch.testing.assert_close(base + A @ B, ft, rtol=1e-10, atol=1e-10)
    A0, B0 = lowrank_patch(base, ft, X_t @ X_t.T, rank=0)
    assert A0.shape == (5, 0) and B0.shape == (0, 7)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_weighted_svd_beats_random_rank_r_perturbations(rank):
    base, ft, X_t, _ = _data(rows=7, cols=9, seed=4)
    H = X_t @ X_t.T
    H_damped = factor_hessian(H).H_damped
    A, B = lowrank_patch(base, ft, H, rank)
    best = reconstruction_error(base + A @ B, ft, H_damped)
    g = torch.Generator().manual_seed(rank)
    for scale in (1e-3, 1e-1, 1.0):
        for _ in range(10):
            A2 = A + scale * torch.randn(A.shape, generator=g, dtype=A.dtype)
            B2 = B + scale * torch.randn(B.shape, generator=g, dtype=B.dtype)
            assert reconstruction_error(base + A2 @ B2, ft, H_damped) >= best * (1 - 1e-12)
    # ... and the plain (unweighted) truncated SVD of the delta is no better in the weighted norm.
    P, S, Qh = torch.linalg.svd(ft - base)
    plain = base + (P[:, :rank] * S[:rank]) @ Qh[:rank]
    assert reconstruction_error(plain, ft, H_damped) >= best * (1 - 1e-12)


@pytest.mark.parametrize("structure", ["sparse", "lowrank", "sparse+lowrank"])
def test_structured_patches_respect_the_parameter_budget(structure):
    base, ft, X_t, _ = _data(rows=12, cols=20, seed=5, tokens=60, dtype=torch.float32)
    H = X_t @ X_t.T
    out = tailor_weight_structured(base, ft, H, structure=structure, density=0.5, block_size=8)
    budget = 0.5 * 12 * 20
    rank = 0 if out.lowrank is None else out.lowrank[0].shape[1]
    assert out.stats.kept + rank * (12 + 20) <= budget
    assert torch.equal(out.weight[~out.keep_mask], base[~out.keep_mask])
    full = out.weight + (0 if out.lowrank is None else out.lowrank[0] @ out.lowrank[1])
    assert torch.isfinite(full).all()
    if structure == "lowrank":
        assert rank == int(budget // 32) and out.stats.kept == 0
    if structure == "sparse+lowrank":
        assert rank == int(budget / 2 // 32) and out.stats.kept > 0


def test_invalid_options_raise():
    base, ft, X_t, X_o = _data()
    H = X_t @ X_t.T
    with pytest.raises(ConfigError):
        preserve_target(base, ft, H, X_o @ X_o.T, -1.0)
    with pytest.raises(ConfigError):
        lowrank_patch(base, ft, H, -1)
    with pytest.raises(ConfigError):
        tailor_weight_structured(base, ft, H, structure="dense")
    with pytest.raises(ConfigError):
        tailor_weight_structured(base, ft, H, structure="lowrank", density=0.0)
