"""TailorBench evaluation: greedy decoding on fixed test subsets, scored with a documented normalisation.

Original abilities (what fine-tuning should not destroy): ``capital_qa`` (world knowledge, text only) and
``captioning`` (easy-VQA test images). Target: ``easy_vqa`` test accuracy; the multitask pair (``bench.multitask``)
adds a second target, ``addition`` (:class:`SecondTask`). ``bench.stats`` defines the ratios;
``bench.evaluation`` scores a model (greedy accuracy here, answer likelihood in ``bench.likelihood``).

Normalisation (``normalize``): Unicode NFKD, accents dropped, lower case, every run of non-alphanumeric
characters replaced by one space, trimmed. Scoring:

* ``capital_qa``: hit when the normalised capital occurs in the normalised answer as whole words.
* ``captioning``: hit when the set of easy-VQA colour words in the answer is exactly {true colour} and the
  set of shape words is exactly {true shape} (listing several colours does not score).
* ``easy_vqa``: hit when the normalised answer equals the single-word ground truth.
* ``addition``: hit when the normalised answer equals the sum's digits ("936." scores, "The answer is 936" does
  not: answering with the number only is part of the skill, as the single word is part of easy-VQA's).
"""

from __future__ import annotations

import inspect
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from model_tailor.bench import assets
from model_tailor.bench.data import (
    AdditionSplits,
    Example,
    PixelCache,
    addition_examples,
    addition_splits,
    answer_ids,
    capital_examples,
    caption_examples,
    collate_generate,
    prompt_ids,
    sample,
    shared_prefix,
    vqa_examples,
)

ORIGINAL_TASKS = ("capital_qa", "captioning")
TARGET_TASKS = ("easy_vqa",)
PROBE_TASKS = ("drift",)  # scored by likelihood alone, outside retention and the target ratio (bench.probe)
# Countries held out of every capital test subset: the bench's "user-style" preserve data asks about them
# (docs/METHOD.md §14). A fixed split, independent of the eval seed, so quick and full runs test the same pool.
PRESERVE_COUNTRIES = 32
PRESERVE_SPLIT_SEED = 4321


def split_capitals() -> tuple[list[assets.Capital], list[assets.Capital]]:
    """``(test pool, preserve pool)``: every capital test subset samples the first, preserve data the second."""
    shuffled = sample(assets.load_capitals(), None, PRESERVE_SPLIT_SEED)
    preserve = sorted(shuffled[:PRESERVE_COUNTRIES], key=lambda c: c.country)
    return sorted(shuffled[PRESERVE_COUNTRIES:], key=lambda c: c.country), preserve


