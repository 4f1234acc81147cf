"""Joint multi-task tailoring on the pico Llama (docs/METHOD.md §12): several fine-tunes, one patch.

Known answers: a fine-tune listed twice with the same calibration data is the plain run (the combined target and
Hessian of identical tasks are exactly that task's); with two different fine-tunes, the patch metadata counts, for
every kept entry, which tasks changed it, and those counts follow from which layers each fine-tune changed.
"""

from __future__ import annotations

import json

import torch

from model_tailor.api import tailor
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.patch.format import load_patch

FIELDS = {"density": 0.25, "block_size": 16, "samples": 8}


def _masks(patch) -> dict[str, torch.Tensor]:
    return {name: tp.indices for name, tp in patch.tensors.items()}


def test_one_finetune_listed_twice_is_the_plain_run(pico, tmp_path):
    pair = pico("llama")
    once = tailor(pair.base, pair.finetuned, pair.calibration, out=tmp_path / "once.safetensors", **FIELDS).patch
    for name, calibration in (("twice", [pair.calibration] * 2), ("shared", pair.calibration)):
        out = tmp_path / f"{name}.safetensors"
        tailor(pair.base, [pair.finetuned, pair.finetuned], calibration, out=out, **FIELDS)
        twice = load_patch(out)
        assert _masks(twice).keys() == _masks(once).keys()
        for tensor, tp in once.tensors.items():
            assert torch.equal(twice.tensors[tensor].indices, tp.indices), tensor
            torch.testing.assert_close(twice.tensors[tensor].values, tp.values, rtol=1e-5, atol=1e-6, msg=tensor)
        meta = twice.metadata.multitask
        assert [t["name"] for t in meta["tasks"]] == [pair.finetuned.name] * 2
        assert [t["records"] for t in meta["tasks"]] == [5, 5]  # the pico calibration file has 5 records
        assert [t["calibration"] for t in meta["tasks"]] == [str(pair.calibration)] * 2
        assert meta["kept"] == once.nnz
        assert [t["kept_with_delta"] for t in meta["tasks"]] == [once.nnz] * 2  # every kept entry is tuned
        assert meta["shared"] == once.nnz
        fp = meta["tasks"][0]["fingerprint"]
        assert sorted(fp["content"]) == sorted(once.tensors)
    assert once.metadata.multitask == {}  # single-task files carry no multitask field


def test_two_finetunes_make_one_patch_over_the_union_of_their_targets(pico, second_llama, tmp_path):
    pair = pico("llama")
    out, model_dir = tmp_path / "joint.safetensors", tmp_path / "model"
    result = tailor(
        pair.base, [pair.finetuned, second_llama], pair.calibration, out=out, save_model=model_dir, **FIELDS
    )
    patch = load_patch(out)
    report = json.loads((tmp_path / "joint.safetensors.report.json").read_text())
    targets = {t["name"] for t in report["plan"]["targets"]}
    layers = {int(n.split(".")[2]) for n in targets}
    assert layers == {0, 1, 2}  # task 1 tuned layers 1-2, task 2 layers 0-1
    base = CheckpointReader(pair.base)
    for name in targets:
        assert patch.tensors[name].nnz == base.get(name).numel() // 4, name
    kept = {layer: sum(patch.tensors[n].nnz for n in targets if f"layers.{layer}." in n) for layer in layers}
    meta = patch.metadata.multitask
    assert meta["kept"] == sum(kept.values()) == patch.nnz
    first, second = meta["tasks"]
    assert (first["name"], second["name"]) == (pair.finetuned.name, second_llama.name)
    assert first["kept_with_delta"] == kept[1] + kept[2]
    assert second["kept_with_delta"] == kept[0] + kept[1]
    assert meta["shared"] == kept[1]  # only layer 1 was tuned by both
    assert [t["task"] for t in report["calibration"]["tasks"]] == [pair.finetuned.name, second_llama.name]
    saved, patched = CheckpointReader(model_dir), patch.apply_to_state_dict({n: base.get(n) for n in base.names()})
    for name in base.names():
        torch.testing.assert_close(saved.get(name), patched[name], rtol=0, atol=1e-6, msg=name)
    assert result.patch.nnz == patch.nnz


def test_combine_redecorate_keeps_the_union_mask_and_records_the_tasks(pico, second_llama, tmp_path, capsys):
    from model_tailor.cli import main

    pair = pico("llama")
    paths = []
    for i, ft in enumerate((pair.finetuned, second_llama)):
        paths.append(tmp_path / f"task{i}.safetensors")
        tailor(pair.base, ft, pair.calibration, out=paths[-1], **FIELDS)
    plain, redone = tmp_path / "plain.safetensors", tmp_path / "redone.safetensors"
    assert main(["combine", "--patch", *map(str, paths), "--out", str(plain)]) == 0
    argv = ["combine", "--patch", *map(str, paths), "--out", str(redone), "--redecorate", "--base", str(pair.base)]
    argv += ["--finetuned", str(pair.finetuned), str(second_llama), "--calibration", str(pair.calibration)]
    assert main([*argv, "--samples", "8"]) == 0
    plain_patch, redone_patch = load_patch(plain), load_patch(redone)
    assert redone_patch.tensors.keys() == plain_patch.tensors.keys()
    changed = 0
    for name, tp in plain_patch.tensors.items():
        assert torch.equal(redone_patch.tensors[name].indices, tp.indices), name  # the union mask, unchanged
        record = redone_patch.metadata.stats[name]["redecorated"]
        assert record["mask_timing"] == "fixed" and record["compensation"] == "exact", name
        assert record["used"] in ("compensated", "masked", "reference"), name
        changed += not torch.equal(redone_patch.tensors[name].values, tp.values)
    assert changed > 0
    # Each union entry came from one or both task patches: the counts add up to union + overlap.
    per_patch = [s["per_patch"] for s in redone_patch.metadata.stats.values()]
    union = sum(s["union"] for s in redone_patch.metadata.stats.values())
    overlap = sum(s["overlap"] for s in redone_patch.metadata.stats.values())
    assert sum(map(sum, per_patch)) == union + overlap
    tasks = redone_patch.metadata.multitask["tasks"]
    assert [t["name"] for t in tasks] == [pair.finetuned.name, second_llama.name]
    capsys.readouterr()
    assert main(["inspect", str(redone)]) == 0
    shown = capsys.readouterr().out
    assert "combined from 2 patches (disjoint-mean, re-decorated)" in shown
    assert "patch 1 (" in shown and "patch 2 (" in shown and "task 2 " in shown
