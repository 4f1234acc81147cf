"""``--preserve self``, calibration half: the base model's own greedy answers to the calibration INPUTS.

Generic text instructions (:mod:`~model_tailor.calibration.selfgen`) anchor text abilities only: on a multi-modal
fine-tune they cannot hold what the model did with images (docs/METHOD.md §14). So each sampled calibration record
also contributes what the BASE model does with the same inputs:

- a record with an image (for a base that reads images): the base's answers to ``image_prompts`` generic prompts
  about that image, a seeded choice of :data:`~model_tailor.options.IMAGE_PROMPTS` per record; never the record's
  own prompt, which is the target task;
- a prompt/messages record: the base's answer to the conversation up to its first assistant turn (the fine-tuned
  response is dropped);
- a text record: the base's continuation of the text's first half (the second half is fine-tuned data).

The queries are planned without the model (:func:`plan_queries`; the bench checks them against its test items
before any run), answered greedily in batches and cached per base model, calibration content and spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_tailor.calibration.data import (
    CalibrationRecord,
    load_processor,
    open_image,
    read_records,
    render,
    sample_records,
    tokenizer_of,
)
from model_tailor.calibration.selfgen import GENERATION_BATCH, Generator, hash_model_files, read_cache, write_cache
from model_tailor.errors import CalibrationError
from model_tailor.options import IMAGE_PROMPTS

logger = logging.getLogger(__name__)

__all__ = ["CalibrationSelfData", "CalibrationSelfSpec", "SelfQuery", "generate_from_calibration", "plan_queries"]

FROM_IMAGE, FROM_TEXT = "calibration-image", "calibration-text"


@dataclass(frozen=True)
class CalibrationSelfSpec:
    """What to generate from the calibration inputs. Every field takes part in the cache key."""

    records: int = 32  # calibration records drawn (seeded, as calibration sampling draws)
    image_prompts: int = 2  # generic prompts per image record
    seed: int = 0
    max_new_tokens: int = 48
    batch_size: int = GENERATION_BATCH


@dataclass(frozen=True)
class SelfQuery:
    """One input the base model answers: a conversation (``messages``, with ``image`` for image prompts) or the
    beginning of a text record to continue (``text``). ``line`` is the calibration record's line."""

    source: str  # FROM_IMAGE | FROM_TEXT
    line: int
    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None
    image: Path | None = None

    def key(self) -> dict[str, Any]:
        """The query as JSON (cache key, logs, the bench's leak check)."""
        image = None if self.image is None else str(self.image)
        fields = {"source": self.source, "line": self.line, "messages": list(self.messages), "text": self.text}
        return {**fields, "image": image}

    def record(self, answer: str) -> dict[str, Any]:
        """The preserve record: the query answered by the base (calibration record form), with its provenance."""
        origin = {"from": self.source, "line": self.line}
        if self.text is not None:
            return {"text": f"{self.text} {answer}" if answer else self.text, "self": origin}
        rec: dict[str, Any] = {"messages": [*self.messages, {"role": "assistant", "content": answer}]}
        if self.image is not None:
            rec["image"] = str(self.image)
        return {**rec, "self": origin}


@dataclass
class CalibrationSelfData:
    """The generated records (one per query, in query order), the queries, and what was left out."""

    records: list[dict[str, Any]]
    queries: list[SelfQuery]
    skipped: list[str]
    cached: bool


def _first_turn(messages: tuple[dict[str, str], ...]) -> tuple[dict[str, str], ...]:
    """The conversation before its first assistant turn; empty when it holds no user message."""
    head: list[dict[str, str]] = []
    for m in messages:
        if m["role"] == "assistant":
            break
        head.append(m)
    return tuple(head) if any(m["role"] == "user" for m in head) else ()


