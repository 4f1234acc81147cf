"""model-tailor: repair catastrophic forgetting after fine-tuning (Model Tailor, Zhu et al., ICML 2024).

Vocabulary (used everywhere): ``base`` and ``finetuned`` weights, ``delta = finetuned - base``,
``density`` = fraction of the delta KEPT in the patch, ``keep_mask`` True = in the patch,
scores: higher = keep. Keys are full Hugging Face parameter names.

The public names below are imported lazily, so ``import model_tailor`` (and the CLI's start-up) does not pay
for transformers until a model-level function is used.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    # model level
    "tailor": "model_tailor.api",
    "plan": "model_tailor.api",
    "TailorConfig": "model_tailor.config",
    "TailorResult": "model_tailor.pipeline.run",
    # matrix level (the kernel)
    "tailor_weight": "model_tailor.kernel.tailor",
    "compensate": "model_tailor.kernel.tailor",
    "TailoredWeight": "model_tailor.kernel.tailor",
    "TailorStats": "model_tailor.kernel.tailor",
    "HessianAccumulator": "model_tailor.kernel.hessian",
    "select_keep_mask": "model_tailor.kernel.masking",
    "preserve_target": "model_tailor.kernel.objective",
    "tailor_weight_structured": "model_tailor.kernel.structure",
    # the patch artifact
    "SparsePatch": "model_tailor.patch.model",
    "TensorPatch": "model_tailor.patch.model",
    "save_patch": "model_tailor.patch.format",
    "load_patch": "model_tailor.patch.format",
    "apply_patches": "model_tailor.patch.apply",
    "remove_patches": "model_tailor.patch.apply",
    "combine_patches": "model_tailor.patch.combine",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> object:
    import importlib  # here, not at the top: the CLI's start-up imports only what it must (see __main__)

    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model_tailor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
