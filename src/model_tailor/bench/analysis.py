"""TailorBench analysis: every row's metrics, intervals and comparison with Model Tailor, from its items.

The formulas are ``bench.stats``'s; here the rows' per-item outcomes become ``(rows, items)`` matrices in
one fixed item order (every row was evaluated on the same test items), the bootstrap runs once per pair of
models (``Row.pair``, ``bench.pairs``), and the results are written back into the rows. The comparison pairs
each row with the ``model_tailor`` row (the default options) of its pair at the same density; rows at a
density without one get none. A pair with several target tasks (the multitask pair) measures each against its
own fine-tuned anchor (``stats.task_metrics``) and compares every row with its reference row (``Row.multitask``).
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


def _bootstrap(
    rows: Sequence[Row], files: Mapping[str, dict], pre: int, ft: int | Mapping[str, int], resamples: int, seed: int
):
    hits, logprob = item_matrices(rows, files, "hit"), item_matrices(rows, files, "logprob")
    original, target = tuple(rows[0].original), tuple(rows[0].target)
    probe = tuple(t for t in logprob if t not in original and t not in target)  # the drift probe (bench.probe)
    result = stats.bootstrap(hits, logprob, pre, ft, original, target, probe=probe, resamples=resamples, seed=seed)
    return result, logprob


def _metrics(result: stats.Analysis) -> tuple[str, ...]:
    return (*stats.METRICS, *((stats.DRIFT,) if stats.DRIFT in result.points else ()))


def _bounds(result: stats.Analysis, key: str, i: int) -> list[float] | None:
    bounds = result.interval(key, i)
    return None if bounds is None else list(bounds)


def _anchor(rows: Sequence[Row], method: str, pair: str) -> int:
    found = [i for i, r in enumerate(rows) if r.method == method]
    if not found:
        raise ValueError(f"pair {pair!r} has no {method!r} row to measure its ratios against")
    return found[0]


def _compare(rows: Sequence[Row], result: stats.Analysis) -> None:
    """``vs_tailor``: each row against the pair's ``model_tailor`` row at the same density."""
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
        if stats.DRIFT in result.points:
            r.vs_tailor["drift"] = result.difference(stats.DRIFT, i, ref)


def _per_task(rows: Sequence[Row], result: stats.Analysis, anchors: Mapping[str, str], reference: str | None) -> None:
    """``Row.multitask``: each target task's ratio against its own anchor (accuracy and likelihood, intervals) and
    the paired difference in H with the pair's first ``reference`` row (None for that row itself)."""
    ref = next((i for i, r in enumerate(rows) if r.method == reference), None)
    pair = rows[0].pair if rows else ""
    for i, r in enumerate(rows):
        out: dict = {"anchors": {t: f"{pair}:{m}" for t, m in anchors.items()}}
        for metric in ("target_ratio", "ll_target_ratio"):
            keys = {t: stats.task_key(metric, t) for t in anchors}
            out[metric] = {t: _number(result.points[k][i]) for t, k in keys.items()}
            out.setdefault("intervals", {})[metric] = {t: _bounds(result, k, i) for t, k in keys.items()}
        out["vs"] = None
        if ref is not None and ref != i:
            name = rows[ref].method + ("" if rows[ref].density is None else f"@{rows[ref].density:g}")
            out["vs"] = {
                "reference": name,
                "h_score": result.difference("h_score", i, ref),
                "ll_h_score": result.difference("ll_h_score", i, ref),
            }
        r.multitask = out


def _against(rows: list[Row], reference: Row, name: str, files, resamples: int, seed: int) -> None:
    """``vs_full_finetune``: the target-side metrics of ``rows`` with ``reference`` as the fine-tuned anchor."""
    group = [*rows, reference]
    result, _ = _bootstrap(group, files, _anchor(rows, "pretrained", name), len(rows), resamples, seed)
    keys = ("target_ratio", "h_score", "ll_target_ratio", "ll_h_score")
    for i, r in enumerate(rows):
        r.vs_full_finetune = {"reference": f"{reference.pair}:{reference.method}"}
        r.vs_full_finetune |= {k: _number(result.points[k][i]) for k in keys}
        r.vs_full_finetune["intervals"] = {k: _bounds(result, k, i) for k in keys}


def finalize(
    rows: list[Row],
    files: Mapping[str, dict],
    *,
    resamples: int = 2000,
    seed: int = 0,
    anchors: Mapping[str, str] | None = None,
    full_finetune: Mapping[str, str] | None = None,
    task_anchors: Mapping[str, Mapping[str, str]] | None = None,
    references: Mapping[str, str] | None = None,
) -> list[Row]:
    """Fill the metrics, intervals and comparison of every row (which must all carry ``items``), pair by pair.

    Each pair's ratios are against its own ``pretrained`` row and its fine-tuned anchor: ``anchors[pair]``
    (default ``finetuned``). ``full_finetune[pair]`` names the pair whose ``finetuned`` row the pair's rows are
    also measured against (``vs_full_finetune``). ``task_anchors[pair]`` maps each target task of a pair with
    several to its own anchor's method (``stats.task_metrics``; ``Row.multitask``, compared with the pair's
    ``references[pair]`` row). Every pair's bootstrap uses the same seed, and the items a pair shares with
    another draw the same resamples (each task's counts come from one generator, task by task, in the pair's
    task order): intervals stay paired across pairs.
    """
    missing = [r.method for r in rows if r.items not in files]
    if missing:
        raise ValueError(f"rows without per-item outcomes: {missing}")
    anchors, full_finetune = anchors or {}, full_finetune or {}
    task_anchors, references = task_anchors or {}, references or {}
    for pair in dict.fromkeys(r.pair for r in rows):
        group = [r for r in rows if r.pair == pair]
        pre = _anchor(group, "pretrained", pair)
        if pair in task_anchors:
            ft: int | dict[str, int] = {t: _anchor(group, m, pair) for t, m in task_anchors[pair].items()}
        else:
            ft = _anchor(group, anchors.get(pair, "finetuned"), pair)
        result, logprob = _bootstrap(group, files, pre, ft, resamples, seed)
        for i, r in enumerate(group):
            for key in _metrics(result):
                setattr(r, key, _number(result.points[key][i]))
                r.intervals[key] = _bounds(result, key, i)
            r.loglik = {t: float(v[i].mean()) for t, v in logprob.items()}
        _compare(group, result)
        if pair in task_anchors:
            _per_task(group, result, task_anchors[pair], references.get(pair))
        if pair in full_finetune:
            other = [r for r in rows if r.pair == full_finetune[pair]]
            _against(group, other[_anchor(other, "finetuned", full_finetune[pair])], pair, files, resamples, seed)
    return rows
