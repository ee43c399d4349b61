"""The potential strategy against the first implementation (``_potential_reference``, float32,
grid layout): the same values and gradients in expected mode, in-batch and with a bank, and the
same draws wherever both draw the same grids in the same order (a bank; in-batch without
``L_aug``, which the strategy draws once for both directions)."""

from __future__ import annotations

import pytest
import torch
from _potential_reference import ReferencePotentialLoss

import hardneg


def inputs(n, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=g)
    proj = torch.randn(2, n, d, generator=g)
    bank = torch.randn(30, d, generator=g)
    return z1, z2, proj, bank


def run(new, hp, with_bank, z1, z2, proj, bank, seed=5):
    """Loss and gradients (z1, z2, proj1, proj2) of one call of the strategy or the reference."""
    leaves = [t.clone().requires_grad_(True) for t in (z1, z2, proj[0], proj[1])]
    a, b, p1, p2 = leaves
    generator = torch.Generator().manual_seed(seed)
    negatives = bank if with_bank else None
    if new:
        # the plain form draws the reference's grid (the fast path: same law, other draws)
        loss = hardneg.create_loss("potential", fast=False, **hp)(
            a, b, negatives, h1=p1, h2=None if with_bank else p2, generator=generator
        )
    else:
        loss = ReferencePotentialLoss(**hp)(
            a, b, negatives, proj1=p1, proj2=p2, generator=generator
        )
    loss.backward()
    return loss.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def assert_same(got, want, rtol=1e-5):
    for x, y in zip([got[0], *got[1]], [want[0], *want[1]]):
        scale = float(y.abs().max().clamp_min(1.0))
        assert float((x - y).abs().max()) <= rtol * scale


def hyper(**over):
    hp = dict(num_neighbors=4, aug_weight=0.7, a=2.0, b=0.1, clamp=0.95, sample="expected")
    hp.update(over)
    return hp


@pytest.mark.parametrize("with_bank", [False, True])
@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("select_on, aug_pairing", [("cosine", "matched"), ("raw", "broadcast")])
@pytest.mark.parametrize("temperature", [0.3, 0.02])
def test_expected_mode_equals_the_first_implementation(
    with_bank, weighting, select_on, aug_pairing, temperature
):
    hp = hyper(
        weighting=weighting, select_on=select_on, aug_pairing=aug_pairing, temperature=temperature
    )
    data = inputs(9, seed=1)
    assert_same(run(True, hp, with_bank, *data), run(False, hp, with_bank, *data))


@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("pool_as_negatives", [False, True])
@pytest.mark.parametrize("select_on, aug_pairing", [("cosine", "matched"), ("raw", "broadcast")])
def test_drawn_with_a_bank_takes_the_same_draws(
    weighting, pool_as_negatives, select_on, aug_pairing
):
    hp = hyper(
        temperature=0.2,
        num_neighbors=3,
        aug_weight=0.5,
        a=1.5,
        b=0.0,
        clamp=0.9,
        weighting=weighting,
        sample="bernoulli",
        select_on=select_on,
        aug_pairing=aug_pairing,
        pool_as_negatives=pool_as_negatives,
    )
    data = inputs(10, seed=2)
    assert_same(run(True, hp, True, *data), run(False, hp, True, *data))


@pytest.mark.parametrize("weighting", ["hard", "soft"])
def test_drawn_in_batch_without_aug_takes_the_same_draws(weighting):
    hp = hyper(
        temperature=0.2, num_neighbors=3, aug_weight=0.0, a=1.5, clamp=0.9, sample="bernoulli"
    )
    hp.update(weighting=weighting)
    data = inputs(10, seed=3)
    assert_same(run(True, hp, False, *data), run(False, hp, False, *data))
