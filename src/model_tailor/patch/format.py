"""Patch files: save and load a ``SparsePatch`` as one safetensors file, format v1, atomically.

Layout, for every parameter name ``<p>`` (full HF name):

* ``indices/<p>``: 1-D flat row-major positions, sorted and unique; int32, or int64 when numel >= 2**31.
* ``values/<p>``: 1-D decorated delta ``W_MT - W_pre`` at those positions; fp32 (bf16/fp16 on request).
* ``lowrank_a/<p>`` (rows, r) and ``lowrank_b/<p>`` (r, cols), fp32: only in format version 2, written when
  any tensor carries low-rank factors. Version-1 files stay readable; a v2 file without factors is never
  written.

Metadata (all strings): ``format = "model-tailor-patch"``, ``format_version``, ``created`` (ISO time),
``payload_sha256`` and the JSON strings ``shapes``, ``base_dtypes``, ``base_fingerprint``, ``config``,
``versions``, ``stats``, ``reset_params`` (and ``multitask`` for a joint multi-task patch). Each field's type is
checked on load (``schema.py``).

``payload_sha256`` is the sha256 of, for every tensor key in sorted order, the UTF-8 line
``<key>\t<dtype code>\t<shape as JSON>\n`` followed by the tensor's raw little-endian bytes. ``load_patch``
refuses a file whose tensors do not hash to it (a flipped byte in the values would otherwise load and write
other weights); files written before the checksum existed load with a logged note. The format version is
unchanged: older readers see an unknown key and warn.

The writer is byte-deterministic (the safetensors library orders metadata by a randomised hash map, so the
container is serialised here): header JSON with sorted metadata keys and compact JSON values, tensors laid out
by element size (largest first, keeping every tensor aligned) then by key, header padded with spaces to 8
bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from model_tailor import __version__
from model_tailor.errors import ConfigError, PatchFormatError
from model_tailor.io.atomic import atomic_path
from model_tailor.patch.layout import PARTS as PREFIXES
from model_tailor.patch.layout import index_dtype as _index_dtype
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch, current_versions, index_problem, utc_now
from model_tailor.patch.schema import CHECKS, SHA256_RE, VERSION_RE, MetadataError, parse_json

logger = logging.getLogger(__name__)

FORMAT_NAME = "model-tailor-patch"
SUPPORTED_MAJOR_VERSIONS = (1, 2)
JSON_KEYS = ("shapes", "base_dtypes", "base_fingerprint", "config", "versions", "stats", "reset_params", "multitask")
PAYLOAD_KEY = "payload_sha256"
KNOWN_KEYS = frozenset(("format", "format_version", "created", PAYLOAD_KEY, *JSON_KEYS))
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32",
              torch.int64: "I64"}  # fmt: skip
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _raw_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy() if flat.numel() else b"")


def payload_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor's key, dtype code, shape and raw bytes, keys in sorted order (see module doc)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        code = _ST_DTYPES.get(t.dtype, str(t.dtype))
        digest.update(f"{key}\t{code}\t{json.dumps(list(t.shape), separators=(',', ':'))}\n".encode())
        digest.update(_raw_bytes(t))
    return digest.hexdigest()


def _file_tensors(patch: SparsePatch, value_dtype: torch.dtype) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tp in patch.tensors.items():
        out[f"indices/{name}"] = tp.indices.to(_index_dtype(tp.numel))
        out[f"values/{name}"] = tp.values.to(value_dtype)
        if tp.lowrank is not None:
            out[f"lowrank_a/{name}"] = tp.lowrank[0]
            out[f"lowrank_b/{name}"] = tp.lowrank[1]
    return out


def patch_metadata_strings(patch: SparsePatch) -> dict[str, str]:
    """The metadata strings written for ``patch`` (fills ``versions`` and ``created`` when empty)."""
    meta = patch.metadata
    version = "2" if patch.has_lowrank else "1"
    fields: dict[str, Any] = {
        "shapes": {name: list(tp.shape) for name, tp in patch.tensors.items()},
        "base_dtypes": meta.base_dtypes,
        "base_fingerprint": meta.base_fingerprint,
        "config": meta.config,
        "versions": meta.versions or current_versions(),
        "stats": meta.stats,
        "reset_params": meta.reset_params,
    }
    if meta.multitask:  # written only for joint multi-task patches: single-task files stay as they were
        fields["multitask"] = meta.multitask
    try:
        strings = {key: _dumps(value) for key, value in fields.items()}
    except (TypeError, ValueError) as err:
        raise PatchFormatError(
            f"patch metadata is not JSON-serialisable ({err}); use plain dicts, lists and numbers"
        ) from None
    strings.update(format=FORMAT_NAME, format_version=version, created=meta.created or utc_now())
    for key, value in meta.extra.items():
        strings.setdefault(key, value)
    return dict(sorted(strings.items()))


def save_patch(patch: SparsePatch, path: str | os.PathLike[str], *, value_dtype: torch.dtype = torch.float32) -> Path:
    """Write ``patch`` to ``path`` atomically (temporary file, fsync, rename).

    Args:
        patch: the patch; its metadata is written as JSON strings (``created``/``versions`` filled when
            empty).
        path: destination ``.safetensors`` file; replaced if it exists.
        value_dtype: ``torch.float32`` (default, lossless), or ``torch.bfloat16`` / ``torch.float16``.

    Returns:
        The path written.
    """
    if value_dtype not in _VALUE_DTYPES:
        raise ConfigError(f"value_dtype {value_dtype} is not supported; use torch.float32, bfloat16 or float16")
    tensors = _file_tensors(patch, value_dtype)
    metadata = dict(sorted({**patch_metadata_strings(patch), PAYLOAD_KEY: payload_sha256(tensors)}.items()))
    order = sorted(tensors, key=lambda key: (-tensors[key].element_size(), key))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw_header = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw_header += b" " * (-len(raw_header) % 8)
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw_header)))
        handle.write(raw_header)
        for key in order:
            handle.write(_raw_bytes(tensors[key]))
    logger.info("wrote patch %s (%d tensors, %d entries, format v%s)", target, len(patch.tensors), patch.nnz,
                metadata["format_version"])  # fmt: skip
    return target


def _fail(path: Path, message: str) -> PatchFormatError:
    return PatchFormatError(f"patch {str(path)!r}: {message}")


def _read_container(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    if not path.exists():
        raise _fail(path, "file does not exist; check the path")
    if not path.is_file():
        raise _fail(path, "is not a file; pass the .safetensors patch file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own types for bad headers and short files
        reason = " ".join(str(err).split())[:200]
        raise _fail(path, f"not a safetensors file, or truncated ({reason}); re-create it with save_patch") from None
    return metadata, tensors


def _check_version(path: Path, version: str) -> int:
    if not VERSION_RE.fullmatch(version):
        raise _fail(path, f"metadata 'format_version' {version[:40]!r} is not a version number; the file is corrupt")
    major = int(version.split(".")[0])
    if major not in SUPPORTED_MAJOR_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_MAJOR_VERSIONS))
        raise _fail(
            path,
            f"format version {version} is not supported by model-tailor {__version__} (reads {supported}); "
            "upgrade model-tailor",
        )
    return major


def _parse_fields(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Parse and type-check the JSON fields; a missing field is its empty default (``shapes`` is required)."""
    if "shapes" not in raw:
        raise _fail(path, "metadata has no 'shapes' entry; the file is corrupt, re-create it")
    parsed: dict[str, Any] = {}
    for key in JSON_KEYS:
        if key not in raw:
            continue
        try:
            value = parse_json(raw[key])
        except MetadataError as err:
            raise _fail(path, f"metadata {key!r} {err}; the file is corrupt") from None
        problem = CHECKS[key](value)
        if problem:
            raise _fail(path, f"metadata {key!r} {problem}; the file is corrupt, re-create it")
        parsed[key] = value
    return parsed


