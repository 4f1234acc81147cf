"""Keep-mask selection with exact counts and stable ties (docs/METHOD.md §7, decisions D9-D10).

Glossary (used throughout the library):

- ``base``, ``finetuned``: the pre-trained and fine-tuned weights; ``delta = finetuned - base``.
- ``density``: the fraction of entries **kept** in the patch, in (0, 1]. ("sparsity" is the opposite and stays
  out of the public API.)
- ``keep_mask``: bool tensor, **True = in the patch** (fine-tuned value kept, possibly decorated); False =
  reverted to base.
- ``score``: **higher = keep**.
- ``revert``: set an entry back to its base value (not "prune", which means set to zero elsewhere).
- ``decorate`` / ``compensate``: the OBS update of docs/METHOD.md §8 on the kept entries.
- selection group: the set of entries among which exactly ``k = floor(density * m)`` of ``m`` are kept:
  one column block pooled over all rows (``block``, the official granularity), one row (``row``), the whole
  tensor (``tensor``) or every tensor at once (``global``, :func:`select_keep_masks_global`).

Tie-break: within a group, entries are ranked by score, descending, with a *stable* sort over the group's
row-major flat order, so among equal scores the **lower flat index wins** (is kept first). Because a group's
keep set is always a prefix of one fixed ranking, ``keep(rho1)`` is a subset of ``keep(rho2)`` whenever
``rho1 < rho2``. The official rule (revert where score <= the threshold) keeps one entry too few and reverts
all ties; we do not reproduce it (D9).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch

from model_tailor.errors import ConfigError, NumericalError
from model_tailor.options import GRANULARITIES

__all__ = ["GRANULARITIES", "check_density", "keep_count", "select_keep_mask", "select_keep_masks_global", "top_k"]

# Tolerance for snapping density*m to an integer: 0.29 * 100 evaluates to 28.999999999999996.
_SNAP_TOL = 1e-9
TOLERANCES = ("relative", "absolute")


def check_density(density: float) -> None:
    """Raise :class:`ConfigError` unless ``density`` (the fraction of the delta kept) is in (0, 1]."""
    if not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
        raise ConfigError(f"density must be in (0, 1] (the fraction of the delta kept), got {density!r}")


def keep_count(density: float, m: int, *, tolerance: str = "relative") -> int:
    """``k = floor(density * m)``, robust to float error (docs/METHOD.md §7, D9).

    Args:
        density: fraction kept, in (0, 1].
        m: group size, >= 0.
        tolerance: how near an integer ``density * m`` must be to count as it. ``"relative"`` (within 1e-9
            of its size) is the rule of the kernel. ``"absolute"`` (within 1e-9) is the rule the data-free
            baselines were measured with: from ~1e8 entries on it can floor a product that float error put
            just below an integer one short, so it stays theirs to keep their results where they are.

    Returns:
        The number of entries to keep, ``0 <= k <= m``.
    """
    check_density(density)
    if m < 0:
        raise ConfigError(f"keep_count: group size must be >= 0, got {m}")
    if tolerance not in TOLERANCES:
        raise ConfigError(f"keep_count: tolerance must be one of {TOLERANCES}, got {tolerance!r}")
    x = float(density) * m
    if tolerance == "absolute":
        return min(m, int(x + _SNAP_TOL))
    nearest = round(x)
    k = nearest if abs(x - nearest) <= _SNAP_TOL * max(1.0, x) else math.floor(x)
    return max(0, min(m, int(k)))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool keep mask of the k best entries along the last dim; ties go to the lower index.

    Equivalent to the first k of a stable descending sort, in O(m): find the k-th largest value tau, keep
    everything above it, then the first ``k - #above`` entries equal to tau in index order.
    """
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    m = scores.shape[-1]
    if k <= 0:
        return keep
    if k >= m:
        return keep.fill_(True)
    tau = torch.kthvalue(scores, m - k + 1, dim=-1, keepdim=True).values
    above = scores > tau
    need = k - above.sum(dim=-1, keepdim=True)
    tied = scores == tau
    return above | (tied & (torch.cumsum(tied, dim=-1) <= need))


