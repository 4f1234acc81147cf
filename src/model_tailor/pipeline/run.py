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
from dataclasses import dataclass

import torch

from model_tailor.calibration.data import build_calibration, read_records
from model_tailor.config import TailorConfig
from model_tailor.errors import CheckpointError
from model_tailor.io.checkpoint import CheckpointReader, check_compatible
from model_tailor.io.peft_adapter import AdapterReader, open_finetuned
from model_tailor.patch.model import SparsePatch
from model_tailor.pipeline.architectures import build_skeleton, checkpoint_names, discover_layout
from model_tailor.pipeline.blocks import BlockDone, BlockRunner, Prepared
from model_tailor.pipeline.outputs import build_patch, calibration_info, guard_outputs, write_outputs
from model_tailor.pipeline.planning import estimate_plan
from model_tailor.pipeline.preserve import load_preserve
from model_tailor.pipeline.report import TailorPlan, TailorReport
from model_tailor.pipeline.resume import WorkDir
from model_tailor.pipeline.targets import diff_checkpoints, select_targets

logger = logging.getLogger(__name__)

__all__ = ["TailorResult", "plan_tailor", "run_tailor"]


@dataclass
class TailorResult:
    """The patch and the report of one run."""

    patch: SparsePatch
    report: TailorReport


def _prepare(cfg: TailorConfig) -> Prepared:
    t0 = time.perf_counter()
    base = CheckpointReader(cfg.base)
    ft = open_finetuned(cfg.finetuned, base)  # a PEFT adapter folder reads as base + adapter
    bcfg, fcfg = base.config(), ft.config()
    keys = ("model_type", "architectures")
    if bcfg and fcfg and any(bcfg.get(k) != fcfg.get(k) for k in keys):
        diffs = ", ".join(
            f"{k}: base {bcfg.get(k)!r} vs finetuned {fcfg.get(k)!r}" for k in keys if bcfg.get(k) != fcfg.get(k)
        )
        raise CheckpointError(f"base and finetuned are different architectures ({diffs})")
    check_compatible(base, ft)
    names = base.names()
    diff = diff_checkpoints(base, ft, names)
    model = build_skeleton(str(ft.config_dir))
    layout = discover_layout(model)
    param_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    to_ckpt = checkpoint_names(model, param_names, set(names))
    include = ft.restrict_include(cfg.include) if isinstance(ft, AdapterReader) else cfg.include
    plan = select_targets(
        model, layout, to_ckpt, diff, include=include, exclude=cfg.exclude, policy=cfg.non_target_policy
    )
    plan = ft.label_plan(plan) if isinstance(ft, AdapterReader) else plan
    return Prepared(base, ft, model, layout, to_ckpt, plan, time.perf_counter() - t0)


def plan_tailor(cfg: TailorConfig) -> TailorPlan:
    """What :func:`run_tailor` would do (``--dry-run``): reads the checkpoints and the calibration file
    only."""
    prep = _prepare(cfg)
    n_records = None
    if cfg.calibration is not None:
        n_records = len(read_records(cfg.calibration, allow_outside_paths=cfg.allow_outside_paths))
    return estimate_plan(prep.model, prep.layout, prep.plan, prep.base, cfg, n_records)


def run_tailor(cfg: TailorConfig, *, progress: bool = False, on_block_done: BlockDone | None = None) -> TailorResult:
    """Tailor ``cfg.finetuned`` against ``cfg.base``; write ``cfg.out`` (+ report) and ``cfg.save_model`` if
    set.

    Args:
        cfg: resolved options.
        progress: show tqdm bars (stderr) per block.
        on_block_done: called with each block's path once it is tailored and checkpointed; an exception raised
            there stops the run as an interruption would (the finished blocks stay for a resumed run).

    Returns:
        :class:`TailorResult` with the in-memory patch and report.
    """
    with guard_outputs(cfg) as workdir:  # checks, lock and work folder before any heavy work
        return _run(cfg, progress, workdir, on_block_done)


def _run(cfg: TailorConfig, progress: bool, workdir: WorkDir | None, on_block_done: BlockDone | None) -> TailorResult:
    seconds: dict[str, float] = {}
    prep = _prepare(cfg)
    seconds["load_and_diff"] = prep.seconds
    plan_view = estimate_plan(prep.model, prep.layout, prep.plan, prep.base, cfg, None)
    runner = BlockRunner(cfg, prep, progress, on_block_done)
    if workdir is not None:
        runner.resume(workdir)
    calib = None
    t0 = time.perf_counter()
    if not cfg.data_free:
        calib = build_calibration(
            cfg.calibration,
            prep.finetuned.config_dir,
            samples=cfg.samples,
            max_tokens=cfg.max_tokens,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            model_cls=type(prep.model),
            allow_outside_paths=cfg.allow_outside_paths,
        )
        runner.warnings.extend(calib.warnings)
    seconds["calibration"] = time.perf_counter() - t0
    if cfg.preserve is not None:  # docs/METHOD.md §14; None runs exactly the plain pipeline
        t0 = time.perf_counter()
        runner.preserve = load_preserve(cfg, prep.finetuned.config_dir, type(prep.model))
        runner.warnings.extend(f"preserve: {w}" for w in runner.preserve.calib.warnings)
        seconds["preserve_data"] = time.perf_counter() - t0
    if cfg.granularity == "global":
        runner.global_masks()
    t0 = time.perf_counter()
    with torch.no_grad():
        if calib is None:
            runner.data_free_targets()
        elif prep.plan.targets:
            runner.block_lists(calib)
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
    report.calibration = calibration_info(cfg, calib)
    if runner.preserve is not None:
        report.preserve = runner.preserve.info
    patch = write_outputs(
        cfg,
        runner.source,
        lambda: build_patch(runner.source, prep.plan, config=report.config, stats=stats),
        report,
        preserve_records=runner.preserve.generated if runner.preserve is not None else None,
        workdir=workdir,
    )
    if runner.workdir is not None:
        runner.workdir.remove()
    return TailorResult(patch, report)
