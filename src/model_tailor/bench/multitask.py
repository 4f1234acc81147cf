"""TailorBench's multitask pair: two fine-tunes of one base made into one model, measured on both tasks (issue 14).

The pair (``--pairs multitask``, full variant, pipeline engine; never selected by default) has the main build's
pre-trained model and two fine-tunes of it with the same recipe: the main one (easy-VQA) and the second task's
(``tasks.SecondTask``, two-digit addition; ``retrain.second_finetune``). Every row is evaluated on the original
tasks and on BOTH targets:

* anchors: ``pretrained``, ``finetuned`` (easy-VQA's anchor) and ``finetuned_addition`` (the addition anchor);
* ``mt_single`` (``task=``): each task's own Model Tailor patch at :data:`DENSITY`, alone, scored on both targets;
* ``mt_combine`` (``policy=`` disjoint-mean, sum, ties): ``combine`` of the two single-task patches, and
  ``mt_combine_redecorate``: disjoint-mean, then ``--redecorate`` with both tasks' calibration data;
* ``mt_joint``: ONE patch from both fine-tunes and both calibration files (``tailor --finetuned A B``), and
  ``mt_joint_preserve``: the same with the bench's preserve data (what the preserve rows get); ``mt_joint`` at
  density 1 is the dense RegMean-style merge: every tuned linear at the least-squares minimiser of
  ``sum_t ||(W - W_t) X_t||^2`` (damped; ``kernel.multitask``), the other changed tensors at base;
* merges of the two deltas, data-free: ``task_arithmetic`` (``scale`` x their sum), ``ties`` at :data:`DENSITY`
  per delta (``methods.merge_overrides``; the pair's :data:`REFERENCE`) and mergekit's own ``ties`` when installed;
* ``multitask_finetune``: one fine-tune on both tasks' data (``retrain.multitask_finetune``), the reference a
  user could retrain instead.

Metrics (``bench.stats.task_metrics``): retention over the original tasks, each target's ratio against its own
fine-tune, and H, the harmonic mean of the three; each row's H is compared with the ``ties`` row's by the paired
bootstrap (``Row.multitask``). Budgets, per tensor: each single-task patch and each of TIES' trims keeps
:data:`DENSITY` of its delta, so a combination or merge holds up to twice that in all; the joint patch keeps
:data:`DENSITY` in all. Every sparse row thus stays within :data:`DENSITY` per task (task arithmetic is dense).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model_tailor.bench import peers
from model_tailor.bench import retrain as R
from model_tailor.bench.data import sample, write_text_calibration
from model_tailor.bench.methods import MT_VARIANTS, PEER_PREFIX, MethodSpec, merge_overrides
from model_tailor.bench.tasks import SECOND_TASK, SecondTask, Task
from model_tailor.errors import CheckpointError

PAIR = "multitask"
BUILD = "multitask"  # its models are the main build's; its evaluations add the second task (``runner._open``)
VERSION = 1  # part of every evaluation key of the pair, with the second task's settings
VQA = "easy_vqa"
DENSITY = 0.10
COMBINE_POLICIES = ("disjoint-mean", "sum", "ties")
REDECORATE_POLICY = "disjoint-mean"
TA_SCALES = (0.5, 1.0)  # the two deltas' mean and their sum
SINGLE = "mt_single"
COMBINE = "mt_combine"
REDECORATE = "mt_combine_redecorate"
JOINT = "mt_joint"
JOINT_PRESERVE = "mt_joint_preserve"
TAILORED = (SINGLE, COMBINE, REDECORATE, JOINT, JOINT_PRESERVE)
REFERENCE = "ties"  # every row of the pair is compared with this one (paired difference in H)
MERGEKIT_TIES = PEER_PREFIX + "ties"


def targets(task: SecondTask = SECOND_TASK) -> tuple[str, str]:
    """The pair's target tasks, in the order of its fine-tunes and calibration files."""
    return (VQA, task.name)


def task_anchors(task: SecondTask = SECOND_TASK) -> tuple[tuple[str, str], ...]:
    """``(target task, its fine-tuned anchor's method)`` pairs (``pairs.Pair.task_anchors``)."""
    return ((VQA, "finetuned"), (task.name, R.second_method(task)))


def key_extra(task: SecondTask = SECOND_TASK) -> dict:
    """What the pair's evaluation keys add to the main build's (``runner``): the pair's version and the second
    task's settings, so its 4-task evaluations never meet the main pair's 3-task ones."""
    return {"multitask": {"version": VERSION, "task": asdict(task)}}


