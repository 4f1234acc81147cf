"""The bench's pairs (bench.pairs): which rows each variant lists, how --methods / --pairs select them, and the
per-pair analysis (ratios against each pair's own anchors, the LoRA pair against the full fine-tune too) with
known answers on hand-made per-item outcomes."""

from __future__ import annotations

import pytest

from model_tailor.bench import methods as M
from model_tailor.bench import pairs as P
from model_tailor.bench.analysis import finalize
from model_tailor.bench.models import BuildConfig
from model_tailor.bench.report import markdown_report, pareto_panels, plot_pareto
from model_tailor.bench.results import BenchResult, Row
from model_tailor.errors import ConfigError

BUILD = BuildConfig()


def _full(engine="pipeline"):
    return P.variant_specs(False, engine, False, BUILD)


def test_quick_variant_is_unchanged_and_the_full_one_adds_the_pairs():
    assert P.variant_specs(True, "pipeline", False, BUILD) == M.method_specs(True, "pipeline")
    full = _full()
    assert full[: len(M.method_specs(False, "pipeline"))] == M.method_specs(False, "pipeline")
    assert len({s.key() for s in full}) == len(full)
    main = {s.method for s in full if s.pair == "main"}
    assert {"lora_r16", "lora_r64", "rehearsal_0.25", "rehearsal_0.50"} <= main
    lora = [s for s in full if s.pair == "lora_r16"]
    assert [(s.method, s.density) for s in lora] == [("lora_r16+mt", 0.05), ("lora_r16+mt", 0.10)]
    assert all(s.params["engine"] == "pipeline" and s.params["adapter"]["rank"] == 16 for s in lora)
    every = [(s.method, s.density) for s in full if s.pair == "all_layers"]
    assert every[:4] == [("pretrained", None), ("finetuned", None), ("model_tailor", 0.05), ("model_tailor", 0.1)]
    assert {("magnitude", 0.05), ("fapm", 0.1), ("lora_r16", None)} <= set(every)
    assert sum(m == M.PRESERVE_METHOD for m, _ in every) == len(P.ALL_LAYERS_PRESERVE) + len(M.SELF_LOWRANK_DEPTHS)
    assert not [s for s in _full("inmemory") if s.pair == "all_layers" and s.method == M.PRESERVE_METHOD]
    kinds = {(s.pair, s.method): P.kind_of(s) for s in full}
    assert kinds[("main", "lora_r16")] == kinds[("main", "rehearsal_0.50")] == "retrain"
    assert kinds[("all_layers", "finetuned")] == "anchor" and kinds[("lora_r16", "lora_r16+mt")] == "post-hoc"
    assert P.kind_of(M.MethodSpec("lora_r16", pair="lora_r16")) == "anchor"  # the LoRA pair's fine-tuned anchor
    # the main pair's keys are those of the rows before pairs existed (cached evaluations stay valid)
    assert M.MethodSpec("magnitude", 0.1).key() == '{"d": 0.1, "m": "magnitude", "p": {}}'
    assert M.MethodSpec("magnitude", 0.1, pair="all_layers").label == "all_layers:magnitude@0.1"


def test_rehearsal_and_lora_keys_follow_their_settings():
    lr = {s.params["lr"] for s in _full() if s.method == "lora_r16"}
    assert lr == {10 * BUILD.ft_lr}
    other = P.variant_specs(False, "pipeline", False, BuildConfig(ft_lr=2e-4))
    assert {s.key() for s in other if s.pair == "lora_r16"}.isdisjoint({s.key() for s in _full()})


def _picked(**kw):
    return [(s.pair, s.method, s.density) for s in P.select(_full(), **kw)]


def test_select_keeps_each_pairs_anchors():
    assert _picked(only=("lora_r16+mt",)) == [
        ("main", "pretrained", None),
        ("main", "finetuned", None),
        ("main", "lora_r16", None),
        ("lora_r16", "lora_r16+mt", 0.05),
        ("lora_r16", "lora_r16+mt", 0.1),
    ]
    fapm = _picked(only=("fapm",))
    assert {p for p, *_ in fapm} == {"main", "all_layers"}
    assert ("all_layers", "pretrained", None) in fapm and ("all_layers", "finetuned", None) in fapm
    only_all = _picked(only=("fapm",), pairs=("all_layers",))
    assert only_all == [("all_layers", m, d) for m, d in [("pretrained", None), ("finetuned", None)]] + [
        ("all_layers", "fapm", 0.05),
        ("all_layers", "fapm", 0.1),
    ]
    assert {p for p, *_ in _picked(pairs=("all_layers",))} == {"all_layers"}
    assert {p for p, *_ in _picked(only=("rehearsal*",))} == {"main"}


