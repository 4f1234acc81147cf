"""Activation streams through a block list and the per-block Hessians they give.

A :class:`Stream` is the recorded call (inputs and every keyword argument) of each calibration batch at one block,
with its token masks; :func:`capture_stream` records it at a block list's block 0, :func:`accumulate`
runs one block over it with Hessian hooks (and, optionally, yields the next block's stream from the same pass).

Hessians of one block's target linears use one accumulator per distinct input.

Forward hooks read each target's input. Linears that receive the *same tensor object* in a forward pass
(q/k/v_proj, gate/up_proj) share one :class:`HessianAccumulator`, found on the first batch by identity, so a
LLaMA block accumulates 4 Hessians, not 7. Padding positions are left out through a token mask matched on the
input's leading shape (docs/METHOD.md §9, D16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model_tailor.calibration.capture import BlockCall, capture_inputs, replace_hidden, run_block
from model_tailor.calibration.data import CalibrationBatch
from model_tailor.kernel.hessian import HessianAccumulator

if TYPE_CHECKING:
    from model_tailor.pipeline.distributed import Group

__all__ = ["BlockHessians", "Stream", "accumulate", "capture_stream", "reaching_batches", "token_masks"]


class BlockHessians:
    """Accumulate input Hessians of ``modules`` (name -> Linear/Conv1D) while the block runs.

    Call :meth:`set_masks` before each batch with the candidate token masks (bool ``(b, L)``) of that batch;
    an
    input ``(b, L, cols)`` uses the first candidate of shape ``(b, L)``, or counts every position if none fits
    (vision patches, Q-Former queries).
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device) -> None:
        self.device = device
        self._masks: Sequence[torch.Tensor] = ()
        self._first: dict[str, torch.Tensor] = {}
        self._owner: dict[str, str] = {}  # target -> group leader
        self._acc: dict[str, HessianAccumulator] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]
        self._names = list(modules)
        self.groups: dict[str, list[str]] = {}

    def set_masks(self, masks: Sequence[torch.Tensor]) -> None:
        self._masks = masks

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        lead = tuple(x.shape[:-1])
        for m in self._masks:
            if tuple(m.shape) == lead:
                return m.to(x.device)
        return None

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if not self._owner:  # first batch: remember inputs, group after the pass
                self._first[name] = x
                return
            leader = self._owner.get(name)
            if leader is None:  # first ran after the first batch: its own group
                leader = self._owner[name] = name
                self._acc[name] = HessianAccumulator(x.shape[-1], device=self.device, name=name)
                self.groups[name] = [name]
            if leader == name:
                self._acc[name].add(x.detach(), token_mask=self._mask_for(x))

        return hook

    def end_batch(self) -> None:
        """Close a batch; after the first one, group the targets by input identity and count that batch."""
        if self._owner or not self._first:
            return
        leaders: list[tuple[str, torch.Tensor]] = []
        for name in self._names:
            x = self._first.get(name)
            if x is None:
                continue
            leader = next((ln for ln, lx in leaders if lx is x), None)
            if leader is None:
                leaders.append((name, x))
                self._acc[name] = HessianAccumulator(x.shape[-1], device=self.device, name=name)
                self._acc[name].add(x.detach(), token_mask=self._mask_for(x))
                leader = name
            self._owner[name] = leader
            self.groups.setdefault(leader, []).append(name)
        self._first.clear()

    def hessian(self, name: str) -> torch.Tensor | None:
        """The Hessian of ``name``'s input, or None when the module never ran or saw only padding."""
        leader = self._owner.get(name)
        if leader is None or self._acc[leader].n_tokens == 0:
            return None
        return self._acc[leader].hessian

    def n_tokens(self, name: str) -> int:
        leader = self._owner.get(name)
        return 0 if leader is None else int(self._acc[leader].n_tokens)

    def merge(self, group: Group) -> None:
        """Add the other ranks' Hessians to this rank's (each ran its share of the batches): afterwards every rank
        holds the Hessians of all batches, grouped alike. Raw sums and token counts are added, not means. Ranks
        that grouped the targets differently (a module that skipped a first batch) fall back to one Hessian per
        target. Nothing happens in a single process."""
        if group.world == 1:
            return
        layout = _common_layout(group.gather(self._layout()), self._names)
        leaders = list(dict.fromkeys(lead for lead, _ in layout.values()))
        cols = dict(layout.values())
        taken: dict[str, tuple[torch.Tensor, int]] = {}
        sums, counts = [], []
        for lead in leaders:
            local = self._owner.get(lead)
            if local is None:
                total, n = torch.zeros(cols[lead], cols[lead], device=self.device), 0
            elif local in taken:
                total, n = taken[local][0].clone(), taken[local][1]
            else:
                total, n = taken[local] = self._acc[local].release_totals()
            sums.append(total)
            counts.append(n)
        self._acc.clear()
        n_all = torch.tensor(counts, dtype=torch.int64, device=self.device)
        if leaders:
            group.all_reduce_sum([*sums, n_all])
        self._owner = {name: lead for name, (lead, _) in layout.items()}
        self.groups = {}
        for name, lead in self._owner.items():
            self.groups.setdefault(lead, []).append(name)
        self._acc = {
            lead: HessianAccumulator.from_totals(s, int(n), name=lead)
            for lead, s, n in zip(leaders, sums, n_all.tolist(), strict=True)
        }

    def _layout(self) -> dict[str, tuple[str, int]]:
        """target -> (its group leader, input columns), for the targets that ran."""
        return {n: (self._owner[n], self._acc[self._owner[n]].columns) for n in self._names if n in self._owner}

    def stop(self) -> None:
        """Remove the hooks and keep the Hessians (another stream runs through the same modules next)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def close(self) -> None:
        self.stop()
        self._first.clear()
        self._acc.clear()


def _common_layout(layouts: list[dict[str, tuple[str, int]]], names: list[str]) -> dict[str, tuple[str, int]]:
    """The grouping every rank uses: the ranks' own where they agree (ranks that ran no batch have none), else
    each target its own leader."""
    present = [m for m in layouts if m]
    if all(m == present[0] for m in present):
        return present[0] if present else {}
    cols = {n: c for m in present for n, (_, c) in m.items()}
    return {n: (n, cols[n]) for n in names if n in cols}


@dataclass
class Stream:
    """One activation stream through a block list: the recorded call of each batch and its token masks."""

    calls: list[BlockCall]
    masks: list[list[torch.Tensor]]


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


def token_masks(role: str, inputs: dict[str, torch.Tensor], token_mask: torch.Tensor, nq: int) -> list[torch.Tensor]:
    """Candidate padding masks of a batch for the Hessians of a block list of ``role`` (docs/METHOD.md §9, D16)."""
    if role == "language":
        return [token_mask]
    if role == "qformer" and "qformer_attention_mask" in inputs:
        q = inputs["qformer_attention_mask"].bool()
        return [torch.cat([torch.ones(q.shape[0], nq, dtype=torch.bool), q], dim=1), q]
    return []
