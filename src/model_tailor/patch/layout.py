"""How a sparse tensor is laid out in a safetensors file: one rule for the patch file and the resume work files.

Every part of parameter ``<p>`` is stored under ``<part>/<p>``: ``indices/<p>`` (flat row-major positions),
``values/<p>`` and, with low-rank factors, ``lowrank_a/<p>`` and ``lowrank_b/<p>``. Indices are int32, or
int64 once a tensor has 2**31 entries or more.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["PARTS", "index_dtype", "join_parts", "split_parts"]

PARTS = ("indices", "values", "lowrank_a", "lowrank_b")


def index_dtype(numel: int) -> torch.dtype:
    """int32 halves the index bytes of a patch; int64 only where int32 cannot address every entry."""
    return torch.int64 if numel >= 2**31 else torch.int32


def join_parts(
    name: str, indices: Tensor, values: Tensor, lowrank: tuple[Tensor, Tensor] | None = None
) -> dict[str, Tensor]:
    """The file entries of one sparse tensor, keyed ``<part>/<name>``."""
    out = {f"indices/{name}": indices, f"values/{name}": values}
    if lowrank is not None:
        out[f"lowrank_a/{name}"], out[f"lowrank_b/{name}"] = lowrank
    return out


def split_parts(entries: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Inverse of :func:`join_parts` over a whole file: name -> part -> tensor.

    Raises:
        ValueError: a key outside the layout (no ``/``, an unknown part, or no name).
    """
    out: dict[str, dict[str, Tensor]] = {}
    for key, tensor in entries.items():
        part, sep, name = key.partition("/")
        if not sep or part not in PARTS or not name:
            raise ValueError(f"key {key!r} is not <part>/<name> with a part in {PARTS}")
        out.setdefault(name, {})[part] = tensor
    return out
