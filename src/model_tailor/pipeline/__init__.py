"""The model pipeline: real checkpoints in, a patch (and optionally a tailored model) out.

``run`` is the one module that knows the order of stages; ``blocks`` does one block list and one block at a
time. Below them: ``architectures`` (meta skeleton, block
discovery), ``targets`` (what is tailored, the policy for the rest), ``weights`` (streamed tensor values and their
materialisation one module at a time), ``activations`` (calibration streams and per-block Hessians), ``adapter``
(config to kernel call), ``preserve`` (original-ability data), ``planning`` (dry run), ``resume`` (per-block work
folder), ``outputs`` (patch, model and report writing) and ``report``.

Names are imported lazily: the pipeline needs transformers, the kernel and the patch do not.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TailorResult": "model_tailor.pipeline.run",
    "plan_tailor": "model_tailor.pipeline.run",
    "run_tailor": "model_tailor.pipeline.run",
    "TailorReport": "model_tailor.pipeline.report",
    "TailorPlan": "model_tailor.pipeline.report",
    "LayerReport": "model_tailor.pipeline.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model_tailor.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
