"""`model-tailor apply`: write base + patch delta(s) as a new checkpoint (thin wrapper, ``apply_patches``)."""

from __future__ import annotations

import argparse

from model_tailor.commands.common import add_overwrite_option
from model_tailor.options import DEFAULT_MAX_SHARD_BYTES
from model_tailor.patch.apply import apply_patches


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="graft one or more patches onto a base checkpoint",
        description="Stream the base, add the (combined) patch deltas, write a new checkpoint folder.",
    )
    p.add_argument("--base", required=True, help="base checkpoint folder or .safetensors file")
    p.add_argument("--patch", required=True, nargs="+", metavar="FILE", help="patch file(s)")
    add_output_options(p, force_help="apply even if the patch was made for another base")
    p.set_defaults(func=run)


def add_output_options(p: argparse.ArgumentParser, *, force_help: str) -> None:
    """The flags ``apply`` and ``remove`` share: they must agree, since ``remove`` undoes ``apply``."""
    p.add_argument("--out", required=True, help="new checkpoint folder (must not exist unless --overwrite)")
    p.add_argument("--policy", default="disjoint-mean", help="combine policy for several patches (see `list`)")
    p.add_argument("--weights", type=float, nargs="+", help="per-patch scale of each delta")
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES, help="output shard size")
    add_overwrite_option(p)


def run(args: argparse.Namespace) -> int:
    result = apply_patches(
        args.base,
        args.patch,
        args.out,
        force=args.force,
        policy=args.policy,
        weights=args.weights,
        max_shard_bytes=args.max_shard_bytes,
        overwrite=args.overwrite,
    )
    print(f"applied {len(args.patch)} patch(es) to {len(result.patched)} tensor(s) -> {result.out_dir}")
    if result.combine_report is not None:
        r = result.combine_report
        print(f"combined with {r.policy}: {r.overlap} of {r.union} entries overlap ({r.fraction:.2%})")
    return 0
