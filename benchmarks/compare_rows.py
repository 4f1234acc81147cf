"""Paired comparisons between any two TailorBench rows, from a results folder's stored per-item outcomes.

``results.md`` compares every row with ``model_tailor`` at the same density only. A claim such as "A beats B"
needs A against B itself, on the same resampled items: this script re-runs the paired stratified bootstrap
(``bench.stats.bootstrap``, the bench's own, same resamples and seed by default) over one pair's rows and prints,
for each requested pair of rows, the difference in retention, target ratio and H with its 95% interval, starred
where the interval excludes 0 (and in drift, where the rows carry the drift probe). The multitask pair's rows
measure each target task against its own fine-tune, as the bench does (``Row.multitask``'s anchors). Nothing is
evaluated again; it reads ``results.json`` and ``items/``.

    python benchmarks/compare_rows.py DIR                      # every row of the main pair against every other
    python benchmarks/compare_rows.py DIR --rows 'model_tailor_preserve*self*lowrank*' magnitude@0.1 lora_r16
    python benchmarks/compare_rows.py DIR --out comparisons.json

Rows are named by label (``method@density[params]``, as the bench prints them) and picked by globs.
"""

from __future__ import annotations

import argparse
import itertools
import json
from fnmatch import fnmatch
from pathlib import Path

from model_tailor.bench import stats
from model_tailor.bench.analysis import item_matrices

METRICS = ("retention", "target_ratio", "h_score")


def label(row: dict) -> str:
    """``method@density[params]`` (engine left out), as ``bench.methods.MethodSpec.label`` spells it."""
    extra = ",".join(f"{k}={v}" for k, v in sorted(row["params"].items()) if k != "engine")
    dens = "" if row["density"] is None else f"@{row['density']:g}"
    return f"{row['method']}{dens}" + (f"[{extra}]" if extra else "")


class _Items:
    """What ``analysis.item_matrices`` reads of a row: its per-item file's path."""

    def __init__(self, row: dict) -> None:
        self.items = row["items"]


def compare(folder: Path, pair: str, globs: list[str], resamples: int, seed: int) -> list[dict]:
    """Paired differences ``a - b`` for every two distinct picked rows of ``pair`` (a before b in table order)."""
    data = json.loads((folder / "results.json").read_text())
    rows = [r for r in data["rows"] if r.get("pair", "main") == pair]
    if not rows:
        raise SystemExit(f"{folder}/results.json has no row of pair {pair!r}")
    names = [label(r) for r in rows]
    files = {r["items"]: json.loads((folder / r["items"]).read_text()) for r in rows}
    items = [_Items(r) for r in rows]
    pre = names.index("pretrained")
    anchors = (rows[0].get("multitask") or {}).get("anchors")
    if anchors:  # each target task against its own fine-tune: {"addition": "multitask:finetuned_addition"}
        ft: int | dict[str, int] = {t: names.index(a.split(":", 1)[1]) for t, a in anchors.items()}
    else:
        ft = next(i for i, r in enumerate(rows) if r["kind"] == "anchor" and r["method"] != "pretrained")
    original, target = tuple(rows[0]["original"]), tuple(rows[0]["target"])
    logprob = item_matrices(items, files, "logprob")
    result = stats.bootstrap(
        item_matrices(items, files, "hit"),
        logprob,
        pre,
        ft,
        original,
        target,
        probe=tuple(t for t in logprob if t not in original and t not in target),
        resamples=resamples,
        seed=seed,
    )
    metrics = [m for m in (*METRICS, stats.DRIFT) if m in result.points]
    picked = [i for i, n in enumerate(names) if not globs or any(fnmatch(n, g) for g in globs)]
    picked = [i for i in picked if i not in (pre, ft) or globs]
    out = []
    for a, b in itertools.combinations(picked, 2):
        entry = {"a": names[a], "b": names[b]}
        for m in metrics:
            entry[m] = result.difference(m, a, b)
        out.append(entry)
    return out


def _cell(d: dict | None) -> str:
    if d is None:
        return "n/a"
    lo, hi = d["interval"]
    return f"{d['delta']:+.3f}{' *' if d['excludes_zero'] else ''} [{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a model-tailor bench --out folder (results.json + items/)")
    ap.add_argument("--pair", default="main", help="compare rows of this pair (default main)")
    ap.add_argument("--rows", nargs="*", default=[], metavar="GLOB", help="row labels to compare (default all)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the comparisons as JSON")
    args = ap.parse_args()
    rows = compare(args.folder, args.pair, args.rows, args.resamples, args.seed)
    shown = [m for m in (*METRICS, stats.DRIFT) if rows and m in rows[0]]
    print("| a | b | " + " | ".join(f"Δ {m.replace('_', ' ').replace('h score', 'H')}" for m in shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for r in rows:
        print(f"| {r['a']} | {r['b']} | " + " | ".join(_cell(r[m]) for m in shown) + " |")
    print(f"\n95% intervals of a paired bootstrap ({args.resamples} resamples, seed {args.seed}); * excludes 0.")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
