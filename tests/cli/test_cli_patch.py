"""CLI for patches (apply, remove, combine, inspect, list).

Every error path gives a non-zero exit code, exactly one stderr line, and nothing at --out.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from model_tailor.cli import main
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.patch.fingerprint import fingerprint
from model_tailor.patch.format import save_patch
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch

NAME = "model.layers.0.mlp.up_proj.weight"


def _checkpoint(folder, seed: int):
    g = torch.Generator().manual_seed(seed)
    tensors = {NAME: torch.randn(4, 3, generator=g).to(torch.bfloat16), "model.norm.weight": torch.ones(3)}
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return tensors


def _patch(base, seed: int, path, mask_seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(4, 3, generator=torch.Generator().manual_seed(mask_seed)) < 0.5
    delta = (0.1 * torch.randn(4, 3, generator=g)).to(torch.bfloat16).float()
    meta = PatchMetadata(
        base_dtypes={NAME: "bfloat16"},
        base_fingerprint=fingerprint(base, content_names=[NAME]),
        config={"seed": seed},
    )
    return save_patch(SparsePatch({NAME: TensorPatch.from_dense(NAME, delta, keep)}, meta), path)


@pytest.fixture
def env(tmp_path):
    base = _checkpoint(tmp_path / "base", 0)
    _checkpoint(tmp_path / "other", 1)
    p1 = _patch(base, 1, tmp_path / "p1.safetensors", mask_seed=1)
    p2 = _patch(base, 2, tmp_path / "p2.safetensors", mask_seed=2)
    return tmp_path, p1, p2


def _fails(capsys, argv, out, code=None):
    """Run the CLI; assert failure, one stderr line and no new file at (or beside) ``out``."""
    before = sorted(p.name for p in out.parent.iterdir())
    existed = out.exists()
    snapshot = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    capsys.readouterr()  # only the command's own output counts
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and (code is None or rc == code)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"model-tailor {argv[0]}: error: ")
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no temp files left beside --out
    assert out.exists() == existed
    if snapshot is not None:
        assert sorted(p.name for p in out.iterdir()) == snapshot
    return err


def test_apply_then_remove_succeeds(env, capsys):
    tmp, p1, _ = env
    assert main(["apply", "--base", str(tmp / "base"), "--patch", str(p1), "--out", str(tmp / "out")]) == 0
    assert "applied 1 patch(es)" in capsys.readouterr().out
    assert main(["remove", "--model", str(tmp / "out"), "--patch", str(p1), "--out", str(tmp / "back")]) == 0
    with CheckpointReader(tmp / "back") as back, CheckpointReader(tmp / "base") as base:
        assert all(torch.equal(back.get(n), base.get(n)) for n in base.names())


def test_apply_error_paths(env, capsys):
    tmp, p1, p2 = env
    out = tmp / "out"
    base = ["apply", "--base", str(tmp / "base"), "--out", str(out), "--patch"]
    _fails(capsys, [*base, str(tmp / "missing.safetensors")], out, code=1)
    (tmp / "garbage.safetensors").write_bytes(b"\x00" * 3)
    assert "not a safetensors file" in _fails(capsys, [*base, str(tmp / "garbage.safetensors")], out)
    (tmp / "cut.safetensors").write_bytes(p1.read_bytes()[:-5])
    assert "truncated" in _fails(capsys, [*base, str(tmp / "cut.safetensors")], out)
    future = tmp / "v9.safetensors"
    future.write_bytes(p1.read_bytes().replace(b'"format_version":"1"', b'"format_version":"9"'))
    assert "format version 9 is not supported" in _fails(capsys, [*base, str(future)], out)
    assert "unknown combine policy" in _fails(capsys, [*base, str(p1), str(p2), "--policy", "avg"], out, code=2)
    assert "one weight per patch" in _fails(capsys, [*base, str(p1), str(p2), "--weights", "1"], out, code=2)
    missing_base = ["apply", "--base", str(tmp / "nobase"), "--out", str(out), "--patch", str(p1)]
    assert "does not exist" in _fails(capsys, missing_base, out)


def test_apply_refuses_another_base_unless_forced(env, capsys):
    tmp, p1, _ = env
    out = tmp / "out"
    argv = ["apply", "--base", str(tmp / "other"), "--patch", str(p1), "--out", str(out)]
    assert "made for another base" in _fails(capsys, argv, out)
    assert main([*argv, "--force"]) == 0 and (out / "model.safetensors").is_file()


def test_output_exists_is_refused(env, capsys):
    tmp, p1, p2 = env
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    apply = ["apply", "--base", str(tmp / "base"), "--patch", str(p1), "--out", str(out)]
    assert "already exists" in _fails(capsys, apply, out)
    remove = ["remove", "--model", str(tmp / "base"), "--patch", str(p1), "--out", str(out)]
    assert "already exists" in _fails(capsys, remove, out)
    combined = tmp / "c.safetensors"
    combined.write_bytes(b"old")
    assert "already exists" in _fails(
        capsys, ["combine", "--patch", str(p1), str(p2), "--out", str(combined)], combined
    )
    assert combined.read_bytes() == b"old"


def test_remove_error_paths(env, capsys):
    tmp, p1, _ = env
    out = tmp / "back"
    _fails(capsys, ["remove", "--model", str(tmp / "base"), "--patch", str(tmp / "nope"), "--out", str(out)], out)
    wrong = tmp / "wrong"
    wrong.mkdir()
    save_file({NAME: torch.zeros(4, 3)}, str(wrong / "model.safetensors"))  # fp32, no norm: another model
    argv = ["remove", "--model", str(wrong), "--patch", str(p1), "--out", str(out)]
    assert "other tensor names" in _fails(capsys, argv, out)


def test_combine_prints_overlap_and_refuses_mixed_bases(env, capsys):
    tmp, p1, p2 = env
    out = tmp / "c.safetensors"
    assert main(["combine", "--patch", str(p1), str(p2), "--policy", "ties", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert NAME in printed and "overlap" in printed and out.is_file()
    other = _checkpoint(tmp / "third", 5)
    p3 = _patch(other, 3, tmp / "p3.safetensors")
    out2 = tmp / "c2.safetensors"
    argv = ["combine", "--patch", str(p1), str(p3), "--out", str(out2)]
    assert "different base models" in _fails(capsys, argv, out2)
    assert "unknown combine policy" in _fails(capsys, [*argv, "--policy", "nope"], out2, code=2)
    assert main([*argv, "--force"]) == 0 and out2.is_file()


def test_inspect(env, capsys):
    tmp, p1, _ = env
    assert main(["inspect", str(p1)]) == 0
    text = capsys.readouterr().out
    assert "model-tailor-patch v1" in text and NAME in text and "model.layers.0" in text and "dense delta" in text
    assert main(["inspect", str(p1), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == "1" and info["summary"]["per_tensor"][NAME]["numel"] == 12
    assert info["config"] == {"seed": 1}
    missing = tmp / "missing.safetensors"
    assert "does not exist" in _fails(capsys, ["inspect", str(missing)], missing)
    (tmp / "bad.safetensors").write_text("{}")
    _fails(capsys, ["inspect", str(tmp / "bad.safetensors")], tmp / "bad.safetensors")


def test_list_shows_combine_policies(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "disjoint-mean" in out and "https://arxiv.org/abs/2306.01708" in out
    assert main(["list", "--json"]) == 0
    assert "ties" in {e["name"] for e in json.loads(capsys.readouterr().out)["combine policy"]}


def _rewrite_metadata(src, dst, **fields):
    """Copy a patch file with metadata strings replaced (header re-serialised, offsets untouched)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(fields)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    dst.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])
    return dst


