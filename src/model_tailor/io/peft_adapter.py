"""Read a PEFT LoRA adapter folder as the fine-tuned checkpoint, on top of its base, without importing peft.

``AdapterReader`` answers the :class:`~model_tailor.io.checkpoint.CheckpointReader` questions (names, shapes,
dtypes, ``get``) for the model ``base + adapter``: a LoRA target's fine-tuned weight is computed when asked,
``W_base + scale * B @ A`` in fp32 (transposed for ``fan_in_fan_out`` / Conv1D and for embeddings), so no
merged model ever exists in memory or on disk. Tensors the adapter stores whole (``modules_to_save``, trained
biases) are read from the adapter; everything else is the base. Options that change the merged weight in a way
not handled here (DoRA, aLoRA, PiSSA-style inits, ...) are refused by name rather than read wrongly.

File format (peft ``utils/save_and_load.py``): ``adapter_config.json`` and ``adapter_model.safetensors`` whose
keys are ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` / ``_B`` for
embeddings) and ``base_model.model.<module>.<param>`` for whole tensors, with module paths of the transformers
model; they are mapped to checkpoint names through the base's meta skeleton (LLaVA's ``model.language_model.*``
is stored as ``language_model.model.*``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_tailor.errors import CheckpointError, ShapeMismatchError
from model_tailor.io.checkpoint import CheckpointReader

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterReader",
    "LoraFactor",
    "ModuleMap",
    "is_adapter",
    "module_map",
    "open_finetuned",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Options whose non-default value changes what the adapter adds to the base: refused, never approximated.
_UNSUPPORTED = (
    "use_dora", "use_qalora", "use_bdlora", "lora_bias", "alora_invocation_tokens", "arrow_config",
    "layer_replication", "trainable_token_indices", "target_parameters", "velora_config", "monteclora_config",
    "kasa_config",
)  # fmt: skip
_PLAIN_INITS = (True, False, "gaussian", "eva")  # inits that leave the base weights untouched
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


def glob_escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """A folder holding ``adapter_config.json`` is read as a PEFT adapter."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def open_finetuned(path: str | os.PathLike[str], base: CheckpointReader) -> CheckpointReader | AdapterReader:
    """The fine-tuned side of a run: a checkpoint, or a PEFT adapter applied on ``base``."""
    return AdapterReader(path, base) if is_adapter(path) else CheckpointReader(path)


@dataclass(frozen=True)
class ModuleMap:
    """The base model's module tree as plain names, read from its meta skeleton (no weights loaded)."""

    to_ckpt: dict[str, str]  # parameter name in the transformers model -> checkpoint tensor name
    linear: dict[str, bool]  # path of every Linear / Conv1D module -> True for Conv1D (stored (in, out))
    owners: dict[str, list[str]]  # checkpoint name -> every parameter holding it (several when tied)


def module_map(base: CheckpointReader) -> ModuleMap:
    """Map the base's module paths (what PEFT keys use) to its checkpoint names (LLaVA's are legacy)."""
    from model_tailor.pipeline.architectures import build_skeleton, checkpoint_names, is_conv1d

    model = build_skeleton(str(base.config_dir))
    if hasattr(model, "tie_weights"):  # the skeleton comes untied; tied aliases must share one object
        model.tie_weights()
    named = list(model.named_parameters(remove_duplicate=False))
    to_ckpt = checkpoint_names(model, [n for n, _ in named], set(base.names()))
    by_id: dict[int, list[str]] = {}
    for name, p in named:  # tied weights are one object with one checkpoint entry
        by_id.setdefault(id(p), []).append(name)
    owners: dict[str, list[str]] = {}
    for names in by_id.values():
        ck = next((to_ckpt[n] for n in names if n in to_ckpt), None)
        if ck is not None:
            owners.setdefault(ck, []).extend(names)
    linear = {
        path: is_conv1d(sub)
        for path, sub in model.named_modules()
        if isinstance(sub, torch.nn.Linear) or is_conv1d(sub)
    }
    return ModuleMap(to_ckpt, linear, owners)


