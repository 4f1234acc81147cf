"""Calibration JSONL -> seeded, rendered, tokenised batches (docs/METHOD.md §10, D15).

Records: ``{"text": ...}`` (used as is), ``{"prompt", "response", "image"?}`` or ``{"messages": [...],
"image"?}``.
Prompts and messages are rendered with the fine-tuned model's own chat template and processor (answers
included,
as in fine-tuning); without a template they are rendered plainly. Relative image paths resolve against the
JSONL's folder. Sampling is seeded; the exact lines used are returned for the log and the report.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_tailor.errors import CalibrationError

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationBatch",
    "CalibrationRecord",
    "CalibrationSet",
    "build_calibration",
    "open_image",
    "read_records",
    "render",
    "tokenizer_of",
]

# Processors that insert the image placeholder tokens themselves (no marker in the text).
SELF_INSERTING_PROCESSORS = ("Blip2Processor", "InstructBlipProcessor")


@dataclass(frozen=True)
class CalibrationRecord:
    """One JSONL record. ``line`` is 1-based. ``messages`` is a list of ``{"role", "content"}``."""

    line: int
    text: str | None = None
    messages: tuple[dict[str, str], ...] = ()
    image: Path | None = None


@dataclass
class CalibrationBatch:
    """Model inputs of a few sequences (right-padded) and the token mask (False = padding)."""

    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor
    lines: list[int]


@dataclass
class CalibrationSet:
    batches: list[CalibrationBatch]
    lines: list[int]
    available: int
    requested: int
    n_tokens: int
    warnings: list[str] = field(default_factory=list)


def _fail(path: Path, line: int, message: str) -> CalibrationError:
    return CalibrationError(f"{path}:{line}: {message}")


def read_records(path: str | os.PathLike[str], *, allow_outside_paths: bool = False) -> list[CalibrationRecord]:
    """Parse and validate every line (blank lines are skipped). Image paths must stay inside the file's
    folder (symlinks resolved) unless ``allow_outside_paths``: a shared JSONL cannot make the run read
    ``../../`` files.

    Raises:
        CalibrationError: unreadable or empty file, bad JSON, a record of unknown shape or an image outside
            the folder (with its line).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationError(f"calibration file {str(file)!r} cannot be read ({err})") from None
    records = []
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as err:
            raise _fail(file, i, f"not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise _fail(file, i, "each line must be a JSON object with 'text', 'prompt'/'response' or 'messages'")
        records.append(_record(file, i, obj, allow_outside_paths))
    if not records:
        raise CalibrationError(f"calibration file {str(file)!r} holds no records; add JSONL lines with 'text'")
    return records


def _record(file: Path, line: int, obj: dict[str, Any], allow_outside: bool = False) -> CalibrationRecord:
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise _fail(file, line, "'image' must be a path string")
    img = None if image is None else (Path(image) if Path(image).is_absolute() else file.parent / image)
    if img is not None and not allow_outside:
        folder = Path(os.path.realpath(file.parent))
        if folder not in Path(os.path.realpath(img)).parents:
            raise _fail(
                file,
                line,
                f"image {image!r} is outside the file's folder {str(folder)!r}; move it there or pass "
                "--allow-outside-paths",
            )
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise _fail(file, line, "'text' must be a non-empty string")
        return CalibrationRecord(line, text=obj["text"], image=img)
    if "messages" in obj:
        msgs = obj["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok:
            raise _fail(file, line, "'messages' must be a non-empty list of {'role': str, 'content': str}")
        return CalibrationRecord(
            line, messages=tuple({"role": m["role"], "content": m["content"]} for m in msgs), image=img
        )
    if "prompt" in obj:
        prompt, response = obj["prompt"], obj.get("response", "")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise _fail(file, line, "'prompt' and 'response' must be strings")
        msgs = [{"role": "user", "content": prompt}] + (
            [{"role": "assistant", "content": response}] if response else []
        )
        return CalibrationRecord(line, messages=tuple(msgs), image=img)
    raise _fail(file, line, f"unknown record keys {sorted(obj)}; expected 'text', 'prompt'/'response' or 'messages'")


def sample_records(records: list[CalibrationRecord], n: int, seed: int) -> list[CalibrationRecord]:
    """A seeded sample of ``n`` records in file order (all of them when fewer exist)."""
    if len(records) <= n:
        return list(records)
    picked = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in picked]


def load_processor(model_dir: str | os.PathLike[str]) -> Any:
    """The fine-tuned model's processor; tokenizer (+ image processor) when no processor can be built."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
        if hasattr(proc, "tokenizer") or hasattr(proc, "apply_chat_template"):
            return proc
    except Exception as err:  # noqa: BLE001 - transformers raises many types; fall back and say why
        logger.info("AutoProcessor unavailable for %s (%s); using tokenizer + image processor", model_dir, err)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001
        raise CalibrationError(f"{model_dir}: no tokenizer can be loaded ({err}); save it beside the weights") from None
    image_processor = None
    if (Path(model_dir) / "preprocessor_config.json").is_file():
        image_processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=False)
    return _TokenizerAndImages(tok, image_processor)


class _TokenizerAndImages:
    """Minimal processor: tokenizer + image processor, expanding one image placeholder per image into the
    number
    of tokens the image processor's grid implies (``image_grid_thw`` / ``merge_size**2``, Qwen2-VL style)."""

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or next(
            (t for t in ("<|image_pad|>", "<image>") if t in tokenizer.get_vocab()), None
        )

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def _expand(self, text: str, counts: Any) -> str:
        parts = text.split(self.image_token)
        return "".join(p + (self.image_token * next(counts) if k < len(parts) - 1 else "") for k, p in enumerate(parts))

    def __call__(
        self, text: list[str], images: list[Any] | None = None, return_tensors: str = "pt", **text_kwargs: Any
    ) -> dict:
        extra: dict[str, Any] = {}
        if images:
            if self.image_processor is None:
                raise CalibrationError("records have images but the model has no image processor")
            extra = dict(self.image_processor(images=images, return_tensors="pt"))
            grid = extra.get("image_grid_thw")
            if grid is not None and self.image_token:
                merge = getattr(self.image_processor, "merge_size", 1) ** 2
                counts = iter([int(g.prod()) // merge for g in grid])
                text = [self._expand(t, counts) for t in text]
        out = dict(self.tokenizer(text, return_tensors=return_tensors, **text_kwargs))  # padding, special tokens
        if "image_grid_thw" in extra and self.image_token:
            # Per-token modality ids (0 text, 1 image), as ProcessorMixin.create_mm_token_type_ids builds
            # them.
            image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            out["mm_token_type_ids"] = (out["input_ids"] == image_id).long()
        out.update(extra)
        return out


def tokenizer_of(proc: Any) -> Any:
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(proc, "tokenizer", proc)


def render(record: CalibrationRecord, proc: Any, *, add_generation_prompt: bool = False) -> str:
    """The record as one string: chat template when the model has one, plain ``role: content`` lines
    otherwise. ``add_generation_prompt`` ends it with the assistant's turn opening, for the model to answer
    (``preserve: self``); ``text`` records are never templated."""
    if record.text is not None:
        marker = _image_marker(proc) if record.image is not None else ""
        return record.text if not marker or marker in record.text else f"{marker}\n{record.text}"
    marker = _image_marker(proc) if record.image is not None else ""
    tok = tokenizer_of(proc)
    if proc is not tok and getattr(proc, "chat_template", None) and getattr(proc, "image_processor", None):
        # A multi-modal processor template: list content with an image entry in the first message.
        msgs: list[dict[str, Any]] = []
        for k, m in enumerate(record.messages):
            content: list[dict[str, Any]] = [{"type": "text", "text": m["content"]}]
            if record.image is not None and k == 0:
                content.insert(0, {"type": "image"})
            msgs.append({"role": m["role"], "content": content})
        return proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    if getattr(tok, "chat_template", None):
        msgs = [dict(m) for m in record.messages]
        if marker:
            msgs[0]["content"] = f"{marker}\n{msgs[0]['content']}"
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    body = "\n".join(f"{m['role']}: {m['content']}" for m in record.messages)
    body += "\nassistant:" if add_generation_prompt else ""
    return f"{marker}\n{body}" if marker else body


def _image_marker(proc: Any) -> str:
    if type(proc).__name__ in SELF_INSERTING_PROCESSORS:
        return ""
    return getattr(proc, "image_token", None) or ""


def open_image(path: Path) -> Any:
    """The image as RGB; an unreadable file is a one-line :class:`CalibrationError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise CalibrationError(f"image {str(path)!r} cannot be read ({err}); fix the path or the file") from None


def _requires_pixels(model_cls: type | None) -> bool:
    """True when the model's forward has a required ``pixel_values`` argument (BLIP-2 / InstructBLIP)."""
    if model_cls is None:
        return False
    p = inspect.signature(model_cls.forward).parameters.get("pixel_values")
    return p is not None and p.default is inspect.Parameter.empty


def _encode(record: CalibrationRecord, proc: Any, max_tokens: int) -> dict[str, torch.Tensor]:
    text = render(record, proc)
    if record.image is not None:
        out = dict(proc(text=[text], images=[open_image(record.image)], return_tensors="pt"))
    elif callable(proc) and proc is not tokenizer_of(proc):
        out = dict(proc(text=[text], return_tensors="pt"))
    else:
        out = dict(proc([text], return_tensors="pt"))
    out = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    length = out["input_ids"].shape[1]
    if length > max_tokens:
        image_id = _image_token_id(proc)
        cut = out["input_ids"][:, :max_tokens]
        if image_id is None or int((cut == image_id).sum()) == int((out["input_ids"] == image_id).sum()):
            for k in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
                if k in out and out[k].shape[1] == length:
                    out[k] = out[k][:, :max_tokens]
        else:
            logger.warning(
                "line %d: %d tokens > max_tokens %d, kept whole (the cut would split an image)",
                record.line,
                length,
                max_tokens,
            )
    return out


def _image_token_id(proc: Any) -> int | None:
    token = getattr(proc, "image_token", None)
    if not token:
        return None
    tid = tokenizer_of(proc).convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) else None


def _collate(samples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        parts = [s[key] for s in samples]
        if parts[0].ndim == 2 and parts[0].shape[0] == 1 and not key.startswith("pixel") and "grid" not in key:
            width = max(p.shape[1] for p in parts)
            fill = pad_id if key.endswith("input_ids") else 0
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out


def build_calibration(
    path: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    samples: int,
    max_tokens: int,
    batch_size: int,
    seed: int,
    model_cls: type | None = None,
    allow_outside_paths: bool = False,
) -> CalibrationSet:
    """Read, sample, render and batch the calibration data (batches group records with and without images)."""
    records = read_records(path, allow_outside_paths=allow_outside_paths)
    warnings: list[str] = []
    if _requires_pixels(model_cls):
        dropped = [r.line for r in records if r.image is None]
        records = [r for r in records if r.image is not None]
        if dropped:
            warnings.append(
                f"{len(dropped)} text-only record(s) skipped: this model needs an image per sample (lines {dropped})"
            )
        if not records:
            raise CalibrationError(f"{path}: this model needs an image in every calibration record; none has one")
    chosen = sample_records(records, samples, seed)
    if len(records) < samples:
        warnings.append(f"only {len(records)} calibration record(s) available, {samples} requested: using all")
    proc = load_processor(model_dir)
    with_image = [r.line for r in chosen if r.image is not None]
    if with_image and getattr(proc, "image_processor", None) is None:
        warnings.append(
            f"{len(with_image)} record(s) have an image but this model reads text only: the images are ignored "
            f"(lines {with_image})"
        )
        chosen = [dataclasses.replace(r, image=None) for r in chosen]
    for w in warnings:
        logger.warning("%s", w)
    for r in chosen:
        if r.image is not None and not r.image.is_file():
            raise CalibrationError(f"{path}:{r.line}: image {str(r.image)!r} not found")
    tok = tokenizer_of(proc)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    encoded = [(r, _encode(r, proc, max_tokens)) for r in chosen]
    batches: list[CalibrationBatch] = []
    for has_image in (False, True):
        group = [(r, e) for r, e in encoded if (r.image is not None) == has_image]
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            inputs = _collate([e for _, e in chunk], pad_id)
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
            batches.append(CalibrationBatch(inputs, mask, [r.line for r, _ in chunk]))
    lines = [r.line for r in chosen]
    logger.info("calibration: %d record(s) from %s, lines %s", len(lines), path, lines)
    n_tokens = int(sum(int(b.token_mask.sum()) for b in batches))
    return CalibrationSet(batches, lines, len(records), samples, n_tokens, warnings)
