"""TailorBench method rows: which models to evaluate and how each one's weights are produced.

Every method returns ``{name: tensor}`` overrides for the pre-trained model's state dict (the tensors the
fine-tune changed), so the runner loads one model and swaps weights per row. Baselines run over the deltas
of every changed tensor (decoder layers and projector). Model Tailor rows go through ``tailor_rows``,
the single place that calls the tailoring engine: the project pipeline (``model_tailor.api.tailor``) by
default, or the ``inmemory`` engine (kernel + one forward pass of hooks) as a fallback. Peer rows
(``mergekit_*``, ``--extended`` only, when the optional extra ``peers`` is installed) go through
``peer_rows``, which has mergekit merge the same two model folders (``bench.peers``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model_tailor.bench import peers
from model_tailor.errors import CheckpointError, ConfigError
from model_tailor.kernel.baselines import BASELINES, BaselineParams

log = logging.getLogger(__name__)

DENSITIES = (0.01, 0.05, 0.10, 0.20)
MT_VARIANTS = {  # row name -> tailor() options; ablations at density 0.10 (docs/METHOD.md, D1, D2, D6)
    "model_tailor": {"alpha": 0.8, "compensation": "obs"},
    "mt_salience_only": {"alpha": 1.0, "compensation": "obs"},
    "mt_sensitivity_only": {"alpha": 0.0, "compensation": "obs"},
    "mt_no_compensation": {"alpha": 0.8, "compensation": "none"},
    # The released code has no guard; with it on, the guard rejects the flipped sign's worse result and the row
    # would silently equal mt_no_compensation (measured on the H100 run of 2026-11-24). So: guard off here.
    "mt_official_sign": {"alpha": 0.8, "compensation": "official", "guard": False},
    # docs/METHOD.md, D5: rank by the cost of reverting the delta, (W̄ - W_pre)²/U_jj², not of zeroing the weight
    "mt_revert_sensitivity": {"alpha": 0.8, "compensation": "obs", "sensitivity": "revert"},
    # FAPM's base-relative salience (kernel.scoring.salience) with OBS compensation: FAPM's selection, which forgets
    # least on the all-layers pair, decorated as Model Tailor decorates its patch. A data-free default candidate.
    "mt_fapm_salience": {"alpha": 1.0, "compensation": "obs", "salience": "fapm"},
    # Compensation only from layer 18 on (the main pair's tuned layers), plain selection below: on the all-layers
    # pair the compensation brings the forgetting back (2026-12-05 runs); is it the early layers' compensation?
    # On the main pair (layers 18-29 tuned) these equal mt_salience_only and mt_fapm_salience by construction.
    "mt_salience_only_late": {"alpha": 1.0, "compensation": "obs", "compensation_from": 18},
    "mt_fapm_salience_late": {"alpha": 1.0, "compensation": "obs", "salience": "fapm", "compensation_from": 18},
    # The same as a rule of depth, not a bench layer index (``compensation_depth``): compensate the deepest quarter
    # or half of the decoder's 30 layers (from layer 22, from layer 15). With the 0.4 of mt_salience_only_late
    # (from 18) they sweep how deep the compensation may reach. On the main pair (layers 18-29 tuned) the half
    # equals mt_salience_only; the quarter leaves layers 18-21 plain.
    "mt_salience_only_deep25": {"alpha": 1.0, "compensation": "obs", "compensation_depth": 0.25},
    "mt_salience_only_deep50": {"alpha": 1.0, "compensation": "obs", "compensation_depth": 0.5},
}
# Preserve-aware Model Tailor (docs/METHOD.md §14): params {structure, preserve, lambda}; preserve
# is "user" (the bench-written original-ability JSONL, ``data.write_preserve``) or "self" (base-model answers
# to the shipped generic instructions). Pipeline engine only.
PRESERVE_METHOD = "model_tailor_preserve"
TAILOR_METHODS = (*MT_VARIANTS, PRESERVE_METHOD)
# mergekit peer rows, --extended only and only when mergekit is installed:
# mergekit method -> the densities (ties, dare_ties) or scales = mergekit weights (task_arithmetic) to run.
# Each row costs ~2 min of CPU evaluation in the full variant, hence a subset of DENSITIES.
PEER_GRID: dict[str, tuple[float, ...]] = {"ties": (0.05, 0.10), "dare_ties": (0.05, 0.10), "task_arithmetic": (0.5,)}
PEER_PREFIX = "mergekit_"  # row name = PEER_PREFIX + mergekit method
# Post-hoc baselines beyond the classic ones (kernel.baselines): FAPM and the truncated-SVD patch at every
# density (the SVD row is the data-free counterpart of ``--structure lowrank``), LiNeS at its defaults (first
# layer's delta x0 rising linearly to x1 at the last of the model's layers), and the fine-tune with its k
# shallowest tuned layers reverted.
DENSITY_BASELINES = ("fapm", "svd")
LINES_DEFAULTS = {"alpha": 0.0, "beta": 1.0}
REVERT_K = (3, 6, 9)


def preserve_spec(
    density: float,
    engine: str,
    *,
    structure: str = "sparse",
    preserve: str = "user",
    lam: float | None = None,
    **extra: object,
) -> MethodSpec:
    """One ``model_tailor_preserve`` row; ``lam`` None = the library default (config.DEFAULT_PRESERVE_WEIGHT)."""
    from model_tailor.config import DEFAULT_PRESERVE_WEIGHT

    params = {
        **MT_VARIANTS["model_tailor"],
        "engine": engine,
        "structure": structure,
        "preserve": preserve,
        "lambda": DEFAULT_PRESERVE_WEIGHT if lam is None else lam,
        **extra,
    }
    return MethodSpec(PRESERVE_METHOD, density, params)


# Depths of the data-free candidate "self low-rank in the deep layers, plain below" (self_lowrank_deep_spec): on the
# main pair (the last 12 of 30 layers tuned) 0.4 is the whole tuned range, the patch of the lambda 3 row.
SELF_LOWRANK_DEPTHS = (0.25, 0.4)


def self_lowrank_deep_spec(depth: float, engine: str) -> MethodSpec:
    """Self low-rank at lambda 3 in the deepest ``ceil(depth * L)`` layers; the shallower ones plain (sparse,
    fine-tuned values, salience only: alpha 1), which is what ``compensation_depth`` makes of them."""
    return preserve_spec(
        0.10, engine, structure="lowrank", preserve="self", lam=3.0, alpha=1.0, compensation_depth=depth
    )


def preserve_specs(quick: bool, engine: str, extended: bool = False) -> list[MethodSpec]:
    """Quick: two rows (user data, sparse 0.10 and dense; ``self`` costs ~60 s more of generation, so it is in
    the full variant only). Full: the frontier (sparse 0.05/0.10/0.20/dense, ``lowrank`` 0.05/0.10,
    ``sparse+lowrank`` 0.10, ``self`` 0.10) and the data-free candidates ``self`` low-rank 0.05/0.10 and 0.10 at
    lambda 3.
    ``extended`` adds the ablations measured once to choose the defaults: sparse 0.01, the lambda grid
    {0.3, 3} around the default 1, ``sparse+lowrank`` 0.05, ``self`` dense, ``salience_from="target"``, and
    ``self`` ``sparse+lowrank`` 0.10."""
    if engine != "pipeline":
        return []  # the in-memory fallback engine has no preserve stream
    if quick:
        return [preserve_spec(0.10, engine), preserve_spec(1.0, engine)]
    rows = [preserve_spec(d, engine) for d in (0.05, 0.10, 0.20, 1.0)]
    rows += [preserve_spec(d, engine, structure="lowrank") for d in (0.05, 0.10)]
    rows += [preserve_spec(0.10, engine, structure="sparse+lowrank"), preserve_spec(0.10, engine, preserve="self")]
    # the data-free candidates for the default (issue: the best tailoring without user data): self data, low rank
    rows += [preserve_spec(d, engine, structure="lowrank", preserve="self") for d in (0.05, 0.10)]
    rows += [preserve_spec(0.10, engine, structure="lowrank", preserve="self", lam=3.0)]  # best of them, 2026-12-07
    if extended:
        rows += [preserve_spec(0.01, engine)]
        rows += [preserve_spec(0.10, engine, lam=lam) for lam in (0.3, 3.0)]
        rows += [preserve_spec(0.05, engine, structure="sparse+lowrank"), preserve_spec(1.0, engine, preserve="self")]
        rows += [preserve_spec(0.10, engine, salience_from="target")]
        # the data-free low-rank candidate with a sparse part beside it
        rows += [preserve_spec(0.10, engine, structure="sparse+lowrank", preserve="self")]
        rows += [self_lowrank_deep_spec(depth, engine) for depth in SELF_LOWRANK_DEPTHS]
    return rows


@dataclass(frozen=True)
class MethodSpec:
    """One row to produce: ``method`` name, ``density`` (None for dense methods), its parameters, and the
    ``pair`` of models it tailors or retrains (``bench.pairs``; "main" is the bench's headline pair)."""

    method: str
    density: float | None = None
    params: dict = field(default_factory=dict)
    pair: str = "main"

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()) if k not in ("engine",))
        dens = "" if self.density is None else f"@{self.density:g}"
        pair = "" if self.pair == "main" else f"{self.pair}:"
        return f"{pair}{self.method}{dens}" + (f"[{extra}]" if extra else "")

    def key(self) -> str:
        """Cache key; the main pair's keys leave the pair out, so they are those of the rows before pairs."""
        pair = {} if self.pair == "main" else {"pair": self.pair}
        return json.dumps({"m": self.method, "d": self.density, "p": self.params, **pair}, sort_keys=True)


