"""`model-tailor export`: write a patch in another format (``peft``: an adapter stock PEFT loads)."""

from __future__ import annotations

import argparse

from model_tailor.commands.common import add_overwrite_option
from model_tailor.patch.export import PEFT_TYPES, export_peft


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a patch as a PEFT adapter",
        description="Write PATCH as an adapter folder that peft.PeftModel.from_pretrained(base_model, OUT) loads "
        "and that reproduces `model-tailor apply`'s model (needs the peft extra).",
    )
    p.add_argument("patch", metavar="PATCH", help="patch file")
    p.add_argument("--base", required=True, help="base checkpoint folder the patch was made for")
    p.add_argument("--format", required=True, choices=("peft",), help="output format")
    p.add_argument("--out", required=True, help="adapter folder to write (must not exist unless --overwrite)")
    p.add_argument(
        "--peft-type",
        default="auto",
        choices=PEFT_TYPES,
        help="auto: SHiRA for a pure-sparse patch when it fits, else LoRA; lora: sparse parts as exact "
        "row-selection factors; shira: sparse Linear deltas only (default: auto)",
    )
    p.add_argument("--force", action="store_true", help="export even if the patch was made for another base")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = export_peft(
        args.patch, args.base, args.out, peft_type=args.peft_type, force=args.force, overwrite=args.overwrite
    )
    sizes = result.ranks or result.entries
    what = "LoRA rank" if result.ranks else f"SHiRA r={result.shira_r}, sparse entries"
    print(
        f"exported {len(sizes)} adapted module(s) ({what} {min(sizes.values())}-{max(sizes.values())}), "
        f"{len(result.modules_to_save)} stored whole -> {result.out_dir} (peft_type {result.peft_type})"
    )
    return 0
