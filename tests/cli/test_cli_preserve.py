"""`model-tailor tailor --preserve ...` error paths: one stderr line, a non-zero exit, nothing written."""

from __future__ import annotations

import pytest
from tailor_cli import expect_failure, tailor_args


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_missing_preserve_file(pico, tmp_path, out, capsys):
    argv = tailor_args(pico("llama"), out, "--preserve", str(tmp_path / "nope.jsonl"))
    expect_failure(capsys, argv, out, 1, "preserve file")


def test_malformed_preserve_file_names_the_line(pico, tmp_path, out, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "the cat"}\n{"text": "the dog"\n')
    expect_failure(capsys, tailor_args(pico("llama"), out, "--preserve", str(bad)), out, 1, "p.jsonl:2: not valid JSON")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (("--preserve", "self", "--preserve-weight", "-1"), "preserve_weight"),
        (("--preserve", "self", "--alpha", "1", "--compensation", "none"), "preserve needs"),
        (("--structure", "lowrank", "--granularity", "global"), "granularity 'global'"),
    ],
)
def test_invalid_options(pico, out, capsys, flags, match):
    expect_failure(capsys, tailor_args(pico("llama"), out, *flags), out, 2, match)


def test_unknown_structure(pico, out, capsys):
    expect_failure(
        capsys, tailor_args(pico("llama"), out, "--structure", "dense"), out, 2, "--structure: invalid choice: 'dense'"
    )
