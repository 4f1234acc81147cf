"""`model-tailor combine`: merge task patches into one patch file (docs/METHOD.md §12; thin wrapper)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from model_tailor.commands.common import add_overwrite_option
from model_tailor.config import TailorConfig
from model_tailor.errors import ConfigError
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
    r = p.add_argument_group(
        "re-decoration",
        "recompute the kept values on the union mask by the compensation solve against the tasks' joint target "
        "(docs/METHOD.md §12); never reconstructs worse than the plain combination",
    )
    r.add_argument("--redecorate", action="store_true", help="re-decorate with --base, --finetuned, --calibration")
    r.add_argument("--base", metavar="PATH", help="pre-trained model folder the patches were made for")
    r.add_argument("--finetuned", nargs="+", metavar="PATH", help="the tasks' fine-tuned model folders")
    r.add_argument(
        "--calibration", nargs="+", metavar="PATH", help="one calibration JSONL per fine-tune, or one shared by all"
    )
    for flag, kind, default in (("--samples", int, 128), ("--seed", int, 0), ("--percdamp", float, 0.01)):
        r.add_argument(flag, type=kind, default=default, help=f"as for tailor (default {default})")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(func=run)


def _redecoration(args: argparse.Namespace) -> TailorConfig | None:
    """The joint run of ``--redecorate`` (None without it); its flags without it are a usage error."""
    given = [f"--{f}" for f in ("base", "finetuned", "calibration") if getattr(args, f) is not None]
    if not args.redecorate:
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --redecorate; add it or drop them")
        return None
    missing = [f"--{f}" for f in ("base", "finetuned", "calibration") if getattr(args, f) is None]
    if missing:
        raise ConfigError(f"--redecorate needs {', '.join(missing)} (the tasks' checkpoints and calibration data)")
    return TailorConfig.build(
        base=args.base,
        finetuned=args.finetuned,
        calibration=args.calibration,
        samples=args.samples,
        seed=args.seed,
        percdamp=args.percdamp,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    cfg = _redecoration(args)
    inputs: dict[str, Any] = {f"--patch {i + 1}": p for i, p in enumerate(args.patch)}
    if cfg is not None:  # the pipeline (transformers) is imported only when it runs
        from model_tailor.pipeline.outputs import check_inputs

        inputs.update(check_inputs(cfg))
    check_outputs([Output("--out", out)], inputs, overwrite=args.overwrite)
    patches = [load_patch(p) for p in args.patch]
    combined, report = combine_patches(patches, policy=args.policy, weights=args.weights, force=args.force)
    if cfg is not None:
        from model_tailor.pipeline.redecorate import redecorate_patch

        combined = redecorate_patch(combined, cfg)
    with lock_outputs([out]):
        save_patch(combined, out)
    width = max((len(n) for n in report.per_tensor), default=6)
    print(f"{'tensor':<{width}}  {'union':>10}  {'overlap':>10}  {'fraction':>8}")
    for name, o in report.per_tensor.items():
        print(f"{name:<{width}}  {o.union:>10}  {o.overlap:>10}  {o.fraction:>8.2%}")
    print(f"{'total':<{width}}  {report.union:>10}  {report.overlap:>10}  {report.fraction:>8.2%}")
    done = " and re-decorated them with the tasks' calibration data" if cfg is not None else ""
    print(f"combined {len(patches)} patches with {report.policy}{done} -> {out}")
    return 0
