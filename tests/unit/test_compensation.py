"""The OBS sweep and the exact decorator against least-squares oracles (docs/METHOD.md §8)."""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import ConfigError, NumericalError, ShapeMismatchError
from model_tailor.kernel.compensation import compensate, exact_compensation, obs_sweep, reconstruction_error
from model_tailor.kernel.hessian import factor_hessian
from model_tailor.kernel.tailor import tailor_weight


def _layer(rows: int, cols: int, seed: int, tokens: int | None = None, dtype=torch.float64):
    """Correlated inputs with per-feature scales (as in docs/METHOD.md §8, smaller)."""
    g = torch.Generator().manual_seed(seed)
    n = tokens or 4 * cols
    mix = torch.randn(cols, cols, generator=g, dtype=dtype) / cols**0.5 + 0.3 * torch.eye(cols, dtype=dtype)
    X = mix @ (torch.randn(cols, n, generator=g, dtype=dtype) * torch.linspace(1, 4, cols, dtype=dtype)[:, None])
    H = 2 * X @ X.T / n
    base = 0.05 * torch.randn(rows, cols, generator=g, dtype=dtype)
    low = torch.randn(rows, 4, generator=g, dtype=dtype) @ torch.randn(4, cols, generator=g, dtype=dtype)
    ft = base + 0.01 * low + 0.01 * torch.randn(rows, cols, generator=g, dtype=dtype)
    return base, ft, H, X


def _oracle(base, target, keep, H_damped):
    """Independent per-row least squares: min (w - t) H (w - t)^T s.t. w_P = v_P."""
    W = base.clone()
    for i in range(base.shape[0]):
        K, P = keep[i].nonzero().squeeze(1), (~keep[i]).nonzero().squeeze(1)
        if len(K) == 0:
            continue
        rhs = H_damped[K][:, P] @ (target[i, P] - base[i, P])
        W[i, K] = target[i, K] + torch.linalg.solve(H_damped[K][:, K], rhs)
    return W


def _upfront(keep):
    return lambda _w, cols: keep[:, cols]


