"""Grouped kernel calls in the pipeline (pipeline/groups.py) on the pico Llama: one call per shared input.

Oracle: the same run module by module (``group_modules=False``). Rows are independent in the OBS update
(docs/METHOD.md §8), so the grouped run must give the same keep masks exactly and the same patch values to
fp32 rounding, with the same per-tensor records; runs the grouped kernel does not cover (low-rank structure,
preserve data) fall back to per-module calls and are bitwise the per-module run.
"""

from __future__ import annotations

import json

import pytest
import torch

import model_tailor.pipeline.adapter as adapter

# Fields of a tensor record that must not depend on grouping (seconds do; errors are compared to rounding).
EXACT = ("name", "numel", "kept", "density", "used", "compensation", "mask_timing", "damping", "structure", "rank")
EXACT += ("params", "budget", "data_free")


@pytest.fixture
def calls(monkeypatch):
    """The member names of every grouped kernel call the pipeline makes."""
    seen: list[list[str]] = []
    real = adapter.tailor_group

    def spy(members, hessian, **options):
        seen.append([m.name for m in members])
        return real(members, hessian, **options)

    monkeypatch.setattr(adapter, "tailor_group", spy)
    return seen


def _tailor(pair, **fields):
    from model_tailor.api import tailor

    return tailor(pair.base, pair.finetuned, pair.calibration, density=0.25, samples=4, **fields)


def _assert_same_patch(grouped, single):
    assert set(grouped.patch.tensors) == set(single.patch.tensors)
    for name, tp in single.patch.tensors.items():
        gp = grouped.patch.tensors[name]
        assert torch.equal(gp.indices, tp.indices), name  # the same keep mask, entry for entry
        torch.testing.assert_close(gp.values, tp.values, rtol=1e-5, atol=1e-6, msg=name)


def _assert_same_records(grouped, single):
    assert [layer.block for layer in grouped.report.layers] == [layer.block for layer in single.report.layers]
    for lg, ls in zip(grouped.report.layers, single.report.layers, strict=True):
        assert list(lg.tensors) == list(ls.tensors)  # same targets, same order
        for name, rs in ls.tensors.items():
            rg = lg.tensors[name]
            assert {k: getattr(rg, k) for k in EXACT} == {k: getattr(rs, k) for k in EXACT}, name
            assert rg.error_masked == pytest.approx(rs.error_masked, rel=1e-4, abs=1e-9)
            assert rg.error_compensated == pytest.approx(rs.error_compensated, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"granularity": "tensor", "mask_timing": "upfront", "sensitivity": "revert"},
        {"granularity": "global"},  # fixed masks from one global threshold
        {"compensation": "official", "guard": True},
        {"compensation": "exact", "granularity": "row"},
    ],
    ids=["default", "tensor-upfront-revert", "global", "official", "exact-row"],
)
def test_grouped_run_equals_per_module_run(pico, calls, fields):
    pair = pico("llama")
    grouped = _tailor(pair, **fields)
    groups = sorted(sorted(n.removesuffix(".weight") for n in c) for c in calls)
    # two tuned blocks, each: q/k/v read the attention input, gate/up the MLP input; o and down stand alone
    assert groups == [
        [f"model.layers.{i}.{m}" for m in members]
        for i in (1, 2)
        for members in (("mlp.gate_proj", "mlp.up_proj"), ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"))
    ]
    calls.clear()
    single = _tailor(pair, group_modules=False, **fields)
    assert calls == []
    _assert_same_patch(grouped, single)
    _assert_same_records(grouped, single)


@pytest.mark.parametrize("uncovered", ["lowrank", "preserve"])
def test_uncovered_runs_fall_back_to_per_module_calls(pico, calls, tmp_path, uncovered):
    pair = pico("llama")
    fields = {"structure": "sparse+lowrank"}
    if uncovered == "preserve":  # W* differs per module: no shared target to stack
        preserve = tmp_path / "preserve.jsonl"
        preserve.write_text(json.dumps({"text": "the sky is blue and the water is green ."}) + "\n")
        fields = {"preserve": str(preserve)}
    grouped = _tailor(pair, **fields)
    assert calls == []
    single = _tailor(pair, group_modules=False, **fields)
    assert grouped.patch.equal(single.patch)


def test_grouped_report_and_resume(pico, tmp_path):
    """The grouped run writes the per-module run's report records, and an interrupted grouped run resumes to
    the same patch as an uninterrupted one."""
    from model_tailor.config import TailorConfig
    from model_tailor.pipeline.run import run_tailor

    pair = pico("llama")
    single = _tailor(pair, group_modules=False, out=tmp_path / "single.safetensors")
    cfg = TailorConfig.build(
        base=pair.base, finetuned=pair.finetuned, calibration=pair.calibration, out=tmp_path / "p.safetensors"
    )
    cfg = cfg.model_copy(update={"density": 0.25, "samples": 4})

    def stop(block):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tailor(cfg, on_block_done=stop)
    resumed = run_tailor(cfg)
    assert [layer.resumed for layer in resumed.report.layers] == [True, False]
    fresh = _tailor(pair)
    assert resumed.patch.equal(fresh.patch)
    _assert_same_patch(resumed, single)
    _assert_same_records(resumed, single)
    files = [json.loads((tmp_path / f"{n}.safetensors.report.json").read_text()) for n in ("p", "single")]
    assert files[0]["config"]["group_modules"] is True and files[1]["config"]["group_modules"] is False
    assert [layer["block"] for layer in files[0]["layers"]] == [layer["block"] for layer in files[1]["layers"]]
    for lg, ls in zip(files[0]["layers"], files[1]["layers"], strict=True):
        for name, rs in ls["tensors"].items():
            assert {k: lg["tensors"][name][k] for k in EXACT} == {k: rs[k] for k in EXACT}


def test_cli_flag_turns_grouping_off():
    from model_tailor.cli import build_parser
    from model_tailor.commands.tailor import build_config

    argv = ["tailor", "--base", "/b", "--finetuned", "/f", "--calibration", "/c.jsonl"]
    assert build_config(build_parser().parse_args(argv)).group_modules is True
    assert build_config(build_parser().parse_args([*argv, "--no-group-modules"])).group_modules is False
