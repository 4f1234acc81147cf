"""run_tailor(cfg): the only module that knows the stage order of a tailoring run (docs/METHOD.md §9).

1 open base and fine-tuned lazily, check them against each other, diff tensor by tensor (NaN/Inf check);
2 build a meta skeleton, discover its block lists, select targets and the policy of the other changed tensors;
3 build seeded calibration batches (and, with ``preserve``, the preserve batches); 4 for each block list holding
targets, in forward order: capture the inputs (+ every keyword argument) of its first targeted block, then per
block: Hessians of the targets (fine-tuned weights) -> [preserve: H_o and the next preserve inputs with BASE
target weights, :mod:`~model_tailor.pipeline.activations`] -> tailor each target -> run the TAILORED block to get
the next inputs (propagate: tailored, D17);
5 write the patch, the optional tailored model and the report. Resumable per finished block.

How one block is done lives in :mod:`~model_tailor.pipeline.blocks`; the order of the stages lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from model_tailor.calibration.data import CalibrationSet, read_records
from model_tailor.config import TailorConfig
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.io.peft_adapter import AdapterReader
from model_tailor.patch.model import SparsePatch
from model_tailor.pipeline.architectures import build_skeleton, checkpoint_names, discover_layout
from model_tailor.pipeline.blocks import BlockDone, BlockRunner, Prepared
from model_tailor.pipeline.distributed import Group, open_group
from model_tailor.pipeline.multitask import (
    build_calibrations,
    describe_tasks,
    open_tasks,
    task_name,
    tasks_calibration_info,
    union_diff,
)
from model_tailor.pipeline.outputs import build_patch, calibration_info, guard_outputs, write_outputs
from model_tailor.pipeline.planning import estimate_plan
from model_tailor.pipeline.preserve import load_preserve
from model_tailor.pipeline.report import TailorPlan, TailorReport
from model_tailor.pipeline.resume import WorkDir
from model_tailor.pipeline.targets import select_targets

logger = logging.getLogger(__name__)

__all__ = ["Fixed", "TailorResult", "plan_tailor", "run_tailor"]

#: Fixed keep masks and reference weights per target name (``combine --redecorate``), checkpoint layout.
Fixed = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TailorResult:
    """The patch and the report of one run."""

    patch: SparsePatch
    report: TailorReport


def _prepare(cfg: TailorConfig) -> Prepared:
    t0 = time.perf_counter()
    base = CheckpointReader(cfg.base)
    ft, *others = open_tasks(cfg, base)  # same architecture, names and shapes; several: docs/METHOD.md §12
    names = base.names()
    diff = union_diff(base, [ft, *others], names)
    model = build_skeleton(str(ft.config_dir))
    layout = discover_layout(model)
    param_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    to_ckpt = checkpoint_names(model, param_names, set(names))
    adapter = isinstance(ft, AdapterReader) and not others  # a joint run's targets are its union diff
    include = ft.restrict_include(cfg.include) if adapter else cfg.include
    plan = select_targets(
        model, layout, to_ckpt, diff, include=include, exclude=cfg.exclude, policy=cfg.non_target_policy
    )
    plan = ft.label_plan(plan) if adapter else plan
    return Prepared(base, ft, model, layout, to_ckpt, plan, time.perf_counter() - t0, tuple(others))


def plan_tailor(cfg: TailorConfig) -> TailorPlan:
    """What :func:`run_tailor` would do (``--dry-run``): reads the checkpoints and the calibration file
    only."""
    prep = _prepare(cfg)
    n_records = None
    if cfg.calibration is not None:
        files = dict.fromkeys(cfg.calibration_paths)  # a file shared by several tasks counts once
        n_records = sum(len(read_records(f, allow_outside_paths=cfg.allow_outside_paths)) for f in files)
    return estimate_plan(prep.model, prep.layout, prep.plan, prep.base, cfg, n_records)


def run_tailor(
    cfg: TailorConfig, *, progress: bool = False, on_block_done: BlockDone | None = None, fixed: Fixed | None = None
) -> TailorResult:
    """Tailor ``cfg.finetuned`` against ``cfg.base``; write ``cfg.out`` (+ report) and ``cfg.save_model`` if
    set.

    Args:
        cfg: resolved options.
        progress: show tqdm bars (stderr) per block.
        on_block_done: called with each block's path once it is tailored and checkpointed; an exception raised
            there stops the run as an interruption would (the finished blocks stay for a resumed run).
        fixed: target name -> (keep mask, reference weight), both in checkpoint layout: those targets keep that
            mask and end no worse than the reference (``combine --redecorate``, docs/METHOD.md §12).

    Returns:
        :class:`TailorResult` with the in-memory patch and report.

    Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) the ranks share the work
    (:mod:`~model_tailor.pipeline.distributed`); every rank returns the same patch, rank 0 alone writes, and an
    error on any rank ends all of them with that error.
    """
    with open_group(cfg.device) as group, group.guard():
        outputs = guard_outputs(cfg) if group.primary else nullcontext(None)
        with outputs as workdir:  # checks, lock and work folder before any heavy work
            return _run(cfg, progress and group.primary, workdir, on_block_done, group, fixed)


def _data(
    cfg: TailorConfig, prep: Prepared, runner: BlockRunner, group: Group, seconds: dict[str, float]
) -> list[CalibrationSet]:
    """Stage 3: each task's calibration set (none in the data-free mode) and, with ``preserve``, the preserve
    data."""
    t0 = time.perf_counter()
    calibs = [] if cfg.data_free else build_calibrations(cfg, [prep.finetuned, *prep.others], type(prep.model))
    for path, calib in zip(cfg.finetuned_paths, calibs, strict=False):  # no sets in the data-free mode
        prefix = f"{task_name(path)}: " if cfg.multitask else ""
        runner.warnings.extend(prefix + w for w in calib.warnings)
    seconds["calibration"] = time.perf_counter() - t0
    if cfg.preserve is not None:  # docs/METHOD.md §14; None runs exactly the plain pipeline
        t0 = time.perf_counter()
        mine = load_preserve(cfg, prep.finetuned.config_dir, type(prep.model)) if group.primary else None
        runner.preserve = group.broadcast(mine)  # `self` is generated (and cached) once, on rank 0
        runner.warnings.extend(f"preserve: {w}" for w in runner.preserve.calib.warnings)
        seconds["preserve_data"] = time.perf_counter() - t0
    return calibs


def _run(
    cfg: TailorConfig,
    progress: bool,
    workdir: WorkDir | None,
    on_block_done: BlockDone | None,
    group: Group,
    fixed: Fixed | None = None,
) -> TailorResult:
    seconds: dict[str, float] = {}
    prep = _prepare(cfg)
    seconds["load_and_diff"] = prep.seconds
    plan_view = estimate_plan(prep.model, prep.layout, prep.plan, prep.base, cfg, None)
    runner = BlockRunner(cfg, prep, progress, on_block_done, group)
    runner.resume(workdir)
    calibs = _data(cfg, prep, runner, group, seconds)
    calib = calibs[0] if calibs else None
    if cfg.granularity == "global":
        runner.global_masks()
    for name, (mask, reference) in (fixed or {}).items():  # combine --redecorate: the union mask, kept values
        runner.keep_masks[name], runner.references[name] = mask, reference
    t0 = time.perf_counter()
    with torch.no_grad():
        if calib is None:
            runner.data_free_targets()
        elif prep.plan.targets:
            runner.block_lists(calibs)
        for nt in prep.plan.non_targets:  # resolve tailor-policy tensors (data-free) now, not while writing
            if nt.action == "tailor":
                runner.source.get(nt.name)
    seconds["tailor"] = time.perf_counter() - t0
    if not prep.plan.targets:
        runner.warnings.append("no tensor qualifies as a target (no changed Linear weight inside the blocks)")
    layers = [runner.layers[f"{b}.{i}"] for b, i in prep.plan.block_order if f"{b}.{i}" in runner.layers]
    report = TailorReport(
        config=cfg.model_dump(mode="json"),
        plan=plan_view,
        layers=layers,
        data_free=runner.data_free,
        seconds=seconds,
        warnings=runner.warnings,
    )
    records = {**{n: s for layer in layers for n, s in layer.tensors.items()}, **runner.data_free}
    stats = {name: s.to_json() for name, s in records.items()}
    report.calibration = tasks_calibration_info(cfg, calibs) if cfg.multitask else calibration_info(cfg, calib)
    if runner.preserve is not None:
        report.preserve = runner.preserve.info
    tasks = describe_tasks(cfg, runner.source.tasks, calibs, runner.source) if cfg.multitask else {}

    def make_patch() -> SparsePatch:
        patch = build_patch(runner.source, prep.plan, config=report.config, stats=stats)
        patch.metadata.multitask = tasks  # a joint patch's tasks (docs/METHOD.md §12); {} otherwise
        return patch

    if not group.primary:  # the same patch in memory; rank 0 writes it
        return TailorResult(make_patch(), report)
    patch = write_outputs(
        cfg,
        runner.source,
        make_patch,
        report,
        preserve_records=runner.preserve.generated if runner.preserve is not None else None,
        workdir=workdir,
    )
    if runner.workdir is not None:
        runner.workdir.remove()
    return TailorResult(patch, report)
