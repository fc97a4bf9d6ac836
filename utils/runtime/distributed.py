"""Several processes, one per device, launched by ``torchrun`` (as pytorch/examples' ImageNet and nanoGPT).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); a plain ``python3 main.py``
has none of them and runs as one process, exactly as without this module. Everything here is
PyTorch's own machinery: ``torch.distributed`` with ``nccl`` on GPUs and ``gloo`` on the CPU and its
collectives; there is no launcher, rendezvous or all-reduce of our own. The samplers at the end share out
one process's batches among the ranks, each sample once, so that a torchrun job computes what one
process computes, up to the order of float sums, at any dataset size.

Rank 0 alone writes files; the others wait at a barrier. What rank 0 decides about the files (an
error, say, that the models folder holds another run) reaches every rank, so that every rank stops
with the same one line.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import RandomSampler, Sampler

from utils import UserError

T = TypeVar("T")
# How long a rank waits for the others at a collective: rank 0 writing an AlexNet checkpoint takes seconds;
# a rank that waits this long has lost the others.
TIMEOUT = datetime.timedelta(minutes=10)
# How long a rank that stops on an error waits for the others to reach their own error line (see
# linger_after_error): the spread of the ranks' start-up, with room for a loaded machine.
ERROR_LINGER = datetime.timedelta(seconds=30)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: how many times torchrun restarted the group

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes the files (rank 0)."""
        return self.rank == 0


