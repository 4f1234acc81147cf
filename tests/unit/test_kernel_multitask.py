"""The joint multi-task objective as one target and one Hessian (docs/METHOD.md §12), on tiny fp64 tensors.

Oracles: the dense joint patch (density 1) is the direct least-squares solution of sum_t ||(W - W_t) X_t||^2
(damped or not); identical tasks give exactly the single task's target and Hessian; re-decorating a combined
patch on its union mask never reconstructs the tasks worse than the combination alone.
"""

from __future__ import annotations

import pytest
import torch

from model_tailor.errors import ConfigError, ShapeMismatchError
from model_tailor.kernel.hessian import factor_hessian
from model_tailor.kernel.multitask import combine_targets, joint_error, prefer_reference
from model_tailor.kernel.tailor import tailor_weight
from model_tailor.patch.combine import combine_tensor
from model_tailor.patch.model import TensorPatch

ROWS, COLS = 5, 6


def _task(g: torch.Generator, base: torch.Tensor, tokens: int, scale: float):
    """A fine-tune of ``base`` and its inputs X (cols, tokens), with H = (2/N) X X^T as the accumulator keeps it."""
    W = base + 0.3 * torch.randn(base.shape, generator=g, dtype=torch.float64)
    X = scale * torch.randn(COLS, tokens, generator=g, dtype=torch.float64)
    X[1] = X[0] + 0.1 * X[1]  # correlated inputs: the Hessians are far from diagonal
    return W, X, (2.0 / tokens) * X @ X.T


def _tasks(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(ROWS, COLS, generator=g, dtype=torch.float64)
    tasks = [_task(g, base, tokens=8 + 5 * i, scale=1.0 + i) for i in range(n)]
    return base, tasks


def _least_squares(tasks, lam: float) -> torch.Tensor:
    """argmin_W (1/T) sum_t (2/N_t) ||(W - W_t) X_t||^2 + lam ||W - W_t||^2, as one stacked lstsq problem."""
    cols, rhs = [], []
    for W, X, _ in tasks:
        A = torch.cat([(2.0 / X.shape[1]) ** 0.5 * X, lam**0.5 * torch.eye(COLS, dtype=X.dtype)], dim=1)
        cols.append(A)
        rhs.append(W @ A)
    A, B = torch.cat(cols, dim=1), torch.cat(rhs, dim=1)
    return torch.linalg.lstsq(A.T, B.T).solution.T


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("percdamp", [0.0, 0.05])
def test_dense_joint_patch_is_the_least_squares_solution(seed, percdamp):
    base, tasks = _tasks(seed)
    Ws, Hs = [w for w, _, _ in tasks], [h for _, _, h in tasks]
    target, H = combine_targets(base, Ws, Hs, percdamp=percdamp)
    lam = factor_hessian(H, percdamp=percdamp).lam
    assert lam == pytest.approx(percdamp * float(H.diagonal().mean()))
    torch.testing.assert_close(H, sum(Hs) / len(Hs))
    expected = _least_squares(tasks, lam)
    torch.testing.assert_close(target, expected, rtol=1e-9, atol=1e-10)
    dense = tailor_weight(base, target, H, density=1.0, percdamp=percdamp, block_size=4)
    torch.testing.assert_close(dense.weight, expected, rtol=1e-9, atol=1e-10)
    # The exact decorator at density 1 with a full mask lands on the same optimum.
    full = tailor_weight(base, target, H, keep_mask=torch.ones(ROWS, COLS, dtype=torch.bool), compensation="exact")
    torch.testing.assert_close(full.weight, expected, rtol=1e-9, atol=1e-10)


def test_identical_tasks_give_exactly_the_single_task():
    base, tasks = _tasks(3, n=1)
    W, _, H = tasks[0]
    for copies in (1, 2, 3):
        target, H_joint = combine_targets(base, [W] * copies, [H] * copies)
        assert torch.equal(target, W) and torch.equal(H_joint, H), copies


def test_a_task_without_data_constrains_nothing():
    base, tasks = _tasks(4, n=2)
    (W1, _, H1), (W2, _, H2) = tasks
    target, _ = combine_targets(base, [W1, W2], [H1, torch.zeros_like(H2)], percdamp=0.0)
    torch.testing.assert_close(target, W1, rtol=1e-8, atol=1e-9)  # H1 has full rank: W1 is the only optimum


def test_bad_inputs_are_one_line_errors():
    base, tasks = _tasks(5, n=2)
    Ws, Hs = [w for w, _, _ in tasks], [h for _, _, h in tasks]
    with pytest.raises(ConfigError, match="2 fine-tuned weights but 1 Hessians"):
        combine_targets(base, Ws, Hs[:1])
    with pytest.raises(ConfigError, match="at least one"):
        combine_targets(base, [], [])
    with pytest.raises(ShapeMismatchError, match="task 1 weight"):
        combine_targets(base, [Ws[0], Ws[1][:, :3]], Hs)
    with pytest.raises(ShapeMismatchError, match="task 0 Hessian"):
        combine_targets(base, Ws, [Hs[0][:3, :3], Hs[1]])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("compensation", ["exact", "obs"])
def test_redecorating_a_combination_never_reconstructs_worse(seed, compensation):
    """combine (disjoint mean of per-task patches) vs the same union mask re-decorated against the combined
    target: the re-decorated weights never have a higher joint error (the damped objective the kernel
    minimises)."""
    base, tasks = _tasks(10 + seed, n=2)
    Ws, Hs = [w for w, _, _ in tasks], [h for _, _, h in tasks]
    name = "w"
    parts = []
    for W, H in zip(Ws, Hs, strict=True):
        res = tailor_weight(base, W, H, density=0.4, block_size=3, granularity="row")
        parts.append(TensorPatch.from_weights(name, base.float(), res.weight.float(), res.keep_mask))
    combined, _ = combine_tensor(parts, policy="disjoint-mean")
    idx = combined.indices.long()
    W_combined = base.clone().reshape(-1)
    W_combined[idx] += combined.values.to(torch.float64)
    W_combined = W_combined.reshape(ROWS, COLS)
    union = torch.zeros(ROWS * COLS, dtype=torch.bool)
    union[idx] = True
    union = union.reshape(ROWS, COLS)
    target, H = combine_targets(base, Ws, Hs)
    lam = factor_hessian(H).lam
    redecorated = tailor_weight(base, target, H, keep_mask=union, compensation=compensation, block_size=3).weight
    final, _, error = prefer_reference(redecorated, W_combined, target, H)
    assert torch.equal(final[~union], base[~union])  # off the union mask: base, bit for bit
    assert joint_error(final, Ws, Hs, lam=lam) <= joint_error(W_combined, Ws, Hs, lam=lam) * (1 + 1e-12)
    if compensation == "exact":  # the exact solve is the optimum on the mask: strictly better unless equal
        assert joint_error(redecorated, Ws, Hs, lam=lam) <= joint_error(W_combined, Ws, Hs, lam=lam) * (1 + 1e-12)
    assert error >= 0


def test_prefer_reference_keeps_the_better_of_the_two():
    base, tasks = _tasks(7, n=1)
    W, _, H = tasks[0]
    worse = W + 1.0
    out, won, _ = prefer_reference(worse, W, W, H)
    assert won and torch.equal(out, W)
    out, won, _ = prefer_reference(W, worse, W, H)
    assert not won and torch.equal(out, W)
