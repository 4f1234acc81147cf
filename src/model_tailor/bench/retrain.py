"""TailorBench retraining anchors: the bench's fine-tune done differently, as a user would instead of tailoring.

Each is the build's own fine-tune (``models.build_finetune``: the same easy-VQA draw, steps, batch size,
warm-up + cosine schedule and seeds) with one thing changed, seeded and cached under the build's folder
(``retrain/<row>-<hash of its settings>``):

* **LoRA** (rows ``lora_r16``, ``lora_r64``): PEFT LoRA on every linear module of the tuned decoder layers
  (q/k/v/o and gate/up/down projections) at rank r with ``lora_alpha = 2r`` (LLaVA-1.5's LoRA recipe: r 128,
  alpha 256), no dropout (the full fine-tune has none). The projector is trained whole, as ``modules_to_save``,
  at the full fine-tune's projector learning rate, as LLaVA-1.5's LoRA recipe trains it; the tuned layers'
  norms, which the full fine-tune trains, stay frozen. LoRA learning rate = ``LORA_LR_RATIO`` (10) x the full
  fine-tune's (1e-3 for the bench's 1e-4): LLaVA-1.5 runs LoRA at 2e-4 where its full fine-tune runs at 2e-5,
  and the bench already runs the full fine-tune at the paper's 1e-4 over a far shorter schedule, so the LoRA
  keeps the recipe's ratio rather than its absolute 2e-4. The adapter folder (``save_pretrained``) is kept; the
  row evaluates it merged (``merge_and_unload``) on the pre-trained model.
* **Rehearsal** (rows ``rehearsal_0.25``, ``rehearsal_0.50``): the full fine-tune with a share of its batches
  (exactly ``round(share * steps)``, at seeded steps) drawn from the bench's preserve data (what the
  ``--preserve FILE`` rows get, ``leaks.write_bench_preserve``) instead of easy-VQA; every other step trains on
  the batch the full fine-tune has at that step.
* **The multitask pair's fine-tunes** (``bench.multitask``): ``finetuned_addition``, the same recipe on the second
  task's training pool instead of easy-VQA (its target anchor), and ``multitask_finetune``, the reference: the full
  fine-tune with half its steps (``MULTITASK_SHARE``, seeded as the rehearsal plan) training on second-task
  batches, so both tasks share the one budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model_tailor.bench import assets
from model_tailor.bench.data import Example, PixelCache, addition_examples, sample
from model_tailor.bench.inmemory import read_calibration
from model_tailor.bench.models import (
    BuildConfig,
    BuiltModels,
    build_finetune,
    finetune_examples,
    load_model,
    save_folder,
    train_steps,
)
from model_tailor.bench.tasks import SecondTask

RETRAIN_VERSION = 1
LORA_LR_RATIO = 10
LORA_MODULES = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PROJECTOR = "multi_modal_projector"
_LORA_ROW = re.compile(r"^lora_r\d+$")
REHEARSAL_PREFIX = "rehearsal_"
MULTITASK_FINETUNE = "multitask_finetune"
MULTITASK_SHARE = 0.5  # share of the multitask fine-tune's steps on second-task batches


def is_lora(method: str) -> bool:
    return bool(_LORA_ROW.match(method))


def is_rehearsal(method: str) -> bool:
    return method.startswith(REHEARSAL_PREFIX)


def is_retrain(method: str) -> bool:
    return is_lora(method) or is_rehearsal(method)


def rehearsal_method(share: float) -> str:
    return f"{REHEARSAL_PREFIX}{share:.2f}"


def lora_method(rank: int) -> str:
    return f"lora_r{rank}"


@dataclass(frozen=True)
class LoraSettings:
    """One LoRA fine-tune: rank, ``lora_alpha``, the LoRA and projector learning rates, dropout, and how the
    projector trains (``modules_to_save``: whole). Its fields are the row's params and part of its cache key."""

    rank: int
    lora_alpha: int
    lr: float
    projector_lr: float
    dropout: float = 0.0
    projector: str = "modules_to_save"

    @classmethod
    def for_build(cls, cfg: BuildConfig, rank: int) -> LoraSettings:
        return cls(rank=rank, lora_alpha=2 * rank, lr=LORA_LR_RATIO * cfg.ft_lr, projector_lr=cfg.ft_projector_lr)

    @property
    def method(self) -> str:
        return lora_method(self.rank)

    def params(self) -> dict:
        return asdict(self)