def plan_queries(
    records: list[CalibrationRecord], spec: CalibrationSelfSpec, *, reads_images: bool
) -> tuple[list[SelfQuery], list[str]]:
    """The queries of a seeded sample of ``spec.records`` records, and why any record gave none.

    Pure and deterministic: the same records, spec and ``reads_images`` give the same queries. A base that reads
    text only gets an image record's own conversation instead (its calibration input is that text).
    """
    if spec.image_prompts > len(IMAGE_PROMPTS):
        raise CalibrationError(f"image_prompts is {spec.image_prompts}; {len(IMAGE_PROMPTS)} generic prompts exist")
    queries: list[SelfQuery] = []
    skipped: list[str] = []
    for r in sample_records(records, spec.records, spec.seed):
        if r.image is not None and reads_images:
            prompts = random.Random(f"{spec.seed}:{r.line}").sample(IMAGE_PROMPTS, spec.image_prompts)
            queries += [
                SelfQuery(FROM_IMAGE, r.line, ({"role": "user", "content": p},), image=r.image) for p in prompts
            ]
        elif r.text is not None:
            words = r.text.split()
            queries.append(SelfQuery(FROM_TEXT, r.line, text=" ".join(words[: max(1, len(words) // 2)])))
        elif head := _first_turn(r.messages):
            queries.append(SelfQuery(FROM_TEXT, r.line, head))
        else:
            skipped.append(f"line {r.line}: no user turn before the first assistant turn")
    return queries, skipped


def cache_key(model_dir: str | os.PathLike[str], queries: list[SelfQuery], spec: CalibrationSelfSpec) -> str:
    """Content key: spec, queries (with the bytes of every image) and the base model folder."""
    payload = {"spec": dataclasses.asdict(spec), "queries": [q.key() for q in queries]}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for path in sorted({q.image for q in queries if q.image is not None}):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    hash_model_files(digest, model_dir)
    return digest.hexdigest()[:20]


def _kind(q: SelfQuery) -> str:
    return "image" if q.image is not None else ("continue" if q.text is not None else "chat")


def _encode(batch: list[SelfQuery], proc: Any) -> dict[str, torch.Tensor]:
    """One left-padded batch of one kind, rendered as the calibration renders its records (with the assistant's
    turn opened); a chat template brings its own special tokens."""
    tok = tokenizer_of(proc)
    if batch[0].text is not None:
        enc = tok([q.text for q in batch], return_tensors="pt", padding=True)
    else:
        templated = bool(getattr(proc, "chat_template", None) or getattr(tok, "chat_template", None))
        recs = [CalibrationRecord(q.line, messages=q.messages, image=q.image) for q in batch]
        texts = [render(r, proc, add_generation_prompt=True) for r in recs]
        kwargs = {"return_tensors": "pt", "padding": True, "add_special_tokens": not templated}
        if batch[0].image is not None:
            enc = proc(text=texts, images=[open_image(q.image) for q in batch], **kwargs)  # type: ignore[arg-type]
        else:
            enc = tok(texts, **kwargs)
    return {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}


def _answer(queries: list[SelfQuery], proc: Any, gen: Generator, spec: CalibrationSelfSpec) -> list[str]:
    """Greedy answers in query order; batches hold one kind of query (image, chat or continuation)."""
    answers: list[str | None] = [None] * len(queries)
    for kind in ("image", "chat", "continue"):
        idx = [i for i, q in enumerate(queries) if _kind(q) == kind]
        for start in range(0, len(idx), spec.batch_size):
            chunk = idx[start : start + spec.batch_size]
            outs = gen.greedy(_encode([queries[i] for i in chunk], proc), spec.max_new_tokens)
            for i, out in zip(chunk, outs, strict=True):
                answers[i] = out
                logger.info("self-preserve (line %d): %r -> %r", queries[i].line, queries[i].key(), out)
    return [a or "" for a in answers]


def generate_from_calibration(
    model_dir: str | os.PathLike[str],
    calibration: str | os.PathLike[str],
    spec: CalibrationSelfSpec = CalibrationSelfSpec(),
    *,
    generator: Generator | None = None,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    allow_outside_paths: bool = False,
) -> CalibrationSelfData:
    """Let the BASE model (``model_dir``) answer the planned queries of ``calibration``; cached in
    ``cache_dir/self-preserve-calib-<key>.jsonl`` (no caching when None).

    Raises:
        CalibrationError: the calibration file is unreadable or malformed, or an image is missing.
    """
    records = read_records(calibration, allow_outside_paths=allow_outside_paths)
    proc = load_processor(model_dir)  # the base's own processor renders and encodes its prompts
    queries, skipped = plan_queries(records, spec, reads_images=getattr(proc, "image_processor", None) is not None)
    for q in queries:
        if q.image is not None and not q.image.is_file():
            raise CalibrationError(f"{calibration}:{q.line}: image {str(q.image)!r} not found")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"self-preserve-calib-{cache_key(model_dir, queries, spec)}.jsonl"
    cached = read_cache(cache_file)
    if cached is not None:
        return CalibrationSelfData(cached, queries, skipped, cached=True)
    tok = tokenizer_of(proc)
    tok.padding_side = "left"  # generation continues each prompt from its last real token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gen = generator if generator is not None else Generator(Path(model_dir), device)
    out = [q.record(a) for q, a in zip(queries, _answer(queries, proc, gen, spec), strict=True)]
    write_cache(cache_file, out)
    return CalibrationSelfData(out, queries, skipped, cached=False)
