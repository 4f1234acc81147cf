"""Outputs of a run: the sparse patch, and on request the full tailored model written shard by shard.

Both stream one tensor at a time from the readers: a target is ``base`` with its tailored values, a changed
non-target follows its action (docs/METHOD.md §11), an identical tensor is copied from base. The patch holds every
tensor that differs from base in the tailored model, so ``apply(base, patch)`` equals the saved model.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from model_tailor.calibration.data import CalibrationSet
from model_tailor.config import TailorConfig
from model_tailor.errors import CalibrationError
from model_tailor.io.atomic import atomic_write_json, atomic_write_text
from model_tailor.io.checkpoint import CheckpointReader, CheckpointWriter
from model_tailor.io.safety import Output, check_outputs, lock_outputs, refuse_remote_code
from model_tailor.patch.fingerprint import fingerprint
from model_tailor.patch.format import save_patch
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch, current_versions, dtype_name, utc_now
from model_tailor.pipeline.report import TailorReport
from model_tailor.pipeline.resume import WorkDir, run_key
from model_tailor.pipeline.targets import TargetPlan
from model_tailor.pipeline.weights import WeightSource

logger = logging.getLogger(__name__)

__all__ = ["build_patch", "calibration_info", "guard_outputs", "planned_outputs", "write_outputs"]


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


def side_files(out: Path) -> tuple[Path, Path]:
    """``<out>.report.json`` and ``<out>.preserve.jsonl`` (the self-generated preserve records)."""
    return out.with_name(out.name + ".report.json"), out.with_name(out.name + ".preserve.jsonl")


def planned_outputs(cfg: TailorConfig) -> list[Output]:
    """Every path the run writes, the side files included."""
    outs = []
    if cfg.out is not None:
        report, records = side_files(Path(cfg.out))
        outs += [Output("--out", Path(cfg.out)), Output("report", report)]
        if cfg.self_preserve:
            outs.append(Output("preserve records", records))
    if cfg.save_model is not None:
        outs.append(Output("--save-model", Path(cfg.save_model), "dir"))
    return outs


def check_inputs(cfg: TailorConfig) -> dict[str, Path | None]:
    """Fail fast on inputs that would otherwise fail late (or run code): returns them by label."""
    calibrations = list(dict.fromkeys(cfg.calibration_paths))  # one file shared by several tasks is one input
    for label, path in [*(("calibration", c) for c in calibrations), ("preserve", cfg.preserve)]:
        if path is None or (label == "preserve" and cfg.self_preserve):
            continue
        if not Path(path).is_file():
            what = "is a folder" if Path(path).is_dir() else "does not exist"
            raise CalibrationError(f"{label} file {str(path)!r} {what}; pass a JSONL file (--{label})")
    for path in (cfg.base, *cfg.finetuned_paths):
        CheckpointReader(path).close()  # headers only: a missing or broken checkpoint fails before hashing
        refuse_remote_code(path if Path(path).is_dir() else Path(path).parent)
    preserve = Path(cfg.preserve) if cfg.preserve is not None and not cfg.self_preserve else None
    inputs: dict[str, Path | None] = {"base": cfg.base}
    inputs.update(_numbered("fine-tuned", cfg.finetuned_paths))
    inputs.update(_numbered("calibration", calibrations))
    return {**inputs, "preserve": preserve}


def _numbered(label: str, paths: Sequence[Path | None]) -> dict[str, Path | None]:
    """``label`` for the first path, ``label 2``, ``label 3``... for the others of a multi-task run."""
    return {label if i == 0 else f"{label} {i + 1}": p for i, p in enumerate(paths)}


@contextmanager
def guard_outputs(cfg: TailorConfig) -> Iterator[WorkDir | None]:
    """Check inputs and outputs, lock the outputs, clean what killed runs left, and yield the work folder
    (keyed on the inputs' content); None when the run writes nothing.

    An existing output is refused unless ``overwrite``, or an interrupted commit of this same run (same key)
    left it: then the rerun finishes the job.
    """
    outs = planned_outputs(cfg)
    inputs = check_inputs(cfg)
    if not outs:
        yield None
        return
    check_outputs(outs, inputs, overwrite=True)  # paths alone, before the lock
    anchor = Path(cfg.out if cfg.out is not None else cfg.save_model)  # type: ignore[arg-type]
    primary = [o.path for o in outs if o.label in ("--out", "--save-model")]
    with lock_outputs(primary, also_clean=[o.path for o in outs]):
        if not any(anchor.parent.glob(f".{glob.escape(anchor.name)}.work-*/committing.json")):
            check_outputs(outs, inputs, overwrite=cfg.overwrite)  # before the inputs are hashed
        preserve = inputs["preserve"]
        key = run_key(cfg.fingerprint(), Path(cfg.base), cfg.finetuned_paths, cfg.calibration_paths, preserve)
        workdir = WorkDir(anchor, key)
        check_outputs(outs, inputs, overwrite=cfg.overwrite, ours=workdir.committing())
        yield workdir


def _stage_model(cfg: TailorConfig, source: WeightSource) -> CheckpointWriter:
    """The tailored model in its temporary folder, finished but not yet in place."""
    writer = CheckpointWriter(cfg.save_model, max_shard_bytes=cfg.max_shard_bytes, overwrite=True)  # checked
    try:
        for name in source.finetuned.names():
            tensor = source.get(name).to(source.base.dtype(name))  # also tailors data-free entries
            entry = patch_entry(source, name)
            writer.add(name, entry.apply(source.base.get(name)) if entry is not None else tensor)
        writer.copy_files(source.finetuned.extra_files())
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer


def write_outputs(
    cfg: TailorConfig,
    source: WeightSource,
    make_patch: Callable[[], SparsePatch],
    report: TailorReport,
    *,
    preserve_records: str | None = None,
    workdir: WorkDir | None = None,
) -> SparsePatch:
    """Stage the model (if asked), the patch, the self-generated preserve records (``<out>.preserve.jsonl``,
    the exact JSONL the run used) and the report; then record them in the work folder and rename them into
    place, the report last: a run is finished when its report exists, and a run killed while committing is
    finished by its rerun. Returns the patch.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out) if cfg.out is not None else None
    writer = _stage_model(cfg, source) if cfg.save_model is not None else None
    try:
        if writer is not None:
            report.outputs["model"] = str(cfg.save_model)
        patch = make_patch()
        staged: list[tuple[Path, Path]] = []
        if out is not None:
            assert workdir is not None, "a run with --out has a work folder"
            stage = workdir.path / "stage"
            stage.mkdir(parents=True, exist_ok=True)
            report_file, records_file = side_files(out)
            report.outputs["patch"] = str(out)
            report.outputs["report"] = str(report_file)
            if preserve_records is not None:
                report.outputs["preserve"] = str(records_file)
                report.preserve["file"] = str(records_file)
            staged.append((save_patch(patch, stage / out.name), out))
            if preserve_records is not None:
                atomic_write_text(stage / records_file.name, preserve_records)
                staged.append((stage / records_file.name, records_file))
            report.seconds["write"] = time.perf_counter() - t0
            atomic_write_json(stage / report_file.name, report.to_json())
            staged.append((stage / report_file.name, report_file))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if workdir is not None:
        workdir.mark_committing(([writer.out_dir] if writer is not None else []) + [final for _, final in staged])
    if writer is not None:
        writer.install()
    for tmp, final in staged:
        os.replace(tmp, final)
    report.seconds["write"] = time.perf_counter() - t0
    return patch
