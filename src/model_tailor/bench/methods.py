"""TailorBench method rows: which models to evaluate and how each one's weights are produced.

Every method returns ``{name: tensor}`` overrides for the pre-trained model's state dict (the tensors the
fine-tune changed), so the runner loads one model and swaps weights per row. Baselines run over the deltas
of every changed tensor (decoder layers and projector). Model Tailor rows go through ``_tailor_rows``,
the single place that calls the tailoring engine: the project pipeline (``model_tailor.api.tailor``) by
default, or the ``inmemory`` engine (kernel + one forward pass of hooks) as a fallback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..baselines import BASELINES, BaselineParams
from ..errors import CheckpointError

log = logging.getLogger(__name__)

DENSITIES = (0.01, 0.05, 0.10, 0.20)
MT_VARIANTS = {  # row name -> tailor() options; ablations at density 0.10 (METHOD §16 D1, D2, D6)
    "model_tailor": {"alpha": 0.8, "compensation": "obs"},
    "mt_salience_only": {"alpha": 1.0, "compensation": "obs"},
    "mt_sensitivity_only": {"alpha": 0.0, "compensation": "obs"},
    "mt_no_compensation": {"alpha": 0.8, "compensation": "none"},
    "mt_official_sign": {"alpha": 0.8, "compensation": "official"},
}


@dataclass(frozen=True)
class MethodSpec:
    """One row to produce: ``method`` name, ``density`` (None for dense methods) and its parameters."""

    method: str
    density: float | None = None
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()) if k not in ("engine",))
        dens = "" if self.density is None else f"@{self.density:g}"
        return f"{self.method}{dens}" + (f"[{extra}]" if extra else "")

    def key(self) -> str:
        return json.dumps({"m": self.method, "d": self.density, "p": self.params}, sort_keys=True)


def method_specs(quick: bool, engine: str) -> list[MethodSpec]:
    """The full matrix, or the quick subset (the models are the same; only the row list shrinks)."""
    mt = [MethodSpec("model_tailor", d, {**MT_VARIANTS["model_tailor"], "engine": engine}) for d in DENSITIES]
    ablations = [MethodSpec(n, 0.10, {**o, "engine": engine}) for n, o in MT_VARIANTS.items() if n != "model_tailor"]
    sparse = [MethodSpec(m, d, {"seed": 0} if m in ("dare", "random") else {})
              for m in ("magnitude", "dare", "random", "ties") for d in DENSITIES]
    dense = [MethodSpec("task_arithmetic", None, {"scale": s}) for s in (0.3, 0.5, 0.7)]
    dense += [MethodSpec("wise_ft", None, {"scale": a}) for a in (0.25, 0.5, 0.75)]
    rows = [MethodSpec("pretrained"), MethodSpec("finetuned")]
    if quick:
        return rows + [mt[2], ablations[2], MethodSpec("magnitude", 0.10), MethodSpec("dare", 0.10, {"seed": 0}),
                       MethodSpec("wise_ft", None, {"scale": 0.5})]
    return rows + mt + ablations + sparse + dense


def changed_tensors(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose values differ between the two state dicts (the fine-tune's footprint)."""
    return sorted(n for n in base if n in finetuned and not torch.equal(base[n], finetuned[n]))


def baseline_overrides(spec: MethodSpec, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                       names: list[str]) -> dict[str, torch.Tensor]:
    """``base + baseline(delta)`` for every changed tensor; one seeded generator consumed in name order."""
    if spec.method == "pretrained":
        return {n: base[n] for n in names}
    if spec.method == "finetuned":
        return {n: finetuned[n] for n in names}
    fn = BASELINES.get(spec.method)
    params = BaselineParams(density=spec.density, scale=spec.params.get("scale"), seed=spec.params.get("seed", 0))
    gen = torch.Generator().manual_seed(params.seed)
    return {n: base[n] + fn([finetuned[n] - base[n]], params, gen) for n in names}


# --- Model Tailor ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TailorInputs:
    """What every Model Tailor row needs: the two model folders, calibration JSONL, seed, device, cache."""

    base: Path
    finetuned: Path
    calibration: Path
    tuned_layers: tuple[int, ...]
    num_samples: int
    seed: int
    device: str
    work_dir: Path
    to_ckpt: dict[str, str]  # state-dict name -> checkpoint tensor name (transformers 5 renames LLaVA keys)


def _tailor_rows(specs: list[MethodSpec], inputs: TailorInputs, base: Mapping[str, torch.Tensor],
                 finetuned: Mapping[str, torch.Tensor], names: list[str]
                 ) -> list[tuple[MethodSpec, dict[str, torch.Tensor], float, dict]]:
    """The one place that runs Model Tailor: ``(spec, overrides, seconds, report summary)`` per row.

    Tensors the patch does not cover (norms, projector) are reset to base, the pipeline's default policy
    (METHOD §16 D19), so the row is exactly ``base + patch``.
    """
    engines = {s.params.get("engine", "pipeline") for s in specs}
    out = []
    if "inmemory" in engines:
        from .inmemory import InMemoryTailor

        engine = InMemoryTailor.collect(inputs)
        for spec in [s for s in specs if s.params.get("engine") == "inmemory"]:
            t0 = time.perf_counter()
            patched, summary = engine.tailor(base, finetuned, density=spec.density, alpha=spec.params["alpha"],
                                             compensation=spec.params["compensation"])
            seconds = time.perf_counter() - t0 + engine.seconds
            out.append((spec, {n: patched.get(n, base[n]) for n in names}, seconds, summary))
    for spec in [s for s in specs if s.params.get("engine", "pipeline") == "pipeline"]:
        from ..api import tailor

        t0 = time.perf_counter()
        patch_path = inputs.work_dir / f"{spec.method}-{spec.density:g}.safetensors"
        result = tailor(base=inputs.base, finetuned=inputs.finetuned, calibration=inputs.calibration,
                        out=patch_path, density=spec.density, alpha=spec.params["alpha"],
                        compensation=spec.params["compensation"], samples=inputs.num_samples,
                        seed=inputs.seed, device=inputs.device, overwrite=True, progress=True)
        unmapped = [n for n in names if n not in inputs.to_ckpt]
        if unmapped:
            raise CheckpointError(f"no checkpoint name for changed tensors {unmapped[:5]}; cannot apply the patch")
        state = result.patch.apply_to_state_dict({inputs.to_ckpt[n]: base[n] for n in names})
        seconds = time.perf_counter() - t0
        overrides = {n: state[inputs.to_ckpt[n]] for n in names}
        out.append((spec, overrides, seconds, _report_summary(result.report)))
    return out


def _report_summary(report: object) -> dict:
    """The few report fields the bench keeps (kept entries, time, warnings); the full report sits beside
    the patch file as ``<patch>.report.json``."""
    out = {}
    for key in ("kept", "numel", "seconds", "warnings"):
        value = getattr(report, key, None)
        if value is not None:
            out[key] = json.loads(json.dumps(value, default=str))
    if out.get("numel"):
        out["density"] = out.get("kept", 0) / out["numel"]
    return out


def mergekit_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mergekit") is not None


def progress(items: list, desc: str) -> tqdm:
    return tqdm(items, desc=desc, unit="row")
