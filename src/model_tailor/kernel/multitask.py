"""Several fine-tunes of one base in one patch: the joint objective as one target and one Hessian
(docs/METHOD.md §12, "Joint multi-task tailoring").

Task t contributes ``||(W - W_t) X_t||^2`` with ``H_t ~ X_t X_t^T``. Every task term is damped with the same
``lam`` the kernel adds to the combined Hessian, so the damped joint objective

    J(W) = (1/T) sum_t (W - W_t) (H_t + lam I) (W - W_t)^T

equals ``(W - W*) (H + lam I) (W - W*)^T + const`` with ``H = (1/T) sum_t H_t`` and

    W* = W_bar + ((1/T) sum_t (W_t - W_bar) H_t) (H + lam I)^{-1},   W_bar = (1/T) sum_t W_t.

The unchanged kernel, given ``target = W*`` and ``hessian = H``, minimises J under its mask: the joint patch is
the single-task method on a combined target. ``lam`` is the kernel's own damping of ``H`` (``factor_hessian``:
dead inputs, ``percdamp``, retries), so the combined target and the kernel see the same damped matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model_tailor.errors import ConfigError, ShapeMismatchError
from model_tailor.kernel.compensation import compute_dtype, reconstruction_error
from model_tailor.kernel.hessian import factor_hessian, fp32_precision

__all__ = ["combine_targets", "joint_error", "prefer_reference"]


def _relative_mean(tensors: Sequence[Tensor]) -> Tensor:
    """``mean(tensors)`` written as ``t_0 + mean(t_i - t_0)``: identical inputs give ``t_0`` bit for bit."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.clone()
    return first + torch.stack([t - first for t in tensors]).mean(dim=0)


def _check(base: Tensor, finetuned: Sequence[Tensor], hessians: Sequence[Tensor], name: str | None) -> None:
    if not finetuned:
        raise ConfigError(f"{name or 'combine_targets'}: needs at least one fine-tuned weight")
    if len(finetuned) != len(hessians):
        raise ConfigError(
            f"{name or 'combine_targets'}: {len(finetuned)} fine-tuned weights but {len(hessians)} Hessians; "
            "give one Hessian per task"
        )
    cols = base.shape[1]
    for i, (W, H) in enumerate(zip(finetuned, hessians, strict=True)):
        if W.shape != base.shape:
            raise ShapeMismatchError(
                f"{name or 'combine_targets'}: task {i} weight {tuple(W.shape)} != base {tuple(base.shape)}"
            )
        if tuple(H.shape) != (cols, cols):
            raise ShapeMismatchError(
                f"{name or 'combine_targets'}: task {i} Hessian must be ({cols}, {cols}), got {tuple(H.shape)}"
            )


def combine_targets(
    base: Tensor,
    finetuned: Sequence[Tensor],
    hessians: Sequence[Tensor],
    *,
    percdamp: float = 0.01,
    name: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The combined target ``W*`` and Hessian ``H`` of the damped joint objective (module docstring).

    Args:
        base: ``(rows, cols)`` W_pre (shapes and dtype only: the joint optimum does not depend on it).
        finetuned: one ``(rows, cols)`` W_t per task.
        hessians: one ``(cols, cols)`` H_t per task, each the per-token mean of its task's data (§3), so every
            task weighs the same whatever its token count.
        percdamp: the kernel's relative damping; ``lam`` is what ``factor_hessian(H, percdamp)`` settles on.
        name: layer name for error messages.

    Returns:
        ``(W_star (rows, cols), H (cols, cols))`` in compute dtype (fp32, fp64 for fp64 inputs); pass them to
        :func:`~model_tailor.kernel.tailor_weight` as ``finetuned=W_star`` and ``hessian=H``, so salience ranks
        ``|W* - W_pre|``. Identical tasks give exactly the single task's weight and Hessian.
    """
    _check(base, finetuned, hessians, name)
    dtype = compute_dtype(base, *finetuned, *hessians)
    device = hessians[0].device
    Ws = [W.to(device=device, dtype=dtype) for W in finetuned]
    Hs = [H.to(device=device, dtype=dtype) for H in hessians]
    H = _relative_mean(Hs)
    W_bar = _relative_mean(Ws)
    spread = [W - W_bar for W in Ws]
    if all(not bool(S.any()) for S in spread):  # every task asks for the same weights: nothing to solve
        return W_bar, H
    factor = factor_hessian(H, percdamp=percdamp, name=name)
    with fp32_precision():
        C = sum(S @ Ht for S, Ht in zip(spread, Hs, strict=True)) / len(Ws)
        # C (H + lam I)^{-1} with (H + lam I)^{-1} = U^T U: two products with the kernel's own factor.
        correction = (C @ factor.U.T) @ factor.U
    return W_bar + correction, H


def joint_error(W: Tensor, finetuned: Sequence[Tensor], hessians: Sequence[Tensor], *, lam: float = 0.0) -> float:
    """``(1/T) sum_t (W - W_t) (H_t + lam I) (W - W_t)^T``: the joint objective of ``W`` (damped by ``lam``)."""
    cols = W.shape[1]
    total = 0.0
    for Wt, Ht in zip(finetuned, hessians, strict=True):
        eye = torch.eye(cols, dtype=Ht.dtype, device=Ht.device)
        total += reconstruction_error(W, Wt, Ht + lam * eye)
    return total / len(finetuned)


def prefer_reference(
    weight: Tensor, reference: Tensor, target: Tensor, hessian: Tensor, *, percdamp: float = 0.01
) -> tuple[Tensor, bool, float]:
    """The better of a decorated ``weight`` and a ``reference`` with the same support (e.g. a combined patch
    before re-decoration), by ``E(W) = (W - target) H_tilde (W - target)^T`` under the kernel's damping.

    Returns:
        ``(W, reference_won, E(W))``. A re-decoration that goes through this never reconstructs worse than the
        reference, whatever the decorator's rounding.
    """
    H_damped = factor_hessian(hessian, percdamp=percdamp).H_damped
    e_weight = reconstruction_error(weight, target, H_damped)
    e_reference = reconstruction_error(reference, target, H_damped)
    if e_reference < e_weight:
        return reference, True, e_reference
    return weight, False, e_weight
