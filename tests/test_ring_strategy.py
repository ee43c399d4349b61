"""Ring (``ring``) through the public API against float64 loops of its band: per anchor, the
negatives sorted by decreasing similarity, ranks ``[L, U)`` kept with ``U = int(rho_out M)``,
``L = int(rho_in U)``. Written for mutation testing (docs/testing.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hardneg


def z(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def band_loss(q, k, negatives, t, lower, upper):
    """Mean over anchors of ``logsumexp({a_i} + ranks [lower, upper) of c_i) - a_i``, with
    ``negatives`` ``[N, M, d]`` (each anchor's own) in float64, differentiable."""
    qn, kn, nn = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(negatives, dim=-1)
    terms = []
    for i in range(q.shape[0]):
        a = (qn[i] * kn[i]).sum() / t
        c = sorted((nn[i] @ qn[i] / t).unbind(), key=lambda x: float(x.detach()), reverse=True)
        terms.append(torch.logsumexp(torch.stack([a, *c[lower:upper]]), dim=0) - a)
    return torch.stack(terms).mean()


@pytest.mark.parametrize(
    "options, band",
    [
        (dict(lower=25.0, upper=75.0), (3, 9)),  # rho_out 0.75, rho_in 1/3 of M = 12
        (dict(rho_out=1.0, rho_in=0.0), (0, 12)),  # the whole pool (InfoNCE)
        (dict(lower=25.0, upper=75.0, num_samples=4), (3, 9)),  # IR-Ring
    ],
)
def test_the_diagnostics_report_the_ranks_of_the_band(options, band):
    q, k, pool = z(3, 4, seed=1), z(3, 4, seed=2), z(12, 4, seed=3)
    loss = hardneg.create_loss("ring", temperature=0.5, **options)
    summary = loss(q, k, negatives=pool, return_diagnostics=True).diagnostics.summary()
    assert (summary["ring_lower"], summary["ring_upper"]) == (float(band[0]), float(band[1]))


def test_with_duplicates_each_anchor_keeps_the_band_of_its_own_count_and_reports_no_single_band():
    ids = torch.tensor([0, 0, 1, 2])  # samples 0 and 1: 4 negatives each (of 8 views), else 6
    loss = hardneg.create_loss("ring", temperature=0.5, rho_out=0.5, rho_in=0.25)
    out = loss(z(4, 3, seed=18), z(4, 3, seed=19), ids=ids, return_diagnostics=True)
    # U = int(0.5 M), L = int(0.25 U) = 0: 2 of 4 and 3 of 6
    assert out.diagnostics.kept_negatives.tolist() == [2, 2, 3, 3, 2, 2, 3, 3]
    assert "ring_lower" not in out.diagnostics.summary()


@pytest.mark.parametrize(
    "anneal, band",
    [
        # progress 0.2 of until 0.5: 0.4 of the way from 1 to 0.25
        ("linear", (2, 8)),  # rho_out = 1 - 0.75 * 0.4 = 0.7: U = int(8.4) = 8, L = int(2.0)
        ("staircase", (2, 9)),  # stair floor(0.4 * 4) = 1 of 0..3: rho_out = 1 - 0.75 / 3 = 0.75
    ],
)
def test_an_annealed_ring_takes_the_band_of_the_scheduled_rho_out_at_the_given_progress(
    anneal, band
):
    q, k, pool, t = z(3, 4, seed=4), z(3, 4, seed=5), z(12, 4, seed=6), 0.5
    options = dict(rho_out=0.25, rho_in=0.25, anneal=anneal, anneal_until=0.5, anneal_steps=4)
    loss = hardneg.create_loss("ring", temperature=t, **options)
    expected = band_loss(q, k, pool.expand(3, 12, 4), t, *band)
    assert loss(q, k, negatives=pool, progress=0.2).item() == pytest.approx(
        expected.item(), rel=1e-10
    )


def test_ir_ring_over_the_whole_pool_still_draws_its_samples():
    q, k, pool, t = z(4, 3, seed=7), z(4, 3, seed=8), z(5, 3, seed=9), 0.5
    loss = hardneg.create_loss("ring", temperature=t, rho_out=1.0, rho_in=0.0, num_samples=1)
    out = loss(
        q, k, negatives=pool, generator=torch.Generator().manual_seed(0), return_diagnostics=True
    )
    qn, kn, pn = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(pool, dim=-1)
    for i in range(4):  # one drawn negative: the loss of {a_i, c_ij} for one of the 5
        a = float(qn[i] @ kn[i]) / t
        singles = [math.log(math.exp(a) + math.exp(float(qn[i] @ pn[j]) / t)) - a for j in range(5)]
        assert min(abs(out.per_anchor[i].item() - s) for s in singles) < 1e-10


def test_ring_over_a_pool_per_anchor_has_the_values_and_gradients_of_the_float64_band():
    q, k, negatives, t = z(3, 4, seed=10), z(3, 4, seed=11), z(3, 10, 4, seed=12), 0.5
    q.requires_grad_(True)
    k.requires_grad_(True)
    loss = hardneg.create_loss("ring", temperature=t, rho_out=0.5, rho_in=0.4)  # ranks [2, 5)
    value = loss(q, k, negatives=negatives)
    got = torch.autograd.grad(value, (q, k))
    expected = band_loss(q, k, negatives, t, 2, 5)
    want = torch.autograd.grad(expected, (q, k))
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_the_jsd_objective_averages_the_softplus_over_the_band():
    q, k, pool, t = z(3, 4, seed=13), z(3, 4, seed=14), z(10, 4, seed=15), 0.5
    qn, kn, pn = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(pool, dim=-1)
    expected = []
    for i in range(3):  # ranks [2, 5) of 10 (rho_out 0.5, rho_in 0.4)
        a = float(qn[i] @ kn[i]) / t
        band = sorted((float(qn[i] @ pn[j]) / t for j in range(10)), reverse=True)[2:5]
        e_neg = sum(math.log1p(math.exp(c)) for c in band) / 3 - math.log(2)
        expected.append(e_neg - (math.log(2) - math.log1p(math.exp(-a))))
    loss = hardneg.create_loss("ring", temperature=t, rho_out=0.5, rho_in=0.4, objective="jsd")
    assert loss(q, k, negatives=pool).item() == pytest.approx(sum(expected) / 3, rel=1e-10)


def test_only_ir_ring_draws_and_its_step_count_and_duplicates_are_checked():
    assert hardneg.create_loss("ring").draws is False
    assert hardneg.create_loss("ring", num_samples=4).draws is True
    with pytest.raises(ValueError, match=r"^anneal_steps must be an integer, got 2\.5$"):
        hardneg.create_loss("ring", anneal="staircase", anneal_steps=2.5)


def in_batch_negatives(z1, z2, ids, t):
    """``(a [2N], c [2N][...])``: SimCLR's positive and negative logits with duplicates out
    (a float64 loop over the ``2N`` views; ``ids`` equal = neither)."""
    views = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    pos, negs = [], []
    for i in range(2 * n):
        pos.append(float(views[i] @ views[(i + n) % (2 * n)]) / t)
        negs.append(
            [float(views[i] @ views[j]) / t for j in range(2 * n) if ids[j % n] != ids[i % n]]
        )
    return pos, negs


def test_ir_ring_with_a_count_per_anchor_draws_each_row_s_band():
    """Duplicates (``ids``) give anchors different numbers of negatives: each row draws from
    its own band ``[int(rho_in U_i), U_i)``, ``U_i = int(rho_out M_i)``. It was refused
    (``num_samples needs the same number ...``), which refused every text batch with masks."""
    z1, z2, t = z(5, 3, seed=16), z(5, 3, seed=17), 0.5
    ids = [0, 0, 1, 2, 3]  # anchors of sample 0 or 1: 6 negatives, the others 8
    pos, negs = in_batch_negatives(z1, z2, ids, t)
    gen = torch.Generator().manual_seed(0)
    # a band of one rank (U = 1): every draw is the hardest negative, S times
    one = hardneg.create_loss("ring", temperature=t, rho_out=0.01, num_samples=3)
    out = one(z1, z2, ids=torch.tensor(ids), generator=gen, return_diagnostics=True)
    for i, (a, c) in enumerate(zip(pos, negs)):
        want = math.log(math.exp(a) + 3 * math.exp(max(c))) - a
        assert out.per_anchor[i].item() == pytest.approx(want, rel=1e-10)
    # a wider band: each anchor's loss lies between S draws of its band's softest and hardest
    wide = hardneg.create_loss("ring", temperature=t, rho_out=1.0, rho_in=0.5, num_samples=2)
    out = wide(z1, z2, ids=torch.tensor(ids), generator=gen, return_diagnostics=True)
    for i, (a, c) in enumerate(zip(pos, negs)):
        ranked = sorted(c, reverse=True)
        band = ranked[int(0.5 * len(c)) : len(c)]
        low, high = (math.log(math.exp(a) + 2 * math.exp(x)) - a for x in (min(band), max(band)))
        assert low - 1e-10 <= out.per_anchor[i].item() <= high + 1e-10