def _warn_empty(what: str, density: float) -> None:
    msg = f"density {density} keeps 0 entries in at least one {what} group; that group reverts entirely to base"
    # warnings.warn, not a log line: the default filter shows it once per call site, where per-block adaptive
    # selection would otherwise log it for every block.
    warnings.warn(msg, stacklevel=3)


def select_keep_mask(
    scores: torch.Tensor,
    density: float,
    *,
    granularity: str = "block",
    block_size: int = 128,
) -> torch.Tensor:
    """Keep exactly ``floor(density * m)`` highest-scoring entries per selection group (docs/METHOD.md §7, D9-D10).

    Args:
        scores: ``(rows, cols)`` scores, higher = keep. NaN is rejected.
        density: fraction kept per group, in (0, 1]; 1 keeps everything.
        granularity: ``"block"`` (per ``block_size`` columns, all rows pooled), ``"row"`` (k per row) or
            ``"tensor"`` (one group).
        block_size: column block width for ``"block"``; the last block may be narrower and gets its own k.

    Returns:
        ``(rows, cols)`` bool keep mask, True = in the patch. Ties: lower flat index kept first.
    """
    check_density(density)
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"granularity must be one of {GRANULARITIES} (or use select_keep_masks_global), got {granularity!r}"
        )
    if scores.ndim != 2:
        raise ConfigError(f"select_keep_mask: scores must be 2-D (rows, cols), got {tuple(scores.shape)}")
    if bool(torch.isnan(scores).any()):
        raise NumericalError("select_keep_mask: scores contain NaN")
    rows, cols = scores.shape
    if granularity == "tensor":
        k = keep_count(density, rows * cols)
        if k == 0 and rows * cols:
            _warn_empty("tensor", density)
        return top_k(scores.reshape(-1), k).reshape(rows, cols)
    if granularity == "row":
        k = keep_count(density, cols)
        if k == 0 and rows * cols:
            _warn_empty("row", density)
        return top_k(scores, k)
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    keep = torch.empty(rows, cols, dtype=torch.bool, device=scores.device)
    empty = False
    for b in range(0, cols, block_size):
        e = min(b + block_size, cols)
        k = keep_count(density, rows * (e - b))
        empty |= k == 0 and rows > 0
        # Flattening the (rows, width) block row-major keeps "lower flat index wins" within the block.
        keep[:, b:e] = top_k(scores[:, b:e].reshape(-1), k).reshape(rows, e - b)
    if empty:
        _warn_empty("block", density)
    return keep


def select_keep_masks_global(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """One exact top-k over every tensor at once (granularity ``global``, docs/METHOD.md §7).

    Ties: ranked by the mapping's iteration order, then by flat index within a tensor (lower wins). The
    concatenated scores live on the first tensor's device; memory is about 12 bytes per entry (fp32 scores
    plus int64 sort indices), so select over the module set that fits, not blindly over a whole 7B model.

    Args:
        scores: name -> ``(rows, cols)`` scores, higher = keep.
        density: fraction kept over all entries together, in (0, 1].

    Returns:
        name -> bool keep mask of the same shape, True = in the patch; exactly ``floor(density * total)``
        entries are True.
    """
    check_density(density)
    if not scores:
        return {}
    names = list(scores)
    device = scores[names[0]].device
    dtype = torch.float64 if any(scores[n].dtype == torch.float64 for n in names) else torch.float32
    flat = torch.cat([scores[n].reshape(-1).to(device=device, dtype=dtype) for n in names])
    if bool(torch.isnan(flat).any()):
        raise NumericalError("select_keep_masks_global: scores contain NaN")
    k = keep_count(density, flat.numel())
    if k == 0 and flat.numel():
        _warn_empty("global", density)
    keep_flat = top_k(flat, k)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for n in names:
        t = scores[n]
        out[n] = keep_flat[offset : offset + t.numel()].reshape(t.shape).to(t.device)
        offset += t.numel()
    return out
