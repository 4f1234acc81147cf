"""TailorBench outputs: ``results.json``, ``results.md`` (the tables), ``pareto.png`` and ``items/``.

Files are written atomically; the main Markdown table is also what ``model-tailor bench`` prints. Every
metric cell reads ``value ± half-width`` of its 95% paired-bootstrap interval (``bench.stats``; the exact
bounds are in results.json, ``intervals``). ``items/<key>.json`` holds each evaluated model's per-item
outcomes and ``items/references.json`` the items themselves; each row names its file in ``items``.
"""

from __future__ import annotations

import json
from pathlib import Path

from model_tailor.bench.methods import TAILOR_METHODS
from model_tailor.bench.results import BenchResult, Row
from model_tailor.io.atomic import atomic_path, atomic_write_text

MT_METHODS = TAILOR_METHODS  # every Model Tailor row (ablations included) is drawn in Model Tailor's style
HIGHLIGHT = {"model_tailor": "crimson", "model_tailor_preserve": "darkgreen"}
METRIC_COLUMNS = {
    "retention": "retention",
    "target_ratio": "target ratio",
    "h_score": "H",
    "ll_retention": "LL retention",
    "ll_target_ratio": "LL target ratio",
    "ll_h_score": "LL H",
}


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _fmt_interval(x: float | None, bounds: list[float] | None) -> str:
    """``0.953 ± 0.021``: the value and half the width of its interval (the value alone without one)."""
    return _fmt(x) if x is None or not bounds else f"{x:.3f} ± {(bounds[1] - bounds[0]) / 2:.3f}"


def _params(row: Row) -> str:
    shown = {k: v for k, v in row.params.items() if k not in ("engine",)}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or ""


def _name(row: Row) -> str:
    return f"**{row.method}**" if row.method in HIGHLIGHT else row.method


def _density(row: Row) -> str:
    return "dense" if row.density is None else f"{row.density:g}"


