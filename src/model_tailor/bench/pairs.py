"""TailorBench pairs: the (pre-trained, fine-tuned) pair every row is measured against, and the rows beyond the
main matrix (full variant only; ``--quick`` lists the main pair's quick rows alone).

* ``main``: the bench's fine-tune (the last ``tune_last`` decoder layers + projector, full fine-tuning): every
  row of ``methods.method_specs``, plus the retraining rows of ``bench.retrain`` (``lora_r16``, ``lora_r64``,
  ``rehearsal_0.25``, ``rehearsal_0.50``), whose target ratio is against the full fine-tune.
* ``lora_r16``: the pre-trained model and the main pair's LoRA r16 fine-tune, tailored from its adapter folder
  (``--finetuned ADAPTER``, always by the pipeline engine: the in-memory one reads model folders only). Its
  fine-tuned anchor is the ``lora_r16`` row; its rows are also measured against the full fine-tune
  (``Row.vs_full_finetune``). Its ``pretrained`` and ``lora_r16`` rows are copies of the main pair's (the same
  models, one evaluation).
* ``all_layers``: every decoder layer + projector fine-tuned (``BuildConfig.all_layers``, the same pre-trained
  model), with the headline rows: anchors, Model Tailor at 0.05 / 0.10, the preserve rows that scored best in
  the 2026-11-24 full run (lowrank 0.10, sparse dense) and the default sparse 0.10, magnitude and FAPM at
  0.05 / 0.10, and LoRA r16 on every layer.
* ``multitask`` (opt-in: listed in the full variant, selected only by ``--pairs multitask``): the main pre-trained
  model, the main fine-tune and a second task's fine-tune of it, made into one model by tailoring, combining and
  merging (``bench.multitask``); each target task's ratio is against its own fine-tune (``Pair.task_anchors``) and
  every row is compared with TIES merging (``Pair.reference``).

Ratios, intervals and the comparison with Model Tailor are computed within a pair (``analysis.finalize``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from model_tailor.bench import multitask as MX
from model_tailor.bench import peers
from model_tailor.bench import retrain as R
from model_tailor.bench.methods import (
    MT_VARIANTS,
    PRESERVE_METHOD,
    SELF_LOWRANK_DEPTHS,
    MethodSpec,
    method_specs,
    preserve_spec,
    select_specs,
    self_lowrank_deep_spec,
)
from model_tailor.bench.models import BuildConfig
from model_tailor.bench.results import Row
from model_tailor.errors import ConfigError

MAIN = "main"
ANCHOR_METHODS = ("pretrained", "finetuned")
LORA_RANKS = (16, 64)
REHEARSAL_SHARES = (0.25, 0.50)
LORA_TAILOR_RANK = 16
LORA_TAILOR_DENSITIES = (0.05, 0.10)
ALL_LAYERS_DENSITIES = (0.05, 0.10)
# (density, structure, preserve, lambda; None = the library default): the default preserve row, the two best of the
# main pair, the data-free one, and the data-free one at lambda 3 (the best data-free row of the main pair,
# 2026-12-07)
ALL_LAYERS_PRESERVE = (
    (0.10, "sparse", "user", None),
    (0.10, "lowrank", "user", None),
    (1.0, "sparse", "user", None),
    (0.10, "lowrank", "self", None),
    (0.10, "lowrank", "self", 3.0),
)
ALL_LAYERS_BASELINES = ("magnitude", "fapm")
# Model Tailor variants at 0.10 on this pair too: the data-free default candidates must be measured on both pairs.
ALL_LAYERS_VARIANTS = (
    "mt_salience_only",
    "mt_fapm_salience",
    "mt_salience_only_late",
    "mt_fapm_salience_late",
    "mt_salience_only_deep25",
    "mt_salience_only_deep50",
)


@dataclass(frozen=True)
class Pair:
    """How a pair's rows are measured: its models' build, its fine-tuned anchor's method, the main-pair rows it
    copies in as anchors, the pair whose full fine-tune it is also measured against, and, for a pair with several
    target tasks, each task's own fine-tuned anchor and the row every row is compared with. An ``opt_in`` pair is
    selected only when ``--pairs`` names it, so the default run does not grow with it."""

    build: str  # "main" | "all_layers" | "multitask": which BuildConfig its models come from (build_config)
    finetuned: str = "finetuned"
    borrowed: tuple[str, ...] = ()
    full_finetune: str | None = None
    description: str = ""
    task_anchors: tuple[tuple[str, str], ...] = ()  # (target task, its anchor's method); empty: ``finetuned``
    reference: str | None = None  # method of the row every row of the pair is compared with (Row.multitask)
    opt_in: bool = False


PAIRS: dict[str, Pair] = {
    MAIN: Pair("main", description="the bench's fine-tune: the last tune_last decoder layers + projector, full"),
    "lora_r16": Pair(
        "main",
        finetuned="lora_r16",
        borrowed=("pretrained", "lora_r16"),
        full_finetune=MAIN,
        description="the main pair's LoRA r16 fine-tune, tailored from its adapter folder; target ratio against "
        "the LoRA fine-tune (vs_full_finetune: against the full fine-tune)",
    ),
    "all_layers": Pair("all_layers", description="every decoder layer + projector, full fine-tune"),
    MX.PAIR: Pair(
        MX.BUILD,
        description="the main fine-tune (easy-VQA) and the same recipe's fine-tune on a second task (two-digit "
        "addition) made into one model; each target ratio against its own fine-tune, H over retention and both",
        task_anchors=MX.task_anchors(),
        reference=MX.REFERENCE,
        opt_in=True,
    ),
}


def build_config(main: BuildConfig, build: str) -> BuildConfig:
    """A build's models: the multitask pair's are the main build's (its sessions add the second task)."""
    return main if build in ("main", MX.BUILD) else main.all_layers()


