"""Capture the inputs of one block: every positional and keyword argument, then stop the forward pass.

A forward pre-hook records ``(args, kwargs)`` (hidden states, attention mask, position ids, multi-dimensional
rotary positions, ``position_embeddings``, ``encoder_hidden_states`` of a Q-Former...) and raises a private
exception type, so a genuine error in the model is never swallowed (docs/METHOD.md §9, D16;
SparseGPT's catcher raises ValueError and swallows real ones). Cache flags are switched off for replay.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model_tailor.errors import CalibrationError

logger = logging.getLogger(__name__)

__all__ = ["BlockCall", "capture_inputs", "hidden_of", "replace_hidden", "run_block"]


class _StopForward(Exception):  # noqa: N818 - private control-flow signal, never raised to users
    """Raised by the capture hook once the block's inputs are recorded."""


@dataclass
class BlockCall:
    """Arguments of one block call for one calibration batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _to(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().to(device)
        return obj.to(dtype) if dtype is not None and obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _no_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block call's keyword arguments without any KV cache (its name varies across models and transformers
    versions: ``cache`` from 5.24), so replaying it neither reads nor grows one."""
    out = dict(kwargs)
    for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    block: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    block_name: str = "block",
) -> list[BlockCall]:
    """Run ``model`` on each batch until ``block`` is called; return the recorded calls, one per batch.

    Raises:
        CalibrationError: the forward pass finished without ever calling ``block``.
    """
    calls: list[BlockCall] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(BlockCall(_to(args, device, dtype), _no_cache(_to(kwargs, device, dtype))))
        raise _StopForward

    # prepended: it stops the pass before any other pre-hook of the block runs (e.g. one that loads its weights)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        for batch in batches:
            before = len(calls)
            inputs = {k: _to(v, device, dtype if k.startswith("pixel") else None) for k, v in batch.items()}
            try:
                model(**inputs, use_cache=False)
            except _StopForward:
                pass
            if len(calls) == before:
                raise CalibrationError(
                    f"the forward pass never reached {block_name}; the calibration inputs do not exercise it "
                    "(e.g. a vision block with text-only records)"
                )
    finally:
        handle.remove()
    return calls


def hidden_of(call: BlockCall) -> torch.Tensor:
    return call.args[0] if call.args else call.kwargs["hidden_states"]


def replace_hidden(call: BlockCall, hidden: torch.Tensor) -> BlockCall:
    if call.args:
        return BlockCall((hidden, *call.args[1:]), call.kwargs)
    return BlockCall(call.args, {**call.kwargs, "hidden_states": hidden})


@torch.no_grad()
def run_block(block: nn.Module, call: BlockCall) -> torch.Tensor:
    """Run one block on one recorded call and return its output hidden states."""
    out = block(*call.args, **call.kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not isinstance(out, torch.Tensor):  # a ModelOutput
        out = out[0]
    return out
