"""TailorBench prompts and batches: one rendering for training, calibration and evaluation.

All prompts go through the language model's own chat template (SmolLM2 adds its default system line), with
the image as LLaVA's ``<image>`` placeholder expanded to one token per image feature, exactly what
``LlavaProcessor`` does. Sharing one renderer keeps stage 1, fine-tuning and evaluation consistent
(docs/METHOD.md, D22: one fixed caption instruction; VQA with the LLaVA-1.5 single-word suffix).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from model_tailor.bench.assets import Capital, ImageLabel, VQAItem
from model_tailor.io.atomic import atomic_write_text

IMAGE_TOKEN = "<image>"
CAPTION_INSTRUCTION = "Describe the image in a few words."
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
CAPITAL_QUESTION = "What is the capital of {country}?"


def caption_of(label: ImageLabel) -> str:
    """The templated caption stage 1 teaches: ``"A blue rectangle."``."""
    return f"A {label.color} {label.shape}."


def user_text(question: str, has_image: bool) -> str:
    return f"{IMAGE_TOKEN}\n{question}" if has_image else question


def render_prompt(tokenizer: object, question: str, *, has_image: bool, image_tokens: int) -> str:
    """Chat-template prompt ending with the assistant header; the image placeholder is pre-expanded."""
    messages = [{"role": "user", "content": user_text(question, has_image)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens) if has_image else text


@dataclass(frozen=True)
class Example:
    """One prompt (with or without an image) and, for training, its response."""

    prompt: str
    image: Path | None = None
    response: str | None = None


def caption_examples(labels: Sequence[ImageLabel]) -> list[Example]:
    return [Example(CAPTION_INSTRUCTION, lab.image, caption_of(lab)) for lab in labels]


def vqa_examples(items: Sequence[VQAItem]) -> list[Example]:
    return [Example(it.question + VQA_SUFFIX, it.image, it.answer) for it in items]


def capital_examples(capitals: Sequence[Capital]) -> list[Example]:
    return [Example(CAPITAL_QUESTION.format(country=c.country), None, c.capital) for c in capitals]


def sample(items: Sequence, n: int | None, seed: int) -> list:
    """A fixed, seeded subset (all items, shuffled, when ``n`` is None or too large)."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    return [items[i] for i in idx[: len(idx) if n is None else n]]


def load_pixels(image_processor: object, paths: Sequence[Path]) -> torch.Tensor:
    """``(n, 3, H, W)`` float pixel values through the saved CLIP image processor."""
    images = [Image.open(p).convert("RGB") for p in paths]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


class PixelCache:
    """Pixel values per image path, computed once per run (images are tiny; processing them is not free)."""

    def __init__(self, image_processor: object) -> None:
        self.image_processor = image_processor
        self._cache: dict[Path, torch.Tensor] = {}

    def get(self, paths: Sequence[Path]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(paths) if p not in self._cache]
        if todo:
            for p, px in zip(todo, load_pixels(self.image_processor, todo), strict=True):
                self._cache[p] = px
        return torch.stack([self._cache[p] for p in paths])


