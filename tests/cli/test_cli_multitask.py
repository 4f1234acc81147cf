"""`model-tailor tailor` with several fine-tunes (docs/METHOD.md §12): the joint patch and every refusal.

Each refusal is one stderr line naming every offender, a non-zero exit, and nothing written.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tailor_cli import expect_failure, tailor_args

from model_tailor.cli import main
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.patch.format import load_patch


def _joint_args(pair, out_dir, finetuned, calibration, *extra):
    argv = tailor_args(pair, out_dir, *extra)
    i = argv.index("--finetuned")
    argv[i : i + 2] = ["--finetuned", *map(str, finetuned)]
    j = argv.index("--calibration")
    argv[j : j + 2] = ["--calibration", *map(str, calibration)]
    return argv


def _with_shape_change(tmp_path, pair, name):
    """A copy of the pico fine-tune whose final norm has another length (config unchanged)."""
    folder = tmp_path / name
    shutil.copytree(pair.finetuned, folder)
    reader = CheckpointReader(folder)
    state = {n: reader.get(n) for n in reader.names()}
    reader.close()
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_joint_patch_from_the_command_line(pico, second_llama, tmp_path, capsys):
    pair = pico("llama")
    argv = _joint_args(pair, tmp_path, [pair.finetuned, second_llama], [pair.calibration], "--block-size", "16")
    assert main(argv) == 0
    patch = load_patch(tmp_path / "p.safetensors")
    tasks = patch.metadata.multitask["tasks"]
    assert [t["name"] for t in tasks] == [pair.finetuned.name, second_llama.name]
    assert [t["records"] for t in tasks] == [4, 4]  # --samples 4 of the shared file
    config = patch.metadata.config
    assert config["finetuned"] == [str(pair.finetuned), str(second_llama)]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "p.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert f"task 1 {pair.finetuned.name}" in shown and f"task 2 {second_llama.name}" in shown
    assert main(["inspect", "--json", str(tmp_path / "p.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["multitask"]["kept"] == patch.nnz


def test_finetunes_of_other_bases_are_listed_in_one_line(pico, tmp_path, capsys):
    llama, gpt2 = pico("llama"), pico("gpt2")
    shaped = _with_shape_change(tmp_path, llama, "other-shapes")
    out = tmp_path / "out"
    out.mkdir()
    argv = _joint_args(llama, out, [llama.finetuned, gpt2.finetuned, shaped], [llama.calibration])
    line = expect_failure(capsys, argv, out, 1, "2 of 3 fine-tuned checkpoints are not fine-tunes of base")
    assert f"task 2 {str(gpt2.finetuned)!r}" in line and "different architectures" in line
    assert f"task 3 {str(shaped)!r}" in line and "model.norm.weight" in line
    assert f"task 1 {str(llama.finetuned)!r}" not in line


def test_tasks_with_mismatched_shapes_are_refused(pico, tmp_path, capsys):
    llama = pico("llama")
    shaped = _with_shape_change(tmp_path, llama, "other-shapes")
    out = tmp_path / "out"
    out.mkdir()
    argv = _joint_args(llama, out, [llama.finetuned, shaped], [llama.calibration])
    line = expect_failure(capsys, argv, out, 1, "shape mismatch")
    assert "model.norm.weight (base [32] vs finetuned [7])" in line


def test_a_calibration_count_that_does_not_match_the_finetunes(pico, second_llama, tmp_path, capsys):
    llama = pico("llama")
    argv = _joint_args(llama, tmp_path, [llama.finetuned, second_llama], [llama.calibration] * 3)
    expect_failure(capsys, argv, tmp_path, 2, "calibration: 3 files for 2 fine-tuned checkpoint(s)")
    argv = _joint_args(llama, tmp_path, [llama.finetuned], [llama.calibration] * 2)
    expect_failure(capsys, argv, tmp_path, 2, "calibration: 2 files for 1 fine-tuned checkpoint(s)")


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--granularity", "global"], "granularity 'global'"),
        (["--non-target-policy", "keep"], "non_target_policy 'keep'"),
        (["--alpha", "1", "--compensation", "none"], "the data-free mode"),
    ],
)
def test_options_the_joint_objective_does_not_define(pico, second_llama, tmp_path, capsys, flags, match):
    llama = pico("llama")
    argv = _joint_args(llama, tmp_path, [llama.finetuned, second_llama], [llama.calibration], *flags)
    expect_failure(capsys, argv, tmp_path, 2, match)


def _combine_failure(capsys, argv, out_dir, code, match):
    """``expect_failure`` for ``combine``: exit ``code``, one stderr line with ``match``, nothing written."""
    before = sorted(p.name for p in out_dir.iterdir())
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert len(err) == 1 and err[0].startswith("model-tailor combine: error: "), err
    assert match in err[0], err[0]
    assert sorted(p.name for p in out_dir.iterdir()) == before, "something was written"
    return err[0]


@pytest.fixture(scope="module")
def task_patches(pico, tmp_path_factory):
    from model_tailor.api import tailor

    pair, root = pico("llama"), tmp_path_factory.mktemp("task-patches")
    out = root / "a.safetensors"
    tailor(pair.base, pair.finetuned, pair.calibration, out=out, samples=4, block_size=16)
    return [out, out]


def test_redecorate_flags_without_redecorate_or_with_parts_missing(pico, task_patches, tmp_path, capsys):
    pair = pico("llama")
    argv = ["combine", "--patch", *map(str, task_patches), "--out", str(tmp_path / "c.safetensors")]
    _combine_failure(capsys, [*argv, "--base", str(pair.base)], tmp_path, 2, "--base only apply with --redecorate")
    line = _combine_failure(
        capsys, [*argv, "--redecorate", "--base", str(pair.base)], tmp_path, 2, "--redecorate needs"
    )
    assert "--finetuned" in line and "--calibration" in line


def test_redecorate_refuses_other_bases_and_counts_before_writing(pico, task_patches, tmp_path, capsys):
    llama, gpt2 = pico("llama"), pico("gpt2")
    argv = ["combine", "--patch", *map(str, task_patches), "--out", str(tmp_path / "c.safetensors"), "--redecorate"]
    argv += ["--base", str(llama.base), "--samples", "2"]
    other = [*argv, "--finetuned", str(llama.finetuned), str(gpt2.finetuned), "--calibration", str(llama.calibration)]
    line = _combine_failure(capsys, other, tmp_path, 1, "1 of 2 fine-tuned checkpoints are not fine-tunes of base")
    assert str(gpt2.finetuned) in line
    counts = [*argv, "--finetuned", str(llama.finetuned), "--calibration", *[str(llama.calibration)] * 2]
    _combine_failure(capsys, counts, tmp_path, 2, "calibration: 2 files for 1 fine-tuned checkpoint(s)")
