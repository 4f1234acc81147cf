"""Preserve data for the dual objective: a user's JSONL file of original-ability records, or ``self``.

Per target linear a preserve-aware run minimises ``||(W - W_ft) X_t||^2 + lam ||(W - W_pre) X_o||^2`` under the
patch budget (:mod:`model_tailor.kernel.objective`). ``X_t`` is the calibration stream, propagated through the
TAILORED blocks; ``X_o`` is a second, "preserve" stream of original-ability data whose block inputs come from the
BASE weights: each block runs it with its target weights set back to base, so the preserve stream is the base
model's own forward pass. Tensors outside the targets take their non-target policy value in both streams
(``reset``, the default, is base; with ``keep`` the preserve stream sees the fine-tuned norms the tailored model
will hold), and a block list after an already tailored one (LLaVA's language model after a tailored vision
tower) receives the tailored earlier list's output, as the tailored model will.

This module loads (or, for ``self``, generates with the base model) that data; the stage order stays in
:mod:`model_tailor.pipeline.run`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_tailor.calibration.data import CalibrationSet, build_calibration
from model_tailor.calibration.selfgen import SelfPreserveSpec, generate_self_preserve
from model_tailor.config import TailorConfig
from model_tailor.errors import CalibrationError

logger = logging.getLogger(__name__)

__all__ = ["PreserveData", "load_preserve"]


@dataclass
class PreserveData:
    """The preserve stream's data.

    Attributes:
        calib: rendered, tokenised batches (same record forms and rendering as the calibration data).
        info: the report's ``preserve`` section (source, sha256 or generation spec, counts, lambda, structure).
        generated: for ``self``, the exact JSONL text of the generated records (written to
            ``<out>.preserve.jsonl``); None for a user file.
    """

    calib: CalibrationSet
    info: dict[str, Any]
    generated: str | None = None


def load_preserve(cfg: TailorConfig, model_dir: Path, model_cls: type | None) -> PreserveData:
    """Read ``cfg.preserve`` (a JSONL file) or generate it with the BASE model (``"self"``), then batch it.

    Raises:
        CalibrationError: the file is missing, unreadable or malformed (with its line number).
    """
    common = dict(
        max_tokens=cfg.max_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        model_cls=model_cls,
        allow_outside_paths=cfg.allow_outside_paths,
    )
    generated = None
    if cfg.preserve == "self":
        spec = SelfPreserveSpec(samples=cfg.preserve_samples, seed=cfg.seed, max_new_tokens=cfg.preserve_max_new_tokens)
        records = generate_self_preserve(cfg.base, spec, device=cfg.device, cache_dir=cfg.cache_dir)
        generated = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with tempfile.TemporaryDirectory() as tmp:  # line numbers match <out>.preserve.jsonl, written later
            path = Path(tmp) / "preserve.jsonl"
            path.write_text(generated, encoding="utf-8")
            calib = build_calibration(path, model_dir, samples=len(records), **common)
        info: dict[str, Any] = {
            "source": "self",
            "spec": dataclasses.asdict(spec),
            "generated": len(records),
            "sha256": hashlib.sha256(generated.encode("utf-8")).hexdigest(),
        }
    else:
        path = Path(str(cfg.preserve))
        if not path.is_file():
            raise CalibrationError(
                f"preserve file {str(path)!r} does not exist; pass a JSONL file of original-ability records "
                "or --preserve self"
            )
        calib = build_calibration(path, model_dir, samples=cfg.preserve_samples, **common)
        info = {"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    info.update(
        preserve_weight=cfg.preserve_weight,
        structure=cfg.structure,
        lines=calib.lines,
        available=calib.available,
        n_tokens=calib.n_tokens,
        batches=len(calib.batches),
        warnings=calib.warnings,
    )
    logger.info(
        "preserve data: %s, %d record(s), %d tokens, lambda %s",
        info["source"],
        len(calib.lines),
        calib.n_tokens,
        cfg.preserve_weight,
    )
    return PreserveData(calib, info, generated)
