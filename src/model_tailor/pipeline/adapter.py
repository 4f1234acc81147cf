"""From the run's config to the kernel calls: one per tensor (plain, preserve-aware and/or structured), or one
per group of tensors that share an input.

The pipeline hands each target ``(base, finetuned, H_t[, H_o])`` here; this module turns the config's options into
the kernel's arguments (:func:`~model_tailor.kernel.tailor_weight` or
:func:`~model_tailor.kernel.tailor_weight_structured`, with ``target=W*`` from
:func:`~model_tailor.kernel.preserve_target` when preserve data is given;
:func:`~model_tailor.kernel.group.tailor_group` for a shared-input group) and the report's per-tensor extras.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from model_tailor.config import TailorConfig
from model_tailor.kernel.compensation import reconstruction_error
from model_tailor.kernel.group import GroupMember, tailor_group
from model_tailor.kernel.hessian import normalize_hessian
from model_tailor.kernel.objective import preserve_target
from model_tailor.kernel.structure import tailor_weight_structured
from model_tailor.kernel.tailor import TailoredWeight, tailor_weight

__all__ = ["tailor_shared", "tailor_tensor"]


def tailor_tensor(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    H_t: torch.Tensor | None,
    H_o: torch.Tensor | None,
    cfg: TailorConfig,
    *,
    keep_mask: torch.Tensor | None,
    name: str,
) -> tuple[TailoredWeight, dict[str, Any]]:
    """Tailor one ``(rows, cols)`` fp32 weight: plain, preserve-aware (``H_o`` given) and/or structured.

    Without ``H_o`` and with ``structure="sparse"`` this is exactly the plain kernel call (bitwise today's
    result). With ``H_o``: ``W*, H_c = preserve_target(...)`` and the kernel (or its structured wrapper) runs on
    ``target=W*, hessian=H_c``. ``H_t`` None means the data-free mode (salience only, uncompensated, sparse).

    Returns:
        The kernel's :class:`TailoredWeight` (``lowrank`` in kernel layout) and extra report stats: structure,
        rank, parameter count against the budget and, with ``H_o``, the trade-off errors under normalised
        Hessians (``target_error_*`` = ||(W - W_ft) X_t||^2, ``preserve_error_*`` = ||(W - W_pre) X_o||^2, for
        the masked weights, i.e. kept entries at the reconstruction target without compensation, and the final).
    """
    free = H_t is None
    options = _options(cfg, free)
    target, H = None, H_t
    if H_o is not None and H_t is not None:
        target, H = preserve_target(base, finetuned, H_t, H_o, cfg.preserve_weight, percdamp=cfg.percdamp)
    structure = "sparse" if free else cfg.structure
    if structure == "sparse":
        res = tailor_weight(
            base,
            finetuned,
            H,
            density=cfg.density,
            percdamp=cfg.percdamp,
            keep_mask=keep_mask,
            target=target,
            salience_from=cfg.salience_from,
            name=name,
            **options,
        )
    else:
        # Global granularity is refused with low-rank structures (config), so no fixed mask reaches here; the
        # sparse+lowrank residual is always ranked by its own salience (preserve.tailor_weight_structured).
        res = tailor_weight_structured(
            base,
            finetuned,
            H,
            structure=structure,
            density=cfg.density,
            target=target,
            percdamp=cfg.percdamp,
            name=name,
            **options,
        )
    extra = _extra(res, cfg, structure, base.shape)
    if H_o is not None and H_t is not None:
        extra.update(_tradeoff(base, finetuned, target, res, normalize_hessian(H_t), normalize_hessian(H_o)))
    return res, extra


def tailor_shared(
    bases: Sequence[torch.Tensor],
    finetuneds: Sequence[torch.Tensor],
    H_t: torch.Tensor,
    cfg: TailorConfig,
    *,
    keep_masks: Sequence[torch.Tensor | None],
    names: Sequence[str],
) -> list[tuple[TailoredWeight, dict[str, Any]]]:
    """:func:`tailor_tensor` of modules sharing one input Hessian ``H_t``, in one kernel call
    (:func:`~model_tailor.kernel.group.tailor_group`: one factor, one sweep over the stacked rows).

    Only for what that call covers: sparse structure, no preserve term, calibration data (the caller checks,
    :func:`~model_tailor.pipeline.groups.can_group`). Results equal the per-module calls: same masks, weights
    to fp32 rounding."""
    members = [
        GroupMember(b, f, name=n, keep_mask=k) for b, f, n, k in zip(bases, finetuneds, names, keep_masks, strict=True)
    ]
    results = tailor_group(members, H_t, density=cfg.density, percdamp=cfg.percdamp, **_options(cfg, False))
    return [(res, _extra(res, cfg, "sparse", m.base.shape)) for res, m in zip(results, members, strict=True)]


def _options(cfg: TailorConfig, free: bool) -> dict[str, Any]:
    """The kernel options of one run's config; the data-free mode is salience-only and uncompensated."""
    return dict(
        alpha=1.0 if free else cfg.alpha,
        block_size=cfg.block_size,
        compensation="none" if free else cfg.compensation,
        granularity="block" if cfg.granularity == "global" else cfg.granularity,
        sensitivity=cfg.sensitivity,
        mask_timing=cfg.mask_timing,
        guard=cfg.guard,
        salience=cfg.salience,
    )


def _extra(res: TailoredWeight, cfg: TailorConfig, structure: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """The report's structure, rank and parameter count against the budget ``density * rows * cols``."""
    rows, cols = shape
    rank = 0 if res.lowrank is None else int(res.lowrank[0].shape[1])
    return {
        "structure": structure,
        "rank": rank,
        "params": res.stats.kept + rank * (rows + cols),
        "budget": cfg.density * rows * cols,
    }


def _tradeoff(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    target: torch.Tensor | None,
    res: TailoredWeight,
    Ht: torch.Tensor,
    Ho: torch.Tensor,
) -> dict[str, float]:
    """Both halves of the dual objective for the masked and the final weights (normalised H, undamped)."""
    V = base.to(torch.float32)
    T = (finetuned if target is None else target).to(torch.float32)
    L = res.lowrank[0] @ res.lowrank[1] if res.lowrank is not None else torch.zeros_like(V)
    masked = torch.where(res.keep_mask, T, V + L)
    final = res.weight.to(torch.float32) + L
    F = finetuned.to(torch.float32)
    return {
        "target_error_masked": reconstruction_error(masked, F, Ht),
        "target_error_final": reconstruction_error(final, F, Ht),
        "preserve_error_masked": reconstruction_error(masked, V, Ho),
        "preserve_error_final": reconstruction_error(final, V, Ho),
    }
