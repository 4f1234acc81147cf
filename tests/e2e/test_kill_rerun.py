"""Interrupted runs are finishable and resume trusts no stale work.

``tailor --save-model`` and ``apply`` are SIGKILLed (in a subprocess) just before a seeded ``os.replace`` call
(the renames that commit block files, staged outputs and checkpoint folders), including the one right after the
model folder is in place; the rerun with the same arguments must finish, give outputs equal to a clean run's,
and leave no temporary, lock or work folder behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_tailor.cli import main
from model_tailor.io.checkpoint import CheckpointReader

# Runs the CLI with os.replace wrapped: the KILL_AT-th call kills the process before it renames anything.
KILLER = """
import os, signal, sys
n, calls, real = int(os.environ["KILL_AT"]), [0], os.replace
def replace(src, dst, *args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from model_tailor.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _tensors(path):
    if path.is_dir():
        reader = CheckpointReader(path)
        out = {n: reader.get(n) for n in reader.names()}
        reader.close()
        return out
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _recorded(monkeypatch, argv):
    """Run the CLI in-process, returning the destinations of its os.replace calls in order."""
    seen, real = [], os.replace

    def replace(src, dst, *args, **kwargs):
        seen.append(os.fspath(dst))
        return real(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        assert main(argv) == 0
    return seen


def _killed(argv, at):
    env = {**os.environ, "KILL_AT": str(at)}
    proc = subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, (at, proc.returncode, proc.stderr[-2000:])


def _tailor_argv(pair, folder):
    return [
        "tailor", "--base", str(pair.base), "--finetuned", str(pair.finetuned), "--calibration", str(pair.calibration),
        "--out", str(folder / "p.safetensors"), "--save-model", str(folder / "model"), "--samples", "4",
        "--density", "0.25", "--quiet",
    ]  # fmt: skip


def test_killed_tailor_save_model_is_finished_by_its_rerun(pico, tmp_path, monkeypatch):
    pair = pico("llama")
    clean = tmp_path / "clean"
    renames = _recorded(monkeypatch, _tailor_argv(pair, clean))
    model_commit = next(i for i, dst in enumerate(renames, 1) if dst == str(clean / "model"))
    assert renames[model_commit] == str(clean / "p.safetensors")  # the patch is renamed right after the model
    points = [model_commit + 1, *random.Random(0).sample(range(1, len(renames) + 1), 1)]
    for at in points:
        run = tmp_path / f"kill-{at}"
        _killed(_tailor_argv(pair, run), at)
        if at == model_commit + 1:  # the case: a complete-looking model, no patch, no report
            assert (run / "model").is_dir() and not (run / "p.safetensors").exists()
        assert main(_tailor_argv(pair, run)) == 0, at
        assert sorted(p.name for p in run.iterdir()) == ["model", "p.safetensors", "p.safetensors.report.json"]
        _same(_tensors(run / "p.safetensors"), _tensors(clean / "p.safetensors"))
        _same(_tensors(run / "model"), _tensors(clean / "model"))


def test_killed_apply_is_finished_by_its_rerun(pico, tmp_path, monkeypatch):
    pair = pico("llama")
    assert main(_tailor_argv(pair, tmp_path)) == 0
    argv = ["apply", "--base", str(pair.base), "--patch", str(tmp_path / "p.safetensors"), "--max-shard-bytes", "20000"]
    clean = tmp_path / "clean"
    renames = _recorded(monkeypatch, [*argv, "--out", str(clean)])
    assert len(renames) >= 3  # several shards, then the folder
    at = random.Random(1).randrange(1, len(renames) + 1)
    _killed([*argv, "--out", str(tmp_path / "applied")], at)
    assert main([*argv, "--out", str(tmp_path / "applied")]) == 0
    _same(_tensors(tmp_path / "applied"), _tensors(clean))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def _own_pair(pair, root):
    shutil.copytree(pair.base, root / "base")
    shutil.copytree(pair.finetuned, root / "finetuned")
    return types.SimpleNamespace(base=root / "base", finetuned=root / "finetuned", calibration=pair.calibration)


def test_resume_ignores_blocks_of_a_finetuned_changed_in_place(pico, tmp_path, monkeypatch):
    """A checkpoint rewritten with the same size and its mtime restored must not resume the old blocks."""
    from model_tailor.pipeline.resume import WorkDir

    pair = _own_pair(pico("llama"), tmp_path)
    argv = _tailor_argv(pair, tmp_path / "run")
    real_save, saved = WorkDir.save_block, []

    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        saved.append(args[0])
        if len(saved) == 2:
            raise KeyboardInterrupt  # interrupted after two finished blocks

    with monkeypatch.context() as m:
        m.setattr(WorkDir, "save_block", save_then_die)
        assert main(argv) == 130
    assert any(p.name.startswith(".p.safetensors.work-") for p in (tmp_path / "run").iterdir())
    weights = pair.finetuned / "model.safetensors"
    stat = weights.stat()
    state = _tensors(pair.finetuned)
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name].flip(0).contiguous()  # same size, other content
    save_file(state, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert main(argv) == 0
    report = json.loads((tmp_path / "run" / "p.safetensors.report.json").read_text())
    assert not any(layer["resumed"] for layer in report["layers"])
    assert main(_tailor_argv(pair, tmp_path / "fresh")) == 0
    _same(_tensors(tmp_path / "run" / "p.safetensors"), _tensors(tmp_path / "fresh" / "p.safetensors"))


@pytest.mark.parametrize("command", ["apply", "combine"])
def test_apply_and_combine_never_write_onto_their_inputs(pico, tmp_path, capsys, command):
    pair = _own_pair(pico("llama"), tmp_path)
    assert main(_tailor_argv(pair, tmp_path / "run")) == 0
    patch = tmp_path / "run" / "p.safetensors"
    before = patch.read_bytes()
    if command == "apply":
        argv = ["apply", "--base", str(pair.base), "--patch", str(patch), "--out", str(pair.base / "x"), "--overwrite"]
        match = "inside the checkpoint input"
    else:
        argv = ["combine", "--patch", str(patch), str(patch), "--out", str(patch), "--overwrite"]
        match = "is the input --patch 1 itself"
    capsys.readouterr()
    assert main(argv) == 1
    assert match in capsys.readouterr().err
    assert patch.read_bytes() == before and not (pair.base / "x").exists()