def test_corrupt_patch_values_are_refused(env, capsys):
    tmp, p1, _ = env
    raw = bytearray(p1.read_bytes())
    raw[-2] ^= 0x10  # a value byte
    bad = tmp / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    out = tmp / "out"
    argv = ["apply", "--base", str(tmp / "base"), "--patch", str(bad), "--out", str(out)]
    assert "payload checksum" in _fails(capsys, argv, out)
    assert "payload checksum" in _fails(capsys, ["inspect", str(bad)], bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("format_version", "²"),
        ("base_fingerprint", "[1]"),
        ("base_dtypes", "[]"),
        ("versions", '"2.13"'),
        ("reset_params", "7"),
    ],
)
def test_hostile_metadata_is_one_line_not_a_traceback(env, capsys, field, value):
    tmp, p1, _ = env
    bad = _rewrite_metadata(p1, tmp / "bad.safetensors", **{field: value})
    assert field in _fails(capsys, ["inspect", str(bad)], bad)
    assert field in _fails(capsys, ["inspect", str(bad), "--json"], bad)
    out = tmp / "out"
    assert field in _fails(capsys, ["apply", "--base", str(tmp / "base"), "--patch", str(bad), "--out", str(out)], out)


def test_apply_refuses_a_result_that_overflows(env, capsys):
    tmp, _, _ = env
    folder = tmp / "half"
    folder.mkdir()
    base = {NAME: torch.ones(4, 3, dtype=torch.float16)}
    save_file(base, str(folder / "model.safetensors"))
    patch = _patch(base, 1, tmp / "half.safetensors")
    out = tmp / "out"
    argv = ["apply", "--base", str(folder), "--patch", str(patch), "--out", str(out)]
    assert "NaN/Inf" in _fails(capsys, [*argv, "--weights", "1e38"], out)
    assert main(argv) == 0 and out.is_dir()


def test_remove_refuses_a_model_the_patch_was_never_applied_to(env, capsys):
    tmp, p1, p2 = env
    out = tmp / "back"
    argv = ["remove", "--model", str(tmp / "base"), "--patch", str(p1), "--out", str(out)]
    assert "not applied" in _fails(capsys, argv, out)
    applied = tmp / "applied"
    assert main(["apply", "--base", str(tmp / "base"), "--patch", str(p2), "--out", str(applied)]) == 0
    argv = ["remove", "--model", str(applied), "--patch", str(p1), "--out", str(out)]
    assert "other patch files" in _fails(capsys, argv, out)
    assert main([*argv, "--force"]) == 0 and out.is_dir()


def test_apply_refuses_a_combination_forced_across_bases(env, capsys):
    tmp, p1, _ = env
    p3 = _patch(_checkpoint(tmp / "third", 5), 3, tmp / "p3.safetensors")
    combined = tmp / "c.safetensors"
    assert main(["combine", "--patch", str(p1), str(p3), "--out", str(combined), "--force"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(combined)]) == 0
    assert "combined with --force across bases" in capsys.readouterr().out
    out = tmp / "out"
    argv = ["apply", "--base", str(tmp / "base"), "--patch", str(combined), "--out", str(out)]
    assert "combined with --force" in _fails(capsys, argv, out)
    assert main([*argv, "--force"]) == 0 and out.is_dir()