def test_select_refuses_unknown_pairs_and_empty_selections():
    with pytest.raises(ConfigError, match="--pairs nope"):
        P.select(_full(), pairs=("nope",))
    with pytest.raises(ConfigError, match="not in this variant"):
        P.select(P.variant_specs(True, "pipeline", False, BUILD), pairs=("all_layers",))
    with pytest.raises(ConfigError, match="matches no row of --pairs lora_r16"):
        P.select(_full(), only=("fapm",), pairs=("lora_r16",))


def _rows(extended=False, **kw):
    listed = P.variant_rows(False, "pipeline", extended, BUILD)
    picked = P.select(listed, **kw)
    return [(s.pair, s.method, s.density, s.params.get("k") or s.params.get("structure")) for s in picked]


def test_the_full_variant_runs_exactly_its_headline_rows():
    assert _rows() == [
        ("main", "pretrained", None, None),
        ("main", "finetuned", None, None),
        ("main", "model_tailor", 0.05, None),
        ("main", "model_tailor", 0.1, None),
        ("main", "mt_salience_only", 0.1, None),
        ("main", M.PRESERVE_METHOD, 0.1, "lowrank"),  # preserve=user (checked below)
        ("main", M.PRESERVE_METHOD, 0.1, "lowrank"),  # preserve=self
        ("main", "magnitude", 0.1, None),
        ("main", "ties", 0.1, None),
        ("main", "fapm", 0.1, None),
        ("main", "svd", 0.1, None),
        ("main", "lines", None, None),
        ("main", "revert_first_k", None, 6),
        ("main", "lora_r16", None, None),
        ("main", "lora_r64", None, None),
        ("main", "rehearsal_0.25", None, None),
        ("main", "rehearsal_0.50", None, None),
        ("lora_r16", "lora_r16+mt", 0.1, None),
        ("all_layers", "pretrained", None, None),
        ("all_layers", "finetuned", None, None),
        ("all_layers", "model_tailor", 0.05, None),
        ("all_layers", "model_tailor", 0.1, None),
        ("all_layers", "mt_salience_only_late", 0.1, None),
        ("all_layers", M.PRESERVE_METHOD, 0.1, "lowrank"),
        ("all_layers", M.PRESERVE_METHOD, 0.1, "lowrank"),
        ("all_layers", "magnitude", 0.1, None),
        ("all_layers", "fapm", 0.1, None),
        ("all_layers", "lora_r16", None, None),
    ]
    picked = P.select(P.variant_rows(False, "pipeline", False, BUILD))
    preserve = [(s.params["preserve"], s.params["lambda"]) for s in picked if s.method == M.PRESERVE_METHOD]
    assert preserve == [("user", 1.0), ("self", 3.0), ("user", 1.0), ("self", 3.0)]
    # every headline names a row of the catalogue, and one only
    catalogue = P.variant_specs(False, "pipeline", False, BUILD)
    assert all(sum(h.matches(s) for s in catalogue) == 1 for h in P.HEADLINE)
    # --extended is the whole catalogue (preserve ablations included); the quick variant is unchanged
    assert P.variant_rows(False, "pipeline", True, BUILD) == P.variant_specs(False, "pipeline", True, BUILD)
    assert P.variant_rows(True, "pipeline", False, BUILD) == M.method_specs(True, "pipeline")
    # filters narrow the headline rows; the opt-in multitask pair stays reachable by name
    assert _rows(only=("fapm",), pairs=("all_layers",)) == [
        ("all_layers", "pretrained", None, None),
        ("all_layers", "finetuned", None, None),
        ("all_layers", "fapm", 0.1, None),
    ]
    assert {p for p, *_ in _rows(pairs=("multitask",))} == {"multitask"}
    assert ("main", "dare", 0.1, None) in _rows(extended=True, only=("dare",))