def multitask_specs(
    engine: str, task: SecondTask = SECOND_TASK, mergekit: str | None = None, preserve_weight: float | None = None
) -> list[MethodSpec]:
    """Every row of the pair (module docstring); none for the in-memory engine (it has no joint, combine or
    preserve path). ``mergekit`` is the installed version (None: no mergekit row); ``preserve_weight`` None is
    the library default."""
    if engine != "pipeline":
        return []
    from model_tailor.config import DEFAULT_PRESERVE_WEIGHT

    mt = {**MT_VARIANTS["model_tailor"], "engine": engine}
    lam = DEFAULT_PRESERVE_WEIGHT if preserve_weight is None else preserve_weight
    rows = [MethodSpec(m, pair=PAIR) for m in ("pretrained", "finetuned", R.second_method(task))]
    rows += [MethodSpec(SINGLE, DENSITY, {**mt, "task": t}, PAIR) for t in targets(task)]
    rows += [MethodSpec(COMBINE, DENSITY, {**mt, "policy": p}, PAIR) for p in COMBINE_POLICIES]
    rows += [MethodSpec(REDECORATE, DENSITY, {**mt, "policy": REDECORATE_POLICY}, PAIR)]
    rows += [MethodSpec(JOINT, DENSITY, mt, PAIR), MethodSpec(JOINT, 1.0, mt, PAIR)]  # 1.0: RegMean-style
    rows += [MethodSpec(JOINT_PRESERVE, DENSITY, {**mt, "preserve": "user", "lambda": lam}, PAIR)]
    rows += [MethodSpec("task_arithmetic", None, {"scale": s}, PAIR) for s in TA_SCALES]
    rows += [MethodSpec(REFERENCE, DENSITY, {}, PAIR)]
    if mergekit is not None:
        rows += [MethodSpec(MERGEKIT_TIES, DENSITY, {"mergekit": mergekit}, PAIR)]
    return rows + [MethodSpec(R.MULTITASK_FINETUNE, None, {"share": R.MULTITASK_SHARE}, PAIR)]


def is_retrained(spec: MethodSpec, task: SecondTask = SECOND_TASK) -> bool:
    """Rows whose weights are a fine-tune of their own (the second task's, the multitask one)."""
    return spec.method in (R.second_method(task), R.MULTITASK_FINETUNE)


def uses_preserve(spec: MethodSpec) -> bool:
    return spec.pair == PAIR and spec.method == JOINT_PRESERVE


@dataclass(frozen=True)
class SecondData:
    """The second task's calibration file (from its calibration pool) and the leak check of what the run uses."""

    calibration: Path
    check: dict


def second_data(
    root: Path, samples: int, seed: int, tests: Sequence[Task], task: SecondTask = SECOND_TASK
) -> SecondData:
    """Write the second task's calibration JSONL under ``root/multitask/<task>`` and check that its training draw,
    calibration records and the run's test items share no problem (``leaks.check_addition_disjoint``)."""
    from model_tailor.bench.data import addition_examples
    from model_tailor.bench.leaks import check_addition_disjoint

    calibration = addition_examples(sample(task.splits().calibration, samples, seed + 4))
    tested = [ex.prompt for t in tests if t.name == task.name for ex in t.examples]
    train = [ex.prompt for ex in addition_examples(task.splits().train)]  # every draw comes from this pool
    check = check_addition_disjoint({"train": train, "calibration": [ex.prompt for ex in calibration], "test": tested})
    path = write_text_calibration(calibration, root / "multitask" / task.name)
    return SecondData(path, check)


@dataclass(frozen=True)
class MultitaskInputs:
    """What the pair's tailored and merged rows need: the base folder, the two fine-tunes and their calibration
    files (task order: easy-VQA, then the second task), calibration options, and where patches go."""

    base: Path
    finetuned: tuple[Path, ...]
    calibration: tuple[Path, ...]
    samples: int
    seed: int
    device: str
    work_dir: Path
    to_ckpt: Mapping[str, str]  # state-dict name -> checkpoint tensor name
    preserve: Path | None = None  # the bench's preserve JSONL (``mt_joint_preserve``)
    preserve_samples: int = 64


def _fields(spec: MethodSpec) -> dict:
    p = spec.params
    return {"alpha": p["alpha"], "compensation": p["compensation"], "guard": True, "sensitivity": "weight"}


def _tag(spec: MethodSpec, inputs: MultitaskInputs) -> str:
    blob = f"{spec.key()}|{inputs.finetuned}|{inputs.calibration}"
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _apply(patch, base: Mapping[str, torch.Tensor], names: list[str], to_ckpt: Mapping[str, str]) -> dict:
    """``base + patch`` on the changed tensors (tensors the patch resets or leaves out are base values)."""
    unmapped = [n for n in names if n not in to_ckpt]
    if unmapped:
        raise CheckpointError(f"no checkpoint name for changed tensors {unmapped[:5]}; cannot apply the patch")
    state = patch.apply_to_state_dict({to_ckpt[n]: base[n] for n in names})
    return {n: state[to_ckpt[n]] for n in names}


