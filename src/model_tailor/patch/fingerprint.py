"""Base-model fingerprint: which checkpoint a patch was made for (the patch file's ``base_fingerprint``).

The fingerprint is a sha256 over the sorted ``(name, shape, dtype)`` triples of every tensor, plus a sha256 of
the raw bytes of each named (targeted) tensor. ``apply`` compares it with the checkpoint it patches, so a
patch made for another base is refused unless forced.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from model_tailor.errors import CheckpointError
from model_tailor.patch.model import dtype_name

logger = logging.getLogger(__name__)

ALGORITHM = "sha256"


class _Reader(Protocol):  # the subset of io.checkpoint.CheckpointReader used here
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> Tensor: ...
    def __contains__(self, name: object) -> bool: ...


Source = _Reader | Mapping[str, Tensor]


def _structure(source: Source) -> list[tuple[str, tuple[int, ...], str]]:
    if isinstance(source, Mapping):
        return sorted((n, tuple(int(d) for d in t.shape), dtype_name(t.dtype)) for n, t in source.items())
    return [(n, tuple(source.shape(n)), dtype_name(source.dtype(n))) for n in sorted(source.names())]


def _get(source: Source, name: str) -> Tensor:
    return source[name] if isinstance(source, Mapping) else source.get(name)


def _contains(source: Source, name: str) -> bool:
    return name in source  # Mapping and CheckpointReader both support ``in``


def structure_hash(source: Source) -> str:
    """sha256 over sorted lines ``name<TAB>[shape]<TAB>dtype``."""
    digest = hashlib.sha256()
    for name, shape, dtype in _structure(source):
        digest.update(f"{name}\t{list(shape)}\t{dtype}\n".encode())
    return digest.hexdigest()


def tensor_hash(tensor: Tensor) -> str:
    """sha256 of a tensor's raw bytes (contiguous, native little-endian, on CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(memoryview(raw.numpy())).hexdigest()


def fingerprint(source: Source, *, content_names: Iterable[str] | None = None) -> dict[str, Any]:
    """Fingerprint a checkpoint or a state dict.

    Args:
        source: a ``CheckpointReader`` (tensors read lazily, one at a time) or a name -> tensor mapping.
        content_names: parameters whose bytes are hashed too (the patched targets); ``None`` hashes none.

    Returns:
        ``{"algorithm": "sha256", "structure": hex, "num_tensors": int, "content": {name: hex}}``.

    Raises:
        CheckpointError: a name in ``content_names`` is not in ``source``.
    """
    structure = _structure(source)
    content: dict[str, str] = {}
    for name in sorted(set(content_names or ())):
        if not _contains(source, name):
            raise CheckpointError(f"cannot fingerprint {name!r}: it is not in the checkpoint")
        content[name] = tensor_hash(_get(source, name))
    return {
        "algorithm": ALGORITHM,
        "structure": structure_hash(source),
        "num_tensors": len(structure),
        "content": content,
    }


def compare_fingerprint(expected: Mapping[str, Any], source: Source) -> list[str]:
    """List every way ``source`` differs from the ``expected`` fingerprint (empty list = same base).

    Args:
        expected: a fingerprint made by ``fingerprint`` (e.g. a patch's ``base_fingerprint``).
        source: the checkpoint reader or state dict to check.

    Returns:
        One human-readable line per difference: a combination forced across bases (it matches no single
        base), structure (names/shapes/dtypes), missing tensors, content.
    """
    if not expected:
        return ["the patch records no base fingerprint"]
    if expected.get("algorithm", ALGORITHM) != ALGORITHM:
        return [f"unknown fingerprint algorithm {expected.get('algorithm')!r}"]
    problems: list[str] = []
    forced = expected.get("forced_across_bases") or []
    if forced:
        problems.append(f"it was combined with --force from patches of different bases ({'; '.join(forced[:2])})")
    structure = _structure(source)
    if expected.get("structure") != structure_hash(source):
        n_expected = expected.get("num_tensors", "?")
        problems.append(f"tensor names/shapes/dtypes differ ({n_expected} tensors expected, {len(structure)} found)")
    for name, digest in sorted(dict(expected.get("content") or {}).items()):
        if not _contains(source, name):
            problems.append(f"tensor {name!r} is missing")
        elif tensor_hash(_get(source, name)) != digest:
            problems.append(f"content of {name!r} differs")
    return problems
