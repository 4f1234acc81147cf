"""What every command checks before it writes: no output destroys an input, no existing output is replaced
unasked, one run writes an output at a time, and temporaries a killed run left beside it are cleaned.

Paths are compared after ``os.path.realpath``, so a symlink to an input is that input. The lock is a file
``.<name>.lock`` beside the output, created with ``O_EXCL`` and holding the writer's pid, host and start time;
a lock whose process is gone (same host) is taken over with a note. Only temporary names this tool creates for
that output (``.<name>.XXXXXXXX.tmp`` from ``tempfile`` and ``.<name>.old`` of an overwrite) are cleaned, and
only while the lock is held.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from model_tailor.errors import CheckpointError, OutputError

logger = logging.getLogger(__name__)

__all__ = ["Output", "check_outputs", "clean_temps", "lock_outputs", "refuse_remote_code", "resolved"]

_UNREADABLE_LOCK_GRACE_S = 10.0  # a lock file still empty after this long belongs to a process killed at birth


@dataclass(frozen=True)
class Output:
    """One path a command will write: ``label`` names it in messages (``--out``, ``report``)."""

    label: str
    path: Path
    kind: Literal["file", "dir"] = "file"


def resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_one(out: Output, inputs: Mapping[str, Path], overwrite: bool, ours: Collection[Path]) -> None:
    real = resolved(out.path)
    name = f"{out.label} {str(out.path)!r}"
    for parent in real.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{name} is under {str(parent)!r}, a regular file; choose a path in a folder")
    for label, inp in inputs.items():
        r_in = resolved(inp)
        if real == r_in:
            raise OutputError(f"{name} is the input {label} itself; choose another path (inputs are never replaced)")
        if _within(real, r_in):
            raise OutputError(f"{name} is inside the {label} input {str(inp)!r}; write outside the inputs")
        if _within(r_in, real):
            raise OutputError(f"{name} contains the {label} input {str(inp)!r}; write outside the inputs")
    if not real.exists():
        return
    if out.kind == "file" and real.is_dir():
        raise OutputError(f"{name} is an existing folder; pass a file path")
    if out.kind == "dir" and not real.is_dir():
        raise OutputError(f"{name} is an existing file; pass a folder path")
    if not overwrite and real not in ours:
        raise OutputError(f"{name} already exists; choose a new path, remove it, or pass --overwrite")


def check_outputs(
    outputs: Sequence[Output],
    inputs: Mapping[str, str | os.PathLike[str] | None],
    *,
    overwrite: bool,
    ours: Collection[str | os.PathLike[str]] = (),
) -> None:
    """Refuse, with one line, an output that is, is inside or contains an input, sits under a regular file,
    is a folder where a file is written (or the reverse), repeats another output, or exists (unless
    ``overwrite``, or it is in ``ours``: outputs an interrupted commit of the same run left).

    Raises:
        OutputError: the first problem found.
    """
    ins = {label: Path(p) for label, p in inputs.items() if p is not None}
    mine = {resolved(p) for p in ours}
    seen: dict[Path, str] = {}
    for out in outputs:
        real = resolved(out.path)
        if real in seen:
            raise OutputError(f"{out.label} and {seen[real]} are the same path {str(out.path)!r}; give each its own")
        seen[real] = out.label
        _check_one(out, ins, overwrite, mine)


# -- lock ---------------------------------------------------------------------------------------------------


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _holder(file: Path) -> dict | None:
    try:
        info = json.loads(file.read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _stale(file: Path, info: dict | None) -> bool:
    if info is None:  # empty or torn: its writer died between create and write, unless it is writing now
        try:
            return time.time() - file.stat().st_mtime > _UNREADABLE_LOCK_GRACE_S
        except FileNotFoundError:
            return True
    return info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)))


@contextmanager
def output_lock(path: Path) -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``path`` for the block; a live holder is a one-line :class:`OutputError`."""
    file = lock_path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for attempt in range(2):
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _holder(file)
            if attempt == 0 and _stale(file, info):
                logger.warning("taking over the stale lock %s (%s is gone)", file, info or "its writer")
                file.unlink(missing_ok=True)
                continue
            who = f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}" if info else "another run"
            raise OutputError(
                f"{str(path)!r} is being written by {who} (lock {str(file)!r}); wait for it, or remove the lock "
                "if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    try:
        yield file
    finally:
        if (_holder(file) or {}).get("pid") == me["pid"]:
            file.unlink(missing_ok=True)


@contextmanager
def lock_outputs(paths: Sequence[Path], *, also_clean: Sequence[Path] = ()) -> Iterator[None]:
    """Lock every path (sorted, de-duplicated), then clean the temporaries killed runs left beside each of
    them and of ``also_clean`` (side files written under the same lock)."""
    with ExitStack() as stack:
        for path in sorted({resolved(p) for p in paths}):
            stack.enter_context(output_lock(path))
        for path in {*paths, *also_clean}:
            clean_temps(path)
        yield


def clean_temps(path: Path) -> int:
    """Remove ``.<name>.XXXXXXXX.tmp`` files/folders and ``.<name>.old`` beside ``path``; returns bytes freed.

    Call it only while holding the output's lock: then no live run of this tool is writing them.
    """
    folder = Path(path).parent
    if not folder.is_dir():
        return 0
    pattern = re.compile(rf"^\.{re.escape(Path(path).name)}\.(?:[a-z0-9_]{{8}}\.tmp|old)$")
    freed = 0
    for entry in folder.iterdir():
        if not pattern.match(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            shutil.rmtree(entry, ignore_errors=True)
        else:
            freed += entry.lstat().st_size
            entry.unlink(missing_ok=True)
        logger.warning("removed %s, left by an interrupted run", entry)
    return freed


# -- checkpoint code ----------------------------------------------------------------------------------------


def refuse_remote_code(folder: str | os.PathLike[str]) -> None:
    """Refuse a checkpoint whose config files name Python code of its own (``auto_map``): it is never run.

    Raises:
        CheckpointError: a ``*config*.json`` of ``folder`` carries ``auto_map``.
    """
    root = Path(folder)
    if not root.is_dir():
        return
    for file in sorted(root.glob("*config*.json")):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable configs fail where they are read, with their own message
        if isinstance(data, dict) and "auto_map" in data:
            raise CheckpointError(
                f"{file}: 'auto_map' asks to run the checkpoint's own Python code, which model-tailor never does; "
                "use an architecture that transformers ships"
            )