@dataclass(frozen=True)
class LoraFactor:
    """One LoRA target: adapter keys of its factors, rank, scale, and the layout of ``B @ A``."""

    module: str  # module path in the transformers model
    key_a: str
    key_b: str
    rank: int
    scale: float
    transpose: bool  # fan_in_fan_out (Conv1D) or embedding: the stored weight is (B @ A)^T


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first key matching the end of the module path (as a regex) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, checked for a LoRA type and for options this reader cannot reproduce."""
    file = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); re-save the adapter with save_pretrained") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: must hold a JSON object (a PEFT adapter config)")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"{file}: PEFT type {cfg.get('peft_type')!r} is not supported as --finetuned; only LORA adapters "
            "are read (merge others with peft's merge_and_unload and pass the merged folder)"
        )
    bad = [k for k in _UNSUPPORTED if cfg.get(k) not in (None, False, [], {}, 0)]
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        bad.append(f"init_lora_weights={init!r}")
    if bad:
        raise CheckpointError(
            f"{file}: unsupported LoRA option(s) {', '.join(bad)}: the merged weight would not be "
            "W_base + scale * B @ A; merge with peft's merge_and_unload and pass the merged folder"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise CheckpointError(f"{file}: {key} must be a positive number, got {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise CheckpointError(f"{file}: {key} must be an object of module pattern: value")
    return cfg


class AdapterReader:
    """The checkpoint ``base + LoRA adapter``, read lazily; the ``CheckpointReader`` interface.

    Args:
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: reader of the base checkpoint the adapter was trained on.

    Raises:
        CheckpointError: corrupt or unsupported config, missing weights, adapter names that match nothing in
            the base (all listed); ``ShapeMismatchError`` for factors of another shape than the base weight.
    """

    def __init__(self, path: str | os.PathLike[str], base: CheckpointReader) -> None:
        self.path = Path(path)
        self.base = base
        self.config_dir = base.config_dir  # the base's config, tokenizer and processor
        self.adapter_config = read_adapter_config(self.path)
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = " (found adapter_model.bin: re-save with safe_serialization=True)" if (
                self.path / "adapter_model.bin").is_file() else ""  # fmt: skip
            raise CheckpointError(f"{self.path}: {ADAPTER_WEIGHTS} is missing{pickled}")
        self.weights = CheckpointReader(weights)
        self.modules = module_map(base)
        self.factors: dict[str, LoraFactor] = {}  # checkpoint name -> factor
        self.saved: dict[str, str] = {}  # checkpoint name -> adapter key (tensors stored whole)
        self._read_keys()

    # -- key mapping --------------------------------------------------------------------------------------
    def _ckpt(self, param: str) -> str | None:
        return self.modules.to_ckpt.get(param)

    def _read_keys(self) -> None:
        cfg = self.adapter_config
        unmatched: list[str] = []
        pairs: dict[str, dict[str, str]] = {}
        for key in self.weights.names():
            rel = key.removeprefix(PREFIX)
            m = _FACTOR_RE.match(rel)
            if m:
                pairs.setdefault(m["module"], {})[m["kind"].removeprefix("lora_").removeprefix("embedding_")] = key
                pairs[m["module"]]["embedding"] = "yes" if "embedding" in m["kind"] else ""
                continue
            name = self._ckpt(rel)
            if name is None:
                unmatched.append(key)
            else:
                self.saved[name] = key
        for module, keys in sorted(pairs.items()):
            name = self._ckpt(f"{module}.weight")
            if name is None or "A" not in keys or "B" not in keys:
                unmatched.extend(k for k in (keys.get("A"), keys.get("B")) if k)
                continue
            rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            # peft forces fan_in_fan_out on for Conv1D and off for Linear, whatever the config says
            transpose = bool(keys["embedding"]) or self.modules.linear.get(module, False)
            self.factors[name] = LoraFactor(module, keys["A"], keys["B"], rank, scale, transpose)
        if unmatched:
            raise CheckpointError(
                f"{self.path}: adapter tensors match nothing in base {str(self.base.path)!r}: "
                f"{', '.join(sorted(unmatched))}; the adapter was trained on another base model"
            )
        self._check_shapes()

    def _check_shapes(self) -> None:
        bad: list[str] = []
        for name, f in sorted(self.factors.items()):
            a, b = self.weights.shape(f.key_a), self.weights.shape(f.key_b)
            if len(a) != 2 or len(b) != 2 or a[0] != f.rank or b[1] != f.rank:
                bad.append(f"{f.module} (lora_A {list(a)}, lora_B {list(b)}, configured rank {f.rank})")
                continue
            product = (a[1], b[0]) if f.transpose else (b[0], a[1])
            if product != tuple(self.base.shape(name)):
                bad.append(f"{name} (B @ A {list(product)} vs base {list(self.base.shape(name))})")
        bad += [
            f"{name} (adapter {list(self.weights.shape(k))} vs base {list(self.base.shape(name))})"
            for name, k in sorted(self.saved.items())
            if tuple(self.weights.shape(k)) != tuple(self.base.shape(name))
        ]
        if bad:
            raise ShapeMismatchError(
                f"{self.path}: adapter does not fit base {str(self.base.path)!r}: {', '.join(bad)}; "
                "the adapter was trained on another base model"
            )

    # -- the CheckpointReader interface -------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self.factors:  # computed in fp32: rounding to a bf16 base would eat small deltas
            return torch.promote_types(self.base.dtype(name), torch.float32)
        return self.weights.dtype(self.saved[name]) if name in self.saved else self.base.dtype(name)

    def numel(self, name: str) -> int:
        return self.base.numel(name)

    def delta(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` of a LoRA target in checkpoint layout, fp32."""
        f = self.factors[name]
        a = self.weights.get(f.key_a).to(torch.float32)
        b = self.weights.get(f.key_b).to(torch.float32)
        product = b @ a
        return (product.T if f.transpose else product) * f.scale

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if name in self.saved:
            tensor = self.weights.get(self.saved[name])
        elif name in self.factors:
            base = self.base.get(name)
            tensor = base.to(self.dtype(name)) + self.delta(name)
        else:
            tensor = self.base.get(name)
        return tensor.to(device) if str(device) != "cpu" else tensor

    def iter_tensors(self, names: Any = None) -> Any:
        for name in self.names() if names is None else names:
            yield name, self.get(name)

    def config(self) -> dict[str, Any]:
        return self.base.config()

    def extra_files(self) -> list[Path]:
        return self.base.extra_files()

    def target_names(self) -> list[str]:
        """Checkpoint names of the LoRA targets (the adapter's ``target_modules`` that hold factors)."""
        return sorted(self.factors)

    def restrict_include(self, include: tuple[str, ...]) -> tuple[str, ...]:
        """Target patterns for the run: the adapter's targets decide, ``include`` (if any) narrows them.

        Never empty: an empty ``include`` means "default targets" to ``select_targets``; ``""`` matches nothing.
        """
        from fnmatch import fnmatchcase

        names = [n for n in self.target_names() if not include or any(fnmatchcase(n, p) for p in include)]
        return tuple(glob_escape(n) for n in names) or ("",)

    def label_plan(self, plan: Any) -> Any:
        """The plan with the adapter's whole tensors (``modules_to_save``, biases) named as such."""
        from dataclasses import replace

        non_targets = tuple(
            replace(nt, reason=f"stored whole in the adapter (modules_to_save); {nt.reason}")
            if nt.name in self.saved
            else nt
            for nt in plan.non_targets
        )
        return replace(plan, non_targets=non_targets)

    def close(self) -> None:
        self.weights.close()
        self.base.close()

    def __enter__(self) -> AdapterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