def from_environment(environ: dict[str, str] | None = None) -> World:
    """The World torchrun describes in the environment; World() for a plain process."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return World()
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank, restart = int(env.get("LOCAL_RANK", rank)), int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
    except ValueError as err:
        raise UserError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({err})") from None
    if not 0 <= rank < size or local_rank < 0:
        raise UserError(f"RANK {rank}, LOCAL_RANK {local_rank} and WORLD_SIZE {size} are inconsistent")
    return World(rank, local_rank, size, restart)


def start(world: World, use_gpu: bool) -> torch.device:
    """The device of this rank, with the process group joined under torchrun."""
    if use_gpu:
        if not torch.cuda.is_available():
            raise UserError(
                "--use_gpu was given but CUDA is not available on this machine; drop the flag to train on the CPU"
            )
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"--use_gpu: local rank {world.local_rank} needs GPU {world.local_rank}, but this node has "
                f"{torch.cuda.device_count()}; start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(world.local_rank)
    device = torch.device("cuda", world.local_rank) if use_gpu else torch.device("cpu")
    if world.distributed and not dist.is_initialized():
        _join(world, "nccl" if use_gpu else "gloo", device if use_gpu else None)
    return device


def linger_after_error() -> None:
    """Before a rank exits on an error, under torchrun: count itself on torchrun's store and wait until
    every rank has (at most ERROR_LINGER), then return. torchrun stops the other ranks as soon as one
    exits, which would cut off their own error line whenever they reached it a moment later (a slower
    import, say). A rank that fails alone waits ERROR_LINGER; a no-op in one process."""
    try:
        world = from_environment()
    except UserError:
        return  # the environment itself is the error: there is no store to count on
    if not world.distributed:
        return
    deadline = time.monotonic() + ERROR_LINGER.total_seconds()
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=ERROR_LINGER))
        stopped = dist.PrefixStore(f"mas/attempt_{world.restart}/stopped_on_an_error", store)
        arrived = stopped.add("ranks", 1)
        while arrived < world.size and time.monotonic() < deadline:
            time.sleep(0.05)
            arrived = stopped.add("ranks", 0)
    except (RuntimeError, ValueError, OSError):
        pass  # no store to reach (torchrun is already stopping the group): exit at once


def _join(world: World, backend: str, device: torch.device | None) -> None:
    """init_process_group over torchrun's store (env://), with the keys of each torchrun attempt apart:
    after a restart the store may still hold the addresses the dead workers published."""
    store, rank, size = next(dist.rendezvous("env://", timeout=TIMEOUT))
    store = dist.PrefixStore(f"mas/attempt_{world.restart}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT, device_id=device)


def lost_a_rank(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank stopped or vanished."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return (
        active()
        and isinstance(err, RuntimeError)
        and any(
            mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "Gloo", "gloo", "NCCL")
        )
    )


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several ranks (a process group is joined)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes files and prints progress (rank 0, or the only process)."""
    return not active() or dist.get_rank() == 0


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model for training: DistributedDataParallel over the ranks (gradients averaged in the
    backward pass, so every rank's optimizer takes the same step), or the model itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    if active():
        dist.barrier()


def sum_(tensors: list[torch.Tensor]) -> None:
    """Sum every tensor over the ranks, in place (a no-op in one process)."""
    if active():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` in one process)."""
    if not active():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def on_writer(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only; every rank gets its result, or raises its UserError."""
    if not active():
        return work()
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", work())]
        except UserError as err:
            outcome = [("error", str(err))]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    return value


@dataclass(frozen=True)
class StepShare:
    """One rank's part of one global batch: its real positions in the epoch's permutation and the
    number of real samples of the whole global batch (the one-process batch)."""

    positions: range
    global_count: int

    def loss_weights(self, size: int) -> list[float]:
        """The per-sample weights of the rank's batch: ``size / global_count`` for a real sample, so that
        DDP's mean over the ranks of the weighted sums is the one-process batch mean; a rank without a
        real sample still takes one (the batch's first) with weight 0, since every rank joins every
        all-reduce."""
        if not self.positions:
            return [0.0]
        return [size / self.global_count] * len(self.positions)


def step_share(num_samples: int, global_batch: int, step: int, rank: int, size: int) -> StepShare:
    """Rank ``rank``'s part of global step ``step``: positions rank, rank + size, ... of the global batch
    (positions [step * global_batch, step * global_batch + n) of the permutation, n <= global_batch)."""
    first = step * global_batch
    last = min(first + global_batch, num_samples)
    return StepShare(range(first + rank, last, size), last - first)


class GlobalBatchSampler(Sampler[list[int]]):
    """Training batches under torchrun: one permutation, drawn from the global RNG exactly as
    RandomSampler draws it (every rank seeds it alike), cut into the one-process batches of
    ``global_batch``; rank r takes positions r, r + size, ... of each. So the ranks' union at each step
    is the one-process batch, no sample is repeated, and every rank takes ceil(N / global_batch) steps
    (with one weight-0 sample where the last batch holds fewer samples than ranks: see StepShare)."""

    def __init__(self, data_source, global_batch: int, rank: int, size: int) -> None:
        self.data_source, self.global_batch, self.rank, self.size = data_source, global_batch, rank, size

    def __len__(self) -> int:
        return math.ceil(len(self.data_source) / self.global_batch)

    def share(self, step: int) -> StepShare:
        return step_share(len(self.data_source), self.global_batch, step, self.rank, self.size)

    def __iter__(self) -> Iterator[list[int]]:
        # RandomSampler refuses an empty dataset; it draws nothing then
        order = list(RandomSampler(self.data_source)) if len(self.data_source) else []
        for step in range(len(self)):
            positions = self.share(step).positions or [step * self.global_batch]
            yield [order[p] for p in positions]


class WholeBatchSampler(Sampler[list[int]]):
    """The importance pass and the tests under torchrun: the one-process batches of ``batch_size`` over
    the dataset in order, rank r taking batches r, r + size, ... whole. Every sample counts once, and
    an estimator that depends on a batch's composition (the authors' MAS) sees one process's batches;
    a rank may get no batch at all."""

    def __init__(self, data_source, batch_size: int, rank: int, size: int) -> None:
        self.length, self.batch_size, self.rank, self.size = len(data_source), batch_size, rank, size

    def _starts(self) -> range:
        return range(self.rank * self.batch_size, self.length, self.size * self.batch_size)

    def __len__(self) -> int:
        return len(self._starts())

    def __iter__(self) -> Iterator[list[int]]:
        for start in self._starts():
            yield list(range(start, min(start + self.batch_size, self.length)))


def step_shares(loader) -> Callable[[int], StepShare] | None:
    """``share(step)`` of a training loader under torchrun (GlobalBatchSampler); None in one process."""
    sampler = getattr(loader, "batch_sampler", None)
    return sampler.share if isinstance(sampler, GlobalBatchSampler) else None
