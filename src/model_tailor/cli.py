"""Command-line interface: parse, build a config, call the library, map errors to exit codes.

Each subcommand lives in ``model_tailor.commands.<name>`` and exposes ``add_parser(subparsers)`` and
``run(args) -> int``. This module holds no maths.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from model_tailor import __version__
from model_tailor.errors import ModelTailorError

COMMANDS = ("tailor", "apply", "remove", "combine", "inspect", "baseline", "bench", "list")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-tailor",
        description="Repair catastrophic forgetting: graft a small compensated patch of fine-tuned weights onto base.",
    )
    parser.add_argument("--version", action="version", version=f"model-tailor {__version__}")
    parser.add_argument("--debug", action="store_true", help="re-raise errors with a traceback")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except ModelTailorError as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())
        print(f"model-tailor {args.command}: error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"model-tailor {args.command}: interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
