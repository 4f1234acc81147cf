"""``tailor(...)``: the Python entry point of ``model-tailor tailor`` (same fields, same validation)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from model_tailor.config import TailorConfig
from model_tailor.pipeline.report import TailorPlan
from model_tailor.pipeline.run import TailorResult, plan_tailor, run_tailor

__all__ = ["plan", "tailor"]

PathLike = str | os.PathLike[str]


def tailor(
    base: PathLike,
    finetuned: PathLike | Sequence[PathLike],
    calibration: PathLike | Sequence[PathLike] | None,
    *,
    out: str | os.PathLike[str] | None = None,
    save_model: str | os.PathLike[str] | None = None,
    progress: bool = False,
    **fields: Any,
) -> TailorResult:
    """Tailor a fine-tuned checkpoint against its base (Model Tailor, docs/METHOD.md §2-§9).

    Args:
        base: folder (or ``.safetensors`` file) of the pre-trained model.
        finetuned: folder of the fine-tuned model (its config, tokenizer and processor render the
        calibration data); a list of several fine-tunes of ``base`` makes one joint multi-task patch
        (docs/METHOD.md §12).
        calibration: JSONL of target-task records; with several fine-tunes a list in their order, or one file
        shared by all; None only in the data-free mode (``alpha=1, compensation="none"``).
        out: patch file to write (``<out>.report.json`` beside it). None keeps the result in memory only.
        save_model: folder for the full tailored model (written atomically, shard by shard).
        progress: tqdm bars on stderr.
        **fields: any :class:`~model_tailor.config.TailorConfig` field (``density=0.1``,
        ``granularity="row"``...).

    Returns:
        :class:`~model_tailor.pipeline.TailorResult` (``patch``: SparsePatch, ``report``: TailorReport).

    Example:
        >>> result = tailor("base/", "ft/", "calib.jsonl", out="patch.safetensors", density=0.05)  #
        doctest: +SKIP
    """
    cfg = TailorConfig.build(
        base=base, finetuned=finetuned, calibration=calibration, out=out, save_model=save_model, **fields
    )
    return run_tailor(cfg, progress=progress)


def plan(
    base: PathLike,
    finetuned: PathLike | Sequence[PathLike],
    calibration: PathLike | Sequence[PathLike] | None,
    **fields: Any,
) -> TailorPlan:
    """The dry-run plan of :func:`tailor` (targets, non-target actions, layer order, estimates)."""
    cfg = TailorConfig.build(base=base, finetuned=finetuned, calibration=calibration, **fields)
    return plan_tailor(cfg)
