"""One block's targets to kernel calls: one per shared-input group where the grouped kernel covers the run, one
per module otherwise (docs/METHOD.md §8, §9).

Linears that read the same input tensor (q/k/v_proj, gate/up_proj) share one Hessian: one accumulator, listed in
:attr:`~model_tailor.pipeline.activations.BlockHessians.groups`. :func:`~model_tailor.kernel.group.tailor_group`
tailors them with one damped factor and one OBS sweep over their stacked rows, while scores, keep counts, the guard
and the stats stay per module, so the result equals the per-module calls (same masks, weights to fp32 rounding).
It covers sparse patches without the preserve term, with calibration data (:func:`can_group`); every other run,
and ``group_modules: false``, tailors module by module.

Both paths share the per-tensor mechanics held here (:class:`KernelInput`): fp32 kernel layout on the run's device
(GPT-2 ``Conv1D`` turned around, docs/METHOD.md §1), and the tailored tensor back as
:class:`~model_tailor.pipeline.weights.SparseValues` and :class:`~model_tailor.pipeline.report.TensorRecord`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_tailor.config import TailorConfig
from model_tailor.kernel.multitask import prefer_reference
from model_tailor.kernel.tailor import TailoredWeight
from model_tailor.pipeline.adapter import tailor_shared, tailor_tensor
from model_tailor.pipeline.report import TensorRecord
from model_tailor.pipeline.weights import SparseValues

__all__ = ["KernelInput", "can_group", "shared_input_groups", "tailor_one", "tailor_together"]

Tensor = torch.Tensor
Tailored = tuple[SparseValues, TensorRecord]


@dataclass(frozen=True)
class KernelInput:
    """One target as stored (checkpoint layout and dtype), with its fixed mask (``granularity: global``) if any,
    and a ``reference`` weight on that mask the result must not reconstruct worse than (``combine
    --redecorate``: the combined patch's weights, docs/METHOD.md §12)."""

    name: str
    base: Tensor
    finetuned: Tensor
    transposed: bool = False
    keep_mask: Tensor | None = None
    reference: Tensor | None = None

    def to_kernel(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(base, finetuned, keep_mask)`` as the kernel wants them: fp32 ``(rows=out, cols=in)`` on ``device``."""
        b32, f32 = self.base.to(device, torch.float32), self.finetuned.to(device, torch.float32)
        keep = self.keep_mask
        if self.transposed:
            b32, f32 = b32.T.contiguous(), f32.T.contiguous()
            keep = keep.T.contiguous() if keep is not None else None
        return b32, f32, keep

    def against_reference(
        self, res: TailoredWeight, finetuned: Tensor, H: Tensor | None, percdamp: float
    ) -> TailoredWeight:
        """``res``, or the reference where it reconstructs the target (``finetuned``, kernel layout) better under
        the damped ``H`` (stats ``used: reference``)."""
        if self.reference is None or H is None:
            return res
        ref = self.reference.to(finetuned.device, torch.float32)
        ref = ref.T.contiguous() if self.transposed else ref
        W, won, error = prefer_reference(res.weight.to(torch.float32), ref, finetuned, H, percdamp=percdamp)
        if not won:
            return res
        stats = dataclasses.replace(res.stats, used="reference", error_compensated=error)
        return dataclasses.replace(res, weight=W.to(res.weight.dtype), stats=stats)

    def from_kernel(self, res: TailoredWeight, extra: dict[str, Any], data_free: bool) -> Tailored:
        """The kernel's result in checkpoint layout: the compact tailored values and the report record."""
        W, mask = (res.weight.T, res.keep_mask.T) if self.transposed else (res.weight, res.keep_mask)
        record = TensorRecord(**dataclasses.asdict(res.stats), **extra, data_free=data_free)
        sv = SparseValues.from_dense(self.base, W.to(self.base.dtype), mask)
        if res.lowrank is not None:  # factors in checkpoint layout: (A B)^T = B^T A^T for Conv1D
            A, B = (res.lowrank[1].T, res.lowrank[0].T) if self.transposed else res.lowrank
            lowrank = (A.to("cpu", torch.float32).contiguous(), B.to("cpu", torch.float32).contiguous())
            sv = dataclasses.replace(sv, lowrank=lowrank)
        return sv, record


def can_group(cfg: TailorConfig, H: Tensor | None, transposed: Sequence[bool]) -> bool:
    """Whether targets sharing the input Hessian ``H`` (``transposed``: each one's layout) go through one grouped
    kernel call.

    The grouped kernel has no preserve target (W* differs per module) and no low-rank structure; data-free
    targets have no Hessian to share. Targets stored in different layouts are not stacked."""
    return (
        cfg.group_modules
        and len(transposed) > 1
        and H is not None
        and cfg.structure == "sparse"
        and cfg.preserve is None
        and not cfg.data_free
        and len(set(transposed)) == 1
    )


def shared_input_groups(names: Sequence[str], groups: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """``names`` split by shared input, each group in ``names`` order, groups in order of their first member.

    ``groups``: leader -> the names sharing its input (``BlockHessians.groups``); a name in none of them (its
    module never ran) is a group of its own."""
    leader = {n: lead for lead, members in groups.items() for n in members}
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(leader.get(n, n), []).append(n)
    return list(out.values())


def tailor_one(
    item: KernelInput, H: Tensor | None, H_o: Tensor | None, cfg: TailorConfig, device: torch.device
) -> Tailored:
    """One target in one kernel call (:func:`~model_tailor.pipeline.adapter.tailor_tensor`)."""
    base, ft, keep = item.to_kernel(device)
    res, extra = tailor_tensor(base, ft, H, H_o, cfg, keep_mask=keep, name=item.name)
    res = item.against_reference(res, ft, H if H_o is None else None, cfg.percdamp)
    return item.from_kernel(res, extra, data_free=H is None)


def tailor_together(items: Sequence[KernelInput], H: Tensor, cfg: TailorConfig, device: torch.device) -> list[Tailored]:
    """Targets sharing the input Hessian ``H`` in one grouped kernel call (:func:`can_group` holds), in order."""
    inputs = [item.to_kernel(device) for item in items]
    results = tailor_shared(
        [b for b, _, _ in inputs],
        [f for _, f, _ in inputs],
        H,
        cfg,
        keep_masks=[k for _, _, k in inputs],
        names=[item.name for item in items],
    )
    return [
        item.from_kernel(item.against_reference(res, f, H, cfg.percdamp), extra, data_free=False)
        for item, (_, f, _), (res, extra) in zip(items, inputs, results, strict=True)
    ]
