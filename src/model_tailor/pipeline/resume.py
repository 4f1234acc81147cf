"""Resumable runs: one checkpoint file per finished block in a work folder beside ``--out``.

The folder name carries a hash of the resolved config and of the inputs (checkpoint structure, weight file
sizes
and times, calibration bytes), so a rerun with the same arguments continues from the last finished block and a
changed run starts afresh. Files are written atomically; the folder is removed once the outputs are committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_tailor.io.atomic import atomic_path
from model_tailor.patch.layout import join_parts, split_parts
from model_tailor.pipeline.weights import SparseValues

logger = logging.getLogger(__name__)

__all__ = ["WorkDir", "run_key"]


def _file_stamp(path: Path) -> list[Any]:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.suffix in (".safetensors", ".json")]


def run_key(
    config_fingerprint: str, base: Path, finetuned: Path, calibration: Path | None, preserve: Path | None = None
) -> str:
    h = hashlib.sha256(config_fingerprint.encode())
    h.update(json.dumps([_file_stamp(base), _file_stamp(finetuned)]).encode())
    if calibration is not None:
        h.update(calibration.read_bytes())
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

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
