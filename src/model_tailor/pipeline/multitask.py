"""Joint multi-task tailoring: several fine-tunes of one base, one patch (docs/METHOD.md §12).

Each task t has its fine-tuned checkpoint and calibration stream. Its stream is propagated separately through
the tailored blocks, exactly as a single-task stream is (D17); at each block it runs once with task t's own
fine-tuned target weights, giving per-task Hessians H_t. :func:`combine_block` turns them, per target, into the
combined target W* and Hessian H of :func:`~model_tailor.kernel.multitask.combine_targets`, and the block is
tailored as a single-task block whose fine-tuned weights are W*. Checkpoints stream block by block: memory grows
with one block per task, not with the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model_tailor.calibration.data import CalibrationSet, build_calibration
from model_tailor.config import TailorConfig
from model_tailor.errors import CheckpointError
from model_tailor.io.checkpoint import CheckpointReader, check_compatible
from model_tailor.io.peft_adapter import open_finetuned
from model_tailor.kernel.multitask import combine_targets
from model_tailor.patch.fingerprint import fingerprint
from model_tailor.pipeline.activations import BlockHessians, Stream, accumulate
from model_tailor.pipeline.targets import DiffSummary, TargetParam, diff_checkpoints
from model_tailor.pipeline.weights import Materializer, WeightSource

if TYPE_CHECKING:
    from model_tailor.pipeline.distributed import Group

__all__ = [
    "CombinedHessians",
    "accumulate_tasks",
    "build_calibrations",
    "combine_block",
    "describe_tasks",
    "open_tasks",
    "union_diff",
]

_ARCH_KEYS = ("model_type", "architectures")


def _architecture_problem(base: CheckpointReader, ft: CheckpointReader) -> str | None:
    bcfg, fcfg = base.config(), ft.config()
    if not (bcfg and fcfg) or all(bcfg.get(k) == fcfg.get(k) for k in _ARCH_KEYS):
        return None
    diffs = ", ".join(
        f"{k}: base {bcfg.get(k)!r} vs finetuned {fcfg.get(k)!r}" for k in _ARCH_KEYS if bcfg.get(k) != fcfg.get(k)
    )
    return f"base and finetuned are different architectures ({diffs})"


def _open_checked(path: Path, base: CheckpointReader) -> CheckpointReader:
    ft = open_finetuned(path, base)  # a PEFT adapter folder reads as base + adapter
    problem = _architecture_problem(base, ft)
    if problem is not None:
        raise CheckpointError(problem)
    check_compatible(base, ft)
    return ft


def open_tasks(cfg: TailorConfig, base: CheckpointReader) -> list[CheckpointReader]:
    """Every fine-tuned checkpoint, checked against the base (same architecture, tensor names and shapes).

    One fine-tune fails with its own error; several fail with one line listing every offender."""
    paths = cfg.finetuned_paths
    if len(paths) == 1:
        return [_open_checked(paths[0], base)]
    readers, problems = [], []
    for i, path in enumerate(paths):
        try:
            readers.append(_open_checked(path, base))
        except CheckpointError as err:
            problems.append(f"task {i + 1} {str(path)!r}: {err}")
    if problems:
        raise CheckpointError(
            f"{len(problems)} of {len(paths)} fine-tuned checkpoints are not fine-tunes of base {str(cfg.base)!r} "
            f"({'; '.join(problems)})"
        )
    return readers


def union_diff(base: CheckpointReader, tasks: Sequence[CheckpointReader], names: list[str]) -> DiffSummary:
    """The tensors any task changed (each pair read once, streamed; NaN/Inf checked as for one task)."""
    if len(tasks) == 1:
        return diff_checkpoints(base, tasks[0], names)
    changed: set[str] = set()
    for ft in tasks:
        changed |= diff_checkpoints(base, ft, names).changed
    return DiffSummary(frozenset(changed), len(names) - len(changed))


def build_calibrations(cfg: TailorConfig, tasks: Sequence[CheckpointReader], model_cls: type) -> list[CalibrationSet]:
    """Each task's calibration set, rendered with its own fine-tune's tokenizer and processor."""
    return [
        build_calibration(
            path,
            ft.config_dir,
            samples=cfg.samples,
            max_tokens=cfg.max_tokens,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            model_cls=model_cls,
            allow_outside_paths=cfg.allow_outside_paths,
        )
        for path, ft in zip(cfg.calibration_paths, tasks, strict=True)
    ]


def accumulate_tasks(
    block: nn.Module,
    modules: dict[str, nn.Module],
    targets: Sequence[TargetParam],
    streams: Sequence[Stream],
    source: WeightSource,
    mat: Materializer,
    group: Group,
) -> list[BlockHessians]:
    """H_t of every task: task t's stream through the block with task t's fine-tuned target weights (the
    single-task pass, once per task; docs/METHOD.md §9, §12)."""
    per_task: list[BlockHessians] = []
    try:
        for i, stream in enumerate(streams):
            for t in targets:
                mat.set_weight(t.module, "weight", source.tasks[i].get(t.name))
            stats, _ = accumulate(block, modules, stream, mat.device)
            stats.merge(group)  # sums over the ranks' shares of the batches
            per_task.append(stats)
    except BaseException:
        for stats in per_task:
            stats.close()
        raise
    return per_task


@dataclass
class CombinedHessians:
    """The combined Hessian H of each target of one block, read like a
    :class:`~model_tailor.pipeline.activations.BlockHessians` (shared inputs share one H)."""

    hessians: dict[str, torch.Tensor]
    tokens: dict[str, int]
    groups: dict[str, list[str]]

    def hessian(self, name: str) -> torch.Tensor | None:
        return self.hessians.get(name)

    def n_tokens(self, name: str) -> int:
        return self.tokens.get(name, 0)

    def close(self) -> None:
        self.hessians.clear()


def _common_groups(per_task: Sequence[BlockHessians]) -> dict[str, list[str]]:
    """The tasks' shared-input groups where they agree (they run the same modules), else none."""
    first = per_task[0].groups
    return dict(first) if all(s.groups == first for s in per_task) else {}