def _parse_metadata(path: Path, raw: dict[str, str]) -> PatchMetadata:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise _fail(path, "metadata must map strings to strings; the file is corrupt")
    if raw.get("format") != FORMAT_NAME:
        shown = str(raw.get("format"))[:60]
        raise _fail(path, f"format is {shown!r}, expected {FORMAT_NAME!r}; this is not a patch file")
    version = raw.get("format_version", "")
    _check_version(path, version)
    if PAYLOAD_KEY in raw and not SHA256_RE.fullmatch(raw[PAYLOAD_KEY]):
        raise _fail(path, f"metadata {PAYLOAD_KEY!r} is not a sha256 hex digest; the file is corrupt")
    parsed = _parse_fields(path, raw)
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        warnings.warn(
            f"patch {str(path)!r} has metadata keys unknown to model-tailor {__version__}: "
            f"{', '.join(k[:60] for k in unknown[:10])} "
            "(written by a newer version?); they are kept but ignored",
            stacklevel=3,
        )
    return PatchMetadata(
        shapes=parsed["shapes"],
        base_dtypes=parsed.get("base_dtypes", {}),
        base_fingerprint=parsed.get("base_fingerprint", {}),
        config=parsed.get("config", {}),
        versions=parsed.get("versions", {}),
        stats=parsed.get("stats", {}),
        reset_params=parsed.get("reset_params", []),
        multitask=parsed.get("multitask", {}),
        created=raw.get("created", ""),
        format_version=version,
        extra={key: raw[key] for key in unknown},
    )