def anchor_methods(pair: str) -> tuple[str, ...]:
    """The methods of a pair's anchors: pretrained, its fine-tuned anchor and every target task's own."""
    p = PAIRS[pair]
    return tuple(dict.fromkeys(("pretrained", p.finetuned, *(m for _, m in p.task_anchors))))


def kind_of(spec: MethodSpec) -> str:
    """``anchor`` (the pair's models), ``retrain`` (a different fine-tune) or ``post-hoc``."""
    if spec.method in anchor_methods(spec.pair):
        return "anchor"
    return "retrain" if R.is_retrain(spec.method) or MX.is_retrained(spec) else "post-hoc"


def lora_spec(build: BuildConfig, rank: int, pair: str = MAIN) -> MethodSpec:
    settings = R.LoraSettings.for_build(build, rank)
    return MethodSpec(settings.method, None, settings.params(), pair)


def retrain_specs(build: BuildConfig) -> list[MethodSpec]:
    """The main pair's LoRA and rehearsal rows."""
    lora = [lora_spec(build, r) for r in LORA_RANKS]
    return lora + [MethodSpec(R.rehearsal_method(s), None, {"share": s}) for s in REHEARSAL_SHARES]


def lora_tailor_specs(build: BuildConfig) -> list[MethodSpec]:
    """Model Tailor on the LoRA pair; ``adapter`` holds the LoRA's settings, so its cache key follows them."""
    adapter = R.LoraSettings.for_build(build, LORA_TAILOR_RANK)
    params = {**MT_VARIANTS["model_tailor"], "engine": "pipeline", "adapter": adapter.params()}
    return [MethodSpec(f"{adapter.method}+mt", d, params, adapter.method) for d in LORA_TAILOR_DENSITIES]


def all_layers_specs(engine: str, build: BuildConfig) -> list[MethodSpec]:
    pair = "all_layers"
    rows = [MethodSpec(m, pair=pair) for m in ANCHOR_METHODS]
    mt = {**MT_VARIANTS["model_tailor"], "engine": engine}
    rows += [MethodSpec("model_tailor", d, mt, pair) for d in ALL_LAYERS_DENSITIES]
    rows += [MethodSpec(m, 0.10, {**MT_VARIANTS[m], "engine": engine}, pair) for m in ALL_LAYERS_VARIANTS]
    if engine == "pipeline":  # the in-memory engine has no preserve stream
        rows += [
            replace(preserve_spec(d, engine, structure=st, preserve=pr, lam=lam), pair=pair)
            for d, st, pr, lam in ALL_LAYERS_PRESERVE
        ]
        rows += [replace(self_lowrank_deep_spec(depth, engine), pair=pair) for depth in SELF_LOWRANK_DEPTHS]
    rows += [MethodSpec(m, d, pair=pair) for m in ALL_LAYERS_BASELINES for d in ALL_LAYERS_DENSITIES]
    return rows + [lora_spec(build.all_layers(), LORA_TAILOR_RANK, pair)]


