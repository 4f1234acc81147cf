"""TailorBench preserve data and its leak check: the "user-style" preserve JSONL the preserve rows get, and
the proof that none of it touches a test item (capital countries, images by path and pixels, VQA prompts).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from model_tailor.bench import assets
from model_tailor.bench.data import CAPITAL_QUESTION, VQA_SUFFIX, sample, write_preserve
from model_tailor.bench.tasks import Task, normalize, split_capitals
from model_tailor.errors import CalibrationError

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


def check_preserve_disjoint(path: Path, tasks: list[Task], self_instructions: list[str] | None = None) -> dict:
    """Fail loudly (:class:`LeakError`) if any preserve record touches a test item.

    Checked: capital questions name no country of the capital test pool (every quick/full subset draws from
    it) nor of this run's subset; images match no easy-VQA test image (path or pixels); no prompt is a VQA test
    prompt or question. With ``self_instructions`` (``--preserve self``), none may name a test country.
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
    problems, n = [], 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        rec = json.loads(line)
        prompt = rec.get("prompt", "")
        if (m := _CAPITAL_RE.match(prompt)) and m.group(1) in test_countries:
            problems.append(f"line {n}: capital question about test country {m.group(1)!r}")
        if prompt in vqa_prompts or prompt.removesuffix(VQA_SUFFIX) in vqa_prompts:
            problems.append(f"line {n}: prompt is a VQA test question")
        if rec.get("image"):
            img = (path.parent / rec["image"]).resolve()
            if img in test_paths or _sha(img) in test_hashes:
                problems.append(f"line {n}: image {rec['image']} is an easy-VQA test image")
    names = {c: f" {normalize(c)} " for c in test_countries}
    for i, text in enumerate(self_instructions or [], 1):
        hits = [c for c, w in names.items() if w in f" {normalize(text)} "]
        if hits:
            problems.append(f"self instruction {i} names test countries {hits}: {text!r}")
    if problems:
        detail = "; ".join(problems[:8])
        raise LeakError(f"preserve data overlaps the test sets ({len(problems)} problem(s)): {detail}")
    return {"records": n, "self_instructions": len(self_instructions or []), "test_countries": len(test_countries)}