def _ids(tokenizer: object, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def collate_train(
    tokenizer: object, batch: Sequence[Example], pixels: PixelCache, image_tokens: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels cover only the response and its end-of-turn token (-100 elsewhere). Pixels
    only for the examples with an image, in batch order (LLaVA fills the image tokens in that order), so a
    batch may mix text-only and image records (rehearsal of the preserve data, ``bench.retrain``)."""
    rows, labels = [], []
    for ex in batch:
        prompt = _ids(
            tokenizer, render_prompt(tokenizer, ex.prompt, has_image=ex.image is not None, image_tokens=image_tokens)
        )
        (answer,) = answer_ids(tokenizer, [ex])
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    out = {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }
    if any(ex.image is not None for ex in batch):
        out["pixel_values"] = pixels.get([ex.image for ex in batch if ex.image is not None])
    return out


def answer_ids(tokenizer: object, examples: Sequence[Example]) -> list[list[int]]:
    """Token ids of each example's reference answer and end-of-turn token: what :func:`collate_train` labels,
    and what the likelihood score (``bench.likelihood``) reads."""
    return [_ids(tokenizer, f"{ex.response}{tokenizer.eos_token}") for ex in examples]


def prompt_ids(tokenizer: object, examples: Sequence[Example], image_tokens: int) -> list[list[int]]:
    """Token ids of each example's rendered generation prompt (chat template, assistant header last)."""
    return [
        _ids(tokenizer, render_prompt(tokenizer, ex.prompt, has_image=ex.image is not None, image_tokens=image_tokens))
        for ex in examples
    ]


def shared_prefix(rows: Sequence[Sequence[int]], stop_token: int | None = None) -> int:
    """Length of the token prefix every row shares, stopping before ``stop_token`` (the image placeholder,
    whose features must be merged in the same forward as the pixels) and leaving every row one token."""
    if not rows:
        return 0
    first, limit = rows[0], min(map(len, rows)) - 1
    n = 0
    while n < limit and first[n] != stop_token and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def collate_generate(rows: Sequence[Sequence[int]], prefix: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A generation batch whose first ``prefix`` tokens are shared (computed once, outside this batch).

    ``input_ids`` holds each row's suffix after the prefix, left-padded to one width; ``attention_mask``
    spans prefix + padded suffix (0 on the padding, which thus sits between prefix and suffix) and
    ``position_ids`` numbers the real tokens contiguously, so every row sees exactly its unpadded prompt.
    """
    suffixes = [list(r[prefix:]) for r in rows]
    width = max(map(len, suffixes))
    mask = torch.tensor([[1] * prefix + [0] * (width - len(s)) + [1] * len(s) for s in suffixes])
    return {
        "input_ids": torch.tensor([[pad_id] * (width - len(s)) + s for s in suffixes]),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix:],
    }


def write_calibration(items: Sequence[VQAItem], out_dir: Path) -> Path:
    """Calibration JSONL for ``model_tailor.api.tailor``: prompt/response/image, PNGs copied beside it.

    Records: ``{"prompt": question + VQA suffix, "response": answer, "image": "images/<id>.png"}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    lines = []
    for it in items:
        rel = f"images/{it.image_id}.png"
        if not (out_dir / rel).exists():
            shutil.copyfile(it.image, out_dir / rel)
        lines.append(json.dumps({"prompt": it.question + VQA_SUFFIX, "response": it.answer, "image": rel}))
    path = out_dir / "calibration.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_preserve(capitals: Sequence[Capital], labels: Sequence[ImageLabel], out_dir: Path) -> Path:
    """ "User-style" preserve JSONL for preserve-aware tailoring (docs/METHOD.md §14): original-ability records only.

    Capital questions (the eval's exact question, answered with the true capital) for held-out countries and
    templated captions (stage 1's instruction and caption) of easy-VQA TRAIN images; the caller passes
    items disjoint from every test set and checks it (``runner.check_preserve_disjoint``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    lines = [
        json.dumps({"prompt": CAPITAL_QUESTION.format(country=c.country), "response": c.capital}) for c in capitals
    ]
    for lab in labels:
        rel = f"images/train-{lab.image_id}.png"
        if not (out_dir / rel).exists():
            shutil.copyfile(lab.image, out_dir / rel)
        lines.append(json.dumps({"prompt": CAPTION_INSTRUCTION, "response": caption_of(lab), "image": rel}))
    path = out_dir / "preserve.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# --- the second target task (the multitask pair, ``bench.multitask``): two-digit addition, text only ---------

ADDITION_QUESTION = "What is {a} + {b}? Answer with the number only."


@dataclass(frozen=True)
class Addition:
    """One addition problem as asked (``a + b``, in this order); its answer is the decimal sum."""

    a: int
    b: int

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def key(self) -> tuple[int, int]:
        """The problem whatever the order it is asked in (``12 + 34`` and ``34 + 12`` are one fact)."""
        return (min(self.a, self.b), max(self.a, self.b))


@dataclass(frozen=True)
class AdditionSplits:
    """Disjoint problem pools: ``train`` (fine-tunes), ``calibration`` (tailoring data) and ``test`` (evaluation)."""

    train: tuple[Addition, ...]
    calibration: tuple[Addition, ...]
    test: tuple[Addition, ...]


def addition_problems(digits: int, seed: int) -> list[Addition]:
    """Every unordered pair of ``digits``-digit operands once (``a <= b``; 4,095 for two digits), in a seeded
    order, each asked in a seeded operand order: splitting this list splits the facts, not just the prompts."""
    if digits < 1:
        raise ValueError(f"addition needs at least one digit, got {digits}")
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(a, hi + 1)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    return [Addition(a, b) if rng.random() < 0.5 else Addition(b, a) for a, b in pairs]


def addition_splits(digits: int, n_test: int, n_calibration: int, seed: int) -> AdditionSplits:
    """The first ``n_test`` problems of :func:`addition_problems` are the test pool, the next ``n_calibration``
    the calibration pool, the rest the training pool: disjoint by construction (``leaks.check_addition_disjoint``
    proves it on what the run uses)."""
    problems = addition_problems(digits, seed)
    if n_test + n_calibration >= len(problems):
        raise ValueError(f"{len(problems)} problems cannot hold {n_test} test and {n_calibration} calibration ones")
    cut = n_test + n_calibration
    return AdditionSplits(tuple(problems[cut:]), tuple(problems[n_test:cut]), tuple(problems[:n_test]))


def addition_examples(problems: Sequence[Addition]) -> list[Example]:
    return [Example(ADDITION_QUESTION.format(a=p.a, b=p.b), None, p.answer) for p in problems]


def write_text_calibration(examples: Sequence[Example], out_dir: Path) -> Path:
    """Text-only calibration JSONL (``{"prompt", "response"}`` per record) for ``model_tailor.api.tailor``."""
    if any(ex.image is not None for ex in examples):
        raise ValueError("write_text_calibration writes text-only records; an example has an image")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": ex.prompt, "response": ex.response}) for ex in examples]
    path = out_dir / "calibration.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