def variant_specs(quick: bool, engine: str, extended: bool, build: BuildConfig) -> list[MethodSpec]:
    """Every row the bench can run in a variant (its catalogue): ``methods.method_specs`` and, beyond the quick
    variant, the retraining rows, the LoRA pair, the all-layers pair and the (opt-in) multitask pair. What a run
    lists by default is :func:`variant_rows`."""
    rows = method_specs(quick, engine, extended)
    if quick:
        return rows
    rows = rows + retrain_specs(build) + lora_tailor_specs(build) + all_layers_specs(engine, build)
    return rows + MX.multitask_specs(engine, mergekit=peers.mergekit_version() if peers.is_available() else None)


@dataclass(frozen=True)
class Headline:
    """One headline row of the full variant: its pair, method and density (None: a dense row), and the params it
    must carry (a subset of the row's; the rest, such as the engine, may be anything; a value None: the row must
    not have that param)."""

    pair: str
    method: str
    density: float | None = None
    params: tuple[tuple[str, object], ...] = ()

    def matches(self, spec: MethodSpec) -> bool:
        if (spec.pair, spec.method) != (self.pair, self.method):
            return False
        if (spec.density is None) != (self.density is None):
            return False
        if spec.density is not None and not math.isclose(spec.density, self.density):
            return False
        return all(spec.params.get(k) == v for k, v in self.params)


_USER_LOWRANK = (("preserve", "user"), ("structure", "lowrank"))
# best data-free, 2026-12-07 (every layer decorated: the depth rows of self_lowrank_deep_spec are --extended)
_SELF_LOWRANK_3 = (("preserve", "self"), ("structure", "lowrank"), ("lambda", 3.0), ("compensation_depth", None))
# The full variant's default rows: what the README's headline tables show, the anchors a user would compare
# against (issue 12) and the data-free default candidates measured on both pairs (issue 13). Every other row of
# the catalogue is an ablation or a grid point, run with ``--extended``. One evaluation costs ~3.6 min on a 2-core
# CPU, so each row here is a choice: revert_first_k runs at k = 6 only (half the main pair's 12 tuned layers).
HEADLINE: tuple[Headline, ...] = (
    Headline(MAIN, "model_tailor", 0.05),
    Headline(MAIN, "model_tailor", 0.10),
    Headline(MAIN, "mt_salience_only", 0.10),
    Headline(MAIN, PRESERVE_METHOD, 0.10, _USER_LOWRANK),
    Headline(MAIN, PRESERVE_METHOD, 0.10, _SELF_LOWRANK_3),
    *(Headline(MAIN, m, 0.10) for m in ("magnitude", "fapm", "ties", "svd")),
    Headline(MAIN, "lines"),
    Headline(MAIN, "revert_first_k", None, (("k", 6),)),
    *(Headline(MAIN, R.lora_method(r)) for r in LORA_RANKS),
    *(Headline(MAIN, R.rehearsal_method(s)) for s in REHEARSAL_SHARES),
    Headline(R.lora_method(LORA_TAILOR_RANK), R.lora_method(LORA_TAILOR_RANK) + "+mt", 0.10),
    *(Headline("all_layers", "model_tailor", d) for d in ALL_LAYERS_DENSITIES),
    Headline("all_layers", "mt_salience_only_late", 0.10),
    Headline("all_layers", PRESERVE_METHOD, 0.10, _USER_LOWRANK),
    Headline("all_layers", PRESERVE_METHOD, 0.10, _SELF_LOWRANK_3),
    *(Headline("all_layers", m, 0.10) for m in ALL_LAYERS_BASELINES),
    Headline("all_layers", R.lora_method(LORA_TAILOR_RANK)),
)


def is_headline(spec: MethodSpec) -> bool:
    """A row the full variant lists by default: a pair's anchor, a :data:`HEADLINE` row, or a row of an opt-in
    pair (run only when ``--pairs`` names it, so it never lengthens the default run)."""
    pair = PAIRS[spec.pair]
    return spec.method in anchor_methods(spec.pair) or pair.opt_in or any(h.matches(spec) for h in HEADLINE)


