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
    "IMAGE_PROMPTS",
    "MASK_TIMINGS",
    "SALIENCE_KINDS",
    "SALIENCE_SOURCES",
    "SELF_PRESERVE_MODES",
    "SENSITIVITY_KINDS",
    "STRUCTURES",
    "Compensation",
    "DType",
    "Granularity",
    "MaskTiming",
    "NonTargetPolicy",
    "Preset",
    "Salience",
    "SalienceSource",
    "SelfPreserveMode",
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
# How salience scores a change: |delta| (the paper), or FAPM's base-relative |delta| - mean|W_pre|*|delta|/|W_pre|.
Salience = Literal["magnitude", "fapm"]
Structure = Literal["sparse", "lowrank", "sparse+lowrank"]
NonTargetPolicy = Literal["reset", "keep", "tailor"]
DType = Literal["float32", "bfloat16", "float16"]
# Named option sets (config.PRESETS): "paper" is the paper's method, one switch away whatever the defaults become.
Preset = Literal["paper", "self-lowrank"]
# ``preserve`` keywords (anything else is a JSONL path): "self" = the base model answers the calibration inputs and
# the shipped generic instructions; "self-generic" = the shipped generic instructions only.
SelfPreserveMode = Literal["self", "self-generic"]

GRANULARITIES: tuple[str, ...] = get_args(TensorGranularity)
COMPENSATIONS: tuple[str, ...] = get_args(Compensation)
SENSITIVITY_KINDS: tuple[str, ...] = get_args(Sensitivity)
MASK_TIMINGS: tuple[str, ...] = get_args(MaskTiming)
SALIENCE_SOURCES: tuple[str, ...] = get_args(SalienceSource)
SALIENCE_KINDS: tuple[str, ...] = get_args(Salience)
STRUCTURES: tuple[str, ...] = get_args(Structure)
SELF_PRESERVE_MODES: tuple[str, ...] = get_args(SelfPreserveMode)

# The fixed generic prompts ``preserve: self`` asks the base model about each calibration image (a seeded choice of
# ``preserve_image_prompts`` of them per image): captioning-style questions, so image abilities are anchored too.
IMAGE_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in this picture?",
    "Write a short caption for this image.",
    "What do you see in this image?",
)

# Shard size of every checkpoint the project writes; saving holds about one shard in memory.
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000


def default_cache_dir() -> Path:
    """``$MODEL_TAILOR_CACHE`` or ``~/.cache/model-tailor``: the one cache folder (bench assets, ``preserve self``)."""
    env = os.environ.get("MODEL_TAILOR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "model-tailor"
