"""The CLI's error contract across subcommands: usage errors, the last resort, Ctrl-C and ``--overwrite``.

Every failure is exactly one stderr line and a known exit code, and nothing is written.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

import model_tailor.cli as cli
from model_tailor.cli import build_parser, main
from model_tailor.commands.common import OVERWRITE_HELP
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.patch.fingerprint import fingerprint
from model_tailor.patch.format import save_patch
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch

NAME = "model.layers.0.mlp.up_proj.weight"
WRITERS = ("tailor", "apply", "remove", "combine", "baseline")


def _one_line(capsys, argv, prefix):
    """Run the CLI; return (exit code, the one stderr line) and assert nothing went to stdout."""
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prefix}: error: ") or lines[0].startswith(f"{prefix}: interrupted"), lines[0]
    assert captured.out == ""
    return rc, lines[0]


@pytest.mark.parametrize(
    ("argv", "prefix", "match"),
    [
        ([], "model-tailor", "the following arguments are required: COMMAND"),
        (["tialor"], "model-tailor", "invalid choice: 'tialor'"),
        (["tailor", "--density", "abc"], "model-tailor tailor", "invalid float value: 'abc'"),
        (["apply", "--base", "b", "--patch", "p"], "model-tailor apply", "required: --out"),
        (["remove", "--model", "m", "--patch", "p", "--out", "o", "--weights", "x"], "model-tailor remove", "'x'"),
        (["combine", "--out", "c.safetensors"], "model-tailor combine", "required: --patch"),
        (["inspect"], "model-tailor inspect", "required: file"),
        (
            ["baseline", "--method", "nope", "--base", "b", "--finetuned", "f", "--out", "o"],
            "model-tailor baseline",
            "invalid choice: 'nope'",
        ),
        (["bench", "--out", "o", "--threads", "two"], "model-tailor bench", "invalid int value: 'two'"),
        (["list", "--jsn"], "model-tailor list", "unrecognized arguments: --jsn"),
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, prefix, match):
    monkeypatch.chdir(tmp_path)
    rc, line = _one_line(capsys, argv, prefix)
    assert rc == 2 and match in line, line
    assert list(tmp_path.iterdir()) == []


def test_help_and_version_exit_0(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("model-tailor ")
    assert main(["tailor", "--help"]) == 0
    assert "--non-target-policy" in capsys.readouterr().out


def test_unexpected_exception_is_one_line_naming_its_type(tmp_path, monkeypatch, capsys):
    def broken(path):
        raise RuntimeError(f"cannot map {path}\nsecond line")

    monkeypatch.setattr("model_tailor.commands.inspect.load_patch", broken)
    rc, line = _one_line(capsys, ["inspect", "x.safetensors"], "model-tailor inspect")
    assert rc == 1
    assert line == (
        "model-tailor inspect: error: RuntimeError: cannot map x.safetensors second line "
        "(run with --debug for the traceback)"
    )
    with pytest.raises(RuntimeError, match="cannot map"):
        main(["--debug", "inspect", "x.safetensors"])


@pytest.mark.parametrize("where", ["start-up", "command"])
def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys, where):
    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    if where == "start-up":  # Ctrl-C while the parser and the command modules are being imported
        monkeypatch.setattr(cli, "build_parser", interrupt)
    else:
        monkeypatch.setattr("model_tailor.commands.list.run", interrupt)
    rc, line = _one_line(capsys, ["list"], "model-tailor list")
    assert rc == 130 and "interrupted" in line


def test_non_exception_error_is_one_line(monkeypatch, capsys):
    """A BaseException that is not an Exception (pyo3's PanicException, raised when Ctrl-C lands inside
    pydantic_core's import) is still one line, exit 1."""

    class Panic(BaseException):
        pass

    def panic(*_args, **_kwargs):
        raise Panic("failed to import `datetime` C API")

    monkeypatch.setattr(cli, "build_parser", panic)
    rc, line = _one_line(capsys, ["list"], "model-tailor list")
    assert rc == 1 and line == (
        "model-tailor list: error: Panic: failed to import `datetime` C API (run with --debug for the traceback)"
    )


_STARTUP = """
import os, signal, sys
import model_tailor.__main__ as entry
if sys.argv[1] == "during-start-up":
    os.kill(os.getpid(), signal.SIGINT)  # the console script has imported the entry, not the CLI yet
    signal.pause()
import model_tailor.cli as cli
cli.main = lambda: print(signal.getsignal(signal.SIGINT) is signal.default_int_handler) or 0
sys.exit(entry.run())
"""


@pytest.mark.parametrize("when", ["during-start-up", "handed-to-main"])
def test_entry_point_start_up_handler(when):
    """Ctrl-C between the entry point's first line and ``main`` is the one line, exit 130 (no traceback); ``run``
    gives Python's own handler back to ``main``, which turns KeyboardInterrupt into its message."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _STARTUP, when], capture_output=True, text=True, timeout=60)
    if when == "during-start-up":
        assert (done.returncode, done.stdout) == (130, "")
        assert done.stderr == "model-tailor: interrupted during start-up; nothing was written\n"
    else:
        assert (done.returncode, done.stdout, done.stderr) == (0, "True\n", "")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_overwrite_is_one_flag_with_one_help_on_every_writer():
    parsers = _subparsers()
    for name in WRITERS:
        action = parsers[name]._option_string_actions["--overwrite"]
        assert action.help == OVERWRITE_HELP and action.nargs == 0, name
    for name in ("apply", "remove", "combine"):
        assert parsers[name]._option_string_actions["--force"].help != OVERWRITE_HELP


@pytest.fixture
def patched(tmp_path):
    """A one-tensor base checkpoint and a patch adding +1 to every entry of its first row."""
    base = {NAME: torch.zeros(4, 3), "model.norm.weight": torch.ones(3)}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    keep = torch.zeros(4, 3, dtype=torch.bool)
    keep[0] = True
    meta = PatchMetadata(base_dtypes={NAME: "float32"}, base_fingerprint=fingerprint(base, content_names=[NAME]))
    patch = SparsePatch({NAME: TensorPatch.from_dense(NAME, torch.ones(4, 3), keep)}, meta)
    return tmp_path, save_patch(patch, tmp_path / "p.safetensors")


def test_apply_and_remove_overwrite_replace_an_existing_folder(patched, capsys):
    tmp, patch = patched
    out = tmp / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["apply", "--base", str(tmp / "base"), "--patch", str(patch), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "old.txt").exists()
    with CheckpointReader(out) as reader:
        assert reader.get(NAME)[0].tolist() == [1.0, 1.0, 1.0] and reader.get(NAME)[1:].abs().sum() == 0
    back = tmp / "back"
    back.mkdir()
    argv = ["remove", "--model", str(out), "--patch", str(patch), "--out", str(back), "--overwrite"]
    assert main(argv) == 0
    with CheckpointReader(back) as reader:
        assert reader.get(NAME).abs().sum() == 0


def test_overwrite_never_replaces_the_input(patched, capsys):
    tmp, patch = patched
    before = (tmp / "base" / "model.safetensors").read_bytes()
    argv = ["apply", "--base", str(tmp / "base"), "--patch", str(patch), "--out", str(tmp / "base"), "--overwrite"]
    rc, line = _one_line(capsys, argv, "model-tailor apply")
    assert rc == 1 and "is the input" in line
    assert sorted(p.name for p in (tmp / "base").iterdir()) == ["model.safetensors"]
    assert (tmp / "base" / "model.safetensors").read_bytes() == before
