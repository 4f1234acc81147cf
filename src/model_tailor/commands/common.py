"""Flags several subcommands share, so each is spelled and explained once."""

from __future__ import annotations

import argparse

__all__ = ["OVERWRITE_HELP", "add_overwrite_option"]

OVERWRITE_HELP = (
    "replace an existing output (the new one is written beside it and renamed into place only once complete)"
)


def add_overwrite_option(p: argparse.ArgumentParser, *, default: bool | None = False) -> None:
    """``--overwrite``: the one name, on every command that writes an output, for replacing what is there.

    ``default=None`` (``tailor``) means "not given", so a ``--config`` file's ``overwrite`` is not overridden.
    """
    p.add_argument("--overwrite", action="store_true", default=default, help=OVERWRITE_HELP)
