"""TailorBench statistics: retention, target ratio and H from per-item outcomes, with paired bootstrap intervals.

Pure tensor code, no model. For models ``m`` scored on the same test items (``hit`` 0/1 and ``logprob``, the
mean per-token log-probability of the reference answer, per item):

Accuracy (the table's headline numbers, unchanged from TailorBench v1):

* ``a_t(m)`` = mean hit over task ``t``'s items; ``original(m)`` = mean of ``a_t(m)`` over the original tasks,
  ``target(m)`` = the same over the target tasks (a macro average: each task weighs the same);
* retention = ``original(m) / original(pretrained)``; target ratio = ``target(m) / target(finetuned)``;
* H = ``2·r·q / (r + q)``, 0 when ``r + q <= 0``; undefined (None / NaN) when an anchor scores 0.

Likelihood (teacher-forced; ``l_t(m)`` = mean ``logprob`` over task ``t``'s items):

* LL retention = mean over original tasks of ``exp(l_t(m) - l_t(pretrained))``;
* LL target ratio = mean over target tasks of ``exp(l_t(m) - l_t(finetuned))``;
* LL H = their harmonic mean.

Several target tasks, each with its own fine-tuned anchor (the multitask pair, ``bench.multitask``;
:func:`task_metrics`): task ``t``'s target ratio is ``a_t(m) / a_t(finetuned_t)`` (LL: ``exp(l_t(m) -
l_t(finetuned_t))``), ``target_ratio`` is their mean, and H is the harmonic mean of the retention and every
task's ratio, ``n / sum(1 / x_i)`` (H over three for two tasks; 0 when one is 0). A ratio of one task's
accuracies against two different anchors has no common denominator, hence per-task ratios.

Drift (the probe tasks, ``bench.probe``: likelihood only, the pre-trained model's own answers as references):
drift = mean over probe tasks of ``l_p(pretrained) - l_p(m)``, nats per token; 0 for ``pretrained``, lower is
better. It is a metric of its own, not part of retention or H.

``exp`` of a difference of mean log-probabilities is the ratio of geometric-mean per-token probabilities of
the reference answers, so both ratios are exactly 1 for their anchor (like the accuracy ones) and above 1
when the row finds the references likelier than its anchor.

Intervals: a paired, stratified bootstrap. Each resample draws, independently per task, ``n_t`` item indices
with replacement; the same draw is used for every model (so a row and its anchors move together and the
difference of two rows is paired), and every quantity above is recomputed from the resampled items. The
95% interval is the 2.5 and 97.5 percentiles over the resamples where the quantity is defined. Resampling
is a count matrix per task (how often each item is drawn), so the means of all models over all resamples
are one matrix product: 2,000 resamples of 1,000 items x 50 models take a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

METRICS = ("retention", "target_ratio", "h_score", "ll_retention", "ll_target_ratio", "ll_h_score")
DRIFT = "drift"  # present only when the items include a probe task


def resample_counts(sizes: Mapping[str, int], resamples: int, seed: int) -> dict[str, torch.Tensor]:
    """Per task, ``(resamples, n_t)`` float64 counts of how often each item is drawn (each row sums to n_t);
    one seeded generator, tasks drawn in ``sizes`` order."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for task, n in sizes.items():
        idx = torch.randint(n, (resamples, n), generator=gen)
        out[task] = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(resamples, n, dtype=torch.float64)
        )
    return out


def harmonic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise ``2ab / (a + b)``, 0 where ``a + b <= 0``, NaN where either is NaN."""
    s = a + b
    h = torch.where(s > 0, 2 * a * b / torch.where(s > 0, s, 1.0), 0.0)
    return torch.where(s.isnan(), torch.nan, h)


def harmonic_all(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise harmonic mean ``n / sum(1 / x_i)`` of ``n`` tensors: 0 where any ``x_i <= 0`` (a zero ratio
    zeroes H, as :func:`harmonic` does), NaN where any is NaN."""
    x = torch.stack(list(values))
    positive = (x > 0).all(0)
    h = torch.where(positive, x.shape[0] / torch.where(x > 0, x, 1.0).reciprocal().sum(0), 0.0)
    return torch.where(x.isnan().any(0), torch.nan, h)


