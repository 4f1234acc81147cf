"""Error hierarchy: every failure a user can cause is a ``ModelTailorError`` with a one-line message.

Messages name the offending parameter or file, what was expected, what was found, and the fix.
The CLI prints ``str(error)`` on one line and exits non-zero.
"""

from __future__ import annotations


class ModelTailorError(Exception):
    """Root of all errors the library raises on bad input or failed numerics."""

    exit_code: int = 1


class ConfigError(ModelTailorError, ValueError):
    """Invalid option or combination of options (exit code 2, a usage error)."""

    exit_code = 2


class CheckpointError(ModelTailorError):
    """A checkpoint cannot be read, or base and fine-tuned do not match."""


class ShapeMismatchError(CheckpointError, ValueError):
    """Two tensors that must agree in shape or dtype do not."""


class PatchFormatError(ModelTailorError, ValueError):
    """A patch file is corrupt, of an unknown version, or made for another base."""


class CalibrationError(ModelTailorError, ValueError):
    """Calibration or preserve data is missing, empty or malformed."""


class OutputError(CheckpointError):
    """An output path would destroy an input, already exists, or is being written by another run."""


class NumericalError(ModelTailorError, ArithmeticError):
    """A factorisation failed after all retries, or a tensor holds NaN/Inf."""

    def __init__(self, message: str, *, layer: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer


class RankError(ModelTailorError):
    """Another process of a multi-process run (``torchrun``) failed; carries its message and exit code, so every
    process stops with the same line."""

    def __init__(self, rank: int, message: str, exit_code: int = 1) -> None:
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank
        self.exit_code = exit_code
