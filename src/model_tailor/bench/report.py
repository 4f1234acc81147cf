"""TailorBench outputs: ``results.json``, ``results.md`` (the table) and ``pareto.png``.

Files are written atomically; the Markdown table is also what ``model-tailor bench`` prints.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import atomic_path, atomic_write_text
from .runner import BenchResult, Row

MT_METHODS = ("model_tailor", "mt_salience_only", "mt_sensitivity_only", "mt_no_compensation", "mt_official_sign")


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _params(row: Row) -> str:
    shown = {k: v for k, v in row.params.items() if k not in ("engine",)}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or ""


def markdown_table(result: BenchResult) -> str:
    """One line per row; the original columns are per task, then the METHOD §13 ratios and H."""
    orig_tasks = list(result.rows[0].original) if result.rows else []
    tgt_tasks = list(result.rows[0].target) if result.rows else []
    head = ["method", "density", "params", *orig_tasks, *tgt_tasks, "original", "target", "retention",
            "target ratio", "H", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        name = f"**{r.method}**" if r.method == "model_tailor" else r.method
        cells = [name, "dense" if r.density is None else f"{r.density:g}", _params(r),
                 *(_fmt(r.original[t]) for t in orig_tasks), *(_fmt(r.target[t]) for t in tgt_tasks),
                 _fmt(r.original_score), _fmt(r.target_score), _fmt(r.retention), _fmt(r.target_ratio),
                 _fmt(r.h_score), f"{r.seconds:.1f}" + (" (cached)" if r.cached else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: BenchResult) -> str:
    meta = result.meta
    sizes = ", ".join(f"{k} {v}" for k, v in meta.get("task_sizes", {}).items())
    notes = "".join(f"\n- {n}" for n in meta.get("notes", []))
    return (
        f"# TailorBench ({'quick' if result.quick else 'full'})\n\n"
        f"Date {meta.get('date')}; machine {json.dumps(meta.get('machine'))}; engine {meta.get('engine')}.\n"
        f"Test items: {sizes}. Retention = original / pre-trained original; target ratio = target / "
        f"fine-tuned target; H = harmonic mean of the two.\n\n{markdown_table(result)}\n"
        + (f"\nNotes:{notes}\n" if notes else "")
    )


def plot_pareto(result: BenchResult, path: Path) -> None:
    """Retention (x) against target ratio (y), one point per row; Model Tailor rows highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    groups: dict[str, list[Row]] = {}
    for r in result.rows:
        if r.retention is not None and r.target_ratio is not None:
            groups.setdefault(r.method, []).append(r)
    for method, rows in sorted(groups.items()):
        xs, ys = [r.retention for r in rows], [r.target_ratio for r in rows]
        if method == "model_tailor":
            ax.plot(xs, ys, "o-", color="crimson", lw=2, ms=9, label=method, zorder=5)
        elif method in MT_METHODS:
            ax.scatter(xs, ys, marker="D", s=50, color="salmon", label=method, zorder=4)
        elif method in ("pretrained", "finetuned"):
            ax.scatter(xs, ys, marker="*", s=180, color="black", zorder=6)
        else:
            ax.plot(xs, ys, "s--", ms=6, alpha=0.8, label=method)
        for r in rows:
            tag = method if method in ("pretrained", "finetuned") else ("" if r.density is None else f"{r.density:g}")
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


def write_outputs(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "pareto.png"}
    atomic_write_text(paths["json"], json.dumps(result.to_json(), indent=2, default=str) + "\n")
    atomic_write_text(paths["md"], markdown_report(result))
    plot_pareto(result, paths["png"])
    return paths
