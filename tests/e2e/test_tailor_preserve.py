"""Preserve-aware tailoring end to end (docs/METHOD.md §14): the dual objective, ``--preserve self`` and low-rank
structures on the pico Llama and LLaVA fixtures."""

from __future__ import annotations

import json

import pytest
import torch

from model_tailor.api import tailor
from model_tailor.cli import main
from model_tailor.patch.format import load_patch

# Original-ability records in the fixtures' vocabulary, on other topics than the calibration records.
PRESERVE = [
    {"text": "the sky is blue and the water is green ."},
    {"prompt": "where is the bird ?", "response": "the bird is in the tree ."},
    {"prompt": "is there a woman ?", "response": "no , there is a man ."},
    {"text": "one two three big small red"},
]
FIELDS = {"density": 0.25, "block_size": 16, "samples": 16}
TRADEOFF = ("target_error_masked", "target_error_final", "preserve_error_masked", "preserve_error_final")


@pytest.fixture
def preserve_file(tmp_path):
    path = tmp_path / "preserve.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PRESERVE))
    return path


def _total(result, key):
    return sum(layer.error(key) for layer in result.report.layers)


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_lambda_zero_equals_plain_and_lambda_trades_off(pico, preserve_file, arch):
    pair = pico(arch)
    plain = tailor(pair.base, pair.finetuned, pair.calibration, **FIELDS)
    dual = {"preserve": str(preserve_file), **FIELDS}
    zero = tailor(pair.base, pair.finetuned, pair.calibration, preserve_weight=0.0, **dual)
    one = tailor(pair.base, pair.finetuned, pair.calibration, preserve_weight=1.0, **dual)
    # lambda = 0 runs the kernel on the trace-normalised H_t: the same masks, values equal up to float rounding
    # (not bitwise: the scaled Hessian factorises with different rounding).
    assert set(zero.patch.tensors) == set(plain.patch.tensors)
    for name, tp in plain.patch.tensors.items():
        assert torch.equal(zero.patch.tensors[name].indices, tp.indices), name
        torch.testing.assert_close(zero.patch.tensors[name].values, tp.values, rtol=1e-4, atol=1e-5)
    assert plain.report.preserve == {} and zero.report.preserve["preserve_weight"] == 0.0
    for layer in one.report.layers:
        assert layer.n_tokens_preserve > 0
        assert all(all(getattr(s, k) is not None for k in TRADEOFF) for s in layer.tensors.values())
    # Fixture expectation, not a theorem: on these pico models lambda = 1 keeps the base outputs on the preserve
    # data better than lambda = 0 (~plain) after compensation, and pays on the target side.
    assert _total(one, "preserve_error_final") < _total(zero, "preserve_error_final")
    assert _total(one, "target_error_final") > _total(zero, "target_error_final")
    assert "pres final" in one.report.to_text()


def test_preserve_self_is_deterministic_and_recorded(pico, tmp_path):
    pair = pico("llama")
    runs = []
    for k in range(2):  # separate caches: the second run generates again instead of reading the first's cache
        out = tmp_path / f"run{k}" / "p.safetensors"
        out.parent.mkdir()
        res = tailor(
            pair.base,
            pair.finetuned,
            pair.calibration,
            out=out,
            preserve="self",
            preserve_samples=6,
            preserve_max_new_tokens=6,
            cache_dir=tmp_path / f"cache{k}",
            **FIELDS,
        )
        records = out.with_name("p.safetensors.preserve.jsonl")
        assert records.is_file()
        runs.append((res, records.read_text(), json.loads(out.with_name("p.safetensors.report.json").read_text())))
    (a, text_a, rep_a), (b, text_b, rep_b) = runs
    # `self`: the base answers the inputs of each of the 5 calibration records (all of them: fewer than the 32 asked
    # for; continuations of texts, answers to first user turns), then the 6 generic instructions
    lines = [json.loads(line) for line in text_a.splitlines()]
    assert text_a == text_b and len(lines) == 5 + 6
    assert [r["self"]["from"] for r in lines] == ["calibration-text"] * 5 + ["generic"] * 6
    assert all("text" in r or r["messages"][-1]["role"] == "assistant" for r in lines[:5])
    assert all(r["messages"][1]["role"] == "assistant" for r in lines[5:])
    assert a.patch.equal(b.patch)
    pre = rep_a["preserve"]
    assert pre["source"] == "self" and pre["generated"] == 11 and pre["spec"]["max_new_tokens"] == 6
    assert pre["records"] == {"calibration_images": 0, "calibration_texts": 5, "generic": 6}
    assert pre["file"].endswith("p.safetensors.preserve.jsonl") and pre["sha256"] == rep_b["preserve"]["sha256"]
    assert any(p.name.startswith("self-preserve-") for p in (tmp_path / "cache0").iterdir())


