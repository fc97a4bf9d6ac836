"""How torchrun's ranks share one process's batches (utils/runtime/distributed.py's samplers), in this process:
every size of dataset, global batch and world, against RandomSampler's and the plain loader's batches."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from utils.runtime.distributed import GlobalBatchSampler, WholeBatchSampler

SIZES = list(itertools.product(range(31), range(1, 10), range(1, 5)))  # N samples, global batch B, W ranks


def _one_process_batches(num_samples: int, global_batch: int, seed: int) -> list[list[int]]:
    torch.manual_seed(seed)
    if num_samples == 0:
        return []
    return list(BatchSampler(RandomSampler(range(num_samples)), global_batch, drop_last=False))


def _rank_batches(num_samples: int, global_batch: int, size: int, seed: int) -> list[GlobalBatchSampler]:
    """Each rank's sampler, with the batches it drew from the global RNG seeded alike on every rank."""
    samplers = []
    for rank in range(size):
        sampler = GlobalBatchSampler(range(num_samples), global_batch, rank, size)
        torch.manual_seed(seed)
        sampler.drawn = list(sampler)
        samplers.append(sampler)
    return samplers


def _check_step(samplers: list[GlobalBatchSampler], step: int, batch: list[int]) -> None:
    """The ranks' real samples of ``step``, interleaved, are ``batch`` in order; the mean over the ranks
    of their summed weights is 1 (the batch mean); a rank without a real sample takes one of the
    batch with weight 0."""
    size = len(samplers)
    interleaved: list[int | None] = [None] * len(batch)
    total_weight = 0.0
    for rank, sampler in enumerate(samplers):
        share, rank_batch = sampler.share(step), sampler.drawn[step]
        weights = share.loss_weights(size)
        assert share.global_count == len(batch) and len(weights) == len(rank_batch) >= 1
        if share.positions:
            assert weights == [size / len(batch)] * len(rank_batch)
            interleaved[rank::size] = rank_batch  # rank r holds positions r, r + W, ... of the batch
        else:
            assert weights == [0.0] and rank_batch == [batch[0]]
        total_weight += sum(weights)
    assert interleaved == batch
    assert math.isclose(total_weight / size, 1.0)


def test_the_ranks_real_samples_at_each_step_are_the_one_process_batch_and_weigh_its_mean():
    for num_samples, global_batch, size in SIZES:
        single = _one_process_batches(num_samples, global_batch, seed=num_samples)
        samplers = _rank_batches(num_samples, global_batch, size, seed=num_samples)
        for sampler in samplers:  # every rank takes as many steps: DDP's all-reduce needs them all
            assert len(sampler.drawn) == len(sampler) == math.ceil(num_samples / global_batch) == len(single)
        for step, batch in enumerate(single):
            _check_step(samplers, step, batch)


def test_whole_batches_share_the_unshuffled_batches_out_among_the_ranks():
    for num_samples, batch_size, size in SIZES:
        single = list(BatchSampler(SequentialSampler(range(num_samples)), batch_size, drop_last=False))
        per_rank = [list(WholeBatchSampler(range(num_samples), batch_size, rank, size)) for rank in range(size)]
        assert [len(b) for b in per_rank] == [len(s) for s in (single[r::size] for r in range(size))]
        for rank, batches in enumerate(per_rank):
            assert batches == single[rank::size], (num_samples, batch_size, size, rank)
            assert len(WholeBatchSampler(range(num_samples), batch_size, rank, size)) == len(batches)


def test_the_mean_of_the_ranks_weighted_gradients_is_the_one_process_gradient():
    """What DDP averages, done by hand on a linear model: the one-process batch gradient, for every
    step of sizes that leave remainders (a last batch of 1 sample among 3 ranks, included)."""
    for num_samples, global_batch, size in [(11, 8, 2), (13, 8, 2), (25, 8, 2), (10, 3, 3), (7, 6, 4), (1, 5, 3)]:
        torch.manual_seed(0)
        inputs, labels = torch.randn(num_samples, 5, dtype=torch.float64), torch.randint(0, 3, (num_samples,))
        weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        single = _one_process_batches(num_samples, global_batch, seed=2)
        samplers = _rank_batches(num_samples, global_batch, size, seed=2)
        for step, batch in enumerate(single):
            (expected,) = torch.autograd.grad(F.cross_entropy(inputs[batch] @ weight.T, labels[batch]), weight)
            mean = torch.zeros_like(weight)
            for sampler in samplers:
                rank_batch = sampler.drawn[step]
                weights = torch.tensor(sampler.share(step).loss_weights(size), dtype=torch.float64)
                per_sample = F.cross_entropy(inputs[rank_batch] @ weight.T, labels[rank_batch], reduction="none")
                mean += torch.autograd.grad((per_sample * weights).sum(), weight)[0] / size
            torch.testing.assert_close(mean, expected, rtol=1e-12, atol=1e-12)


def test_the_permutation_is_drawn_from_the_global_rng_as_random_sampler_draws_it():
    """The next draw after an epoch is the same as after one process's epoch (the RNG a checkpoint keeps)."""
    torch.manual_seed(3)
    list(RandomSampler(range(17)))
    after_one_process = torch.rand(2)
    torch.manual_seed(3)
    list(GlobalBatchSampler(range(17), 4, 1, 2))
    assert torch.equal(torch.rand(2), after_one_process)
