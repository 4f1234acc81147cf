"""Per-block mechanics of a run: capture a block list's inputs, then per block accumulate the Hessians, tailor
each target and replay the tailored block (docs/METHOD.md §9). :mod:`model_tailor.pipeline.run` calls these
stages in order; this module does not decide it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_tailor.calibration.capture import replace_hidden, run_block
from model_tailor.calibration.data import CalibrationSet
from model_tailor.config import TailorConfig, first_compensated
from model_tailor.errors import CheckpointError, ConfigError
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.kernel.masking import select_keep_masks_global
from model_tailor.kernel.scoring import salience
from model_tailor.pipeline.activations import BlockHessians, Stream, accumulate, capture_stream, reaching_batches
from model_tailor.pipeline.architectures import ModelLayout, mixed_layer_types
from model_tailor.pipeline.distributed import Group, kernel_cost
from model_tailor.pipeline.groups import KernelInput, can_group, shared_input_groups, tailor_one, tailor_together
from model_tailor.pipeline.multitask import CombinedHessians, accumulate_tasks, combine_block
from model_tailor.pipeline.preserve import PreserveData
from model_tailor.pipeline.report import LayerReport, TensorRecord
from model_tailor.pipeline.resume import WorkDir
from model_tailor.pipeline.targets import TargetParam, TargetPlan
from model_tailor.pipeline.weights import Materializer, SparseValues, WeightSource

logger = logging.getLogger(__name__)

__all__ = ["BlockDone", "BlockRunner", "Prepared"]

#: Called with a block's path once it is tailored and checkpointed (e.g. to stop a run there, as a test does).
BlockDone = Callable[[str], None]


@dataclass
class Prepared:
    """The opened checkpoints, the meta skeleton and the plan (stages 1-2 of the run)."""

    base: CheckpointReader
    finetuned: CheckpointReader
    model: torch.nn.Module
    layout: ModelLayout
    to_ckpt: dict[str, str]
    plan: TargetPlan
    seconds: float
    others: tuple[CheckpointReader, ...] = ()  # the other fine-tunes of a joint multi-task run (§12)


def _device(cfg: TailorConfig) -> torch.device:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(cfg.device)


class BlockRunner:
    """State of one run; methods are the stages, called in order by :func:`~model_tailor.pipeline.run.run_tailor`.

    ``on_block_done``: see :data:`BlockDone`. ``group``: the processes of the run (default: this one alone); each
    rank runs its share of the calibration batches and of each block's kernel calls
    (:mod:`~model_tailor.pipeline.distributed`).
    """

    def __init__(
        self,
        cfg: TailorConfig,
        prep: Prepared,
        progress: bool,
        on_block_done: BlockDone | None = None,
        group: Group | None = None,
    ) -> None:
        self.cfg, self.prep, self.progress, self.on_block_done = cfg, prep, progress, on_block_done
        self.group = group if group is not None else Group()
        self.device = self.group.device(_device(cfg))
        self.dtype = getattr(torch, cfg.dtype)
        self.source = WeightSource(prep.base, prep.finetuned, prep.plan, self._tailor_data_free, prep.others)
        self.mat = Materializer(prep.model, prep.to_ckpt, self.source, self.device, self.dtype)
        self.layers: dict[str, LayerReport] = {}
        self.data_free: dict[str, TensorRecord] = {}
        self.warnings: list[str] = []
        self.keep_masks: dict[str, torch.Tensor] = {}
        # Several fine-tunes: each target's combined target W* for this block (docs/METHOD.md §12); re-decoration
        # (combine --redecorate): the combined patch's weights each result must not reconstruct worse than.
        self.combined: dict[str, torch.Tensor] = {}
        self.references: dict[str, torch.Tensor] = {}
        self.workdir: WorkDir | None = None
        self.preserve: PreserveData | None = None
        self.block_paths = [bl.block_path(i) for bl in prep.layout.block_lists for i in range(bl.length)]
        self._pending: LayerReport | None = None  # a tailored block's report until it is checkpointed

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
    ) -> tuple[SparseValues, TensorRecord]:
        return tailor_one(KernelInput(name, base, ft, transposed, keep_mask), H, H_o, self.cfg, self.device)

    def _tailor_data_free(self, name: str, base: torch.Tensor, ft: torch.Tensor) -> SparseValues:
        """``tailor`` policy for Linears outside blocks: salience-only, no calibration (docs/METHOD.md §10)."""
        nt = next(n for n in self.prep.plan.non_targets if n.name == name)
        sv, stats = self._kernel(name, base, ft, None, nt.transposed)
        self.data_free[name] = stats
        return sv

    def _warn(self, msg: str) -> None:
        logger.warning("%s", msg)
        self.warnings.append(msg)

    def _input(self, t: TargetParam) -> KernelInput:
        """A target as the kernel gets it: its fine-tuned weights (with several fine-tunes, the combined target
        W*), a fixed mask and a reference where the run has them."""
        ft = self.combined.pop(t.name, None)
        ft = self.source.finetuned.get(t.name) if ft is None else ft
        mask, reference = self.keep_masks.pop(t.name, None), self.references.pop(t.name, None)
        return KernelInput(t.name, self.source.base.get(t.name), ft, t.transposed, mask, reference)

    def _block_cfg(self, list_path: str, idx: int) -> TailorConfig:
        """The run's config for block ``idx`` of the list at ``list_path``: the layers before
        :func:`~model_tailor.config.first_compensated` (``compensation_from``, ``compensation_depth``) are plain,
        a sparse patch of fine-tuned values: no compensation, no preserve term, no low-rank structure.

        On a fine-tune that reaches early layers, decorating there (compensation, or a preserve-aware or low-rank
        fit of the fine-tuned outputs) brings the forgetting back (docs/METHOD.md §8); the options let the early
        layers take plain selection while the deep ones are decorated."""
        length = next(bl.length for bl in self.prep.layout.block_lists if bl.path == list_path)
        if idx >= first_compensated(length, self.cfg.compensation_from, self.cfg.compensation_depth):
            return self.cfg
        return self.cfg.model_copy(update={"compensation": "none", "structure": "sparse", "preserve": None})

    def _tailor_target(
        self,
        t: TargetParam,
        H: torch.Tensor | None,
        H_o: torch.Tensor | None = None,
        cfg: TailorConfig | None = None,
    ) -> TensorRecord:
        cfg = self.cfg if cfg is None else cfg
        if H is None and not self.cfg.data_free:
            self._warn(
                f"{t.name}: received no calibration tokens; tailored data-free (salience only, uncompensated, sparse)"
            )
        elif H_o is None and cfg.preserve is not None:
            self._warn(f"{t.name}: received no preserve tokens; tailored without the preserve term")
        sv, stats = tailor_one(self._input(t), H, H_o, cfg, self.device)
        self.source.tailored[t.name] = sv
        return stats

    def _tailor_group(
        self,
        group: list[TargetParam],
        H: torch.Tensor | None,
        H_o: dict[str, torch.Tensor | None],
        cfg: TailorConfig,
    ) -> dict[str, TensorRecord]:
        """Targets sharing the input Hessian ``H``: one grouped kernel call where it covers the run
        (:func:`~model_tailor.pipeline.groups.can_group`), else one call per target."""
        if not can_group(cfg, H, [t.transposed for t in group]):
            return {t.name: self._tailor_target(t, H, H_o[t.name], cfg) for t in group}
        assert H is not None
        items = [self._input(t) for t in group]
        records = {}
        for t, (sv, record) in zip(group, tailor_together(items, H, cfg, self.device), strict=True):
            self.source.tailored[t.name] = sv
            records[t.name] = record
        return records

    def _tailor_units(
        self,
        units: list[list[TargetParam]],
        t_stats: BlockHessians,
        H_o: dict[str, torch.Tensor | None],
        cfg: TailorConfig,
    ) -> dict[str, TensorRecord]:
        """Each shared-input group on its owner rank (the costliest first onto the least loaded rank), then every
        rank takes every tailored tensor, record and warning, in the order of one process."""
        shapes = [[t.shape[::-1] if t.transposed else t.shape for t in unit] for unit in units]
        owners = self.group.owners([kernel_cost(s) for s in shapes])
        mine = {}
        for i, unit in enumerate(units):
            if owners[i] != self.group.rank:
                for t in unit:
                    self.keep_masks.pop(t.name, None)
                continue
            n_warnings = len(self.warnings)
            records = self._tailor_group(unit, t_stats.hessian(unit[0].name), H_o, cfg)
            mine[i] = ({t.name: self.source.tailored[t.name] for t in unit}, records, self.warnings[n_warnings:])
            del self.warnings[n_warnings:]
        out: dict[str, TensorRecord] = {}
        for _, (tensors, records, warnings) in sorted(self.group.exchange(mine).items(), key=lambda kv: kv[0]):
            self.source.tailored.update(tensors)
            out.update(records)
            self.warnings.extend(warnings)
        return out

    # -- stages ---------------------------------------------------------------------------------------------
    def global_masks(self) -> None:
        """``granularity: global``: one threshold over all targets on salience (docs/METHOD.md §4, §7).

        The fused score's sensitivity half needs the compensated weights of each block, which a global
        threshold
        cannot wait for; salience is the part of the score that is comparable across tensors. The masks are
        then
        fixed, and compensation runs on them as usual.
        """
        scores = {}
        for t in self.prep.plan.targets:
            base, finetuned = self.source.base.get(t.name).float(), self.source.finetuned.get(t.name).float()
            scores[t.name] = salience(base, finetuned, kind=self.cfg.salience)
        self.keep_masks = select_keep_masks_global(scores, self.cfg.density)

    def resume(self, workdir: WorkDir | None) -> None:
        """Load the blocks a previous run with the same key finished (the key covers the inputs' bytes). Rank 0
        holds the work folder (``None`` on the other ranks) and hands every rank what it read."""
        self.workdir = workdir
        paths = [f"{bl}.{idx}" for bl, idx in self.prep.plan.block_order]
        found = self.group.broadcast({p: workdir.load_block(p) for p in paths} if workdir is not None else {})
        for bl, idx in self.prep.plan.block_order:
            path = f"{bl}.{idx}"
            loaded = found.get(path)
            if loaded is None:
                continue
            tensors, layer = loaded
            self.source.tailored.update(tensors)
            for t in self.prep.plan.targets_in(bl, idx):
                self.keep_masks.pop(t.name, None)
            self.layers[path] = LayerReport.from_json(layer, resumed=True)
        if self.layers:
            logger.info("resuming: %d finished block(s) loaded from %s", len(self.layers), workdir or "rank 0")

    def data_free_targets(self) -> None:
        for t in self.prep.plan.targets:
            path = f"{t.block_list}.{t.block}"
            layer = self.layers.setdefault(path, LayerReport(path))
            layer.tensors[t.name] = self._tailor_target(t, None)

    def block_lists(self, calibs: Sequence[CalibrationSet]) -> None:
        """Every block list holding targets; ``calibs``: one calibration set per task (one for a plain run), each
        captured and propagated as its own stream."""
        model, plan = self.prep.model, self.prep.plan
        nq = getattr(model.config, "num_query_tokens", 0) or 0
        for bl in self.prep.layout.block_lists:
            indices = [i for b, i in plan.block_order if b == bl.path]
            if not indices:
                continue
            first, last = min(indices), max(indices)
            mixed = mixed_layer_types(model.config, bl)
            if mixed:
                raise CheckpointError(
                    f"{bl.path}: its blocks take different attention masks ({', '.join(mixed)}); model-tailor "
                    "replays every block with block 0's arguments, so it cannot calibrate this model yet"
                )
            t0 = time.perf_counter()
            handles = self.mat.install_hooks(self.block_paths)
            pstream = None
            try:  # the inputs of the list's block 0: the forward stops there, so no block loads here
                streams = [  # this rank's share of each task's batches; the Hessians are summed over ranks
                    capture_stream(model, bl, 0, self.group.split(c.batches), nq, self.device, self.dtype)
                    for c in calibs
                ]
                if self.preserve is not None:  # earlier layers: base, or their non-target policy (preserve_stream)
                    pbatches = reaching_batches(self.preserve.calib.batches, bl.role)
                    if not pbatches:
                        self._warn(f"{bl.path}: no preserve record has an image; its targets ignore preserve")
                    else:
                        pmine = self.group.split(pbatches)  # may be empty on a rank: still a (empty) stream
                        pstream = capture_stream(model, bl, 0, pmine, nq, self.device, self.dtype)
            finally:
                for h in handles:
                    h.remove()
                self.mat.offload_all()
            for idx in range(first):  # blocks before the first target: loaded once, every batch through them
                streams, pstream = self._lead_in(bl.block_path(idx), streams, pstream)
            logger.info("captured inputs of %s in %.2fs", bl.block_path(first), time.perf_counter() - t0)
            blocks = range(first, last + 1)
            bar = _bar(blocks, f"tailor {bl.path}", self.progress)
            for idx in bar:
                streams, pstream = self.block(bl.path, idx, streams, pstream, last_in_list=idx == last)

    def _lead_in(self, path: str, streams: list[Stream], pstream: Stream | None) -> tuple[list[Stream], Stream | None]:
        """Every stream through block ``path``, which holds no target: loaded once for all batches (a hooked
        forward of the whole model would load it once per batch). Its calls reuse block 0's keyword arguments,
        as the propagation between tuned blocks does (docs/METHOD.md §9)."""
        self.mat.load(path)
        try:
            block = self.prep.model.get_submodule(path)
            streams = [_propagate(block, st, self.dtype) for st in streams]
            return streams, None if pstream is None else _propagate(block, pstream, self.dtype)
        finally:
            self.mat.offload(path)
            self.source.release()

    def block(
        self, list_path: str, idx: int, streams: list[Stream], pstream: Stream | None, last_in_list: bool
    ) -> tuple[list[Stream], Stream | None]:
        """One block: H_t on the target stream (fine-tuned targets; one stream per task, §12); with preserve
        data, H_o and the next preserve inputs from one pass with BASE target weights (docs/METHOD.md §14);
        tailor; replay the tailored block on every stream."""
        path = f"{list_path}.{idx}"
        targets = self.prep.plan.targets_in(list_path, idx)
        self.mat.load(path)
        block = self.prep.model.get_submodule(path)
        fresh = bool(targets) and path not in self.layers
        try:
            pstream = self._tailor_block(
                path, block, targets, fresh, streams, pstream, last_in_list, self._block_cfg(list_path, idx)
            )
            if fresh or pstream is not None:
                for t in targets:
                    self.mat.set_weight(t.module, "weight", self.source.get(t.name))
            if fresh:
                self._block_done(path, targets)
            if last_in_list:
                return streams, pstream
            t0 = time.perf_counter()
            out = [_propagate(block, st, self.dtype) for st in streams]
            if path in self.layers:
                self.layers[path].seconds["propagate"] = time.perf_counter() - t0
            return out, pstream
        finally:
            self.mat.offload(path)
            self.source.release()

    def _tailor_block(
        self,
        path: str,
        block: torch.nn.Module,
        targets: list[TargetParam],
        fresh: bool,
        streams: list[Stream],
        pstream: Stream | None,
        last_in_list: bool,
        cfg: TailorConfig,
    ) -> Stream | None:
        """Hessians (and preserve Hessians) of the block's targets, then tailor them under ``cfg`` (the block's
        config, :meth:`_block_cfg`) if ``fresh``; returns the next preserve stream. The layer report goes to
        ``self._pending`` until the block is checkpointed."""
        modules = {t.name: self.prep.model.get_submodule(t.module) for t in targets} if fresh else {}
        layer, t_stats, p_stats = LayerReport(path), None, None
        try:
            if fresh:
                t0 = time.perf_counter()
                t_stats = self._hessians(block, modules, targets, streams)
                layer.seconds["hessian"] = time.perf_counter() - t0
                layer.n_tokens = max((t_stats.n_tokens(t.name) for t in targets), default=0)
            if pstream is not None:
                t0 = time.perf_counter()
                for t in targets:
                    self.mat.set_weight(t.module, "weight", self.source.base.get(t.name))
                hooked = modules if cfg.preserve is not None else {}  # a plain block (_block_cfg) only propagates
                p_stats, next_p = accumulate(
                    block, hooked, pstream, self.device, propagate_dtype=None if last_in_list else self.dtype
                )
                pstream = next_p or pstream
                if fresh:
                    p_stats.merge(self.group)
                    layer.seconds["preserve"] = time.perf_counter() - t0
                    layer.n_tokens_preserve = max((p_stats.n_tokens(t.name) for t in targets), default=0)
            if fresh:
                assert t_stats is not None
                t0 = time.perf_counter()
                H_o = {t.name: None if p_stats is None else p_stats.hessian(t.name) for t in targets}
                by_name = {t.name: t for t in targets}
                units = shared_input_groups(list(by_name), t_stats.groups)  # q/k/v, gate/up share one
                records = self._tailor_units([[by_name[n] for n in names] for names in units], t_stats, H_o, cfg)
                layer.tensors.update((t.name, records[t.name]) for t in targets)
                layer.seconds["tailor"] = time.perf_counter() - t0
                self._pending = layer
        finally:
            self.combined.clear()
            for st in (t_stats, p_stats):
                if st is not None:
                    st.close()
        return pstream

    def _hessians(
        self,
        block: torch.nn.Module,
        modules: dict[str, torch.nn.Module],
        targets: list[TargetParam],
        streams: list[Stream],
    ) -> BlockHessians | CombinedHessians:
        """The targets' Hessians on the calibration stream. Several fine-tunes: each task's H_t on its own stream
        with its own fine-tuned weights, combined per target, with the combined targets W* left in
        ``self.combined`` for the kernel calls (docs/METHOD.md §12)."""
        if len(streams) == 1:
            stats, _ = accumulate(block, modules, streams[0], self.device)
            stats.merge(self.group)  # sums over the ranks' shares of the batches
            return stats
        per_task = accumulate_tasks(block, modules, targets, streams, self.source, self.mat, self.group)
        try:
            combined, self.combined = combine_block(
                per_task, targets, self.source, percdamp=self.cfg.percdamp, device=self.device
            )
        finally:
            for stats in per_task:
                stats.close()
        return combined

    def _block_done(self, path: str, targets: list[TargetParam]) -> None:
        """Record the block's report, checkpoint its tailored tensors, then tell ``on_block_done``."""
        layer, self._pending = self._pending, None
        assert layer is not None and layer.block == path
        self.layers[path] = layer
        if self.workdir is not None:
            tensors = {t.name: self.source.tailored[t.name] for t in targets}
            self.workdir.save_block(path, tensors, layer.to_json())
        if self.on_block_done is not None:
            self.on_block_done(path)


def _propagate(block: torch.nn.Module, stream: Stream, dtype: torch.dtype) -> Stream:
    """The next block's stream: this block's outputs on every recorded call."""
    return Stream([replace_hidden(c, run_block(block, c).to(dtype)) for c in stream.calls], stream.masks)


def _bar(items: Any, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="block", disable=not enabled, leave=False)
