"""The option vocabulary, written once: the values each choice-valued option takes, and shared defaults.

The config (pydantic ``Literal`` fields), the kernel's argument checks and the CLI's ``choices`` all read
these types, so a new value is added in one place and the three cannot drift. ``typing.get_args`` gives the
tuple of values. This module imports nothing heavy (no torch, pydantic or transformers): the kernel uses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

__all__ = [
    "COMPENSATIONS",
    "DEFAULT_MAX_SHARD_BYTES",
    "GRANULARITIES",
    "MASK_TIMINGS",
    "SALIENCE_SOURCES",
    "SENSITIVITY_KINDS",
    "STRUCTURES",
    "Compensation",
    "DType",
    "Granularity",
    "MaskTiming",
    "NonTargetPolicy",
    "SalienceSource",
    "Sensitivity",
    "Structure",
    "TensorGranularity",
    "default_cache_dir",
]

# How the keep mask is selected within one tensor (the kernel's ``select_keep_mask``).
TensorGranularity = Literal["block", "row", "tensor"]
# "global" ranks every target tensor together, so it is handled above the kernel's one-tensor call.
Granularity = Literal[TensorGranularity, "global"]
Compensation = Literal["obs", "official", "none", "exact"]
Sensitivity = Literal["weight", "revert"]
MaskTiming = Literal["adaptive", "upfront"]
SalienceSource = Literal["delta", "target"]
Structure = Literal["sparse", "lowrank", "sparse+lowrank"]
NonTargetPolicy = Literal["reset", "keep", "tailor"]
DType = Literal["float32", "bfloat16", "float16"]

GRANULARITIES: tuple[str, ...] = get_args(TensorGranularity)
COMPENSATIONS: tuple[str, ...] = get_args(Compensation)
SENSITIVITY_KINDS: tuple[str, ...] = get_args(Sensitivity)
MASK_TIMINGS: tuple[str, ...] = get_args(MaskTiming)
SALIENCE_SOURCES: tuple[str, ...] = get_args(SalienceSource)
STRUCTURES: tuple[str, ...] = get_args(Structure)

# Shard size of every checkpoint the project writes; saving holds about one shard in memory.
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000


def default_cache_dir() -> Path:
    """``$MODEL_TAILOR_CACHE`` or ``~/.cache/model-tailor``: the one cache folder (bench assets, ``preserve self``)."""
    env = os.environ.get("MODEL_TAILOR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "model-tailor"
