"""The kernel: pure tensor functions, tensors in and tensors out, no files and no models.

``hessian`` (input statistics, damping), ``scoring`` (salience, sensitivity, their fusion), ``masking`` (keep
counts and masks), ``compensation`` (the OBS sweep that decorates a mask), ``tailor`` (``tailor_weight``: score,
mask and decorate one matrix), ``objective`` (the preserve-aware dual objective), ``structure`` (low-rank and
sparse+low-rank patches) and ``baselines`` (data-free methods over deltas, for comparison).
"""

from model_tailor.kernel.compensation import obs_sweep, reconstruction_error
from model_tailor.kernel.hessian import HessianAccumulator, factor_hessian, normalize_hessian
from model_tailor.kernel.masking import keep_count, select_keep_mask, select_keep_masks_global
from model_tailor.kernel.objective import preserve_target
from model_tailor.kernel.scoring import fuse_scores, salience, sensitivity
from model_tailor.kernel.structure import STRUCTURES, lowrank_patch, tailor_weight_structured
from model_tailor.kernel.tailor import TailoredWeight, TailorStats, compensate, tailor_weight

__all__ = [
    "STRUCTURES",
    "HessianAccumulator",
    "TailorStats",
    "TailoredWeight",
    "compensate",
    "factor_hessian",
    "fuse_scores",
    "keep_count",
    "lowrank_patch",
    "normalize_hessian",
    "obs_sweep",
    "preserve_target",
    "reconstruction_error",
    "salience",
    "select_keep_mask",
    "select_keep_masks_global",
    "sensitivity",
    "tailor_weight",
    "tailor_weight_structured",
]