@pytest.mark.parametrize("structure", ["lowrank", "sparse+lowrank"])
def test_structures_write_v2_apply_and_fit_the_budget(pico, preserve_file, tmp_path, structure):
    pair = pico("llama")
    out, model_dir = tmp_path / "p.safetensors", tmp_path / "tailored"
    res = tailor(
        pair.base,
        pair.finetuned,
        pair.calibration,
        out=out,
        save_model=model_dir,
        preserve=str(preserve_file),
        structure=structure,
        **FIELDS,
    )
    patch = load_patch(out)
    assert patch.metadata.format_version == "2" and patch.has_lowrank
    targets = {t["name"] for t in res.report.plan.targets}
    for name in targets:
        tp = patch.tensors[name]
        rows, cols = tp.shape
        rank = 0 if tp.lowrank is None else tp.lowrank[0].shape[1]
        params = tp.nnz + rank * (rows + cols)  # a rank-r pair costs r (rows + cols) parameters
        assert params <= FIELDS["density"] * rows * cols, (name, params)
        stats = next(layer.tensors[name] for layer in res.report.layers if name in layer.tensors)
        assert (stats.structure, stats.rank, stats.params) == (structure, rank, params)
    assert any(tp.lowrank is not None and tp.lowrank[0].shape[1] > 0 for tp in patch.tensors.values())
    if structure == "sparse+lowrank":
        assert any(patch.tensors[n].nnz for n in targets)
    applied = tmp_path / "applied"
    assert main(["apply", "--base", str(pair.base), "--patch", str(out), "--out", str(applied)]) == 0
    from model_tailor.io.checkpoint import CheckpointReader

    got, saved = CheckpointReader(applied), CheckpointReader(model_dir)
    for name in targets:
        torch.testing.assert_close(got.get(name), saved.get(name), rtol=0, atol=1e-6)
        assert not torch.equal(got.get(name), CheckpointReader(pair.base).get(name))


def _q_proj_hessian(pair, records_path, layer_path="model.layers.1.self_attn.q_proj"):
    """Independent H = X X^T of one linear's inputs over non-padding tokens, from a plain HF forward of base.

    Layer 0 of the pico Llama is not fine-tuned and layer 1's norm is reset to base, so both streams reach
    layer 1 through base weights."""
    from model_tailor.calibration.data import build_calibration

    model = pair.model_cls.from_pretrained(pair.base).eval()
    cal = build_calibration(
        records_path, pair.finetuned, samples=16, max_tokens=512, batch_size=4, seed=0, model_cls=pair.model_cls
    )
    xs = []
    handle = model.get_submodule(layer_path).register_forward_hook(lambda m, a, o: xs.append(a[0]))
    H = torch.zeros(32, 32, dtype=torch.float64)
    with torch.no_grad():
        for batch in cal.batches:
            xs.clear()
            model(**batch.inputs, use_cache=False)
            x = xs[0][batch.token_mask].double()
            H += x.T @ x
    handle.remove()
    return H


