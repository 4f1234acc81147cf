"""TailorBench orchestration: build or reuse the models, produce every method row, evaluate, collect rows.

The stage order lives here and only here, once per build of the rows' pairs (``bench.pairs``: the main build,
then the all-layers one, then the multitask pair's, whose models are the main build's and whose tasks add the
second target): assets -> models (cached) -> tasks -> rows (baselines in memory, the retraining rows
of ``bench.retrain`` (cached fine-tunes), Model Tailor through ``methods.tailor_rows``, on the LoRA adapter
for the LoRA pair, the multitask pair's rows through ``bench.multitask``, then the mergekit peers through
``methods.peer_rows`` when mergekit is installed) ->
evaluation (cached per distinct set of weights, per-item outcomes kept; the drift probe's references, the
pre-trained model's answers, are made in ``_open`` while the model holds its weights) -> analysis (``bench.analysis``:
metrics, bootstrap intervals, comparison, within each pair) -> ``BenchResult``. Quick and full runs share the
cached models; ``quick`` only shrinks the test subsets and the method list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from model_tailor.bench import methods as M
from model_tailor.bench import multitask as MX
from model_tailor.bench import pairs as P
from model_tailor.bench import retrain as R
from model_tailor.bench.analysis import finalize
from model_tailor.bench.data import PixelCache
from model_tailor.bench.evaluation import evaluate
from model_tailor.bench.leaks import (
    PRESERVE_CAPTIONS,
    calibration_self_queries,
    check_preserve_disjoint,
    write_bench_preserve,
)
from model_tailor.bench.meta import peer_notes, run_meta
from model_tailor.bench.models import BuildConfig, BuiltModels, build_models, load_model
from model_tailor.bench.probe import drift_task
from model_tailor.bench.results import BenchResult, Row
from model_tailor.bench.tasks import ORIGINAL_TASKS, SECOND_TASK, EvalConfig, Task, build_tasks, split_capitals
from model_tailor.errors import ConfigError
from model_tailor.io.atomic import atomic_write_text
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.pipeline.architectures import checkpoint_names

__all__ = ["BenchConfig", "BenchResult", "Row", "peer_notes", "run_bench", "weights_digest"]

log = logging.getLogger(__name__)

# 2: capital tests exclude the preserve hold-out countries (tasks.split_capitals); 3: prefix-cached greedy
# decoding in batches of 64, one evaluation per distinct set of weights; 4: per-item outcomes and likelihoods;
# 5: the likelihood on the decoding's own prompt pass (tasks.generate_and_score; equal to 1e-4, not bitwise)
# 6: the drift probe (bench.probe) is part of every evaluation
RUN_VERSION = 6


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
    pairs: tuple[str, ...] = ()  # ``--pairs`` (bench.pairs); empty = the main pair and every pair with a row
    densities: tuple[float, ...] = ()  # ``--densities``: only rows at these densities (dense rows stay)
    extended: bool = False  # every row of the catalogue, not the full variant's headline rows (``--extended``)
    resamples: int = 2000  # bootstrap resamples of the test items (``--resamples``)
    bootstrap_seed: int = 0

    def eval_config(self) -> EvalConfig:
        return self.eval or (EvalConfig.quick() if self.quick else EvalConfig())


def _eval_key(cfg: BenchConfig, spec: M.MethodSpec, extra: Mapping | None = None) -> str:
    """Key of a row's cached evaluation; ``extra`` (the multitask pair's ``MX.key_extra``) joins it only when
    given, so every other row's key is the one it always had."""
    blob = json.dumps(
        {
            "v": RUN_VERSION,
            "build": cfg.build.key(),
            "eval": asdict(cfg.eval_config()),
            "spec": spec.key(),
            "device": cfg.device,
            **(extra or {}),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _weights_key(cfg: BenchConfig, digest: str, extra: Mapping | None = None) -> str:
    blob = json.dumps(
        {
            "v": RUN_VERSION,
            "build": cfg.build.key(),
            "eval": asdict(cfg.eval_config()),
            "weights": digest,
            "device": cfg.device,
            **(extra or {}),
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


@dataclass
class _Session:
    """One run's loaded state: the models, the tasks and the evaluation caches (in memory and on disk)."""

    cfg: BenchConfig
    built: BuiltModels
    ecfg: EvalConfig
    tasks: list[Task]
    model: torch.nn.Module
    processor: object
    pixels: PixelCache
    base: dict[str, torch.Tensor]
    finetuned: dict[str, torch.Tensor]
    names: list[str]
    num_layers: int
    files: dict[str, dict] = field(default_factory=dict)  # "items/<key>.json" -> per-item outcomes
    by_weights: dict[str, dict] = field(default_factory=dict)  # weights digest -> its one evaluation
    key_extra: dict = field(default_factory=dict)  # the multitask session's evaluation keys (MX.key_extra)

    @property
    def eval_dir(self) -> Path:
        return self.built.root / "evals"

    def cached_row(self, spec: M.MethodSpec) -> Row | None:
        """The row from an earlier run with the same build, subsets and spec, with its per-item outcomes."""
        path = self.eval_dir / f"{_eval_key(self.cfg, spec, self.key_extra)}.json"
        if not (self.cfg.reuse_evals and path.exists()):
            return None
        row = Row(**{**json.loads(path.read_text()), "cached": True, "pair": spec.pair, "kind": P.kind_of(spec)})
        weights = self.eval_dir / f"w-{Path(row.items or '').stem}.json"
        if row.items is None or not weights.exists():
            return None
        self.files[row.items] = _items_file(json.loads(weights.read_text()))
        return row

    def evaluate_weights(self, spec: M.MethodSpec, overrides: dict[str, torch.Tensor]) -> tuple[str, dict]:
        """``(weights key, evaluation)`` of the model with ``overrides``, evaluated once per distinct set of
        weights (a one-model TIES is magnitude top-k and WiSE-FT at alpha is task arithmetic, bit for bit)."""
        digest = weights_digest(overrides)
        key = _weights_key(self.cfg, digest, self.key_extra)
        path = self.eval_dir / f"w-{key}.json"
        if digest not in self.by_weights and self.cfg.reuse_evals and path.exists():
            self.by_weights[digest] = json.loads(path.read_text())
        if digest not in self.by_weights:
            self.model.load_state_dict(overrides, strict=False)
            result = evaluate(
                self.model, self.processor, self.tasks, self.pixels, self.ecfg, self.image_tokens, spec.label
            )
            self.model.load_state_dict({n: self.base[n] for n in overrides}, strict=False)
            data = {"label": spec.label, "scores": result.scores, "samples": result.samples, "items": result.items}
            self.by_weights[digest] = data
            atomic_write_text(path, json.dumps(data))
        return key, self.by_weights[digest]

    @property
    def image_tokens(self) -> int:
        return self.model.config.image_seq_length

    def score(self, spec: M.MethodSpec, overrides: dict[str, torch.Tensor], seconds: float, extra: dict) -> Row:
        """Evaluate one row's weights and record (and cache) its row; per-item outcomes go to ``files``."""
        key, result = self.evaluate_weights(spec, overrides)
        if result["label"] != spec.label:
            extra = {**extra, "same_weights_as": result["label"]}
        original = {t: result["scores"][t] for t in ORIGINAL_TASKS}
        target = {t.name: result["scores"][t.name] for t in self.tasks if t.name not in ORIGINAL_TASKS and not t.probe}
        items = f"items/{key}.json"
        self.files[items] = _items_file(result)
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
            items=items,
            pair=spec.pair,
            kind=P.kind_of(spec),
        )
        atomic_write_text(self.eval_dir / f"{_eval_key(self.cfg, spec, self.key_extra)}.json", json.dumps(asdict(row)))
        return row


def _items_file(evaluation: dict) -> dict:
    """What ``items/<key>.json`` holds: the evaluated weights' label and its per-item outcomes per task."""
    return {"label": evaluation["label"], "tasks": evaluation["items"]}


def _references(tasks: list[Task]) -> dict:
    """``items/references.json``: each task's items in evaluation order (prompt, image, reference answer)."""
    return {
        t.name: [
            {"prompt": ex.prompt, "image": ex.image and ex.image.name, "reference": ex.response} for ex in t.examples
        ]
        for t in tasks
    }


def _open(cfg: BenchConfig, multitask: bool = False) -> _Session:
    """Build or reuse the two models, load them, and fix the test subsets (``multitask``: plus the second task's,
    and the multitask pair's evaluation keys)."""
    built = build_models(cfg.build, cfg.cache_dir, cfg.device)
    (built.root / "evals").mkdir(exist_ok=True)
    ecfg = cfg.eval_config()
    model, processor = load_model(built.pretrained, cfg.device)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft_model, _ = load_model(built.finetuned, "cpu")
    finetuned = {k: v.detach().to(cfg.device) for k, v in ft_model.state_dict().items()}
    del ft_model
    names = M.changed_tensors(base, finetuned)
    log.info("fine-tune changed %d tensors", len(names))
    num_layers = model.config.text_config.num_hidden_layers
    pixels = PixelCache(processor.image_processor)
    tasks = build_tasks(ecfg) + ([SECOND_TASK.task(ecfg)] if multitask else [])
    if ecfg.n_probe > 0:  # the pre-trained model's answers to the probe's prompts: model holds its weights here
        tasks.append(drift_task(model, processor, ecfg, built.root, model.config.image_seq_length, cfg.device))
    extra = MX.key_extra() if multitask else {}
    return _Session(
        cfg, built, ecfg, tasks, model, processor, pixels, base, finetuned, names, num_layers, key_extra=extra
    )


def _baseline_rows(s: _Session, specs: list[M.MethodSpec]) -> list[Row]:
    """The anchors and the data-free baselines, weights computed in memory."""
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        overrides = M.baseline_overrides(
            spec, s.base, s.finetuned, s.names, num_layers=s.num_layers, tuned_layers=s.built.tuned_layers
        )
        seconds = s.built.seconds.get("finetune", 0.0) if spec.method == "finetuned" else time.perf_counter() - t0
        rows.append(s.score(spec, overrides, seconds, {}))
    return rows


def _preserve_data(s: _Session, specs: list[M.MethodSpec]) -> tuple[Path | None, dict | None]:
    """The bench-written preserve data and its leak check, when a preserve or rehearsal row is listed (even if
    cached)."""
    if not any(
        spec.method == M.PRESERVE_METHOD or R.is_rehearsal(spec.method) or MX.uses_preserve(spec) for spec in specs
    ):
        return None, None
    from model_tailor.calibration.selfgen import load_instructions

    path = write_bench_preserve(s.built.root, s.cfg.build.seed)
    uses_self = any(spec.params.get("preserve") == "self" for spec in specs if spec.method == M.PRESERVE_METHOD)
    if not uses_self:
        return path, check_preserve_disjoint(path, s.tasks)
    # `self` also answers the calibration inputs: every query it can derive from them is checked too
    queries = calibration_self_queries(s.built.calibration)
    return path, check_preserve_disjoint(path, s.tasks, load_instructions(), queries)


def _retrain_rows(s: _Session, specs: list[M.MethodSpec], preserve: Path | None) -> list[Row]:
    """LoRA (evaluated merged) and rehearsal fine-tunes; ``seconds`` is the fine-tune's, like the finetuned row's."""
    rows = []
    for spec in specs:
        got = R.retrained(spec.method, spec.params, s.cfg.build, s.built, preserve, s.cfg.device)
        names = sorted(set(s.names) | set(M.changed_tensors(s.base, got.state)))
        rows.append(s.score(spec, {n: got.state[n] for n in names}, got.seconds, {"retrain": got.info}))
    return rows


def _tailor_rows(
    s: _Session, specs: list[M.MethodSpec], preserve: Path | None, to_ckpt: dict, finetuned: Path | None = None
) -> list[Row]:
    inputs = M.TailorInputs(
        s.built.pretrained,
        finetuned or s.built.finetuned,
        s.built.calibration,
        s.built.tuned_layers,
        s.cfg.build.calibration_samples,
        s.cfg.build.seed,
        s.cfg.device,
        s.built.root / "patches",
        to_ckpt,
        preserve,
        PRESERVE_CAPTIONS + len(split_capitals()[1]),
        s.cfg.cache_dir,
    )
    inputs.work_dir.mkdir(exist_ok=True)
    extra = {} if finetuned is None else {"finetuned": str(finetuned)}
    return [
        s.score(spec, overrides, seconds, {"tailor": summary, **extra})
        for spec, overrides, seconds, summary in M.tailor_rows(specs, inputs, s.base, s.finetuned, s.names)
    ]


def _adapter_rows(s: _Session, specs: list[M.MethodSpec], to_ckpt: dict) -> list[Row]:
    """Model Tailor with ``--finetuned`` the LoRA adapter folder (the pipeline reads it as base + adapter)."""
    rows = []
    for settings in dict.fromkeys(R.LoraSettings(**spec.params["adapter"]) for spec in specs):
        adapter = R.lora_adapter(s.cfg.build, settings, s.built, s.cfg.device)
        group = [spec for spec in specs if R.LoraSettings(**spec.params["adapter"]) == settings]
        rows += _tailor_rows(s, group, None, to_ckpt, finetuned=adapter)
    return rows


def _multitask_rows(
    s: _Session, specs: list[M.MethodSpec], preserve: Path | None, to_ckpt: dict
) -> tuple[list[Row], dict]:
    """The multitask pair's rows beyond pretrained / finetuned, and the second task's leak check: its own fine-tune
    and the multitask one (cached fine-tunes, ``bench.retrain``), then the tailored and merged rows."""
    build, device = s.cfg.build, s.cfg.device
    data = MX.second_data(s.built.root, build.calibration_samples, build.seed, s.tasks)
    second = R.folder_state(R.second_finetune(build, SECOND_TASK, s.built, device), device)
    names = sorted(set(s.names) | set(M.changed_tensors(s.base, second.state)))
    if set(names) - set(to_ckpt):  # the second fine-tune changed a tensor the first did not
        with CheckpointReader(s.built.pretrained) as reader:
            to_ckpt = checkpoint_names(s.model, names, set(reader.names()))
    rows = []
    for spec in [spec for spec in specs if MX.is_retrained(spec)]:
        if spec.method == R.second_method(SECOND_TASK):
            got = second
        else:
            got = R.folder_state(R.multitask_finetune(build, SECOND_TASK, s.built, device), device)
        changed = sorted(set(names) | set(M.changed_tensors(s.base, got.state)))
        rows.append(s.score(spec, {n: got.state[n] for n in changed}, got.seconds, {"retrain": got.info}))
    inputs = MX.MultitaskInputs(
        s.built.pretrained,
        (s.built.finetuned, Path(second.info["folder"])),
        (s.built.calibration, data.calibration),
        build.calibration_samples,
        build.seed,
        device,
        s.built.root / "patches" / MX.PAIR,
        to_ckpt,
        preserve,
        PRESERVE_CAPTIONS + len(split_capitals()[1]),
    )
    posthoc = [spec for spec in specs if not MX.is_retrained(spec)]
    for spec, overrides, seconds, extra in MX.posthoc_rows(posthoc, inputs, s.base, (s.finetuned, second.state), names):
        rows.append(s.score(spec, overrides, seconds, extra))
    return rows, {"task": asdict(SECOND_TASK), "calibration": str(data.calibration), "check": data.check}


def _peer_rows(s: _Session, specs: list[M.MethodSpec], to_ckpt: dict) -> list[Row]:
    """Last in the run: a mergekit failure cannot cost the rows before it (each is cached once scored)."""
    merged = M.peer_rows(specs, s.built.pretrained, s.built.finetuned, s.names, to_ckpt, s.built.root / "peers")
    return [s.score(spec, overrides, seconds, extra) for spec, overrides, seconds, extra in merged]


def _category(spec: M.MethodSpec) -> str:
    if spec.pair == MX.PAIR and spec.method not in P.ANCHOR_METHODS:
        return "multitask"
    if R.is_retrain(spec.method):
        return "retrain"
    if "adapter" in spec.params:
        return "adapter"
    return "tailor" if spec.method in M.TAILOR_METHODS else "peer" if M.is_peer(spec) else "baseline"


def _build_rows(s: _Session, specs: list[M.MethodSpec]) -> tuple[list[Row], dict]:
    """Every row of one build's pairs (cached or produced), and that build's metadata."""
    rows: list[Row] = []
    kinds = ("baseline", "retrain", "tailor", "adapter", "multitask", "peer")
    todo: dict[str, list[M.MethodSpec]] = {k: [] for k in kinds}
    for spec in M.progress(specs, "tailorbench rows"):
        hit = s.cached_row(spec)
        if hit is not None:
            rows.append(hit)
        else:
            todo[_category(spec)].append(spec)
    rows += _baseline_rows(s, todo["baseline"])
    path, check = _preserve_data(s, specs)
    rows += _retrain_rows(s, todo["retrain"], path)
    to_ckpt: dict[str, str] = {}
    if todo["tailor"] or todo["adapter"] or todo["multitask"] or todo["peer"]:
        with CheckpointReader(s.built.pretrained) as reader:
            to_ckpt = checkpoint_names(s.model, s.names, set(reader.names()))
    if todo["tailor"]:
        rows += _tailor_rows(s, todo["tailor"], path, to_ckpt)
    rows += _adapter_rows(s, todo["adapter"], to_ckpt)
    second = None
    if todo["multitask"]:
        got, second = _multitask_rows(s, todo["multitask"], path, to_ckpt)
        rows += got
    if todo["peer"]:
        rows += _peer_rows(s, todo["peer"], to_ckpt)
    build = {
        **asdict(s.cfg.build),
        "key": s.cfg.build.key(),
        "pretrained": str(s.built.pretrained),
        "finetuned": str(s.built.finetuned),
        "seconds": s.built.seconds,
        "tuned_layers": list(s.built.tuned_layers),
        "changed_tensors": len(s.names),
    }
    preserve = None if path is None else {"path": str(path), "check": check}
    meta = {"build": build, "task_sizes": {t.name: len(t.examples) for t in s.tasks}, "preserve_data": preserve}
    return rows, meta | ({"second_task": second} if second is not None else {})


def _pick(cfg: BenchConfig) -> list[M.MethodSpec]:
    """The rows to run: the variant's (``pairs.variant_rows``) narrowed by ``--methods/--pairs/--densities``.
    A selection that only the whole catalogue has says so: ``--extended`` is what lists it."""
    listed = P.variant_rows(cfg.quick, cfg.engine, cfg.extended, cfg.build)
    try:
        return P.select(listed, cfg.only, cfg.pairs, cfg.densities)
    except ConfigError as exc:
        if cfg.quick or cfg.extended:
            raise
        try:
            P.select(P.variant_specs(False, cfg.engine, True, cfg.build), cfg.only, cfg.pairs, cfg.densities)
        except ConfigError:
            raise exc from None
        raise ConfigError(f"{exc}; --extended lists it (the full variant runs its headline rows only)") from None


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run the benchmark and return its rows (nothing is written here; see ``report.write_outputs``).

    One build at a time (its models loaded, then released): the main build's pairs, then the all-layers one's.
    """
    t_start = time.perf_counter()
    specs = _pick(cfg)
    rows: list[Row] = []
    files: dict[str, dict] = {}
    builds: dict[str, dict] = {}
    references: dict[str, list] = {}
    for name in dict.fromkeys(P.PAIRS[spec.pair].build for spec in specs):
        s = _open(replace(cfg, build=P.build_config(cfg.build, name)), multitask=name == MX.BUILD)
        got, builds[name] = _build_rows(s, [spec for spec in specs if P.PAIRS[spec.pair].build == name])
        rows += got
        references |= _references(s.tasks)  # every build tests the same items of the tasks it shares
        files |= s.files
        del s, got
    files["items/references.json"] = references
    rows = P.arrange(rows, specs)
    files = {r.items: files[r.items] for r in rows} | {"items/references.json": files["items/references.json"]}
    finalize(
        rows,
        files,
        resamples=cfg.resamples,
        seed=cfg.bootstrap_seed,
        anchors=P.anchors(),
        full_finetune=P.full_finetune(),
        task_anchors=P.task_anchors(),
        references=P.references(),
    )
    meta = run_meta(cfg, specs, rows, builds, time.perf_counter() - t_start)
    return BenchResult(cfg.quick, rows, meta, files)
