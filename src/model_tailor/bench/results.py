"""TailorBench result records: one ``Row`` per method row and the ``BenchResult`` written to ``results.json``.

Accuracy and likelihood metrics, their 95% intervals and the comparison with Model Tailor are filled by
``bench.analysis`` from the per-item outcomes, which live beside results.json (``items/<key>.json``, the path
in ``Row.items``) so any row can be re-analysed without running it again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# 2: per-item outcomes, likelihood metrics, bootstrap intervals, comparison with Model Tailor;
# 3: rows carry their pair and kind (anchor | post-hoc | retrain), LoRA-pair rows also score against the full fine-tune
# 4: rows of the multitask pair carry ``multitask`` (each target task's ratio against its own fine-tune, vs TIES)
# 5: rows carry ``drift`` (the drift probe, bench.probe) with its interval, and vs_tailor its paired difference
RESULTS_VERSION = 5
KINDS = ("anchor", "post-hoc", "retrain")  # the pair's two models | computed from them | a different fine-tune


@dataclass
class Row:
    method: str
    density: float | None
    params: dict
    original: dict[str, float]  # accuracy per original task
    target: dict[str, float]  # accuracy per target task
    original_score: float
    target_score: float
    retention: float | None = None
    target_ratio: float | None = None
    h_score: float | None = None
    seconds: float = 0.0
    cached: bool = False
    extra: dict = field(default_factory=dict)
    loglik: dict[str, float] = field(default_factory=dict)  # mean log-prob of the reference answers per task
    ll_retention: float | None = None
    ll_target_ratio: float | None = None
    ll_h_score: float | None = None
    drift: float | None = None  # nats per token from the pre-trained model's answers (bench.probe); lower is better
    intervals: dict[str, list[float] | None] = field(default_factory=dict)  # metric -> [low, high] (95%)
    vs_tailor: dict | None = None  # paired difference in H with model_tailor at the same density
    items: str | None = None  # per-item outcomes, relative to results.json
    pair: str = "main"  # the (pre-trained, fine-tuned) pair its ratios are against (bench.pairs)
    kind: str = "post-hoc"  # one of KINDS
    # rows of a pair whose fine-tuned anchor is not the full fine-tune (the LoRA pair): target ratio and H against
    # the full fine-tune too, with intervals; None elsewhere
    vs_full_finetune: dict | None = None
    # rows of a pair with several target tasks (the multitask pair): each task's ratio against its own fine-tune
    # (accuracy and likelihood, with intervals) and the paired difference in H with the pair's reference row
    # (TIES merging); None elsewhere. retention, target_ratio (mean of the tasks' ratios) and h_score (harmonic
    # mean of retention and every task's ratio) are filled as for every row
    multitask: dict | None = None


@dataclass
class BenchResult:
    quick: bool
    rows: list[Row]
    meta: dict
    files: dict[str, dict] = field(default_factory=dict)  # per-item files: path relative to the out folder -> JSON

    def to_json(self) -> dict:
        return {
            "benchmark": "tailorbench",
            "version": RESULTS_VERSION,
            "quick": self.quick,
            "meta": self.meta,
            "rows": [asdict(r) for r in self.rows],
        }