def select_specs(specs: list[MethodSpec], only: tuple[str, ...]) -> list[MethodSpec]:
    """Rows whose method name or label (``MethodSpec.label``: ``method@density[params]``, so a glob can pick one
    setting, e.g. ``'*preserve=self*'``) matches one of the ``only`` globs; pretrained and finetuned always stay
    (every ratio is relative to them). No pattern: every row."""
    if not only:
        return specs
    anchors = ("pretrained", "finetuned")
    keep = [s for s in specs if s.method in anchors or any(fnmatch(s.method, o) or fnmatch(s.label, o) for o in only)]
    if all(s.method in anchors for s in keep):
        names = sorted({s.method for s in specs} - set(anchors))
        raise ConfigError(f"--methods {' '.join(only)} matches no row; rows are: {', '.join(names)}")
    return keep


def is_peer(spec: MethodSpec) -> bool:
    return spec.method.startswith(PEER_PREFIX)


def peer_specs(quick: bool) -> list[MethodSpec]:
    """The mergekit rows of ``PEER_GRID``; none in the quick variant or when mergekit is not installed.

    Params name the mergekit version (it is part of the row's cache key); ``dare_ties`` rows carry the seed
    of their random masks, like the project's ``dare`` rows."""
    if quick or not peers.is_available():
        return []
    version = peers.mergekit_version()
    rows = []
    for method, values in PEER_GRID.items():
        for v in values:
            if method in peers.SPARSE_PEERS:
                params = {"mergekit": version, **({"seed": 0} if method == "dare_ties" else {})}
                rows.append(MethodSpec(PEER_PREFIX + method, v, params))
            else:
                rows.append(MethodSpec(PEER_PREFIX + method, None, {"mergekit": version, "scale": v}))
    return rows


