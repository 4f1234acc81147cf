"""The patch decorator: blockwise OBS sweep, exact per-row optimum and reconstruction error (docs/METHOD.md §8).

Every function reconstructs a *target* (default: the fine-tuned weights) in the H-weighted norm
``sum_i (w_i - t_i) H (w_i - t_i)^T = ||(W - T) X||_F^2`` (up to H's scale) while forcing reverted entries to
their base values. Reverted entries always end exactly at base; compensation lands only on kept entries.
Maths runs in fp32, or fp64 when any input is fp64 (used by the oracle tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from model_tailor.errors import ConfigError, ShapeMismatchError
from model_tailor.kernel.hessian import DampedFactor, factor_hessian, fp32_precision
from model_tailor.options import COMPENSATIONS

__all__ = [
    "COMPENSATIONS",
    "MaskSelector",
    "SweepResult",
    "compensate",
    "compensate_with_factor",
    "exact_compensation",
    "obs_sweep",
    "reconstruction_error",
]

logger = logging.getLogger(__name__)

#: ``(W_block_current (rows, b), col_slice) -> bool keep mask (rows, b)``; True = in the patch (docs/METHOD.md §7).
MaskSelector = Callable[[torch.Tensor, slice], torch.Tensor]

# Upper bound on elements of one batched |S| x |S| system stack in exact_compensation (~64 MB in fp32).
_SOLVE_CHUNK_ELEMENTS = 1 << 24
# Batched SPD solves of this size and up use Cholesky (see _batched_spd_solve).
_CHOLESKY_MIN_SIZE = 128


class SweepResult(NamedTuple):
    """Output of :func:`obs_sweep`: ``weight`` (rows, cols), compute dtype; ``keep_mask`` (rows, cols)."""

    weight: torch.Tensor
    keep_mask: torch.Tensor


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64 (oracle tests), else fp32 (docs/METHOD.md §3, D13)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str) -> None:
    if a.shape != b.shape:
        raise ShapeMismatchError(f"{what_a} {tuple(a.shape)} and {what_b} {tuple(b.shape)} must have the same shape")


def obs_sweep(
    finetuned: torch.Tensor,
    base: torch.Tensor,
    U: torch.Tensor,
    select_mask: MaskSelector,
    *,
    sign: int = -1,
    block_size: int = 128,
    target: torch.Tensor | None = None,
) -> SweepResult:
    """Blockwise OBS sweep with a per-block mask selector (docs/METHOD.md §7 adaptive timing, §8).

    Columns are processed in natural order, in blocks of ``block_size``. At the start of each block the
    selector sees the current weights ``W_bar`` of the block (target plus compensation received so far) and
    returns its keep mask. For each reverted entry, ``E_ij = (W_bar_ij - base_ij) / U_jj`` and the row's
    still-free columns move by ``sign * E_ij * U[j, j:]``; later blocks receive ``sign * E_B @ U[B, after B]``
    lazily after the block (identical to immediate updates, SparseGPT-style). Reverted entries are then set to
    base explicitly.

    Args:
        finetuned: ``(rows, cols)`` fine-tuned weights; the sweep starts here unless ``target`` is given.
        base: ``(rows, cols)`` base weights, the value of every reverted entry.
        U: ``(cols, cols)`` upper Cholesky factor of ``H_tilde^{-1}``
            (:func:`~model_tailor.hessian.factor_hessian`).
        select_mask: per-block selector ``(W_block_current, col_slice) -> keep (rows, b)``; slicing a
            precomputed mask gives the "upfront" timing.
        sign: -1 = OBS-optimal (default, D1); +1 = what the official code does (adds the update).
        block_size: column block width (128 in the code).
        target: ``(rows, cols)`` what to reconstruct (default ``finetuned``); the sweep starts from it.

    Returns:
        :class:`SweepResult` with the decorated weights (compute dtype; reverted entries == base exactly) and
        the keep mask (True = in the patch).
    """
    if sign not in (-1, 1):
        raise ConfigError(f"obs_sweep: sign must be -1 (obs) or +1 (official), got {sign}")
    if block_size < 1:
        raise ConfigError(f"obs_sweep: block_size must be >= 1, got {block_size}")
    _check_same_shape(finetuned, base, "finetuned", "base")
    start = finetuned if target is None else target
    _check_same_shape(start, base, "target", "base")
    rows, cols = base.shape
    if U.shape != (cols, cols):
        raise ShapeMismatchError(f"obs_sweep: U must be ({cols}, {cols}), got {tuple(U.shape)}")
    dtype = compute_dtype(start, base, U)
    device = U.device
    # Work on transposed copies, (cols, rows): a weight column is then a contiguous row, so the per-column
    # updates below are in-place BLAS calls on contiguous memory with no temporaries.
    # clone, not .contiguous(): for one row the transpose is already "contiguous" and would alias the input.
    Wt = start.to(device=device, dtype=dtype).T.clone(memory_format=torch.contiguous_format)
    Vt = base.to(device=device, dtype=dtype).T.contiguous()
    U = U.to(dtype=dtype)
    keep_t = torch.empty(cols, rows, dtype=torch.bool, device=device)
    with fp32_precision():
        for b in range(0, cols, block_size):
            e = min(b + block_size, cols)
            keep1 = select_mask(Wt[b:e].T.clone(), slice(b, e))
            if keep1.shape != (rows, e - b) or keep1.dtype != torch.bool:
                raise ShapeMismatchError(
                    f"obs_sweep: selector returned {keep1.dtype} {tuple(keep1.shape)} for columns {b}:{e}, "
                    f"expected bool {(rows, e - b)}"
                )
            revert1 = (~keep1.to(device)).T.contiguous()  # (width, rows)
            _sweep_block(Wt[b:e], Vt[b:e], U[b:e, b:e], revert1, sign, out_err := torch.zeros_like(Wt[b:e]))
            keep_t[b:e] = ~revert1
            if e < cols:
                # Lazy update of every later column: W[:, e:] += sign * E_B @ U[B, e:] (docs/METHOD.md §8).
                Wt[e:].addmm_(U[b:e, e:].T, out_err, alpha=sign)
    W = Wt.T.contiguous()
    keep = keep_t.T.contiguous()
    return SweepResult(weight=W, keep_mask=keep)


_INNER_BLOCK = 16  # sub-block width inside a sweep block; result is identical, memory traffic much lower


def _sweep_block(
    Wt: torch.Tensor, Vt: torch.Tensor, U1: torch.Tensor, revert: torch.Tensor, sign: int, Err: torch.Tensor
) -> None:
    """Sweep one block in place. All tensors are transposed: ``Wt``, ``Vt``, ``revert``, ``Err`` are
    (width, rows).

    Rank-1 updates stay inside sub-blocks of ``_INNER_BLOCK`` columns and reach the rest of the block through
    one matmul per sub-block: the same lazy-update identity as between blocks (docs/METHOD.md §8), one level down.
    Without it each column rewrites the whole rest of the block, which is memory-bound for wide layers.
    """
    width = Wt.shape[0]
    # Few, fused ops per column: each torch call on a (rows,) vector costs a thread-pool round trip, which
    # dominates the sweep on a busy CPU. inv_d is 1/U_jj on reverted entries and 0 on kept ones.
    inv_d = revert.to(Wt.dtype) / U1.diagonal()[:, None]
    U_signed = sign * U1
    for s in range(0, width, _INNER_BLOCK):
        se = min(s + _INNER_BLOCK, width)
        for j in range(s, se):
            # docs/METHOD.md §8: E_ij = revert_ij * (W_bar_ij - v_ij) / U_jj ; W_bar[i, j:] += sign * E_ij * U[j, j:]
            err = torch.sub(Wt[j], Vt[j], out=Err[j]).mul_(inv_d[j])
            # Column j only moves on reverted entries, which are set to base next, so update j+1.. only.
            # A broadcast product on this small contiguous slab; addr_/addcmul_ measured 6-50x slower on CPU.
            Wt[j + 1 : se] += U_signed[j, j + 1 : se, None] * err
            # Set reverted entries to base explicitly: removes float drift and makes them bitwise base.
            torch.where(revert[j], Vt[j], Wt[j], out=Wt[j])
        if se < width:
            Wt[se:].addmm_(U1[s:se, se:].T, Err[s:se], alpha=sign)


def _batched_spd_solve(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve a batch of SPD systems ``A[b] x[b] = rhs[b]`` (``A``: (b, k, k), ``rhs``: (b, k)).

    Batched Cholesky from ``_CHOLESKY_MIN_SIZE`` up, batched LU below it, where LU is up to ~2x faster.
    Why not LU throughout: torch 2.13's CPU batched ``lu_factor`` with k >= 256 and more than one thread
    returns zero pivots for part of the batch (with ``info == 0``), and ``lu_solve`` then fails or is wrong.
    Pivots and Cholesky ``info`` are still checked; any bad system is re-solved one at a time.
    """
    if A.shape[-1] >= _CHOLESKY_MIN_SIZE or A.device.type != "cpu":
        L, info = torch.linalg.cholesky_ex(A)
        x = torch.cholesky_solve(rhs[..., None], L)[..., 0]
        bad = info != 0
    else:
        LU, pivots, info = torch.linalg.lu_factor_ex(A)
        bad = (info != 0) | (pivots < 1).any(dim=-1) | (pivots > A.shape[-1]).any(dim=-1)
        safe = torch.where(bad[:, None], torch.arange(1, A.shape[-1] + 1, device=A.device), pivots)
        x = torch.linalg.lu_solve(LU, safe.to(pivots.dtype), rhs[..., None])[..., 0]
    for b in bad.nonzero().flatten().tolist():
        x[b] = torch.linalg.solve(A[b], rhs[b])
    return x


