"""Apply patches to a checkpoint, or remove them, streaming one tensor at a time (docs/METHOD.md
§12).

``apply_patches`` reads the base lazily, adds the (combined, when several) patch deltas in fp32, casts back to
the base dtype and writes an atomic sharded checkpoint with the config/tokenizer/processor files copied along
and a ``model_tailor.json`` provenance file; a result holding NaN/Inf is refused before the rename.
``remove_patches`` subtracts the same deltas to restore the base, after checking the patch is applied to the
model (``applied.py``): bit-exact for one bf16/fp16 patch; in fp32 each patched entry comes back within one ulp
of the larger of its base and patched values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_tailor.errors import CheckpointError, PatchFormatError
from model_tailor.io.checkpoint import CheckpointReader, CheckpointWriter
from model_tailor.io.safety import Output, check_outputs, lock_outputs
from model_tailor.options import DEFAULT_MAX_SHARD_BYTES
from model_tailor.patch.applied import check_applied
from model_tailor.patch.combine import COMBINE, CombineReport, combine_patches
from model_tailor.patch.fingerprint import compare_fingerprint, structure_hash, tensor_hash
from model_tailor.patch.format import load_patch
from model_tailor.patch.model import SparsePatch, current_versions, dtype_from_name, utc_now

logger = logging.getLogger(__name__)

PROVENANCE_NAME = "model_tailor.json"


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply_patches`` / ``remove_patches`` wrote.

    Attributes:
        out_dir: the checkpoint folder written.
        patched: names of the tensors changed.
        combine_report: overlap report when several patches were combined, else ``None``.
        provenance: the content of ``model_tailor.json``.
        mismatched: (remove only) restored tensors whose bytes differ from the base content hash in the patch.
    """

    out_dir: Path
    patched: list[str]
    combine_report: CombineReport | None
    provenance: dict[str, Any]
    mismatched: list[str]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load(patch_paths: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, SparsePatch]]:
    if not patch_paths:
        raise PatchFormatError("no patch file given; pass at least one --patch FILE")
    return [(Path(p), load_patch(p)) for p in patch_paths]


def _merge(
    loaded: list[tuple[Path, SparsePatch]], policy: str, weights: Sequence[float] | None, force: bool
) -> tuple[SparsePatch, CombineReport | None]:
    COMBINE.get(policy)  # validate the name even for a single patch
    if len(loaded) == 1 and weights is None:
        return loaded[0][1], None
    return combine_patches([p for _, p in loaded], policy=policy, weights=weights, force=force)


def _check_targets(reader: CheckpointReader, patch: SparsePatch) -> None:
    missing = sorted(n for n in patch.tensors if n not in reader)
    if missing:
        raise CheckpointError(
            f"{reader.path}: patch tensors missing from the checkpoint: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; the patch is for another model"
        )
    bad = [f"{n} (patch {list(tp.shape)}, model {list(reader.shape(n))})"
           for n, tp in sorted(patch.tensors.items()) if tuple(reader.shape(n)) != tp.shape]  # fmt: skip
    if bad:
        raise CheckpointError(f"{reader.path}: patch shapes do not match: {', '.join(bad[:5])}; wrong model")


def _provenance(
    operation: str,
    source: Path,
    loaded: list[tuple[Path, SparsePatch]],
    policy: str,
    report: CombineReport | None,
) -> dict[str, Any]:
    return {
        "operation": operation,
        "source": str(source),
        "policy": policy if len(loaded) > 1 else None,
        "patches": [
            {
                "file": str(path),
                "sha256": file_sha256(path),
                "format_version": patch.metadata.format_version,
                "created": patch.metadata.created,
                "base_fingerprint": patch.metadata.base_fingerprint,
                "config": patch.metadata.config,
                "versions": patch.metadata.versions,
            }
            for path, patch in loaded
        ],
        "combine": report.as_dict() if report is not None else None,
        "versions": current_versions(),
        "created": utc_now(),
    }


