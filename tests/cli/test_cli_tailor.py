"""`model-tailor tailor` from the command line: success, dry run, config files, and every error path.

Each error gives exactly one stderr line and a non-zero exit, and leaves nothing behind in the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import types
from typing import Literal, Union, get_args, get_origin

import pytest
import torch
from safetensors.torch import save_file
from tailor_cli import expect_failure, tailor_args

from model_tailor.cli import build_parser, main
from model_tailor.commands.tailor import build_config
from model_tailor.config import TailorConfig
from model_tailor.io.checkpoint import CheckpointReader

# Every flag ``tailor`` had when its parser was written by hand: users type these, so none may go away.
HAND_WRITTEN_FLAGS = (
    "--config --base --finetuned --calibration --out --save-model --density --alpha --granularity --compensation "
    "--sensitivity --mask-timing --block-size --percdamp --samples --max-tokens --batch-size --seed --device "
    "--dtype --include --exclude --non-target-policy --preserve --preserve-weight --preserve-samples "
    "--preserve-max-new-tokens --structure --salience-from --cache-dir --max-shard-bytes --overwrite --dry-run "
    "--quiet"
).split()


def _tailor_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["tailor"]


def _without_none(annotation):
    """``X`` of ``X | None`` and of ``X | tuple[X, ...] (| None)`` (one value or several, e.g. ``finetuned``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation, *many = [a for a in get_args(annotation) if a is not type(None)]
        assert many in ([], [tuple[annotation, ...]]), many
    return annotation


def test_every_config_field_has_a_flag_with_the_literal_choices():
    flags = _tailor_parser()._option_string_actions
    for name, info in TailorConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in flags, f"config field {name} has no flag {flag}"
        action = flags[flag]
        assert action.dest == name and action.default is None  # None = not given: a --config file wins
        assert action.help, f"{flag} has no help"
        annotation = _without_none(info.annotation)
        if get_origin(annotation) is Literal:
            assert tuple(action.choices) == get_args(annotation), flag
        else:
            assert action.choices is None, flag
    assert {"--guard", "--no-guard"} <= flags.keys()
    assert flags["--finetuned"].nargs == flags["--calibration"].nargs == "+"  # one, or one per task


def test_hand_written_flag_spellings_still_parse():
    flags = _tailor_parser()._option_string_actions
    assert [f for f in HAND_WRITTEN_FLAGS if f not in flags] == []


def test_flags_reach_the_config_and_do_not_override_the_file_when_absent(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("base: /b\nfinetuned: /f\ncalibration: /c.jsonl\nguard: false\noverwrite: true\n")
    parser = build_parser()
    args = parser.parse_args(["tailor", "--config", str(cfg_file), "--include", "*.mlp.*", "--include", "*.q*"])
    cfg = build_config(args)
    assert (cfg.guard, cfg.overwrite, cfg.include) == (False, True, ("*.mlp.*", "*.q*"))
    args = parser.parse_args(["tailor", "--config", str(cfg_file), "--guard", "--granularity", "row"])
    cfg = build_config(args)
    assert (cfg.guard, cfg.granularity, cfg.density, cfg.max_shard_bytes) == (True, "row", 0.1, 2_000_000_000)
    args = parser.parse_args(["tailor", "--base", "b", "--finetuned", "f", "--calibration", "c", "--no-guard"])
    assert build_config(args).guard is False


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (("--density", "abc"), "argument --density: invalid float value: 'abc'"),
        (("--samples", "1.5"), "argument --samples: invalid int value: '1.5'"),
        (("--granularity", "layer"), "argument --granularity: invalid choice: 'layer'"),
        (("--non-target-policy", "drop"), "argument --non-target-policy: invalid choice: 'drop'"),
        (("--densty", "0.1"), "unrecognized arguments: --densty 0.1"),
        (("--guard=yes",), "argument --guard"),
    ],
)
def test_usage_errors_are_one_line(pico, tmp_path, capsys, flags, match):
    expect_failure(capsys, tailor_args(pico("llama"), tmp_path, *flags), tmp_path, 2, match)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"base: b\ndensity: \xff\xfe\n", "is not UTF-8 text"),
        (b"- base\n- finetuned\n", "must hold a mapping"),
        (b"just a string\n", "must hold a mapping"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, content, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    line = expect_failure(capsys, ["tailor", "--config", str(cfg), "--out", str(out / "p.safetensors")], out, 2, match)
    assert str(cfg) in line


def test_missing_config_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    argv = ["tailor", "--config", str(missing), "--out", str(tmp_path / "p.safetensors")]
    line = expect_failure(capsys, argv, tmp_path, 2, "cannot be read (No such file or directory)")
    assert str(missing) in line


def _copy_with(tmp_path, pair, name, edit):
    folder = tmp_path / name
    shutil.copytree(pair.finetuned, folder)
    reader = CheckpointReader(folder)
    state = {n: reader.get(n) for n in reader.names()}
    reader.close()
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_success_writes_patch_report_and_summary(pico, tmp_path, capsys):
    pair = pico("llama")
    rc = main(tailor_args(pair, tmp_path)[:-3] + ["--samples", "4", "--density", "0.25", "--block-size", "16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert (tmp_path / "p.safetensors").is_file()
    report = json.loads((tmp_path / "p.safetensors.report.json").read_text())
    lines = report["calibration"]["lines"]
    assert len(lines) == 4 and lines == sorted(lines) and set(lines) <= {1, 2, 3, 4, 5}
    assert report["layers"][0]["seconds"].keys() >= {"hessian", "tailor"}
    assert "kept" in out and "model.layers.1" in out


def test_dry_run_prints_plan_and_writes_nothing(pico, tmp_path, capsys):
    pair = pico("llava")
    rc = main(tailor_args(pair, tmp_path, "--dry-run"))
    out = capsys.readouterr().out
    assert rc == 0
    assert "targets:" in out and "language_model.model.layers.0.mlp.up_proj.weight" in out
    assert "multi_modal_projector.linear_1.weight: reset" in out
    assert "layer order: model.language_model.layers.0, model.language_model.layers.1" in out
    assert "estimated peak memory" in out and "estimated time" in out
    assert list(tmp_path.iterdir()) == []


def test_config_file_and_flag_override(pico, tmp_path, capsys):
    pair = pico("llama")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base: {pair.base}\nfinetuned: {pair.finetuned}\ncalibration: {pair.calibration}\ndensity: 0.5\nsamples: 2\n"
    )
    rc = main(
        [
            "tailor",
            "--config",
            str(cfg),
            "--density",
            "0.25",
            "--out",
            str(tmp_path / "p.safetensors"),
            "--quiet",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "p.safetensors.report.json").read_text())
    assert report["config"]["density"] == 0.25 and report["config"]["samples"] == 2


def test_unknown_config_key(pico, tmp_path, capsys):
    pair = pico("llama")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {pair.base}\nfinetuned: {pair.finetuned}\ncalibration: {pair.calibration}\ndesnity: 1\n")
    out = tmp_path / "out"
    out.mkdir()
    expect_failure(
        capsys,
        ["tailor", "--config", str(cfg), "--out", str(out / "p.safetensors")],
        out,
        2,
        "desnity: unknown option",
    )


@pytest.mark.parametrize("density", ["0", "1.5"])
def test_bad_density(pico, tmp_path, capsys, density):
    expect_failure(capsys, tailor_args(pico("llama"), tmp_path, "--density", density), tmp_path, 2, "density")


def test_mismatched_architectures(pico, tmp_path, capsys):
    llama, llava = pico("llama"), pico("llava")
    argv = tailor_args(llama, tmp_path)
    argv[argv.index("--finetuned") + 1] = str(llava.finetuned)
    expect_failure(capsys, argv, tmp_path, 1, "different architectures")


def test_shape_mismatch_and_missing_tensors_list_every_offender(pico, tmp_path, capsys):
    pair = pico("llama")

    def edit(state):
        state["model.norm.weight"] = torch.ones(7)
        state["lm_head.weight"] = torch.zeros(3, 32)
        del state["model.layers.0.mlp.up_proj.weight"]

    bad = _copy_with(tmp_path, pair, "bad", edit)
    out = tmp_path / "out"
    out.mkdir()
    argv = tailor_args(pair, out)
    argv[argv.index("--finetuned") + 1] = str(bad)
    line = expect_failure(capsys, argv, out, 1, "do not match")
    for name in ("model.norm.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"):
        assert name in line


def test_blocks_with_different_attention_masks_are_refused(pico, tmp_path, capsys):
    """A config whose blocks alternate sliding-window and full attention (Gemma 3, Qwen2 with sliding windows):
    the replay reuses block 0's mask for every block, so the run stops before any block with one line."""
    pair = pico("llama")
    bad = tmp_path / "mixed"
    shutil.copytree(pair.finetuned, bad)
    config = json.loads((bad / "config.json").read_text())
    config["layer_types"] = ["sliding_attention"] + ["full_attention"] * (config["num_hidden_layers"] - 1)
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    argv = tailor_args(pair, out)
    argv[argv.index("--finetuned") + 1] = str(bad)
    line = expect_failure(capsys, argv, out, 1, "different attention masks (full_attention, sliding_attention)")
    assert "model.layers" in line


def test_nan_weights(pico, tmp_path, capsys):
    pair = pico("llama")
    bad = _copy_with(
        tmp_path,
        pair,
        "bad",
        lambda s: s["model.layers.1.mlp.up_proj.weight"].view(-1)[3].fill_(float("nan")),
    )
    out = tmp_path / "out"
    out.mkdir()
    argv = tailor_args(pair, out)
    argv[argv.index("--finetuned") + 1] = str(bad)
    expect_failure(capsys, argv, out, 1, "model.layers.1.mlp.up_proj.weight (finetuned)")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "holds no records"),
        ('{"text": "ok"}\n{"text": 3\n', "c.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"txt": "a"}\n', "c.jsonl:2: unknown record keys"),
    ],
)
def test_bad_calibration(pico, tmp_path, capsys, content, match):
    cal = tmp_path / "c.jsonl"
    cal.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    argv = tailor_args(pico("llama"), out)
    argv[argv.index("--calibration") + 1] = str(cal)
    expect_failure(capsys, argv, out, 1, match)


