"""The preserve-aware (dual) objective, reduced to the kernel's single-target form.

Preserve-aware tailoring reconstructs the fine-tuned output on target-task inputs X_t while keeping the base
output on original-task ("preserve") inputs X_o:

    J(W) = ||(W - W_ft) X_t||^2 + lam * ||(W - W_pre) X_o||^2,   H_t ~ X_t X_t^T,  H_o ~ X_o X_o^T.

Completing the square, ``J(W) = (W - W*) H_c (W - W*)^T + const`` with ``H_c = H_t + lam * H_o`` and
``W* = W_pre + delta @ H_t @ H_c^{-1}``, so the unchanged kernel, given ``target=W*`` and ``hessian=H_c``,
minimises J under its mask. At density 1 the patch is W* itself: the dense closed form, a RegMean-like merge
of the fine-tuned weights with the base, weighted by the two input statistics and anchored on the base.
"""

from __future__ import annotations

import math

import torch

from model_tailor.errors import ConfigError, ShapeMismatchError
from model_tailor.kernel.compensation import compute_dtype
from model_tailor.kernel.hessian import fp32_precision, normalize_hessian

__all__ = ["preserve_target"]


def preserve_target(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    H_t: torch.Tensor,
    H_o: torch.Tensor,
    lam: float,
    *,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction target and Hessian of the preserve-aware objective J (module docstring).

    Both Hessians are first normalised to unit mean eigenvalue (``H / (trace / cols)``) so that ``lam`` weighs
    the two data sets independently of their token counts and activation scales. Damping attaches to the
    target term: with ``d = percdamp * mean(diag H_c)``, ``W* = W_pre + delta (H_t + dI)(H_c + dI)^{-1}``,
    i.e. the optimum of ``J + d * ||W - W_ft||^2`` (it keeps ``W* -> W_ft`` as ``lam -> 0`` exactly).

    Args:
        base: ``(rows, cols)`` W_pre.
        finetuned: ``(rows, cols)`` W_ft.
        H_t: ``(cols, cols)`` Hessian of the target-task (calibration) inputs.
        H_o: ``(cols, cols)`` Hessian of the preserve inputs.
        lam: weight of the preserve term, >= 0. 0 gives ``W* = finetuned`` and ``H_c = normalised H_t``.
        percdamp: relative damping of the solve.

    Returns:
        ``(W_star (rows, cols), H_c (cols, cols))`` in compute dtype (fp32, fp64 for fp64 inputs); pass them
        to :func:`~model_tailor.kernel.tailor_weight` as ``target=W_star`` with ``hessian=H_c``.
    """
    if not (lam >= 0 and math.isfinite(lam)):
        raise ConfigError(f"preserve weight lam must be a finite number >= 0, got {lam}")
    if base.shape != finetuned.shape:
        raise ShapeMismatchError(f"base {tuple(base.shape)} != finetuned {tuple(finetuned.shape)}")
    cols = base.shape[1]
    for what, H in (("H_t", H_t), ("H_o", H_o)):
        if tuple(H.shape) != (cols, cols):
            raise ShapeMismatchError(f"{what} must be ({cols}, {cols}), got {tuple(H.shape)}")
    dtype = compute_dtype(base, finetuned, H_t, H_o)
    Ht = normalize_hessian(H_t.to(dtype))
    if lam == 0:
        return finetuned.to(dtype).clone(), Ht
    H_c = Ht + lam * normalize_hessian(H_o.to(device=Ht.device, dtype=dtype))
    d = percdamp * float(H_c.diagonal().mean())
    eye = torch.eye(cols, dtype=dtype, device=Ht.device)
    delta = finetuned.to(dtype) - base.to(dtype)
    with fp32_precision():
        # delta (Ht + dI) (H_c + dI)^{-1}: solve X (H_c + dI) = delta (Ht + dI) instead of forming an inverse.
        rhs = delta @ (Ht + d * eye)
        D = torch.linalg.solve(H_c + d * eye, rhs, left=False)
    return base.to(dtype) + D, H_c
