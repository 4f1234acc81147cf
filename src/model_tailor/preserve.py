"""Preserve-aware targets and low-rank patch structure for the kernel (Issue 5; METHOD.md §3 and §8).

Preserve-aware tailoring reconstructs the fine-tuned output on target-task inputs X_t while keeping the base
output on original-task ("preserve") inputs X_o:

    J(W) = ||(W - W_ft) X_t||^2 + lam * ||(W - W_pre) X_o||^2,   H_t ~ X_t X_t^T,  H_o ~ X_o X_o^T.

Completing the square, ``J(W) = (W - W*) H_c (W - W*)^T + const`` with ``H_c = H_t + lam * H_o`` and
``W* = W_pre + delta @ H_t @ H_c^{-1}``, so the unchanged kernel, given ``target=W*`` and ``hessian=H_c``,
minimises J under its mask. At density 1 the patch is W* itself: the dense closed form, a RegMean-like merge
of the fine-tuned weights with the base, weighted by the two input statistics and anchored on the base.
"""

from __future__ import annotations

import logging
import math

import torch

from model_tailor.compensation import compute_dtype, reconstruction_error
from model_tailor.errors import ConfigError, ShapeMismatchError
from model_tailor.hessian import factor_hessian, fp32_precision, normalize_hessian
from model_tailor.kernel import TailoredWeight, TailorStats, tailor_weight

__all__ = ["STRUCTURES", "lowrank_patch", "preserve_target", "tailor_weight_structured"]

logger = logging.getLogger(__name__)

STRUCTURES = ("sparse", "lowrank", "sparse+lowrank")


def preserve_target(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    H_t: torch.Tensor,
    H_o: torch.Tensor,
    lam: float,
    *,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction target and Hessian of the preserve-aware objective J (module docstring).

    Both Hessians are first normalised to unit mean eigenvalue (``H / (trace / cols)``) so that ``lam`` weighs
    the two data sets independently of their token counts and activation scales. Damping attaches to the
    target term: with ``d = percdamp * mean(diag H_c)``, ``W* = W_pre + delta (H_t + dI)(H_c + dI)^{-1}``,
    i.e. the optimum of ``J + d * ||W - W_ft||^2`` (it keeps ``W* -> W_ft`` as ``lam -> 0`` exactly).

    Args:
        base: ``(rows, cols)`` W_pre.
        finetuned: ``(rows, cols)`` W_ft.
        H_t: ``(cols, cols)`` Hessian of the target-task (calibration) inputs.
        H_o: ``(cols, cols)`` Hessian of the preserve inputs.
        lam: weight of the preserve term, >= 0. 0 gives ``W* = finetuned`` and ``H_c = normalised H_t``.
        percdamp: relative damping of the solve.

    Returns:
        ``(W_star (rows, cols), H_c (cols, cols))`` in compute dtype (fp32, fp64 for fp64 inputs); pass them
        to :func:`~model_tailor.kernel.tailor_weight` as ``target=W_star`` with ``hessian=H_c``.
    """
    if not (lam >= 0 and math.isfinite(lam)):
        raise ConfigError(f"preserve weight lam must be a finite number >= 0, got {lam}")
    if base.shape != finetuned.shape:
        raise ShapeMismatchError(f"base {tuple(base.shape)} != finetuned {tuple(finetuned.shape)}")
    cols = base.shape[1]
    for what, H in (("H_t", H_t), ("H_o", H_o)):
        if tuple(H.shape) != (cols, cols):
            raise ShapeMismatchError(f"{what} must be ({cols}, {cols}), got {tuple(H.shape)}")
    dtype = compute_dtype(base, finetuned, H_t, H_o)
    Ht = normalize_hessian(H_t.to(dtype))
    if lam == 0:
        return finetuned.to(dtype).clone(), Ht
    H_c = Ht + lam * normalize_hessian(H_o.to(device=Ht.device, dtype=dtype))
    d = percdamp * float(H_c.diagonal().mean())
    eye = torch.eye(cols, dtype=dtype, device=Ht.device)
    delta = finetuned.to(dtype) - base.to(dtype)
    with fp32_precision():
        # delta (Ht + dI) (H_c + dI)^{-1}: solve X (H_c + dI) = delta (Ht + dI) instead of forming an inverse.
        rhs = delta @ (Ht + d * eye)
        D = torch.linalg.solve(H_c + d * eye, rhs, left=False)
    return base.to(dtype) + D, H_c


def lowrank_patch(
    base: torch.Tensor,
    target: torch.Tensor,
    H: torch.Tensor,
    rank: int,
    *,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` patch in the H-weighted norm: ``min_{A,B} ||(W_pre + A B - target) X||^2``.

    With ``H_tilde = L L^T`` (damped as in METHOD §3) the error is ``||(D - A B) L||_F^2`` for
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
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=base.device)
    return TailoredWeight(weight=base.clone(), keep_mask=keep, stats=stats, lowrank=(A, B))