def test_dense_preserve_equals_closed_form(pico, preserve_file):
    pair = pico("llama")
    lam, name = 1.0, "model.layers.1.self_attn.q_proj.weight"
    res = tailor(
        pair.base,
        pair.finetuned,
        pair.calibration,
        preserve=str(preserve_file),
        preserve_weight=lam,
        density=1.0,
        percdamp=0.0,
        samples=16,
    )
    from model_tailor.io.checkpoint import CheckpointReader

    W_pre = CheckpointReader(pair.base).get(name).double()
    W_ft = CheckpointReader(pair.finetuned).get(name).double()
    H_t, H_o = _q_proj_hessian(pair, pair.calibration), _q_proj_hessian(pair, preserve_file)
    H_t, H_o = H_t / (H_t.trace() / 32), H_o / (H_o.trace() / 32)
    expected = W_pre + (W_ft - W_pre) @ H_t @ torch.linalg.inv(H_t + lam * H_o)  # the closed form of docs/METHOD.md §14
    got = res.patch.tensors[name].apply(W_pre.float()).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    assert not torch.allclose(got, W_ft, atol=1e-3)  # the preserve term moved it away from the fine-tuned weight


def test_blocks_before_compensation_from_are_plain_whatever_the_structure(pico, preserve_file):
    """``compensation_from: 2`` with preserve data and low rank: layer 1 is the plain patch (sparse, kept entries at
    their fine-tuned values, no preserve term), equal to the ``compensation: none`` run's layer 1; layer 2 is the
    preserve-aware low-rank fit."""
    pair = pico("llama")
    common = {**FIELDS, "granularity": "tensor"}
    split = tailor(
        pair.base,
        pair.finetuned,
        pair.calibration,
        preserve=str(preserve_file),
        structure="lowrank",
        compensation_from=2,
        **common,
    )
    plain = tailor(pair.base, pair.finetuned, pair.calibration, compensation="none", **common)
    records = {layer.block: list(layer.tensors.values()) for layer in split.report.layers}
    assert {(s.structure, s.compensation) for s in records["model.layers.1"]} == {("sparse", "none")}
    assert {s.structure for s in records["model.layers.2"]} == {"lowrank"}
    assert all(s.preserve_error_final is None for s in records["model.layers.1"])
    assert all(s.preserve_error_final is not None for s in records["model.layers.2"])
    assert not [w for w in split.report.warnings if "preserve tokens" in w]
    tokens = {layer.block: layer.n_tokens_preserve for layer in split.report.layers}
    assert tokens["model.layers.1"] == 0 < tokens["model.layers.2"]  # the plain block accumulates no H_o
    layer1 = [n for n in split.patch.tensors if ".layers.1." in n]
    assert layer1
    for name in layer1:
        ours, other = split.patch.tensors[name], plain.patch.tensors[name]
        assert torch.equal(ours.indices, other.indices) and torch.equal(ours.values, other.values), name


def test_preset_self_lowrank_from_the_command_line(pico, tmp_path, capsys):
    """``--preset self-lowrank``: self data generated by the base, low-rank factors at lambda 3 in the deepest
    ceil(0.4 L) layers (layers 1 and 2 of the pico Llama's 3, which hold every target), all in the report."""
    pair = pico("llama")
    out = tmp_path / "p.safetensors"
    argv = ["tailor", "--base", str(pair.base), "--finetuned", str(pair.finetuned), "--calibration"]
    argv += [str(pair.calibration), "--out", str(out), "--preset", "self-lowrank", "--quiet", "--samples", "16"]
    argv += ["--preserve-samples", "4", "--preserve-max-new-tokens", "4", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.with_name("p.safetensors.report.json").read_text())
    assert report["config"]["preset"] == "self-lowrank"
    assert (report["preserve"]["source"], report["preserve"]["preserve_weight"]) == ("self", 3.0)
    tensors = [t for layer in report["layers"] for t in layer["tensors"].values()]
    assert tensors and {t["structure"] for t in tensors} == {"lowrank"}
    patch = load_patch(out)
    assert all(tp.lowrank is not None for tp in patch.tensors.values())
