"""`model-tailor remove` (placeholder until its issue lands; replaced by the real command)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("remove", help="(not yet available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("model-tailor remove: not yet available")