def method_specs(quick: bool, engine: str, extended: bool = False) -> list[MethodSpec]:
    """The full matrix, or the quick subset (the models are the same; only the row list shrinks);
    ``extended`` adds the preserve ablations (:func:`preserve_specs`) to the full matrix."""
    mt = [MethodSpec("model_tailor", d, {**MT_VARIANTS["model_tailor"], "engine": engine}) for d in DENSITIES]
    ablations = [MethodSpec(n, 0.10, {**o, "engine": engine}) for n, o in MT_VARIANTS.items() if n != "model_tailor"]
    sparse = [
        MethodSpec(m, d, {"seed": 0} if m in ("dare", "random") else {})
        for m in ("magnitude", "dare", "random", "ties", *DENSITY_BASELINES)
        for d in DENSITIES
    ]
    dense = [MethodSpec("task_arithmetic", None, {"scale": s}) for s in (0.3, 0.5, 0.7)]
    dense += [MethodSpec("wise_ft", None, {"scale": a}) for a in (0.25, 0.5, 0.75)]
    dense += [MethodSpec("lines", None, dict(LINES_DEFAULTS))]
    dense += [MethodSpec("revert_first_k", None, {"k": k}) for k in REVERT_K]
    rows = [MethodSpec("pretrained"), MethodSpec("finetuned")]
    if quick:  # kept small for a cold `make demo` in ~15 min: plain Model Tailor, one baseline, two preserve rows
        return rows + [mt[2], MethodSpec("magnitude", 0.10), *preserve_specs(quick, engine)]
    return rows + mt + ablations + preserve_specs(quick, engine, extended) + sparse + dense + peer_specs(quick)


