"""Several processes (``torchrun --nproc-per-node N``): the calibration batches split across ranks, the Hessians
summed, each block's kernel calls shared out (docs/METHOD.md §9 "Several processes").

The scheme is the data-parallel one of GPTQ-style calibration tools: each rank runs the forward passes of its share
of the batches and accumulates its Hessians; their raw sums and token counts are added over the ranks, so every
rank holds the single-process Hessians up to fp32 summation order. Each block's kernel calls (one per shared-input
group) go to owner ranks, the costliest first onto the least loaded rank; the tailored tensors and their records
are then gathered onto every rank, so all ranks replay the same tailored block on their own batches. Rank 0 alone
writes outputs.

:class:`Group` is one process: every operation is the identity and nothing of ``torch.distributed`` is called, so
the pipeline calls the same methods either way. :class:`TorchGroup` talks to the other ranks; every collective
starts with a check that no rank has failed, and :meth:`Group.guard` announces a local exception there, so all
ranks stop with that error instead of one waiting for a partner that has gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from model_tailor.errors import ConfigError, ModelTailorError, RankError

__all__ = ["Group", "TorchGroup", "assign_owners", "is_primary", "kernel_cost", "open_group"]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None


def is_primary() -> bool:
    """Whether this process prints and writes: rank 0 of a multi-process run, or the only process."""
    return _env_int("WORLD_SIZE", 1) <= 1 or _env_int("RANK", 0) == 0


def kernel_cost(shapes: Sequence[tuple[int, int]]) -> float:
    """Cost of one kernel call on weights of ``(rows, cols)`` ``shapes`` sharing one input: one ``cols³``
    factorisation and a ``rows · cols²`` OBS sweep per weight (docs/METHOD.md §8); only the ratios matter."""
    if not shapes:
        return 0.0
    cols = shapes[0][1]
    return float(cols**3 + sum(rows * c * c for rows, c in shapes))


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """The owner rank of each item: the costliest first onto the least loaded rank (greedy longest-first, ties to
    the lower index and the lower rank). Deterministic, so every rank computes the same answer."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


class Group:
    """The processes of one run; this base class is the single process (rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def primary(self) -> bool:
        """Rank 0: the one that writes outputs and prints."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this rank computes on, given the run's ``--device``."""
        return device

    def split(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (every ``world``-th, from ``rank``)."""
        return list(items[self.rank :: self.world])

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The owner rank of each of a block's work items (:func:`assign_owners`)."""
        return assign_owners(costs, self.world)

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """Add each tensor over the ranks, in place."""

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order."""
        return [obj]

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def exchange(self, mine: dict[K, V]) -> dict[K, V]:
        """The union of every rank's ``mine`` (disjoint keys)."""
        merged: dict[K, V] = {}
        for part in self.gather(mine):
            merged.update(part)
        return merged

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around a rank's whole run: an exception is announced to the other ranks before it propagates."""
        yield


class TorchGroup(Group):
    """A rank of a ``torch.distributed`` process group (NCCL on CUDA, gloo otherwise)."""

    def __init__(self, dist: Any, local_rank: int, comm_device: torch.device) -> None:
        self._dist, self._local, self._comm = dist, local_rank, comm_device
        self.rank, self.world = int(dist.get_rank()), int(dist.get_world_size())

    def device(self, device: torch.device) -> torch.device:
        """``--device cuda`` is this rank's GPU (``LOCAL_RANK``); a device with an index is taken as given."""
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self._local)
        return device

    def _check(self, error: BaseException | None = None) -> None:
        """The collective every other one starts with: did any rank fail? A failed rank passes its ``error`` and
        then re-raises it; the others raise :class:`~model_tailor.errors.RankError` with the first one's line."""
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=self._comm)
        self._dist.all_reduce(flag)
        if int(flag.item()) == 0:
            return
        notes: list[Any] = [None] * self.world
        self._dist.all_gather_object(notes, None if error is None else _note(error))
        # One more all-reduce, so no rank leaves (and closes its sockets) while another is still inside the
        # two-step all_gather_object: teardown then starts from the same point as after a run that succeeded.
        self._dist.all_reduce(flag)
        if error is None:
            rank, (message, code) = next((r, n) for r, n in enumerate(notes) if n is not None)
            raise RankError(rank, message, code)

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        self._check()
        for t in tensors:
            self._dist.all_reduce(t)

    def gather(self, obj: T) -> list[T]:
        self._check()
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        self._check()
        box = [obj if self.rank == 0 else None]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except RankError:  # another rank's failure, already known to all
            raise
        except BaseException as err:
            self._check(err)
            raise
        self._check()  # a rank that finished waits here for the others' last word


def _note(err: BaseException) -> tuple[str, int]:
    """One line and an exit code for another rank's error (the CLI's own rendering of it)."""
    message = " ".join(str(err).split())
    if isinstance(err, ModelTailorError):
        return message, err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", 130
    return f"{type(err).__name__}: {message}", 1


@contextmanager
def open_group(device: str) -> Iterator[Group]:
    """The process group torchrun's environment asks for (``WORLD_SIZE`` > 1), else the single process (nothing
    of ``torch.distributed`` is touched).

    The backend is NCCL when the run is on CUDA, gloo otherwise; rendezvous through torchrun's ``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE``. A group the caller already initialised is used and left open; one
    made here is destroyed at the end."""
    if _env_int("WORLD_SIZE", 1) <= 1:
        yield Group()
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    local = _env_int("LOCAL_RANK", 0)
    created = not dist.is_initialized()
    if created:
        # torch.distributed.nn.functional binds ``group.WORLD`` as a default argument when it is imported; imported
        # after init (transformers' import of FSDP does that), it keeps the group alive past destroy_process_group,
        # and gloo's worker threads then die during interpreter shutdown (SIGABRT). Imported first, it binds None.
        import torch.distributed.nn.functional  # noqa: F401

        nccl = device.startswith("cuda") and torch.cuda.is_available()
        if nccl:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if nccl else "gloo")
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    try:
        yield TorchGroup(dist, local, comm)
    finally:
        if created:
            dist.destroy_process_group()
