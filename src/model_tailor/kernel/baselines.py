"""Data-free baselines over task vectors (deltas): magnitude top-k, DARE, TIES, task arithmetic, WiSE-FT.

Every function is pure: tensors in, one merged delta out, so ``base + result`` is the baseline model. A
"task vector" here is ``delta = finetuned - base`` of one tensor. These are the methods Model Tailor is
compared against (METHOD.md §14, ANCHORS.md §1); the TailorBench runs them at the same densities as Model
Tailor. Maths runs in fp32 and the result is cast back to the delta's dtype.

References:
    magnitude top-k (data-free Localize-and-Stitch / Grafting): https://arxiv.org/abs/2408.13656
    DARE: https://arxiv.org/abs/2311.03099 · TIES: https://arxiv.org/abs/2306.01708
    task arithmetic: https://arxiv.org/abs/2212.04089 · WiSE-FT: https://arxiv.org/abs/2109.01903
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model_tailor.errors import ConfigError
from model_tailor.registry import Registry

__all__ = [
    "BASELINES",
    "BaselineFn",
    "BaselineParams",
    "SPARSE_BASELINES",
    "dare",
    "keep_count",
    "magnitude_topk",
    "task_arithmetic",
    "ties",
    "topk_mask",
    "wise_ft",
]


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}; it is the fraction of the delta KEPT")


def keep_count(numel: int, density: float) -> int:
    """Exactly ``floor(density * numel)`` entries are kept (METHOD §16 D9), computed without float drift."""
    _check_density(density)
    return min(numel, int(density * numel + 1e-9))


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep mask (True = kept) of the ``keep_count`` largest ``|delta|`` entries of the whole tensor.

    Ties are broken by position (stable sort), so the mask is deterministic and has exactly k entries.
    """
    k = keep_count(delta.numel(), density)
    flat = delta.detach().reshape(-1).abs().float()
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=delta.device)
    mask[order] = True
    return mask.reshape(delta.shape)


def magnitude_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top-``density`` fraction of the delta by magnitude and revert the rest to zero.

    This is the data-free mask of Localize-and-Stitch and the paper's "top-s magnitude" baseline.
    """
    return torch.where(topk_mask(delta, density), delta, torch.zeros_like(delta))


def dare(
    delta: torch.Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep a uniformly random ``density`` fraction of the delta, optionally rescaled by ``1/density``.

    Exactly ``keep_count`` entries are kept (a random top-k instead of i.i.d. Bernoulli drops) so the
    patch size matches the other sparse methods at the same density. The rescale keeps the expected delta
    unchanged; without it the method is plain random sparsification. Randomness comes only from
    ``generator`` (seed it for reproducibility; one generator is consumed tensor by tensor).
    """
    k = keep_count(delta.numel(), density)
    perm = torch.randperm(delta.numel(), generator=generator, device="cpu")[:k].to(delta.device)
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[perm] = True
    kept = torch.where(mask.reshape(delta.shape), delta.float(), torch.zeros((), device=delta.device))
    if rescale:
        kept = kept / density
    return kept.to(delta.dtype)


