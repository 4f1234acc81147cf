"""Hessians of one block's target linears, one accumulator per distinct input (METHOD §3 "Shared statistics").

Forward hooks read each target's input. Linears that receive the *same tensor object* in a forward pass
(q/k/v_proj, gate/up_proj) share one :class:`HessianAccumulator`, found on the first batch by identity, so a
LLaMA block accumulates 4 Hessians, not 7. Padding positions are left out through a token mask matched on the
input's leading shape (METHOD §9 fix, D16).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .hessian import HessianAccumulator

__all__ = ["BlockHessians"]


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

    def stop(self) -> None:
        """Remove the hooks and keep the Hessians (another stream runs through the same modules next)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def close(self) -> None:
        self.stop()
        self._first.clear()
        self._acc.clear()
