"""`model-tailor inspect` (placeholder until its issue lands; replaced by the real command)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="(not yet available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("model-tailor inspect: not yet available")
