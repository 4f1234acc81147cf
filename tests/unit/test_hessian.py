"""Hessian accumulation, damping and the inverse factor (docs/METHOD.md §3) against known answers."""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import CalibrationError, NumericalError, ShapeMismatchError
from model_tailor.kernel.hessian import (
    HessianAccumulator,
    damped_cholesky_inverse,
    factor_hessian,
    fp32_precision,
    normalize_hessian,
)


def _spd(c: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(c, 3 * c, generator=g, dtype=dtype)
    return A @ A.T / (3 * c)


def test_accumulator_with_padding_equals_unpadded_concatenation():
    g = torch.Generator().manual_seed(0)
    cols = 6
    acc = HessianAccumulator(cols)
    counted = []
    for b, length in ((2, 5), (3, 4), (1, 7)):
        x = torch.randn(b, length, cols, generator=g)
        mask = torch.rand(b, length, generator=g) > 0.3
        mask[0, 0] = True
        acc.add(x, token_mask=mask)
        counted.append(x[mask])
    X = torch.cat(counted).double()  # (n, cols)
    n = X.shape[0]
    assert acc.n_tokens == n
    expected = 2.0 / n * X.T @ X
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-6)


def test_accumulator_without_mask_counts_every_position_and_accepts_any_leading_dims():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 10
    acc = HessianAccumulator(4)
    acc.add(x)
    flat = x.reshape(-1, 4).double()
    assert acc.n_tokens == 6
    torch.testing.assert_close(acc.hessian.double(), 2 / 6 * flat.T @ flat, rtol=1e-6, atol=1e-6)


def test_fully_padded_batch_adds_nothing_and_empty_accumulator_raises():
    acc = HessianAccumulator(3, name="layer.q")
    acc.add(torch.ones(2, 3), token_mask=torch.zeros(2, dtype=torch.bool))
    assert acc.n_tokens == 0
    with pytest.raises(CalibrationError, match="layer.q"):
        _ = acc.hessian


def test_accumulator_rejects_wrong_feature_count_and_mask_shape():
    acc = HessianAccumulator(3)
    with pytest.raises(ShapeMismatchError):
        acc.add(torch.ones(2, 4))
    with pytest.raises(ShapeMismatchError):
        acc.add(torch.ones(2, 5, 3), token_mask=torch.ones(2, 4, dtype=torch.bool))


def test_factor_is_upper_cholesky_of_damped_inverse():
    H = _spd(7)
    U = damped_cholesky_inverse(H, percdamp=0.01)
    lam = 0.01 * H.diagonal().mean()
    H_damped = H + lam * torch.eye(7, dtype=H.dtype)
    assert torch.equal(U, U.triu())
    assert bool((U.diagonal() > 0).all())
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H_damped), rtol=1e-10, atol=1e-12)
    # The same unique factor as SparseGPT's chol -> cholesky_inverse -> chol(upper) route.
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H_damped)), upper=True)
    torch.testing.assert_close(U, ref, rtol=1e-10, atol=1e-12)


def test_factor_rows_are_inverse_hessians_of_free_columns():
    H = _spd(6, seed=1)
    f = factor_hessian(H, percdamp=0.05)
    for j in range(6):
        inv_free = torch.linalg.inv(f.H_damped[j:, j:])
        torch.testing.assert_close(f.U[j, j] ** 2, inv_free[0, 0], rtol=1e-10, atol=0)
        torch.testing.assert_close(f.U[j, j] * f.U[j, j:], inv_free[0], rtol=1e-10, atol=1e-14)


def test_dead_inputs_get_unit_diagonal_on_a_copy():
    H = _spd(5)
    H[2, :] = 0
    H[:, 2] = 0
    original = H.clone()
    f = factor_hessian(H, percdamp=0.01)
    assert torch.equal(H, original)
    diag = original.diagonal().clone()
    diag[2] = 1.0
    lam = 0.01 * float(diag.mean())
    assert f.H_damped[2, 2].item() == pytest.approx(1.0 + lam)
    assert bool(torch.isfinite(f.U).all())


def test_nan_hessian_raises_naming_the_layer():
    H = _spd(4)
    H[1, 1] = float("nan")
    with pytest.raises(NumericalError, match="model.layers.0.mlp.up_proj") as info:
        damped_cholesky_inverse(H, name="model.layers.0.mlp.up_proj")
    assert info.value.layer == "model.layers.0.mlp.up_proj"


def test_negative_definite_hessian_raises_after_retries():
    with pytest.raises(NumericalError, match="retries") as info:
        damped_cholesky_inverse(-_spd(4), name="blk.o_proj")
    assert info.value.layer == "blk.o_proj"


def test_failed_cholesky_retries_with_ten_times_the_damping():
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05], dtype=torch.float64))
    f = factor_hessian(H, percdamp=0.01)  # lam = 0.0074 fails, 0.074 succeeds
    assert f.retries == 1
    assert f.lam == pytest.approx(0.1 * float(H.diagonal().mean()))


def test_fp32_input_gives_fp32_factor():
    U = damped_cholesky_inverse(_spd(4).float())
    assert U.dtype == torch.float32


def test_fp32_precision_scopes_tf32_flags():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("high")
    try:
        with fp32_precision():
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[1])
    assert torch.backends.cuda.matmul.allow_tf32 == before[0]


def test_normalize_hessian_gives_unit_mean_diagonal_and_removes_scale():
    H = _spd(5)
    N = normalize_hessian(H)
    assert float(N.diagonal().mean()) == pytest.approx(1.0)
    torch.testing.assert_close(normalize_hessian(37.0 * H), N)
    with pytest.raises(NumericalError):
        normalize_hessian(torch.zeros(3, 3))
