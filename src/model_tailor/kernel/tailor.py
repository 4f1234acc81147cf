"""Tailor one weight matrix: score, select the patch, decorate it, guard it (docs/METHOD.md §3-§8, D1-D14).

``tailor_weight`` is the kernel contract of docs/ARCHITECTURE.md: tensors in, a :class:`TailoredWeight` out.
Everything model-specific (hooks, calibration, propagation) lives in the pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from model_tailor.errors import ConfigError, NumericalError, ShapeMismatchError
from model_tailor.kernel.compensation import (
    COMPENSATIONS,
    compensate,
    compute_dtype,
    exact_compensation,
    obs_sweep,
    reconstruction_error,
)
from model_tailor.kernel.hessian import DampedFactor, factor_hessian, fp32_precision
from model_tailor.kernel.masking import GRANULARITIES, check_density, select_keep_mask
from model_tailor.kernel.scoring import SENSITIVITY_KINDS, fuse_scores
from model_tailor.kernel.scoring import salience as compute_salience
from model_tailor.kernel.scoring import sensitivity as compute_sensitivity
from model_tailor.options import MASK_TIMINGS, SALIENCE_KINDS, SALIENCE_SOURCES

__all__ = ["TailorStats", "TailoredWeight", "compensate", "tailor_weight"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TailorStats:
    """What happened to one tensor (reported per module, docs/METHOD.md §13).

    Attributes:
        name: parameter name (or None).
        numel: entries in the tensor.
        kept: entries in the patch (True in ``keep_mask``).
        density: ``kept / numel``.
        error_masked: ``sum_i (w_i - t_i) H_tilde (w_i - t_i)^T`` of the plainly masked weights (None
            without H).
        error_compensated: the same for the decorated weights (equals ``error_masked`` for "none").
        used: ``"compensated"``, ``"masked"`` (the guard kept the masked result, D4), ``"none"`` (nothing to
            decorate) or ``"lowrank"`` (a low-rank-only patch, :mod:`model_tailor.kernel.structure`).
        compensation: the requested mode (``obs``, ``official``, ``none``, ``exact``).
        mask_timing: how the mask was chosen: ``adaptive``, ``upfront`` or ``fixed`` (``keep_mask`` given).
        damping: the damping lam that factorised (None without H).
        seconds: wall time per phase (``factor``, ``select``, ``sweep``, ``guard``).
    """

    name: str | None
    numel: int
    kept: int
    density: float
    error_masked: float | None
    error_compensated: float | None
    used: str
    compensation: str
    mask_timing: str = "upfront"
    damping: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TailoredWeight:
    """A tailored tensor.

    Attributes:
        weight: ``(rows, cols)`` in base's dtype; entries outside ``keep_mask`` equal base bitwise.
        keep_mask: ``(rows, cols)`` bool, True = in the patch.
        stats: :class:`TailorStats`.
        lowrank: optional ``(A (rows, r), B (r, cols))`` factors added on top
            (``preserve.tailor_weight_structured``); the full weight is then ``weight + A @ B``.
    """

    weight: torch.Tensor
    keep_mask: torch.Tensor
    stats: TailorStats
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None


class _Clock:
    """Phase timer; synchronises CUDA so phases are measured, not just queued."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._t = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        now = self._now()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {choices}, got {value!r}")


