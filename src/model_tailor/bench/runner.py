"""TailorBench orchestration: build or reuse the models, produce every method row, evaluate, collect rows.

The stage order lives here and only here: assets -> models (cached) -> tasks -> rows (baselines in memory,
Model Tailor through ``methods._tailor_rows``, then the mergekit peers through ``methods._peer_rows`` when
mergekit is installed) -> evaluation (cached per row) -> ``BenchResult``. Quick and full runs share the cached
models; ``quick`` only shrinks the test subsets and the method list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from model_tailor import __version__
from model_tailor.bench import assets, peers
from model_tailor.bench import methods as M
from model_tailor.bench.data import CAPITAL_QUESTION, VQA_SUFFIX, PixelCache, sample, write_preserve
from model_tailor.bench.models import BuildConfig, build_models, load_model
from model_tailor.bench.tasks import (
    ORIGINAL_TASKS,
    TARGET_TASKS,
    EvalConfig,
    Task,
    build_tasks,
    evaluate,
    normalize,
    split_capitals,
)
from model_tailor.io.atomic import atomic_write_text
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.pipeline.architectures import checkpoint_names

log = logging.getLogger(__name__)

# 2: capital tests exclude the preserve hold-out countries (tasks.split_capitals); 3: prefix-cached greedy
# decoding in batches of 64, one evaluation per distinct set of weights
RUN_VERSION = 3


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = False
    device: str = "cpu"
    cache_dir: Path = Path("~/.cache/model-tailor")
    engine: str = "pipeline"  # "pipeline" (model_tailor.api) or "inmemory"
    build: BuildConfig = field(default_factory=BuildConfig)
    eval: EvalConfig | None = None  # default: quick or full subsets
    reuse_evals: bool = True
    only: tuple[str, ...] = ()  # method-name globs (``--methods``); empty = every row of the variant
    extended: bool = False  # full variant plus the preserve ablations (``--extended``; methods.preserve_specs)

    def eval_config(self) -> EvalConfig:
        return self.eval or (EvalConfig.quick() if self.quick else EvalConfig())


@dataclass
class Row:
    method: str
    density: float | None
    params: dict
    original: dict[str, float]
    target: dict[str, float]
    original_score: float
    target_score: float
    retention: float | None = None
    target_ratio: float | None = None
    h_score: float | None = None
    seconds: float = 0.0
    cached: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class BenchResult:
    quick: bool
    rows: list[Row]
    meta: dict

    def to_json(self) -> dict:
        return {
            "benchmark": "tailorbench",
            "version": 1,
            "quick": self.quick,
            "meta": self.meta,
            "rows": [asdict(r) for r in self.rows],
        }


def harmonic(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b <= 0 else 2 * a * b / (a + b)


def finalize(rows: list[Row]) -> list[Row]:
    """Fill retention, target ratio and H (docs/METHOD.md §13: H_rel over the two ratios) from the anchor rows."""
    pre = next(r for r in rows if r.method == "pretrained")
    ft = next(r for r in rows if r.method == "finetuned")
    for r in rows:
        r.retention = r.original_score / pre.original_score if pre.original_score > 0 else None
        r.target_ratio = r.target_score / ft.target_score if ft.target_score > 0 else None
        r.h_score = harmonic(r.retention, r.target_ratio)
    return rows


def _versions() -> dict[str, str]:
    import transformers

    versions = {
        "model_tailor": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if peers.is_available():
        versions["mergekit"] = peers.mergekit_version()
    return versions


def peer_notes(quick: bool, specs: list[M.MethodSpec]) -> list[str]:
    """The report's line about the mergekit peer rows (none when they ran or were left out by ``--methods``)."""
    if not peers.is_available():
        return [f"peers not run: mergekit is not installed ({peers.INSTALL_HINT})"]
    if quick:
        return ["peers not run: the mergekit rows are in the full variant only"]
    ran = sorted({s.method for s in specs if M.is_peer(s)})
    return [f"peers: {', '.join(ran)} run by mergekit {peers.mergekit_version()} on the same pair"] if ran else []


