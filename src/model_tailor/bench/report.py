"""TailorBench outputs: ``results.json``, ``results.md`` (the tables), ``pareto.png`` and ``items/``.

Files are written atomically; the main Markdown table is also what ``model-tailor bench`` prints. Every
metric cell reads ``value ± half-width`` of its 95% paired-bootstrap interval (``bench.stats``; the exact
bounds are in results.json, ``intervals``). Each row names its pair (``bench.pairs``: the ratios are against
that pair's anchors) and its kind (anchor, post-hoc, retrain); the comparison table compares within a pair, the
multitask table gives the multitask pair's per-task ratios and its comparison with TIES merging, and
``pareto.png`` has one panel per pair. ``items/<key>.json`` holds each evaluated model's per-item outcomes and
``items/references.json`` the items themselves; each row names its file in ``items``.
"""

from __future__ import annotations

import json
from pathlib import Path

from model_tailor.bench import multitask as MX
from model_tailor.bench.methods import TAILOR_METHODS
from model_tailor.bench.results import BenchResult, Row
from model_tailor.io.atomic import atomic_path, atomic_write_text

MT_METHODS = (*TAILOR_METHODS, *MX.TAILORED)  # every Model Tailor row (ablations, multi-task rows) in its style
HIGHLIGHT = {"model_tailor": "crimson", "model_tailor_preserve": "darkgreen"}
METRIC_COLUMNS = {
    "retention": "retention",
    "target_ratio": "target ratio",
    "h_score": "H",
    "ll_retention": "LL retention",
    "ll_target_ratio": "LL target ratio",
    "ll_h_score": "LL H",
    "drift": "drift",  # nats per token (bench.probe); lower is better
}


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _fmt_interval(x: float | None, bounds: list[float] | None) -> str:
    """``0.953 ± 0.021``: the value and half the width of its interval (the value alone without one)."""
    return _fmt(x) if x is None or not bounds else f"{x:.3f} ± {(bounds[1] - bounds[0]) / 2:.3f}"


def _params(row: Row) -> str:
    shown = {k: v for k, v in row.params.items() if k not in ("engine",)}
    if isinstance(shown.get("adapter"), dict):  # the LoRA pair: its adapter's settings are the lora row's params
        shown["adapter"] = f"lora_r{shown['adapter'].get('rank')}"
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or ""


def _name(row: Row) -> str:
    name = f"**{row.method}**" if row.method in HIGHLIGHT else row.method
    return name + (f" (= {row.extra['copy_of']})" if "copy_of" in row.extra else "")


def _density(row: Row) -> str:
    return "dense" if row.density is None else f"{row.density:g}"


