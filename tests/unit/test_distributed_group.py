"""The pieces of a multi-process run with known answers: the owner assignment, the batch split, Hessian sums over
ranks (sums and counts, not means) and the single-process group that touches nothing of torch.distributed.

Ranks are stood in for by threads sharing a barrier (:class:`ThreadRank`), so ``BlockHessians.merge`` runs its
real code against the one-process oracle without starting processes; tests/e2e/test_distributed.py runs gloo.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from model_tailor.errors import ConfigError, ShapeMismatchError
from model_tailor.kernel.hessian import HessianAccumulator
from model_tailor.pipeline.activations import BlockHessians
from model_tailor.pipeline.distributed import Group, assign_owners, is_primary, kernel_cost, open_group


class ThreadRank(Group):
    """Rank ``rank`` of ``world`` threads: gather and all-reduce through shared slots (a test double)."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier, slots: list) -> None:
        self.rank, self.world, self._barrier, self._slots = rank, world, barrier, slots

    def gather(self, obj):
        self._barrier.wait()
        self._slots[self.rank] = obj
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()
        return out

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        parts = self.gather([t.clone() for t in tensors])
        for i, t in enumerate(tensors):
            t.copy_(sum(p[i] for p in parts))


def _on_threads(world: int, work) -> list:
    barrier, slots, results, errors = threading.Barrier(world), [None] * world, [None] * world, []

    def run(rank: int) -> None:
        try:
            results[rank] = work(ThreadRank(rank, world, barrier, slots))
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def test_assign_owners_is_longest_first_onto_the_least_loaded_rank():
    # 5 -> r0; 3 -> r1; 3 -> r1 (3 < 5); 2 -> r0 (5 < 6); 2 -> r1 (6 < 7): loads 7 and 8
    assert assign_owners([5, 3, 3, 2, 2], 2) == [0, 1, 1, 0, 1]
    assert assign_owners([1, 1, 1], 2) == [0, 1, 0]  # ties: lower index first, onto the lower rank
    assert assign_owners([4, 9, 1], 1) == [0, 0, 0]
    assert assign_owners([], 3) == []


def test_kernel_cost_counts_one_factorisation_and_each_sweep():
    assert kernel_cost([(64, 32)]) == 32**3 + 64 * 32**2
    assert kernel_cost([(32, 32), (16, 32), (16, 32)]) == 32**3 + 64 * 32**2  # q/k/v share one factor
    assert kernel_cost([]) == 0


def test_single_process_group_is_the_identity(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with open_group("cpu") as group:
        assert type(group) is Group and group.primary and group.world == 1
        assert group.split([3, 1, 2]) == [3, 1, 2]
        assert group.owners([2.0, 1.0]) == [0, 0]
        assert group.broadcast("x") == "x" and group.exchange({1: "a"}) == {1: "a"}
        t = torch.ones(2)
        group.all_reduce_sum([t])
        assert torch.equal(t, torch.ones(2))
    assert not torch.distributed.is_initialized()


def test_split_takes_every_world_th_item():
    group = ThreadRank(1, 3, threading.Barrier(1), [None])
    assert group.split(list(range(7))) == [1, 4]


def test_is_primary_reads_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")
    assert is_primary()  # no WORLD_SIZE: one process, whatever RANK says
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not is_primary()
    monkeypatch.setenv("RANK", "0")
    assert is_primary()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        is_primary()


def test_accumulator_totals_add_up_to_the_whole():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    whole, a, b = HessianAccumulator(5), HessianAccumulator(5), HessianAccumulator(5)
    whole.add(torch.cat([x, y]))
    a.add(x)
    b.add(y)
    (sa, na), (sb, nb) = a.release_totals(), b.release_totals()
    torch.testing.assert_close(sa, 2 * x.T @ x)  # the raw sum 2 Σ x xᵀ, not the mean
    merged = HessianAccumulator.from_totals(sa + sb, na + nb, name="q")
    assert merged.n_tokens == 11 and merged.columns == 5
    torch.testing.assert_close(merged.hessian, whole.hessian)
    with pytest.raises(ShapeMismatchError, match="square fp32"):
        HessianAccumulator.from_totals(torch.zeros(2, 3), 1)


class _Pair(nn.Module):
    """Two linears reading one input (grouped) unless ``share`` is off (each its own copy: two groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.share = nn.Linear(4, 3), nn.Linear(4, 2), True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).sum() + self.b(x if self.share else x.clone()).sum()


def _hessians(block: _Pair, batches: list[torch.Tensor], group: Group | None = None) -> BlockHessians:
    stats = BlockHessians({"a": block.a, "b": block.b}, torch.device("cpu"))
    with torch.no_grad():
        for x in batches:
            stats.set_masks([])  # no padding: every row counts
            block(x)
            stats.end_batch()
    stats.stop()
    if group is not None:
        stats.merge(group)
    return stats


@pytest.mark.parametrize(
    ("shares", "split", "groups"),
    [
        ((True, True), ([0, 2], [1]), {"a": ["a", "b"]}),  # uneven shares, same grouping
        ((True, True), ([0, 1, 2], []), {"a": ["a", "b"]}),  # rank 1 ran no batch
        ((True, False), ([0, 2], [1]), {"a": ["a"], "b": ["b"]}),  # groupings differ: one Hessian per target
    ],
)
def test_merge_equals_one_process(shares, split, groups):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 4, generator=g) for _ in range(3)]
    torch.manual_seed(0)
    block = _Pair()
    oracle = _hessians(block, batches)

    def rank(group: ThreadRank) -> BlockHessians:
        mine = copy.deepcopy(block)
        mine.share = shares[group.rank]
        return _hessians(mine, [batches[i] for i in split[group.rank]], group)

    for stats in _on_threads(2, rank):
        assert stats.groups == groups
        for name in ("a", "b"):
            assert stats.n_tokens(name) == oracle.n_tokens(name) == 9
            torch.testing.assert_close(stats.hessian(name), oracle.hessian(name), rtol=1e-6, atol=1e-6)