def _masked_row_solve(M: torch.Tensor, select: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Per row i, solve ``M[S_i, S_i] x = rhs_i[S_i]`` (S_i = ``select[i]``); x scattered into (rows, cols).

    Rows are padded to the largest |S_i| with identity blocks and solved in batched chunks.
    """
    rows, cols = select.shape
    out = torch.zeros_like(rhs)
    counts = select.sum(dim=1)
    kmax = int(counts.max()) if rows else 0
    if kmax == 0:
        return out
    # A stable sort of ~select puts each row's selected columns first, in ascending column order.
    order = torch.sort((~select).to(torch.uint8), dim=1, stable=True).indices[:, :kmax]
    valid = torch.arange(kmax, device=select.device)[None, :] < counts[:, None]
    eye = torch.eye(kmax, dtype=M.dtype, device=M.device)
    chunk = max(1, _SOLVE_CHUNK_ELEMENTS // (kmax * kmax))
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        idx, ok = order[r0:r1], valid[r0:r1]
        A = M[idx[:, :, None], idx[:, None, :]]
        A = torch.where(ok[:, :, None] & ok[:, None, :], A, eye)  # padding: identity rows/cols, rhs 0 -> x 0
        rhs_s = torch.gather(rhs[r0:r1], 1, idx) * ok
        x = _batched_spd_solve(A, rhs_s)
        # Padded slots point at unselected columns (order is a permutation) and carry x = 0.
        out[r0:r1].scatter_(1, idx, x * ok)
    return out


def exact_compensation(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    keep_mask: torch.Tensor,
    H_damped: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact per-row least-squares decoration for a fixed mask (docs/METHOD.md §8, D3, ``compensation: exact``).

    Per row with K = kept and P = reverted: ``w_K = t_K + H_KK^{-1} H_KP (t_P - v_P)``, ``w_P = v_P``. Rows
    with more kept than reverted entries use the equivalent dual form ``d = G_{:,P} G_PP^{-1} (v_P - t_P)``
    with ``G = H^{-1}``, so each row costs one ``min(|K|, |P|)``-sized solve.

    Args:
        base: ``(rows, cols)`` base weights v.
        finetuned: ``(rows, cols)`` fine-tuned weights (the target unless ``target`` is given).
        keep_mask: ``(rows, cols)`` bool, True = in the patch.
        H_damped: ``(cols, cols)`` the *damped* SPD Hessian H_tilde (``factor_hessian(H).H_damped``).
        target: ``(rows, cols)`` reconstruction target t (default ``finetuned``).

    Returns:
        ``(rows, cols)`` weights in compute dtype; reverted entries == base exactly.
    """
    T0 = finetuned if target is None else target
    _check_same_shape(T0, base, "target", "base")
    _check_same_shape(keep_mask, base, "keep_mask", "base")
    cols = base.shape[1]
    if H_damped.shape != (cols, cols):
        raise ShapeMismatchError(f"exact_compensation: H must be ({cols}, {cols}), got {tuple(H_damped.shape)}")
    dtype = compute_dtype(T0, base, H_damped)
    device = H_damped.device
    H = H_damped.to(dtype=dtype)
    T = T0.to(device=device, dtype=dtype)
    V = base.to(device=device, dtype=dtype)
    keep = keep_mask.to(device=device, dtype=torch.bool)
    revert = ~keep
    r = torch.where(revert, T - V, 0.0)  # (t_P - v_P), zero on K
    W = T.clone()
    n_keep = keep.sum(dim=1)
    primal = n_keep <= cols - n_keep
    with fp32_precision():
        if bool(primal.any()):
            ix = primal.nonzero().squeeze(1)
            W[ix] += _masked_row_solve(H, keep[ix], r[ix] @ H)  # H symmetric: (H r_i)_K = H_KP (t_P - v_P)
        if bool((~primal).any()):
            ix = (~primal).nonzero().squeeze(1)
            G = torch.cholesky_solve(torch.eye(cols, dtype=dtype, device=device), torch.linalg.cholesky(H))
            mu = _masked_row_solve(G, revert[ix], -r[ix])
            W[ix] += mu @ G
    return torch.where(keep, W, V)


def reconstruction_error(W: torch.Tensor, W_target: torch.Tensor, H: torch.Tensor) -> float:
    """``sum_i (w_i - t_i) H (w_i - t_i)^T`` (trace form of ``||(W - T) X||_F^2`` for ``H ~ X X^T``).

    Args:
        W: ``(rows, cols)`` weights.
        W_target: ``(rows, cols)`` target.
        H: ``(cols, cols)`` symmetric Hessian (pass H_tilde for the guard, docs/METHOD.md, D4).

    Returns:
        The error as a Python float (accumulated in fp64).
    """
    _check_same_shape(W, W_target, "W", "W_target")
    dtype = compute_dtype(W, W_target, H)
    D = W.to(device=H.device, dtype=dtype) - W_target.to(device=H.device, dtype=dtype)
    with fp32_precision():
        return float(((D @ H.to(dtype)) * D).sum(dtype=torch.float64))


def compensate_with_factor(
    base: torch.Tensor,
    start: torch.Tensor,
    keep_mask: torch.Tensor,
    factor: DampedFactor | None,
    *,
    compensation: str = "obs",
    block_size: int = 128,
) -> torch.Tensor:
    """Decorate a fixed mask given an existing factorisation; compute dtype out (used by the kernel).

    ``start`` is the reconstruction target. ``factor`` may be None only for ``compensation="none"``.
    """
    if compensation not in COMPENSATIONS:
        raise ConfigError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
    dtype = compute_dtype(base, start)
    if compensation == "none":
        return torch.where(keep_mask, start.to(dtype), base.to(dtype))
    if factor is None:
        raise ConfigError(f"compensation={compensation!r} needs a Hessian")
    if compensation == "exact":
        return exact_compensation(base, start, keep_mask, factor.H_damped)

    def upfront(_: torch.Tensor, cols: slice) -> torch.Tensor:
        return keep_mask[:, cols]

    sign = -1 if compensation == "obs" else 1
    return obs_sweep(start, base, factor.U, upfront, sign=sign, block_size=block_size).weight


def compensate(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    keep_mask: torch.Tensor,
    hessian: torch.Tensor,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    compensation: str = "obs",
    target: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Decorate a fixed keep mask (docs/METHOD.md §8, upfront timing).

    Args:
        base: ``(rows, cols)`` base weights.
        finetuned: ``(rows, cols)`` fine-tuned weights.
        keep_mask: ``(rows, cols)`` bool, True = in the patch; False entries are reverted to base.
        hessian: ``(cols, cols)`` raw Hessian (damped here with ``percdamp``).
        percdamp: relative damping (docs/METHOD.md §3).
        block_size: sweep block width.
        compensation: ``"obs"`` (sign -1), ``"official"`` (sign +1), ``"none"`` (plain masking) or
            ``"exact"``.
        target: reconstruction target (default ``finetuned``).
        name: layer name for error messages.

    Returns:
        ``(rows, cols)`` in ``base.dtype``; entries outside ``keep_mask`` equal ``base`` bitwise.
    """
    _check_same_shape(finetuned, base, "finetuned", "base")
    _check_same_shape(keep_mask, base, "keep_mask", "base")
    start = finetuned if target is None else target
    factor = None
    if compensation != "none":
        factor = factor_hessian(hessian.to(base.device), percdamp=percdamp, name=name)
    W = compensate_with_factor(base, start, keep_mask, factor, compensation=compensation, block_size=block_size)
    return torch.where(keep_mask, W.to(base.dtype), base)
