"""Data-free baselines over task vectors (deltas): magnitude top-k, DARE, TIES, task arithmetic, WiSE-FT.

Every function is pure: tensors in, one merged delta out, so ``base + result`` is the baseline model. A
"task vector" here is ``delta = finetuned - base`` of one tensor. These are the methods Model Tailor is
compared against (docs/METHOD.md §18); the TailorBench runs them at the same densities as Model
Tailor. Maths runs in fp32 and the result is cast back to the delta's dtype.

References:
    magnitude top-k (data-free Localize-and-Stitch / Grafting): https://arxiv.org/abs/2408.13656
    DARE: https://arxiv.org/abs/2311.03099 · TIES: https://arxiv.org/abs/2306.01708
    task arithmetic: https://arxiv.org/abs/2212.04089 · WiSE-FT: https://arxiv.org/abs/2109.01903
    FAPM: https://arxiv.org/abs/2509.08255 · LiNeS: https://arxiv.org/abs/2410.17146 (ICLR 2025)

FAPM, LiNeS, the truncated-SVD patch and revert-first-k read more than the delta (the base tensor, the
parameter's layer index, the model depth); the registry passes those through :class:`BaselineParams`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model_tailor.errors import ConfigError
from model_tailor.kernel.masking import check_density, keep_count, top_k
from model_tailor.registry import Registry

__all__ = [
    "BASELINES",
    "BaselineFn",
    "BaselineParams",
    "SPARSE_BASELINES",
    "dare",
    "fapm",
    "fapm_scores",
    "layer_index",
    "lines",
    "lines_scale",
    "lowrank_rank",
    "magnitude_topk",
    "task_arithmetic",
    "revert_first_k",
    "svd_lowrank",
    "ties",
    "topk_mask",
    "wise_ft",
]


def _count(delta: torch.Tensor, density: float) -> int:
    """``floor(density * numel)`` entries of a whole tensor, with the baselines' absolute float tolerance."""
    return keep_count(density, delta.numel(), tolerance="absolute")


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep mask (True = kept) of the ``keep_count`` largest ``|delta|`` entries of the whole tensor.

    Ties are broken by position (the lower flat index wins), so the mask is deterministic with exactly k entries.
    """
    return top_k(delta.detach().reshape(-1).abs().float(), _count(delta, density)).reshape(delta.shape)


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
    k = _count(delta, density)
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


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Block index in a full HF parameter name (``model.language_model.layers.17.mlp.up_proj.weight`` -> 17);
    None for tensors outside the numbered blocks (embeddings, projector, final norm)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _keep_top(delta: torch.Tensor, score: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` on the ``keep_count`` highest scores (ties by position), zero elsewhere."""
    mask = top_k(score.reshape(-1), _count(delta, density)).reshape(delta.shape)
    return torch.where(mask, delta, torch.zeros_like(delta))