def _check_output(
    out_dir: str | os.PathLike[str],
    source: str | os.PathLike[str],
    overwrite: bool,
    patch_paths: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """The output folder, refused when it is, holds or lies inside an input (the checkpoint read, a patch),
    or exists (unless ``overwrite``)."""
    out = Path(out_dir)
    inputs = {"checkpoint": source, **{f"--patch {i + 1}": p for i, p in enumerate(patch_paths)}}
    check_outputs([Output("--out", out, "dir")], inputs, overwrite=overwrite)
    return out


def _stream(
    reader: CheckpointReader,
    out_dir: Path,
    patch: SparsePatch,
    *,
    remove: bool,
    max_shard_bytes: int,
    provenance: dict[str, Any],
    overwrite: bool = False,
) -> list[str]:
    mismatched: list[str] = []
    expected_content = patch.metadata.base_fingerprint.get("content") or {}
    with (
        lock_outputs([out_dir]),  # one writer per output; cleans the temporaries of a killed run
        CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer,
    ):
        for name in reader.names():
            tensor = reader.get(name)
            tp = patch.tensors.get(name)
            if tp is not None and remove:
                base_dtype = dtype_from_name(patch.metadata.base_dtypes.get(name)) or tensor.dtype
                tensor = tp.remove(tensor, base_dtype)
                if name in expected_content and tensor_hash(tensor) != expected_content[name]:
                    mismatched.append(name)
            elif tp is not None:
                tensor = tp.apply(tensor)
            writer.add(name, tensor)
        previous = reader.path / PROVENANCE_NAME  # only a checkpoint folder carries one
        writer.copy_files(p for p in reader.extra_files() if p.name != PROVENANCE_NAME)
        if previous.is_file() and not remove:
            try:
                provenance["previous"] = json.loads(previous.read_text())
            except ValueError:
                logger.warning("ignoring unreadable %s", previous)
        writer.write_json(PROVENANCE_NAME, provenance)
    return mismatched


def apply_patches(
    base_dir: str | os.PathLike[str],
    patch_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    policy: str = "disjoint-mean",
    weights: Sequence[float] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> ApplyResult:
    """Write ``base + delta`` for every patched tensor into a new checkpoint folder.

    Args:
        base_dir: the base checkpoint (HF folder or one ``.safetensors`` file), read lazily.
        patch_paths: one or more patch files; several are combined with ``policy`` first.
        out_dir: the new checkpoint folder; must not exist. Written atomically.
        force: apply even if the patch's base fingerprint does not match ``base_dir`` (shapes must still
            match).
        policy: combine policy for several patches (registry ``combine``).
        weights: per-patch scale (see ``combine_patches``).
        max_shard_bytes: shard size of the output.
        overwrite: replace an existing ``out_dir`` (only once the new checkpoint is complete).

    Returns:
        An ``ApplyResult``.

    Raises:
        PatchFormatError: unreadable patch, or base fingerprint mismatch without ``force``.
        CheckpointError: unreadable base, ``out_dir`` exists (without ``overwrite``) or is the input, or patch
            tensors missing / of another shape.
    """
    out = _check_output(out_dir, base_dir, overwrite, patch_paths)
    loaded = _load(patch_paths)
    with CheckpointReader(base_dir) as reader:
        for path, patch in loaded:
            _check_targets(reader, patch)
            problems = compare_fingerprint(patch.metadata.base_fingerprint, reader)
            if problems and not force:
                raise PatchFormatError(
                    f"patch {str(path)!r} was made for another base than {str(reader.path)!r} "
                    f"({'; '.join(problems[:3])}); use the matching base, or pass --force"
                )
            if problems:
                logger.warning("applying %s despite a base mismatch (%s) because of --force", path, problems)
        patch, report = _merge(loaded, policy, weights, force)
        provenance = _provenance("apply", reader.path, loaded, policy, report)
        _stream(
            reader,
            out,
            patch,
            remove=False,
            max_shard_bytes=max_shard_bytes,
            provenance=provenance,
            overwrite=overwrite,
        )
    logger.info("applied %d patch(es) to %s -> %s", len(loaded), base_dir, out)
    return ApplyResult(out, sorted(patch.tensors), report, provenance, [])


def remove_patches(
    patched_dir: str | os.PathLike[str],
    patch_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    policy: str = "disjoint-mean",
    weights: Sequence[float] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> ApplyResult:
    """Restore the base from a patched checkpoint by subtracting the same (combined) deltas.

    Pass the same patches, policy and weights as to ``apply_patches``. Names, shapes and dtypes are checked
    against the patch's base fingerprint; unless ``force``, a model whose changed tensors still hold the base's
    bytes, or whose ``model_tailor.json`` records other patches, policy or weights, is refused
    (``PatchFormatError``). Restored tensors are compared with the base content hashes in the patch, and those
    that differ (fp32 rounding) are listed in ``mismatched``.

    Args and Raises: as ``apply_patches``; ``patched_dir`` is the patched checkpoint.
    """
    out = _check_output(out_dir, patched_dir, overwrite, patch_paths)
    loaded = _load(patch_paths)
    with CheckpointReader(patched_dir) as reader:
        for path, patch in loaded:
            _check_targets(reader, patch)
            expected = patch.metadata.base_fingerprint.get("structure")
            if expected != structure_hash(reader) and not force:
                raise PatchFormatError(
                    f"patch {str(path)!r} was made for a model with other tensor names/shapes/dtypes than "
                    f"{str(reader.path)!r}; use the matching model, or pass --force"
                )
        if not force:
            digests = [file_sha256(path) for path, _ in loaded]
            check_applied(reader, loaded, digests, policy=policy, weights=weights, provenance_name=PROVENANCE_NAME)
        patch, report = _merge(loaded, policy, weights, force)
        provenance = _provenance("remove", reader.path, loaded, policy, report)
        mismatched = _stream(
            reader, out, patch, remove=True, max_shard_bytes=max_shard_bytes, provenance=provenance, overwrite=overwrite
        )
    if mismatched:
        logger.warning("%d restored tensor(s) differ from the base bytes (fp32 rounding?): %s",
                       len(mismatched),
                       ", ".join(mismatched[:5]))  # fmt: skip
    return ApplyResult(out, sorted(patch.tensors), report, provenance, mismatched)
