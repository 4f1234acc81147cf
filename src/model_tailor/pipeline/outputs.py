"""Outputs of a run: the sparse patch, and on request the full tailored model written shard by shard.

Both stream one tensor at a time from the readers: a target is ``base`` with its tailored values, a changed
non-target follows its action (docs/METHOD.md §11), an identical tensor is copied from base. The patch holds every
tensor that differs from base in the tailored model, so ``apply(base, patch)`` equals the saved model.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_tailor.calibration.data import CalibrationSet
from model_tailor.config import TailorConfig
from model_tailor.io.atomic import atomic_write_json, atomic_write_text
from model_tailor.io.checkpoint import CheckpointWriter
from model_tailor.patch.fingerprint import fingerprint
from model_tailor.patch.format import save_patch
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch, current_versions, dtype_name, utc_now
from model_tailor.pipeline.report import TailorReport
from model_tailor.pipeline.targets import TargetPlan
from model_tailor.pipeline.weights import WeightSource

logger = logging.getLogger(__name__)

__all__ = ["build_patch", "calibration_info", "save_model", "write_outputs"]


def patch_entry(source: WeightSource, name: str) -> TensorPatch | None:
    """The patch entry of ``name`` (``None`` when the patch leaves it at base).

    The saved model writes ``entry.apply(base)``, not the tailored value itself: in fp32, ``base + (v - base)``
    can differ from ``v`` by an ulp, so one construction for both outputs is what makes ``apply(base, patch)``
    equal the saved model bit for bit.
    """
    if name in source.tailored:
        sv = source.tailored[name]
        base = source.base.get(name)
        tp = TensorPatch.from_weights(name, base, sv.apply_sparse(base), sv.keep_mask(tuple(base.shape)))
        if sv.lowrank is not None:  # structure lowrank / sparse+lowrank: format v2 on save
            tp = TensorPatch(name, tp.shape, tp.indices, tp.values, sv.lowrank)
        return tp
    if source.actions.get(name) == "keep":
        base = source.base.get(name)
        return TensorPatch.from_weights(name, base, source.finetuned.get(name).to(base.dtype))
    return None


def build_patch(
    source: WeightSource, plan: TargetPlan, *, config: dict[str, Any], stats: dict[str, Any]
) -> SparsePatch:
    """Patch entries for targets, data-free tailored and kept non-targets; reset tensors are listed by name.

    Consumes ``source.tailored`` (each entry is freed once its patch exists): write the model first.
    """
    tensors: dict[str, TensorPatch] = {}
    names = sorted(source.tailored) + [nt.name for nt in plan.non_targets if nt.action == "keep"]
    for name in names:
        entry = patch_entry(source, name)
        if entry is not None:
            tensors[name] = entry
        source.tailored.pop(name, None)
    reset = {nt.name: nt.reason for nt in plan.non_targets if nt.action == "reset"}
    metadata = PatchMetadata(
        base_dtypes={n: dtype_name(source.base.dtype(n)) for n in tensors},
        base_fingerprint=fingerprint(source.base, content_names=sorted(tensors)),
        config=config,
        versions=current_versions(),
        stats=stats,
        reset_params=reset,
        created=utc_now(),
    )
    return SparsePatch(tensors, metadata)


def save_model(source: WeightSource, out_dir: Path, *, max_shard_bytes: int, overwrite: bool) -> Path:
    """Write the tailored model (atomic folder, shard by shard) with the fine-tuned folder's side files."""
    with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for name in source.finetuned.names():
            tensor = source.get(name).to(source.base.dtype(name))  # also tailors data-free entries
            entry = patch_entry(source, name)
            writer.add(name, entry.apply(source.base.get(name)) if entry is not None else tensor)
        writer.copy_files(source.finetuned.extra_files())
        return writer.commit()


def calibration_info(cfg: TailorConfig, calib: CalibrationSet | None) -> dict[str, Any]:
    """The report's calibration section: file, exact lines used, counts and warnings (docs/METHOD.md §10)."""
    if calib is None:
        return {"mode": "data-free"}
    return {
        "file": str(cfg.calibration),
        "lines": calib.lines,
        "available": calib.available,
        "requested": calib.requested,
        "n_tokens": calib.n_tokens,
        "batches": len(calib.batches),
        "warnings": calib.warnings,
    }


def write_outputs(
    cfg: TailorConfig,
    source: WeightSource,
    make_patch: Callable[[], SparsePatch],
    report: TailorReport,
    *,
    preserve_records: str | None = None,
) -> SparsePatch:
    """Write the model (if asked), build and write the patch, the self-generated preserve records
    (``<out>.preserve.jsonl``, the exact JSONL the run used) and then the report.

    A model folder made here is removed if anything after it fails. Returns the patch.
    """
    t0 = time.perf_counter()
    created_model = None
    out = Path(cfg.out) if cfg.out is not None else None
    try:
        if cfg.save_model is not None:
            existed = Path(cfg.save_model).exists()
            save_model(source, Path(cfg.save_model), max_shard_bytes=cfg.max_shard_bytes, overwrite=cfg.overwrite)
            created_model = None if existed else Path(cfg.save_model)
            report.outputs["model"] = str(cfg.save_model)
        patch = make_patch()
        if out is not None:
            report.outputs["patch"] = str(out)
            report.outputs["report"] = str(out.with_name(out.name + ".report.json"))
            report.seconds["write"] = time.perf_counter() - t0
            if preserve_records is not None:
                records_file = out.with_name(out.name + ".preserve.jsonl")
                report.outputs["preserve"] = str(records_file)
                report.preserve["file"] = str(records_file)
            save_patch(patch, out)
            if preserve_records is not None:
                atomic_write_text(records_file, preserve_records)
            atomic_write_json(out.with_name(out.name + ".report.json"), report.to_json())
    except BaseException:
        if created_model is not None:
            shutil.rmtree(created_model, ignore_errors=True)
        raise
    report.seconds["write"] = time.perf_counter() - t0
    return patch