def normalize(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()
    return " ".join("".join(ch if ch.isalnum() else " " for ch in plain).split())


def capital_hit(answer: str, capital: str) -> bool:
    return f" {normalize(capital)} " in f" {normalize(answer)} "


def caption_hit(answer: str, truth: str) -> bool:
    """``truth`` is the templated caption ("A blue rectangle."); colour and shape must both be right."""
    words = set(normalize(answer).split())
    want = set(normalize(truth).split())
    colors, shapes = set(assets.COLORS), set(assets.SHAPES)
    return (words & colors) == (want & colors) and (words & shapes) == (want & shapes)


def vqa_hit(answer: str, truth: str) -> bool:
    return normalize(answer) == normalize(truth)


def addition_hit(answer: str, truth: str) -> bool:
    """Exact normalised match: the answer is the number and nothing else (trailing punctuation aside)."""
    return normalize(answer) == normalize(truth)


@dataclass(frozen=True)
class EvalConfig:
    """Sizes of the fixed test subsets (None = all) and decoding lengths; the seed fixes the subsets.

    Full variant: every test capital outside the preserve hold-out (215), every easy-VQA test image whose
    colour and shape are both known (791 captions), 1,000 of the 9,673 VQA test questions, and 256 drift-probe
    instructions whose pre-trained answers run to at most ``probe_tokens`` tokens (``bench.probe``)."""

    n_capitals: int | None = None
    n_captions: int | None = None
    n_vqa: int = 1000
    batch_size: int = 64
    capital_tokens: int = 16
    caption_tokens: int = 10
    vqa_tokens: int = 4
    n_probe: int = 256
    probe_tokens: int = 32
    seed: int = 1234

    @classmethod
    def quick(cls) -> EvalConfig:
        return cls(n_capitals=64, n_captions=48, n_vqa=96, n_probe=64)  # sized for a cold `make demo` within 15 min

    @classmethod
    def tiny(cls) -> EvalConfig:
        return cls(
            n_capitals=4,
            n_captions=4,
            n_vqa=4,
            batch_size=4,
            capital_tokens=3,
            caption_tokens=3,
            vqa_tokens=2,
            n_probe=4,
            probe_tokens=3,
        )


@dataclass(frozen=True)
class Task:
    """A test task. With ``references`` (token ids per example, the drift probe's pre-trained answers) it is a
    probe: only those exact tokens' likelihood is scored, nothing is decoded and nothing counts as a hit."""

    name: str
    examples: list[Example]
    max_new_tokens: int
    hit: Callable[[str, str], bool] | None
    references: list[list[int]] | None = None

    @property
    def probe(self) -> bool:
        return self.references is not None


def build_tasks(cfg: EvalConfig) -> list[Task]:
    """The three tasks on their fixed subsets; test split only (calibration and training use train), capitals
    from the test pool of :func:`split_capitals` (the held-out countries feed the preserve data)."""
    test_items = assets.load_vqa("test")
    caps = capital_examples(sample(split_capitals()[0], cfg.n_capitals, cfg.seed))
    captions = caption_examples(sample(assets.image_labels(test_items), cfg.n_captions, cfg.seed + 1))
    vqa = vqa_examples(sample(test_items, cfg.n_vqa, cfg.seed + 2))
    return [
        Task("capital_qa", caps, cfg.capital_tokens, capital_hit),
        Task("captioning", captions, cfg.caption_tokens, caption_hit),
        Task("easy_vqa", vqa, cfg.vqa_tokens, vqa_hit),
    ]


@dataclass(frozen=True)
class SecondTask:
    """The multitask pair's second target task: two-digit addition asked in text ("What is 47 + 38? Answer with
    the number only." -> "85"), distinct from easy-VQA (no image, a skill the fine-tune must compute, not read).

    Why it should fit the bench (a real run checks it: the base's target ratio below 0.3, the fine-tune's
    retention below 0.6): SmolLM2-135M, frozen inside the pre-trained mini-LLaVA, answers such prompts with prose
    or a wrong sum, so the base scores near nothing under exact match; SmolLM2 splits digits into single tokens (a
    sum is three answer tokens at most), which makes the sum learnable position by position; and the capital
    questions share the prompt's "What is ..." opening, so a fine-tune of the same layers that rewrites how the
    model answers it should cost the original tasks, as the easy-VQA one does. Two digits, not three: the
    fine-tune sees ft_steps x ft_batch problems (640 by default). Every field is part of the multitask pair's
    cache keys; the split is fixed, independent of the eval seed, like the preserve hold-out.
    """

    name: str = "addition"
    digits: int = 2
    n_test: int = 1000  # the test pool; a run evaluates EvalConfig.n_vqa of them (all in the full variant)
    n_calibration: int = 256  # the calibration pool; tailoring reads BuildConfig.calibration_samples of them
    split_seed: int = 2468
    max_new_tokens: int = 5  # a sum of two two-digit numbers is at most 3 digits, then the end-of-turn token
    version: int = 1

    def splits(self) -> AdditionSplits:
        return addition_splits(self.digits, self.n_test, self.n_calibration, self.split_seed)

    def task(self, cfg: EvalConfig) -> Task:
        """The test task: as many problems of the test pool as the run has VQA questions (a fixed, seeded subset,
        so quick and full sizes follow the eval config without a new EvalConfig field)."""
        problems = sample(self.splits().test, cfg.n_vqa, cfg.seed + 3)
        return Task(self.name, addition_examples(problems), self.max_new_tokens, addition_hit)


SECOND_TASK = SecondTask()


@torch.no_grad()
def generate(
    model,
    processor,
    examples: Sequence[Example],
    pixels: PixelCache,
    *,
    max_new_tokens: int,
    batch_size: int,
    image_tokens: int,
    desc: str,
) -> list[str]:
    """Greedy answers; special tokens stripped.

    Same tokens as ``model.generate(do_sample=False)`` on left-padded prompts, computed with less work: the
    prompt prefix every example shares (the chat template's system line, 24-29 of 38-64 tokens here) runs
    once per batch at batch size 1 and its KV cache is repeated across the batch; decoding stops when every
    row has emitted EOS. On 2 CPU cores this makes a full TailorBench evaluation ~1.6x faster.
    """
    common = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "image_tokens": image_tokens}
    return generate_and_score(model, processor, examples, pixels, desc=desc, score=False, **common)[0]


@torch.no_grad()
def generate_and_score(
    model,
    processor,
    examples: Sequence[Example],
    pixels: PixelCache,
    *,
    max_new_tokens: int,
    batch_size: int,
    image_tokens: int,
    desc: str,
    score: bool = True,
) -> tuple[list[str], list[float]]:
    """:func:`generate`'s greedy answers and each reference answer's mean per-token log-probability (the score of
    ``bench.likelihood.answer_logprobs``) from ONE prompt forward per batch: the reference tokens are
    teacher-forced on the prompt's KV cache, which is then cut back to the prompt for decoding. The prompt (and
    its image) is most of an item's cost, so this saves the second prompt pass a separate likelihood pass makes.
    ``score=False``: the answers alone (the scores list is empty)."""
    common = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "image_tokens": image_tokens}
    answers: list[str] = []
    logprobs: list[float] = []
    for tokens, lp in _decode(model, processor, examples, pixels, desc=desc, score=score, **common):
        answers.extend(processor.tokenizer.batch_decode(tokens, skip_special_tokens=True))
        logprobs.extend(lp)
    return answers, logprobs


