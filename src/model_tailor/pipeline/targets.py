"""Which parameters take part: tailoring targets, and an explicit policy for every other changed tensor.

Default targets (docs/METHOD.md, D18, D23) are the 2-D Linear (or transposed GPT-2 ``Conv1D``) weights with
``delta != 0`` inside the blocks of the language model(s) and the Q-Former. ``include`` / ``exclude`` are
``fnmatch`` globs over full checkpoint names; ``include`` may also reach blocks of other roles (vision tower).
Every changed tensor that is not a target gets a named action (docs/METHOD.md §11, D19): ``reset`` to base,
``keep`` fine-tuned, or ``tailor`` (Linear weights outside blocks: salience-only, data-free, docs/METHOD.md §10).
Identical tensors are copied through untouched. Nothing is dropped silently.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from model_tailor.errors import NumericalError
from model_tailor.pipeline.architectures import TARGET_ROLES, ModelLayout, is_conv1d, linear_modules

__all__ = ["DiffSummary", "NonTarget", "TargetParam", "TargetPlan", "diff_checkpoints", "select_targets"]


@dataclass(frozen=True)
class TargetParam:
    """One tensor tailored with calibration statistics.

    Attributes:
        name: checkpoint tensor name (patch key).
        module: skeleton path of the owning Linear / Conv1D module.
        block_list: skeleton path of the block list, ``block``: index of the block in it.
        shape: stored shape; ``transposed`` is True for ``Conv1D`` (stored ``(in, out)``, docs/METHOD.md §1).
    """

    name: str
    module: str
    block_list: str
    block: int
    shape: tuple[int, ...]
    transposed: bool = False


@dataclass(frozen=True)
class NonTarget:
    """A changed tensor that is not a calibrated target, and what happens to it.

    ``action``: ``reset`` (base value), ``keep`` (fine-tuned value) or ``tailor`` (data-free salience patch).
    """

    name: str
    action: str
    reason: str
    module: str = ""
    transposed: bool = False


@dataclass(frozen=True)
class DiffSummary:
    """Result of comparing base and fine-tuned tensor by tensor."""

    changed: frozenset[str]
    identical: int


@dataclass(frozen=True)
class TargetPlan:
    targets: tuple[TargetParam, ...]
    non_targets: tuple[NonTarget, ...]
    identical: int
    block_order: tuple[tuple[str, int], ...] = field(default=())

    def targets_in(self, block_list: str, block: int) -> list[TargetParam]:
        return [t for t in self.targets if t.block_list == block_list and t.block == block]


def diff_checkpoints(base, finetuned, names: Iterable[str]) -> DiffSummary:  # noqa: ANN001 - CheckpointReaders
    """Read each tensor pair once (streaming), check both are finite, and list the changed ones.

    Raises:
        NumericalError: NaN or Inf in any tensor, listing every offender.
    """
    changed: set[str] = set()
    bad: list[str] = []
    identical = 0
    for name in names:  # the readers unmap their shards every few reads on their own
        b, f = base.get(name), finetuned.get(name)
        for which, t in (("base", b), ("finetuned", f)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{name} ({which})")
        if b.dtype == f.dtype and torch.equal(b, f):
            identical += 1
        elif not torch.equal(b.to(torch.float64), f.to(torch.float64)):
            changed.add(name)
        else:
            identical += 1
    base.close()
    finetuned.close()
    if bad:
        raise NumericalError(f"NaN or Inf weights in: {', '.join(bad)}; the checkpoints are corrupt or diverged")
    return DiffSummary(frozenset(changed), identical)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_targets(
    model: nn.Module,
    layout: ModelLayout,
    to_ckpt: dict[str, str],
    diff: DiffSummary,
    *,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    policy: str = "reset",
) -> TargetPlan:
    """Split the changed tensors into targets and policy-handled non-targets.

    Args:
        model: the meta skeleton. ``layout``: its block lists. ``to_ckpt``: skeleton -> checkpoint names.
        diff: changed tensors (checkpoint names).
        include, exclude: glob patterns over checkpoint names.
        policy: ``reset`` | ``keep`` | ``tailor`` for changed non-targets.
    """
    linear_weight: dict[str, tuple[str, bool]] = {}  # ckpt name -> (module path, transposed)
    for path, module in linear_modules(model):
        ck = to_ckpt.get(f"{path}.weight")
        if ck is not None:
            linear_weight[ck] = (path, is_conv1d(module))
    targets: list[TargetParam] = []
    handled: set[str] = set()
    for ck in sorted(diff.changed):
        if ck not in linear_weight:
            continue
        path, transposed = linear_weight[ck]
        where = layout.locate(path)
        if where is None:
            continue
        bl, index = where
        wanted = _matches(ck, include) if include else bl.role in TARGET_ROLES
        if wanted and not _matches(ck, exclude):
            shape = tuple(model.get_submodule(path).weight.shape)
            targets.append(TargetParam(ck, path, bl.path, index, shape, transposed))
            handled.add(ck)
    order = {bl.path: i for i, bl in enumerate(layout.block_lists)}
    targets.sort(key=lambda t: (order[t.block_list], t.block, t.name))
    non_targets = []
    for ck in sorted(diff.changed - handled):
        linear = linear_weight.get(ck)
        where = layout.locate(linear[0]) if linear else None
        if linear is None:
            reason = "not a Linear weight (norm, bias, embedding or other parameter)"
        elif where is None:
            reason = "Linear outside the repeated blocks (projector, head, ...)"
        elif _matches(ck, exclude):
            reason = "excluded by pattern"
        else:
            reason = f"Linear in a {where[0].role} block (not a default target; use include)"
        action = policy
        if policy == "tailor" and (linear is None or where is not None):
            action = "reset"  # only Linears outside blocks can be tailored without calibration through them
            reason += "; tailor policy applies to Linears outside blocks only"
        non_targets.append(NonTarget(ck, action, reason, linear[0] if linear else "", bool(linear and linear[1])))
    blocks = tuple(dict.fromkeys((t.block_list, t.block) for t in targets))
    return TargetPlan(tuple(targets), tuple(non_targets), diff.identical, blocks)
