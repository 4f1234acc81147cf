"""Multi-task combination of sparse patches made against one base (docs/METHOD.md §12; registry "combine").

Default, the disjoint mean: ``W = W_pre + sum_t w_t P_t / max(1, C)`` with ``C`` the number of patches
covering each entry, so patches add where they do not overlap and average where they do. Other policies:
``sum``, ``mean`` (divide by the number of patches everywhere), ``priority`` (the first patch covering an
entry wins) and ``ties`` (TIES sign election by mass, then the disjoint mean of the agreeing values). Optional
``weights`` scale each patch's delta *before* the policy (so ``combine([p], weights=[w]) == w * p``).

Work is tensor by tensor: each parameter's union of indices is combined alone (``combine_tensor``), which lets
``apply`` stream a checkpoint. Patches with low-rank parts combine only under ``sum`` and ``mean``, where the
factors concatenate exactly (``sum_t A_t B_t = [A_1 .. A_T] [B_1; ..; B_T]``); other policies raise
``ConfigError``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from model_tailor.errors import ConfigError, PatchFormatError, ShapeMismatchError
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch, current_versions, utc_now
from model_tailor.registry import Registry

logger = logging.getLogger(__name__)

# A policy maps stacked, weighted values (T, U) -- zero where a patch does not cover an entry -- and the
# coverage mask (T, U) over the union of U covered entries to the combined values (U,). All fp32.
CombineFn = Callable[[Tensor, Tensor], Tensor]

COMBINE: Registry[CombineFn] = Registry("combine policy")
LOWRANK_POLICIES = ("sum", "mean")


@COMBINE.register("disjoint-mean", reference="https://arxiv.org/abs/2402.12048")
def disjoint_mean(values: Tensor, covered: Tensor) -> Tensor:
    """Sum where patches are disjoint, average where they overlap (docs/METHOD.md §12, the default)."""
    return values.sum(0) / covered.sum(0).clamp(min=1)


@COMBINE.register("sum", reference="https://arxiv.org/abs/2212.04089")
def sum_policy(values: Tensor, covered: Tensor) -> Tensor:
    """Add all patches (task arithmetic with unit scale)."""
    return values.sum(0)


@COMBINE.register("mean", reference="https://arxiv.org/abs/2203.05482")
def mean_policy(values: Tensor, covered: Tensor) -> Tensor:
    """Divide the sum by the number of patches everywhere (plain averaging)."""
    return values.sum(0) / values.shape[0]


@COMBINE.register("priority", reference="https://arxiv.org/abs/2402.12048")
def priority(values: Tensor, covered: Tensor) -> Tensor:
    """The first patch (in the order given) covering an entry wins."""
    first = covered.to(torch.int8).argmax(0)  # argmax returns the first maximal index
    return values.gather(0, first.unsqueeze(0)).squeeze(0)


@COMBINE.register("ties", reference="https://arxiv.org/abs/2306.01708")
def ties(values: Tensor, covered: Tensor) -> Tensor:
    """TIES merging: elect each entry's sign by total mass, then take the disjoint mean of agreeing values.

    The patches are already sparse, so TIES' trim step is skipped. A zero total elects ``+`` (as peft does).
    """
    elected = torch.where(values.sum(0) >= 0, 1.0, -1.0)
    agree = covered & (torch.sign(values) == elected)
    return (values * agree).sum(0) / agree.sum(0).clamp(min=1)


@dataclass(frozen=True)
class TensorOverlap:
    """Coverage of one parameter: ``union`` entries covered, ``overlap`` of them by >= 2 patches, ``per_patch``
    the entries each input patch covers (where the union came from)."""

    name: str
    numel: int
    patches: int
    union: int
    overlap: int
    per_patch: tuple[int, ...] = ()

    @property
    def fraction(self) -> float:
        """Share of covered entries covered by at least two patches (0 when nothing is covered)."""
        return self.overlap / self.union if self.union else 0.0


@dataclass
class CombineReport:
    """Per-tensor overlap of a combination (overlap also serves as a task-similarity proxy, docs/METHOD.md §12)."""

    policy: str
    weights: list[float]
    num_patches: int
    per_tensor: dict[str, TensorOverlap] = field(default_factory=dict)

    @property
    def union(self) -> int:
        return sum(o.union for o in self.per_tensor.values())

    @property
    def overlap(self) -> int:
        return sum(o.overlap for o in self.per_tensor.values())

    @property
    def fraction(self) -> float:
        return self.overlap / self.union if self.union else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "weights": self.weights,
            "num_patches": self.num_patches,
            "union": self.union,
            "overlap": self.overlap,
            "fraction": self.fraction,
            "per_tensor": {
                name: {"union": o.union, "overlap": o.overlap, "fraction": o.fraction, "patches": o.patches}
                for name, o in self.per_tensor.items()
            },
        }


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if count == 0:
        raise ConfigError("combine needs at least one patch")
    if weights is None:
        return [1.0] * count
    out = [float(w) for w in weights]
    if len(out) != count:
        raise ConfigError(f"weights has {len(out)} entries for {count} patches; give one weight per patch")
    if not all(math.isfinite(w) for w in out):
        raise ConfigError(f"weights must be finite, got {out}")
    return out


def combine_tensor(
    parts: Sequence[TensorPatch | None],
    *,
    policy: str = "disjoint-mean",
    weights: Sequence[float] | None = None,
) -> tuple[TensorPatch, TensorOverlap]:
    """Combine one parameter's patches.

    Args:
        parts: one entry per patch, ``None`` where a patch does not touch this parameter (it counts as a zero
            delta, so ``mean`` still divides by ``len(parts)``). At least one entry is a ``TensorPatch``.
        policy: a name in the ``combine`` registry.
        weights: per-patch scale applied to each delta before the policy (default all 1).

    Returns:
        The combined ``TensorPatch`` (indices = union of the inputs' indices) and its ``TensorOverlap``.
    """
    fn = COMBINE.get(policy)
    scale = _check_weights(weights, len(parts))
    present = [(t, tp) for t, tp in enumerate(parts) if tp is not None]
    if not present:
        raise ConfigError("combine_tensor needs at least one tensor patch")
    name, shape = present[0][1].name, present[0][1].shape
    for _, tp in present:
        if tp.shape != shape:
            raise ShapeMismatchError(
                f"patches disagree on the shape of {name!r}: {list(shape)} vs {list(tp.shape)}; "
                "they were made for different models"
            )
    union = torch.unique(torch.cat([tp.indices for _, tp in present]))  # sorted
    values = torch.zeros(len(parts), union.numel(), dtype=torch.float32)
    covered = torch.zeros(len(parts), union.numel(), dtype=torch.bool)
    for t, tp in present:
        pos = torch.searchsorted(union, tp.indices)
        values[t, pos] = tp.values * scale[t]
        covered[t, pos] = True
    combined = fn(values, covered).to(torch.float32) if union.numel() else torch.zeros(0)
    lowrank = _combine_lowrank(present, policy, scale, len(parts), name)
    count = covered.sum(0)
    per_patch = tuple(int(n) for n in covered.sum(1).tolist())
    overlap = TensorOverlap(
        name, present[0][1].numel, len(present), int(union.numel()), int((count >= 2).sum()), per_patch
    )
    return TensorPatch(name, shape, union, combined, lowrank), overlap


def _combine_lowrank(
    present: list[tuple[int, TensorPatch]], policy: str, scale: list[float], num_patches: int, name: str
) -> tuple[Tensor, Tensor] | None:
    factors = [(t, tp.lowrank) for t, tp in present if tp.lowrank is not None]
    if not factors:
        return None
    if policy not in LOWRANK_POLICIES:
        raise ConfigError(
            f"patch of {name!r} has low-rank factors, which combine only under policy "
            f"{' or '.join(LOWRANK_POLICIES)} (got {policy!r}); choose one of those"
        )
    divisor = float(num_patches) if policy == "mean" else 1.0
    a = torch.cat([lr[0] * (scale[t] / divisor) for t, lr in factors], dim=1)
    b = torch.cat([lr[1] for _, lr in factors], dim=0)
    return a, b


def _check_same_base(patches: Sequence[SparsePatch], force: bool) -> dict[str, Any]:
    """Return the merged base fingerprint; raise unless all patches name the same base (or ``force``).

    A forced combination matches no single base, yet its merged fingerprint would pass ``apply``'s check on
    one of them: the differences are recorded under ``forced_across_bases`` (kept by later combinations) and
    ``apply`` refuses such a patch without ``--force``.
    """
    first = patches[0].metadata.base_fingerprint
    merged = {**first, "content": dict(first.get("content") or {})}
    forced = [f for p in patches for f in p.metadata.base_fingerprint.get("forced_across_bases") or []]
    for i, patch in enumerate(patches[1:], start=1):
        other = patch.metadata.base_fingerprint
        problems = []
        if other.get("structure") != first.get("structure") or other.get("algorithm") != first.get("algorithm"):
            problems.append("names/shapes/dtypes")
        for tensor, digest in (other.get("content") or {}).items():
            if merged["content"].setdefault(tensor, digest) != digest:
                problems.append(f"content of {tensor!r}")
        if problems and not force:
            raise PatchFormatError(
                f"patch 0 and patch {i} were made for different base models "
                f"({', '.join(problems[:3])} differ); "
                "combine patches of one base, or pass --force"
            )
        if problems:
            logger.warning("combining patches of different bases (patch %d: %s) because of --force", i, problems)
            forced.append(f"patch {i}: {', '.join(problems[:3])} differ from patch 0")
    if forced:
        merged["forced_across_bases"] = list(dict.fromkeys(forced))
    return merged


def _merge_reset(patches: Sequence[SparsePatch]) -> list[str] | dict[str, Any]:
    resets = [p.metadata.reset_params for p in patches]
    if all(isinstance(r, list) for r in resets):
        return sorted({name for r in resets for name in r})
    merged: dict[str, Any] = {}
    for r in resets:
        merged.update(r if isinstance(r, dict) else dict.fromkeys(r, "reset"))
    return dict(sorted(merged.items()))


def combine_patches(
    patches: Sequence[SparsePatch],
    *,
    policy: str = "disjoint-mean",
    weights: Sequence[float] | None = None,
    force: bool = False,
) -> tuple[SparsePatch, CombineReport]:
    """Combine patches made against the same base into one patch.

    Args:
        patches: task patches, in priority order (matters for ``priority`` only).
        policy: ``disjoint-mean`` (default), ``sum``, ``mean``, ``priority`` or ``ties`` (registry
            ``combine``).
        weights: per-patch scale of each delta, applied before the policy (default all 1).
        force: combine patches whose base fingerprints differ (shapes must still agree).

    Returns:
        ``(patch, report)``: the combined patch (indices = union per tensor; metadata records the policy, the
        weights and every source config) and the per-tensor overlap report.

    Raises:
        ConfigError: unknown policy, bad weights, no patches, low-rank parts under a policy other than
            sum/mean.
        PatchFormatError: the patches name different bases and ``force`` is False.
        ShapeMismatchError: the patches disagree on a tensor's shape.
    """
    COMBINE.get(policy)
    scale = _check_weights(weights, len(patches))
    fingerprint = _check_same_base(patches, force)
    report = CombineReport(policy=policy, weights=scale, num_patches=len(patches))
    tensors: dict[str, TensorPatch] = {}
    for name in sorted({n for p in patches for n in p.tensors}):
        combined, overlap = combine_tensor([p.tensors.get(name) for p in patches], policy=policy, weights=scale)
        tensors[name] = combined
        report.per_tensor[name] = overlap
    base_dtypes: dict[str, str] = {}
    for p in patches:
        base_dtypes.update(p.metadata.base_dtypes)
    metadata = PatchMetadata(
        base_dtypes=dict(sorted(base_dtypes.items())),
        base_fingerprint=fingerprint,
        config={"combine": {"policy": policy, "weights": scale, "sources": [p.metadata.config for p in patches]}},
        versions=current_versions(),
        stats={
            name: {
                "density": tensors[name].density,
                "union": o.union,
                "overlap": o.overlap,
                "fraction": o.fraction,
                "per_patch": list(o.per_patch),
            }
            for name, o in report.per_tensor.items()
        },
        reset_params=_merge_reset(patches),
        created=utc_now(),
    )
    logger.info("combined %d patches with %s: overlap %d of %d entries", len(patches), policy, report.overlap,
                report.union)  # fmt: skip
    return SparsePatch(tensors, metadata), report
