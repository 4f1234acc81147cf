"""`model-tailor tailor --preserve ...` error paths: one stderr line, a non-zero exit, nothing written."""

from __future__ import annotations

import pytest

from model_tailor.cli import main


def _argv(pair, out_dir, *extra):
    return [
        "tailor",
        "--base",
        str(pair.base),
        "--finetuned",
        str(pair.finetuned),
        "--calibration",
        str(pair.calibration),
        "--out",
        str(out_dir / "p.safetensors"),
        "--quiet",
        "--samples",
        "4",
        *extra,
    ]


def _fails(capsys, argv, out_dir, code, match):
    before = sorted(p.name for p in out_dir.iterdir())
    capsys.readouterr()  # drop what building the fixtures printed
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert len(err) == 1 and err[0].startswith("model-tailor tailor: error: "), err
    assert match in err[0], err[0]
    assert sorted(p.name for p in out_dir.iterdir()) == before, "something was written"


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_missing_preserve_file(pico, tmp_path, out, capsys):
    argv = _argv(pico("llama"), out, "--preserve", str(tmp_path / "nope.jsonl"))
    _fails(capsys, argv, out, 1, "preserve file")


def test_malformed_preserve_file_names_the_line(pico, tmp_path, out, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "the cat"}\n{"text": "the dog"\n')
    _fails(capsys, _argv(pico("llama"), out, "--preserve", str(bad)), out, 1, "p.jsonl:2: not valid JSON")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (("--preserve", "self", "--preserve-weight", "-1"), "preserve_weight"),
        (("--preserve", "self", "--alpha", "1", "--compensation", "none"), "preserve needs"),
        (("--structure", "lowrank", "--granularity", "global"), "granularity 'global'"),
    ],
)
def test_invalid_options(pico, out, capsys, flags, match):
    _fails(capsys, _argv(pico("llama"), out, *flags), out, 2, match)


def test_unknown_structure(pico, out, capsys):
    _fails(capsys, _argv(pico("llama"), out, "--structure", "dense"), out, 2, "structure: Input should be")
