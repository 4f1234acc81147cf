"""``benchmarks/compare_rows.py`` on a hand-made results folder: paired differences with known answers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _module():
    spec = importlib.util.spec_from_file_location("compare_rows", _DIR / "compare_rows.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compare_rows"] = mod
    spec.loader.exec_module(mod)
    return mod


def _write(folder: Path, rows: dict[str, dict[str, list[int]]]) -> None:
    """Rows named method -> per-task hits (logprob = hit - 1); pretrained and finetuned are the anchors."""
    (folder / "items").mkdir(parents=True)
    out = []
    for i, (method, hits) in enumerate(rows.items()):
        path = f"items/{i}.json"
        tasks = {t: {"hit": h, "logprob": [x - 1.0 for x in h], "answer": [""] * len(h)} for t, h in hits.items()}
        (folder / path).write_text(json.dumps({"label": method, "tasks": tasks}))
        anchor = method in ("pretrained", "finetuned")
        row = {"method": method, "density": None if anchor else 0.1, "params": {}, "items": path, "pair": "main"}
        out.append({**row, "kind": "anchor" if anchor else "post-hoc", "original": {"cap": 0}, "target": {"vqa": 0}})
    (folder / "results.json").write_text(json.dumps({"rows": out}))


def test_identical_rows_differ_by_exactly_zero_and_one_flipped_item_by_its_share(tmp_path):
    mod = _module()
    pre = {"cap": [1, 1, 1, 1], "vqa": [0, 0, 0, 0]}
    ft = {"cap": [0, 0, 1, 1], "vqa": [1, 1, 1, 1]}
    a = {"cap": [1, 1, 1, 1], "vqa": [1, 1, 0, 0]}
    b = {"cap": [1, 1, 1, 0], "vqa": [1, 1, 0, 0]}  # a with one capital item lost
    _write(tmp_path, {"pretrained": pre, "finetuned": ft, "a": a, "a_copy": a, "b": b})
    got = {(r["a"], r["b"]): r for r in mod.compare(tmp_path, "main", [], resamples=200, seed=0)}
    assert set(got) == {("a@0.1", "a_copy@0.1"), ("a@0.1", "b@0.1"), ("a_copy@0.1", "b@0.1")}
    same = got[("a@0.1", "a_copy@0.1")]
    for metric in mod.METRICS:
        assert same[metric]["delta"] == 0 and same[metric]["interval"] == [0, 0] and not same[metric]["excludes_zero"]
    flipped = got[("a@0.1", "b@0.1")]
    assert flipped["retention"]["delta"] == pytest.approx(0.25)  # retention 1 vs 3/4 of pretrained's 4/4
    assert flipped["target_ratio"]["delta"] == 0  # same target items
    lo, hi = flipped["retention"]["interval"]
    assert 0 <= lo <= 0.25 <= hi


def test_globs_pick_rows_by_label(tmp_path):
    mod = _module()
    pre, ft = {"cap": [1, 0], "vqa": [0, 0]}, {"cap": [0, 0], "vqa": [1, 1]}
    _write(tmp_path, {"pretrained": pre, "finetuned": ft, "a": pre, "b": ft, "c": ft})
    got = mod.compare(tmp_path, "main", ["a@*", "c*"], resamples=50, seed=0)
    assert [(r["a"], r["b"]) for r in got] == [("a@0.1", "c@0.1")]
