"""TailorBench preserve data and its leak check: the "user-style" preserve JSONL the preserve rows get, and
the proof that none of it touches a test item (capital countries, images by path and pixels, VQA prompts).

``preserve: self`` rows derive preserve data from the calibration inputs too (its images, asked generic prompts;
docs/METHOD.md §14), so their check also covers every query that data can hold (:func:`calibration_self_queries`).
The multitask pair's second task (two-digit addition) has its own check, :func:`check_addition_disjoint`: no
problem is in two of its train, calibration and test pools, whatever order its operands are asked in.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from model_tailor.bench import assets
from model_tailor.bench.data import ADDITION_QUESTION, CAPITAL_QUESTION, VQA_SUFFIX, Addition, sample, write_preserve
from model_tailor.bench.tasks import Task, normalize, split_capitals
from model_tailor.errors import CalibrationError
from model_tailor.options import IMAGE_PROMPTS

PRESERVE_CAPTIONS = 32  # caption records in the bench's preserve data (plus one capital record per held-out country)


class LeakError(CalibrationError):
    """Preserve data overlaps a test set: the preserve rows would be measured on what they were given (a
    ``ModelTailorError``: the CLI prints it as one line and exits non-zero)."""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_bench_preserve(root: Path, seed: int) -> Path:
    """The bench's "user-style" preserve JSONL (+ images) under ``root/preserve``: capital questions about the
    held-out countries and templated captions of easy-VQA train images whose pixels match no test image."""
    test_hashes = {_sha(it.image) for it in assets.load_vqa("test")}
    labels = [
        lab
        for lab in sample(assets.image_labels(assets.load_vqa("train")), 4 * PRESERVE_CAPTIONS, seed + 5)
        if _sha(lab.image) not in test_hashes
    ][:PRESERVE_CAPTIONS]
    return write_preserve(split_capitals()[1], labels, root / "preserve")


_CAPITAL_RE = re.compile("^" + re.escape(CAPITAL_QUESTION).replace(re.escape("{country}"), "(.+)") + "$")
_ADDITION_RE = re.compile(
    "^" + re.escape(ADDITION_QUESTION).replace(re.escape("{a}"), r"(\d+)").replace(re.escape("{b}"), r"(\d+)") + "$"
)


def addition_key(prompt: str) -> tuple[int, int] | None:
    """The problem an addition prompt asks (``Addition.key``), None for any other prompt."""
    m = _ADDITION_RE.match(prompt)
    return None if m is None else Addition(int(m.group(1)), int(m.group(2))).key()


def check_addition_disjoint(pools: Mapping[str, Sequence[str]]) -> dict:
    """Fail loudly (:class:`LeakError`) if one addition problem (either operand order) is asked in two of the
    named pools of prompts (``train``, ``calibration``, ``test``: what the run trains, tailors and tests on);
    else each pool's number of problems. Prompts that ask no addition problem are not counted."""
    keys = {name: {addition_key(prompt) for prompt in prompts} - {None} for name, prompts in pools.items()}
    names = list(keys)
    problems = [
        f"{len(keys[a] & keys[b])} problem(s) in both {a} and {b}, e.g. {sorted(keys[a] & keys[b])[0]}"
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if keys[a] & keys[b]
    ]
    if problems:
        raise LeakError(f"addition pools overlap: {'; '.join(problems)}")
    return {name: len(k) for name, k in keys.items()}


def calibration_self_queries(calibration: Path) -> list[dict[str, Any]]:
    """Every query ``preserve: self`` can derive from ``calibration`` for the bench's image-reading model, whatever
    its record cap, seed and prompt count (all records, all generic image prompts), as JSON."""
    from model_tailor.calibration.data import read_records
    from model_tailor.calibration.selfcalib import CalibrationSelfSpec, plan_queries

    records = read_records(calibration)
    spec = CalibrationSelfSpec(records=len(records), image_prompts=len(IMAGE_PROMPTS))
    return [q.key() for q in plan_queries(records, spec, reads_images=True)[0]]


def _prompts(rec: dict[str, Any]) -> Iterator[str]:
    """What a record (file record or self query) asks: its prompt, user turns and text."""
    if isinstance(rec.get("prompt"), str):
        yield rec["prompt"]
    for m in rec.get("messages") or []:
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            yield m["content"]
    if isinstance(rec.get("text"), str):
        yield rec["text"]


def check_preserve_disjoint(
    path: Path,
    tasks: list[Task],
    self_instructions: list[str] | None = None,
    self_queries: list[dict[str, Any]] | None = None,
) -> dict:
    """Fail loudly (:class:`LeakError`) if any preserve record touches a test item.

    Checked: capital questions name no country of the capital test pool (every quick/full subset draws from
    it) nor of this run's subset; images match no easy-VQA test image (path or pixels); no prompt is a VQA test
    prompt or question, nor an addition problem of the tasks (either operand order). With ``self_instructions``
    (``--preserve self``), none may name a test country; with ``self_queries`` (:func:`calibration_self_queries`),
    each query passes the record checks.
    """
    test_countries = {c.country for c in split_capitals()[0]}
    test_countries |= {
        m.group(1) for t in tasks if t.name == "capital_qa" for ex in t.examples if (m := _CAPITAL_RE.match(ex.prompt))
    }
    test_items = assets.load_vqa("test")
    test_paths = {it.image.resolve() for it in test_items}
    test_hashes = {_sha(p) for p in test_paths}
    vqa_prompts = {ex.prompt for t in tasks if t.name == "easy_vqa" for ex in t.examples}
    vqa_prompts |= {it.question for it in test_items}
    sums = {addition_key(ex.prompt) for t in tasks for ex in t.examples} - {None}  # the multitask pair's tests
    records = [(f"line {n}", json.loads(line), path.parent) for n, line in enumerate(path.read_text().splitlines(), 1)]
    n = len(records)
    records += [
        (f"self query {i} (calibration line {q['line']})", q, path.parent) for i, q in enumerate(self_queries or [], 1)
    ]
    problems = []
    for where, rec, folder in records:
        for prompt in _prompts(rec):
            if (m := _CAPITAL_RE.match(prompt)) and m.group(1) in test_countries:
                problems.append(f"{where}: capital question about test country {m.group(1)!r}")
            if prompt in vqa_prompts or prompt.removesuffix(VQA_SUFFIX) in vqa_prompts:
                problems.append(f"{where}: prompt is a VQA test question")
            if addition_key(prompt) in sums:
                problems.append(f"{where}: prompt is an addition test problem")
        if rec.get("image"):
            img = (folder / rec["image"]).resolve()
            if img in test_paths or _sha(img) in test_hashes:
                problems.append(f"{where}: image {rec['image']} is an easy-VQA test image")
    names = {c: f" {normalize(c)} " for c in test_countries}
    asked = [*(self_instructions or []), *(p for q in self_queries or [] for p in _prompts(q))]
    for i, text in enumerate(asked, 1):
        hits = [c for c, w in names.items() if w in f" {normalize(text)} "]
        if hits:
            problems.append(f"self instruction {i} names test countries {hits}: {text!r}")
    if problems:
        detail = "; ".join(problems[:8])
        raise LeakError(f"preserve data overlaps the test sets ({len(problems)} problem(s)): {detail}")
    return {
        "records": n,
        "self_instructions": len(self_instructions or []),
        "self_queries": len(self_queries or []),
        "test_countries": len(test_countries),
    }