class _Patches:
    """The two single-task patches, each tailored once per run when a row needs it."""

    def __init__(self, inputs: MultitaskInputs, tasks: Sequence[str]) -> None:
        self.inputs, self.tasks = inputs, list(tasks)
        self._done: dict[str, tuple[object, float, dict]] = {}

    def single(self, spec: MethodSpec, task: str) -> tuple[object, float, dict]:
        """``(patch, seconds, report summary)`` of ``task``'s own patch with ``spec``'s density and options."""
        one = MethodSpec(SINGLE, spec.density, {k: spec.params[k] for k in ("alpha", "compensation")})
        key = f"{task}|{one.key()}"
        if key not in self._done:
            i, inputs = self.tasks.index(task), self.inputs
            t0 = time.perf_counter()
            out = inputs.work_dir / f"single-{task}-{spec.density:g}-{_tag(one, inputs)}.safetensors"
            patch, summary = _tailor(
                inputs, inputs.finetuned[i], inputs.calibration[i], out, spec.density, _fields(spec)
            )
            self._done[key] = (patch, time.perf_counter() - t0, summary)
        return self._done[key]

    def both(self, spec: MethodSpec) -> tuple[list[object], float]:
        got = [self.single(spec, t) for t in self.tasks]
        return [g[0] for g in got], sum(g[1] for g in got)


def _joint(spec: MethodSpec, inputs: MultitaskInputs) -> tuple[object, dict]:
    """One joint patch of both fine-tunes (with the preserve data for ``mt_joint_preserve``)."""
    fields = _fields(spec)
    if spec.method == JOINT_PRESERVE:
        if inputs.preserve is None:
            raise CheckpointError(f"{spec.label} without the bench's preserve data")
        fields |= {
            "preserve": str(inputs.preserve),
            "preserve_weight": spec.params["lambda"],
            "preserve_samples": inputs.preserve_samples,
        }
    out = inputs.work_dir / f"{spec.method}-{spec.density:g}-{_tag(spec, inputs)}.safetensors"
    return _tailor(inputs, list(inputs.finetuned), list(inputs.calibration), out, spec.density, fields)


def _tailor(
    inputs: MultitaskInputs, finetuned: object, calibration: object, out: Path, density: float, fields: dict
) -> tuple[object, dict]:
    """``(patch, report summary)`` of one pipeline run with the pair's calibration options: one fine-tune (a
    single-task patch) or a list of them (the joint patch)."""
    from model_tailor.bench.methods import PipelineRun

    run = PipelineRun(inputs.base, calibration, inputs.samples, inputs.seed, inputs.device)
    return run.tailor(finetuned, out, density, fields)


def _combined(spec: MethodSpec, patches: _Patches) -> tuple[object, float, dict]:
    """``combine`` of the single-task patches (re-decorated for ``mt_combine_redecorate``)."""
    from model_tailor.patch.combine import combine_patches

    parts, seconds = patches.both(spec)
    t0 = time.perf_counter()
    combined, report = combine_patches(parts, policy=spec.params["policy"])
    info = {"policy": report.policy, "union": report.union, "overlap": report.overlap}
    if spec.method == REDECORATE:
        from model_tailor.config import TailorConfig
        from model_tailor.pipeline.redecorate import redecorate_patch

        inputs = patches.inputs
        cfg = TailorConfig.build(
            base=inputs.base,
            finetuned=list(inputs.finetuned),
            calibration=list(inputs.calibration),
            samples=inputs.samples,
            seed=inputs.seed,
            device=inputs.device,
        )
        combined = redecorate_patch(combined, cfg, progress=True)
        info["redecorated"] = combined.metadata.config.get("combine", {}).get("redecorated", {}).get("tensors")
    return combined, seconds + time.perf_counter() - t0, info


def posthoc_rows(
    specs: Sequence[MethodSpec],
    inputs: MultitaskInputs,
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    names: list[str],
    tasks: Sequence[str] = targets(),
) -> Iterator[tuple[MethodSpec, dict[str, torch.Tensor], float, dict]]:
    """The pair's tailored and merged rows, one at a time: ``(spec, overrides, seconds, extra)``; ``finetuned``
    holds the two fine-tunes' state dicts in ``tasks`` order. A combined row's seconds include both
    tailorings (each done once per run)."""
    inputs.work_dir.mkdir(parents=True, exist_ok=True)
    patches = _Patches(inputs, tasks)
    for spec in specs:
        t0 = time.perf_counter()
        if spec.method == SINGLE:
            patch, seconds, summary = patches.single(spec, spec.params["task"])
            yield spec, _apply(patch, base, names, inputs.to_ckpt), seconds, {"tailor": summary}
        elif spec.method in (COMBINE, REDECORATE):
            patch, seconds, info = _combined(spec, patches)
            yield spec, _apply(patch, base, names, inputs.to_ckpt), seconds, {"combine": info}
        elif spec.method in (JOINT, JOINT_PRESERVE):
            patch, summary = _joint(spec, inputs)
            yield spec, _apply(patch, base, names, inputs.to_ckpt), time.perf_counter() - t0, {"tailor": summary}
        elif spec.method in ("task_arithmetic", REFERENCE):
            yield spec, merge_overrides(spec, base, finetuned, names), time.perf_counter() - t0, {}
        elif spec.method == MERGEKIT_TIES:
            merged = peers.merge_pair(
                inputs.base,
                list(inputs.finetuned),
                "ties",
                names=names,
                to_ckpt=inputs.to_ckpt,
                density=spec.density,
                work_dir=inputs.work_dir / "peers",
            )
            yield spec, merged.overrides, merged.seconds, {"mergekit": merged.info}
        else:
            raise ValueError(f"{spec.label} is not a post-hoc row of the multitask pair")
