"""End to end on a pico Llama: tailor -> patch -> apply -> load -> forward; policies, granularities,
resume."""

from __future__ import annotations

import pytest
import torch


def test_llama_default(tailor_and_check):
    check = tailor_and_check("llama")
    report = check.result.report
    assert [layer.block for layer in report.layers] == ["model.layers.1", "model.layers.2"]
    # layer 0 was not fine-tuned: no target there, its tensors are copied through
    assert not any(".layers.0." in t["name"] for t in report.plan.targets)
    assert all(n["action"] == "reset" for n in report.plan.non_targets)
    assert "model.norm.weight" in {n["name"] for n in report.plan.non_targets}


def test_llama_keep_policy_and_row_granularity(tailor_and_check):
    check = tailor_and_check("llama", non_target_policy="keep", granularity="row", compensation="exact")
    assert torch.equal(check.patched["model.norm.weight"], check.finetuned["model.norm.weight"])


@pytest.mark.parametrize("compensation", ["official", "none"])
def test_llama_compensation_switches(tailor_and_check, compensation):
    check = tailor_and_check("llama", compensation=compensation, granularity="tensor")
    stats = [s for layer in check.result.report.layers for s in layer.tensors.values()]
    assert all(s.compensation == compensation for s in stats)


def test_llama_global_granularity(pico, tmp_path):
    from model_tailor.api import tailor

    pair = pico("llama")
    res = tailor(pair.base, pair.finetuned, pair.calibration, density=0.25, granularity="global", samples=4)
    kept = sum(tp.nnz for tp in res.patch.tensors.values())
    total = sum(layer.numel for layer in res.report.layers)
    assert kept == total // 4


def test_llama_include_exclude(pico):
    from model_tailor.api import tailor

    pair = pico("llama")
    res = tailor(
        pair.base,
        pair.finetuned,
        pair.calibration,
        density=0.25,
        samples=4,
        include=["*.mlp.*"],
        exclude=["*down_proj*"],
    )
    names = [t["name"] for t in res.report.plan.targets]
    assert names and all(".mlp." in n and "down_proj" not in n for n in names)
    reasons = {n["name"]: n["reason"] for n in res.report.plan.non_targets}
    assert "excluded by pattern" in reasons["model.layers.1.mlp.down_proj.weight"]


def test_llama_data_free_and_tailor_policy(pico, tmp_path):
    from model_tailor.api import tailor

    pair = pico("llama")
    res = tailor(
        pair.base,
        pair.finetuned,
        None,
        alpha=1.0,
        compensation="none",
        density=0.25,
        non_target_policy="tailor",
        out=tmp_path / "p.safetensors",
    )
    assert res.report.calibration == {"mode": "data-free"}
    assert all(s.data_free for layer in res.report.layers for s in layer.tensors.values())


def test_llama_resume(pico, tmp_path):
    """An interrupted run restarts from the last finished block (checkpoint per block), then cleans up."""
    from model_tailor.api import tailor
    from model_tailor.config import TailorConfig
    from model_tailor.pipeline.run import run_tailor

    pair = pico("llama")
    out = tmp_path / "p.safetensors"
    done = []

    def interrupt_after_first(block):
        done.append(block)
        raise KeyboardInterrupt  # as a Ctrl-C right after the first block is checkpointed

    cfg = TailorConfig.build(
        base=pair.base, finetuned=pair.finetuned, calibration=pair.calibration, out=out, density=0.25, samples=4
    )
    with pytest.raises(KeyboardInterrupt):
        run_tailor(cfg, on_block_done=interrupt_after_first)
    assert done == ["model.layers.1"]
    assert not out.exists()
    assert any(p.name.startswith(".p.safetensors.work-") for p in tmp_path.iterdir())
    res = tailor(pair.base, pair.finetuned, pair.calibration, out=out, density=0.25, samples=4)
    resumed = {layer.block: layer.resumed for layer in res.report.layers}
    assert resumed == {"model.layers.1": True, "model.layers.2": False}
    assert out.exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    fresh = tailor(pair.base, pair.finetuned, pair.calibration, density=0.25, samples=4)
    assert fresh.patch.equal(res.patch)