def _verify_payload(path: Path, raw: dict[str, str], tensors: dict[str, Tensor]) -> None:
    expected = raw.get(PAYLOAD_KEY)
    if expected is None:
        logger.warning(
            "note: patch %r has no payload checksum (written before model-tailor recorded one), so its "
            "tensor data cannot be verified; re-save it to add one",
            str(path),
        )
        return
    if payload_sha256(tensors) != expected:
        raise _fail(path, "tensor data does not match its payload checksum; the file is corrupt, re-create it")


def _check_finite(path: Path, key: str, tensor: Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise _fail(path, f"{key!r} holds {bad} NaN/Inf value(s); re-create the patch from finite weights")


def _build_tensor(path: Path, name: str, shape: list[int], parts: dict[str, Tensor], major: int) -> TensorPatch:
    if "indices" not in parts or "values" not in parts:
        missing = "indices" if "indices" not in parts else "values"
        raise _fail(path, f"tensor {name!r} has no '{missing}/{name}' entry; the file is corrupt, re-create it")
    idx, val = parts["indices"], parts["values"]
    if idx.dtype not in (torch.int32, torch.int64):
        raise _fail(path, f"'indices/{name}' has dtype {idx.dtype}, expected int32 or int64")
    if val.dtype not in _VALUE_DTYPES:
        raise _fail(path, f"'values/{name}' has dtype {val.dtype}, expected float32, bfloat16 or float16")
    if idx.dim() != 1 or val.dim() != 1:
        raise _fail(path, f"tensor {name!r}: indices/values must be 1-D, got {list(idx.shape)}/{list(val.shape)}")
    if idx.numel() != val.numel():
        raise _fail(path, f"tensor {name!r}: {idx.numel()} indices but {val.numel()} values; the file is corrupt")
    numel = math.prod(shape)
    problem = index_problem(idx.to(torch.int64), numel)
    if problem:
        raise _fail(path, f"'indices/{name}' {problem}; the file is corrupt, re-create it")
    _check_finite(path, f"values/{name}", val)
    lowrank = None
    if "lowrank_a" in parts or "lowrank_b" in parts:
        if major < 2:
            raise _fail(path, f"low-rank factors for {name!r} need format version 2, the file says {major}")
        if "lowrank_a" not in parts or "lowrank_b" not in parts:
            raise _fail(path, f"tensor {name!r} has only one of lowrank_a/lowrank_b; the file is corrupt")
        a, b = parts["lowrank_a"], parts["lowrank_b"]
        _check_finite(path, f"lowrank_a/{name}", a)
        _check_finite(path, f"lowrank_b/{name}", b)
        lowrank = (a.float(), b.float())
    try:
        return TensorPatch(name, tuple(shape), idx, val.float(), lowrank)
    except PatchFormatError as err:
        raise _fail(path, str(err)) from None


def load_patch(path: str | os.PathLike[str]) -> SparsePatch:
    """Read and validate a patch file.

    Args:
        path: a file written by ``save_patch`` (format version 1 or 2).

    Returns:
        The ``SparsePatch`` with fp32 values and int64 indices; ``metadata.format_version`` as read.

    Raises:
        PatchFormatError: one line naming the file, the tensor and the fix, for: a missing, non-safetensors or
            truncated file; a wrong format name; an unsupported major version; indices not 1-D, unsorted,
            duplicated or out of range; value count != index count; a tensor without a ``shapes`` entry;
            NaN/Inf values; a metadata field of the wrong type (named); tensor data that does not match
            ``payload_sha256``. Unknown metadata keys only warn (forward compatibility); a file without a
            checksum loads with a logged note.
    """
    file = Path(path)
    raw_meta, raw_tensors = _read_container(file)
    meta = _parse_metadata(file, raw_meta)
    _verify_payload(file, raw_meta, raw_tensors)
    major = int(meta.format_version.split(".")[0])
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in raw_tensors.items():
        prefix, sep, name = key.partition("/")
        if not sep or prefix not in PREFIXES or not name:
            raise _fail(file, f"unexpected tensor {key!r} (expected indices/<name>, values/<name>)")
        grouped.setdefault(name, {})[prefix] = tensor
    for name in sorted(grouped):
        if name not in meta.shapes:
            raise _fail(file, f"tensor {name!r} has no entry in metadata 'shapes'; the file is corrupt, re-create it")
    tensors = {name: _build_tensor(file, name, meta.shapes[name], grouped.get(name, {}), major)
               for name in sorted(meta.shapes)}  # fmt: skip
    return SparsePatch(tensors, meta)
