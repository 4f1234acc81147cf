"""Shared helpers of the ``model-tailor tailor`` CLI tests: the base argv and the failure contract."""

from __future__ import annotations

from model_tailor.cli import main


def tailor_args(pair, out_dir, *extra):
    """A valid ``tailor`` argv on a pico pair writing into ``out_dir``, plus ``extra`` flags."""
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


def expect_failure(capsys, argv, out_dir, code, match):
    """Run the CLI; assert exit ``code``, exactly one stderr line containing ``match``, nothing written."""
    before = sorted(p.name for p in out_dir.iterdir())
    capsys.readouterr()  # drop what building the fixtures printed; only the command's own output counts
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert len(err) == 1 and err[0].startswith("model-tailor tailor: error: "), err
    assert match in err[0], err[0]
    assert sorted(p.name for p in out_dir.iterdir()) == before, "something was written"
    return err[0]