def test_llama_fapm_salience_reaches_every_tensor(pico, tmp_path):
    """``salience: fapm`` from the API down to each kernel call: data-free with one group per row, every
    patch keeps exactly each row's top FAPM scores of that tensor's delta."""
    from safetensors.torch import load_file

    from model_tailor.api import tailor
    from model_tailor.kernel.baselines import fapm_scores

    pair = pico("llama")
    res = tailor(
        pair.base,
        pair.finetuned,
        None,
        alpha=1.0,
        compensation="none",
        density=0.25,
        granularity="row",
        salience="fapm",
    )
    base = {k: v for f in sorted(pair.base.glob("*.safetensors")) for k, v in load_file(f).items()}
    ft = {k: v for f in sorted(pair.finetuned.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert res.patch.tensors
    for name, tp in res.patch.tensors.items():
        b, f = base[name].float(), ft[name].float()
        top = fapm_scores(f - b, b).topk(int(0.25 * b.shape[1]), dim=1).indices
        expected = torch.zeros(b.shape, dtype=torch.bool).scatter_(1, top, True)
        assert torch.equal(tp.indices, expected.flatten().nonzero().flatten()), name


def test_llama_compensation_from_leaves_early_layers_plain(pico):
    """``compensation_from: 2``: layer 1 is tailored exactly as with ``compensation: none`` (same inputs, same
    mask, kept entries at their fine-tuned values), layer 2 is compensated; 0 is the default run."""
    from model_tailor.api import tailor

    pair = pico("llama")
    common = dict(density=0.25, samples=4, granularity="tensor")
    split = tailor(pair.base, pair.finetuned, pair.calibration, compensation_from=2, **common)
    plain = tailor(pair.base, pair.finetuned, pair.calibration, compensation="none", **common)
    default = tailor(pair.base, pair.finetuned, pair.calibration, **common)
    assert tailor(pair.base, pair.finetuned, pair.calibration, compensation_from=0, **common).patch.equal(default.patch)
    by_block = {layer.block: layer.tensors for layer in split.report.layers}
    assert {s.compensation for s in by_block["model.layers.1"].values()} == {"none"}
    assert {s.compensation for s in by_block["model.layers.2"].values()} == {"obs"}
    for name, tp in split.patch.tensors.items():
        other = plain.patch.tensors[name]
        if ".layers.1." in name:
            assert torch.equal(tp.indices, other.indices) and torch.equal(tp.values, other.values), name
        else:
            assert not torch.equal(tp.values, other.values), name


def test_llama_compensation_depth_is_compensation_from_counted_from_the_last_layer(pico):
    """``compensation_depth: (L - 2) / L`` compensates the deepest L - 2 of the L layers, so it starts at layer 2,
    as ``compensation_from: 2`` does: the same patch, bit for bit; and the report says which blocks were plain."""
    import json

    from model_tailor.api import tailor

    pair = pico("llama")
    layers = json.loads((pair.base / "config.json").read_text())["num_hidden_layers"]
    common = dict(density=0.25, samples=4, granularity="tensor")
    by_index = tailor(pair.base, pair.finetuned, pair.calibration, compensation_from=2, **common)
    by_depth = tailor(pair.base, pair.finetuned, pair.calibration, compensation_depth=(layers - 2) / layers, **common)
    assert by_depth.patch.equal(by_index.patch)
    compensation = {layer.block: {s.compensation for s in layer.tensors.values()} for layer in by_depth.report.layers}
    assert compensation["model.layers.1"] == {"none"} and compensation["model.layers.2"] == {"obs"}


def test_llama_blocks_before_the_first_target_load_once(pico, monkeypatch):
    """Layer 0 holds no target: the calibration stream goes through it with the block loaded once for all
    batches, not once per batch (a hooked whole-model forward would load it for each of the 4 batches)."""
    from model_tailor.api import tailor
    from model_tailor.pipeline.weights import Materializer

    loads: list[str] = []
    real = Materializer.load

    def counting(self, path, *, recurse=True):
        if recurse:
            loads.append(path)
        return real(self, path, recurse=recurse)

    monkeypatch.setattr(Materializer, "load", counting)
    pair = pico("llama")
    res = tailor(pair.base, pair.finetuned, pair.calibration, density=0.25, samples=4, batch_size=1)
    assert [layer.block for layer in res.report.layers] == ["model.layers.1", "model.layers.2"]
    assert loads.count("model.layers.0") == 1
    assert loads.count("model.layers.1") == loads.count("model.layers.2") == 1