def test_headline_matches_on_pair_method_density_and_the_params_it_names():
    h = P.Headline("main", "revert_first_k", None, (("k", 6),))
    assert h.matches(M.MethodSpec("revert_first_k", None, {"k": 6}))
    assert not h.matches(M.MethodSpec("revert_first_k", None, {"k": 3}))
    assert not h.matches(M.MethodSpec("revert_first_k", None, {"k": 6}, pair="all_layers"))
    d = P.Headline("main", "fapm", 0.10)
    assert d.matches(M.MethodSpec("fapm", 0.1)) and d.matches(M.MethodSpec("fapm", 0.05 + 0.05))
    assert not d.matches(M.MethodSpec("fapm", 0.05)) and not d.matches(M.MethodSpec("fapm"))
    absent = P.Headline("main", "x", 0.1, (("lambda", 3.0), ("depth", None)))  # None: the row lacks the param
    assert absent.matches(M.MethodSpec("x", 0.1, {"lambda": 3.0}))
    assert not absent.matches(M.MethodSpec("x", 0.1, {"lambda": 3.0, "depth": 0.25}))


def test_a_row_only_the_catalogue_has_points_to_extended(tmp_path):
    from model_tailor.bench.runner import BenchConfig, _pick

    with pytest.raises(ConfigError, match="--methods dare matches no row.*--extended lists it"):
        _pick(BenchConfig(cache_dir=tmp_path, only=("dare",)))
    with pytest.raises(ConfigError, match="matches no row") as err:
        _pick(BenchConfig(cache_dir=tmp_path, only=("nothing_like_it",)))
    assert "--extended" not in str(err.value)
    assert [s.method for s in _pick(BenchConfig(cache_dir=tmp_path, extended=True, only=("dare",)))][-1] == "dare"
    assert not (tmp_path / "tailorbench").exists()