def lora_target_pattern(tuned_layers: tuple[int, ...]) -> str:
    """The regex PEFT full-matches against module names: the linear modules of the tuned decoder layers only
    (not the vision tower's attention, not the LM head)."""
    layers = "|".join(str(i) for i in tuned_layers)
    return rf"model\.language_model\.layers\.({layers})\.{LORA_MODULES}"


def lora_config(settings: LoraSettings, tuned_layers: tuple[int, ...]):
    """The ``peft.LoraConfig`` of one LoRA row."""
    from peft import LoraConfig

    if settings.projector != "modules_to_save":
        raise ValueError(f"unknown projector mode {settings.projector!r}")
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_pattern(tuned_layers),
        modules_to_save=[PROJECTOR],
        bias="none",
    )


def rehearsal_plan(steps: int, share: float, seed: int) -> tuple[bool, ...]:
    """Which steps train on a rehearsal batch: exactly ``round(share * steps)`` (halves up) of them, at the
    positions a seeded permutation picks."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"rehearsal share must be in [0, 1], got {share}")
    k = math.floor(share * steps + 0.5)
    chosen = set(torch.randperm(steps, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return tuple(i in chosen for i in range(steps))


@dataclass
class RehearsalMix:
    """``mix`` for ``models.train_steps``: on a planned step, a batch of the same size drawn (with replacement,
    its own seeded generator) from the rehearsal examples; the drawn easy-VQA batch on every other step."""

    examples: list[Example]
    plan: tuple[bool, ...]
    seed: int
    _gen: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("rehearsal needs at least one example")
        self._gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, step: int, drawn: list[Example]) -> list[Example]:
        if not self.plan[step]:
            return drawn
        idx = torch.randint(len(self.examples), (len(drawn),), generator=self._gen).tolist()
        return [self.examples[i] for i in idx]


def _folder(built: BuiltModels, method: str, settings: Mapping) -> Path:
    blob = json.dumps({"v": RETRAIN_VERSION, "method": method, **settings}, sort_keys=True)
    return built.root / "retrain" / f"{method}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _build_lora(cfg: BuildConfig, settings: LoraSettings, pre_dir: Path, out: Path, device: str) -> None:
    from peft import get_peft_model

    t0 = time.perf_counter()
    model, processor = load_model(pre_dir, device)
    model.requires_grad_(False)
    tuned = cfg.tuned_layers(model.config.text_config.num_hidden_layers)
    torch.manual_seed(cfg.seed + 7)  # the LoRA A matrices' init
    peft_model = get_peft_model(model, lora_config(settings, tuned))
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    lora = [p for n, p in trainable if ".lora_" in n]
    projector = [p for n, p in trainable if ".lora_" not in n and PROJECTOR in n]
    if not lora or not projector or len(lora) + len(projector) != len(trainable):
        raise RuntimeError(f"{settings.method}: unexpected trainable parameters {[n for n, _ in trainable][:8]}")
    groups = [{"params": lora, "lr": settings.lr}, {"params": projector, "lr": settings.projector_lr}]
    pixels = PixelCache(processor.image_processor)
    examples = finetune_examples(cfg, assets.load_vqa("train"))
    args = (cfg.ft_steps, cfg.ft_batch, cfg, processor, pixels, device, f"fine-tune: easy-VQA, {settings.method}")
    loss = train_steps(peft_model.get_base_model(), groups, examples, *args, draw_seed=cfg.ft_draw_seed)
    counts = {"lora": sum(p.numel() for p in lora), "projector": sum(p.numel() for p in projector)}
    meta = {"build": asdict(cfg), "stage": settings.method, "lora": settings.params(), "tuned_layers": list(tuned)}
    meta |= {"trainable": counts, "ft_loss": loss, "seconds": time.perf_counter() - t0}
    save_folder(peft_model, processor, out, meta)


def lora_adapter(cfg: BuildConfig, settings: LoraSettings, built: BuiltModels, device: str) -> Path:
    """The LoRA row's adapter folder (PEFT ``save_pretrained``), trained once and cached."""
    out = _folder(built, settings.method, {**settings.params(), "modules": LORA_MODULES})
    if not (out / "adapter_config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _build_lora(cfg, settings, built.pretrained, out, device)
    return out


def merged_state(pretrained: Path, adapter: Path, device: str) -> dict[str, torch.Tensor]:
    """The pre-trained model with the adapter merged by PEFT (``merge_and_unload``), as a state dict."""
    from peft import PeftModel

    model, _ = load_model(pretrained, device)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def rehearsal_model(cfg: BuildConfig, share: float, built: BuiltModels, preserve: Path, device: str) -> Path:
    """The rehearsal row's fine-tuned model folder, trained once and cached (keyed by the preserve data too)."""
    sha = hashlib.sha256(preserve.read_bytes()).hexdigest()
    out = _folder(built, rehearsal_method(share), {"share": share, "preserve_sha256": sha})
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        plan = rehearsal_plan(cfg.ft_steps, share, cfg.seed + 6)
        mix = RehearsalMix(read_calibration(preserve), plan, cfg.seed + 8)
        info = {"share": share, "rehearsal_batches": sum(plan), "steps": len(plan), "preserve_sha256": sha}
        meta = {"stage": rehearsal_method(share), "rehearsal": info}
        build_finetune(cfg, built.pretrained, out, assets.load_vqa("train"), device, mix=mix, meta=meta)
    return out


@dataclass(frozen=True)
class Retrained:
    """A retraining row's model as a state dict, the seconds its build took, and what to record of it."""

    state: dict[str, torch.Tensor]
    seconds: float
    info: dict


def retrained(
    method: str, params: Mapping, cfg: BuildConfig, built: BuiltModels, preserve: Path | None, device: str
) -> Retrained:
    """Build (or reuse) and load the model of one ``lora_r*`` or ``rehearsal_*`` row."""
    if is_lora(method):
        folder = lora_adapter(cfg, LoraSettings(**params), built, device)
        state = merged_state(built.pretrained, folder, device)
    elif is_rehearsal(method):
        if preserve is None:
            raise ValueError("rehearsal row without the bench's preserve data")
        folder = rehearsal_model(cfg, float(params["share"]), built, preserve, device)
        model, _ = load_model(folder, device)
        state = {k: v.detach() for k, v in model.state_dict().items()}
    else:
        raise ValueError(f"{method!r} is not a retraining row")
    meta = json.loads((folder / "tailorbench.json").read_text())
    info = {"folder": str(folder), "ft_loss": meta.get("ft_loss")}
    info |= {k: meta[k] for k in ("trainable", "rehearsal") if k in meta}
    return Retrained(state, float(meta.get("seconds", 0.0)), info)


def second_method(task: SecondTask) -> str:
    """The multitask pair's anchor row of the second task's own fine-tune."""
    return f"finetuned_{task.name}"


def second_examples(cfg: BuildConfig, task: SecondTask) -> list[Example]:
    """The second task's fine-tuning draw: as many training problems as the easy-VQA draw has questions."""
    return addition_examples(sample(task.splits().train, cfg.ft_steps * cfg.ft_batch * 4, cfg.seed + 3))


def second_finetune(cfg: BuildConfig, task: SecondTask, built: BuiltModels, device: str) -> Path:
    """The second task's own fine-tune (``models.build_finetune`` on :func:`second_examples`), cached."""
    method = second_method(task)
    out = _folder(built, method, {"task": asdict(task)})
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"stage": method, "task": asdict(task)}
        examples = second_examples(cfg, task)
        build_finetune(
            cfg, built.pretrained, out, [], device, meta=meta, examples=examples, desc=f"fine-tune: {method}"
        )
    return out


