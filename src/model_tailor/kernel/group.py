"""Tailor modules that share one input (q/k/v, gate/up) with one factorisation and one stacked sweep.

Everything that depends only on the input is shared: the Hessian, its damped factor ``U`` and, because rows are
independent in the OBS update (docs/METHOD.md §8), the sweep itself, run once over the modules' rows stacked
into one ``(sum rows, cols)`` matrix. What depends on a module stays per module: its scores (z-scored per row of
its own block), its selection groups and keep counts (``tensor`` granularity counts per tensor, never over the
stack), and the guard. The result equals the per-module :func:`~model_tailor.kernel.tailor.tailor_weight` calls
up to fp32 rounding in the lazy-update matmuls, whose row count changes (tests/unit/test_kernel_group.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_tailor.errors import NumericalError
from model_tailor.kernel.compensation import compute_dtype, obs_sweep
from model_tailor.kernel.hessian import DampedFactor, factor_hessian, fp32_precision
from model_tailor.kernel.masking import select_keep_mask
from model_tailor.kernel.scoring import salience as compute_salience
from model_tailor.kernel.tailor import (
    TailoredWeight,
    _check_options,
    _Clock,
    _decorate,
    _first_mask,
    _guard,
    _Scorer,
    _stats,
    _timing,
    _trivial,
    _validate,
    tailor_weight,
)

__all__ = ["GroupMember", "tailor_group"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class GroupMember:
    """One module of a shared-input group: ``(rows_i, cols)`` weights, all members with the same ``cols``."""

    base: Tensor
    finetuned: Tensor
    name: str | None = None
    keep_mask: Tensor | None = None


@dataclass
class _Prepared:
    V: Tensor
    T: Tensor
    score: _Scorer
    keep: Tensor | None


def tailor_group(
    members: Sequence[GroupMember],
    hessian: Tensor,
    *,
    density: float = 0.1,
    alpha: float = 0.8,
    block_size: int = 128,
    percdamp: float = 0.01,
    compensation: str = "obs",
    granularity: str = "block",
    sensitivity: str = "weight",
    mask_timing: str = "adaptive",
    guard: bool = True,
    salience: str = "magnitude",
) -> list[TailoredWeight]:
    """``[tailor_weight(m.base, m.finetuned, hessian, ...) for m in members]`` with the shared work done once.

    Options are those of :func:`~model_tailor.kernel.tailor.tailor_weight` (no ``target``: preserve-aware
    targets differ per module and go through it). Members that are trivial (density 1, no delta) take the
    per-module path. Shared phase times (``factor``, ``sweep``) are split over members in proportion to rows.

    Returns:
        One :class:`TailoredWeight` per member, in order.
    """
    _check_options(density, alpha, block_size, compensation, granularity, sensitivity, mask_timing, "delta", salience)
    for m in members:
        _validate(m.base, m.finetuned, hessian, None, m.keep_mask, m.name)
    opts = dict(density=density, alpha=alpha, block_size=block_size, percdamp=percdamp, compensation=compensation)
    opts.update(granularity=granularity, sensitivity=sensitivity, mask_timing=mask_timing, guard=guard)
    opts.update(salience=salience)
    out: list[TailoredWeight | None] = [None] * len(members)
    grouped = []
    for i, m in enumerate(members):
        V, T = m.base.to(compute_dtype(m.base, m.finetuned, hessian)), m.finetuned
        if _trivial(V, T.to(V), hessian, m.keep_mask, density, alpha, compensation, m.name)[0]:
            out[i] = tailor_weight(m.base, m.finetuned, hessian, keep_mask=m.keep_mask, name=m.name, **opts)
        else:
            grouped.append(i)
    if grouped:
        timings = {_timing(mask_timing, members[i].keep_mask, granularity, compensation, None) for i in grouped}
        if len(timings) > 1:  # some masks fixed, some not: nothing to stack safely
            grouped_all = [
                tailor_weight(m.base, m.finetuned, hessian, keep_mask=m.keep_mask, name=m.name, **opts) for m in members
            ]
            return grouped_all
        res = _tailor_stacked([members[i] for i in grouped], hessian, timings.pop(), opts)
        for i, r in zip(grouped, res, strict=True):
            out[i] = r
    return [r for r in out if r is not None]


def _tailor_stacked(members: Sequence[GroupMember], hessian: Tensor, timing: str, opts: dict) -> list[TailoredWeight]:
    """The non-trivial members: one factor, per-member scores and first masks, one sweep, per-member guard."""
    device = members[0].base.device
    dtype = compute_dtype(hessian, *(t for m in members for t in (m.base, m.finetuned)))
    clock = _Clock(device)
    with fp32_precision():
        factor = factor_hessian(hessian.to(device=device, dtype=dtype), percdamp=opts["percdamp"], name=members[0].name)
        clock.lap("factor")
        preps = [_prepare(m, factor, timing, dtype, opts) for m in members]
        clock.lap("select")
        decorated = _decorate_all(preps, factor, timing, opts)
        clock.lap("sweep")
        finals = []
        for m, p, (W_comp, keep) in zip(members, preps, decorated, strict=True):
            c = opts["compensation"]
            finals.append(_guard(p.V, p.T, W_comp, keep, factor, c, False, opts["guard"], m.name))
        clock.lap("guard")
    total_rows = sum(m.base.shape[0] for m in members)
    out = []
    for m, (_, keep), (W_final, used, errors) in zip(members, decorated, finals, strict=True):
        share = m.base.shape[0] / total_rows
        own = _Clock(device)
        own.seconds = {k: v * share for k, v in clock.seconds.items()}
        stats = _stats(m.base, keep, errors, used, opts["compensation"], timing, factor, own, m.name)
        if not bool(torch.isfinite(W_final).all()):  # tailor_weight's check, per member
            raise NumericalError(f"{m.name or 'tensor'}: tailored weight contains NaN or Inf", layer=m.name)
        weight = torch.where(keep, W_final.to(m.base.dtype), m.base)
        out.append(TailoredWeight(weight=weight, keep_mask=keep, stats=stats))
    return out


def _prepare(m: GroupMember, factor: DampedFactor, timing: str, dtype: torch.dtype, opts: dict) -> _Prepared:
    """One member's scorer and upfront/fixed mask, exactly as ``tailor_weight`` builds them."""
    V = m.base.to(dtype=dtype)
    T = m.finetuned.to(device=V.device, dtype=dtype)
    sal = compute_salience(V, T, kind=opts["salience"])
    score = _Scorer(sal, V, factor.U.diagonal(), opts["alpha"], opts["sensitivity"])
    keep = _first_mask(
        score, T, m.keep_mask, False, False, timing, opts["density"], opts["granularity"], opts["block_size"]
    )
    return _Prepared(V, T, score, keep)