@torch.no_grad()
def greedy_tokens(
    model,
    processor,
    examples: Sequence[Example],
    pixels: PixelCache,
    *,
    max_new_tokens: int,
    batch_size: int,
    image_tokens: int,
    desc: str,
) -> list[list[int]]:
    """:func:`generate`'s greedy answers as token ids, each up to and including its first EOS (all
    ``max_new_tokens`` when it emits none): exactly the tokens a likelihood probe of them must score."""
    eos = processor.tokenizer.eos_token_id
    common = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "image_tokens": image_tokens}
    out: list[list[int]] = []
    for tokens, _ in _decode(model, processor, examples, pixels, desc=desc, score=False, **common):
        for row in tokens.tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def _decode(
    model,
    processor,
    examples: Sequence[Example],
    pixels: PixelCache,
    *,
    max_new_tokens: int,
    batch_size: int,
    image_tokens: int,
    desc: str,
    score: bool,
) -> Iterator[tuple[torch.Tensor, list[float]]]:
    """Per batch, the greedy tokens ``(batch, <= max_new_tokens)`` and (``score``) the reference answers' scores."""
    tok = processor.tokenizer
    device = next(model.parameters()).device
    rows = prompt_ids(tok, examples, image_tokens)
    references = answer_ids(tok, examples) if score else None
    prefix = shared_prefix(rows, getattr(model.config, "image_token_id", None))
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
        batch = examples[start : start + batch_size]
        inputs = {
            k: v.to(device)
            for k, v in collate_generate(rows[start : start + len(batch)], prefix, tok.pad_token_id).items()
        }
        if batch[0].image is not None:
            inputs["pixel_values"] = pixels.get([ex.image for ex in batch]).to(device)
        refs = None if references is None else references[start : start + len(batch)]
        yield _greedy(model, inputs, rows[0][:prefix], max_new_tokens, tok.eos_token_id, tok.pad_token_id, refs)


def cache_name(model) -> str:
    """Name of the KV cache in ``model``'s forward and outputs: transformers 5.24 renamed ``past_key_values`` to
    ``cache`` and removes the old name in 5.40; the pinned range ``<6`` spans both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefix_cache(model, prefix: list[int], batch: int, device: torch.device) -> object | None:
    """KV cache of the shared ``prefix`` run once at batch size 1 and repeated ``batch`` times (None: no prefix)."""
    if not prefix:
        return None
    cache = getattr(model(input_ids=torch.tensor([prefix], device=device), use_cache=True), cache_name(model))
    cache.batch_repeat_interleave(batch)
    return cache


def _greedy(
    model,
    inputs: dict[str, torch.Tensor],
    prefix: list[int],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    references: Sequence[list[int]] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Greedy tokens ``(batch, <= max_new_tokens)`` after the shared ``prefix`` and the batch's suffixes;
    rows that have emitted EOS continue with padding. With ``references`` (token ids per row), also each
    reference's mean per-token log-probability given the prompt (:func:`_reference_logprobs`)."""
    ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    batch = ids.shape[0]
    key = cache_name(model)
    cache = prefix_cache(model, prefix, batch, ids.device)
    extra = {"pixel_values": inputs["pixel_values"]} if "pixel_values" in inputs else {}
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{key: cache},
        **extra,
    )
    position = positions[:, -1:]
    scores = [] if references is None else _reference_logprobs(model, out, mask, position, references, pad_id)
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    tokens = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1).masked_fill(done, pad_id)
        tokens.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        position = position + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            logits_to_keep=1,
            **{key: getattr(out, key)},
        )
    return (torch.stack(tokens, dim=1) if tokens else torch.empty(batch, 0, dtype=torch.long)), scores


def _reference_logprobs(
    model, out, mask: torch.Tensor, position: torch.Tensor, references: Sequence[list[int]], pad_id: int
) -> list[float]:
    """Mean per-token log-probability of each row's reference tokens, teacher-forced after the prompt whose
    forward gave ``out`` (its last logits predict the first reference token; its KV cache holds the prompt).
    References are right-padded (padding masked out, after every real token, so causal attention never reads it);
    the cache is cropped back to the prompt afterwards, so decoding continues from exactly the prompt's state."""
    key = cache_name(model)
    width = max(map(len, references))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in references], device=mask.device)
    real = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in references], device=mask.device)
    cache = getattr(out, key)
    step = model(
        input_ids=ids,
        attention_mask=torch.cat([mask, real], dim=1),
        position_ids=position + 1 + torch.arange(width, device=mask.device)[None, :],
        use_cache=True,
        **{key: cache},
    )
    cache.crop(-width)  # a negative count removes that many tokens (the same in every transformers the pin allows)
    logits = torch.cat([out.logits[:, -1:], step.logits[:, :-1]], dim=1).float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None])[..., 0]
    return ((token_lp * real).sum(1) / real.sum(1)).tolist()
