"""Layer Hessian statistics and their damped inverse factor (docs/METHOD.md §3).

The objective of one linear module is ``||(W_hat - W_target) X||_F^2``; every row has Hessian ``H = 2 X X^T``
(up to a positive normaliser, which changes nothing downstream: docs/METHOD.md §3 "scale invariance"). This module
accumulates ``H`` from input activations (no gradients, no labels) and turns it into the upper Cholesky factor
``U`` of the damped inverse, ``H_tilde^{-1} = U^T U``, that the OBS sweep of §8 consumes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model_tailor.errors import CalibrationError, ConfigError, NumericalError, ShapeMismatchError

__all__ = [
    "DampedFactor",
    "HessianAccumulator",
    "damped_cholesky_inverse",
    "factor_hessian",
    "fp32_precision",
    "normalize_hessian",
]

logger = logging.getLogger(__name__)

_MAX_RETRIES = 3  # docs/METHOD.md, D14: damping x10, up to 3 retries, then a named error


@contextlib.contextmanager
def fp32_precision() -> Iterator[None]:
    """Run the enclosed maths in true fp32: TF32 off for matmul/cuDNN, restored on exit (docs/METHOD.md §3, D13).

    The official code flips these flags globally at import; we scope them (no global state).
    """
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.set_float32_matmul_precision(precision)


class HessianAccumulator:
    """Running ``H = (2/n) sum_t x_t x_t^T`` over counted token positions (docs/METHOD.md §3).

    Padding is excluded through ``token_mask`` (docs/METHOD.md §9, D16); ``n`` counts tokens, not sequences,
    which is a free choice because H's scale cancels downstream. Activations are never stored.

    Args:
        columns: the module's ``in_features`` (``cols``).
        device: where ``H`` lives; inputs are moved there.
        name: parameter name used in error messages.
    """

    def __init__(self, columns: int, *, device: str | torch.device = "cpu", name: str | None = None) -> None:
        if columns < 1:
            raise ConfigError(f"HessianAccumulator: columns must be >= 1, got {columns}")
        self.columns = columns
        self.name = name
        # fp32 with a running-mean update: every step rescales the old mean by n/(n+b) and adds the new batch
        # with weight 2/(n+b), so H stays O(|x|^2) however many tokens are counted; nothing grows large enough
        # to swamp the next batch as a raw fp32 sum would. Its relative rounding (~1e-7 per step) is far below
        # the 1% damping added before factorisation, and fp64 would double memory (c = 11008: 0.5 -> 1 GB) and
        # run at a small fraction of fp32 speed on most GPUs.
        self._H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self._n = 0

    @property
    def n_tokens(self) -> int:
        """Number of token positions counted so far (padding excluded)."""
        return self._n

    @property
    def hessian(self) -> torch.Tensor:
        """The accumulated ``(cols, cols)`` fp32 Hessian. A live view: copy it before modifying it."""
        if self._n == 0:
            raise CalibrationError(
                f"{self.name or 'HessianAccumulator'}: no tokens were counted; add calibration batches "
                "with at least one non-padding token before reading the Hessian"
            )
        return self._H

    def release_totals(self) -> tuple[torch.Tensor, int]:
        """Hand over ``(n H, n)``: the raw sum ``2 Σ x xᵀ`` and the token count, what processes that each counted
        part of the tokens add up (sums, not means). Scales in place, no copy: the accumulator is spent."""
        total, n = self._H.mul_(self._n), self._n
        self._H, self._n = torch.zeros(0, 0, dtype=torch.float32, device=total.device), 0
        return total, n

    @classmethod
    def from_totals(cls, total: torch.Tensor, n: int, *, name: str | None = None) -> HessianAccumulator:
        """The accumulator of ``n`` tokens whose raw sum is ``total`` ``(cols, cols)`` (e.g. added over
        processes); takes ``total`` over, dividing it in place."""
        if total.ndim != 2 or total.shape[0] != total.shape[1] or total.dtype != torch.float32:
            raise ShapeMismatchError(
                f"{name or 'HessianAccumulator'}: totals must be a square fp32 matrix, got {tuple(total.shape)} "
                f"{total.dtype}"
            )
        acc = cls.__new__(cls)
        acc.columns, acc.name = int(total.shape[0]), name
        acc._H, acc._n = (total.div_(n) if n > 0 else total.zero_()), int(n)
        return acc

    @torch.no_grad()
    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add a batch of module inputs.

        Args:
            x: ``(..., cols)`` activations; any leading batch/sequence dims.
            token_mask: optional bool over the leading dims of ``x``; False = padding, excluded.
        """
        if x.shape[-1] != self.columns:
            raise ShapeMismatchError(
                f"{self.name or 'HessianAccumulator'}: input has {x.shape[-1]} features, expected {self.columns}"
            )
        rows = x.reshape(-1, self.columns)
        if token_mask is not None:
            if tuple(token_mask.shape) != tuple(x.shape[:-1]):
                raise ShapeMismatchError(
                    f"{self.name or 'HessianAccumulator'}: token_mask shape {tuple(token_mask.shape)} "
                    "must equal "
                    f"the leading dims of x {tuple(x.shape[:-1])}"
                )
            rows = rows[token_mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        b = rows.shape[0]
        if b == 0:
            return
        rows = rows.to(device=self._H.device, dtype=torch.float32)
        n_new = self._n + b
        with fp32_precision():
            self._H.mul_(self._n / n_new)
            self._H.addmm_(rows.T, rows, alpha=2.0 / n_new)
        self._n = n_new


@dataclass(frozen=True)
class DampedFactor:
    """Result of :func:`factor_hessian`.

    Attributes:
        H_damped: ``(cols, cols)`` the damped Hessian ``H_tilde = H + lam*I`` actually factorised (dead
            inputs fixed).
        U: ``(cols, cols)`` upper triangular, ``H_tilde^{-1} = U^T U``.
        lam: the damping that succeeded.
        retries: how many times the damping was multiplied by 10.
    """

    H_damped: torch.Tensor
    U: torch.Tensor
    lam: float
    retries: int


def _check_square(H: torch.Tensor, name: str | None) -> None:
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ShapeMismatchError(f"{name or 'hessian'}: Hessian must be square (cols, cols), got {tuple(H.shape)}")


def _check_finite(t: torch.Tensor, what: str, name: str | None) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{name or 'tensor'}: {what} contains NaN or Inf; check the inputs", layer=name)


def factor_hessian(H: torch.Tensor, *, percdamp: float = 0.01, name: str | None = None) -> DampedFactor:
    """Damp ``H`` and factor its inverse (docs/METHOD.md §3).

    ``H_tilde = H + lam*I`` with ``lam = percdamp * mean(diag H)``, after setting dead inputs
    (``H_jj == 0``) to ``H_jj = 1`` on a copy. A failed factorisation retries with ``lam * 10``, up to 3
    times (D14).

    Args:
        H: ``(cols, cols)`` symmetric PSD Hessian; fp32, or fp64 (kept, for oracle tests).
        percdamp: relative damping, >= 0.
        name: layer name for error messages.

    Returns:
        A :class:`DampedFactor` in fp32 (fp64 if ``H`` is fp64) on ``H``'s device.

    Raises:
        NumericalError: NaN/Inf in ``H``, or no damping made ``H_tilde`` positive definite.
    """
    _check_square(H, name)
    if percdamp < 0:
        raise ConfigError(f"{name or 'hessian'}: percdamp must be >= 0, got {percdamp}")
    _check_finite(H, "Hessian", name)
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    H = H.to(dtype=dtype).clone()
    cols = H.shape[0]
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0  # docs/METHOD.md §3 dead inputs; unlike SparseGPT, W[:, j] is NOT zeroed (patch values)
    mean_diag = float(diag.mean())
    lam = percdamp * mean_diag
    idx = torch.arange(cols, device=H.device)
    with fp32_precision():
        for attempt in range(_MAX_RETRIES + 1):
            H_damped = H.clone()
            H_damped[idx, idx] += lam
            # U is the upper Cholesky factor of H_tilde^{-1}. With J the reversal permutation and
            # J H_tilde J = L' L'^T, U = J L'^{-1} J is upper triangular and U^T U = H_tilde^{-1}. This is
            # the same unique factor SparseGPT gets from chol -> cholesky_inverse -> chol(upper), with one
            # factorisation
            # and one triangular solve instead of two factorisations and a full inverse (faster, same result).
            L_rev, info = torch.linalg.cholesky_ex(H_damped.flip(0, 1))
            if int(info) == 0:
                eye = torch.eye(cols, dtype=dtype, device=H.device)
                U = torch.linalg.solve_triangular(L_rev, eye, upper=False).flip(0, 1)
                if bool(torch.isfinite(U).all()):
                    if attempt:
                        logger.warning("%s: Cholesky needed damping %.3g after %d retries", name, lam, attempt)
                    return DampedFactor(H_damped=H_damped, U=U, lam=lam, retries=attempt)
            # lam == 0 (percdamp = 0) cannot grow by x10: start the retries from the default relative damping.
            lam = lam * 10 if lam != 0 else 0.01 * mean_diag
    raise NumericalError(
        f"{name or 'layer'}: Cholesky of the damped Hessian failed after {_MAX_RETRIES} retries "
        f"(last damping "
        f"{lam / 10:.3g}); the Hessian is not positive semi-definite. Check the calibration activations",
        layer=name,
    )


def damped_cholesky_inverse(H: torch.Tensor, *, percdamp: float = 0.01, name: str | None = None) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of the damped inverse, ``H_tilde^{-1} = U^T U`` (docs/METHOD.md §3).

    Row ``j`` of ``U`` is the inverse Hessian of the still-free columns ``F_j = {j, ..., cols-1}``:
    ``U_jj^2 = [(H_tilde_{F_j F_j})^{-1}]_jj``. See :func:`factor_hessian` for damping, dead inputs and
    retries.

    Args:
        H: ``(cols, cols)`` Hessian.
        percdamp: relative damping ``lam = percdamp * mean(diag H)``.
        name: layer name for error messages.

    Returns:
        ``(cols, cols)`` upper-triangular ``U``.
    """
    return factor_hessian(H, percdamp=percdamp, name=name).U


def normalize_hessian(H: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """``H / (trace(H) / cols)``: unit mean eigenvalue, so Hessians of different data can mix (docs/METHOD.md §14).

    Args:
        H: ``(cols, cols)`` PSD Hessian.

    Returns:
        ``(cols, cols)`` the rescaled Hessian (a new tensor).
    """
    _check_square(H, name)
    _check_finite(H, "Hessian", name)
    scale = float(torch.diagonal(H).sum()) / H.shape[0]
    if scale <= 0:
        raise NumericalError(
            f"{name or 'hessian'}: cannot normalise a Hessian with trace <= 0 (mean diagonal {scale:.3g})",
            layer=name,
        )
    return H / scale
