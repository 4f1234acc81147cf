"""Sequential onloading: resolve each tensor's current value and materialise one module at a time on a meta
skeleton.

:class:`WeightSource` answers "what is tensor X right now": a tailored target (kept as sparse indices and
values
in the base dtype, so the patch is the only growing state), a fine-tuned target not tailored yet, or a
non-target resolved by its policy (docs/METHOD.md §11). :class:`Materializer` copies those values into the skeleton's
modules on demand (forward pre-hooks) and sends whole blocks back to ``meta`` after they ran, so peak memory
grows with one block, not with the model (LLM Compressor sequential onloading; docs/METHOD.md §9 "Memory and cost").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from model_tailor.errors import CheckpointError
from model_tailor.io.checkpoint import trim_heap
from model_tailor.patch.layout import index_dtype
from model_tailor.pipeline.targets import TargetPlan

logger = logging.getLogger(__name__)

__all__ = ["Materializer", "SparseValues", "WeightSource"]


@dataclass(frozen=True)
class SparseValues:
    """A tailored tensor as ``base`` with ``values`` (base dtype) written at flat ``indices`` (the keep
    mask), plus optional fp32 low-rank factors ``(A, B)`` in checkpoint layout (docs/METHOD.md §15).

    Not a :class:`~model_tailor.patch.model.TensorPatch`, on purpose: a run holds every tailored tensor
    until its outputs are written, and this form is the compact one (a bf16 entry takes 2 + 4 bytes here,
    an fp32 delta with an int64 index 12), holding the kernel's tailored values themselves rather than
    their difference to base. The patch's fp32 deltas are made from it once, when the patch is built.
    """

    indices: torch.Tensor  # (k,), sorted, patch.layout.index_dtype(numel)
    values: torch.Tensor  # (k,), base dtype
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None  # (A (rows, r), B (r, cols)), fp32, CPU

    @classmethod
    def from_dense(cls, base: torch.Tensor, tailored: torch.Tensor, keep_mask: torch.Tensor) -> SparseValues:
        idx = torch.nonzero(keep_mask.reshape(-1), as_tuple=False).reshape(-1).cpu()
        idx = idx.to(index_dtype(keep_mask.numel()))  # int32 halves the resident patch of a long run
        return cls(idx, tailored.reshape(-1).to("cpu", base.dtype)[idx].clone())

    def apply_sparse(self, base: torch.Tensor) -> torch.Tensor:
        """Base with the sparse values only (what ``keep_mask`` covers); equals :meth:`apply` without factors."""
        out = base.clone().reshape(-1)
        out[self.indices.long()] = self.values.to(base.dtype)
        return out.reshape(base.shape)

    def apply(self, base: torch.Tensor) -> torch.Tensor:
        """The full tailored tensor. With factors: ``base + A B + scatter(values - base)`` in fp32, cast to the
        base dtype, the same arithmetic as ``TensorPatch.apply`` so the saved model equals base + patch."""
        if self.lowrank is None:
            return self.apply_sparse(base)
        idx = self.indices.long()
        out = base.to(torch.float32) + self.lowrank[0] @ self.lowrank[1]
        flat = out.reshape(-1)
        flat[idx] += self.values.to(torch.float32) - base.reshape(-1)[idx].to(torch.float32)
        return out.to(base.dtype)

    def keep_mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        mask = torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.bool)
        mask[self.indices.long()] = True
        return mask.reshape(shape)


class WeightSource:
    """Current value of every checkpoint tensor during a run.

    Args:
        base, finetuned: checkpoint readers.
        plan: targets and non-target actions.
        tailor_free: callback computing a data-free tailored value for ``tailor``-policy tensors.
        others: the other tasks' fine-tuned readers of a joint multi-task run (docs/METHOD.md §12); ``tasks``
            lists every fine-tune, ``finetuned`` first. Each is read tensor by tensor, like ``finetuned``.
    """

    def __init__(
        self,
        base,
        finetuned,
        plan: TargetPlan,  # noqa: ANN001 - CheckpointReaders
        tailor_free: Callable[[str, torch.Tensor, torch.Tensor], SparseValues],
        others: Sequence = (),
    ) -> None:
        self.base, self.finetuned = base, finetuned
        self.tasks = [finetuned, *others]
        self.targets = {t.name for t in plan.targets}
        self.actions = {n.name: n.action for n in plan.non_targets}
        self.tailored: dict[str, SparseValues] = {}
        self._tailor_free = tailor_free

    def release(self) -> None:
        """Unmap both checkpoints and hand freed heap pages back to the OS after a block, so resident memory
        tracks one block rather than every block seen (the readers also release every few reads)."""
        self.base.close()
        for ft in self.tasks:
            ft.close()
        trim_heap()

    def get(self, name: str) -> torch.Tensor:
        """Base dtype for tailored / reset tensors, stored dtype otherwise (the caller casts)."""
        if name in self.tailored:
            return self.tailored[name].apply(self.base.get(name))
        if name in self.targets:
            return self.finetuned.get(name)
        action = self.actions.get(name)
        if action == "reset":
            return self.base.get(name)
        if action == "tailor":
            base, ft = self.base.get(name), self.finetuned.get(name)
            self.tailored[name] = self._tailor_free(name, base, ft)
            return self.tailored[name].apply(base)
        return self.finetuned.get(name)  # identical to base, or "keep"


class Materializer:
    """Load and unload parameters of a meta skeleton from a :class:`WeightSource`.

    Args:
        model: skeleton with meta parameters. ``to_ckpt``: skeleton -> checkpoint names.
        source: tensor values. ``device``, ``dtype``: where and in which float dtype modules run.
    """

    def __init__(
        self,
        model: nn.Module,
        to_ckpt: dict[str, str],
        source: WeightSource,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model, self.source, self.device, self.dtype = model, source, device, dtype
        # Tied weights (lm_head = embed_tokens) have one checkpoint entry: map every alias by object identity.
        by_id: dict[int, str] = {}
        all_names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            all_names.setdefault(id(p), []).append(name)
            if name in to_ckpt:
                by_id.setdefault(id(p), to_ckpt[name])
        self._ckpt: dict[str, str] = {}
        missing = []
        for pid, names in all_names.items():
            for name in names:
                if pid in by_id:
                    self._ckpt[name] = by_id[pid]
                else:
                    missing.append(name)
        self.missing = sorted(missing)
        # Meta parameters take the compute dtype now: models read ``weight.dtype`` before the module runs
        # (e.g. to cast pixel values), and that must agree with what ``load`` materialises.
        converted: dict[int, nn.Parameter] = {}
        for sub in model.modules():
            for pname, p in list(sub._parameters.items()):
                if p is not None and p.device.type == "meta" and p.is_floating_point():
                    if id(p) not in converted:
                        converted[id(p)] = nn.Parameter(p.to(dtype), requires_grad=False)
                    sub._parameters[pname] = converted[id(p)]
        # Buffers stay real in the skeleton (rotary inv_freq, CLIP position ids): small, so they move to the
        # compute device once, here; their dtype is the model's own choice (inv_freq stays fp32).
        for sub in model.modules():
            for bname, b in list(sub._buffers.items()):
                if b is not None and b.device.type != "meta" and b.device != device:
                    sub._buffers[bname] = b.to(device)

    def ckpt_name(self, param_name: str) -> str:
        try:
            return self._ckpt[param_name]
        except KeyError:
            raise CheckpointError(
                f"parameter {param_name!r} of the model has no tensor in the checkpoint; the checkpoint "
                "does not match its config.json"
            ) from None

    def load(self, path: str, *, recurse: bool = True) -> None:
        """Materialise the parameters of module ``path`` (only those still on ``meta``)."""
        module = self.model.get_submodule(path)
        subs = module.named_modules(prefix=path) if recurse else [(path, module)]
        for sub_path, sub in subs:
            for pname, p in list(sub._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                full = f"{sub_path}.{pname}" if sub_path else pname
                t = self.source.get(self.ckpt_name(full))
                if t.is_floating_point():
                    t = t.to(self.dtype)
                sub._parameters[pname] = nn.Parameter(t.to(self.device), requires_grad=False)

    def set_weight(self, path: str, pname: str, value: torch.Tensor) -> None:
        sub = self.model.get_submodule(path)
        sub._parameters[pname] = nn.Parameter(value.to(self.device, self.dtype), requires_grad=False)

    def offload(self, path: str) -> None:
        """Send every parameter under module ``path`` back to ``meta`` (frees its memory)."""
        for sub in self.model.get_submodule(path).modules():
            for pname, p in list(sub._parameters.items()):
                if p is not None and p.device.type != "meta":
                    sub._parameters[pname] = nn.Parameter(p.to("meta"), requires_grad=False)

    def install_hooks(self, block_paths: list[str]) -> list[torch.utils.hooks.RemovableHandle]:
        """Lazy onloading for a full forward: blocks load before and unload after they run; other modules load
        their own parameters on first use and keep them (embeddings, projector, vision stem)."""
        handles = []
        blocks = set(block_paths)

        def inside_block(p: str) -> bool:
            return any(p == b or p.startswith(b + ".") for b in blocks)

        for path, module in self.model.named_modules():
            if path in blocks:
                handles.append(module.register_forward_pre_hook(lambda m, a, p=path: self.load(p)))
                handles.append(module.register_forward_hook(lambda m, a, o, p=path: self.offload(p)))
            elif not inside_block(path) and any(True for _ in module.parameters(recurse=False)):
                handles.append(module.register_forward_pre_hook(lambda m, a, p=path: self.load(p, recurse=False)))
        return handles

    def offload_all(self) -> None:
        self.offload("")
