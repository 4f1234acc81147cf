"""TailorReport: what a tailoring run did, as JSON (``<out>.report.json``) and as a readable summary.

Per layer: kept entries, reconstruction error without and with compensation (docs/METHOD.md §13), time per stage.
Every changed non-target is listed with its action (docs/METHOD.md §11); the calibration lines used are recorded
(§10), and so are the preserve records used by origin (§14). Each tensor's structure, parameter count and budget
are in its record; each layer's and the run's ``params`` and ``budget`` are sums over them, and ``totals.structures``
counts the tensors per structure, so the report says what the options (defaults or preset) did.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from model_tailor.kernel.tailor import TailorStats

__all__ = ["LayerReport", "TailorPlan", "TailorReport", "TensorRecord"]

# Both halves of the preserve-aware objective (docs/METHOD.md §14), normalised H, masked and final weights.
_TRADEOFF = ("target_error_masked", "target_error_final", "preserve_error_masked", "preserve_error_final")


@dataclass(frozen=True)
class TensorRecord(TailorStats):
    """What happened to one tensor: the kernel's :class:`~model_tailor.kernel.tailor.TailorStats` plus the
    pipeline's structure, rank, parameter count against the budget, the dual objective's trade-off errors (only
    with preserve data) and whether it was tailored data-free."""

    structure: str = "sparse"
    rank: int = 0
    params: int = 0
    budget: float = 0.0
    target_error_masked: float | None = None
    target_error_final: float | None = None
    preserve_error_masked: float | None = None
    preserve_error_final: float | None = None
    data_free: bool = False

    def to_json(self) -> dict[str, Any]:
        """The record as written to the report and the patch metadata; trade-off keys only where measured."""
        out = dataclasses.asdict(self)
        for key in _TRADEOFF:
            if out[key] is None:
                del out[key]
        return out


@dataclass
class LayerReport:
    """One block: ``tensors`` maps target name -> :class:`TensorRecord`."""

    block: str
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    n_tokens: int = 0
    n_tokens_preserve: int = 0
    resumed: bool = False

    @property
    def kept(self) -> int:
        return sum(s.kept for s in self.tensors.values())

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.tensors.values())

    @property
    def params(self) -> int:
        """Patch parameters: sparse entries plus ``rank * (rows + cols)`` per low-rank pair (docs/METHOD.md §15)."""
        return sum(s.params for s in self.tensors.values())

    @property
    def budget(self) -> float:
        """Parameter budget ``density * rows * cols`` summed over the block's targets."""
        return sum(float(s.budget) for s in self.tensors.values())

    def error(self, key: str) -> float | None:
        vals = [getattr(s, key) for s in self.tensors.values()]
        return None if not vals or any(v is None for v in vals) else float(sum(vals))

    def to_json(self) -> dict[str, Any]:
        """The fields as plain JSON (what the resume work files hold)."""
        out = dataclasses.asdict(self)
        out["tensors"] = {name: s.to_json() for name, s in self.tensors.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], **changes: Any) -> LayerReport:
        tensors = {name: TensorRecord(**s) for name, s in data.get("tensors", {}).items()}
        return cls(**{**data, "tensors": tensors, **changes})


@dataclass
class TailorPlan:
    """What a run will do (``--dry-run`` prints it before any heavy work)."""

    architecture: str
    block_lists: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    non_targets: list[dict[str, Any]]
    identical: int
    layer_order: list[str]
    calibration_records: int | None
    peak_memory_bytes: int
    estimated_seconds: float

    def to_text(self) -> str:
        lines = [f"architecture: {self.architecture}", "block lists (forward order):"]
        lines += [f"  {b['path']} x{b['length']} ({b['role']}, {b['block_class']})" for b in self.block_lists]
        lines.append(f"targets: {len(self.targets)} tensors in {len(self.layer_order)} blocks")
        lines += [f"  {t['name']} {t['shape']}" for t in self.targets]
        lines.append(f"changed non-targets: {len(self.non_targets)}")
        lines += [f"  {n['name']}: {n['action']} ({n['reason']})" for n in self.non_targets]
        lines.append(f"identical tensors copied through: {self.identical}")
        lines.append("layer order: " + (", ".join(self.layer_order) or "(none)"))
        if self.calibration_records is not None:
            lines.append(f"calibration records available: {self.calibration_records}")
        lines.append(f"estimated peak memory: {self.peak_memory_bytes / 2**20:.1f} MiB")
        # An upper bound, not a forecast: the plan does not tokenise, so it assumes every sequence reaches
        # --max-tokens (measured: 1807 s estimated for a 35 s run on the TailorBench LLaVA, 2-core CPU).
        lines.append(
            f"estimated time: at most ~{self.estimated_seconds:.0f} s (upper bound: every sequence at --max-tokens)"
        )
        return "\n".join(lines)


