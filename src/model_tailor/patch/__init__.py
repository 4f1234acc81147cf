"""The patch artifact: what a tailoring run produces and every later command consumes.

``model`` (``SparsePatch``: per-tensor sparse values, optional low-rank factors, metadata), ``format`` (the
``.safetensors`` file: save, load, validation), ``fingerprint`` (which base a patch belongs to), ``combine``
(several patches into one) and ``apply`` (patches onto a checkpoint and back, streamed).
"""

from model_tailor.patch.apply import apply_patches, remove_patches
from model_tailor.patch.combine import COMBINE, CombineReport, combine_patches
from model_tailor.patch.fingerprint import compare_fingerprint, fingerprint
from model_tailor.patch.format import load_patch, save_patch
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch

__all__ = [
    "COMBINE",
    "CombineReport",
    "PatchMetadata",
    "SparsePatch",
    "TensorPatch",
    "apply_patches",
    "combine_patches",
    "compare_fingerprint",
    "fingerprint",
    "load_patch",
    "remove_patches",
    "save_patch",
]
