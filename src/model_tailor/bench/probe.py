"""TailorBench's drift probe: how far a row has moved from the pre-trained model, on a wide pool of prompts.

Retention is accuracy on two original tasks of a few hundred items each: a 0/1 outcome per item, so its
interval stays near +-0.05 however good the method. The probe measures the same question, "does the model still
behave as it did?", continuously and on many more items (issue 12):

* the prompts: :data:`EvalConfig.n_probe <model_tailor.bench.tasks.EvalConfig>` generic instructions drawn
  (seeded) from :func:`instructions`, templated here, none of them an instruction ``--preserve self`` ships
  (those are training data for the self-preserve rows), none about the test tasks' topics (no country or
  capital, no colour or shape, no arithmetic);
* the references: the pre-trained model's own greedy answers, as token ids up to its first end-of-turn token or
  ``probe_tokens`` (``tasks.greedy_tokens``), generated once per build and evaluation config and cached under
  the build's folder (``probe/<key>.json``);
* each row's item score: the teacher-forced mean per-token log-probability of those exact tokens
  (``bench.likelihood``);
* drift(m) = mean over items of ``l_i(pretrained) - l_i(m)``, nats per token (``bench.stats``): exactly 0 for
  ``pretrained``, positive when the row finds the base's answers less likely. Lower is better; it is reported
  beside retention, not folded into H.

Why the base's greedy answers: each is the base's own most likely continuation token by token, so any change of
the weights that alters how the model answers generic prompts lowers their likelihood, while a change that only
adds the new skill leaves them alone. This is the drift a user fears, measured where the base is good.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from model_tailor.bench.data import Example, PixelCache, sample
from model_tailor.bench.tasks import PROBE_TASKS, EvalConfig, Task, greedy_tokens
from model_tailor.io.atomic import atomic_write_text

NAME = PROBE_TASKS[0]
VERSION = 1  # part of the cache key of the base's answers
SEED_OFFSET = 5  # the probe's draw: EvalConfig.seed + 5 (capitals, captions, VQA and addition use + 0 .. 3)

TEMPLATES = (
    "Describe {s} in two sentences.",
    "Write the opening line of a story set in {s}.",
    "What might a visitor notice first about {s}?",
    "Write a short poem about {s}.",
    "Explain to a child what happens in {s}.",
    "Give one piece of advice for someone going to {s} for the first time.",
    "What sounds would you hear in {s}?",
    "Write a friendly message inviting a friend to {s}.",
    "Why do people enjoy {s}?",
    "Write a one-sentence advertisement for {s}.",
)
SUBJECTS = (
    "a library",
    "a train station",
    "a bakery",
    "a busy kitchen",
    "a chess club",
    "a mountain cabin",
    "a fishing village",
    "a science museum",
    "a rainy afternoon in the city",
    "a school sports day",
    "a night market",
    "a small bookshop",
    "a music festival",
    "an old lighthouse",
    "a vegetable garden",
    "a dentist's waiting room",
    "a hospital ward at night",
    "a football match",
    "a snowy forest",
    "a summer campsite",
    "a pottery class",
    "a quiet beach at dawn",
    "a busy airport",
    "a farm in spring",
    "a theatre rehearsal",
    "a bicycle repair shop",
    "a birthday party",
    "a cooking competition",
    "an art gallery",
    "a public swimming pool",
)


def instructions() -> list[str]:
    """Every probe instruction, in a fixed order: each template with each subject, minus any instruction that
    ``--preserve self`` ships (none today; the filter keeps it so if either list changes)."""
    from model_tailor.calibration.selfgen import load_instructions

    shipped = set(load_instructions())
    return [p for p in (t.format(s=s) for t in TEMPLATES for s in SUBJECTS) if p not in shipped]


def probe_instructions(cfg: EvalConfig) -> list[str]:
    """The run's ``cfg.n_probe`` instructions: a seeded draw from :func:`instructions` (all when more are asked)."""
    pool = instructions()
    return sample(pool, min(cfg.n_probe, len(pool)), cfg.seed + SEED_OFFSET)


def _key(prompts: list[str], cfg: EvalConfig, device: str) -> str:
    blob = {"v": VERSION, "prompts": prompts, "tokens": cfg.probe_tokens, "batch": cfg.batch_size, "device": device}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def drift_task(model, processor, cfg: EvalConfig, root: Path, image_tokens: int, device: str) -> Task:
    """The probe task with the pre-trained ``model``'s greedy answers as references (generated here once, then
    read from ``root/probe/<key>.json``; ``model`` must hold the pre-trained weights)."""
    if cfg.probe_tokens < 1:
        raise ValueError(f"probe_tokens must be at least 1, got {cfg.probe_tokens}")
    prompts = probe_instructions(cfg)
    path = root / "probe" / f"{_key(prompts, cfg, device)}.json"
    if path.exists():
        tokens = json.loads(path.read_text())["tokens"]
    else:
        examples = [Example(p) for p in prompts]
        with torch.no_grad():
            tokens = greedy_tokens(
                model,
                processor,
                examples,
                PixelCache(processor.image_processor),
                max_new_tokens=cfg.probe_tokens,
                batch_size=cfg.batch_size,
                image_tokens=image_tokens,
                desc="drift probe: pre-trained answers",
            )
        answers = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"prompts": prompts, "tokens": tokens, "answers": answers}))
    answers = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    examples = [Example(p, None, a) for p, a in zip(prompts, answers, strict=True)]
    return Task(NAME, examples, cfg.probe_tokens, None, references=tokens)
