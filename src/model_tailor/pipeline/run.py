"""run_tailor(cfg): the only module that knows the stage order of a tailoring run (docs/METHOD.md §9).

1 open base and fine-tuned lazily, check them against each other, diff tensor by tensor (NaN/Inf check);
2 build a meta skeleton, discover its block lists, select targets and the policy of the other changed tensors;
3 build seeded calibration batches (and, with ``preserve``, the preserve batches); 4 for each block list holding
targets, in forward order: capture the inputs (+ every keyword argument) of its first targeted block, then per
block: Hessians of the targets (fine-tuned weights) -> [preserve: H_o and the next preserve inputs with BASE
target weights, :mod:`preserve_stream`] -> tailor each target -> run the TAILORED block to get the next inputs
(propagate: tailored, D17);
5 write the patch, the optional tailored model and the report. Resumable per finished block.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from model_tailor.calibration.capture import replace_hidden, run_block
from model_tailor.calibration.data import CalibrationSet, build_calibration, read_records
from model_tailor.config import TailorConfig
from model_tailor.errors import CheckpointError, ConfigError
from model_tailor.io.checkpoint import CheckpointReader, check_compatible
from model_tailor.io.peft_adapter import AdapterReader, open_finetuned
from model_tailor.kernel.masking import select_keep_masks_global
from model_tailor.patch.model import SparsePatch
from model_tailor.pipeline.activations import Stream, accumulate, capture_stream, reaching_batches
from model_tailor.pipeline.adapter import tailor_tensor
from model_tailor.pipeline.architectures import ModelLayout, build_skeleton, checkpoint_names, discover_layout
from model_tailor.pipeline.outputs import build_patch, calibration_info, guard_outputs, write_outputs
from model_tailor.pipeline.planning import estimate_plan
from model_tailor.pipeline.preserve import PreserveData, load_preserve
from model_tailor.pipeline.report import LayerReport, TailorPlan, TailorReport
from model_tailor.pipeline.resume import WorkDir
from model_tailor.pipeline.targets import TargetParam, TargetPlan, diff_checkpoints, select_targets
from model_tailor.pipeline.weights import Materializer, SparseValues, WeightSource

logger = logging.getLogger(__name__)

__all__ = ["TailorResult", "plan_tailor", "run_tailor"]


@dataclass
class TailorResult:
    """The patch and the report of one run."""

    patch: SparsePatch
    report: TailorReport


@dataclass
class _Prepared:
    base: CheckpointReader
    finetuned: CheckpointReader
    model: torch.nn.Module
    layout: ModelLayout
    to_ckpt: dict[str, str]
    plan: TargetPlan
    seconds: float


def _prepare(cfg: TailorConfig) -> _Prepared:
    t0 = time.perf_counter()
    base = CheckpointReader(cfg.base)
    ft = open_finetuned(cfg.finetuned, base)  # a PEFT adapter folder reads as base + adapter
    bcfg, fcfg = base.config(), ft.config()
    keys = ("model_type", "architectures")
    if bcfg and fcfg and any(bcfg.get(k) != fcfg.get(k) for k in keys):
        diffs = ", ".join(
            f"{k}: base {bcfg.get(k)!r} vs finetuned {fcfg.get(k)!r}" for k in keys if bcfg.get(k) != fcfg.get(k)
        )
        raise CheckpointError(f"base and finetuned are different architectures ({diffs})")
    check_compatible(base, ft)
    names = base.names()
    diff = diff_checkpoints(base, ft, names)
    model = build_skeleton(str(ft.config_dir))
    layout = discover_layout(model)
    param_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    to_ckpt = checkpoint_names(model, param_names, set(names))
    include = ft.restrict_include(cfg.include) if isinstance(ft, AdapterReader) else cfg.include
    plan = select_targets(
        model, layout, to_ckpt, diff, include=include, exclude=cfg.exclude, policy=cfg.non_target_policy
    )
    plan = ft.label_plan(plan) if isinstance(ft, AdapterReader) else plan
    return _Prepared(base, ft, model, layout, to_ckpt, plan, time.perf_counter() - t0)


def plan_tailor(cfg: TailorConfig) -> TailorPlan:
    """What :func:`run_tailor` would do (``--dry-run``): reads the checkpoints and the calibration file
    only."""
    prep = _prepare(cfg)
    n_records = None
    if cfg.calibration is not None:
        n_records = len(read_records(cfg.calibration, allow_outside_paths=cfg.allow_outside_paths))
    return estimate_plan(prep.model, prep.layout, prep.plan, prep.base, cfg, n_records)


def _device(cfg: TailorConfig) -> torch.device:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(cfg.device)


class _Runner:
    """State of one run; methods are the stages, called in order by :func:`run_tailor`."""

    def __init__(self, cfg: TailorConfig, prep: _Prepared, progress: bool) -> None:
        self.cfg, self.prep, self.progress = cfg, prep, progress
        self.device = _device(cfg)
        self.dtype = getattr(torch, cfg.dtype)
        self.source = WeightSource(prep.base, prep.finetuned, prep.plan, self._tailor_data_free)
        self.mat = Materializer(prep.model, prep.to_ckpt, self.source, self.device, self.dtype)
        self.layers: dict[str, LayerReport] = {}
        self.data_free: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []
        self.keep_masks: dict[str, torch.Tensor] = {}
        self.workdir: WorkDir | None = None
        self.preserve: PreserveData | None = None
        self.block_paths = [bl.block_path(i) for bl in prep.layout.block_lists for i in range(bl.length)]

    # -- kernel calls ---------------------------------------------------------------------------------------
    def _kernel(
        self,
        name: str,
        base: torch.Tensor,
        ft: torch.Tensor,
        H: torch.Tensor | None,
        transposed: bool,
        keep_mask: torch.Tensor | None = None,
        H_o: torch.Tensor | None = None,
    ) -> tuple[SparseValues, dict[str, Any]]:
        b32, f32 = base.to(self.device, torch.float32), ft.to(self.device, torch.float32)
        if transposed:  # GPT-2 Conv1D stores (in, out); the kernel wants (rows=out, cols=in) (docs/METHOD.md §1)
            b32, f32 = b32.T.contiguous(), f32.T.contiguous()
            keep_mask = keep_mask.T.contiguous() if keep_mask is not None else None
        res, extra = tailor_tensor(b32, f32, H, H_o, self.cfg, keep_mask=keep_mask, name=name)
        W, mask = (res.weight.T, res.keep_mask.T) if transposed else (res.weight, res.keep_mask)
        stats = {**dataclasses.asdict(res.stats), **extra}
        stats["data_free"] = H is None
        sv = SparseValues.from_dense(base, W.to(base.dtype), mask)
        if res.lowrank is not None:  # factors in checkpoint layout: (A B)^T = B^T A^T for Conv1D
            A, B = (res.lowrank[1].T, res.lowrank[0].T) if transposed else res.lowrank
            lowrank = (A.to("cpu", torch.float32).contiguous(), B.to("cpu", torch.float32).contiguous())
            sv = dataclasses.replace(sv, lowrank=lowrank)
        return sv, stats

    def _tailor_data_free(self, name: str, base: torch.Tensor, ft: torch.Tensor) -> SparseValues:
        """``tailor`` policy for Linears outside blocks: salience-only, no calibration (docs/METHOD.md §10)."""
        nt = next(n for n in self.prep.plan.non_targets if n.name == name)
        sv, stats = self._kernel(name, base, ft, None, nt.transposed)
        self.data_free[name] = stats
        return sv

    def _warn(self, msg: str) -> None:
        logger.warning("%s", msg)
        self.warnings.append(msg)

    def _tailor_target(self, t: TargetParam, H: torch.Tensor | None, H_o: torch.Tensor | None = None) -> dict[str, Any]:
        base, ft = self.source.base.get(t.name), self.source.finetuned.get(t.name)
        if H is None and not self.cfg.data_free:
            self._warn(
                f"{t.name}: received no calibration tokens; tailored data-free (salience only, uncompensated, sparse)"
            )
        elif H_o is None and self.preserve is not None:
            self._warn(f"{t.name}: received no preserve tokens; tailored without the preserve term")
        sv, stats = self._kernel(t.name, base, ft, H, t.transposed, self.keep_masks.pop(t.name, None), H_o)
        self.source.tailored[t.name] = sv
        return stats

    # -- stages ---------------------------------------------------------------------------------------------
    def global_masks(self) -> None:
        """``granularity: global``: one threshold over all targets on salience |delta| (docs/METHOD.md §4, §7).

        The fused score's sensitivity half needs the compensated weights of each block, which a global
        threshold
        cannot wait for; salience is the part of the score that is comparable across tensors. The masks are
        then
        fixed, and compensation runs on them as usual.
        """
        scores = {}
        for t in self.prep.plan.targets:
            scores[t.name] = (self.source.finetuned.get(t.name).float() - self.source.base.get(t.name).float()).abs()
        self.keep_masks = select_keep_masks_global(scores, self.cfg.density)

    def resume(self, workdir: WorkDir) -> None:
        """Load the blocks a previous run with the same key finished (the key covers the inputs' bytes)."""
        self.workdir = workdir
        for bl, idx in self.prep.plan.block_order:
            path = f"{bl}.{idx}"
            loaded = self.workdir.load_block(path)
            if loaded is None:
                continue
            tensors, layer = loaded
            self.source.tailored.update(tensors)
            for t in self.prep.plan.targets_in(bl, idx):
                self.keep_masks.pop(t.name, None)
            self.layers[path] = LayerReport(**{**layer, "resumed": True})
        if self.layers:
            logger.info("resuming: %d finished block(s) loaded from %s", len(self.layers), self.workdir.path)

    def data_free_targets(self) -> None:
        for t in self.prep.plan.targets:
            path = f"{t.block_list}.{t.block}"
            layer = self.layers.setdefault(path, LayerReport(path))
            layer.tensors[t.name] = self._tailor_target(t, None)

    def block_lists(self, calib: CalibrationSet) -> None:
        model, plan = self.prep.model, self.prep.plan
        nq = getattr(model.config, "num_query_tokens", 0) or 0
        for bl in self.prep.layout.block_lists:
            indices = [i for b, i in plan.block_order if b == bl.path]
            if not indices:
                continue
            first, last = min(indices), max(indices)
            t0 = time.perf_counter()
            handles = self.mat.install_hooks(self.block_paths)
            pstream = None
            try:
                stream = capture_stream(model, bl, first, calib.batches, nq, self.device, self.dtype)
                if self.preserve is not None:  # earlier layers: base, or their non-target policy (preserve_stream)
                    pbatches = reaching_batches(self.preserve.calib.batches, bl.role)
                    if not pbatches:
                        self._warn(f"{bl.path}: no preserve record has an image; its targets ignore preserve")
                    else:
                        pstream = capture_stream(model, bl, first, pbatches, nq, self.device, self.dtype)
            finally:
                for h in handles:
                    h.remove()
                self.mat.offload_all()
            logger.info("captured inputs of %s in %.2fs", bl.block_path(first), time.perf_counter() - t0)
            blocks = range(first, last + 1)
            bar = _bar(blocks, f"tailor {bl.path}", self.progress)
            for idx in bar:
                stream, pstream = self.block(bl.path, idx, stream, pstream, last_in_list=idx == last)

    def block(
        self, list_path: str, idx: int, stream: Stream, pstream: Stream | None, last_in_list: bool
    ) -> tuple[Stream, Stream | None]:
        """One block: H_t on the target stream (fine-tuned targets); with preserve data, H_o and the next
        preserve inputs from one pass with BASE target weights (docs/METHOD.md §14); tailor; replay the tailored
        block."""
        path = f"{list_path}.{idx}"
        targets = self.prep.plan.targets_in(list_path, idx)
        self.mat.load(path)
        block = self.prep.model.get_submodule(path)
        fresh = bool(targets) and path not in self.layers
        modules = {t.name: self.prep.model.get_submodule(t.module) for t in targets} if fresh else {}
        try:
            layer, t_stats, p_stats = LayerReport(path), None, None
            try:
                if fresh:
                    t0 = time.perf_counter()
                    t_stats, _ = accumulate(block, modules, stream, self.device)
                    layer.seconds["hessian"] = time.perf_counter() - t0
                    layer.n_tokens = max((t_stats.n_tokens(t.name) for t in targets), default=0)
                if pstream is not None:
                    t0 = time.perf_counter()
                    for t in targets:
                        self.mat.set_weight(t.module, "weight", self.source.base.get(t.name))
                    p_stats, next_p = accumulate(
                        block, modules, pstream, self.device, propagate_dtype=None if last_in_list else self.dtype
                    )
                    pstream = next_p or pstream
                    if fresh:
                        layer.seconds["preserve"] = time.perf_counter() - t0
                        layer.n_tokens_preserve = max((p_stats.n_tokens(t.name) for t in targets), default=0)
                if fresh:
                    assert t_stats is not None
                    t0 = time.perf_counter()
                    for t in targets:  # plain runs keep the two-argument call (and its tests' stand-ins)
                        H = t_stats.hessian(t.name)
                        args = (t, H) if p_stats is None else (t, H, p_stats.hessian(t.name))
                        layer.tensors[t.name] = self._tailor_target(*args)
                    layer.seconds["tailor"] = time.perf_counter() - t0
            finally:
                for st in (t_stats, p_stats):
                    if st is not None:
                        st.close()
            if fresh or pstream is not None:
                for t in targets:
                    self.mat.set_weight(t.module, "weight", self.source.get(t.name))
            if fresh:
                self.layers[path] = layer
                if self.workdir is not None:
                    self.workdir.save_block(
                        path,
                        {t.name: self.source.tailored[t.name] for t in targets},
                        dataclasses.asdict(layer),
                    )
            if last_in_list:
                return stream, pstream
            t0 = time.perf_counter()
            out = [replace_hidden(c, run_block(block, c).to(self.dtype)) for c in stream.calls]
            if path in self.layers:
                self.layers[path].seconds["propagate"] = time.perf_counter() - t0
            return Stream(out, stream.masks), pstream
        finally:
            self.mat.offload(path)
            self.source.release()


def _bar(items: Any, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="block", disable=not enabled, leave=False)


def run_tailor(cfg: TailorConfig, *, progress: bool = False) -> TailorResult:
    """Tailor ``cfg.finetuned`` against ``cfg.base``; write ``cfg.out`` (+ report) and ``cfg.save_model`` if
    set.

    Args:
        cfg: resolved options.
        progress: show tqdm bars (stderr) per block.

    Returns:
        :class:`TailorResult` with the in-memory patch and report.
    """
    with guard_outputs(cfg) as workdir:  # checks, lock and work folder before any heavy work
        return _run(cfg, progress, workdir)


def _run(cfg: TailorConfig, progress: bool, workdir: WorkDir | None) -> TailorResult:
    seconds: dict[str, float] = {}
    prep = _prepare(cfg)
    seconds["load_and_diff"] = prep.seconds
    plan_view = estimate_plan(prep.model, prep.layout, prep.plan, prep.base, cfg, None)
    runner = _Runner(cfg, prep, progress)
    if workdir is not None:
        runner.resume(workdir)
    calib = None
    t0 = time.perf_counter()
    if not cfg.data_free:
        calib = build_calibration(
            cfg.calibration,
            prep.finetuned.config_dir,
            samples=cfg.samples,
            max_tokens=cfg.max_tokens,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            model_cls=type(prep.model),
            allow_outside_paths=cfg.allow_outside_paths,
        )
        runner.warnings.extend(calib.warnings)
    seconds["calibration"] = time.perf_counter() - t0
    if cfg.preserve is not None:  # docs/METHOD.md §14; None runs exactly the plain pipeline
        t0 = time.perf_counter()
        runner.preserve = load_preserve(cfg, prep.finetuned.config_dir, type(prep.model))
        runner.warnings.extend(f"preserve: {w}" for w in runner.preserve.calib.warnings)
        seconds["preserve_data"] = time.perf_counter() - t0
    if cfg.granularity == "global":
        runner.global_masks()
    t0 = time.perf_counter()
    with torch.no_grad():
        if calib is None:
            runner.data_free_targets()
        elif prep.plan.targets:
            runner.block_lists(calib)
        for nt in prep.plan.non_targets:  # resolve tailor-policy tensors (data-free) now, not while writing
            if nt.action == "tailor":
                runner.source.get(nt.name)
    seconds["tailor"] = time.perf_counter() - t0
    if not prep.plan.targets:
        runner.warnings.append("no tensor qualifies as a target (no changed Linear weight inside the blocks)")
    layers = [runner.layers[f"{b}.{i}"] for b, i in prep.plan.block_order if f"{b}.{i}" in runner.layers]
    report = TailorReport(
        config=cfg.model_dump(mode="json"),
        plan=plan_view,
        layers=layers,
        data_free=runner.data_free,
        seconds=seconds,
        warnings=runner.warnings,
    )
    stats = {**{n: s for layer in layers for n, s in layer.tensors.items()}, **runner.data_free}
    report.calibration = calibration_info(cfg, calib)
    if runner.preserve is not None:
        report.preserve = runner.preserve.info
    patch = write_outputs(
        cfg,
        runner.source,
        lambda: build_patch(runner.source, prep.plan, config=report.config, stats=stats),
        report,
        preserve_records=runner.preserve.generated if runner.preserve is not None else None,
        workdir=workdir,
    )
    if runner.workdir is not None:
        runner.workdir.remove()
    return TailorResult(patch, report)
