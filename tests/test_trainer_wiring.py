"""The trainer's building blocks, each against what it must hand on or return: the run folder and
checkpoint a ``resume`` argument names, the one-line refusal of an unwritable folder on every rank,
the per-rank augmentation generator restored from a checkpoint, the host-side health check of a
step, the stop vote of the ranks, the identity a checkpoint must match, the pre-training split,
the non-finite message and the epoch line.

No training run here: the helpers are called directly (the collectives through a stand-in
``all_reduce`` that plays the other ranks), so each test takes milliseconds.
"""

from __future__ import annotations

import torch

import hardneg.train.trainer as trainer
from hardneg.distributed import DistContext

# -------------------------------------------------------------------- restore_rank_generator


def test_each_rank_gets_its_own_augmentation_state_back():
    """Every rank, not only rank 0: the row of a stacked checkpoint tensor is a view at an offset,
    and ``Generator.set_state`` of such a view crashed the process (segmentation fault, torch
    2.14) before the trainer copied the row."""
    states = torch.stack([torch.Generator().manual_seed(s).get_state() for s in (11, 12, 13)])
    for rank in range(3):
        generator = torch.Generator().manual_seed(99)
        ctx = DistContext(rank=rank, world_size=3, is_main=rank == 0)
        trainer.restore_rank_generator(states, generator, ctx)
        assert torch.equal(generator.get_state(), states[rank])


def test_another_number_of_ranks_reseeds_each_rank_from_the_global_generator():
    states = torch.stack([torch.Generator().manual_seed(s).get_state() for s in (11, 12)])
    seeds = []
    for rank in range(3):
        torch.manual_seed(5)  # the global generator, restored from the checkpoint before this
        expected = int(torch.randint(0, 2**62, ())) + rank
        torch.manual_seed(5)
        generator = torch.Generator().manual_seed(99)
        trainer.restore_rank_generator(states, generator, DistContext(rank=rank, world_size=3))
        assert generator.initial_seed() == expected
        seeds.append(generator.initial_seed())
    assert seeds[1] == seeds[0] + 1 and seeds[2] == seeds[0] + 2  # one stream per rank
