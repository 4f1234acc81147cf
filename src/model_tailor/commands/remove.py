"""`model-tailor remove`: restore the base from a patched checkpoint (thin wrapper, ``remove_patches``)."""

from __future__ import annotations

import argparse

from model_tailor.commands.apply import add_output_options
from model_tailor.patch.apply import remove_patches


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "remove",
        help="subtract patches from a patched checkpoint, restoring the base",
        description="Pass the same patches, --policy and --weights as to `apply`.",
    )
    p.add_argument("--model", required=True, help="patched checkpoint folder or .safetensors file")
    p.add_argument("--patch", required=True, nargs="+", metavar="FILE", help="patch file(s) that were applied")
    add_output_options(p, force_help="remove even if the model's tensors do not match")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = remove_patches(
        args.model,
        args.patch,
        args.out,
        force=args.force,
        policy=args.policy,
        weights=args.weights,
        max_shard_bytes=args.max_shard_bytes,
        overwrite=args.overwrite,
    )
    print(f"removed {len(args.patch)} patch(es) from {len(result.patched)} tensor(s) -> {result.out_dir}")
    if result.mismatched:
        print(f"note: {len(result.mismatched)} tensor(s) differ from the recorded base bytes (fp32 rounding)")
    return 0