def test_hand_worked_1x3_pins_both_signs():
    U = torch.tensor([[1.0, 0.5, 0.25], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    v = torch.zeros(1, 3, dtype=torch.float64)
    # Revert column 0: E = (1 - 0) / 1 = 1; the row moves by sign * 1 * U[0, :].
    keep = torch.tensor([[False, True, True]])
    for bs in (1, 2, 3):
        obs = obs_sweep(w, v, U, _upfront(keep), sign=-1, block_size=bs).weight
        off = obs_sweep(w, v, U, _upfront(keep), sign=+1, block_size=bs).weight
        assert obs.tolist() == [[0.0, 1.5, 2.75]]
        assert off.tolist() == [[0.0, 2.5, 3.25]]
    # Revert columns 0 and 1: the second error uses the already-moved value (1.5, resp. 2.5).
    keep2 = torch.tensor([[False, False, True]])
    assert obs_sweep(w, v, U, _upfront(keep2), sign=-1).weight.tolist() == [[0.0, 0.0, 2.0]]
    assert obs_sweep(w, v, U, _upfront(keep2), sign=+1).weight.tolist() == [[0.0, 0.0, 4.5]]
    # With reverted columns first, the OBS sign is the exact optimum for H_tilde = (U^T U)^{-1}.
    H = torch.linalg.inv(U.T @ U)
    torch.testing.assert_close(exact_compensation(v, w, keep2, H), torch.tensor([[0.0, 0.0, 2.0]]).double())


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_diagonal_hessian_changes_nothing_beyond_masking(block_size):
    base, ft, _, _ = _layer(5, 12, seed=0, dtype=torch.float32)
    H = torch.diag(torch.linspace(0.5, 3.0, 12))
    keep = torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) < 0.4
    U = factor_hessian(H).U
    out = obs_sweep(ft, base, U, _upfront(keep), block_size=block_size).weight
    assert torch.equal(out, torch.where(keep, ft, base))


@pytest.mark.parametrize("seed", range(4))
def test_sweep_equals_oracle_when_reverted_columns_precede_kept(seed):
    base, ft, H, _ = _layer(6, 16, seed=seed)
    f = factor_hessian(H)
    split = torch.randint(0, 17, (6, 1), generator=torch.Generator().manual_seed(seed))
    keep = torch.arange(16)[None, :] >= split  # per row: reverted prefix, kept suffix
    oracle = _oracle(base, ft, keep, f.H_damped)
    for bs in (4, 16):
        out = obs_sweep(ft, base, f.U, _upfront(keep), block_size=bs).weight
        torch.testing.assert_close(out, oracle, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_sweep_never_beats_the_oracle(seed):
    base, ft, H, _ = _layer(8, 12, seed=seed, tokens=8)  # rank-deficient: held up by damping
    f = factor_hessian(H)
    keep = torch.rand(8, 12, generator=torch.Generator().manual_seed(100 + seed)) < 0.5
    oracle_err = reconstruction_error(_oracle(base, ft, keep, f.H_damped), ft, f.H_damped)
    for sign in (-1, 1):
        out = obs_sweep(ft, base, f.U, _upfront(keep), sign=sign, block_size=5).weight
        assert reconstruction_error(out, ft, f.H_damped) >= oracle_err * (1 - 1e-10)


@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
def test_exact_compensation_matches_oracle_on_both_solve_routes(density):
    base, ft, H, _ = _layer(10, 14, seed=3)
    f = factor_hessian(H)
    keep = torch.rand(10, 14, generator=torch.Generator().manual_seed(7)) < density
    keep[0] = True  # a fully kept row
    keep[1] = False  # a fully reverted row
    torch.testing.assert_close(
        exact_compensation(base, ft, keep, f.H_damped),
        _oracle(base, ft, keep, f.H_damped),
        rtol=1e-9,
        atol=1e-12,
    )


def test_exact_compensation_reconstructs_a_target():
    base, ft, H, _ = _layer(4, 8, seed=5)
    target = ft + 0.01
    keep = torch.rand(4, 8, generator=torch.Generator().manual_seed(2)) < 0.5
    f = factor_hessian(H)
    torch.testing.assert_close(
        exact_compensation(base, ft, keep, f.H_damped, target=target), _oracle(base, target, keep, f.H_damped)
    )


@pytest.mark.parametrize("seed", range(3))
def test_obs_sign_lowers_and_official_sign_raises_error_on_seeded_layers(seed):
    base, ft, H, _ = _layer(64, 128, seed=seed, dtype=torch.float32)
    errors = {}
    for comp in ("obs", "official"):
        out = tailor_weight(base, ft, H, density=0.1, compensation=comp, guard=False, block_size=32)
        errors[comp] = (out.stats.error_masked, out.stats.error_compensated)
    assert errors["obs"][1] < errors["obs"][0]
    assert errors["official"][1] > errors["official"][0]


@pytest.mark.parametrize("compensation", ["obs", "official", "exact", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reverted_entries_equal_base_bitwise(compensation, dtype):
    base, ft, H, _ = _layer(8, 20, seed=1, dtype=torch.float32)
    base, ft = base.to(dtype), ft.to(dtype)
    keep = torch.rand(8, 20, generator=torch.Generator().manual_seed(3)) < 0.3
    out = compensate(base, ft, keep, H.float(), compensation=compensation, block_size=8, name="l")
    assert out.dtype == dtype
    assert torch.equal(out[~keep], base[~keep])
    if compensation == "none":
        assert torch.equal(out, torch.where(keep, ft, base))


def test_reconstruction_error_is_the_output_error():
    base, ft, H, X = _layer(3, 5, seed=2)
    n = X.shape[1]
    expected = float(((base - ft) @ X).square().sum()) * 2 / n
    assert reconstruction_error(base, ft, H) == pytest.approx(expected, rel=1e-10)


def test_sweep_starts_from_target_and_reverts_to_base():
    base, ft, H, _ = _layer(4, 6, seed=4)
    keep = torch.ones(4, 6, dtype=torch.bool)
    target = ft * 2
    out = obs_sweep(ft, base, factor_hessian(H).U, _upfront(keep), target=target).weight
    assert torch.equal(out, target)


def test_compensate_names_the_layer_when_the_factorisation_fails():
    base, ft, H, _ = _layer(2, 4, seed=0, dtype=torch.float32)
    keep = torch.ones(2, 4, dtype=torch.bool)
    H_nan = H.clone()
    H_nan[0, 1] = float("nan")
    with pytest.raises(NumericalError, match="layers.3.q_proj"):
        compensate(base, ft, keep, H_nan, name="layers.3.q_proj")
    with pytest.raises(NumericalError, match="layers.3.q_proj") as info:
        compensate(base, ft, keep, -H, name="layers.3.q_proj")
    assert info.value.layer == "layers.3.q_proj"


def test_bad_sign_selector_and_mode_raise():
    base, ft, H, _ = _layer(2, 4, seed=0)
    U = factor_hessian(H).U
    with pytest.raises(ConfigError):
        obs_sweep(ft, base, U, _upfront(torch.ones(2, 4, dtype=torch.bool)), sign=0)
    with pytest.raises(ShapeMismatchError):
        obs_sweep(ft, base, U, lambda w, c: torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ConfigError, match="compensation"):
        compensate(base, ft, torch.ones(2, 4, dtype=torch.bool), H, compensation="magic")


def test_exact_compensation_on_1024_square_is_fast():
    import time

    g = torch.Generator().manual_seed(0)
    c = 1024
    A = torch.randn(c, 2 * c, generator=g)
    H = A @ A.T / (2 * c) + 0.01 * torch.eye(c)
    base, ft = torch.zeros(c, c), torch.randn(c, c, generator=g)
    keep = torch.rand(c, c, generator=g) < 0.1
    t0 = time.perf_counter()
    out = exact_compensation(base, ft, keep, H)
    assert time.perf_counter() - t0 < 10.0  # ~1 s measured on 2 CPU cores
    assert torch.isfinite(out).all() and torch.equal(out[~keep], base[~keep])


@pytest.mark.parametrize("k", [16, 300])
def test_batched_spd_solve_is_right_on_both_routes_with_two_threads(k):
    """Regression: torch 2.13's batched CPU LU with k >= 256 and 2 threads returned zero pivots."""
    from model_tailor.kernel.compensation import _batched_spd_solve

    g = torch.Generator().manual_seed(k)
    X = torch.randn(96, k, 2 * k, generator=g)
    A = X @ X.transpose(1, 2) / (2 * k) + 0.1 * torch.eye(k)
    rhs = torch.randn(96, k, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = _batched_spd_solve(A, rhs)
    finally:
        torch.set_num_threads(threads)
    want = torch.stack([torch.linalg.solve(A[b].double(), rhs[b].double()) for b in range(96)]).float()
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)


def test_exact_compensation_matches_oracle_when_rows_keep_hundreds_of_columns():
    base, ft, H, _ = _layer(48, 600, seed=11, dtype=torch.float32)
    f = factor_hessian(H)
    keep = torch.rand(48, 600, generator=torch.Generator().manual_seed(2)) < 0.5  # ~300-sized solves
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = exact_compensation(base, ft, keep, f.H_damped)
    finally:
        torch.set_num_threads(threads)
    want = _oracle(base.double(), ft.double(), keep, f.H_damped.double()).float()
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-5)
