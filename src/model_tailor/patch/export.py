"""Export a patch as a PEFT adapter folder that stock ``peft.PeftModel.from_pretrained(base, DIR)`` loads.

What stock PEFT (0.17-0.21) can hold, and how each part of a patch is written:

* Linear / Conv1D weight deltas become adapter factors. With ``peft_type="lora"`` a tensor's delta
  ``scatter(values) + A @ B`` is written as ``B_l @ A_l`` with ``scale = alpha / r = 1``: the low-rank factors
  as they are, the sparse part as exact row (or column) selection factors, rank = its number of non-zero rows
  (or columns), so a sparse part costs up to ``min(rows, cols)`` rank. ``"shira"`` writes pure-sparse patches
  as SHiRA (``shira_indices`` + ``shira_weight``), the exact indices and values; ShiraConfig has one ``r`` for
  every target and loads ``r * (rows + cols)`` entries per module, so each module is padded with zero-valued
  entries at unused positions (adding 0 is exact). SHiRA cannot hold low-rank factors or Conv1D modules.
  ``"auto"`` picks SHiRA when it can hold the patch, else LoRA.
* Every other patched tensor (norms, biases, embeddings, ``keep``-policy tensors, and in SHiRA mode weights
  too dense to pay off as indices) goes into ``modules_to_save``: its whole module is stored at the applied
  values. Tensors tied to another parameter (``lm_head`` = ``embed_tokens``) cannot be represented (PEFT
  would untie them): one-line error, use ``model-tailor apply``.
* ``reset`` tensors need nothing: their applied value is the base value.

So the merged weight of a loaded adapter equals ``model-tailor apply``'s tensor exactly for pure-sparse and
pure-low-rank tensors and within fp32 rounding for a sparse + low-rank tensor (one sum in another order).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model_tailor.errors import CheckpointError, ConfigError, ModelTailorError, PatchFormatError
from model_tailor.io.checkpoint import CheckpointReader
from model_tailor.io.peft_adapter import module_map
from model_tailor.patch.fingerprint import compare_fingerprint
from model_tailor.patch.format import load_patch
from model_tailor.patch.model import SparsePatch, TensorPatch
from model_tailor.patch.peft_card import adapter_card

__all__ = ["PEFT_TYPES", "ExportResult", "MissingExtraError", "export_peft", "require_peft"]

PEFT_TYPES = ("auto", "lora", "shira")
PREFIX = "base_model.model."
INSTALL_HINT = "pip install 'model-tailor[peft]' (or pip install 'peft>=0.17,<1')"


class MissingExtraError(ModelTailorError):
    """An optional dependency (an extra) is not installed."""


def require_peft() -> Any:
    """Import peft or say in one line how to install it."""
    try:
        import peft
    except ImportError:
        raise MissingExtraError(f"this needs the optional peft package: {INSTALL_HINT}") from None
    return peft


@dataclass
class ExportResult:
    """What :func:`export_peft` wrote: ``ranks`` (LoRA) or ``entries`` (SHiRA) per adapted module."""

    out_dir: Path
    peft_type: str
    ranks: dict[str, int] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)
    shira_r: int = 0


@dataclass
class _Layout:
    """Which module holds each patch tensor, and how it is written."""

    factors: dict[str, TensorPatch]  # module path -> its weight's patch (Linear / Conv1D)
    conv1d: set[str]
    saved: set[str]  # module paths stored whole
    to_ckpt: dict[str, str]  # model parameter -> checkpoint name


def _layout(patch: SparsePatch, base: CheckpointReader) -> _Layout:
    modules = module_map(base)
    factors: dict[str, TensorPatch] = {}
    saved: set[str] = set()
    for name, tp in sorted(patch.tensors.items()):
        if tp.nnz == 0 and tp.lowrank is None:
            continue
        found = modules.owners.get(name, [])
        if len(found) != 1:
            why = f"is tied to {', '.join(found)}" if found else "is no parameter of the base model"
            raise ConfigError(
                f"patch tensor {name!r} {why}; a PEFT adapter cannot represent it, use model-tailor apply"
            )
        module, _, attr = found[0].rpartition(".")
        if attr == "weight" and module in modules.linear:
            factors[module] = tp
        else:
            saved.add(module)
    conv1d = {m for m in factors if modules.linear[m]}
    layout = _Layout(factors, conv1d, saved, modules.to_ckpt)
    _absorb(layout)
    return layout


def _inside(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


def _absorb(layout: _Layout) -> None:
    """A module stored whole carries everything under it: drop nested saved modules and factors."""
    outer = {m for m in layout.saved if not any(o != m and _inside(m, o) for o in layout.saved)}
    layout.saved = outer
    for module in [m for m in layout.factors if any(_inside(m, o) for o in outer)]:
        del layout.factors[module]


# -- LoRA ---------------------------------------------------------------------------------------------------
def _selection(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta = X @ Y`` exactly, with one-hot ``X`` (or ``Y``) selecting its non-zero rows (or columns)."""
    rows = torch.nonzero(delta.abs().sum(1) > 0).reshape(-1)
    cols = torch.nonzero(delta.abs().sum(0) > 0).reshape(-1)
    if len(rows) <= len(cols):
        x = torch.zeros(delta.shape[0], len(rows))
        x[rows, torch.arange(len(rows))] = 1.0
        return x, delta[rows].clone()
    y = torch.zeros(len(cols), delta.shape[1])
    y[torch.arange(len(cols)), cols] = 1.0
    return delta[:, cols].clone(), y


