"""PEFT in and out with real peft on pico models.

In: the patch from ``--finetuned ADAPTER`` equals the patch from the same adapter merged by peft's
``merge_and_unload``. Out: an exported adapter loaded by stock ``PeftModel.from_pretrained`` gives the logits
of ``model-tailor apply``'s model, for sparse (SHiRA), low-rank + kept norm (LoRA) and sparse + low-rank patches.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")

from model_tailor.api import tailor  # noqa: E402
from model_tailor.cli import main  # noqa: E402
from model_tailor.patch.apply import apply_patches  # noqa: E402
from model_tailor.patch.format import load_patch  # noqa: E402

FIELDS = {"density": 0.25, "block_size": 16, "samples": 8}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "llava": r".*language_model.*\.(q_proj|v_proj|down_proj)"}
SAVED = {"llama": ["model.norm"], "llava": ["model.language_model.norm", "multi_modal_projector.linear_1"]}


def _adapter(pair, root, arch):
    """A trained-looking LoRA: random A and B, per-module rank/alpha, rsLoRA, modules_to_save changed."""
    torch.manual_seed(0)
    model = pair.model_cls.from_pretrained(pair.base)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[arch],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
        modules_to_save=SAVED[arch],
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    pm.save_pretrained(root / "adapter")
    pm.merge_and_unload().save_pretrained(root / "merged")
    for side in pair.base.iterdir():  # tokenizer / processor for the merged folder's calibration
        if not side.name.endswith(".safetensors") and not (root / "merged" / side.name).exists():
            shutil.copy(side, root / "merged" / side.name)
    return root / "adapter", root / "merged"


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_adapter_patch_equals_merged_patch(pico, tmp_path, arch):
    pair = pico(arch)
    adapter, merged = _adapter(pair, tmp_path, arch)
    a = tailor(pair.base, adapter, pair.calibration, **FIELDS)
    m = tailor(pair.base, merged, pair.calibration, **FIELDS)
    assert sorted(a.patch.tensors) == sorted(m.patch.tensors)
    assert [t["name"] for t in a.report.plan.targets] == [t["name"] for t in m.report.plan.targets]
    assert len(a.report.plan.targets) == (9 if arch == "llama" else 6)  # the adapter's targets, not all deltas
    for name, tp in a.patch.tensors.items():
        torch.testing.assert_close(tp.to_dense(), m.patch.tensors[name].to_dense(), rtol=1e-5, atol=1e-6)
    saved = {n["name"]: n for n in a.report.plan.non_targets if "modules_to_save" in n["reason"]}
    assert saved and all(n["action"] == "reset" for n in saved.values())  # the non-target policy


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({}, "SHIRA"),
        ({"structure": "lowrank", "non_target_policy": "keep"}, "LORA"),
        ({"structure": "sparse+lowrank"}, "LORA"),
    ],
)
def test_exported_adapter_reproduces_apply(pico, tmp_path, fields, kind, capsys):
    pair = pico("llama")
    patch = tmp_path / "p.safetensors"
    tailor(pair.base, pair.finetuned, pair.calibration, out=patch, **{**FIELDS, **fields})
    out = tmp_path / "adapter"
    rc = main(["export", str(patch), "--base", str(pair.base), "--format", "peft", "--out", str(out)])
    assert rc == 0 and f"peft_type {kind}" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == kind
    card = (out / "README.md").read_text()
    density = load_patch(patch).summary().density  # 0.25 for the sparse patch (sizes are multiples of 4)
    assert fields or density == 0.25
    assert "library_name: peft" in card and f"density {density:.4f}" in card and str(pair.calibration) in card
    apply_patches(pair.base, [patch], tmp_path / "applied")
    applied = pair.model_cls.from_pretrained(tmp_path / "applied").eval()
    loaded = peft.PeftModel.from_pretrained(pair.model_cls.from_pretrained(pair.base), out).eval()
    ids = torch.randint(7, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(applied, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(applied, ids), _logits(pair.model_cls.from_pretrained(pair.base).eval(), ids))


def test_export_bad_input_one_line_nothing_written(pico, tmp_path, capsys):
    pair = pico("llama")
    patch = tmp_path / "p.safetensors"
    tailor(pair.base, pair.finetuned, pair.calibration, out=patch, structure="lowrank", **FIELDS)
    other = pico("gpt2").base
    capsys.readouterr()  # the fixtures' own output
    cases = [
        (["--base", str(other)], "does not fit base"),
        (["--base", str(pair.base), "--peft-type", "shira"], "low-rank factors"),
    ]
    for extra, needle in cases:
        out = tmp_path / "adapter"
        rc = main(["export", str(patch), "--format", "peft", "--out", str(out), *extra])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and needle in err and len(err.splitlines()) == 1, err
        assert not out.exists() and not any(p.name.startswith(".adapter") for p in tmp_path.iterdir())


def test_tailor_cli_rejects_corrupt_adapter(pico, tmp_path, capsys):
    pair = pico("llama")
    adapter, _ = _adapter(pair, tmp_path, "llama")
    capsys.readouterr()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    out = tmp_path / "p.safetensors"
    argv = ["tailor", "--base", str(pair.base), "--finetuned", str(adapter), "--calibration", str(pair.calibration)]
    rc = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "not valid JSON" in err and len(err.splitlines()) == 1
    assert not out.exists()
