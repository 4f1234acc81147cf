"""Resumable runs: one checkpoint file per finished block in a work folder beside ``--out``.

The folder name carries a hash of the resolved config and of the inputs' bytes (every weight, config and
tokenizer file of both checkpoints, the calibration and preserve files), so a rerun with the same arguments
continues from the last finished block and a changed run, even one whose files kept their size and time,
starts afresh. Files are written atomically; the folder is removed once the outputs are committed, and while
they are being committed it holds ``committing.json`` naming them, so a rerun may replace what it left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_tailor.io.atomic import atomic_path, atomic_write_json
from model_tailor.patch.layout import join_parts, split_parts
from model_tailor.pipeline.weights import SparseValues

logger = logging.getLogger(__name__)

__all__ = ["WorkDir", "run_key"]


_NEVER_READ = (".bin", ".pt", ".pth", ".ckpt")  # pickled weights: never read, so never part of the key
_SIDE_SUFFIXES = (".json", ".jinja", ".txt", ".model")
_CHUNK = 8 << 20


def _input_files(path: Path) -> list[Path]:
    """The files a run reads from a checkpoint: the folder's files, or one weight file and its side files."""
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.suffix not in _NEVER_READ]
    else:
        files = [path] + [p for p in path.parent.iterdir() if p.is_file() and p.suffix in _SIDE_SUFFIXES]
    return sorted(p for p in files if not p.name.startswith("."))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)  # releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def content_digest(paths: list[Path]) -> str:
    """sha256 over ``name<TAB>sha256(bytes)`` of every file (streamed, a few files at a time)."""
    workers = max(1, min(4, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(_sha256, paths))
    return hashlib.sha256("".join(f"{p.name}\t{d}\n" for p, d in zip(paths, digests, strict=True)).encode()).hexdigest()


def run_key(
    config_fingerprint: str,
    base: Path,
    finetuned: Path | Sequence[Path],
    calibration: Path | None | Sequence[Path | None],
    preserve: Path | None = None,
) -> str:
    """The work folder's key: the config, and the bytes of every input (each fine-tune and calibration file of
    a multi-task run, in task order; one of each gives the key it always had)."""
    h = hashlib.sha256(config_fingerprint.encode())
    finetuneds = [finetuned] if isinstance(finetuned, Path) else list(finetuned)
    calibrations = [calibration] if calibration is None or isinstance(calibration, Path) else list(calibration)
    for part in (base, *finetuneds):
        h.update(content_digest(_input_files(Path(part))).encode())
    for path in calibrations:
        if path is not None:
            h.update(Path(path).read_bytes())
    if preserve is not None and preserve.is_file():  # "self" data is a function of base and config
        h.update(preserve.read_bytes())
    return h.hexdigest()[:16]


class WorkDir:
    """Per-block checkpoints of tailored tensors (sparse indices + values) and their layer report.

    Tensors are keyed as in the patch file (``indices/<name>``, :mod:`model_tailor.patch.layout`); the values
    are the tailored weights in the base dtype, not the patch's fp32 delta.
    """

    def __init__(self, out: Path, key: str) -> None:
        self.path = out.with_name(f".{out.name}.work-{key}")

    def _file(self, block: str) -> Path:
        return self.path / f"{block}.safetensors"

    def save_block(self, block: str, tensors: dict[str, SparseValues], layer: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        flat: dict[str, torch.Tensor] = {}
        for name, sv in tensors.items():
            lowrank = None if sv.lowrank is None else (sv.lowrank[0].contiguous(), sv.lowrank[1].contiguous())
            flat.update(join_parts(name, sv.indices.contiguous(), sv.values.contiguous(), lowrank))
        with atomic_path(self._file(block)) as tmp:
            save_file(flat, str(tmp), metadata={"layer": json.dumps(layer, default=str)})

    def load_block(self, block: str) -> tuple[dict[str, SparseValues], dict[str, Any]] | None:
        file = self._file(block)
        if not file.is_file():
            return None
        try:
            with safe_open(file, framework="pt") as f:
                layer = json.loads(f.metadata()["layer"])
                parts = split_parts({k: f.get_tensor(k) for k in f.keys()})
            tensors = {
                n: SparseValues(
                    p["indices"], p["values"], (p["lowrank_a"], p["lowrank_b"]) if "lowrank_a" in p else None
                )
                for n, p in parts.items()
            }
        except Exception as err:  # noqa: BLE001 - a damaged (or older-layout) checkpoint is recomputed, never trusted
            logger.warning("resume: ignoring unreadable %s (%s)", file, err)
            return None
        return tensors, layer

    @property
    def _journal(self) -> Path:
        return self.path / "committing.json"

    def mark_committing(self, outputs: list[Path]) -> None:
        """Record the outputs about to be renamed into place (the rerun of a run killed now may replace them)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._journal, [str(p) for p in outputs])

    def committing(self) -> list[Path]:
        """Outputs an interrupted commit of this run may have left (empty when none was under way)."""
        try:
            return [Path(p) for p in json.loads(self._journal.read_text())]
        except (OSError, ValueError, TypeError):
            return []

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
