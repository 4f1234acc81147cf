"""`model-tailor combine`: merge task patches into one patch file (docs/METHOD.md §12; thin wrapper)."""

from __future__ import annotations

import argparse
from pathlib import Path

from model_tailor.commands.common import add_overwrite_option
from model_tailor.io.safety import Output, check_outputs, lock_outputs
from model_tailor.patch.combine import combine_patches
from model_tailor.patch.format import load_patch, save_patch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "combine",
        help="combine task patches made against the same base",
        description="Policies: disjoint-mean (default), sum, mean, priority, ties (see `model-tailor list`).",
    )
    p.add_argument("--patch", required=True, nargs="+", metavar="FILE", help="patch files, in priority order")
    p.add_argument("--policy", default="disjoint-mean", help="combine policy (default disjoint-mean)")
    p.add_argument("--weights", type=float, nargs="+", help="per-patch scale of each delta")
    p.add_argument("--out", required=True, help="combined patch file")
    p.add_argument("--force", action="store_true", help="combine patches made for different bases")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    inputs = {f"--patch {i + 1}": p for i, p in enumerate(args.patch)}
    check_outputs([Output("--out", out)], inputs, overwrite=args.overwrite)
    patches = [load_patch(p) for p in args.patch]
    combined, report = combine_patches(patches, policy=args.policy, weights=args.weights, force=args.force)
    with lock_outputs([out]):
        save_patch(combined, out)
    width = max((len(n) for n in report.per_tensor), default=6)
    print(f"{'tensor':<{width}}  {'union':>10}  {'overlap':>10}  {'fraction':>8}")
    for name, o in report.per_tensor.items():
        print(f"{name:<{width}}  {o.union:>10}  {o.overlap:>10}  {o.fraction:>8.2%}")
    print(f"{'total':<{width}}  {report.union:>10}  {report.overlap:>10}  {report.fraction:>8.2%}")
    print(f"combined {len(patches)} patches with {report.policy} -> {out}")
    return 0
