"""TailorBench orchestration: build or reuse the models, produce every method row, evaluate, collect rows.

The stage order lives here and only here: assets -> models (cached) -> tasks -> rows (baselines in memory,
Model Tailor through ``methods._tailor_rows``) -> evaluation (cached per row) -> ``BenchResult``. Quick and
full runs share the cached models; ``quick`` only shrinks the test subsets and the method list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__
from ..architectures import checkpoint_names
from ..io.checkpoint import CheckpointReader
from . import methods as M
from .data import PixelCache
from .models import BuildConfig, build_models, load_model
from .tasks import ORIGINAL_TASKS, TARGET_TASKS, EvalConfig, build_tasks, evaluate

log = logging.getLogger(__name__)

RUN_VERSION = 1


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = False
    device: str = "cpu"
    cache_dir: Path = Path("~/.cache/model-tailor")
    engine: str = "pipeline"  # "pipeline" (model_tailor.api) or "inmemory"
    build: BuildConfig = field(default_factory=BuildConfig)
    eval: EvalConfig | None = None  # default: quick or full subsets
    reuse_evals: bool = True

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
        return {"benchmark": "tailorbench", "version": 1, "quick": self.quick, "meta": self.meta,
                "rows": [asdict(r) for r in self.rows]}


def harmonic(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b <= 0 else 2 * a * b / (a + b)


def finalize(rows: list[Row]) -> list[Row]:
    """Fill retention, target ratio and H (METHOD §13: H_rel over the two ratios) from the anchor rows."""
    pre = next(r for r in rows if r.method == "pretrained")
    ft = next(r for r in rows if r.method == "finetuned")
    for r in rows:
        r.retention = r.original_score / pre.original_score if pre.original_score > 0 else None
        r.target_ratio = r.target_score / ft.target_score if ft.target_score > 0 else None
        r.h_score = harmonic(r.retention, r.target_ratio)
    return rows


def _versions() -> dict[str, str]:
    import transformers

    return {"model_tailor": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _machine(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _eval_key(cfg: BenchConfig, spec: M.MethodSpec) -> str:
    blob = json.dumps({"v": RUN_VERSION, "build": cfg.build.key(), "eval": asdict(cfg.eval_config()),
                       "spec": spec.key(), "device": cfg.device}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run the benchmark and return its rows (nothing is written here; see ``report.write_outputs``)."""
    t_start = time.perf_counter()
    built = build_models(cfg.build, cfg.cache_dir, cfg.device)
    eval_dir = built.root / "evals"
    eval_dir.mkdir(exist_ok=True)
    ecfg = cfg.eval_config()
    tasks = build_tasks(ecfg)
    specs = M.method_specs(cfg.quick, cfg.engine)
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

    def score(spec: M.MethodSpec, overrides: dict[str, torch.Tensor], seconds: float, extra: dict) -> Row:
        model.load_state_dict(overrides, strict=False)
        result = evaluate(model, processor, tasks, pixels, ecfg, image_tokens, label=spec.label)
        model.load_state_dict({n: base[n] for n in names}, strict=False)
        original = {t: result.scores[t] for t in ORIGINAL_TASKS}
        target = {t: result.scores[t] for t in TARGET_TASKS}
        row = Row(spec.method, spec.density, spec.params, original, target,
                  sum(original.values()) / len(original), sum(target.values()) / len(target),
                  seconds=seconds, extra={**extra, "samples": result.samples})
        (eval_dir / f"{_eval_key(cfg, spec)}.json").write_text(json.dumps(asdict(row)))
        return row

    rows: list[Row] = []
    todo_mt = []
    for spec in M.progress(specs, "tailorbench rows"):
        hit = cached(spec)
        if hit is not None:
            rows.append(Row(**{**hit, "cached": True}))
        elif spec.method in M.MT_VARIANTS:
            todo_mt.append(spec)
        else:
            t0 = time.perf_counter()
            overrides = M.baseline_overrides(spec, base, finetuned, names)
            seconds = built.seconds.get("finetune", 0.0) if spec.method == "finetuned" else time.perf_counter() - t0
            rows.append(score(spec, overrides, seconds, {}))
    if todo_mt:
        with CheckpointReader(built.pretrained) as reader:
            to_ckpt = checkpoint_names(model, names, set(reader.names()))
        inputs = M.TailorInputs(built.pretrained, built.finetuned, built.calibration, built.tuned_layers,
                                cfg.build.calibration_samples, cfg.build.seed, cfg.device, built.root / "patches",
                                to_ckpt)
        inputs.work_dir.mkdir(exist_ok=True)
        for spec, overrides, seconds, summary in M._tailor_rows(todo_mt, inputs, base, finetuned, names):
            rows.append(score(spec, overrides, seconds, {"tailor": summary}))
    order = {s.key(): i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order.get(M.MethodSpec(r.method, r.density, r.params).key(), 1 << 30))
    notes = []
    if not M.mergekit_available():
        notes.append("peers skipped: mergekit (extra `peers`) is not installed")
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(cfg.device),
        "versions": _versions(),
        "engine": cfg.engine,
        "build": {**asdict(cfg.build), "key": cfg.build.key(), "seconds": built.seconds,
                  "tuned_layers": list(built.tuned_layers), "changed_tensors": len(names)},
        "eval": asdict(ecfg),
        "task_sizes": {t.name: len(t.examples) for t in tasks},
        "notes": notes,
        "total_seconds": time.perf_counter() - t_start,
    }
    return BenchResult(cfg.quick, finalize(rows), meta)