def _machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _eval_key(cfg: BenchConfig, spec: M.MethodSpec) -> str:
    blob = json.dumps(
        {
            "v": RUN_VERSION,
            "build": cfg.build.key(),
            "eval": asdict(cfg.eval_config()),
            "spec": spec.key(),
            "device": cfg.device,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _weights_key(cfg: BenchConfig, digest: str) -> str:
    blob = json.dumps(
        {
            "v": RUN_VERSION,
            "build": cfg.build.key(),
            "eval": asdict(cfg.eval_config()),
            "weights": digest,
            "device": cfg.device,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


PRESERVE_CAPTIONS = 32  # caption records in the bench's preserve data (plus one capital record per held-out country)


class LeakError(RuntimeError):
    """Preserve data overlaps a test set: the preserve rows would be measured on what they were given."""


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


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run the benchmark and return its rows (nothing is written here; see ``report.write_outputs``)."""
    t_start = time.perf_counter()
    built = build_models(cfg.build, cfg.cache_dir, cfg.device)
    eval_dir = built.root / "evals"
    eval_dir.mkdir(exist_ok=True)
    ecfg = cfg.eval_config()
    tasks = build_tasks(ecfg)
    specs = M.select_specs(M.method_specs(cfg.quick, cfg.engine, cfg.extended), cfg.only)
    model, processor = load_model(built.pretrained, cfg.device)
    image_tokens = model.config.image_seq_length
    pixels = PixelCache(processor.image_processor)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft_model, _ = load_model(built.finetuned, "cpu")
    finetuned = {k: v.detach().to(cfg.device) for k, v in ft_model.state_dict().items()}
    del ft_model
    names = M.changed_tensors(base, finetuned)
    log.info("fine-tune changed %d tensors", len(names))

    def cached(spec: M.MethodSpec) -> dict | None:
        path = eval_dir / f"{_eval_key(cfg, spec)}.json"
        return json.loads(path.read_text()) if cfg.reuse_evals and path.exists() else None

    by_weights: dict[str, dict] = {}  # weights digest -> {"label", "scores", "samples"} of its one evaluation

    def evaluate_weights(spec: M.MethodSpec, overrides: dict[str, torch.Tensor]) -> dict:
        """Scores of the model with ``overrides``, evaluated once per distinct set of weights (a one-model TIES
        is magnitude top-k and WiSE-FT at alpha is task arithmetic at that scale, bit for bit)."""
        digest = weights_digest(overrides)
        path = eval_dir / f"w-{_weights_key(cfg, digest)}.json"
        if digest not in by_weights and cfg.reuse_evals and path.exists():
            by_weights[digest] = json.loads(path.read_text())
        if digest not in by_weights:
            model.load_state_dict(overrides, strict=False)
            result = evaluate(model, processor, tasks, pixels, ecfg, image_tokens, label=spec.label)
            model.load_state_dict({n: base[n] for n in names}, strict=False)
            by_weights[digest] = {"label": spec.label, "scores": result.scores, "samples": result.samples}
            atomic_write_text(path, json.dumps(by_weights[digest]))
        return by_weights[digest]

    def score(spec: M.MethodSpec, overrides: dict[str, torch.Tensor], seconds: float, extra: dict) -> Row:
        result = evaluate_weights(spec, overrides)
        if result["label"] != spec.label:
            extra = {**extra, "same_weights_as": result["label"]}
        original = {t: result["scores"][t] for t in ORIGINAL_TASKS}
        target = {t: result["scores"][t] for t in TARGET_TASKS}
        row = Row(
            spec.method,
            spec.density,
            spec.params,
            original,
            target,
            sum(original.values()) / len(original),
            sum(target.values()) / len(target),
            seconds=seconds,
            extra={**extra, "samples": result["samples"]},
        )
        atomic_write_text(eval_dir / f"{_eval_key(cfg, spec)}.json", json.dumps(asdict(row)))
        return row

    rows: list[Row] = []
    todo_mt, todo_peers = [], []
    for spec in M.progress(specs, "tailorbench rows"):
        hit = cached(spec)
        if hit is not None:
            rows.append(Row(**{**hit, "cached": True}))
        elif spec.method in M.TAILOR_METHODS:
            todo_mt.append(spec)
        elif M.is_peer(spec):
            todo_peers.append(spec)
        else:
            t0 = time.perf_counter()
            overrides = M.baseline_overrides(spec, base, finetuned, names)
            seconds = built.seconds.get("finetune", 0.0) if spec.method == "finetuned" else time.perf_counter() - t0
            rows.append(score(spec, overrides, seconds, {}))
    preserve_user, preserve_check = None, None
    if any(s.method == M.PRESERVE_METHOD for s in specs):  # written and checked even when the rows are cached
        from model_tailor.calibration.selfgen import load_instructions

        preserve_user = write_bench_preserve(built.root, cfg.build.seed)
        uses_self = any(s.params.get("preserve") == "self" for s in specs if s.method == M.PRESERVE_METHOD)
        preserve_check = check_preserve_disjoint(preserve_user, tasks, load_instructions() if uses_self else None)
    to_ckpt: dict[str, str] = {}
    if todo_mt or todo_peers:
        with CheckpointReader(built.pretrained) as reader:
            to_ckpt = checkpoint_names(model, names, set(reader.names()))
    if todo_mt:
        inputs = M.TailorInputs(
            built.pretrained,
            built.finetuned,
            built.calibration,
            built.tuned_layers,
            cfg.build.calibration_samples,
            cfg.build.seed,
            cfg.device,
            built.root / "patches",
            to_ckpt,
            preserve_user,
            PRESERVE_CAPTIONS + len(split_capitals()[1]),
            cfg.cache_dir,
        )
        inputs.work_dir.mkdir(exist_ok=True)
        for spec, overrides, seconds, summary in M._tailor_rows(todo_mt, inputs, base, finetuned, names):
            rows.append(score(spec, overrides, seconds, {"tailor": summary}))
    if todo_peers:  # last: a mergekit failure cannot cost the rows above (each is cached once scored)
        work_dir = built.root / "peers"
        for spec, overrides, seconds, extra in M._peer_rows(
            todo_peers, built.pretrained, built.finetuned, names, to_ckpt, work_dir
        ):
            rows.append(score(spec, overrides, seconds, extra))
    order = {s.key(): i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order.get(M.MethodSpec(r.method, r.density, r.params).key(), 1 << 30))
    notes = peer_notes(cfg.quick, specs)
    same = [
        f"{M.MethodSpec(r.method, r.density, r.params).label} = {r.extra['same_weights_as']}"
        for r in rows
        if "same_weights_as" in r.extra
    ]
    if same:
        notes.append("bit-identical weights, evaluated once: " + "; ".join(same))
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(cfg.device),
        "versions": _versions(),
        "engine": cfg.engine,
        "build": {
            **asdict(cfg.build),
            "key": cfg.build.key(),
            "seconds": built.seconds,
            "tuned_layers": list(built.tuned_layers),
            "changed_tensors": len(names),
        },
        "eval": asdict(ecfg),
        "task_sizes": {t.name: len(t.examples) for t in tasks},
        "preserve_data": None if preserve_user is None else {"path": str(preserve_user), "check": preserve_check},
        "notes": notes,
        "total_seconds": time.perf_counter() - t_start,
    }
    return BenchResult(cfg.quick, finalize(rows), meta)
