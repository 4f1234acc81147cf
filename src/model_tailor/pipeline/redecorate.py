"""Re-decorate a combined patch with the tasks' calibration data (``combine --redecorate``, docs/METHOD.md §12).

``combine`` merges task patches entry by entry (disjoint mean, ...) with no data: the union of their masks is a
good support, but the combined values are not the best on it. Re-decoration keeps that union mask per tensor and
recomputes the kept values by the exact compensation solve against the joint multi-task target W* (the objective
of a joint ``tailor`` run restricted to the fixed mask), through the ordinary pipeline: each task's stream
propagated through the re-decorated blocks, H_t per task, the kernel on a fixed mask. Every tensor ends no worse
than the combination on that objective: where the combined values reconstruct better, they are kept
(``used: reference``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from model_tailor.config import TailorConfig
from model_tailor.errors import ConfigError
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.io.peft_adapter import glob_escape
from model_tailor.patch.model import SparsePatch
from model_tailor.pipeline.run import run_tailor

__all__ = ["redecorate_patch"]


def _fixed(patch: SparsePatch, base: CheckpointReader) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each patched tensor's union mask and combined weight (checkpoint layout)."""
    fixed = {}
    for name, tp in patch.tensors.items():
        b = base.get(name)
        mask = torch.zeros(b.numel(), dtype=torch.bool)
        mask[tp.indices.long()] = True
        fixed[name] = (mask.reshape(b.shape), tp.apply(b).to(torch.float32))
    base.close()
    return fixed


def redecorate_patch(combined: SparsePatch, cfg: TailorConfig, *, progress: bool = False) -> SparsePatch:
    """``combined`` with every patched target re-decorated on its own mask (module docstring).

    Args:
        combined: the output of :func:`~model_tailor.patch.combine.combine_patches`.
        cfg: the joint run: ``base``, ``finetuned`` and ``calibration`` (one or several tasks) and calibration
            options; ``include``, ``compensation`` and the outputs are set here (``exact``, in memory).
        progress: tqdm bars per block.

    Returns:
        The patch: same tensors and masks as ``combined``; re-decorated values where the tensor is a target of
        the tasks (a changed Linear weight in a block), the combined values elsewhere. Its metadata records
        the re-decoration (``config.combine.redecorated``, per-tensor stats, the tasks).

    Raises:
        ConfigError: the combined patch has low-rank parts (they have no mask to re-decorate).
    """
    if combined.has_lowrank:
        raise ConfigError("combine --redecorate re-decorates sparse patches; these patches have low-rank parts")
    names = tuple(glob_escape(n) for n in sorted(combined.tensors))
    fields = {**cfg.model_dump(), "include": names or ("",), "compensation": "exact", "out": None}
    run_cfg = TailorConfig.build(**{**fields, "save_model": None})
    fixed = _fixed(combined, CheckpointReader(cfg.base))
    result = run_tailor(run_cfg, progress=progress, fixed=fixed)
    tensors = dict(combined.tensors)
    redone = {n: tp for n, tp in result.patch.tensors.items() if n in tensors}
    tensors.update(redone)
    metadata = copy.deepcopy(combined.metadata)
    metadata.config.setdefault("combine", {})["redecorated"] = _provenance(run_cfg, sorted(redone))
    for name in redone:
        stats: dict[str, Any] = metadata.stats.setdefault(name, {})
        stats["redecorated"] = result.patch.metadata.stats.get(name, {})
    metadata.multitask = result.patch.metadata.multitask
    return SparsePatch(tensors, metadata)


def _provenance(cfg: TailorConfig, tensors: list[str]) -> dict[str, Any]:
    dumped = cfg.model_dump(mode="json")
    keep = ("base", "finetuned", "calibration", "samples", "max_tokens", "seed", "percdamp", "compensation")
    return {**{k: dumped[k] for k in keep}, "tensors": len(tensors)}