def markdown_table(result: BenchResult) -> str:
    """One line per row: accuracy per task, then the accuracy and likelihood ratios and H with intervals."""
    orig_tasks = list(dict.fromkeys(t for r in result.rows for t in r.original))
    tgt_tasks = list(dict.fromkeys(t for r in result.rows for t in r.target))  # the multitask pair adds one
    head = ["method", "pair", "kind", "density", "params", *orig_tasks, *tgt_tasks, "original", "target"]
    head += [*METRIC_COLUMNS.values(), "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [
            _name(r),
            r.pair,
            r.kind,
            _density(r),
            _params(r),
            *(_fmt(r.original.get(t)) for t in orig_tasks),
            *(_fmt(r.target.get(t)) for t in tgt_tasks),
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
    """Every row with a ``model_tailor`` row of its pair at its density: the paired-bootstrap difference in H
    (accuracy and likelihood) and in drift (lower is better) with its 95% interval; ``*`` marks an interval
    that excludes 0."""
    head = ["method", "pair", "density", "params", "ΔH vs model_tailor", "95% interval", "ΔLL H", "95% interval"]
    head += ["Δdrift", "95% interval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        if r.vs_tailor is None:
            continue
        cells = [_name(r), r.pair, _density(r), _params(r), *_difference(r.vs_tailor.get("h_score"))]
        cells += [*_difference(r.vs_tailor.get("ll_h_score")), *_difference(r.vs_tailor.get("drift"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def full_finetune_table(result: BenchResult) -> str:
    """Rows of a pair whose fine-tuned anchor is not the full fine-tune (the LoRA pair), measured against the
    full fine-tune as well: target ratio and H, accuracy and likelihood, with intervals."""
    keys = ("target_ratio", "h_score", "ll_target_ratio", "ll_h_score")
    head = ["method", "pair", "density", "against", *(METRIC_COLUMNS[k] for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        v = r.vs_full_finetune
        if v is None:
            continue
        cells = [_name(r), r.pair, _density(r), v["reference"]]
        cells += [_fmt_interval(v.get(k), v.get("intervals", {}).get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def multitask_table(result: BenchResult) -> str:
    """The rows with several target tasks (the multitask pair): retention, each task's ratio against its own
    fine-tune, H over all of them and its likelihood counterpart (intervals), and the paired differences in H and
    LL H with the pair's reference row (TIES merging); ``*`` marks an interval that excludes 0."""
    rows = [r for r in result.rows if r.multitask]
    if not rows:
        return ""
    tasks = list(rows[0].multitask["target_ratio"])
    reference = next((r.multitask["vs"]["reference"] for r in rows if r.multitask.get("vs")), "reference")
    head = ["method", "kind", "density", "params", "retention", *(f"{t} ratio" for t in tasks), "H", "LL H"]
    head += [f"ΔH vs {reference}", "95% interval", "ΔLL H", "95% interval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r.multitask
        ratios = [_fmt_interval(m["target_ratio"].get(t), m["intervals"]["target_ratio"].get(t)) for t in tasks]
        cells = [_name(r), r.kind, _density(r), _params(r), _fmt_interval(r.retention, r.intervals.get("retention"))]
        cells += [*ratios, _fmt_interval(r.h_score, r.intervals.get("h_score"))]
        cells += [_fmt_interval(r.ll_h_score, r.intervals.get("ll_h_score"))]
        cells += [*_difference((m.get("vs") or {}).get("h_score")), *_difference((m.get("vs") or {}).get("ll_h_score"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def second_task_checks(result: BenchResult) -> str:
    """The second task's two requirements (issue 14), read off the multitask pair's anchors: the base must score
    low on it (its ratio against the task's own fine-tune below 0.3: the fine-tune learned something) and that
    fine-tune must forget (its retention below 0.6). Empty without the pair."""
    rows = {r.method: r for r in result.rows if r.multitask}
    tasks = list(rows["pretrained"].multitask["target_ratio"]) if "pretrained" in rows else []
    second = next((t for t in tasks if t != MX.VQA), None)
    anchor = dict(MX.task_anchors()).get(second or "")
    if second is None or anchor not in rows:
        return ""
    ratio, retention = rows["pretrained"].multitask["target_ratio"][second], rows[anchor].retention
    return (
        f"Second task ({second}): the pre-trained model's {second} ratio is {_fmt(ratio)} (wanted below 0.3) and "
        f"{anchor}'s retention {_fmt(retention)} (wanted below 0.6)."
    )


def _layers(tuned: list[int] | None) -> str:
    return f" (decoder layers {tuned[0]}–{tuned[-1]} tuned)" if tuned else ""


def _pairs_text(result: BenchResult) -> str:
    pairs = result.meta.get("pairs", {})
    lines = "".join(
        f"\n- `{name}`: {p.get('description', '')}{_layers(p.get('tuned_layers'))}" for name, p in pairs.items()
    )
    return (
        f"Pairs (each row's ratios are against its pair's pre-trained and fine-tuned anchor):{lines}\n\n"
        "Kinds: anchor = the pair's two models; post-hoc = computed from the pair's weights; retrain = a different "
        "fine-tune on the same data, steps and schedule (LoRA, rehearsal of the preserve data).\n\n"
        if pairs
        else ""
    )


def markdown_report(result: BenchResult) -> str:
    meta = result.meta
    sizes = ", ".join(f"{k} {v}" for k, v in meta.get("task_sizes", {}).items())
    notes = "".join(f"\n- {n}" for n in meta.get("notes", []))
    boot = meta.get("bootstrap", {})
    comparison = comparison_table(result)
    against_full = full_finetune_table(result)
    multitask = multitask_table(result)
    return (
        f"# TailorBench ({'quick' if result.quick else 'full'})\n\n"
        f"Date {meta.get('date')}; machine {json.dumps(meta.get('machine'))}; engine {meta.get('engine')}.\n"
        f"Test items: {sizes}. Retention = original / pre-trained original; target ratio = target / "
        f"fine-tuned target; H = harmonic mean of the two (accuracy: mean over each group's tasks of greedy "
        f"accuracy). LL: the same from the teacher-forced likelihood of the reference answers, per task "
        f"exp(mean log-prob - the anchor's), averaged over the group's tasks. Drift: the pre-trained model's "
        f"own greedy answers to held-out generic instructions, mean log-prob per token under the pre-trained "
        f"model minus under the row (nats per token; 0 for pretrained, lower is better). ± is half the 95% "
        f"interval of a paired bootstrap over test items ({boot.get('resamples')} resamples, stratified by task, seed "
        f"{boot.get('seed')}).\n\n{_pairs_text(result)}{markdown_table(result)}\n"
        + (
            f"\n## Against Model Tailor at the same density\n\nPaired-bootstrap difference in H (row - "
            f"model_tailor of the same pair); * = the 95% interval excludes 0.\n\n{comparison}\n"
            if comparison
            else ""
        )
        + (
            f"\n## Against the full fine-tune\n\nThe LoRA pair's rows with the main pair's full fine-tune as "
            f"the target anchor (retention is unchanged: the same pre-trained model).\n\n{against_full}\n"
            if against_full
            else ""
        )
        + (
            f"\n## The multitask pair\n\nEach target task's ratio against its own fine-tune; H is the harmonic "
            f"mean of the retention and every task's ratio (the main table's target ratio is their mean). "
            f"{second_task_checks(result)}\n\n{multitask}\n"
            if multitask
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


def pareto_panels(result: BenchResult) -> dict[str, list[Row]]:
    """The plot's panels: pair -> its rows with both ratios known, pairs in row order."""
    panels: dict[str, list[Row]] = {}
    for r in result.rows:
        if r.retention is not None and r.target_ratio is not None:
            panels.setdefault(r.pair, []).append(r)
    return panels


def plot_pareto(result: BenchResult, path: Path) -> None:
    """One panel per pair: retention (x) against target ratio (y), one point per row, and each method family's
    Pareto frontier (upper-right envelope) as a line, 95% bootstrap intervals as error bars; Model Tailor and
    preserve-aware Model Tailor highlighted, anchors as stars, retraining rows as triangles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = pareto_panels(result) or {"main": []}
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    for ax, (pair, rows) in zip(axes[0], panels.items(), strict=True):
        _panel(ax, rows)
        title = f"TailorBench ({'quick' if result.quick else 'full'}): dotted lines = paper's 99% / 97%"
        ax.set_title(title if len(panels) == 1 else f"pair {pair}: {title.split(': ', 1)[1]}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _panel(ax, rows: list[Row]) -> None:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.method, []).append(r)
    for method, group in sorted(groups.items()):
        _error_bars(ax, group, HIGHLIGHT.get(method, "grey"))
        xs, ys = [r.retention for r in group], [r.target_ratio for r in group]
        front = frontier(list(zip(xs, ys, strict=True)))
        fx, fy = [p[0] for p in front], [p[1] for p in front]
        anchor = group[0].kind == "anchor"
        if anchor:
            ax.scatter(xs, ys, marker="*", s=180, color="black", zorder=7)
        elif method in HIGHLIGHT:
            color = HIGHLIGHT[method]
            ax.scatter(xs, ys, marker="o", s=60, color=color, alpha=0.6, zorder=5)
            ax.plot(fx, fy, "o-", color=color, lw=2.5, ms=9, label=f"{method} (frontier)", zorder=6)
        elif method in MT_METHODS:
            ax.scatter(xs, ys, marker="D", s=50, color="salmon", label=method, zorder=4)
        elif group[0].kind == "retrain":
            ax.scatter(xs, ys, marker="^", s=70, label=f"{method} (retrain)", zorder=5)
        else:
            (line,) = ax.plot(fx, fy, "--", lw=1, alpha=0.8, label=f"{method} (frontier)")
            ax.scatter(xs, ys, marker="s", s=30, alpha=0.8, color=line.get_color())
        for r in group:
            tag = method if anchor else ("" if r.density is None else f"{r.density:g}")
            if method == "model_tailor_preserve":
                tag += _preserve_tag(r.params)
            ax.annotate(tag, (r.retention, r.target_ratio), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(0.99, color="grey", ls=":", lw=1)
    ax.axhline(0.97, color="grey", ls=":", lw=1)
    ax.set_xlabel("original-task retention (vs pre-trained)")
    ax.set_ylabel("target-task ratio (vs the pair's fine-tuned model)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)


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
