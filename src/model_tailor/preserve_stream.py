"""Preserve-aware tailoring inside the pipeline (Issue 5; PILOT.md "A dual objective"; METHOD §3, §8).

Per target linear the run minimises ``||(W - W_ft) X_t||^2 + lam ||(W - W_pre) X_o||^2`` under the patch
budget. ``X_t`` is today's calibration stream (propagated through the TAILORED blocks, METHOD §9 D17); ``X_o`` is
a second, "preserve" stream of original-ability data whose block inputs come from the BASE weights: each block
runs it with its target weights set back to base, so the preserve stream is the base model's own forward pass.
Tensors outside the targets take their non-target policy value in both streams (``reset``, the default, is
base; with ``keep`` the preserve stream sees the fine-tuned norms the tailored model will hold), and a block list
after an already tailored one (LLaVA's language model after a tailored vision tower) receives the tailored
earlier list's output, as the tailored model will.

This module holds the mechanics the pipeline delegates: loading the preserve data (a JSONL file or ``self``,
:mod:`model_tailor.calibration.selfgen`), one Hessian pass over a stream, and the per-tensor maths, which
reuses :func:`~model_tailor.preserve.preserve_target` and the unchanged kernel (``target=W*``, ``hessian=H_c``).
The stage order stays in :mod:`model_tailor.pipeline`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .block_stats import BlockHessians
from .calibration.capture import BlockCall, capture_inputs, replace_hidden, run_block
from .calibration.data import CalibrationBatch, CalibrationSet, build_calibration
from .calibration.selfgen import SelfPreserveSpec, generate_self_preserve
from .compensation import reconstruction_error
from .config import TailorConfig
from .errors import CalibrationError
from .hessian import normalize_hessian
from .kernel import TailoredWeight, tailor_weight
from .preserve import preserve_target, tailor_weight_structured

logger = logging.getLogger(__name__)

__all__ = [
    "PreserveData",
    "Stream",
    "accumulate",
    "capture_stream",
    "load_preserve",
    "reaching_batches",
    "tailor_tensor",
]


@dataclass
class PreserveData:
    """The preserve stream's data.

    Attributes:
        calib: rendered, tokenised batches (same record forms and rendering as the calibration data).
        info: the report's ``preserve`` section (source, sha256 or generation spec, counts, lambda, structure).
        generated: for ``self``, the exact JSONL text of the generated records (written to
            ``<out>.preserve.jsonl``); None for a user file.
    """

    calib: CalibrationSet
    info: dict[str, Any]
    generated: str | None = None


@dataclass
class Stream:
    """One activation stream through a block list: the recorded call of each batch and its token masks."""

    calls: list[BlockCall]
    masks: list[list[torch.Tensor]]


def load_preserve(cfg: TailorConfig, model_dir: Path, model_cls: type | None) -> PreserveData:
    """Read ``cfg.preserve`` (a JSONL file) or generate it with the BASE model (``"self"``), then batch it.

    Raises:
        CalibrationError: the file is missing, unreadable or malformed (with its line number).
    """
    common = dict(max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, seed=cfg.seed, model_cls=model_cls)
    generated = None
    if cfg.preserve == "self":
        spec = SelfPreserveSpec(samples=cfg.preserve_samples, seed=cfg.seed, max_new_tokens=cfg.preserve_max_new_tokens)
        records = generate_self_preserve(cfg.base, spec, device=cfg.device, cache_dir=cfg.cache_dir)
        generated = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with tempfile.TemporaryDirectory() as tmp:  # line numbers match <out>.preserve.jsonl, written later
            path = Path(tmp) / "preserve.jsonl"
            path.write_text(generated, encoding="utf-8")
            calib = build_calibration(path, model_dir, samples=len(records), **common)
        info: dict[str, Any] = {
            "source": "self",
            "spec": dataclasses.asdict(spec),
            "generated": len(records),
            "sha256": hashlib.sha256(generated.encode("utf-8")).hexdigest(),
        }
    else:
        path = Path(str(cfg.preserve))
        if not path.is_file():
            raise CalibrationError(
                f"preserve file {str(path)!r} does not exist; pass a JSONL file of original-ability records "
                "or --preserve self"
            )
        calib = build_calibration(path, model_dir, samples=cfg.preserve_samples, **common)
        info = {"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    info.update(
        preserve_weight=cfg.preserve_weight,
        structure=cfg.structure,
        lines=calib.lines,
        available=calib.available,
        n_tokens=calib.n_tokens,
        batches=len(calib.batches),
        warnings=calib.warnings,
    )
    logger.info(
        "preserve data: %s, %d record(s), %d tokens, lambda %s",
        info["source"],
        len(calib.lines),
        calib.n_tokens,
        cfg.preserve_weight,
    )
    return PreserveData(calib, info, generated)


def capture_stream(
    model: nn.Module,
    block_list: Any,
    first: int,
    batches: list[CalibrationBatch],
    nq: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Stream:
    """The inputs (+ keyword arguments) of ``block_list``'s block ``first`` for each batch, and their token masks.

    The caller installs the materialiser's hooks: modules before the block run with their current values."""
    path = block_list.block_path(first)
    calls = capture_inputs(
        model, model.get_submodule(path), [b.inputs for b in batches], device=device, dtype=dtype, block_name=path
    )
    return Stream(calls, [token_masks(block_list.role, b.inputs, b.token_mask, nq) for b in batches])


