"""Several fine-tunes in the config and the patch file (docs/METHOD.md §12): one value stays the plain run,
lists make a joint run, and a joint patch's task metadata round-trips and is type-checked on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_tailor.config import TailorConfig
from model_tailor.errors import ConfigError, PatchFormatError
from model_tailor.patch.format import FORMAT_NAME, load_patch, patch_metadata_strings, save_patch
from model_tailor.patch.model import PatchMetadata, SparsePatch, TensorPatch
from model_tailor.pipeline.resume import run_key


def test_a_list_of_one_is_the_plain_run():
    plain = TailorConfig.build(base="b", finetuned="f", calibration="c.jsonl")
    listed = TailorConfig.build(base="b", finetuned=["f"], calibration=["c.jsonl"])
    assert listed == plain and listed.fingerprint() == plain.fingerprint()
    assert (plain.multitask, plain.finetuned, plain.finetuned_paths) == (False, Path("f"), (Path("f"),))


def test_lists_make_a_joint_run_with_one_or_a_shared_calibration_file():
    cfg = TailorConfig.build(base="b", finetuned=["f", "g"], calibration="c.jsonl")
    assert cfg.multitask and cfg.finetuned_paths == (Path("f"), Path("g"))
    assert cfg.calibration_paths == (Path("c.jsonl"), Path("c.jsonl"))
    cfg = TailorConfig.build(base="b", finetuned=["f", "g"], calibration=["c.jsonl", "d.jsonl"])
    assert cfg.calibration_paths == (Path("c.jsonl"), Path("d.jsonl"))
    assert cfg.model_dump(mode="json")["finetuned"] == ["f", "g"]


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(finetuned=["f", "g"], calibration=["c", "d", "e"]), "calibration: 3 files for 2 fine-tuned"),
        (dict(finetuned="f", calibration=["c", "d"]), "calibration: 2 files for 1 fine-tuned"),
        (dict(finetuned=[], calibration="c"), "finetuned: needs at least one path"),
        (dict(finetuned=["f", "g"], calibration="c", preserve="self"), "preserve 'self'"),
        (dict(finetuned=["f", "g"], calibration="c", non_target_policy="tailor"), "non_target_policy 'tailor'"),
    ],
)
def test_counts_and_options_a_joint_run_refuses(fields, match):
    with pytest.raises(ConfigError, match=match) as err:
        TailorConfig.build(base="b", **fields)
    assert "\n" not in str(err.value)


def test_yaml_lists_resolve_against_the_file_folder(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("base: b\nfinetuned: [f, /abs/g]\ncalibration: [c.jsonl, d.jsonl]\n")
    cfg = TailorConfig.from_yaml(file)
    assert cfg.finetuned_paths == (tmp_path / "f", Path("/abs/g"))
    assert cfg.calibration_paths == (tmp_path / "c.jsonl", tmp_path / "d.jsonl")


def test_the_resume_key_of_one_task_is_unchanged_and_a_joint_key_covers_every_input(tmp_path):
    for name in ("b", "f", "g"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(name.encode())
    c, d = tmp_path / "c.jsonl", tmp_path / "d.jsonl"
    c.write_text("c"), d.write_text("d")
    b, f, g = (tmp_path / n for n in "bfg")
    assert run_key("x", b, f, c) == run_key("x", b, (f,), (c,))
    joint = run_key("x", b, (f, g), (c, d))
    assert joint != run_key("x", b, (f, g), (c, c)) and joint != run_key("x", b, (g, f), (c, d))


def _patch(multitask: dict) -> SparsePatch:
    tp = TensorPatch("w", (2, 2), torch.tensor([0, 3]), torch.tensor([0.5, -1.0]))
    return SparsePatch({"w": tp}, PatchMetadata(config={"density": 0.5}, multitask=multitask))


TASKS = {
    "tasks": [
        {"name": "a", "finetuned": "/m/a", "fingerprint": {}, "calibration": "a.jsonl", "records": 3},
        {"name": "b", "finetuned": "/m/b", "fingerprint": {}, "calibration": None, "kept_with_delta": 1},
    ],
    "kept": 2,
    "shared": 1,
}


def test_task_metadata_round_trips_and_single_task_files_carry_none(tmp_path):
    save_patch(_patch(TASKS), tmp_path / "joint.safetensors")
    assert load_patch(tmp_path / "joint.safetensors").metadata.multitask == TASKS
    assert "multitask" not in patch_metadata_strings(_patch({}))


@pytest.mark.parametrize(
    "value, match",
    [
        ([], "must be an object with a 'tasks' list"),
        ({"tasks": [], "kept": -1, "shared": 0}, "non-negative ints"),
        ({"tasks": [{"name": 1, "finetuned": "x"}], "kept": 0, "shared": 0}, "string 'name'"),
        ({"tasks": [{"name": "a", "finetuned": "x", "records": "3"}], "kept": 0, "shared": 0}, "'records'"),
    ],
)
def test_bad_task_metadata_is_refused_naming_the_field(tmp_path, value, match):
    meta = {"format": FORMAT_NAME, "format_version": "1", "shapes": json.dumps({"w": [2, 3]})}
    meta["multitask"] = json.dumps(value)
    tensors = {"indices/w": torch.tensor([0, 4], dtype=torch.int32), "values/w": torch.tensor([1.0, 2.0])}
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata=meta)
    with pytest.raises(PatchFormatError, match="multitask") as err:
        load_patch(tmp_path / "p.safetensors")
    assert match in str(err.value)