def _ratio(x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    return torch.where(anchor > 0, x / torch.where(anchor > 0, anchor, 1.0), torch.nan)


def drift(ll: Mapping[str, torch.Tensor], pre: int, probe: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{DRIFT: mean over probe tasks of l_p(pre) - l_p}`` from per-task mean log-probs; empty without probes."""
    if not probe:
        return {}
    return {DRIFT: torch.stack([ll[p][pre] - ll[p] for p in probe]).mean(0)}


def metrics(
    acc: Mapping[str, torch.Tensor],
    ll: Mapping[str, torch.Tensor],
    pre: int,
    ft: int,
    original: Sequence[str],
    target: Sequence[str],
    probe: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Every metric of :data:`METRICS` (and :data:`DRIFT` with ``probe`` tasks) from per-task means ``(models,
    resamples)`` (accuracy and mean log-prob); ``pre`` and ``ft`` index the anchor models."""
    orig = torch.stack([acc[t] for t in original]).mean(0)
    tgt = torch.stack([acc[t] for t in target]).mean(0)
    retention, target_ratio = _ratio(orig, orig[pre]), _ratio(tgt, tgt[ft])
    ll_retention = torch.stack([torch.exp(ll[t] - ll[t][pre]) for t in original]).mean(0)
    ll_target = torch.stack([torch.exp(ll[t] - ll[t][ft]) for t in target]).mean(0)
    return {
        "retention": retention,
        "target_ratio": target_ratio,
        "h_score": harmonic(retention, target_ratio),
        "ll_retention": ll_retention,
        "ll_target_ratio": ll_target,
        "ll_h_score": harmonic(ll_retention, ll_target),
    } | drift(ll, pre, probe)


def task_key(metric: str, task: str) -> str:
    """Name of one target task's own ratio in :func:`task_metrics`' output (``target_ratio/addition``)."""
    return f"{metric}/{task}"


def task_metrics(
    acc: Mapping[str, torch.Tensor],
    ll: Mapping[str, torch.Tensor],
    pre: int,
    anchors: Mapping[str, int],
    original: Sequence[str],
    target: Sequence[str],
    probe: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """:data:`METRICS` (and :data:`DRIFT`) with each target task measured against its own fine-tuned anchor
    (``anchors[task]`` indexes it), plus every task's own ratios under :func:`task_key` (module docstring)."""
    orig = torch.stack([acc[t] for t in original]).mean(0)
    retention = _ratio(orig, orig[pre])
    ratios = {t: _ratio(acc[t], acc[t][anchors[t]]) for t in target}
    ll_retention = torch.stack([torch.exp(ll[t] - ll[t][pre]) for t in original]).mean(0)
    ll_ratios = {t: torch.exp(ll[t] - ll[t][anchors[t]]) for t in target}
    out = {
        "retention": retention,
        "target_ratio": torch.stack(list(ratios.values())).mean(0),
        "h_score": harmonic_all([retention, *ratios.values()]),
        "ll_retention": ll_retention,
        "ll_target_ratio": torch.stack(list(ll_ratios.values())).mean(0),
        "ll_h_score": harmonic_all([ll_retention, *ll_ratios.values()]),
    }
    out |= drift(ll, pre, probe) | {task_key("target_ratio", t): v for t, v in ratios.items()}
    return out | {task_key("ll_target_ratio", t): v for t, v in ll_ratios.items()}


@dataclass(frozen=True)
class Analysis:
    """Point values ``(models,)`` and bootstrap samples ``(models, resamples)`` of every metric."""

    points: dict[str, torch.Tensor]
    samples: dict[str, torch.Tensor]
    level: float = 0.95

    def interval(self, key: str, i: int) -> tuple[float, float] | None:
        """Percentile interval of model ``i``'s ``key``; None where no resample defines it."""
        return _percentiles(self.samples[key][i], self.level)

    def difference(self, key: str, i: int, ref: int) -> dict | None:
        """Paired difference ``key(i) - key(ref)``: point value, interval, and whether the interval excludes 0."""
        point = float(self.points[key][i] - self.points[key][ref])
        bounds = _percentiles(self.samples[key][i] - self.samples[key][ref], self.level)
        if bounds is None or point != point:
            return None
        return {"delta": point, "interval": list(bounds), "excludes_zero": bounds[0] > 0 or bounds[1] < 0}


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float] | None:
    finite = values[~values.isnan()]
    if finite.numel() == 0:
        return None
    tail = (1 - level) / 2
    lo, hi = torch.quantile(finite, torch.tensor([tail, 1 - tail], dtype=finite.dtype)).tolist()
    return lo, hi


def bootstrap(
    hits: Mapping[str, torch.Tensor],
    logprob: Mapping[str, torch.Tensor],
    pre: int,
    ft: int | Mapping[str, int],
    original: Sequence[str],
    target: Sequence[str],
    *,
    probe: Sequence[str] = (),
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Analysis:
    """Point values and paired stratified bootstrap samples of every metric.

    ``hits[t]`` and ``logprob[t]`` are ``(models, n_t)``: row ``m`` is one model, column ``j`` the same test
    item for every model (``probe`` tasks have ``logprob`` only). ``ft`` indexes the fine-tuned anchor, or maps
    each target task to its own (:func:`task_metrics`). ``resamples`` must be at least 1; the bench uses 2,000.
    Probe tasks are drawn after the others, so adding one leaves every other task's resamples unchanged.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    tasks = [*original, *target]
    hits = {t: hits[t].to(torch.float64) for t in tasks}
    logprob = {t: logprob[t].to(torch.float64) for t in [*tasks, *probe]}
    counts = resample_counts({t: logprob[t].shape[1] for t in [*tasks, *probe]}, resamples, seed)

    def means(values: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if weights is None:
            return {t: v.mean(1, keepdim=True) for t, v in values.items()}
        return {t: v @ weights[t].T / v.shape[1] for t, v in values.items()}

    measure = metrics if isinstance(ft, int) else task_metrics
    points = measure(means(hits, None), means(logprob, None), pre, ft, original, target, probe)
    samples = measure(means(hits, counts), means(logprob, counts), pre, ft, original, target, probe)
    return Analysis({k: v[:, 0] for k, v in points.items()}, samples, level)