def ties(
    deltas: Sequence[torch.Tensor],
    density: float,
    *,
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES-Merging: trim each task vector to its top-k, elect a sign per entry by mass, disjoint mean.

    Steps (Yadav et al. 2023): (1) trim every delta to its ``density`` largest magnitudes; (2) elect the
    sign of the (weighted) sum of the trimmed deltas; (3) average, per entry, only the trimmed values that
    agree with the elected sign (divided by their count, as in the reference code; entries with no agreeing
    value stay at zero); (4) multiply by ``scale``. With one task this degenerates to magnitude top-k.
    """
    if not deltas:
        raise ConfigError("ties needs at least one delta")
    w = [1.0] * len(deltas) if weights is None else list(weights)
    if len(w) != len(deltas):
        raise ConfigError(f"ties: {len(w)} weights for {len(deltas)} deltas; give one weight per delta")
    trimmed = torch.stack([wi * magnitude_topk(d, density).float() for wi, d in zip(w, deltas, strict=True)])
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return (scale * total / count).to(deltas[0].dtype)


def task_arithmetic(deltas: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """Task arithmetic: ``scale * sum(deltas)`` (Ilharco et al. 2023); one task gives a scaled delta."""
    if not deltas:
        raise ConfigError("task_arithmetic needs at least one delta")
    total = torch.stack([d.float() for d in deltas]).sum(dim=0)
    return (scale * total).to(deltas[0].dtype)


def wise_ft(delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """WiSE-FT: ``(1 - alpha) * base + alpha * finetuned`` expressed over the delta, i.e. ``alpha * delta``."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"wise_ft alpha must be in [0, 1], got {alpha}")
    return (alpha * delta.float()).to(delta.dtype)


# --- registry: one uniform signature so the CLI and the bench pick baselines by name -------------------


@dataclass(frozen=True)
class BaselineParams:
    """Parameters a baseline may read. ``density`` is required by sparse methods, ``scale`` by dense ones."""

    density: float | None = None
    scale: float | None = None
    seed: int = 0


BaselineFn = Callable[[Sequence[torch.Tensor], BaselineParams, "torch.Generator | None"], torch.Tensor]
BASELINES: Registry[BaselineFn] = Registry("baseline")


def _need_density(name: str, params: BaselineParams) -> float:
    if params.density is None:
        raise ConfigError(f"baseline {name!r} needs a density (fraction of the delta kept), e.g. --density 0.1")
    return params.density


def _one(name: str, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(deltas) != 1:
        raise ConfigError(f"baseline {name!r} takes exactly one fine-tuned model, got {len(deltas)}")
    return deltas[0]


@BASELINES.register("magnitude", reference="https://arxiv.org/abs/2408.13656")
def _magnitude(deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None) -> torch.Tensor:
    """Magnitude top-k of the delta (Grafting / Localize-and-Stitch, data-free)."""
    return magnitude_topk(_one("magnitude", deltas), _need_density("magnitude", params))


@BASELINES.register("dare", reference="https://arxiv.org/abs/2311.03099")
def _dare(deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None) -> torch.Tensor:
    """DARE: random top-k of the delta, rescaled by 1/density."""
    return dare(_one("dare", deltas), _need_density("dare", params), rescale=True, generator=gen)


@BASELINES.register("random", reference="https://arxiv.org/abs/2311.03099")
def _random(deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None) -> torch.Tensor:
    """Random top-k of the delta without rescale (DARE's drop step alone)."""
    return dare(_one("random", deltas), _need_density("random", params), rescale=False, generator=gen)


@BASELINES.register("ties", reference="https://arxiv.org/abs/2306.01708")
def _ties(deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None) -> torch.Tensor:
    """TIES: trim to top-k, elect sign, disjoint mean (degenerates to magnitude top-k for one model)."""
    scale = 1.0 if params.scale is None else params.scale
    return ties(deltas, _need_density("ties", params), scale=scale)


@BASELINES.register("task_arithmetic", reference="https://arxiv.org/abs/2212.04089")
def _task_arithmetic(
    deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None
) -> torch.Tensor:
    """Task arithmetic: scale times the sum of the deltas."""
    if params.scale is None:
        raise ConfigError("baseline 'task_arithmetic' needs a scale, e.g. --scale 0.5")
    return task_arithmetic(deltas, params.scale)


@BASELINES.register("wise_ft", reference="https://arxiv.org/abs/2109.01903")
def _wise_ft(deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None) -> torch.Tensor:
    """WiSE-FT: linear interpolation base -> fine-tuned with alpha = scale."""
    if params.scale is None:
        raise ConfigError("baseline 'wise_ft' needs an interpolation alpha, e.g. --scale 0.5")
    return wise_ft(_one("wise_ft", deltas), params.scale)


SPARSE_BASELINES = frozenset({"magnitude", "dare", "random", "ties"})