def _decorate_all(
    preps: Sequence[_Prepared], factor: DampedFactor, timing: str, opts: dict
) -> list[tuple[Tensor, Tensor]]:
    """Per-member ``(W_comp, keep)``; the OBS sweep runs once over the stacked rows."""
    compensation, density, block_size = opts["compensation"], opts["density"], opts["block_size"]
    if compensation not in ("obs", "official"):
        return [
            _decorate(p.V, p.T, p.keep, factor, p.score, compensation, timing, density, block_size, False)
            for p in preps
        ]
    bounds = [0]
    for p in preps:
        bounds.append(bounds[-1] + p.V.shape[0])
    spans = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if timing == "adaptive":

        def select(W_block: Tensor, cols: slice) -> Tensor:
            parts = [
                select_keep_mask(p.score(W_block[s], cols), density, granularity="tensor")
                for p, s in zip(preps, spans, strict=True)
            ]
            return torch.cat(parts)

    else:
        keep_all = torch.cat([p.keep for p in preps])

        def select(_w: Tensor, cols: slice) -> Tensor:
            return keep_all[:, cols]

    T = torch.cat([p.T for p in preps])
    V = torch.cat([p.V for p in preps])
    sign = -1 if compensation == "obs" else 1
    W, keep = obs_sweep(T, V, factor.U, select, sign=sign, block_size=block_size)
    return [(W[s], keep[s]) for s in spans]