def _validate(base, finetuned, hessian, target, keep_mask, name) -> None:  # noqa: ANN001 - private
    label = name or "tensor"
    if base.ndim != 2:
        raise ShapeMismatchError(f"{label}: base must be 2-D (rows, cols), got {tuple(base.shape)}")
    for what, t in (("finetuned", finetuned), ("target", target), ("keep_mask", keep_mask)):
        if t is not None and t.shape != base.shape:
            raise ShapeMismatchError(f"{label}: {what} shape {tuple(t.shape)} != base shape {tuple(base.shape)}")
    cols = base.shape[1]
    if hessian is not None and tuple(hessian.shape) != (cols, cols):
        raise ShapeMismatchError(f"{label}: hessian must be ({cols}, {cols}), got {tuple(hessian.shape)}")
    if keep_mask is not None and keep_mask.dtype != torch.bool:
        raise ConfigError(f"{label}: keep_mask must be torch.bool (True = in the patch), got {keep_mask.dtype}")
    for what, t in (("base", base), ("finetuned", finetuned), ("hessian", hessian), ("target", target)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NumericalError(f"{label}: {what} contains NaN or Inf", layer=name)


def tailor_weight(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    hessian: torch.Tensor | None,
    *,
    density: float = 0.1,
    alpha: float = 0.8,
    block_size: int = 128,
    percdamp: float = 0.01,
    compensation: str = "obs",
    granularity: str = "block",
    sensitivity: str = "weight",
    mask_timing: str = "adaptive",
    guard: bool = True,
    keep_mask: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    name: str | None = None,
    salience_from: str = "delta",
    salience: str = "magnitude",
) -> TailoredWeight:
    """Tailor one linear weight (docs/METHOD.md §2-§8): keep a ``density`` patch of the delta, revert the rest.

    Args:
        base: ``(rows, cols)`` pre-trained weight W_pre (rows = out_features).
        finetuned: ``(rows, cols)`` fine-tuned weight W_ft.
        hessian: ``(cols, cols)`` layer Hessian ``~ X X^T`` of the module inputs. May be None only when
            nothing needs it (``compensation="none"`` with ``alpha=1`` or a given ``keep_mask``: the data-free
            mode, docs/METHOD.md §10).
        density: fraction of entries kept per selection group, in (0, 1] (D8).
        alpha: fusion weight of salience against sensitivity, in [0, 1] (D6).
        block_size: column block width of the scores, the block granularity and the sweep (D12).
        percdamp: relative damping of H (D12).
        compensation: ``"obs"`` (sign -1, D1), ``"official"`` (sign +1), ``"none"`` or ``"exact"`` (D3).
        granularity: ``"block"``, ``"row"`` or ``"tensor"`` (D10); global selection passes ``keep_mask``.
        sensitivity: ``"weight"`` (W_bar^2 / U_jj^2) or ``"revert"`` ((W_bar - W_pre)^2 / U_jj^2) (D5).
        mask_timing: ``"adaptive"`` (per block from the compensated W_bar, D11) or ``"upfront"``. Adaptive
            needs the sweep and per-block groups; with ``row``/``tensor`` granularity or ``none``/``exact``
            compensation the mask is chosen upfront (logged, recorded in ``stats.mask_timing``).
        guard: keep the plainly masked weights when they reconstruct better under H_tilde (D4).
        keep_mask: ``(rows, cols)`` bool fixed mask (True = in the patch); skips scoring.
        target: ``(rows, cols)`` reconstruction target T (default ``finetuned``): the loss is
            ``||(W - T) X||^2`` and kept entries start from T (preserve-aware variant,
            :mod:`model_tailor.kernel.structure`).
        name: parameter name for errors, logs and stats.
        salience_from: ``"delta"`` (|finetuned - base|, §4) or ``"target"`` (|target - base|).
        salience: how salience scores that change: ``"magnitude"`` (its absolute value, the paper) or
            ``"fapm"`` (base-relative, :func:`~model_tailor.kernel.scoring.salience`).

    Returns:
        :class:`TailoredWeight`; ``weight`` has base's shape and dtype and equals base bitwise off the mask.

    Raises:
        ConfigError: an option out of range.
        ShapeMismatchError: shapes disagree.
        NumericalError: NaN/Inf in an input or a failed factorisation.
    """
    _check_options(
        density, alpha, block_size, compensation, granularity, sensitivity, mask_timing, salience_from, salience
    )
    _validate(base, finetuned, hessian, target, keep_mask, name)
    device, dtype = base.device, compute_dtype(base, finetuned, hessian, target)
    V = base.to(dtype=dtype)
    T = (finetuned if target is None else target).to(device=device, dtype=dtype)
    clock = _Clock(device)
    trivial, no_delta = _trivial(V, T, hessian, keep_mask, density, alpha, compensation, name)
    with fp32_precision():
        factor = None if hessian is None or trivial else factor_hessian(hessian.to(T), percdamp=percdamp, name=name)
        clock.lap("factor")
        timing = _timing(mask_timing, keep_mask, granularity, compensation, name)
        sal_src = T if salience_from == "target" else finetuned.to(device=device, dtype=dtype)
        # docs/METHOD.md §4: salience once, from the original delta
        sal = compute_salience(V, sal_src, kind=salience)
        score = _Scorer(sal, V, None if factor is None else factor.U.diagonal(), alpha, sensitivity)
        keep = _first_mask(score, T, keep_mask, trivial, no_delta, timing, density, granularity, block_size)
        clock.lap("select")
        W_comp, keep = _decorate(V, T, keep, factor, score, compensation, timing, density, block_size, trivial)
        clock.lap("sweep")
        W_final, used, errors = _guard(V, T, W_comp, keep, factor, compensation, trivial, guard, name)
        clock.lap("guard")
    stats = _stats(base, keep, errors, used, compensation, "upfront" if trivial else timing, factor, clock, name)
    if not bool(torch.isfinite(W_final).all()):
        raise NumericalError(f"{name or 'tensor'}: tailored weight contains NaN or Inf", layer=name)
    # Cast on return; off-mask entries are taken from base itself, so they are bitwise base (docs/ARCHITECTURE.md).
    return TailoredWeight(weight=torch.where(keep, W_final.to(base.dtype), base), keep_mask=keep, stats=stats)


Tensor = torch.Tensor
_Errors = tuple[float | None, float | None]  # (error_masked, error_compensated)


def _check_options(
    density: float,
    alpha: float,
    block_size: int,
    compensation: str,
    granularity: str,
    sensitivity: str,
    mask_timing: str,
    salience_from: str,
    salience: str = "magnitude",
) -> None:
    _check_choice(compensation, COMPENSATIONS, "compensation")
    _check_choice(granularity, GRANULARITIES, "granularity")
    _check_choice(sensitivity, SENSITIVITY_KINDS, "sensitivity")
    _check_choice(mask_timing, MASK_TIMINGS, "mask_timing")
    _check_choice(salience_from, SALIENCE_SOURCES, "salience_from")
    _check_choice(salience, SALIENCE_KINDS, "salience")
    check_density(density)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")


def _trivial(
    V: Tensor,
    T: Tensor,
    hessian: Tensor | None,
    keep_mask: Tensor | None,
    density: float,
    alpha: float,
    compensation: str,
    name: str | None,
) -> tuple[bool, bool]:
    """``(trivial, no_delta)``; raises when a Hessian is needed and missing.

    Trivial cases need no Hessian: density 1 keeps everything (the full delta), and an all-zero delta (target
    == base) gives an empty patch rather than floor(rho*m) entries that change nothing.
    """
    all_kept = keep_mask is None and density == 1.0
    no_delta = keep_mask is None and not bool((T != V).any())
    trivial = all_kept or no_delta
    needs_h = not trivial and (compensation != "none" or (keep_mask is None and alpha < 1.0))
    if hessian is None and needs_h:
        raise ConfigError(f"{name or 'tensor'}: compensation={compensation!r} with alpha={alpha} needs a Hessian")
    return trivial, no_delta


def _timing(mask_timing: str, keep_mask: Tensor | None, granularity: str, compensation: str, name: str | None) -> str:
    """The timing that applies: ``fixed`` for a given mask; adaptive needs the sweep and block groups."""
    timing = "fixed" if keep_mask is not None else mask_timing
    if timing == "adaptive" and (granularity != "block" or compensation not in ("obs", "official")):
        logger.info("%s: mask_timing=adaptive needs the sweep and block groups; choosing the mask upfront", name)
        timing = "upfront"
    return timing


@dataclass(frozen=True)
class _Scorer:
    """Fused scores of one column block (docs/METHOD.md §4-§6) from its current weights ``W_block``."""

    sal: Tensor
    V: Tensor
    U_diag: Tensor | None
    alpha: float
    kind: str

    def __call__(self, W_block: Tensor, cols: slice) -> Tensor:
        if self.alpha == 1.0:
            return fuse_scores(self.sal[:, cols], self.sal[:, cols], 1.0)
        assert self.U_diag is not None  # alpha < 1 always has a factor (_trivial)
        sens = compute_sensitivity(W_block, self.U_diag[cols], base=self.V[:, cols], kind=self.kind)
        return fuse_scores(self.sal[:, cols], sens, self.alpha)


def _first_mask(
    score: _Scorer,
    T: Tensor,
    keep_mask: Tensor | None,
    trivial: bool,
    no_delta: bool,
    timing: str,
    density: float,
    granularity: str,
    block_size: int,
) -> Tensor | None:
    """The keep mask before the sweep: all or nothing when trivial, the given one, the target's best scores
    (upfront), or None for ``adaptive`` (the sweep chooses it block by block)."""
    if trivial:
        return torch.full(tuple(T.shape), not no_delta, dtype=torch.bool, device=T.device)
    if keep_mask is not None:
        return keep_mask.to(T.device)
    if timing != "upfront":
        return None
    cols = T.shape[1]
    scores = torch.empty_like(T)
    for b in range(0, cols, block_size):
        cs = slice(b, min(b + block_size, cols))
        scores[:, cs] = score(T[:, cs], cs)
    return select_keep_mask(scores, density, granularity=granularity, block_size=block_size)


def _decorate(
    V: Tensor,
    T: Tensor,
    keep: Tensor | None,
    factor: DampedFactor | None,
    score: _Scorer,
    compensation: str,
    timing: str,
    density: float,
    block_size: int,
    trivial: bool,
) -> tuple[Tensor, Tensor]:
    """``(W_comp, keep)``: the decorated weights and the final mask (an adaptive sweep chooses it)."""
    if trivial or compensation == "none":
        return torch.where(keep, T, V), keep
    assert factor is not None  # compensation other than "none" needs H (_trivial)
    if compensation == "exact":
        return exact_compensation(V, T, keep, factor.H_damped), keep

    # docs/METHOD.md §7 adaptive: each block's mask is chosen from W_bar inside the sweep (exact k per block).
    def adaptive(W_block: Tensor, cols: slice) -> Tensor:
        return select_keep_mask(score(W_block, cols), density, granularity="tensor")

    sign = -1 if compensation == "obs" else 1
    selector = adaptive if timing == "adaptive" else (lambda _w, cs: keep[:, cs])
    return obs_sweep(T, V, factor.U, selector, sign=sign, block_size=block_size)


def _guard(
    V: Tensor,
    T: Tensor,
    W_comp: Tensor,
    keep: Tensor,
    factor: DampedFactor | None,
    compensation: str,
    trivial: bool,
    guard: bool,
    name: str | None,
) -> tuple[Tensor, str, _Errors]:
    """``(W_final, used, errors)``: the masked weights win when they reconstruct better under H_tilde (D4)."""
    W_masked = torch.where(keep, T, V)
    error_masked = error_comp = None
    if factor is not None:
        error_masked = reconstruction_error(W_masked, T, factor.H_damped)
        error_comp = error_masked if compensation == "none" else reconstruction_error(W_comp, T, factor.H_damped)
    elif trivial:
        error_masked = error_comp = 0.0
    used = "none" if compensation == "none" or trivial else "compensated"
    if guard and used == "compensated" and error_comp is not None and error_comp > error_masked:
        logger.info("%s: guard kept the masked weights (error %.4g < decorated %.4g)", name, error_masked, error_comp)
        return W_masked, "masked", (error_masked, error_comp)
    return W_comp, used, (error_masked, error_comp)


def _stats(
    base: Tensor,
    keep: Tensor,
    errors: _Errors,
    used: str,
    compensation: str,
    timing: str,
    factor: DampedFactor | None,
    clock: _Clock,
    name: str | None,
) -> TailorStats:
    kept = int(keep.sum())
    return TailorStats(
        name=name,
        numel=base.numel(),
        kept=kept,
        density=kept / max(1, base.numel()),
        error_masked=errors[0],
        error_compensated=errors[1],
        used=used,
        compensation=compensation,
        mask_timing=timing,
        damping=factor.lam if factor is not None else None,
        seconds=clock.seconds,
    )