def fapm_scores(delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """FAPM's per-entry score ``|Δ| - mean(|W_pre|)·|Δ|/|W_pre|`` (mean over the whole matrix).

    A large change relative to a small pre-trained weight is penalised. Guards: an entry whose ``|W_pre|``
    is 0 has an infinite relative change, so a nonzero delta there scores ``-inf`` (kept last) and a zero
    one scores 0; a matrix whose ``|W_pre|`` is zero everywhere has no scale to compare with and scores
    ``|Δ|`` (plain magnitude).
    """
    if base.shape != delta.shape:
        raise ConfigError(f"fapm: base shape {tuple(base.shape)} != delta shape {tuple(delta.shape)}")
    dtype = torch.promote_types(torch.promote_types(delta.dtype, base.dtype), torch.float32)  # fp64 stays fp64
    d, w = delta.detach().to(dtype).abs(), base.detach().to(dtype).abs()
    mean = w.mean()
    if mean == 0:
        return d
    relative = torch.where(w > 0, d / w.clamp_min(torch.finfo(dtype).tiny), torch.where(d > 0, torch.inf, 0.0))
    return torch.where(relative.isinf(), -torch.inf, d - mean * relative)


def fapm(delta: torch.Tensor, base: torch.Tensor, density: float) -> torch.Tensor:
    """FAPM: keep the top-``density`` fraction of the delta by :func:`fapm_scores`, the rest reverted."""
    return _keep_top(delta, fapm_scores(delta, base), density)


def lines_scale(layer: int, num_layers: int, alpha: float = 0.0, beta: float = 1.0) -> float:
    """LiNeS scale of layer ``layer`` (0-based) of ``num_layers``: ``alpha + (beta - alpha)·layer/(L - 1)``.

    ``alpha`` scales the first layer's delta and ``beta`` the last one's (the paper writes
    ``λ(ℓ) = α + β'(ℓ-1)/(L-1)`` with 1-based ℓ, i.e. ``β' = beta - alpha``). Defaults 0 and 1: the shallowest
    update removed, the deepest kept whole, rising linearly in between.
    """
    if not 0 <= layer < num_layers:
        raise ConfigError(f"lines: layer {layer} outside a model of {num_layers} layers")
    return beta if num_layers == 1 else alpha + (beta - alpha) * layer / (num_layers - 1)


def lines(
    delta: torch.Tensor, layer: int | None, num_layers: int, *, alpha: float = 0.0, beta: float = 1.0
) -> torch.Tensor:
    """LiNeS: the delta of block ``layer`` scaled by :func:`lines_scale`; tensors outside the numbered blocks
    (``layer`` None: projector, embeddings) keep their whole delta."""
    if layer is None:
        return delta
    return (lines_scale(layer, num_layers, alpha, beta) * delta.float()).to(delta.dtype)


def lowrank_rank(rows: int, cols: int, density: float) -> int:
    """Rank whose factors fit the budget of ``density·rows·cols`` entries: ``floor(d·rows·cols/(rows+cols))``."""
    check_density(density)
    return min(rows, cols, int(density * rows * cols / (rows + cols) + 1e-9))


def svd_lowrank(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Data-free low-rank patch: the truncated SVD of the delta at :func:`lowrank_rank` (the best rank-r
    approximation in Frobenius norm, Eckart-Young). Tensors that are not matrices (norm gains, biases) have
    no rank structure and keep their top-``density`` entries by magnitude, the same budget."""
    if delta.ndim != 2:
        return magnitude_topk(delta, density)
    r = lowrank_rank(*delta.shape, density)
    if r == 0:
        return torch.zeros_like(delta)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(delta.dtype)


def revert_first_k(delta: torch.Tensor, layer: int | None, tuned_layers: Sequence[int], k: int) -> torch.Tensor:
    """Revert (zero the delta of) the ``k`` shallowest of ``tuned_layers``; every other tensor keeps its delta."""
    if k < 0:
        raise ConfigError(f"revert_first_k: k must be >= 0, got {k}")
    first = set(sorted(tuned_layers)[:k])
    return torch.zeros_like(delta) if layer in first else delta


# --- registry: one uniform signature so the CLI and the bench pick baselines by name -------------------


@dataclass(frozen=True)
class BaselineParams:
    """Parameters a baseline may read. ``density`` is required by sparse methods, ``scale`` by dense ones."""

    density: float | None = None
    scale: float | None = None
    seed: int = 0
    # read by the layer- and base-aware baselines (fapm, lines, revert_first_k); per tensor
    name: str | None = None  # the full HF parameter name (its layer index)
    base: torch.Tensor | None = None  # the pre-trained tensor (fapm)
    num_layers: int | None = None  # blocks in the model (lines)
    tuned_layers: tuple[int, ...] = ()  # block indices the fine-tune changed (revert_first_k)
    k: int | None = None  # layers reverted (revert_first_k)
    alpha: float = 0.0  # lines: scale of the first block's delta
    beta: float = 1.0  # lines: scale of the last block's delta


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


@BASELINES.register("fapm", reference="https://arxiv.org/abs/2509.08255")
def _fapm(deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None) -> torch.Tensor:
    """FAPM: top-k by |Δ| - mean(|W_pre|)·|Δ|/|W_pre| per matrix (needs the base tensor)."""
    if params.base is None:
        raise ConfigError("baseline 'fapm' needs the pre-trained tensor (BaselineParams.base) to score the delta")
    return fapm(_one("fapm", deltas), params.base, _need_density("fapm", params))


def _layer_of(name: str, params: BaselineParams) -> int | None:
    if params.name is None:
        raise ConfigError(f"baseline {name!r} needs the parameter name (BaselineParams.name) for its layer index")
    return layer_index(params.name)


@BASELINES.register("lines", reference="https://arxiv.org/abs/2410.17146")
def _lines(deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None) -> torch.Tensor:
    """LiNeS: each block's delta scaled linearly with depth, from alpha (first block) to beta (last)."""
    if params.num_layers is None:
        raise ConfigError("baseline 'lines' needs the model depth (BaselineParams.num_layers)")
    layer = _layer_of("lines", params)
    return lines(_one("lines", deltas), layer, params.num_layers, alpha=params.alpha, beta=params.beta)


@BASELINES.register("svd", reference="https://arxiv.org/abs/2106.09685")
def _svd(deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None) -> torch.Tensor:
    """Truncated SVD of the delta at the rank that fits density·rows·cols entries (data-free low-rank)."""
    return svd_lowrank(_one("svd", deltas), _need_density("svd", params))


@BASELINES.register("revert_first_k", reference="https://arxiv.org/abs/2410.17146")
def _revert_first_k(
    deltas: Sequence[torch.Tensor], params: BaselineParams, gen: torch.Generator | None
) -> torch.Tensor:
    """Revert the k shallowest tuned layers to the base, keep the rest of the fine-tune."""
    if params.k is None or not params.tuned_layers:
        raise ConfigError("baseline 'revert_first_k' needs k and the tuned layers (BaselineParams.k, .tuned_layers)")
    return revert_first_k(
        _one("revert_first_k", deltas), _layer_of("revert_first_k", params), params.tuned_layers, params.k
    )


SPARSE_BASELINES = frozenset({"magnitude", "dare", "random", "ties", "fapm"})