def _lora_tensors(module: str, tp: TensorPatch, conv1d: bool) -> tuple[dict[str, torch.Tensor], int]:
    """``lora_A`` (r, in) and ``lora_B`` (out, r) with ``lora_B @ lora_A`` = the delta (transposed for Conv1D)."""
    xs, ys = [], []
    if tp.lowrank is not None:
        xs.append(tp.lowrank[0])
        ys.append(tp.lowrank[1])
    if tp.nnz:
        sparse = torch.zeros(tp.numel)
        sparse[tp.indices] = tp.values
        x, y = _selection(sparse.reshape(tp.shape))
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs, 1), torch.cat(ys, 0)  # stored-layout delta = x @ y
    a, b = (x.T, y.T) if conv1d else (y, x)  # Conv1D stores (in, out): delta^T = B_l @ A_l
    key = f"{PREFIX}{module}"
    return {f"{key}.lora_A.weight": a.contiguous(), f"{key}.lora_B.weight": b.contiguous()}, int(x.shape[1])


def _exact_regex(names: list[str]) -> str:
    """peft full-matches a string ``target_modules`` against each module path: exactly these modules."""
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


# -- SHiRA --------------------------------------------------------------------------------------------------
def _shira_r(layout: _Layout) -> int:
    """One ``r`` for every module; modules too dense for it (or for indices to pay off) are stored whole."""
    while True:
        need = {m: math.ceil(tp.nnz / sum(tp.shape)) for m, tp in layout.factors.items()}
        r = max(need.values(), default=0)
        dense = [m for m, tp in layout.factors.items() if 2 * tp.nnz > tp.numel or r * sum(tp.shape) > tp.numel]
        if not dense:
            return max(r, 1)
        for m in dense:
            del layout.factors[m]
            layout.saved.add(m)
        _absorb(layout)


def _shira_tensors(module: str, tp: TensorPatch, r: int) -> dict[str, torch.Tensor]:
    """Exact indices and values, padded with zero-valued unused positions to ``r * (rows + cols)``."""
    rows, cols = tp.shape
    taken = torch.zeros(tp.numel, dtype=torch.bool)
    taken[tp.indices] = True
    pad = r * (rows + cols) - tp.nnz
    flat = torch.cat([tp.indices, torch.nonzero(~taken).reshape(-1)[:pad]])
    values = torch.cat([tp.values, torch.zeros(pad)])
    order = torch.argsort(flat)
    flat, values = flat[order], values[order]
    indices = torch.stack([flat // cols, flat % cols]).to(torch.int32)
    key = f"{PREFIX}{module}"
    return {f"{key}.shira_indices": indices.contiguous(), f"{key}.shira_weight": values.contiguous()}


# -- whole modules ------------------------------------------------------------------------------------------
def _saved_tensors(layout: _Layout, patch: SparsePatch, base: CheckpointReader) -> dict[str, torch.Tensor]:
    """Every parameter under each whole-stored module, at its applied value (base + patch)."""
    out: dict[str, torch.Tensor] = {}
    for param, ck in sorted(layout.to_ckpt.items()):
        if any(_inside(param.rpartition(".")[0], m) for m in layout.saved):
            tensor = base.get(ck)
            out[f"{PREFIX}{param}"] = patch.tensors[ck].apply(tensor) if ck in patch.tensors else tensor
    return out


def _choose(requested: str, layout: _Layout) -> str:
    lowrank = sorted(m for m, tp in layout.factors.items() if tp.lowrank is not None)
    why = (
        f"{lowrank[0]} has low-rank factors" if lowrank else f"{sorted(layout.conv1d)[0]} is a Conv1D" if layout.conv1d
        else ""
    )  # fmt: skip
    if requested == "shira" and why:
        raise ConfigError(
            f"--peft-type shira cannot hold this patch ({why}; SHiRA holds sparse deltas of nn.Linear only); "
            "use --peft-type lora (exact: sparse parts become row-selection factors) or model-tailor apply"
        )
    return "lora" if requested == "lora" or why else "shira"


def _check_base(patch: SparsePatch, base: CheckpointReader, patch_path: Path, force: bool) -> None:
    missing = sorted(n for n in patch.tensors if n not in base)
    bad = [f"{n} (patch {list(tp.shape)}, base {list(base.shape(n))})"
           for n, tp in sorted(patch.tensors.items()) if n in base and tuple(base.shape(n)) != tp.shape]  # fmt: skip
    if missing or bad:
        raise CheckpointError(
            f"patch {str(patch_path)!r} does not fit base {str(base.path)!r} "
            f"(missing: {', '.join(missing[:5]) or 'none'}; shapes: {', '.join(bad[:5]) or 'ok'}); wrong base"
        )
    problems = compare_fingerprint(patch.metadata.base_fingerprint, base)
    if problems and not force:
        raise PatchFormatError(
            f"patch {str(patch_path)!r} was made for another base than {str(base.path)!r} "
            f"({'; '.join(problems[:3])}); use the matching base, or pass --force"
        )


def _peft_config(peft: Any, kind: str, result: ExportResult, base_dir: Path, conv1d: bool) -> Any:
    common = dict(
        target_modules=_exact_regex(list(result.ranks or result.entries)),
        modules_to_save=result.modules_to_save or None,
        base_model_name_or_path=str(base_dir),
        inference_mode=True,
    )
    if kind == "shira":
        return peft.ShiraConfig(r=result.shira_r, mask_type="random", **common)
    r = max(result.ranks.values())
    pattern = {re.escape(m): k for m, k in result.ranks.items() if k != r}
    return peft.LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), fan_in_fan_out=conv1d,
        lora_dropout=0.0, bias="none", init_lora_weights=True, **common,
    )  # fmt: skip


