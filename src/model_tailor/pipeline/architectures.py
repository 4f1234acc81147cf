"""Where the repeated blocks of a Hugging Face model live, found by structure, plus a weight-less skeleton.

Blocks are discovered, never hard-coded: every outermost ``nn.ModuleList`` whose children are all the same
class and hold parameters is a block list (``model.layers``, ``qformer.encoder.layer``, ``visual.blocks``...).
Its *role* (vision / qformer / language) comes from a small table of path words, which also fixes the forward
order of the lists (vision tower, then Q-Former, then language model). Default targets are the language and
Q-Former blocks (docs/METHOD.md, D18, D23).

The skeleton holds parameters on the ``meta`` device (buffers, such as rotary ``inv_freq``, stay real), so a
model of any size costs nothing until the pipeline materialises one module at a time. Names of the skeleton
and of the checkpoint can differ (transformers 5 renames legacy layouts on load); :func:`checkpoint_names`
maps one to the other with transformers' own conversion table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from model_tailor.errors import CheckpointError
from model_tailor.io.safety import refuse_remote_code

logger = logging.getLogger(__name__)

__all__ = [
    "BlockList",
    "ModelLayout",
    "build_skeleton",
    "checkpoint_names",
    "discover_layout",
    "empty_parameters",
    "is_conv1d",
    "linear_modules",
    "mixed_layer_types",
]

# Path words -> role; first match wins. Order of ROLE_ORDER is the forward order of a multi-modal model.
ROLE_WORDS: tuple[tuple[str, str], ...] = (
    ("qformer", "qformer"),
    ("vision", "vision"),
    ("visual", "vision"),
    ("image_encoder", "vision"),
    ("audio", "audio"),
)
ROLE_ORDER = {"vision": 0, "audio": 0, "qformer": 1, "language": 2}
TARGET_ROLES = ("qformer", "language")


@dataclass(frozen=True)
class BlockList:
    """One ``nn.ModuleList`` of repeated blocks.

    Attributes:
        path: module path in the skeleton, e.g. ``model.language_model.layers``.
        role: ``vision`` | ``audio`` | ``qformer`` | ``language``.
        length: number of blocks.
        block_class: class name of the blocks.
    """

    path: str
    role: str
    length: int
    block_class: str

    def block_path(self, index: int) -> str:
        return f"{self.path}.{index}"


@dataclass(frozen=True)
class ModelLayout:
    """Block lists of a model in forward order."""

    architecture: str
    model_type: str
    block_lists: tuple[BlockList, ...]

    def locate(self, module_name: str) -> tuple[BlockList, int] | None:
        """``(block list, index)`` of the block that contains ``module_name`` (a skeleton name), else None."""
        for bl in self.block_lists:
            prefix = bl.path + "."
            if module_name.startswith(prefix):
                head = module_name[len(prefix) :].split(".", 1)[0]
                if head.isdigit():
                    return bl, int(head)
        return None


def role_of(path: str) -> str:
    low = path.lower()
    for word, role in ROLE_WORDS:
        if word in low:
            return role
    return "language"


def discover_layout(model: nn.Module) -> ModelLayout:
    """Find the block lists of ``model`` by structure (works on a meta skeleton).

    Raises:
        CheckpointError: no repeated blocks found.
    """
    found: list[BlockList] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(bl.path + ".") for bl in found):
            continue  # nested list (experts, sub-layers) inside a block: the outer list is the block list
        classes = {type(child) for child in module}
        if len(classes) != 1 or not any(True for _ in module[0].parameters()):
            continue
        if not any(isinstance(m, nn.Linear) or is_conv1d(m) for m in module[0].modules()):
            continue
        found.append(BlockList(path, role_of(path), len(module), type(module[0]).__name__))
    if not found:
        raise CheckpointError(
            f"{type(model).__name__}: no repeated blocks (nn.ModuleList of identical layers) found; "
            "this architecture cannot be tailored layer by layer"
        )
    ordered = sorted(enumerate(found), key=lambda t: (ROLE_ORDER.get(t[1].role, 2), t[0]))
    cfg = getattr(model, "config", None)
    return ModelLayout(
        architecture=type(model).__name__,
        model_type=str(getattr(cfg, "model_type", "")),
        block_lists=tuple(bl for _, bl in ordered),
    )


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a linear layer whose weight is stored ``(in, out)`` (transposed)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / ``Conv1D`` under ``module`` with a 2-D weight."""
    for name, sub in module.named_modules(prefix=prefix):
        if (isinstance(sub, nn.Linear) or is_conv1d(sub)) and getattr(sub, "weight", None) is not None:
            if sub.weight.ndim == 2:
                yield name, sub


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Create parameters on ``meta`` while buffers stay real (accelerate's
    ``init_empty_weights(include_buffers=False)``).

    Non-persistent buffers (rotary ``inv_freq``) are not in checkpoints, so they must be computed at
    construction.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None:
            kwargs = dict(param.__dict__)
            kwargs["requires_grad"] = False
            meta = param.to(torch.device("meta"))
            self._parameters[name] = type(param)(meta, **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(config_dir: str) -> nn.Module:
    """Instantiate the model class named in ``config.json`` with meta parameters, in eval mode."""
    import transformers
    from transformers import AutoConfig

    refuse_remote_code(config_dir)
    try:
        config = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{config_dir}: config.json cannot be read as a transformers config ({reason})") from None
    archs = getattr(config, "architectures", None) or [None]
    arch = archs[0] if isinstance(archs, list | tuple) else archs
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"{config_dir}: config.json names architecture {arch!r}, which is not a transformers model class; "
            "fix 'architectures' (e.g. LlamaForCausalLM)"
        )
    if cls is None:
        cls = transformers.AutoModelForCausalLM
        logger.warning("%s: architecture %r unknown to transformers; using AutoModelForCausalLM", config_dir, arch)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    with empty_parameters(), no_init_weights():  # random init would be thrown away: skip it
        model = (
            cls._from_config(config)
            if hasattr(cls, "_from_config")
            else cls.from_config(config, trust_remote_code=False)
        )
    model.eval()
    model.requires_grad_(False)
    return model


def mixed_layer_types(config: object, block_list: BlockList) -> list[str]:
    """The attention types of ``block_list``'s blocks when its config gives them several (``layer_types`` of
    the model's config or a sub-config, one entry per block: Gemma 3, Qwen2 with sliding windows), else ``[]``.

    Such blocks take different attention masks from the model's forward; a replay that reuses one block's
    arguments for the next (docs/METHOD.md §9) would calibrate them on the wrong mask."""
    configs = [config, *(getattr(config, a, None) for a in ("text_config", "vision_config", "qformer_config"))]
    for c in configs:
        types = getattr(c, "layer_types", None)
        if isinstance(types, list | tuple) and len(types) == block_list.length:
            return sorted({str(t) for t in types}) if len(set(types)) > 1 else []
    return []


def checkpoint_names(model: nn.Module, names: list[str], available: set[str]) -> dict[str, str]:
    """Map skeleton parameter names to checkpoint tensor names (transformers 5 renames legacy layouts).

    Names whose renamed form is not in ``available`` keep their own name if that is available; otherwise
    they are
    left out (tied weights absent from the file, handled by the caller).
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - older transformers: names are the same
        revert_weight_conversion = None
    mapping: dict[str, str] = {}
    for name in names:
        candidate = name
        if revert_weight_conversion is not None and name not in available:
            out = list(revert_weight_conversion(model, {name: torch.empty(0, device="meta")}))
            candidate = out[0] if len(out) == 1 else name
        if candidate in available:
            mapping[name] = candidate
    return mapping