def changed_tensors(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose values differ between the two state dicts (the fine-tune's footprint)."""
    return sorted(n for n in base if n in finetuned and not torch.equal(base[n], finetuned[n]))


def baseline_overrides(
    spec: MethodSpec,
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    names: list[str],
    *,
    num_layers: int | None = None,
    tuned_layers: tuple[int, ...] = (),
) -> dict[str, torch.Tensor]:
    """``base + baseline(delta)`` for every changed tensor; one seeded generator consumed in name order.

    Each call gets the tensor's name and base value, the model depth and the tuned layers, which the layer-
    and base-aware baselines (``fapm``, ``lines``, ``revert_first_k``) read."""
    if spec.method == "pretrained":
        return {n: base[n] for n in names}
    if spec.method == "finetuned":
        return {n: finetuned[n] for n in names}
    fn = BASELINES.get(spec.method)
    p = spec.params
    common = {"density": spec.density, "scale": p.get("scale"), "seed": p.get("seed", 0), "k": p.get("k")}
    common |= {"num_layers": num_layers, "tuned_layers": tuple(tuned_layers)}
    common |= {k: p[k] for k in ("alpha", "beta") if k in p}
    gen = torch.Generator().manual_seed(common["seed"])
    return {
        n: base[n] + fn([finetuned[n] - base[n]], BaselineParams(**common, name=n, base=base[n]), gen) for n in names
    }


MERGE_METHODS = ("task_arithmetic", "ties")  # the baselines that merge several deltas (kernel.baselines)


def merge_overrides(
    spec: MethodSpec,
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    names: list[str],
) -> dict[str, torch.Tensor]:
    """``base + merge(delta_1, ..., delta_T)`` for every name, one delta per fine-tuned state dict, in order: task
    arithmetic (``scale * sum``) or TIES (each delta trimmed to its top ``density``, elected sign, disjoint mean,
    times ``scale``, default 1). A tensor one fine-tune left unchanged contributes a zero delta, which neither
    method counts. With one fine-tune this is :func:`baseline_overrides`' value for the same spec."""
    if spec.method not in MERGE_METHODS:
        raise ConfigError(f"{spec.method!r} does not merge several fine-tunes; use one of {', '.join(MERGE_METHODS)}")
    if not finetuned:
        raise ConfigError(f"{spec.method} needs at least one fine-tuned state dict")
    params = BaselineParams(density=spec.density, scale=spec.params.get("scale"))
    fn = BASELINES.get(spec.method)
    return {n: base[n] + fn([ft[n] - base[n] for ft in finetuned], params, None) for n in names}


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
    preserve_user: Path | None = None  # the bench-written preserve JSONL (``preserve: "user"`` rows)
    preserve_samples: int = 64
    cache_dir: Path | None = None  # where ``preserve: "self"`` caches its generations


def tailor_fields(spec: MethodSpec, inputs: TailorInputs) -> dict:
    """``tailor()`` keyword arguments of one row beyond the common ones."""
    p = spec.params
    fields = {
        "alpha": p["alpha"],
        "compensation": p["compensation"],
        "guard": p.get("guard", True),
        "sensitivity": p.get("sensitivity", "weight"),
        "salience": p.get("salience", "magnitude"),
        "compensation_from": p.get("compensation_from", 0),
        "compensation_depth": p.get("compensation_depth", 1.0),
    }
    if spec.method == PRESERVE_METHOD:
        if p["preserve"] == "user" and inputs.preserve_user is None:
            raise CheckpointError("preserve row without the bench's preserve data")
        fields.update(
            preserve="self" if p["preserve"] == "self" else str(inputs.preserve_user),
            preserve_weight=p["lambda"],
            preserve_samples=inputs.preserve_samples,
            structure=p.get("structure", "sparse"),
            salience_from=p.get("salience_from", "delta"),
        )
        if inputs.cache_dir is not None:
            fields["cache_dir"] = inputs.cache_dir
    return fields


def tailor_rows(
    specs: list[MethodSpec],
    inputs: TailorInputs,
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    names: list[str],
) -> list[tuple[MethodSpec, dict[str, torch.Tensor], float, dict]]:
    """The one place that runs Model Tailor: ``(spec, overrides, seconds, report summary)`` per row.

    Tensors the patch does not cover (norms, projector) are reset to base, the pipeline's default policy
    (docs/METHOD.md, D19), so the row is exactly ``base + patch``.
    """
    engines = {s.params.get("engine", "pipeline") for s in specs}
    out = []
    if "inmemory" in engines:
        from model_tailor.bench.inmemory import InMemoryTailor

        engine = InMemoryTailor.collect(inputs)
        for spec in [s for s in specs if s.params.get("engine") == "inmemory"]:
            t0 = time.perf_counter()
            # the same options as the pipeline engine gets; one it does not take fails loudly here
            patched, summary = engine.tailor(base, finetuned, density=spec.density, **tailor_fields(spec, inputs))
            seconds = time.perf_counter() - t0 + engine.seconds
            out.append((spec, {n: patched.get(n, base[n]) for n in names}, seconds, summary))
    for spec in [s for s in specs if s.params.get("engine", "pipeline") == "pipeline"]:
        t0 = time.perf_counter()
        tag = "" if spec.method in MT_VARIANTS else "-" + hashlib.sha256(spec.key().encode()).hexdigest()[:8]
        patch_path = inputs.work_dir / f"{spec.method}-{spec.density:g}{tag}.safetensors"
        run = PipelineRun(inputs.base, inputs.calibration, inputs.num_samples, inputs.seed, inputs.device)
        patch, summary = run.tailor(inputs.finetuned, patch_path, spec.density, tailor_fields(spec, inputs))
        unmapped = [n for n in names if n not in inputs.to_ckpt]
        if unmapped:
            raise CheckpointError(f"no checkpoint name for changed tensors {unmapped[:5]}; cannot apply the patch")
        state = patch.apply_to_state_dict({inputs.to_ckpt[n]: base[n] for n in names})
        seconds = time.perf_counter() - t0
        overrides = {n: state[inputs.to_ckpt[n]] for n in names}
        out.append((spec, overrides, seconds, summary))
    return out


@dataclass(frozen=True)
class PipelineRun:
    """The bench's calibration options for one ``model_tailor.api.tailor`` call: every pipeline-engine row
    (single-task here, the multitask pair's single-task and joint patches in ``bench.multitask``) runs through
    :meth:`tailor`, so they all read the same samples, seed and device."""

    base: Path
    calibration: object  # one file, or one per fine-tune (the joint patch)
    samples: int
    seed: int
    device: str

    def tailor(self, finetuned: object, out: Path, density: float, fields: dict) -> tuple[object, dict]:
        """``(patch, report summary)``; ``finetuned`` is one folder or a list (the joint patch)."""
        from model_tailor.api import tailor

        result = tailor(
            base=self.base,
            finetuned=finetuned,
            calibration=self.calibration,
            out=out,
            density=density,
            samples=self.samples,
            seed=self.seed,
            device=self.device,
            overwrite=True,
            progress=True,
            **fields,
        )
        return result.patch, _report_summary(result.report)


def peer_rows(
    specs: list[MethodSpec], base: Path, finetuned: Path, names: list[str], to_ckpt: dict[str, str], work_dir: Path
) -> Iterator[tuple[MethodSpec, dict[str, torch.Tensor], float, dict]]:
    """mergekit peer rows, one at a time: ``(spec, overrides, seconds, extra)``; ``seconds`` is the whole merge
    (staging the changed tensors, mergekit, reading back) and ``extra["mergekit"]`` says what ran."""
    for spec in specs:
        method = spec.method.removeprefix(PEER_PREFIX)
        weight = spec.params.get("scale", 1.0)
        result = peers.merge_pair(
            base,
            finetuned,
            method,
            names=names,
            to_ckpt=to_ckpt,
            density=spec.density,
            weight=weight,
            seed=spec.params.get("seed", 0),
            work_dir=work_dir,
        )
        yield spec, result.overrides, result.seconds, {"mergekit": result.info}


def _report_summary(report: object) -> dict:
    """The few report fields the bench keeps (kept entries, time, warnings); the full report sits beside
    the patch file as ``<patch>.report.json``."""
    out = {}
    for key in ("kept", "numel", "seconds", "warnings", "preserve"):
        value = getattr(report, key, None)
        if value is not None:
            out[key] = json.loads(json.dumps(value, default=str))
    if out.get("numel"):
        out["density"] = out.get("kept", 0) / out["numel"]
    return out


def progress(items: list, desc: str) -> tqdm:
    return tqdm(items, desc=desc, unit="row")
