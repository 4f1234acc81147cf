"""io.safety: outputs never destroy inputs, existing outputs need --overwrite, one writer per output, killed
runs' temporaries are cleaned, checkpoint code is refused; and the resume key follows content, not mtimes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from model_tailor.errors import CheckpointError, OutputError
from model_tailor.io.safety import Output, check_outputs, clean_temps, lock_path, output_lock, refuse_remote_code
from model_tailor.pipeline.resume import run_key


@pytest.fixture
def tree(tmp_path):
    base = tmp_path / "B"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"text": "a"}\n')
    return tmp_path, {"base": base, "calibration": calib}


@pytest.mark.parametrize(
    ("out", "kind", "match"),
    [
        ("B/model.safetensors", "file", "inside the base input"),
        ("c.jsonl", "file", "is the input calibration itself"),
        ("B", "dir", "is the input base itself"),
        (".", "dir", "contains the base input"),
        ("c.jsonl/p.safetensors", "file", "is under"),
        ("B", "file", "is the input base itself"),
    ],
)
def test_outputs_that_would_destroy_an_input_are_refused_even_with_overwrite(tree, out, kind, match):
    root, inputs = tree
    with pytest.raises(OutputError, match=match):
        check_outputs([Output("--out", root / out, kind)], inputs, overwrite=True)


def test_a_symlink_to_an_input_is_that_input(tree):
    root, inputs = tree
    (root / "link.safetensors").symlink_to(root / "B" / "model.safetensors")
    with pytest.raises(OutputError, match="inside the base input"):
        check_outputs([Output("--out", root / "link.safetensors")], inputs, overwrite=True)


def test_existing_outputs_need_overwrite_and_the_right_kind(tree):
    root, inputs = tree
    (root / "p.safetensors").write_bytes(b"old")
    (root / "folder").mkdir()
    with pytest.raises(OutputError, match="already exists; .* --overwrite"):
        check_outputs([Output("--out", root / "p.safetensors")], inputs, overwrite=False)
    check_outputs([Output("--out", root / "p.safetensors")], inputs, overwrite=True)
    check_outputs([Output("--out", root / "p.safetensors")], inputs, overwrite=False, ours=[root / "p.safetensors"])
    with pytest.raises(OutputError, match="is an existing folder"):
        check_outputs([Output("--out", root / "folder")], inputs, overwrite=True)
    with pytest.raises(OutputError, match="is an existing file"):
        check_outputs([Output("--save-model", root / "p.safetensors", "dir")], inputs, overwrite=True)
    with pytest.raises(OutputError, match="same path"):
        check_outputs([Output("--out", root / "x"), Output("--save-model", root / "x", "dir")], inputs, overwrite=True)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_lock_names_its_holder_and_a_stale_one_is_taken_over(tmp_path, caplog):
    out = tmp_path / "p.safetensors"
    with output_lock(out) as file:
        holder = json.loads(file.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputError, match=f"being written by pid {os.getpid()} on {socket.gethostname()}"):
            with output_lock(out):
                pass
    assert not lock_path(out).exists()  # released
    lock_path(out).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": "then"}))
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not lock_path(out).exists()


def test_an_empty_lock_is_held_while_fresh_and_stale_when_old(tmp_path):
    out = tmp_path / "p.safetensors"
    lock_path(out).write_text("")
    with pytest.raises(OutputError, match="another run"):
        with output_lock(out):
            pass
    old = time.time() - 60
    os.utime(lock_path(out), (old, old))
    with output_lock(out):
        pass
    assert not lock_path(out).exists()


def test_clean_temps_removes_only_this_outputs_temporaries(tmp_path):
    (tmp_path / ".p.safetensors.ab_d12x9.tmp").write_bytes(b"x" * 10)
    (tmp_path / ".model.k2j4h5g6.tmp").mkdir()
    (tmp_path / ".model.k2j4h5g6.tmp" / "shard").write_bytes(b"y" * 5)
    (tmp_path / ".model.old").mkdir()
    keep = [".p.safetensors.work-0123456789abcdef", ".other.ab_d12x9.tmp", "p.safetensors", ".p.safetensors.lock"]
    for name in keep:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".p.safetensors.toolongname.tmp").write_bytes(b"")
    assert clean_temps(tmp_path / "p.safetensors") == 10
    assert clean_temps(tmp_path / "model") == 5
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*keep, ".p.safetensors.toolongname.tmp"])


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "preprocessor_config.json"])
def test_auto_map_in_any_config_is_refused(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    refuse_remote_code(tmp_path)  # no auto_map: fine
    (tmp_path / name).write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.X"}}))
    with pytest.raises(CheckpointError, match=f"{name}: 'auto_map' asks to run the checkpoint's own Python code"):
        refuse_remote_code(tmp_path)


def test_resume_key_follows_content_not_size_and_mtime(tmp_path):
    base, ft = tmp_path / "base", tmp_path / "ft"
    for folder in (base, ft):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"0123456789")
        (folder / "config.json").write_text("{}")
    (ft / "pytorch_model.bin").write_bytes(b"never read")
    key = run_key("cfg", base, ft, None)
    weights = ft / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"0123456780")  # same size, one byte changed, time put back
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert run_key("cfg", base, ft, None) != key
    changed = run_key("cfg", base, ft, None)
    (ft / "pytorch_model.bin").write_bytes(b"not read either")  # pickles are never read, so never keyed
    assert run_key("cfg", base, ft, None) == changed