def export_peft(
    patch_path: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    peft_type: str = "auto",
    force: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``patch`` as a PEFT adapter of ``base_dir`` into ``out_dir`` (atomically, with a model card).

    Args:
        patch_path: the patch file. ``base_dir``: the base it was made for (checked by fingerprint).
        out_dir: the adapter folder; must not exist unless ``overwrite``.
        peft_type: ``auto`` | ``lora`` | ``shira`` (see the module docstring).
        force: export even if the base fingerprint differs (names and shapes must still match).

    Raises:
        MissingExtraError: peft is not installed. ConfigError: the patch cannot be represented as asked.
        CheckpointError / PatchFormatError: unreadable inputs, a patch for another base, ``out_dir`` exists.
    """
    if peft_type not in PEFT_TYPES:
        raise ConfigError(f"--peft-type must be one of {', '.join(PEFT_TYPES)}, got {peft_type!r}")
    peft = require_peft()
    out, base_dir, patch_path = Path(out_dir), Path(base_dir), Path(patch_path)
    if out.exists() and (not overwrite or out.resolve() == base_dir.resolve()):
        raise CheckpointError(f"output {str(out)!r} already exists; choose a new folder or pass --overwrite")
    patch = load_patch(patch_path)
    with CheckpointReader(base_dir) as base:
        _check_base(patch, base, patch_path, force)
        layout = _layout(patch, base)
        kind = _choose(peft_type, layout)
        result = ExportResult(out, kind.upper(), reset=sorted(_reset_names(patch)))
        tensors: dict[str, torch.Tensor] = {}
        if kind == "shira":
            result.shira_r = _shira_r(layout)
        for module, tp in sorted(layout.factors.items()):
            if kind == "shira":
                tensors.update(_shira_tensors(module, tp, result.shira_r))
                result.entries[module] = tp.nnz
            else:
                part, rank = _lora_tensors(module, tp, module in layout.conv1d)
                tensors.update(part)
                result.ranks[module] = rank
        if not layout.factors:
            raise ConfigError(
                "the patch changes no Linear weight; a PEFT adapter needs at least one adapted module, "
                "use model-tailor apply"
            )
        tensors.update(_saved_tensors(layout, patch, base))
        result.modules_to_save = sorted(layout.saved)
        config = _peft_config(peft, kind, result, base_dir, bool(layout.conv1d))
        _write(out, tensors, config, adapter_card(patch, result, base_dir), overwrite)
    return result


def _reset_names(patch: SparsePatch) -> list[str]:
    reset = patch.metadata.reset_params
    return list(reset) if isinstance(reset, (list, dict)) else []


def _write(out: Path, tensors: dict[str, torch.Tensor], config: Any, card: str, overwrite: bool) -> None:
    """Fill a temporary folder beside ``out`` and rename it into place: no partial adapter is ever left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~umask)
        if out.exists() and overwrite:
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
