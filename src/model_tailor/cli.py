"""Command-line interface: parse, build a config, call the library, map errors to exit codes.

Each subcommand lives in ``model_tailor.commands.<name>`` and exposes ``add_parser(subparsers)`` and
``run(args) -> int``. This module holds no maths. The error contract: every failure prints exactly one stderr
line ``model-tailor <command>: error: ...`` and exits non-zero (2 for usage and config errors, 1 for the
rest, 130 on Ctrl-C, from the first import on); ``--debug`` re-raises with the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

COMMANDS = ("tailor", "apply", "remove", "combine", "inspect", "export", "baseline", "bench", "list")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (argparse prints the whole usage block first).

    ``add_subparsers`` makes its subparsers of the parser's own class, so every subcommand inherits this.
    """

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")


def build_parser() -> OneLineParser:
    from model_tailor import __version__

    parser = OneLineParser(
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


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; stray arguments are reported by their subcommand, so the error names it."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _guess_command(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv`` (for messages before parsing has finished), or ``""``."""
    return next((f" {a}" for a in argv if a in COMMANDS), "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog, debug = f"model-tailor{_guess_command(argv)}", "--debug" in argv
    try:
        try:
            args = _parse(argv)
        except SystemExit as stop:  # --help, --version and usage errors (already printed)
            return stop.code if isinstance(stop.code, int) else 2
        prog, debug = f"model-tailor {args.command}", args.debug
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # also non-Exception errors, e.g. pyo3's PanicException when Ctrl-C lands in an import
        if debug:
            raise
        return _report(prog, err)


def _report(prog: str, err: BaseException) -> int:
    """Print ``err`` as one line; a :class:`ModelTailorError` is expected, anything else names its type."""
    from model_tailor.errors import ModelTailorError

    message = " ".join(str(err).split())
    if isinstance(err, ModelTailorError):
        print(f"{prog}: error: {message}", file=sys.stderr)
        return err.exit_code
    print(f"{prog}: error: {type(err).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