def _kernel_layout(t: TargetParam, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    value = value.to(device, torch.float32)
    return value.T.contiguous() if t.transposed else value


def combine_block(
    per_task: Sequence[BlockHessians],
    targets: Sequence[TargetParam],
    source: WeightSource,
    *,
    percdamp: float,
    device: torch.device,
) -> tuple[CombinedHessians, dict[str, torch.Tensor]]:
    """Per target: the combined Hessian and the combined target W* (checkpoint layout, fp32), from the tasks
    whose data reached it. Targets sharing an input are solved together (rows are independent, one factor).

    A target no task's data reached gets the mean of the fine-tuned weights as its target and no Hessian (the
    data-free fallback of docs/METHOD.md §10)."""
    groups = _common_groups(per_task)
    by_name = {t.name: t for t in targets}
    leader = {n: lead for lead, members in groups.items() for n in members}
    units: dict[str, list[TargetParam]] = {}
    for t in targets:
        units.setdefault(leader.get(t.name, t.name), []).append(t)
    hessians, tokens, finetuned = {}, {}, {}
    for unit in units.values():
        Hs = [stats.hessian(unit[0].name) for stats in per_task]
        present = [i for i, H in enumerate(Hs) if H is not None]
        rows = [t.shape[1] if t.transposed else t.shape[0] for t in unit]
        base = torch.cat([_kernel_layout(t, source.base.get(t.name), device) for t in unit])
        Ws = [
            torch.cat([_kernel_layout(t, source.tasks[i].get(t.name), device) for t in unit])
            for i in (present or range(len(per_task)))
        ]
        if present:
            W, H = combine_targets(base, Ws, [Hs[i] for i in present], percdamp=percdamp, name=unit[0].name)
        else:
            W, H = torch.stack(Ws).mean(dim=0), None
        for t, part in zip(unit, torch.split(W, rows), strict=True):
            finetuned[t.name] = (part.T if t.transposed else part).contiguous()
            tokens[t.name] = sum(stats.n_tokens(t.name) for stats in per_task)
            if H is not None:
                hessians[t.name] = H
    kept_groups = {lead: [n for n in members if n in by_name] for lead, members in groups.items()}
    return CombinedHessians(hessians, tokens, kept_groups), finetuned


def describe_tasks(
    cfg: TailorConfig, tasks: Sequence[CheckpointReader], calibs: Sequence[CalibrationSet], source: WeightSource
) -> dict[str, Any]:
    """The patch metadata of a joint patch: each task's files, fingerprint and record count, and where its
    kept entries came from (``kept_with_delta``: kept entries where the task's delta is nonzero; ``shared``:
    kept entries where two or more tasks' deltas are). Reads each tailored tensor of each task once."""
    names = sorted(source.tailored)
    with_delta = [0] * len(tasks)
    kept = shared = 0
    for name in names:
        idx = source.tailored[name].indices.long()
        base = source.base.get(name).reshape(-1)[idx].to(torch.float64)  # exact for every float dtype
        nonzero = torch.stack([ft.get(name).reshape(-1)[idx].to(torch.float64) != base for ft in tasks])
        counts = nonzero.sum(dim=0)
        kept += idx.numel()
        shared += int((counts >= 2).sum())
        for i, row in enumerate(nonzero):
            with_delta[i] += int(row.sum())
    source.release()
    described = []
    for i, (path, calib_path, ft, calib) in enumerate(
        zip(cfg.finetuned_paths, cfg.calibration_paths, tasks, calibs, strict=True)
    ):
        described.append(
            {
                "name": task_name(path),
                "finetuned": str(path),
                "fingerprint": fingerprint(ft, content_names=names),
                "calibration": None if calib_path is None else str(calib_path),
                "records": len(calib.lines),
                "kept_with_delta": with_delta[i],
            }
        )
        ft.close()
    return {"tasks": described, "kept": kept, "shared": shared}


def task_name(path: Path) -> str:
    """A task is named after its fine-tuned folder (or file)."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def tasks_calibration_info(cfg: TailorConfig, calibs: Sequence[CalibrationSet]) -> dict[str, Any]:
    """The report's calibration section of a joint run: one entry per task (docs/METHOD.md §10)."""
    entries = []
    for path, calib_path, calib in zip(cfg.finetuned_paths, cfg.calibration_paths, calibs, strict=True):
        info = {"task": task_name(path), "file": str(calib_path), "lines": calib.lines}
        info.update(available=calib.available, requested=calib.requested, n_tokens=calib.n_tokens)
        entries.append({**info, "batches": len(calib.batches), "warnings": calib.warnings})
    return {"tasks": entries, "n_tokens": sum(c.n_tokens for c in calibs)}