def variant_rows(quick: bool, engine: str, extended: bool, build: BuildConfig) -> list[MethodSpec]:
    """The rows a run picks from (``--methods``, ``--pairs`` and ``--densities`` narrow them): the quick
    variant's, the full variant's headline rows (:func:`is_headline`), or with ``extended`` the whole catalogue
    (:func:`variant_specs`, preserve ablations included)."""
    rows = variant_specs(quick, engine, extended, build)
    return rows if quick or extended else [s for s in rows if is_headline(s)]


def _needed(pair: str) -> set[tuple[str, str]]:
    """The (pair, method) rows a pair cannot be measured without."""
    p = PAIRS[pair]
    own = {(pair, m) for m in anchor_methods(pair) if m not in p.borrowed}
    own |= {(MAIN, m) for m in p.borrowed}
    return own | ({(p.full_finetune, "finetuned")} if p.full_finetune else set())


def select(
    specs: list[MethodSpec],
    only: Sequence[str] = (),
    pairs: Sequence[str] = (),
    densities: Sequence[float] = (),
) -> list[MethodSpec]:
    """Rows matching ``only`` (``methods.select_specs``) in the ``pairs`` asked for (default: the main pair and
    every pair with a matching row, opt-in pairs left out), plus every anchor those pairs are measured against.
    ``densities`` (empty: all) drops the rows at any other density; rows without one (dense methods, anchors) are
    not affected."""
    if densities:
        kept = [s for s in specs if s.density is None or any(math.isclose(s.density, d) for d in densities)]
        if not any(s.density is not None for s in kept):
            listed = sorted({s.density for s in specs if s.density is not None})
            raise ConfigError(f"--densities {' '.join(f'{d:g}' for d in densities)} matches no row; "
                              f"the densities are {', '.join(f'{d:g}' for d in listed)}")  # fmt: skip
        specs = kept
    listed = list(dict.fromkeys(s.pair for s in specs))
    unknown = [p for p in pairs if p not in listed]
    if unknown:
        raise ConfigError(f"--pairs {' '.join(unknown)}: not in this variant; its pairs are {', '.join(listed)}")
    picked = select_specs(specs, tuple(only))
    if pairs:
        keep = set(pairs)
        if only and not any(s.pair in keep and s.method not in anchor_methods(s.pair) for s in picked):
            raise ConfigError(f"--methods {' '.join(only)} matches no row of --pairs {' '.join(pairs)}")
    else:
        keep = {MAIN} | {s.pair for s in picked if s.method not in ANCHOR_METHODS and not PAIRS[s.pair].opt_in}
    needed = set().union(*(_needed(p) for p in keep))
    chosen = {s.key() for s in picked if s.pair in keep}
    return [s for s in specs if s.key() in chosen or (s.pair, s.method) in needed]


def arrange(rows: list[Row], specs: list[MethodSpec]) -> list[Row]:
    """Rows in ``specs`` order, pair by pair, each pair led by copies of the main-pair rows it borrows."""
    order = {s.key(): i for i, s in enumerate(specs)}
    rows = sorted(rows, key=lambda r: order.get(MethodSpec(r.method, r.density, r.params, r.pair).key(), 1 << 30))
    out: list[Row] = []
    for name in dict.fromkeys(r.pair for r in rows):
        for method in PAIRS[name].borrowed:
            src = next(r for r in rows if r.pair == MAIN and r.method == method)
            kind = kind_of(MethodSpec(method, pair=name))
            extra = {**src.extra, "copy_of": f"{MAIN}:{method}"}
            out.append(replace(src, pair=name, kind=kind, extra=extra, intervals={}, vs_tailor=None))
        out += [r for r in rows if r.pair == name]
    return out


def anchors() -> dict[str, str]:
    """``analysis.finalize``'s ``anchors``: pair -> its fine-tuned anchor's method."""
    return {name: p.finetuned for name, p in PAIRS.items()}


def task_anchors() -> dict[str, dict[str, str]]:
    """``analysis.finalize``'s ``task_anchors``: pair -> {target task: its anchor's method}, for the pairs with
    several target tasks."""
    return {name: dict(p.task_anchors) for name, p in PAIRS.items() if p.task_anchors}


def references() -> dict[str, str]:
    """``analysis.finalize``'s ``references``: pair -> the method its rows are compared with."""
    return {name: p.reference for name, p in PAIRS.items() if p.reference}


def full_finetune() -> dict[str, str]:
    """``analysis.finalize``'s ``full_finetune``: pair -> the pair whose full fine-tune it is also measured by."""
    return {name: p.full_finetune for name, p in PAIRS.items() if p.full_finetune}