def multitask_finetune(cfg: BuildConfig, task: SecondTask, built: BuiltModels, device: str) -> Path:
    """The reference: one fine-tune on both tasks' data, ``MULTITASK_SHARE`` of its steps on second-task batches
    (the rehearsal machinery: a seeded plan, the batch drawn by its own generator), cached."""
    share = MULTITASK_SHARE
    out = _folder(built, MULTITASK_FINETUNE, {"share": share, "task": asdict(task)})
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        plan = rehearsal_plan(cfg.ft_steps, share, cfg.seed + 9)
        mix = RehearsalMix(second_examples(cfg, task), plan, cfg.seed + 10)
        info = {"share": share, "second_task_batches": sum(plan), "steps": len(plan), "task": asdict(task)}
        meta = {"stage": MULTITASK_FINETUNE, "multitask": info}
        desc = f"fine-tune: easy-VQA + {task.name}"
        build_finetune(cfg, built.pretrained, out, assets.load_vqa("train"), device, mix=mix, meta=meta, desc=desc)
    return out


def folder_state(folder: Path, device: str) -> Retrained:
    """A cached fine-tune's model folder as a state dict, with its build seconds and what to record of it."""
    model, _ = load_model(folder, device)
    meta = json.loads((folder / "tailorbench.json").read_text())
    info = {"folder": str(folder), "ft_loss": meta.get("ft_loss")}
    info |= {k: meta[k] for k in ("multitask", "task") if k in meta}
    return Retrained({k: v.detach() for k, v in model.state_dict().items()}, float(meta.get("seconds", 0.0)), info)
