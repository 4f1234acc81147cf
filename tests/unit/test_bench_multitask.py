"""The multitask pair (bench.multitask): the second task's data (deterministic, disjoint splits) and scorer, the
merges of two deltas, the three-way H and per-task ratios on hand-made outcomes, and which rows ``--pairs
multitask`` lists while the default full variant stays as it was."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, replace

import pytest
import torch

from model_tailor.bench import methods as M
from model_tailor.bench import multitask as MX
from model_tailor.bench import pairs as P
from model_tailor.bench import peers, stats
from model_tailor.bench import retrain as R
from model_tailor.bench.analysis import finalize
from model_tailor.bench.data import Addition, addition_examples, addition_problems, addition_splits
from model_tailor.bench.leaks import LeakError, addition_key, check_addition_disjoint
from model_tailor.bench.models import BuildConfig
from model_tailor.bench.report import markdown_report, multitask_table, second_task_checks
from model_tailor.bench.results import BenchResult, Row
from model_tailor.bench.tasks import SECOND_TASK, EvalConfig, addition_hit
from model_tailor.errors import ConfigError

BUILD = BuildConfig()
ASSETS = all(importlib.util.find_spec(m) is not None for m in ("easy_vqa", "countryinfo"))


# --- the second task's data --------------------------------------------------------------------------------


def test_problems_are_every_unordered_pair_once_in_a_seeded_order():
    one = addition_problems(1, seed=0)
    assert len(one) == 55 and {p.key() for p in one} == {(a, b) for a in range(10) for b in range(a, 10)}
    assert one == addition_problems(1, seed=0) and one != addition_problems(1, seed=1)
    two = addition_problems(2, seed=7)
    assert len(two) == 4095 == len({p.key() for p in two})  # 90 * 91 / 2 pairs of 10..99
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 for p in two)
    assert {p.a <= p.b for p in two} == {True, False}  # both operand orders are asked
    assert (Addition(47, 38).answer, Addition(47, 38).key()) == ("85", (38, 47))
    with pytest.raises(ValueError):
        addition_problems(0, seed=0)


def test_splits_are_disjoint_deterministic_and_sized():
    splits = addition_splits(2, 1000, 256, seed=3)
    assert (len(splits.test), len(splits.calibration), len(splits.train)) == (1000, 256, 4095 - 1256)
    keys = [{p.key() for p in pool} for pool in (splits.train, splits.calibration, splits.test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert splits == addition_splits(2, 1000, 256, seed=3)
    assert SECOND_TASK.splits() == addition_splits(2, 1000, 256, SECOND_TASK.split_seed)
    with pytest.raises(ValueError, match="cannot hold"):
        addition_splits(1, 50, 5, seed=0)


def test_examples_test_subsets_and_training_draw():
    (ex,) = addition_examples([Addition(47, 38)])
    assert (ex.prompt, ex.image, ex.response) == ("What is 47 + 38? Answer with the number only.", None, "85")
    full, quick, tiny = (SECOND_TASK.task(c) for c in (EvalConfig(), EvalConfig.quick(), EvalConfig.tiny()))
    assert (len(full.examples), len(quick.examples), len(tiny.examples)) == (1000, 96, 4)  # EvalConfig.n_vqa
    assert full.name == "addition" and full.max_new_tokens == 5 and full.hit is addition_hit
    test = {p.key() for p in SECOND_TASK.splits().test}
    assert {addition_key(e.prompt) for e in full.examples} == test  # the full variant tests the whole pool
    assert quick.examples == SECOND_TASK.task(EvalConfig.quick()).examples
    drawn = R.second_examples(BUILD, SECOND_TASK)
    assert len(drawn) == BUILD.ft_steps * BUILD.ft_batch * 4 and drawn == R.second_examples(BUILD, SECOND_TASK)
    assert {addition_key(e.prompt) for e in drawn} <= {p.key() for p in SECOND_TASK.splits().train}


def test_scorer_is_exact_normalised_match():
    assert addition_hit("85", "85") and addition_hit("85.", "85") and addition_hit(" 85\n", "85")
    assert not addition_hit("The answer is 85.", "85")  # the number only is part of the skill
    assert not addition_hit("58", "85") and not addition_hit("8 5", "85") and not addition_hit("", "85")
    assert not addition_hit("185", "85")


def test_leak_check_finds_a_problem_in_either_operand_order(tmp_path):
    q = "What is {} + {}? Answer with the number only."
    assert addition_key(q.format(12, 34)) == addition_key(q.format(34, 12)) == (12, 34)
    assert addition_key("What is the capital of France?") is None
    ok = check_addition_disjoint({"train": [q.format(1, 2), "Describe the image."], "test": [q.format(2, 3)]})
    assert ok == {"train": 1, "test": 1}
    with pytest.raises(LeakError, match="1 problem\\(s\\) in both calibration and test, e.g. \\(12, 34\\)"):
        check_addition_disjoint(
            {"train": [q.format(1, 2)], "calibration": [q.format(12, 34)], "test": [q.format(34, 12)]}
        )
    tests = [SECOND_TASK.task(EvalConfig.tiny())]
    data = MX.second_data(tmp_path, 8, 0, tests)
    assert data.check == {"train": 4095 - 1256, "calibration": 8, "test": 4}
    records = [json.loads(line) for line in data.calibration.read_text().splitlines()]
    assert len(records) == 8 and all(set(r) == {"prompt", "response"} for r in records)
    assert all(str(sum(addition_key(r["prompt"]))) == r["response"] for r in records)


@pytest.mark.skipif(not ASSETS, reason="bench assets not installed")
def test_preserve_leak_check_refuses_an_addition_test_problem(tmp_path):
    from model_tailor.bench.leaks import check_preserve_disjoint, write_bench_preserve
    from model_tailor.bench.tasks import build_tasks

    tasks = [*build_tasks(EvalConfig.tiny()), SECOND_TASK.task(EvalConfig.tiny())]
    path = write_bench_preserve(tmp_path, seed=0)
    assert check_preserve_disjoint(path, tasks)["records"] > 0
    a, b = addition_key(tasks[-1].examples[0].prompt)
    bad = path.parent / "bad.jsonl"
    bad.write_text(path.read_text() + json.dumps({"prompt": f"What is {b} + {a}? Answer with the number only."}) + "\n")
    with pytest.raises(LeakError, match="addition test problem"):
        check_preserve_disjoint(bad, tasks)


# --- merges of two deltas -----------------------------------------------------------------------------------


def test_merge_overrides_of_two_deltas_known_answers():
    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    ft1 = {"w": base["w"] + torch.tensor([3.0, -1.0, 0.0, 2.0])}
    ft2 = {"w": base["w"] + torch.tensor([-1.0, -2.0, 4.0, 0.0])}
    ta = M.merge_overrides(M.MethodSpec("task_arithmetic", None, {"scale": 0.5}), base, [ft1, ft2], ["w"])
    torch.testing.assert_close(ta["w"], torch.tensor([2.0, -0.5, 3.0, 2.0]))
    # TIES at 0.5: trimmed [3, 0, 0, 2] and [0, -2, 4, 0]; elected signs + - + +; no entry has two agreeing values
    ties = M.merge_overrides(M.MethodSpec("ties", 0.5), base, [ft1, ft2], ["w"])
    torch.testing.assert_close(ties["w"], torch.tensor([4.0, -1.0, 5.0, 3.0]))
    ft3 = {"w": base["w"] + torch.tensor([1.0, -4.0, 2.0, 0.0])}  # trimmed [0, -4, 2, 0]: agrees with ft2 twice
    three = M.merge_overrides(M.MethodSpec("ties", 0.5), base, [ft1, ft2, ft3], ["w"])
    torch.testing.assert_close(three["w"], torch.tensor([4.0, -2.0, 4.0, 3.0]))
    one = M.merge_overrides(M.MethodSpec("ties", 0.5), base, [ft1], ["w"])
    assert torch.equal(one["w"], M.baseline_overrides(M.MethodSpec("ties", 0.5), base, ft1, ["w"])["w"])
    with pytest.raises(ConfigError, match="does not merge"):
        M.merge_overrides(M.MethodSpec("magnitude", 0.5), base, [ft1, ft2], ["w"])


# --- metrics ------------------------------------------------------------------------------------------------


def test_harmonic_over_several_values():
    t = torch.tensor
    assert stats.harmonic_all([t(1.0), t(0.5), t(0.5)]).item() == pytest.approx(0.6)
    assert stats.harmonic_all([t(0.0), t(1.0), t(1.0)]).item() == 0.0
    assert stats.harmonic_all([t(float("nan")), t(1.0), t(1.0)]).isnan()
    a, b = t([0.2, 0.9, 0.0]), t([0.7, 0.4, 0.5])
    torch.testing.assert_close(stats.harmonic_all([a, b]), stats.harmonic(a, b))


# per-item hits (capital_qa, captioning, easy_vqa, addition), four items each; every log-prob -1 (LL ratios 1)
TASKS = ("capital_qa", "captioning", "easy_vqa", "addition")
HITS = {
    "pretrained": ([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]),  # original 0.75
    "finetuned": ([1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]),  # easy_vqa anchor 1.0
    "finetuned_addition": ([0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]),  # addition anchor 0.5
    "mt_joint": ([1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]),  # 0.625 / 0.75, 0.5, 0.25 / 0.5
    "ties": ([1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]),  # 1.0, 0.25, 1.0
}


def _multitask_rows():
    rows, files = [], {}
    for method, hits in HITS.items():
        density = 0.1 if method in ("mt_joint", "ties") else None
        items = f"items/{method}.json"
        outcomes = {t: {"hit": h, "logprob": [-1.0] * 4} for t, h in zip(TASKS, hits, strict=True)}
        files[items] = {"label": method, "tasks": outcomes}
        acc = {t: sum(h) / 4 for t, h in zip(TASKS, hits, strict=True)}
        original, target = {t: acc[t] for t in TASKS[:2]}, {t: acc[t] for t in TASKS[2:]}
        row = Row(method, density, {}, original, target, sum(original.values()) / 2, 0.0, items=items)
        row.pair, row.kind = MX.PAIR, P.kind_of(M.MethodSpec(method, density, {}, MX.PAIR))
        rows.append(row)
    return rows, files


def test_each_target_against_its_own_finetune_and_h_over_three():
    rows, files = _multitask_rows()
    finalize(
        rows,
        files,
        resamples=200,
        anchors=P.anchors(),
        full_finetune=P.full_finetune(),
        task_anchors=P.task_anchors(),
        references=P.references(),
    )
    got = {r.method: r for r in rows}
    joint, ties = got["mt_joint"], got["ties"]
    assert joint.retention == pytest.approx(0.625 / 0.75)
    assert joint.multitask["target_ratio"] == {"easy_vqa": 0.5, "addition": 0.5}
    assert joint.target_ratio == 0.5 and joint.h_score == pytest.approx(3 / (1.2 + 2 + 2))
    assert joint.multitask["anchors"] == {"easy_vqa": "multitask:finetuned", "addition": "multitask:finetuned_addition"}
    assert ties.multitask["target_ratio"] == {"easy_vqa": 0.25, "addition": 1.0}
    assert ties.h_score == pytest.approx(3 / (1 + 4 + 1)) and ties.multitask["vs"] is None
    vs = joint.multitask["vs"]
    assert vs["reference"] == "ties@0.1" and vs["h_score"]["delta"] == pytest.approx(joint.h_score - ties.h_score)
    assert joint.ll_h_score == 1.0 and joint.multitask["ll_target_ratio"] == {"easy_vqa": 1.0, "addition": 1.0}
    lo, hi = joint.multitask["intervals"]["target_ratio"]["addition"]
    assert lo <= 0.5 <= hi
    assert got["finetuned"].multitask["target_ratio"] == {"easy_vqa": 1.0, "addition": 0.0}
    assert got["finetuned"].h_score == 0.0 and got["finetuned_addition"].multitask["target_ratio"]["addition"] == 1.0
    assert got["finetuned_addition"].kind == "anchor" and joint.vs_tailor is None
    table = multitask_table(BenchResult(False, rows, {}, files))
    assert table.splitlines()[0].startswith("| method | kind | density | params | retention | easy_vqa ratio |")
    assert "| ΔH vs ties@0.1 |" in table.splitlines()[0]
    assert "| mt_joint | post-hoc | 0.1 |  | 0.833 ± " in table
    checks = second_task_checks(BenchResult(False, rows, {}, files))
    assert checks == (
        "Second task (addition): the pre-trained model's addition ratio is 0.000 (wanted below 0.3) and "
        "finetuned_addition's retention 0.167 (wanted below 0.6)."
    )
    assert second_task_checks(BenchResult(False, [r for r in rows if r.method != "finetuned_addition"], {})) == ""
    md = markdown_report(BenchResult(False, rows, {}, files))
    assert checks in md
    assert "## The multitask pair" in md and "| easy_vqa | addition | original | target |" in md


# --- which rows ---------------------------------------------------------------------------------------------


def _full(engine="pipeline"):
    return P.variant_specs(False, engine, False, BUILD)


def _listed(monkeypatch, available=True):
    monkeypatch.setattr(peers, "is_available", lambda: available)
    monkeypatch.setattr(peers, "mergekit_version", lambda: "0.1.5" if available else None)
    return _full()


EXPECTED = [
    ("pretrained", None, {}),
    ("finetuned", None, {}),
    ("finetuned_addition", None, {}),
    ("mt_single", 0.1, {"task": "easy_vqa"}),
    ("mt_single", 0.1, {"task": "addition"}),
    ("mt_combine", 0.1, {"policy": "disjoint-mean"}),
    ("mt_combine", 0.1, {"policy": "sum"}),
    ("mt_combine", 0.1, {"policy": "ties"}),
    ("mt_combine_redecorate", 0.1, {"policy": "disjoint-mean"}),
    ("mt_joint", 0.1, {}),
    ("mt_joint", 1.0, {}),  # the dense RegMean-style merge
    ("mt_joint_preserve", 0.1, {"preserve": "user", "lambda": 1.0}),
    ("task_arithmetic", None, {"scale": 0.5}),
    ("task_arithmetic", None, {"scale": 1.0}),
    ("ties", 0.1, {}),
    ("mergekit_ties", 0.1, {"mergekit": "0.1.5"}),
    ("multitask_finetune", None, {"share": 0.5}),
]


def _shown(spec):
    hidden = ("alpha", "compensation", "engine")
    return spec.method, spec.density, {k: v for k, v in spec.params.items() if k not in hidden}


def test_pairs_multitask_lists_exactly_the_intended_rows(monkeypatch):
    picked = P.select(_listed(monkeypatch), pairs=("multitask",))
    assert {s.pair for s in picked} == {"multitask"}
    assert [_shown(s) for s in picked] == EXPECTED
    tailored = [s for s in picked if s.method in MX.TAILORED]
    assert all(s.params["alpha"] == 0.8 and s.params["compensation"] == "obs" for s in tailored)
    assert [P.kind_of(s) for s in picked].count("anchor") == 3 and P.kind_of(picked[-1]) == "retrain"
    assert len({s.key() for s in picked}) == len(picked)
    without = P.select(_listed(monkeypatch, available=False), pairs=("multitask",))
    assert [_shown(s) for s in without] == [e for e in EXPECTED if e[0] != "mergekit_ties"]
    only = P.select(_listed(monkeypatch), only=("ties",), pairs=("multitask",))
    assert [(s.method, s.density) for s in only] == [(m, None) for m in P.anchor_methods("multitask")] + [("ties", 0.1)]


def test_the_default_rows_are_unchanged(monkeypatch):
    full = _listed(monkeypatch)
    before = M.method_specs(False, "pipeline") + P.retrain_specs(BUILD) + P.lora_tailor_specs(BUILD)
    before += P.all_layers_specs("pipeline", BUILD)
    assert [s for s in full if s.pair != "multitask"] == before
    assert P.select(full) == P.select(before)  # opt-in: the default run does not list the multitask pair
    assert P.select(full, only=("ties", "task_arithmetic")) == P.select(before, only=("ties", "task_arithmetic"))
    assert P.variant_specs(True, "pipeline", False, BUILD) == M.method_specs(True, "pipeline")
    with pytest.raises(ConfigError, match="not in this variant"):
        P.select(P.variant_specs(True, "pipeline", False, BUILD), pairs=("multitask",))
    assert not [s for s in _full("inmemory") if s.pair == "multitask"]
    # the multitask rows' keys name their pair; the main pair's keys are those they always were
    assert all(json.loads(s.key())["pair"] == "multitask" for s in full if s.pair == "multitask")
    assert M.MethodSpec("ties", 0.1).key() == '{"d": 0.1, "m": "ties", "p": {}}'


def test_evaluation_keys_change_only_for_the_multitask_session(tmp_path):
    from model_tailor.bench.runner import RUN_VERSION, BenchConfig, _eval_key, _weights_key

    cfg = BenchConfig(cache_dir=tmp_path)
    spec = M.MethodSpec("magnitude", 0.1)
    blob = {"v": RUN_VERSION, "build": cfg.build.key(), "eval": asdict(cfg.eval_config()), "device": cfg.device}
    old = hashlib.sha256(json.dumps({**blob, "spec": spec.key()}, sort_keys=True).encode()).hexdigest()[:16]
    assert _eval_key(cfg, spec) == _eval_key(cfg, spec, {}) == old
    weights = hashlib.sha256(json.dumps({**blob, "weights": "abc"}, sort_keys=True).encode()).hexdigest()[:16]
    assert _weights_key(cfg, "abc") == weights != _weights_key(cfg, "abc", MX.key_extra())
    assert _eval_key(cfg, spec, MX.key_extra()) != old
    other = MX.key_extra(replace(SECOND_TASK, digits=3))
    assert _weights_key(cfg, "abc", other) != _weights_key(cfg, "abc", MX.key_extra())
    assert P.build_config(BUILD, MX.BUILD) == BUILD  # the pair's models are the main build's


def test_preserve_and_retrain_rows_are_recognised():
    specs = MX.multitask_specs("pipeline")
    assert [s.method for s in specs if MX.uses_preserve(s)] == ["mt_joint_preserve"]
    assert [s.method for s in specs if MX.is_retrained(s)] == ["finetuned_addition", "multitask_finetune"]
    assert MX.multitask_specs("inmemory") == []
    assert not MX.uses_preserve(M.MethodSpec("mt_joint_preserve"))  # another pair's row of that name
