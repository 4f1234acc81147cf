"""TailorBench outputs: ``results.json``, ``results.md`` (the table) and ``pareto.png``.

Files are written atomically; the Markdown table is also what ``model-tailor bench`` prints.
"""

from __future__ import annotations

import json
from pathlib import Path

from model_tailor.bench.methods import TAILOR_METHODS
from model_tailor.bench.runner import BenchResult, Row
from model_tailor.io.atomic import atomic_path, atomic_write_text

MT_METHODS = TAILOR_METHODS  # every Model Tailor row (ablations included) is drawn in Model Tailor's style
HIGHLIGHT = {"model_tailor": "crimson", "model_tailor_preserve": "darkgreen"}


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _params(row: Row) -> str:
    shown = {k: v for k, v in row.params.items() if k not in ("engine",)}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or ""


def markdown_table(result: BenchResult) -> str:
    """One line per row; the original columns are per task, then the docs/METHOD.md §13 ratios and H."""
    orig_tasks = list(result.rows[0].original) if result.rows else []
    tgt_tasks = list(result.rows[0].target) if result.rows else []
    head = [
        "method",
        "density",
        "params",
        *orig_tasks,
        *tgt_tasks,
        "original",
        "target",
        "retention",
        "target ratio",
        "H",
        "seconds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        name = f"**{r.method}**" if r.method in HIGHLIGHT else r.method
        cells = [
            name,
            "dense" if r.density is None else f"{r.density:g}",
            _params(r),
            *(_fmt(r.original[t]) for t in orig_tasks),
            *(_fmt(r.target[t]) for t in tgt_tasks),
            _fmt(r.original_score),
            _fmt(r.target_score),
            _fmt(r.retention),
            _fmt(r.target_ratio),
            _fmt(r.h_score),
            f"{r.seconds:.1f}" + (" (cached)" if r.cached else ""),
        ]
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


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-right envelope: the points no other point beats on both axes, by increasing x (ties: best y)."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out[::-1]


def plot_pareto(result: BenchResult, path: Path) -> None:
    """Retention (x) against target ratio (y), one point per row, and each method family's Pareto frontier
    (upper-right envelope) as a line; Model Tailor and preserve-aware Model Tailor highlighted."""
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
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "pareto.png"}
    atomic_write_text(paths["json"], json.dumps(result.to_json(), indent=2, default=str) + "\n")
    atomic_write_text(paths["md"], markdown_report(result))
    plot_pareto(result, paths["png"])
    return paths
