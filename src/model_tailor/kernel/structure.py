"""Patch structures beyond a sparse mask: a low-rank patch and a sparse residual on top of one.

At the same parameter budget a rank-r patch of a ``(rows, cols)`` weight costs ``r * (rows + cols)`` numbers. The
best rank-r patch under the H-weighted reconstruction error is a truncated SVD in the whitened space (Eckart-Young);
``sparse+lowrank`` spends half the budget on the low-rank part and tailors the residual with the sparse kernel.
"""

from __future__ import annotations

import logging

import torch

from model_tailor.errors import ConfigError, ShapeMismatchError
from model_tailor.kernel.compensation import compute_dtype, reconstruction_error
from model_tailor.kernel.hessian import factor_hessian, fp32_precision
from model_tailor.kernel.tailor import TailoredWeight, TailorStats, tailor_weight
from model_tailor.options import STRUCTURES

__all__ = ["STRUCTURES", "lowrank_patch", "tailor_weight_structured"]

logger = logging.getLogger(__name__)


def lowrank_patch(
    base: torch.Tensor,
    target: torch.Tensor,
    H: torch.Tensor,
    rank: int,
    *,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` patch in the H-weighted norm: ``min_{A,B} ||(W_pre + A B - target) X||^2``.

    With ``H_tilde = L L^T`` (damped as in docs/METHOD.md §3) the error is ``||(D - A B) L||_F^2`` for
    ``D = target - base``, so the truncated SVD of ``D L`` mapped back with ``L^{-1}`` is optimal
    (Eckart-Young). Singular values are split evenly between the factors.

    Args:
        base: ``(rows, cols)`` W_pre.
        target: ``(rows, cols)`` what ``W_pre + A B`` should reproduce on the inputs.
        H: ``(cols, cols)`` Hessian of the inputs.
        rank: r >= 0; ``r >= min(rows, cols)`` reproduces ``target``.
        percdamp: relative damping of H.

    Returns:
        ``(A (rows, r), B (r, cols))`` in compute dtype.
    """
    if rank < 0:
        raise ConfigError(f"rank must be >= 0, got {rank}")
    if base.shape != target.shape:
        raise ShapeMismatchError(f"base {tuple(base.shape)} != target {tuple(target.shape)}")
    rows, cols = base.shape
    dtype = compute_dtype(base, target, H)
    H_damped = factor_hessian(H.to(dtype), percdamp=percdamp).H_damped
    r = min(rank, rows, cols)
    with fp32_precision():
        L = torch.linalg.cholesky(H_damped)
        D = target.to(dtype) - base.to(dtype)
        P, S, Qh = torch.linalg.svd(D @ L, full_matrices=False)
        root = S[:r].sqrt()
        A = P[:, :r] * root
        # B = diag(root) Q_r^T L^{-1}: a triangular solve from the right, never an explicit inverse.
        B = torch.linalg.solve_triangular(L, root[:, None] * Qh[:r], upper=False, left=False)
    return A, B


def tailor_weight_structured(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    hessian: torch.Tensor,
    *,
    structure: str = "sparse",
    density: float = 0.1,
    target: torch.Tensor | None = None,
    percdamp: float = 0.01,
    name: str | None = None,
    **kernel_options,
) -> TailoredWeight:
    """Patch a weight with a sparse, a low-rank or a sparse+low-rank structure under one parameter budget.

    The budget is ``density * rows * cols`` parameters: a kept sparse entry costs 1 (indices are not counted),
    a rank-r pair costs ``r * (rows + cols)``. ``sparse+lowrank`` gives half the budget to the low-rank part,
    fitted **first** to the whole target (it captures the delta's global, LoRA-like structure), then runs the
    sparse kernel with the rest of the budget (including what the rank's rounding left) on the residual target
    ``target - A B``, so the sparse entries and their OBS decoration also absorb the truncation error.

    Args:
        base, finetuned, hessian: as for :func:`~model_tailor.kernel.tailor_weight`.
        structure: ``"sparse"``, ``"lowrank"`` or ``"sparse+lowrank"``.
        density: parameter budget as a fraction of ``rows * cols``, in (0, 1].
        target: reconstruction target (default ``finetuned``), e.g. ``preserve_target``'s W*.
        percdamp: relative damping.
        name: parameter name for messages and stats.
        **kernel_options: forwarded to ``tailor_weight`` (alpha, compensation, block_size, ...).

    Returns:
        :class:`~model_tailor.kernel.TailoredWeight`. ``weight`` holds base plus the sparse part (off-mask
        entries equal base bitwise); ``lowrank`` holds ``(A, B)`` or None. The full weight is
        ``weight + A @ B``. ``stats.kept`` counts sparse entries only.
    """
    if structure not in STRUCTURES:
        raise ConfigError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ConfigError(f"density must be in (0, 1] (the parameter budget), got {density!r}")
    if structure == "sparse":
        return tailor_weight(
            base,
            finetuned,
            hessian,
            density=density,
            target=target,
            percdamp=percdamp,
            name=name,
            **kernel_options,
        )
    rows, cols = base.shape
    budget = density * rows * cols
    share = budget / 2 if structure == "sparse+lowrank" else budget
    rank = int(share // (rows + cols))
    T = finetuned if target is None else target
    A, B = lowrank_patch(base, T, hessian, rank, percdamp=percdamp)
    sparse_density = (budget - rank * (rows + cols)) / (rows * cols)
    if structure == "sparse+lowrank" and sparse_density * rows * cols >= 1:
        residual = T.to(A.dtype) - A @ B
        out = tailor_weight(
            base,
            finetuned,
            hessian,
            density=min(1.0, sparse_density),
            target=residual,
            salience_from="target",  # rank the residual, not the part the factors already carry
            percdamp=percdamp,
            name=name,
            **kernel_options,
        )
        return TailoredWeight(weight=out.weight, keep_mask=out.keep_mask, stats=out.stats, lowrank=(A, B))
    if rank == 0:
        logger.warning("%s: budget density %s buys rank 0 for a %dx%d weight", name, density, rows, cols)
    return _lowrank_only(base, T, hessian, (A, B), percdamp=percdamp, name=name)


def _lowrank_only(
    base: torch.Tensor,
    T: torch.Tensor,
    hessian: torch.Tensor,
    factors: tuple[torch.Tensor, torch.Tensor],
    *,
    percdamp: float,
    name: str | None,
) -> TailoredWeight:
    """A patch of factors only: no sparse entry, errors of base and of ``base + A B`` against ``T``."""
    A, B = factors
    H_damped = factor_hessian(hessian.to(A.dtype), percdamp=percdamp, name=name).H_damped
    T32 = T.to(A.dtype)
    error = reconstruction_error(base.to(A.dtype) + A @ B, T32, H_damped)
    stats = TailorStats(
        name=name,
        numel=base.numel(),
        kept=0,
        density=0.0,
        error_masked=reconstruction_error(base.to(A.dtype), T32, H_damped),
        error_compensated=error,
        used="lowrank",
        compensation="lowrank",
    )
    keep = torch.zeros(tuple(base.shape), dtype=torch.bool, device=base.device)
    return TailoredWeight(weight=base.clone(), keep_mask=keep, stats=stats, lowrank=(A, B))
