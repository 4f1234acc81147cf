"""Is a patch applied to a model? ``remove`` asks before it writes, as ``apply`` checks the base fingerprint.

Subtracting a patch from a model it was never applied to yields wrong weights whose only symptom is a
content-hash mismatch, easily mistaken for fp32 rounding. Two facts settle it without the base at hand:

* the patched tensors are byte-identical to the base the patch records: the patch was never applied (or was
  removed already);
* the model carries a ``model_tailor.json`` from ``apply`` that lists other patch files, another policy or
  other weights than those passed to ``remove``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_tailor.errors import PatchFormatError
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.patch.fingerprint import tensor_hash
from model_tailor.patch.model import SparsePatch

logger = logging.getLogger(__name__)


def _is_base(reader: CheckpointReader, patch: SparsePatch) -> bool:
    """Every tensor the patch changes (a nonzero sparse part or factors) has the base's recorded bytes."""
    content = patch.metadata.base_fingerprint.get("content") or {}
    changing = [n for n, tp in sorted(patch.tensors.items())
                if n in content and (tp.lowrank is not None or bool(tp.values.any()))]  # fmt: skip
    return bool(changing) and all(tensor_hash(reader.get(n)) == content[n] for n in changing)


def _read_provenance(file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        logger.warning("ignoring unreadable %s", file)
        return None
    return data if isinstance(data, dict) and data.get("operation") == "apply" else None


def _recorded(prov: dict[str, Any]) -> tuple[list[str], str | None, list[float]] | None:
    """(patch sha256s, policy, weights) as ``apply`` recorded them; ``None`` when malformed."""
    patches = prov.get("patches")
    if not isinstance(patches, list) or not all(isinstance(p, dict) for p in patches):
        return None
    digests = [p.get("sha256") for p in patches]
    combine = prov.get("combine")
    weights = combine.get("weights") if isinstance(combine, dict) else [1.0] * len(digests)
    if not all(isinstance(d, str) for d in digests) or not isinstance(weights, list):
        return None
    if not all(isinstance(w, int | float) for w in weights):
        return None
    policy = prov.get("policy") if len(digests) > 1 else None
    return digests, policy if isinstance(policy, str) else None, [float(w) for w in weights]


def _provenance_problem(
    folder: Path, digests: list[str], policy: str, weights: Sequence[float] | None, name: str
) -> str:
    prov = _read_provenance(folder / name) if (folder / name).is_file() else None
    recorded = _recorded(prov) if prov is not None else None
    if recorded is None:
        return ""
    applied, applied_policy, applied_weights = recorded
    if sorted(applied) != sorted(digests):
        return f"its {name} lists other patch files (sha256 {', '.join(d[:12] for d in applied)})"
    if len(digests) > 1 and applied_policy not in (None, policy):
        return f"its {name} says the patches were combined with policy {applied_policy!r}, not {policy!r}"
    ours = [float(w) for w in weights] if weights is not None else [1.0] * len(digests)
    if ours != applied_weights:
        return f"its {name} says the patches were applied with weights {applied_weights}, not {ours}"
    return ""


def check_applied(
    reader: CheckpointReader,
    loaded: Sequence[tuple[Path, SparsePatch]],
    digests: list[str],
    *,
    policy: str,
    weights: Sequence[float] | None,
    provenance_name: str,
) -> None:
    """Raise ``PatchFormatError`` when the patches passed to ``remove`` are evidently not applied to ``reader``.

    Args:
        reader: the model ``remove`` reads.
        loaded: the (path, patch) pairs passed to ``remove``; ``digests``: their file sha256s.
        policy, weights: as passed to ``remove``; they must match what ``apply`` recorded.
        provenance_name: the provenance file ``apply`` writes into a checkpoint folder.
    """
    for path, patch in loaded:
        if _is_base(reader, patch):
            raise PatchFormatError(
                f"patch {str(path)!r} is not applied to {str(reader.path)!r}: every tensor it changes is "
                "byte-identical to the base it was made for; pass the patched model, or --force"
            )
    if reader.path.is_dir():
        problem = _provenance_problem(reader.path, digests, policy, weights, provenance_name)
        if problem:
            raise PatchFormatError(
                f"the patch(es) passed are not what was applied to {str(reader.path)!r}: {problem}; pass the "
                "same patches, --policy and --weights as to apply, or --force"
            )
