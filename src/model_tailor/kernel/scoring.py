"""Patch scores: salience, sensitivity and their per-row z-score fusion (docs/METHOD.md §4-§6). Higher = keep.

All functions are pure and work on any device; they compute in the input's floating dtype (fp32 in the kernel,
fp64 in oracle tests).
"""

from __future__ import annotations

import torch

from model_tailor.errors import ConfigError, ShapeMismatchError
from model_tailor.kernel.baselines import fapm_scores
from model_tailor.options import SALIENCE_KINDS, SENSITIVITY_KINDS

__all__ = ["fuse_scores", "salience", "sensitivity", "zscore_rows"]


def salience(base: torch.Tensor, finetuned: torch.Tensor, *, kind: str = "magnitude") -> torch.Tensor:
    """How much a change matters, from the delta alone (docs/METHOD.md §4). Computed once, never compensated.

    ``magnitude`` (the paper): ``|finetuned - base|``, "a large change matters". ``fapm``: FAPM's base-relative
    score ``|Δ| - mean(|W_pre|)·|Δ|/|W_pre|`` (:func:`~model_tailor.kernel.baselines.fapm_scores`), which ranks
    a change lower the larger it is against its own pre-trained weight; on the bench's all-layers pair that
    selection forgets far less than magnitude. FAPM scores a change of a zero pre-trained weight ``-inf``; here
    it gets the matrix's lowest finite score instead, so the per-row z-scores of the fusion stay finite.

    Args:
        base: ``(rows, cols)`` pre-trained weights.
        finetuned: ``(rows, cols)`` fine-tuned weights (or the reconstruction target).
        kind: ``"magnitude"`` or ``"fapm"``.

    Returns:
        ``(rows, cols)`` finite scores (non-negative for ``magnitude``); higher = keep.
    """
    if kind not in SALIENCE_KINDS:
        raise ConfigError(f"salience: kind must be one of {SALIENCE_KINDS}, got {kind!r}")
    if base.shape != finetuned.shape:
        raise ShapeMismatchError(f"salience: base {tuple(base.shape)} != finetuned {tuple(finetuned.shape)}")
    dtype = torch.promote_types(torch.promote_types(base.dtype, finetuned.dtype), torch.float32)
    delta = finetuned.to(dtype) - base.to(dtype)
    if kind == "magnitude":
        return delta.abs()
    scores = fapm_scores(delta, base.to(dtype))
    finite = scores.isfinite()
    if bool(finite.all()):
        return scores
    floor = scores[finite].min() if bool(finite.any()) else scores.new_zeros(())
    return torch.where(finite, scores, floor)


def sensitivity(
    W_current: torch.Tensor,
    U_diag: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    kind: str = "weight",
) -> torch.Tensor:
    """OBS sensitivity of one column block at its start (docs/METHOD.md §5, D5).

    ``weight`` (the official code): ``W_bar^2 / U_jj^2``, twice the OBS cost of setting an entry to zero.
    ``revert``: ``(W_bar - W_pre)^2 / U_jj^2``, twice the OBS cost of what Model Tailor does (revert to base).

    Args:
        W_current: ``(rows, b)`` current weights W_bar of the block (fine-tuned plus compensation so far).
        U_diag: ``(b,)`` the diagonal of U for the block's columns; ``U_jj^2 = [(H_tilde_{F_j})^{-1}]_jj``.
        base: ``(rows, b)`` base weights; required for ``kind="revert"``.
        kind: ``"weight"`` or ``"revert"``.

    Returns:
        ``(rows, b)`` scores; higher = keep (reverting it would cost more).
    """
    if kind not in SENSITIVITY_KINDS:
        raise ConfigError(f"sensitivity: kind must be one of {SENSITIVITY_KINDS}, got {kind!r}")
    if U_diag.ndim != 1 or U_diag.shape[0] != W_current.shape[-1]:
        raise ShapeMismatchError(
            f"sensitivity: U_diag must be ({W_current.shape[-1]},) for W_current {tuple(W_current.shape)}, "
            f"got {tuple(U_diag.shape)}"
        )
    if kind == "revert":
        if base is None:
            raise ConfigError("sensitivity: kind='revert' needs base=")
        num = W_current - base.to(W_current.dtype)
    else:
        num = W_current
    return num.square() / U_diag.to(W_current.dtype).square()


def zscore_rows(A: torch.Tensor) -> torch.Tensor:
    """Per-row z-score over the columns with the unbiased (n-1) std (docs/METHOD.md §6); z = 0 where sigma = 0 (D7).

    A single column (n - 1 = 0) has no spread either and also gives z = 0.

    Args:
        A: ``(rows, b)`` scores of one column block.

    Returns:
        ``(rows, b)`` z-scores.
    """
    mu = A.mean(dim=-1, keepdim=True)
    if A.shape[-1] < 2:
        return torch.zeros_like(A)
    sigma = A.std(dim=-1, unbiased=True, keepdim=True)
    spread = sigma > 0
    # The official code divides by sigma = 0 and gets NaN, which silently keeps whole blocks (docs/METHOD.md §6).
    return torch.where(spread, (A - mu) / torch.where(spread, sigma, torch.ones_like(sigma)), torch.zeros_like(A))


def fuse_scores(sal: torch.Tensor, sens: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * z(sal) + (1 - alpha) * z(sens)`` on one column block (docs/METHOD.md §6). Higher = keep.

    Args:
        sal: ``(rows, b)`` salience of the block.
        sens: ``(rows, b)`` sensitivity of the block (ignored when ``alpha == 1``).
        alpha: fusion weight in [0, 1]; 1 = salience only, 0 = sensitivity only.

    Returns:
        ``(rows, b)`` fused scores.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"fuse_scores: alpha must be in [0, 1], got {alpha}")
    if sal.shape != sens.shape:
        raise ShapeMismatchError(f"fuse_scores: salience {tuple(sal.shape)} != sensitivity {tuple(sens.shape)}")
    if alpha == 1.0:
        return zscore_rows(sal)
    if alpha == 0.0:
        return zscore_rows(sens)
    return alpha * zscore_rows(sal) + (1.0 - alpha) * zscore_rows(sens)
