"""``python -m model_tailor`` and the ``model-tailor`` script: the CLI, with Ctrl-C during start-up as one line.

Until :func:`model_tailor.cli.main` runs, Python turns SIGINT into a ``KeyboardInterrupt`` traceback from
whichever module is being imported. This file installs its own handler first, from the C module ``_signal``
(``signal`` would import ``enum`` first, about 10 ms), so that a Ctrl-C during start-up prints the CLI's one line
and exits 130 without a traceback; ``run`` puts Python's handler back just before ``main``, which catches
``KeyboardInterrupt`` itself. Only the entry point imports this module, so a library user's handlers are untouched.
"""

from __future__ import annotations

import _signal
import os
import sys


def _interrupted(signum: int, frame: object) -> None:
    os.write(2, b"model-tailor: interrupted during start-up; nothing was written\n")
    os._exit(130)


_signal.signal(_signal.SIGINT, _interrupted)


def run() -> int:
    """The console script's entry: import the CLI under the start-up handler, then run it."""
    from model_tailor.cli import main

    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    return main()


if __name__ == "__main__":
    sys.exit(run())
