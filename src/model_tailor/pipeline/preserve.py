"""Preserve data for the dual objective: a user's JSONL file of original-ability records, or ``self``.

Per target linear a preserve-aware run minimises ``||(W - W_ft) X_t||^2 + lam ||(W - W_pre) X_o||^2`` under the
patch budget (:mod:`model_tailor.kernel.objective`). ``X_t`` is the calibration stream, propagated through the
TAILORED blocks; ``X_o`` is a second, "preserve" stream of original-ability data whose block inputs come from the
BASE weights: each block runs it with its target weights set back to base, so the preserve stream is the base
model's own forward pass. Tensors outside the targets take their non-target policy value in both streams
(``reset``, the default, is base; with ``keep`` the preserve stream sees the fine-tuned norms the tailored model
will hold), and a block list after an already tailored one (LLaVA's language model after a tailored vision
tower) receives the tailored earlier list's output, as the tailored model will.

This module loads (or, for ``self`` and ``self-generic``, generates with the base model) that data; the stage
order stays in :mod:`model_tailor.pipeline.run`. ``self`` is the base model's answers to the calibration inputs
(:mod:`~model_tailor.calibration.selfcalib`: generic prompts about each image, the prompt of each text record)
followed by its answers to the shipped generic instructions; ``self-generic`` is the latter alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_tailor.calibration.data import CalibrationSet, build_calibration
from model_tailor.calibration.selfcalib import FROM_IMAGE, FROM_TEXT, CalibrationSelfSpec, generate_from_calibration
from model_tailor.calibration.selfgen import Generator, SelfPreserveSpec, cache_path, generate_self_preserve
from model_tailor.config import TailorConfig
from model_tailor.errors import CalibrationError

logger = logging.getLogger(__name__)

__all__ = ["PreserveData", "load_preserve", "self_records"]

GENERIC = "generic"  # provenance of a record answering a shipped generic instruction


@dataclass
class PreserveData:
    """The preserve stream's data.

    Attributes:
        calib: rendered, tokenised batches (same record forms and rendering as the calibration data).
        info: the report's ``preserve`` section (source, sha256 or generation spec, counts, lambda, structure).
        generated: for ``self``/``self-generic``, the exact JSONL text of the generated records (written to
            ``<out>.preserve.jsonl``); None for a user file.
    """

    calib: CalibrationSet
    info: dict[str, Any]
    generated: str | None = None


def load_preserve(cfg: TailorConfig, model_dir: Path, model_cls: type | None) -> PreserveData:
    """Read ``cfg.preserve`` (a JSONL file) or generate it with the BASE model (``self``, ``self-generic``), then
    batch it. The report's ``records`` counts the records used by origin (calibration images, calibration texts,
    generic instructions; or ``file``).

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
    if cfg.self_preserve:
        records, info = self_records(cfg)
        generated = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with tempfile.TemporaryDirectory() as tmp:  # line numbers match <out>.preserve.jsonl, written later
            path = Path(tmp) / "preserve.jsonl"
            path.write_text(generated, encoding="utf-8")
            # image paths are the calibration file's, already confined to its folder when it was read
            calib = build_calibration(path, model_dir, samples=len(records), **{**common, "allow_outside_paths": True})
        used = Counter(records[line - 1]["self"]["from"] for line in calib.lines)
        info["sha256"] = hashlib.sha256(generated.encode("utf-8")).hexdigest()
        info["records"] = {
            "calibration_images": used[FROM_IMAGE],
            "calibration_texts": used[FROM_TEXT],
            "generic": used[GENERIC],
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
        info["records"] = {"file": len(calib.lines)}
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


def self_records(cfg: TailorConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The base model's records for ``self`` (calibration-derived, then generic) or ``self-generic`` (generic
    only), each tagged ``"self": {"from": ...}``, and the report's description of how they were made."""
    gen = Generator(Path(cfg.base), cfg.device)  # loaded only if something is not cached
    spec = SelfPreserveSpec(samples=cfg.preserve_samples, seed=cfg.seed, max_new_tokens=cfg.preserve_max_new_tokens)
    records: list[dict[str, Any]] = []
    info: dict[str, Any] = {"source": cfg.preserve, "spec": dataclasses.asdict(spec)}
    if cfg.preserve == "self":
        assert cfg.calibration is not None, "config validation: self preserve data needs calibration data"
        cspec = CalibrationSelfSpec(
            records=cfg.preserve_calibration_records,
            image_prompts=cfg.preserve_image_prompts,
            seed=cfg.seed,
            max_new_tokens=cfg.preserve_max_new_tokens,
        )
        data = generate_from_calibration(
            cfg.base,
            cfg.calibration,
            cspec,
            generator=gen,
            cache_dir=cfg.cache_dir,
            allow_outside_paths=cfg.allow_outside_paths,
        )
        records += data.records
        info["calibration_spec"] = dataclasses.asdict(cspec)
        info["calibration_cached"] = data.cached
        info["calibration_lines"] = sorted({q.line for q in data.queries})
        info["calibration_skipped"] = data.skipped
    generic_cached = (cache_file := cache_path(cfg.base, spec, cfg.cache_dir)) is not None and cache_file.is_file()
    generic = generate_self_preserve(cfg.base, spec, device=cfg.device, cache_dir=cfg.cache_dir, generator=gen)
    records += [{**r, "self": {"from": GENERIC}} for r in generic]
    info.update(generic_cached=generic_cached, generated=len(records))
    return records, info