def test_cli_refuses_an_unknown_pair_in_one_line(tmp_path, capsys):
    from model_tailor.cli import main

    assert main(["bench", "--pairs", "nope", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pairs nope" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


# per-item hits (capital_qa, captioning, easy_vqa), four items each; every log-prob -1 (LL ratios 1)
HITS = {
    ("main", "pretrained"): ([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]),  # original 0.75
    ("main", "finetuned"): ([1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]),  # target 1.0
    ("main", "model_tailor"): ([1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]),
    ("main", "lora_r16"): ([1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]),  # original 0.625, target 0.5
    ("lora_r16", "lora_r16+mt"): ([1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]),  # original 0.75, target 0.25
    ("all_layers", "pretrained"): ([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]),
    ("all_layers", "finetuned"): ([0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]),  # target 0.75
    ("all_layers", "model_tailor"): ([1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]),  # 0.625 / 0.75, 0.5 / 0.75
    ("all_layers", "magnitude"): ([1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]),  # 0.5 / 0.75, 1.0
}
TASKS = ("capital_qa", "captioning", "easy_vqa")


def _rows_and_files():
    rows, files, specs = [], {}, []
    for (pair, method), hits in HITS.items():
        density = 0.1 if method in ("model_tailor", "lora_r16+mt", "magnitude") else None
        spec = M.MethodSpec(method, density, {}, pair)
        items = f"items/{pair}-{method}.json"
        files[items] = {
            "label": spec.label,
            "tasks": {t: {"hit": h, "logprob": [-1.0] * 4} for t, h in zip(TASKS, hits, strict=True)},
        }
        acc = {t: sum(h) / 4 for t, h in zip(TASKS, hits, strict=True)}
        original, target = {t: acc[t] for t in TASKS[:2]}, {"easy_vqa": acc["easy_vqa"]}
        row = Row(method, density, {}, original, target, sum(original.values()) / 2, acc["easy_vqa"], items=items)
        row.pair, row.kind = pair, P.kind_of(spec)
        rows.append(row)
        specs.append(spec)
    return P.arrange(rows[::-1], specs), files


def test_finalize_measures_every_pair_against_its_own_anchors():
    rows, files = _rows_and_files()
    assert [(r.pair, r.method) for r in rows] == [
        *[k for k in HITS if k[0] == "main"],
        ("lora_r16", "pretrained"),
        ("lora_r16", "lora_r16"),
        ("lora_r16", "lora_r16+mt"),
        *[k for k in HITS if k[0] == "all_layers"],
    ]
    finalize(rows, files, resamples=300, seed=0, anchors=P.anchors(), full_finetune=P.full_finetune())
    got = {(r.pair, r.method): r for r in rows}
    lora_main, lora_copy, lora_mt = (
        got[("main", "lora_r16")],
        got[("lora_r16", "lora_r16")],
        got[("lora_r16", "lora_r16+mt")],
    )
    assert (lora_main.retention, lora_main.target_ratio) == (pytest.approx(0.625 / 0.75), 0.5)
    assert lora_main.kind == "retrain" and lora_copy.kind == "anchor" and lora_copy.extra["copy_of"] == "main:lora_r16"
    assert lora_copy.retention == lora_main.retention and lora_copy.target_ratio == 1.0
    assert lora_copy.intervals["target_ratio"] == [1.0, 1.0] and lora_main.intervals["target_ratio"] != [1.0, 1.0]
    # one resampling for every pair: the same model against the same anchor gets the same interval
    assert lora_copy.intervals["retention"] == lora_main.intervals["retention"]
    assert (lora_mt.retention, lora_mt.target_ratio, lora_mt.h_score) == (1.0, 0.5, pytest.approx(2 / 3))
    full = lora_mt.vs_full_finetune
    assert (
        full["reference"] == "main:finetuned" and full["target_ratio"] == 0.25 and full["h_score"] == pytest.approx(0.4)
    )
    assert (
        full["ll_target_ratio"] == 1.0
        and full["intervals"]["target_ratio"][0] <= 0.25 <= full["intervals"]["target_ratio"][1]
    )
    assert lora_copy.vs_full_finetune["target_ratio"] == 0.5 and lora_main.vs_full_finetune is None
    mt, mag = got[("all_layers", "model_tailor")], got[("all_layers", "magnitude")]
    assert (mt.retention, mt.target_ratio) == (pytest.approx(0.625 / 0.75), pytest.approx(0.5 / 0.75))
    assert (mag.retention, mag.target_ratio) == (pytest.approx(0.5 / 0.75), 1.0)
    assert got[("all_layers", "finetuned")].target_ratio == 1.0
    assert mag.vs_tailor["h_score"]["delta"] == pytest.approx(mag.h_score - mt.h_score)  # its own pair's row
    assert got[("main", "model_tailor")].vs_tailor is None and lora_mt.vs_tailor is None

    result = BenchResult(
        False, rows, {"pairs": {p: {"description": p} for p in ("main", "lora_r16", "all_layers")}}, files
    )
    assert list(pareto_panels(result)) == ["main", "lora_r16", "all_layers"]
    md = markdown_report(result)
    assert "## Against the full fine-tune" in md and "| lora_r16+mt | lora_r16 | 0.1 | main:finetuned | 0.250 ± " in md
    assert "| magnitude | all_layers | 0.1 |" in md and "lora_r16 (= main:lora_r16) | lora_r16 | anchor |" in md


def test_finalize_names_a_pair_without_its_anchor():
    rows, files = _rows_and_files()
    rows = [r for r in rows if (r.pair, r.method) != ("all_layers", "finetuned")]
    with pytest.raises(ValueError, match="'all_layers' has no 'finetuned' row"):
        finalize(rows, files, resamples=10, anchors=P.anchors(), full_finetune=P.full_finetune())


def test_pareto_plot_has_one_panel_per_pair(tmp_path):
    pytest.importorskip("matplotlib")
    rows, files = _rows_and_files()
    finalize(rows, files, resamples=20, anchors=P.anchors(), full_finetune=P.full_finetune())
    plot_pareto(BenchResult(False, rows, {}, files), tmp_path / "p.png")
    from PIL import Image

    width, height = Image.open(tmp_path / "p.png").size
    assert width == 3 * 7 * 120 and height == int(5.5 * 120)  # three 7-inch panels at 120 dpi


def test_densities_keep_the_rows_at_those_densities_and_every_row_without_one():
    picked = _picked(only=("magnitude", "task_arithmetic"), pairs=("main",), densities=(0.05, 0.1))
    assert [(m, d) for _, m, d in picked] == [
        ("pretrained", None),
        ("finetuned", None),
        ("magnitude", 0.05),
        ("magnitude", 0.1),
        ("task_arithmetic", None),
        ("task_arithmetic", None),
        ("task_arithmetic", None),
    ]
    with pytest.raises(ConfigError, match="--densities 0.3 matches no row; the densities are 0.01, 0.05, 0.1"):
        P.select(_full(), densities=(0.3,))
