"""Types of a patch file's metadata fields, checked on load so hostile or damaged metadata is refused up front.

Every check returns ``""`` for a valid value or a short phrase saying what the field must be; ``format.py``
turns that into one ``PatchFormatError`` naming the file and the field. Unknown keys inside ``config`` and
``stats`` stay free-form JSON (they are provenance), but everything the code reads has a fixed type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

VERSION_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}")  # ASCII digits only: "²".isdigit() is True
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_DIM = 2**62  # numel and flat indices stay inside int64


class MetadataError(ValueError):
    """A metadata string that is not valid JSON (the caller names the file and the field)."""


def _no_constants(token: str) -> Any:
    raise MetadataError(f"holds the non-JSON constant {token}")


def _finite(token: str) -> float:
    value = float(token)
    if value in (float("inf"), float("-inf")):
        raise MetadataError(f"holds the number {token[:20]}, which overflows a float")
    return value


def parse_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no overflowing numbers (they could never be written back); deep nesting is
    an error, not a ``RecursionError``."""
    try:
        return json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except RecursionError:
        raise MetadataError("is nested too deeply") from None
    except MetadataError:
        raise
    except ValueError as err:
        raise MetadataError(f"is not valid JSON ({err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_map(value: Any) -> str:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return "must map names to strings"
    return ""


def _mapping(value: Any) -> str:
    return "" if isinstance(value, dict) else "must be a JSON object"


def _shapes(value: Any) -> str:
    problem = "must map names to lists of non-negative ints"
    if not isinstance(value, dict):
        return problem
    for shape in value.values():
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < MAX_DIM for d in shape):
            return problem + f" below 2**62 (got {str(shape)[:40]})"
        numel = 1
        for dim in shape:
            numel *= dim
        if numel >= MAX_DIM:
            return f"has a shape of {numel} entries, more than 2**62"
    return ""


def _fingerprint(value: Any) -> str:
    if not isinstance(value, dict):
        return "must be a JSON object"
    for key in ("algorithm", "structure"):
        if key in value and not isinstance(value[key], str):
            return f"{key!r} must be a string"
    if "num_tensors" in value and not (_is_int(value["num_tensors"]) and value["num_tensors"] >= 0):
        return "'num_tensors' must be a non-negative int"
    if "content" in value and _str_map(value["content"]):
        return "'content' must map names to hex digests"
    forced = value.get("forced_across_bases", [])
    if not isinstance(forced, list) or not all(isinstance(f, str) for f in forced):
        return "'forced_across_bases' must be a list of strings"
    return ""


def _reset(value: Any) -> str:
    if isinstance(value, dict) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return ""
    return "must be a list of names or an object name -> reason"


def _count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _multitask(value: Any) -> str:
    """``{"tasks": [task, ...], "kept": int, "shared": int}``; each task names its files and counts."""
    if not isinstance(value, dict) or not isinstance(value.get("tasks"), list):
        return "must be an object with a 'tasks' list"
    if not all(_count(value.get(k)) for k in ("kept", "shared")):
        return "'kept' and 'shared' must be non-negative ints"
    for task in value["tasks"]:
        if not isinstance(task, dict) or not all(isinstance(task.get(k), str) for k in ("name", "finetuned")):
            return "every task must be an object with string 'name' and 'finetuned'"
        if not isinstance(task.get("calibration"), (str, type(None))):
            return "a task's 'calibration' must be a string or null"
        if not all(task.get(k) is None or _count(task.get(k)) for k in ("records", "kept_with_delta")):
            return "a task's 'records' and 'kept_with_delta' must be non-negative ints or null"
    return ""


CHECKS: dict[str, Callable[[Any], str]] = {
    "shapes": _shapes,
    "base_dtypes": _str_map,
    "base_fingerprint": _fingerprint,
    "config": _mapping,
    "versions": _str_map,
    "stats": _mapping,
    "reset_params": _reset,
    "multitask": _multitask,
}
