"""Sparse patches: the decorated delta ``W_MT - W_pre`` at kept positions, ready to graft onto a base
(docs/ARCHITECTURE.md, patch file).

A ``TensorPatch`` holds one parameter's patch as flat row-major indices (int64, sorted, unique) and fp32
values, plus optional low-rank factors ``(A, B)``; its dense delta is ``scatter(values) + A @ B``. A
``SparsePatch`` maps full HF parameter names to tensor patches and carries the provenance (``PatchMetadata``)
written into the patch file. Maths runs in fp32 and results are cast to the base dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from model_tailor.errors import CheckpointError, NumericalError, PatchFormatError, ShapeMismatchError

if TYPE_CHECKING:
    from model_tailor.patch.summary import PatchSummary

logger = logging.getLogger(__name__)


def current_versions() -> dict[str, str]:
    """Versions of model-tailor and the libraries that shape a patch (recorded in every patch file)."""
    from model_tailor import __version__

    # The package's own version comes from the source, so it is recorded even when run from a checkout.
    versions: dict[str, str] = {"model-tailor": __version__}
    for dist in ("torch", "safetensors", "transformers"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:  # pragma: no cover - depends on the environment
            continue
    return versions


def utc_now() -> str:
    """The current UTC time as an ISO-8601 string with seconds precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling used in patch metadata)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``None`` for a missing or unknown name."""
    dtype = getattr(torch, name, None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n


@dataclass(frozen=True, eq=False)  # tensors have no boolean ==; use .equal()
class TensorPatch:
    """One parameter's patch.

    Attributes:
        name: full HF parameter name.
        shape: shape of the parameter, e.g. ``(rows, cols)``.
        indices: int64 ``(k,)`` flat row-major positions, sorted and unique, in ``[0, numel)``.
        values: float32 ``(k,)`` decorated delta ``W_MT - W_pre`` at ``indices``.
        lowrank: optional fp32 factors ``(A (rows, r), B (r, cols))`` added densely (2-D parameters only).
    """

    name: str
    shape: tuple[int, ...]
    indices: Tensor
    values: Tensor
    lowrank: tuple[Tensor, Tensor] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        idx, val = self.indices, self.values
        if idx.dim() != 1 or val.dim() != 1:
            raise PatchFormatError(
                f"patch {self.name!r}: indices and values must be 1-D, got shapes {list(idx.shape)} and "
                f"{list(val.shape)}; flatten them row-major"
            )
        if idx.numel() != val.numel():
            raise PatchFormatError(
                f"patch {self.name!r}: {idx.numel()} indices but {val.numel()} values; they must pair up"
            )
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise PatchFormatError(f"patch {self.name!r}: indices have dtype {idx.dtype}; use an integer dtype")
        object.__setattr__(self, "indices", idx.detach().to("cpu", torch.int64).contiguous())
        object.__setattr__(self, "values", val.detach().to("cpu", torch.float32).contiguous())
        problem = index_problem(self.indices, self.numel)
        if problem:
            raise PatchFormatError(f"patch {self.name!r}: indices {problem}; build patches with TensorPatch.from_dense")
        if self.lowrank is not None:
            a, b = (t.detach().to("cpu", torch.float32).contiguous() for t in self.lowrank)
            if len(self.shape) != 2 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                raise PatchFormatError(
                    f"patch {self.name!r}: low-rank factors {list(a.shape)} @ {list(b.shape)} do not form "
                    f"a 2-D delta of shape {list(self.shape)}"
                )
            if (a.shape[0], b.shape[1]) != self.shape:
                raise PatchFormatError(
                    f"patch {self.name!r}: low-rank product has shape {[a.shape[0], b.shape[1]]}, expected "
                    f"{list(self.shape)}"
                )
            object.__setattr__(self, "lowrank", (a, b))

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, name: str, delta: Tensor, keep_mask: Tensor | None = None) -> TensorPatch:
        """Build a patch from a dense delta.

        Args:
            name: full HF parameter name.
            delta: ``(rows, cols)`` (any shape) delta ``W_MT - W_pre``; computed in fp32.
            keep_mask: bool, same shape, True = in the patch. ``None`` keeps every nonzero entry.

        Returns:
            The patch; entries outside ``keep_mask`` are dropped (reverted to base).
        """
        d = delta.detach().to("cpu", torch.float32)
        if not torch.isfinite(d).all():
            raise NumericalError(f"delta of {name!r} holds NaN or Inf; check the fine-tuned weights", layer=name)
        flat = d.reshape(-1)
        if keep_mask is None:
            idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
        else:
            if tuple(keep_mask.shape) != tuple(d.shape):
                raise ShapeMismatchError(
                    f"keep_mask of {name!r} has shape {list(keep_mask.shape)}, delta has {list(d.shape)}"
                )
            if keep_mask.dtype != torch.bool:
                raise PatchFormatError(f"keep_mask of {name!r} has dtype {keep_mask.dtype}; pass a bool tensor")
            idx = torch.nonzero(keep_mask.detach().to("cpu").reshape(-1), as_tuple=False).reshape(-1)
        return cls(name, tuple(d.shape), idx, flat[idx].clone())

    @classmethod
    def from_weights(cls, name: str, base: Tensor, tailored: Tensor, keep_mask: Tensor | None = None) -> TensorPatch:
        """Build a patch from base and tailored weights (``delta = tailored - base`` in fp32).

        Pass ``tailored`` already cast to the base dtype: the fp32 difference of two bf16/fp16 values is then
        exact, so ``apply`` reproduces ``tailored`` and ``remove`` reproduces ``base`` bit for bit.

        Args:
            name: full HF parameter name.
            base: ``(rows, cols)`` base weight W_pre.
            tailored: ``(rows, cols)`` tailored weight W_MT.
            keep_mask: bool ``(rows, cols)``, True = in the patch. ``None`` keeps entries where they differ.

        Raises:
            PatchFormatError: ``tailored`` differs from ``base`` outside ``keep_mask`` (nothing is dropped
                silently).
        """
        if tuple(base.shape) != tuple(tailored.shape):
            raise ShapeMismatchError(
                f"{name!r}: base shape {list(base.shape)} != tailored shape {list(tailored.shape)}"
            )
        delta = tailored.detach().to("cpu", torch.float32) - base.detach().to("cpu", torch.float32)
        if keep_mask is not None and delta.numel():
            outside = int(((delta != 0) & ~keep_mask.to("cpu", torch.bool)).sum())
            if outside:
                raise PatchFormatError(
                    f"{name!r}: tailored differs from base at {outside} entries outside keep_mask; "
                    "revert them to base first or widen the mask"
                )
        return cls.from_dense(name, delta, keep_mask)

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nnz(self) -> int:
        """Number of sparse entries (low-rank parts are not counted)."""
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        """Fraction of the parameter's entries stored in the sparse part (0 for an empty parameter)."""
        return self.nnz / self.numel if self.numel else 0.0

    # -- maths ----------------------------------------------------------------------------------------------
    def to_dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense delta of shape ``self.shape``: ``scatter(values) + A @ B``, computed in fp32, then cast."""
        flat = torch.zeros(self.numel, dtype=torch.float32)
        flat[self.indices] = self.values
        dense = flat.reshape(self.shape)
        if self.lowrank is not None:
            dense = dense + self.lowrank[0] @ self.lowrank[1]
        return dense.to(dtype)

    def _check_shape(self, tensor: Tensor) -> None:
        if tuple(tensor.shape) != self.shape:
            raise ShapeMismatchError(
                f"patch {self.name!r} has shape {list(self.shape)} but the tensor has {list(tensor.shape)}; "
                "the patch was made for another model"
            )

    def _shifted(self, tensor: Tensor, sign: float, out_dtype: torch.dtype) -> Tensor:
        self._check_shape(tensor)
        out = tensor.detach().to("cpu", torch.float32, copy=True)
        if self.lowrank is not None:
            out += sign * (self.lowrank[0] @ self.lowrank[1])
        # Only the indexed entries change, so untouched entries (including -0.0) survive bit for bit.
        flat = out.view(-1)
        flat[self.indices] += sign * self.values
        # Checked after the cast: a delta can fit fp32 and still overflow a bf16/fp16 checkpoint.
        result = out.to(out_dtype)
        changed = result if self.lowrank is not None else result.view(-1)[self.indices]
        if not torch.isfinite(changed).all():
            bad = int((~torch.isfinite(changed)).sum())
            raise NumericalError(
                f"patched {self.name!r} would hold {bad} NaN/Inf value(s) in {dtype_name(out_dtype)}: the delta "
                "overflows it; lower --weights or re-create the patch",
                layer=self.name,
            )
        return result

    def apply(self, base_tensor: Tensor) -> Tensor:
        """``base + delta`` computed in fp32 and cast to the base dtype (a new tensor, on CPU)."""
        return self._shifted(base_tensor, 1.0, base_tensor.dtype)

    def remove(self, patched_tensor: Tensor, base_dtype: torch.dtype | None = None) -> Tensor:
        """``patched - delta`` in fp32, cast to ``base_dtype`` (default: the patched tensor's dtype).

        Exact for bf16/fp16 when the patch values are exact differences (see ``from_weights``). In fp32, an
        entry comes back within one ulp of the larger of its base and patched values (both roundings are
        bounded by that ulp), which exceeds one ulp of the base where the delta dwarfs the weight.
        """
        return self._shifted(patched_tensor, -1.0, base_dtype or patched_tensor.dtype)

    def equal(self, other: TensorPatch) -> bool:
        """Exact equality of name, shape, indices, values and low-rank factors."""
        if (self.name, self.shape) != (other.name, other.shape):
            return False
        if not (torch.equal(self.indices, other.indices) and torch.equal(self.values, other.values)):
            return False
        if (self.lowrank is None) != (other.lowrank is None):
            return False
        if self.lowrank is None or other.lowrank is None:
            return True
        return all(torch.equal(x, y) for x, y in zip(self.lowrank, other.lowrank, strict=True))


def index_problem(indices: Tensor, numel: int) -> str:
    """Describe what is wrong with flat ``indices`` for a tensor of ``numel`` entries ("" when valid)."""
    if indices.numel() == 0:
        return ""
    if int(indices.min()) < 0 or int(indices.max()) >= numel:
        return f"out of range (min {int(indices.min())}, max {int(indices.max())}, numel {numel})"
    if indices.numel() > 1:
        step = indices[1:] - indices[:-1]
        if bool((step < 0).any()):
            return "are not sorted ascending"
        if bool((step == 0).any()):
            return "are not unique"
    return ""


@dataclass
class PatchMetadata:
    """Provenance written into the patch file: every field is JSON-serialisable.

    Attributes:
        shapes: parameter name -> shape (filled from the tensors when saving).
        base_dtypes: parameter name -> base dtype name (``"bfloat16"``).
        base_fingerprint: ``fingerprint.fingerprint`` of the base checkpoint.
        config: resolved tailoring config.
        versions: package versions (``current_versions()``).
        stats: parameter name -> statistics (density, calibration errors, ...).
        reset_params: tuned non-targets set back to base (names, or name -> reason).
        created: ISO-8601 creation time.
        format_version: version read from / written to the file.
        extra: unknown metadata keys found when loading (kept, with a warning).
        multitask: a joint multi-task patch's tasks (docs/METHOD.md §12): ``{"tasks": [{"name", "finetuned",
            "fingerprint", "calibration", "records", "kept_with_delta"}, ...], "kept", "shared"}``; empty (and
            not written) for a single-task patch.
    """

    shapes: dict[str, list[int]] = field(default_factory=dict)
    base_dtypes: dict[str, str] = field(default_factory=dict)
    base_fingerprint: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    reset_params: list[str] | dict[str, Any] = field(default_factory=list)
    created: str = ""
    format_version: str = "1"
    extra: dict[str, str] = field(default_factory=dict)
    multitask: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class SparsePatch:
    """A whole-model patch: parameter name -> ``TensorPatch``, plus ``PatchMetadata``."""

    tensors: dict[str, TensorPatch]
    metadata: PatchMetadata = field(default_factory=PatchMetadata)

    def __post_init__(self) -> None:
        for key, tp in self.tensors.items():
            if key != tp.name:
                raise PatchFormatError(f"patch entry {key!r} holds a tensor patch named {tp.name!r}")
        self.metadata.shapes = {name: list(tp.shape) for name, tp in sorted(self.tensors.items())}

    @property
    def nnz(self) -> int:
        return sum(tp.nnz for tp in self.tensors.values())

    @property
    def has_lowrank(self) -> bool:
        return any(tp.lowrank is not None for tp in self.tensors.values())

    def _entry(self, state_dict: dict[str, Tensor], name: str) -> Tensor:
        if name not in state_dict:
            raise CheckpointError(f"patch tensor {name!r} is missing from the model; the patch is for another model")
        return state_dict[name]

    def apply_to_state_dict(self, state_dict: dict[str, Tensor], *, inplace: bool = False) -> dict[str, Tensor]:
        """Return ``state_dict`` with every patch added (base dtypes kept); ``inplace`` updates it."""
        for name in self.tensors:  # check all names before changing anything
            self.tensors[name]._check_shape(self._entry(state_dict, name))
        out = state_dict if inplace else dict(state_dict)
        for name, tp in self.tensors.items():
            out[name] = tp.apply(state_dict[name])
        return out

    def remove_from_state_dict(self, state_dict: dict[str, Tensor], *, inplace: bool = False) -> dict[str, Tensor]:
        """Inverse of ``apply_to_state_dict``: subtract every patch (dtypes from ``metadata.base_dtypes``)."""
        for name in self.tensors:
            self.tensors[name]._check_shape(self._entry(state_dict, name))
        out = state_dict if inplace else dict(state_dict)
        for name, tp in self.tensors.items():
            out[name] = tp.remove(state_dict[name], dtype_from_name(self.metadata.base_dtypes.get(name)))
        return out

    def apply_to_model(self, module: torch.nn.Module) -> None:
        """Add the patch to ``module``'s parameters in place (full names, ``no_grad``), for evaluation."""
        params = dict(module.named_parameters(remove_duplicate=False))
        missing = sorted(set(self.tensors) - set(params))
        if missing:
            raise CheckpointError(
                f"patch tensors missing from the model: {', '.join(missing)}; the patch is for another model"
            )
        for name, tp in self.tensors.items():
            tp._check_shape(params[name])
        with torch.no_grad():
            for name, tp in self.tensors.items():
                param = params[name]
                param.copy_(tp.apply(param.detach().to("cpu")).to(param.device))

    def summary(self) -> PatchSummary:
        """Density per tensor and per layer, and the patch size against a dense delta."""
        from model_tailor.patch.summary import summarize

        return summarize(self)

    def equal(self, other: SparsePatch) -> bool:
        """Exact equality of the tensor patches (metadata is not compared)."""
        if set(self.tensors) != set(other.tensors):
            return False
        return all(tp.equal(other.tensors[name]) for name, tp in self.tensors.items())