def test_unreadable_image(pico, tmp_path, capsys):
    (tmp_path / "broken.png").write_text("not an image")
    cal = tmp_path / "c.jsonl"
    cal.write_text(json.dumps({"prompt": "describe this", "response": "a cat", "image": "broken.png"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    argv = tailor_args(pico("llava"), out)
    argv[argv.index("--calibration") + 1] = str(cal)
    expect_failure(capsys, argv, out, 1, "broken.png")


def test_missing_checkpoint(pico, tmp_path, capsys):
    argv = tailor_args(pico("llama"), tmp_path)
    argv[argv.index("--base") + 1] = str(tmp_path / "nope")
    expect_failure(capsys, argv, tmp_path, 1, "does not exist")


def test_nothing_to_write(pico, tmp_path, capsys):
    argv = tailor_args(pico("llama"), tmp_path)
    i = argv.index("--out")
    del argv[i : i + 2]
    expect_failure(capsys, argv, tmp_path, 2, "nothing to write")


def test_cuda_unavailable(pico, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    expect_failure(
        capsys, tailor_args(pico("llama"), tmp_path, "--device", "cuda"), tmp_path, 2, "CUDA is not available"
    )


# -- inputs are never destroyed, outputs are checked before any heavy work ------------------------------------


def _own_pair(pair, tmp_path):
    """A private copy of a pico pair, so a test that could overwrite an input never touches the shared one."""
    root = tmp_path / "in"
    shutil.copytree(pair.base, root / "base")
    shutil.copytree(pair.finetuned, root / "finetuned")
    shutil.copy(pair.calibration, root / "calib.jsonl")
    return types.SimpleNamespace(base=root / "base", finetuned=root / "finetuned", calibration=root / "calib.jsonl")


def _with_out(argv, out):
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(out)
    return argv


@pytest.mark.parametrize("target", ["base/model.safetensors", "calib.jsonl", "finetuned/config.json"])
def test_out_onto_an_input_is_refused_even_with_overwrite(pico, tmp_path, capsys, target):
    pair = _own_pair(pico("llama"), tmp_path)
    victim = tmp_path / "in" / target
    before = victim.read_bytes()
    argv = _with_out(tailor_args(pair, tmp_path, "--overwrite"), victim)
    line = expect_failure(capsys, argv, victim.parent, 1, "input")
    assert "inputs" in line or "input calibration itself" in line
    assert victim.read_bytes() == before


def test_save_model_onto_the_base_or_around_it_is_refused(pico, tmp_path, capsys):
    pair = _own_pair(pico("llama"), tmp_path)
    for folder, match in ((pair.base, "is the input base itself"), (tmp_path / "in", "contains the base input")):
        argv = tailor_args(pair, tmp_path, "--save-model", str(folder), "--overwrite")
        expect_failure(capsys, argv, tmp_path / "in", 1, match)
    assert (pair.base / "model.safetensors").is_file()


def test_an_existing_out_is_kept_unless_overwrite(pico, tmp_path, capsys):
    pair = pico("llama")
    (tmp_path / "p.safetensors").write_bytes(b"mine")
    expect_failure(capsys, tailor_args(pair, tmp_path), tmp_path, 1, "already exists; choose a new path")
    assert (tmp_path / "p.safetensors").read_bytes() == b"mine"
    assert main(tailor_args(pair, tmp_path, "--overwrite")) == 0
    assert (tmp_path / "p.safetensors").read_bytes() != b"mine"


def test_an_existing_report_side_file_is_an_existing_output(pico, tmp_path, capsys):
    (tmp_path / "p.safetensors.report.json").write_text("{}")
    expect_failure(capsys, tailor_args(pico("llama"), tmp_path), tmp_path, 1, "report")


@pytest.mark.parametrize(
    ("make", "out", "match"),
    [
        (lambda d: (d / "p.safetensors").mkdir(), "p.safetensors", "is an existing folder"),
        (lambda d: (d / "f").write_text("x"), "f/p.safetensors", "a regular file"),
    ],
)
def test_out_an_existing_folder_or_under_a_file_fails_fast(pico, tmp_path, capsys, make, out, match):
    make(tmp_path)
    expect_failure(capsys, _with_out(tailor_args(pico("llama"), tmp_path), tmp_path / out), tmp_path, 1, match)


@pytest.mark.parametrize(("name", "match"), [("nope.jsonl", "does not exist"), ("folder", "is a folder")])
def test_missing_or_folder_calibration_is_one_line(pico, tmp_path, capsys, name, match):
    (tmp_path / "folder").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    argv = tailor_args(pico("llama"), out)
    argv[argv.index("--calibration") + 1] = str(tmp_path / name)
    expect_failure(capsys, argv, out, 1, f"calibration file {str(tmp_path / name)!r} {match}")


def _edit_config(pair, tmp_path, edit):
    own = _own_pair(pair, tmp_path)
    for folder in (own.base, own.finetuned):
        cfg = json.loads((folder / "config.json").read_text())
        edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return own


def test_a_checkpoint_asking_for_its_own_code_is_refused_without_a_prompt(pico, tmp_path, capsys, monkeypatch):
    own = _edit_config(pico("llama"), tmp_path, lambda c: c.update(auto_map={"AutoConfig": "evil.Config"}))
    (own.finetuned / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("prompted"))
    out = tmp_path / "out"
    out.mkdir()
    expect_failure(capsys, tailor_args(own, out), out, 1, "'auto_map' asks to run the checkpoint's own Python code")
    expect_failure(capsys, tailor_args(own, out, "--dry-run"), out, 1, "auto_map")
    assert not (tmp_path / "ran").exists()


def test_an_architecture_that_is_not_a_model_class_is_one_line(pico, tmp_path, capsys):
    own = _edit_config(pico("llama"), tmp_path, lambda c: c.update(architectures=["pipeline"]))
    out = tmp_path / "out"
    out.mkdir()
    expect_failure(capsys, tailor_args(own, out), out, 1, "'pipeline', which is not a transformers model class")


def test_a_running_tailor_holds_its_out(pico, tmp_path, capsys):
    lock = tmp_path / ".p.safetensors.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    expect_failure(capsys, tailor_args(pico("llama"), tmp_path), tmp_path, 1, f"being written by pid {os.getpid()}")
    assert lock.exists()  # someone else's lock is left alone


def test_temporaries_and_stale_lock_of_a_killed_run_are_cleaned(pico, tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".p.safetensors.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (tmp_path / ".p.safetensors.x1y2z3w4.tmp").write_bytes(b"partial patch")
    (tmp_path / ".p.safetensors.report.json.abcdefgh.tmp").write_bytes(b"partial report")
    (tmp_path / ".model.q9w8e7r6.tmp").mkdir()
    (tmp_path / ".model.q9w8e7r6.tmp" / "shard-00000.part").write_bytes(b"partial shard")
    (tmp_path / ".notours.abcdefgh.tmp").write_bytes(b"")
    assert main(tailor_args(pico("llama"), tmp_path, "--save-model", str(tmp_path / "model"))) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".notours.abcdefgh.tmp", "model", "p.safetensors", "p.safetensors.report.json"]


def test_an_image_given_to_a_text_only_model_is_warned_about(pico, tmp_path, capsys):
    pair = pico("llama")
    (tmp_path / "data").mkdir()
    shutil.copy(pico("llava").calibration.parent / "img0.png", tmp_path / "data" / "img0.png")
    cal = tmp_path / "data" / "c.jsonl"
    cal.write_text(
        json.dumps({"text": "the cat is big"}) + "\n" + json.dumps({"prompt": "what ?", "image": "img0.png"}) + "\n"
    )
    argv = tailor_args(pair, tmp_path)
    argv[argv.index("--calibration") + 1] = str(cal)
    assert main(argv) == 0
    report = json.loads((tmp_path / "p.safetensors.report.json").read_text())
    assert any("images are ignored (lines [2])" in w for w in report["warnings"])


def test_calibration_images_outside_the_file_folder_need_a_flag(pico, tmp_path, capsys):
    llava = pico("llava")
    (tmp_path / "data").mkdir()
    cal = tmp_path / "data" / "c.jsonl"
    image = str(llava.calibration.parent / "img0.png")  # absolute, outside data/
    cal.write_text(json.dumps({"prompt": "describe this", "response": "a cat", "image": image}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    argv = tailor_args(llava, out)
    argv[argv.index("--calibration") + 1] = str(cal)
    expect_failure(capsys, argv, out, 1, "c.jsonl:1: image")
    from model_tailor.api import tailor

    result = tailor(llava.base, llava.finetuned, cal, out=out / "p.safetensors", samples=4, allow_outside_paths=True)
    assert result.report.calibration["lines"] == [1]


def test_preserve_self_never_unpickles_weights(pico, tmp_path, capsys, monkeypatch):
    own = _own_pair(pico("llama"), tmp_path)
    (own.base / "model.safetensors").rename(own.base / "weights.safetensors")  # read by model-tailor only
    torch.save({}, own.base / "pytorch_model.bin")  # what a pickle fallback would load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    out = tmp_path / "out"
    out.mkdir()
    argv = tailor_args(own, out, "--preserve", "self", "--cache-dir", str(tmp_path / "cache"))
    expect_failure(capsys, argv, out, 2, "--preserve self cannot load")