def markdown_table(result: BenchResult) -> str:
    """One line per row: accuracy per task, then the accuracy and likelihood ratios and H with intervals."""
    orig_tasks = list(result.rows[0].original) if result.rows else []
    tgt_tasks = list(result.rows[0].target) if result.rows else []
    head = ["method", "density", "params", *orig_tasks, *tgt_tasks, "original", "target"]
    head += [*METRIC_COLUMNS.values(), "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [
            _name(r),
            _density(r),
            _params(r),
            *(_fmt(r.original[t]) for t in orig_tasks),
            *(_fmt(r.target[t]) for t in tgt_tasks),
            _fmt(r.original_score),
            _fmt(r.target_score),
            *(_fmt_interval(getattr(r, key), r.intervals.get(key)) for key in METRIC_COLUMNS),
            f"{r.seconds:.1f}" + (" (cached)" if r.cached else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference(diff: dict | None) -> list[str]:
    if diff is None:
        return ["–", "–"]
    lo, hi = diff["interval"]
    mark = " *" if diff["excludes_zero"] else ""
    return [f"{diff['delta']:+.3f}{mark}", f"[{lo:+.3f}, {hi:+.3f}]"]


def comparison_table(result: BenchResult) -> str:
    """Every row with a ``model_tailor`` row at its density: the paired-bootstrap difference in H (accuracy
    and likelihood) with its 95% interval; ``*`` marks an interval that excludes 0."""
    head = ["method", "density", "params", "ΔH vs model_tailor", "95% interval", "ΔLL H", "95% interval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        if r.vs_tailor is None:
            continue
        cells = [_name(r), _density(r), _params(r), *_difference(r.vs_tailor.get("h_score"))]
        cells += _difference(r.vs_tailor.get("ll_h_score"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def markdown_report(result: BenchResult) -> str:
    meta = result.meta
    sizes = ", ".join(f"{k} {v}" for k, v in meta.get("task_sizes", {}).items())
    notes = "".join(f"\n- {n}" for n in meta.get("notes", []))
    boot = meta.get("bootstrap", {})
    comparison = comparison_table(result)
    return (
        f"# TailorBench ({'quick' if result.quick else 'full'})\n\n"
        f"Date {meta.get('date')}; machine {json.dumps(meta.get('machine'))}; engine {meta.get('engine')}.\n"
        f"Test items: {sizes}. Retention = original / pre-trained original; target ratio = target / "
        f"fine-tuned target; H = harmonic mean of the two (accuracy: mean over each group's tasks of greedy "
        f"accuracy). LL: the same from the teacher-forced likelihood of the reference answers, per task "
        f"exp(mean log-prob - the anchor's), averaged over the group's tasks. ± is half the 95% interval of a "
        f"paired bootstrap over test items ({boot.get('resamples')} resamples, stratified by task, seed "
        f"{boot.get('seed')}).\n\n{markdown_table(result)}\n"
        + (
            f"\n## Against Model Tailor at the same density\n\nPaired-bootstrap difference in H (row - "
            f"model_tailor); * = the 95% interval excludes 0.\n\n{comparison}\n"
            if comparison
            else ""
        )
        + (f"\nNotes:{notes}\n" if notes else "")
    )


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-right envelope: the points no other point beats on both axes, by increasing x (ties: best y)."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out[::-1]


def plot_pareto(result: BenchResult, path: Path) -> None:
    """Retention (x) against target ratio (y), one point per row, and each method family's Pareto frontier
    (upper-right envelope) as a line, 95% bootstrap intervals as error bars; Model Tailor and preserve-aware
    Model Tailor highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    groups: dict[str, list[Row]] = {}
    for r in result.rows:
        if r.retention is not None and r.target_ratio is not None:
            groups.setdefault(r.method, []).append(r)
    for method, rows in sorted(groups.items()):
        _error_bars(ax, rows, HIGHLIGHT.get(method, "grey"))
        xs, ys = [r.retention for r in rows], [r.target_ratio for r in rows]
        front = frontier(list(zip(xs, ys, strict=True)))
        fx, fy = [p[0] for p in front], [p[1] for p in front]
        if method in HIGHLIGHT:
            color = HIGHLIGHT[method]
            ax.scatter(xs, ys, marker="o", s=60, color=color, alpha=0.6, zorder=5)
            ax.plot(fx, fy, "o-", color=color, lw=2.5, ms=9, label=f"{method} (frontier)", zorder=6)
        elif method in MT_METHODS:
            ax.scatter(xs, ys, marker="D", s=50, color="salmon", label=method, zorder=4)
        elif method in ("pretrained", "finetuned"):
            ax.scatter(xs, ys, marker="*", s=180, color="black", zorder=7)
        else:
            (line,) = ax.plot(fx, fy, "--", lw=1, alpha=0.8, label=f"{method} (frontier)")
            ax.scatter(xs, ys, marker="s", s=30, alpha=0.8, color=line.get_color())
        for r in rows:
            tag = method if method in ("pretrained", "finetuned") else ("" if r.density is None else f"{r.density:g}")
            if method == "model_tailor_preserve":
                tag += _preserve_tag(r.params)
            ax.annotate(tag, (r.retention, r.target_ratio), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(0.99, color="grey", ls=":", lw=1)
    ax.axhline(0.97, color="grey", ls=":", lw=1)
    ax.set_xlabel("original-task retention (vs pre-trained)")
    ax.set_ylabel("target-task ratio (vs fine-tuned)")
    ax.set_title(f"TailorBench ({'quick' if result.quick else 'full'}): dotted lines = paper's 99% / 97%")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _error_bars(ax, rows: list[Row], color: str) -> None:
    """95% bootstrap intervals of retention (horizontal) and target ratio (vertical), where known."""
    for r in rows:
        xi, yi = r.intervals.get("retention"), r.intervals.get("target_ratio")
        xerr = [[r.retention - xi[0]], [xi[1] - r.retention]] if xi else None
        yerr = [[r.target_ratio - yi[0]], [yi[1] - r.target_ratio]] if yi else None
        if xerr or yerr:
            ax.errorbar(
                [r.retention], [r.target_ratio], xerr=xerr, yerr=yerr, fmt="none", ecolor=color, alpha=0.35, lw=0.8
            )


def _preserve_tag(params: dict) -> str:
    """Short point label of a preserve row beyond its density: non-default structure, source, lambda, salience."""
    from model_tailor.config import DEFAULT_PRESERVE_WEIGHT

    parts = [] if params.get("structure", "sparse") == "sparse" else [str(params["structure"])]
    if params.get("preserve") == "self":
        parts.append("self")
    if params.get("lambda", DEFAULT_PRESERVE_WEIGHT) != DEFAULT_PRESERVE_WEIGHT:
        parts.append(f"λ{params['lambda']:g}")
    if params.get("salience_from", "delta") != "delta":
        parts.append(f"sal={params['salience_from']}")
    return (" " + ",".join(parts)) if parts else ""


def write_outputs(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    """results.json, results.md, pareto.png and the per-item files (``items/``) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "pareto.png"}
    for rel, data in result.files.items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / rel, json.dumps(data) + "\n")
    if result.files:
        paths["items"] = out_dir / "items"
    atomic_write_text(paths["json"], json.dumps(result.to_json(), indent=2, default=str) + "\n")
    atomic_write_text(paths["md"], markdown_report(result))
    plot_pareto(result, paths["png"])
    return paths
