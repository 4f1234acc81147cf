"""TailorBench analysis: every row's metrics, intervals and comparison with Model Tailor, from its items.

The formulas are ``bench.stats``'s; here the rows' per-item outcomes become ``(rows, items)`` matrices in
one fixed item order (every row was evaluated on the same test items), the bootstrap runs once for all rows,
and the results are written back into the rows. The comparison pairs each row with the ``model_tailor``
row (the default options) at the same density; rows at a density without one get none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from model_tailor.bench import stats
from model_tailor.bench.results import Row

REFERENCE_METHOD = "model_tailor"


def _number(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def item_matrices(rows: Sequence[Row], files: Mapping[str, dict], key: str) -> dict[str, torch.Tensor]:
    """``{task: (rows, items)}`` of one per-item field (``hit`` or ``logprob``), rows in order."""
    tasks = files[rows[0].items]["tasks"]
    out = {}
    for task in tasks:
        values = [files[r.items]["tasks"][task][key] for r in rows]
        if len({len(v) for v in values}) != 1:
            raise ValueError(f"rows were evaluated on different {task} items; cannot pair them")
        out[task] = torch.tensor(values, dtype=torch.float64)
    return out


def finalize(rows: list[Row], files: Mapping[str, dict], *, resamples: int = 2000, seed: int = 0) -> list[Row]:
    """Fill the metrics, intervals and comparison of every row (which must all carry ``items``)."""
    missing = [r.method for r in rows if r.items not in files]
    if missing:
        raise ValueError(f"rows without per-item outcomes: {missing}")
    pre = next(i for i, r in enumerate(rows) if r.method == "pretrained")
    ft = next(i for i, r in enumerate(rows) if r.method == "finetuned")
    hits, logprob = item_matrices(rows, files, "hit"), item_matrices(rows, files, "logprob")
    result = stats.bootstrap(
        hits, logprob, pre, ft, tuple(rows[0].original), tuple(rows[0].target), resamples=resamples, seed=seed
    )
    for i, r in enumerate(rows):
        for key in stats.METRICS:
            setattr(r, key, _number(result.points[key][i]))
            bounds = result.interval(key, i)
            r.intervals[key] = None if bounds is None else list(bounds)
        r.loglik = {t: float(v[i].mean()) for t, v in logprob.items()}
    references = {r.density: i for i, r in enumerate(rows) if r.method == REFERENCE_METHOD}
    for i, r in enumerate(rows):
        ref = references.get(r.density)
        if ref is None or ref == i or r.density is None:
            r.vs_tailor = None
            continue
        r.vs_tailor = {
            "reference": f"{REFERENCE_METHOD}@{r.density:g}",
            "h_score": result.difference("h_score", i, ref),
            "ll_h_score": result.difference("ll_h_score", i, ref),
        }
    return rows
