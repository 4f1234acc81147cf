"""``--preserve self-generic`` (and half of ``self``): the base model answers shipped generic instructions; the
conversations become preserve data. :class:`Generator` (the base model, loaded on first use) is shared with
:mod:`~model_tailor.calibration.selfcalib`, the other half of ``self``.

When a user has no original-task data, the base model's own behaviour on generic prompts is the best available
proxy for "what it knew" (in the pilot of docs/METHOD.md §14, preserving base outputs on such data recovered
most of the forgetting).
The instructions ship with the package (``data/self_preserve_instructions.jsonl``, written for model-tailor and
free of the bench's test topics); generation is greedy, bounded, seeded and cached, and every generated
conversation is returned so the caller can log and record it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from model_tailor.errors import ConfigError
from model_tailor.io.atomic import atomic_write_text
from model_tailor.io.safety import refuse_remote_code

logger = logging.getLogger(__name__)

INSTRUCTIONS_FILE = "self_preserve_instructions.jsonl"
_FINGERPRINT_SPAN = 1 << 20  # bytes hashed at each end of every weight file for the cache key
# Prompts answered per generate() call, by both kinds of self data: 32 answers the 64 shipped instructions in 19.7 s
# where 8 took 36.6 s, the same answers (SmolLM2-135M, 2-core CPU, 2026-12-08).
GENERATION_BATCH = 32


@dataclass(frozen=True)
class SelfPreserveSpec:
    """What to generate. Every field takes part in the cache key."""

    samples: int = 64
    seed: int = 0
    max_new_tokens: int = 48
    batch_size: int = GENERATION_BATCH


def load_instructions() -> list[str]:
    """The shipped generic instructions, in file order."""
    text = resources.files("model_tailor.data").joinpath(INSTRUCTIONS_FILE).read_text(encoding="utf-8")
    return [json.loads(line)["instruction"] for line in text.splitlines() if line.strip()]


def sample_instructions(samples: int, seed: int) -> list[str]:
    """A seeded sample without replacement; all of them (with a warning) when more are asked than ship."""
    if samples <= 0:
        raise ConfigError(f"preserve samples must be positive, got {samples}")
    instructions = load_instructions()
    if samples > len(instructions):
        logger.warning(
            "asked for %d self-preserve samples; %d instructions ship, using all", samples, len(instructions)
        )
        samples = len(instructions)
    order = torch.randperm(len(instructions), generator=torch.Generator().manual_seed(seed))
    return [instructions[i] for i in order[:samples].tolist()]


def model_cache_key(model_dir: str | os.PathLike[str], spec: SelfPreserveSpec) -> str:
    """Cheap content key of a model folder: config, file sizes and the first/last MiB of every weight file."""
    digest = hashlib.sha256(json.dumps(spec.__dict__, sort_keys=True).encode())
    digest.update(hashlib.sha256("\n".join(load_instructions()).encode()).digest())
    hash_model_files(digest, model_dir)
    return digest.hexdigest()[:20]


def hash_model_files(digest: Any, model_dir: str | os.PathLike[str]) -> None:
    """Feed the model folder's file names, sizes and first/last MiB of each file to ``digest``."""
    for path in sorted(Path(model_dir).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        digest.update(path.name.encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(_FINGERPRINT_SPAN))
            if size > 2 * _FINGERPRINT_SPAN:
                handle.seek(-_FINGERPRINT_SPAN, os.SEEK_END)
                digest.update(handle.read(_FINGERPRINT_SPAN))


def render_prompt(tokenizer: Any, processor: Any, instruction: str) -> str:
    """The prompt exactly as the model's own chat template renders a user turn (plain text without one)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if processor is not None and getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "text", "text": instruction}]}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"User: {instruction}\nAssistant:"


def generation_dtype(model_dir: str | os.PathLike[str], device: str) -> torch.dtype:
    """The dtype the base model generates in: the one its config says it is stored in (``dtype`` or the older
    ``torch_dtype``), so a bf16 7B model takes 14 GB, not the 28 GB of an fp32 copy; float16 runs in float32 on a
    CPU (half-precision CPU kernels are slow or missing); anything else, or no entry, float32."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16" and device.startswith("cuda"):
        return torch.float16
    return torch.float32


def _load(model_dir: Path, device: str) -> tuple[Any, Any, Any]:
    import transformers

    refuse_remote_code(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    processor = None
    if hasattr(config, "vision_config"):
        try:
            processor = transformers.AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
        except (OSError, ValueError, TypeError):
            processor = None
        model_cls = transformers.AutoModelForImageTextToText
    else:
        model_cls = transformers.AutoModelForCausalLM
    try:  # safetensors only: a folder with pickled weights beside them never falls back to unpickling them
        dtype = generation_dtype(model_dir, device)
        model = model_cls.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(
            f"--preserve self cannot load {str(model_dir)!r} for text generation from safetensors weights "
            f"({reason}); pass --preserve FILE"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues each prompt from its last real token
    return model.to(device).eval(), tokenizer, processor


@dataclass
class Generator:
    """The BASE model as a greedy answerer, loaded on first use: a run whose self data is all cached never loads
    it. ``loads`` counts the loads (0 or 1), so a caller can tell a cached run from a generating one."""

    model_dir: Path
    device: str = "cpu"
    loads: int = 0
    _parts: tuple[Any, Any, Any] | None = field(default=None, repr=False)

    def parts(self) -> tuple[Any, Any, Any]:
        """``(model, tokenizer, processor)``; the tokenizer pads on the left, the processor may be None."""
        if self._parts is None:
            self._parts = _load(Path(self.model_dir), self.device)
            self.loads += 1
        return self._parts

    @torch.no_grad()
    def greedy(self, enc: dict[str, torch.Tensor], max_new_tokens: int) -> list[str]:
        """Greedy answers to a left-padded batch of encoded prompts (the new tokens only, stripped)."""
        model, tokenizer, _ = self.parts()
        enc = {k: v.to(self.device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return [a.strip() for a in answers]


def cache_path(
    model_dir: str | os.PathLike[str], spec: SelfPreserveSpec, cache_dir: str | os.PathLike[str] | None
) -> Path | None:
    """Where :func:`generate_self_preserve` caches ``spec``'s records for this model (None: no cache)."""
    return None if cache_dir is None else Path(cache_dir) / f"self-preserve-{model_cache_key(model_dir, spec)}.jsonl"


def read_cache(cache_file: Path | None) -> list[dict[str, Any]] | None:
    """The cached records, or None when there is no cache (or no cache file yet)."""
    if cache_file is None or not cache_file.is_file():
        return None
    logger.info("reusing self-generated preserve data %s", cache_file)
    return [json.loads(line) for line in cache_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_cache(cache_file: Path | None, records: list[dict[str, Any]]) -> None:
    if cache_file is not None:
        atomic_write_text(cache_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@torch.no_grad()
def generate_self_preserve(
    model_dir: str | os.PathLike[str],
    spec: SelfPreserveSpec = SelfPreserveSpec(),
    *,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    generator: Generator | None = None,
) -> list[dict[str, Any]]:
    """Let the base model answer sampled instructions; return ``messages`` records (cached per model and spec).

    Args:
        model_dir: the BASE model folder (its answers define the behaviour to preserve).
        spec: sample count, seed, answer length bound and batch size.
        device: where generation runs.
        cache_dir: folder for ``self-preserve-<key>.jsonl``; no caching when None.
        generator: the base model to reuse (loaded on first use); a new one on ``model_dir`` when None.

    Returns:
        Records ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``, one per instruction, in
        the sampled order.
    """
    model_dir = Path(model_dir)
    cache_file = cache_path(model_dir, spec, cache_dir)
    cached = read_cache(cache_file)
    if cached is not None:
        return cached
    instructions = sample_instructions(spec.samples, spec.seed)
    gen = generator if generator is not None else Generator(model_dir, device)
    _, tokenizer, processor = gen.parts()
    torch.manual_seed(spec.seed)
    records: list[dict[str, Any]] = []
    for start in range(0, len(instructions), spec.batch_size):
        batch = instructions[start : start + spec.batch_size]
        prompts = [render_prompt(tokenizer, processor, text) for text in batch]
        enc = dict(tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False))
        for instruction, answer in zip(batch, gen.greedy(enc, spec.max_new_tokens), strict=True):
            logger.info("self-preserve: %r -> %r", instruction, answer)
            records.append(
                {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]}
            )
    write_cache(cache_file, records)
    return records
