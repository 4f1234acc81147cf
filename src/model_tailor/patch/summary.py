"""Size and density of a patch per tensor and per layer (``model-tailor inspect``, ``SparsePatch.summary``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from model_tailor.patch.layout import index_dtype
from model_tailor.patch.model import SparsePatch, dtype_from_name

__all__ = ["PatchSummary", "layer_of", "summarize"]

_LAYER_RE = re.compile(r"^(.*?\.\d+)\.")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: the name up to its first numeric component, else ``"(other)"``.

    ``model.layers.3.mlp.down_proj.weight`` -> ``model.layers.3``.
    """
    match = _LAYER_RE.match(name)
    return match.group(1) if match else "(other)"


@dataclass(frozen=True)
class PatchSummary:
    """Size and density of a patch.

    Attributes:
        per_tensor / per_layer: name -> ``{"nnz", "numel", "density"}`` (plus ``"rank"`` if low-rank).
        nnz, numel, density: totals over all patched parameters.
        patch_bytes: bytes of indices (``patch.layout.index_dtype``) + fp32 values + low-rank factors.
        dense_bytes: bytes of a dense delta in the base dtypes (fp32 where unknown).
    """

    per_tensor: dict[str, dict[str, Any]]
    per_layer: dict[str, dict[str, Any]]
    nnz: int
    numel: int
    density: float
    patch_bytes: int
    dense_bytes: int


def _dtype_size(name: str | None) -> int:
    dtype = dtype_from_name(name)
    return dtype.itemsize if dtype is not None else 4


def summarize(patch: SparsePatch) -> PatchSummary:
    """Density per tensor and per layer, and the patch size against a dense delta."""
    per_tensor: dict[str, dict[str, Any]] = {}
    per_layer: dict[str, dict[str, Any]] = {}
    patch_bytes = dense_bytes = 0
    for name, tp in sorted(patch.tensors.items()):
        entry: dict[str, Any] = {"nnz": tp.nnz, "numel": tp.numel, "density": tp.density}
        patch_bytes += tp.nnz * (index_dtype(tp.numel).itemsize + 4)
        if tp.lowrank is not None:
            entry["rank"] = int(tp.lowrank[0].shape[1])
            patch_bytes += 4 * (tp.lowrank[0].numel() + tp.lowrank[1].numel())
        dense_bytes += tp.numel * _dtype_size(patch.metadata.base_dtypes.get(name))
        per_tensor[name] = entry
        layer = per_layer.setdefault(layer_of(name), {"nnz": 0, "numel": 0})
        layer["nnz"] += tp.nnz
        layer["numel"] += tp.numel
    for layer in per_layer.values():
        layer["density"] = layer["nnz"] / layer["numel"] if layer["numel"] else 0.0
    nnz = sum(e["nnz"] for e in per_tensor.values())
    numel = sum(e["numel"] for e in per_tensor.values())
    return PatchSummary(
        per_tensor=per_tensor,
        per_layer=dict(sorted(per_layer.items(), key=lambda kv: _layer_sort_key(kv[0]))),
        nnz=nnz,
        numel=numel,
        density=nnz / numel if numel else 0.0,
        patch_bytes=patch_bytes,
        dense_bytes=dense_bytes,
    )


def _layer_sort_key(layer: str) -> tuple[str, int]:
    prefix, _, number = layer.rpartition(".")
    return (prefix, int(number)) if number.isdigit() else (layer, -1)