@dataclass
class TailorReport:
    """Everything recorded about a run; :meth:`to_json` is written beside the patch."""

    config: dict[str, Any]
    plan: TailorPlan
    layers: list[LayerReport] = field(default_factory=list)
    data_free: dict[str, TensorRecord] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    preserve: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            d = layer.to_json()
            d.update(
                kept=layer.kept,
                numel=layer.numel,
                error_masked=layer.error("error_masked"),
                error_compensated=layer.error("error_compensated"),
                **{key: layer.error(key) for key in _TRADEOFF},
                params=layer.params,
                budget=layer.budget,
            )
            layers.append(d)
        return {
            "config": self.config,
            "plan": dataclasses.asdict(self.plan),
            "layers": layers,
            "data_free": {name: s.to_json() for name, s in self.data_free.items()},
            "calibration": self.calibration,
            "preserve": self.preserve,
            "seconds": self.seconds,
            "warnings": self.warnings,
            "outputs": self.outputs,
            "totals": {
                "kept": self.kept,
                "numel": self.numel,
                "density": self.kept / self.numel if self.numel else 0.0,
                "params": sum(layer.params for layer in self.layers),
                "budget": sum(layer.budget for layer in self.layers),
                "structures": self.structures(),
            },
        }

    def structures(self) -> dict[str, int]:
        """Tensors per patch structure (tailored layers and data-free tensors)."""
        records = [s for layer in self.layers for s in layer.tensors.values()] + list(self.data_free.values())
        return dict(sorted(Counter(s.structure for s in records).items()))

    def to_text(self) -> str:
        density = self.kept / self.numel if self.numel else 0.0
        dual = bool(self.preserve)
        structured = any(s.rank for layer in self.layers for s in layer.tensors.values())
        head = f"{'block':<44} {'kept':>10} {'err masked':>12} {'err comp':>12}"
        if dual:  # the trade-off of the dual objective per layer: target vs preserve side, masked -> final
            head += f" {'tgt masked':>11} {'tgt final':>11} {'pres masked':>11} {'pres final':>11}"
        if structured:
            head += f" {'params':>10} {'budget':>10}"
        lines = [
            f"tailored {len(self.plan.targets)} tensors in {len(self.layers)} blocks of "
            f"{self.plan.architecture}: kept {self.kept} of {self.numel} entries (density {density:.4f})",
            head + f" {'sec':>7}",
        ]
        for layer in self.layers:
            em, ec = layer.error("error_masked"), layer.error("error_compensated")
            row = f"{layer.block:<44} {layer.kept:>10} {_fmt(em):>12} {_fmt(ec):>12}"
            if dual:
                row += "".join(f" {_fmt(layer.error(k)):>11}" for k in _TRADEOFF)
            if structured:
                row += f" {layer.params:>10} {layer.budget:>10.0f}"
            lines.append(row + f" {sum(layer.seconds.values()):>7.2f}{' (resumed)' if layer.resumed else ''}")
        actions: dict[str, int] = {}
        for n in self.plan.non_targets:
            actions[n["action"]] = actions.get(n["action"], 0) + 1
        if actions:
            lines.append("changed non-targets: " + ", ".join(f"{v} {k}" for k, v in sorted(actions.items())))
        cal = self.calibration
        for task in cal.get("tasks", []) if cal else []:  # a joint multi-task run (docs/METHOD.md §12)
            lines.append(
                f"calibration of {task['task']}: {len(task['lines'])} records, {task['n_tokens']} tokens "
                f"({task['file']})"
            )
        if cal and "tasks" not in cal:
            lines.append(f"calibration: {len(cal.get('lines', []))} records, {cal.get('n_tokens', 0)} tokens")
        pre = self.preserve
        if pre:
            origin = ", ".join(f"{v} {_ORIGINS.get(k, k)}" for k, v in pre.get("records", {}).items())
            lines.append(
                f"preserve: {pre.get('source')} ({len(pre.get('lines', []))} records, {pre.get('n_tokens', 0)} "
                f"tokens{'; ' + origin if origin else ''}), lambda {pre.get('preserve_weight')}, "
                f"structure {pre.get('structure')}"
            )
        if self.layers:
            per = ", ".join(f"{v} {k}" for k, v in self.structures().items())
            lines.append(f"structures: {per} tensor(s)")
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"{k}: {v}" for k, v in self.outputs.items()]
        return "\n".join(lines)


_ORIGINS = {
    "calibration_images": "from calibration images",
    "calibration_texts": "from calibration texts",
    "generic": "generic instructions",
    "file": "from the file",
}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"