def reaching_batches(batches: list[CalibrationBatch], role: str) -> list[CalibrationBatch]:
    """The batches that reach a block list of ``role``: all for a language model, those with images otherwise
    (text-only preserve data, e.g. ``self``, never runs a vision tower)."""
    if role == "language":
        return batches
    return [b for b in batches if any(k.startswith("pixel") for k in b.inputs)]


def accumulate(
    block: nn.Module,
    modules: dict[str, nn.Module],
    stream: Stream,
    device: torch.device,
    *,
    propagate_dtype: torch.dtype | None = None,
) -> tuple[BlockHessians, Stream | None]:
    """Run ``block`` on every call of ``stream`` with Hessian hooks on ``modules``.

    Returns:
        The :class:`BlockHessians`, hooks removed and Hessians readable (the caller closes it), and, when
        ``propagate_dtype`` is given, the next block's stream (this block's outputs, cast to it) from the same pass.
    """
    stats = BlockHessians(modules, device)
    out: list[BlockCall] = []
    try:
        for call, m in zip(stream.calls, stream.masks, strict=True):
            stats.set_masks(m)
            hidden = run_block(block, call)
            stats.end_batch()
            if propagate_dtype is not None:
                out.append(replace_hidden(call, hidden.to(propagate_dtype)))
    except BaseException:
        stats.close()
        raise
    stats.stop()  # the Hessians stay readable; later passes through these modules must not add to them
    return stats, (Stream(out, stream.masks) if propagate_dtype is not None else None)


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
    options: dict[str, Any] = dict(
        alpha=1.0 if free else cfg.alpha,
        block_size=cfg.block_size,
        compensation="none" if free else cfg.compensation,
        granularity="block" if cfg.granularity == "global" else cfg.granularity,
        sensitivity=cfg.sensitivity,
        mask_timing=cfg.mask_timing,
        guard=cfg.guard,
    )
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
    rows, cols = base.shape
    rank = 0 if res.lowrank is None else int(res.lowrank[0].shape[1])
    extra: dict[str, Any] = {
        "structure": structure,
        "rank": rank,
        "params": res.stats.kept + rank * (rows + cols),
        "budget": cfg.density * rows * cols,
    }
    if H_o is not None and H_t is not None:
        extra.update(_tradeoff(base, finetuned, target, res, normalize_hessian(H_t), normalize_hessian(H_o)))
    return res, extra


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


def token_masks(role: str, inputs: dict[str, torch.Tensor], token_mask: torch.Tensor, nq: int) -> list[torch.Tensor]:
    """Candidate padding masks of a batch for the Hessians of a block list of ``role`` (METHOD §9, D16)."""
    if role == "language":
        return [token_mask]
    if role == "qformer" and "qformer_attention_mask" in inputs:
        q = inputs["qformer_attention_mask"].bool()
        return [torch.cat([torch.ones(q.shape[0], nq, dtype=torch.bool), q], dim=1), q]
    return []
