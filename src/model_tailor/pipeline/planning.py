"""The plan of a run (``--dry-run``): targets, non-target actions, layer order, and rough memory / time
estimates.

Estimates are back-of-the-envelope, from shapes only (nothing is materialised): peak memory is the largest
block
(fine-tuned in the compute dtype, plus fp32 base / fine-tuned / result copies of its largest target), the
modules outside blocks, the calibration activations (input and output of a block) and the block's Hessians.
Time assumes ~1e10 FLOP/s on CPU and ~1e13 on CUDA and counts Hessians, factorisations, sweeps and two block
passes per calibration token (docs/METHOD.md §9 "Memory and cost").
"""

from __future__ import annotations

from torch import nn

from model_tailor.config import TailorConfig
from model_tailor.pipeline.architectures import ModelLayout
from model_tailor.pipeline.report import TailorPlan
from model_tailor.pipeline.targets import TargetPlan

__all__ = ["estimate_plan"]

_FLOPS = {"cpu": 1e10, "cuda": 1e13}


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_plan(
    model: nn.Module,
    layout: ModelLayout,
    plan: TargetPlan,
    base,
    cfg: TailorConfig,
    n_records: int | None,  # noqa: ANN001
) -> TailorPlan:
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.dtype]
    block_paths = {bl.block_path(i) for bl in layout.block_lists for i in range(bl.length)}
    in_blocks = sum(_numel(model.get_submodule(p)) for p in block_paths)
    outside = _numel(model) - in_blocks
    biggest_block = max((_numel(model.get_submodule(f"{b}.{i}")) for b, i in plan.block_order), default=0)
    biggest_target = max((t.shape[0] * t.shape[1] for t in plan.targets), default=0)
    cols = [t.shape[1] if not t.transposed else t.shape[0] for t in plan.targets]
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(text_cfg, "hidden_size", 0) or 0)
    seqs = min(cfg.samples, n_records) if n_records is not None else cfg.samples
    tokens = 0 if cfg.data_free else seqs * cfg.max_tokens
    per_block_h = max(
        (
            sum((t.shape[1] if not t.transposed else t.shape[0]) ** 2 * 4 for t in plan.targets_in(b, i))
            for b, i in plan.block_order
        ),
        default=0,
    )
    peak = (
        biggest_block * itemsize
        + 4 * biggest_target * 4
        + outside * itemsize
        + 2 * tokens * hidden * itemsize
        + per_block_h
    )
    flops = 0.0
    for t, c in zip(plan.targets, cols, strict=True):
        r = t.shape[0] * t.shape[1] // c
        flops += 2 * tokens * c * c + c**3 / 3 + 2 * r * c * c
    blocks_run = len({(b, i) for b, i in plan.block_order})
    flops += 2 * 2 * tokens * biggest_block * blocks_run
    seconds = flops / _FLOPS["cuda" if cfg.device.startswith("cuda") else "cpu"]
    return TailorPlan(
        architecture=layout.architecture,
        block_lists=[
            {"path": b.path, "role": b.role, "length": b.length, "block_class": b.block_class}
            for b in layout.block_lists
        ],
        targets=[
            {
                "name": t.name,
                "shape": list(t.shape),
                "block": f"{t.block_list}.{t.block}",
                "transposed": t.transposed,
            }
            for t in plan.targets
        ],
        non_targets=[{"name": n.name, "action": n.action, "reason": n.reason} for n in plan.non_targets],
        identical=plan.identical,
        layer_order=[f"{b}.{i}" for b, i in plan.block_order],
        calibration_records=n_records,
        peak_memory_bytes=int(peak),
        estimated_seconds=float(seconds),
    )
