"""The losses equal their published definitions: reference libraries, the authors' formulas, and
hand-written O(N^2) definitions, in value and gradient.

References re-typed here from the equations (docs/methods.md), never imported from the authors:
* InfoNCE / NT-Xent: lightly's ``NTXentLoss`` and pytorch-metric-learning's ``NTXentLoss``.
* Debiased (Chuang et al. 2020) and HCL (Robinson et al. 2021, joshr17/HCL ``image/main.py``).
* MoCo-Ring / IR-Ring (Wu et al. 2021, mhw32/contrastive-ring-public ``src/objectives``) and the
  annealing policies of its ``src/utils/policy.py``.
* UnReMix (reconstruction): influence scores against explicitly materialised outer-product
  gradients computed with ``torch.autograd``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hardneg
from hardneg.contrast import in_batch_contrast, pool_contrast
from hardneg.schedules import hcl_beta_down, ring_rho_out
from hardneg.strategies import StepContext, UnReMixNegatives, ring_band

TOL = dict(rtol=1e-5, atol=1e-5)


def views(n=16, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=g, dtype=dtype)  # correlated, like two views
    return z1.requires_grad_(), z2.requires_grad_()


def queue(k=64, d=8, seed=1):
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


def value_and_grads(fn, *tensors):
    """Loss value and gradients w.r.t. ``tensors`` (fresh leaves, so calls do not interfere)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def assert_same(ours, ref, tol=TOL):
    (lo, go), (lr, gr) = ours, ref
    torch.testing.assert_close(lo.double(), lr.double(), **tol)
    for a, b in zip(go, gr):
        torch.testing.assert_close(a.double(), b.double(), **tol)


# ---------------------------------------------------------------- reference formulas (float64)


def simclr_logits(z1, z2, t):
    """``[2N, 2N]`` cosine / t of the SimCLR set-up and the positive index of every row."""
    out = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    pos_index = (torch.arange(2 * n) + n) % (2 * n)
    return out @ out.T / t, pos_index


def simclr_pos_and_negs(z1, z2, t):
    """``pos`` ``[2N]`` and the ``2N - 2`` negative logits of every row, self and positive removed."""
    logits, pos_index = simclr_logits(z1, z2, t)
    rows = torch.arange(logits.shape[0])
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[rows, rows] = False
    keep[rows, pos_index] = False
    return logits[rows, pos_index], logits[keep].view(logits.shape[0], -1)


def moco_pos_and_negs(q, k, pool, t):
    q = F.normalize(q.double(), dim=1)
    k = F.normalize(k.double(), dim=1)
    pool = F.normalize(pool.double(), dim=1)
    return (q * k).sum(1) / t, q @ pool.T / t


def hcl_formula(pos_logit, neg_logits, t, tau_plus, beta):
    """HCL ``'hard'`` estimator with the authors' ``imp.mean`` normalisation (methods.md, sec. 1).

    ``neg = e^{s/t}``, ``imp = neg^beta``, ``reweight = sum(imp * neg) / mean(imp)``,
    ``Ng = max((reweight - tau+ M pos) / (1 - tau+), M e^{-1/t})``, ``l = -log(pos / (pos + Ng))``.
    """
    pos, neg = pos_logit.exp(), neg_logits.exp()
    m = neg.shape[1]
    imp = neg**beta
    reweight = (imp * neg).sum(dim=1) / imp.mean(dim=1)
    ng = (reweight - tau_plus * m * pos) / (1 - tau_plus)
    ng = torch.clamp(ng, min=m * math.exp(-1 / t))
    return (-torch.log(pos / (pos + ng))).mean()


def debiased_formula(pos_logit, neg_logits, t, tau_plus):
    """Chuang et al. 2020: ``Ng = max((sum neg - tau+ M pos) / (1 - tau+), M e^{-1/t})``."""
    pos, neg = pos_logit.exp(), neg_logits.exp()
    m = neg.shape[1]
    ng = torch.clamp(
        (neg.sum(dim=1) - tau_plus * m * pos) / (1 - tau_plus), min=m * math.exp(-1 / t)
    )
    return (-torch.log(pos / (pos + ng))).mean()


def ring_formula(pos_logit, neg_logits, rho_out, rho_in, draw=None):
    """MoCo-Ring: sort descending, ``U = int(rho_out K)``, ``L = int(rho_in U)``, ring = ranks
    ``[L, U)``, the positive stays in the partition; IR-Ring: ``draw`` picks ring members."""
    k = neg_logits.shape[1]
    ranked = torch.sort(neg_logits, dim=1, descending=True).values
    upper = int(rho_out * k)
    lower = int(rho_in * upper)
    ring = ranked[:, lower:upper]
    if draw is not None:
        ring = ring.gather(1, draw)
    partition = torch.logsumexp(torch.cat([pos_logit.unsqueeze(1), ring], dim=1), dim=1)
    return (partition - pos_logit).mean()


# ------------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("t", [0.05, 0.1, 0.5, 1.0])
def test_infonce_equals_lightly_ntxent(t):
    from lightly.loss import NTXentLoss

    z1, z2 = views(n=24, d=16)
    ours = value_and_grads(hardneg.create_loss("infonce", temperature=t), z1, z2)
    # lightly averages the cross-entropy over the 2N anchors of both directions, as we do
    ref = value_and_grads(NTXentLoss(temperature=t, memory_bank_size=0), z1, z2)
    assert_same(ours, ref)


@pytest.mark.parametrize("t", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [2, 32, 64])
def test_infonce_equals_pytorch_metric_learning_ntxent(t, n):
    from pytorch_metric_learning.losses import NTXentLoss

    z1, z2 = views(n=n, d=16, seed=n)
    labels = torch.arange(n).repeat(2)

    def pml(a, b):
        # PML averages over its positive pairs: (i, i+N) and (i+N, i), i.e. the 2N anchors
        return NTXentLoss(temperature=t)(torch.cat([a, b]), labels)

    ours = value_and_grads(hardneg.create_loss("infonce", temperature=t), z1, z2)
    assert_same(ours, value_and_grads(pml, z1, z2))


@pytest.mark.parametrize("t", [0.07, 0.2])
def test_infonce_with_queue_equals_moco_cross_entropy(t):
    q, k = views(n=16, d=8)
    pool = queue(k=128)

    def moco(q, k):
        pos, negs = moco_pos_and_negs(q, k, pool, t)
        logits = torch.cat([pos.unsqueeze(1), negs], dim=1)
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))

    loss_fn = hardneg.create_loss("infonce", temperature=t)
    ours = value_and_grads(lambda a, b: loss_fn(a, b, negatives=pool), q, k)
    assert_same(ours, value_and_grads(moco, q, k))


# ---------------------------------------------------------------------- debiased and HCL


@pytest.mark.parametrize("tau_plus", [0.0, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_debiased_equals_chuang_formula(tau_plus, t):
    z1, z2 = views(n=16, d=8, seed=3)
    loss_fn = hardneg.create_loss("debiased", temperature=t, tau_plus=tau_plus)

    def ref(a, b):
        pos, negs = simclr_pos_and_negs(a, b, t)
        return debiased_formula(pos, negs, t, tau_plus)

    assert_same(value_and_grads(loss_fn, z1, z2), value_and_grads(ref, z1, z2))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0, 6.0])
@pytest.mark.parametrize("tau_plus", [0.0, 0.1])
@pytest.mark.parametrize("t", [0.2, 0.5])
def test_hcl_equals_authors_formula(beta, tau_plus, t):
    z1, z2 = views(n=16, d=8, seed=4)
    loss_fn = hardneg.create_loss("hcl", temperature=t, tau_plus=tau_plus, beta=beta)

    def ref(a, b):
        pos, negs = simclr_pos_and_negs(a, b, t)
        return hcl_formula(pos, negs, t, tau_plus, beta)

    assert_same(value_and_grads(loss_fn, z1, z2), value_and_grads(ref, z1, z2))


def test_hcl_clamp_is_active_and_matches_the_formula():
    # almost identical views and a large class prior drive Ng to its floor M e^{-1/t}
    z1, _ = views(n=8, d=8, seed=5)
    z2 = (z1.detach() + 1e-3).requires_grad_()
    t, tau_plus = 0.5, 0.9
    pos, negs = simclr_pos_and_negs(z1.detach(), z2.detach(), t)
    raw = ((negs.exp() * negs.exp()).sum(1) / negs.exp().mean(1) - tau_plus * 14 * pos.exp()) / (
        1 - tau_plus
    )
    assert bool((raw < 14 * math.exp(-1 / t)).any()), "the set-up must hit the clamp"
    loss_fn = hardneg.create_loss("hcl", temperature=t, tau_plus=tau_plus, beta=1.0)

    def ref(a, b):
        pos, negs = simclr_pos_and_negs(a, b, t)
        return hcl_formula(pos, negs, t, tau_plus, 1.0)

    assert_same(value_and_grads(loss_fn, z1, z2), value_and_grads(ref, z1, z2))


def test_hcl_with_beta0_taup0_equals_infonce():
    z1, z2 = views(n=16, d=8, seed=6)
    hcl = hardneg.create_loss("hcl", temperature=0.3, tau_plus=0.0, beta=0.0)
    infonce = hardneg.create_loss("infonce", temperature=0.3)
    assert_same(
        value_and_grads(hcl, z1, z2), value_and_grads(infonce, z1, z2), dict(rtol=0, atol=1e-6)
    )


def test_hcl_with_tau_plus_zero_equals_debiased_with_tau_plus_zero_at_beta0():
    z1, z2 = views(n=16, d=8, seed=7)
    hcl = hardneg.create_loss("hcl", temperature=0.5, tau_plus=0.1, beta=0.0)
    debiased = hardneg.create_loss("debiased", temperature=0.5, tau_plus=0.1)
    assert_same(value_and_grads(hcl, z1, z2), value_and_grads(debiased, z1, z2))


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
def test_hcl_detached_weights_match_the_formula_with_imp_detached(beta):
    z1, z2 = views(n=12, d=8, seed=8)
    t, tau_plus = 0.5, 0.1
    loss_fn = hardneg.create_loss(
        "hcl", temperature=t, tau_plus=tau_plus, beta=beta, detach_weights=True
    )

    def ref(a, b):
        pos, negs = simclr_pos_and_negs(a, b, t)
        pos_e, neg = pos.exp(), negs.exp()
        imp = neg.detach() ** beta
        ng = ((imp * neg).sum(1) / imp.mean(1) - tau_plus * neg.shape[1] * pos_e) / (1 - tau_plus)
        ng = torch.clamp(ng, min=neg.shape[1] * math.exp(-1 / t))
        return (-torch.log(pos_e / (pos_e + ng))).mean()

    assert_same(value_and_grads(loss_fn, z1, z2), value_and_grads(ref, z1, z2))


@pytest.mark.parametrize("beta,tau_plus", [(0.0, 0.0), (1.0, 0.1), (2.0, 0.05)])
def test_hcl_with_a_queue_equals_the_formula_over_the_queue(beta, tau_plus):
    q, k = views(n=16, d=8, seed=9)
    pool = queue(k=96)
    t = 0.2
    loss_fn = hardneg.create_loss("hcl", temperature=t, tau_plus=tau_plus, beta=beta)

    def ref(a, b):
        pos, negs = moco_pos_and_negs(a, b, pool, t)
        return hcl_formula(pos, negs, t, tau_plus, beta)

    ours = value_and_grads(lambda a, b: loss_fn(a, b, negatives=pool), q, k)
    assert_same(ours, value_and_grads(ref, q, k))


def test_memory_bank_exclude_index_drops_the_anchors_own_entry():
    q, k = views(n=8, d=8, seed=10)
    bank = queue(k=40)
    own = torch.arange(8) * 5
    t, tau_plus, beta = 0.2, 0.1, 1.0
    loss_fn = hardneg.create_loss("hcl", temperature=t, tau_plus=tau_plus, beta=beta)

    def ref(a, b):
        pos, negs = moco_pos_and_negs(a, b, bank, t)
        keep = torch.ones_like(negs, dtype=torch.bool)
        keep[torch.arange(8), own] = False
        return hcl_formula(pos, negs[keep].view(8, -1), t, tau_plus, beta)

    ours = value_and_grads(lambda a, b: loss_fn(a, b, negatives=bank, exclude_index=own), q, k)
    assert_same(ours, value_and_grads(ref, q, k))


# ------------------------------------------------------------------------------------ Ring


@pytest.mark.parametrize(
    "k,rho_out,rho_in",
    [
        (4096, 0.1, 0.1),
        (1000, 0.3, 0.2),
        (257, 0.5, 0.0),
        (64, 0.25, 0.5),
        (5000, 0.9, 0.1),
        (3000, 1.0, 0.1),
    ],
)
def test_moco_ring_equals_reference_over_a_queue(k, rho_out, rho_in):
    q, key = views(n=16, d=16, seed=11)
    pool = queue(k=k, d=16, seed=12)
    t = 0.07
    loss_fn = hardneg.create_loss("ring", temperature=t, rho_out=rho_out, rho_in=rho_in)

    def ref(a, b):
        pos, negs = moco_pos_and_negs(a, b, pool, t)
        return ring_formula(pos, negs, rho_out, rho_in)

    ours = value_and_grads(lambda a, b: loss_fn(a, b, negatives=pool), q, key)
    assert_same(ours, value_and_grads(ref, q, key))


@pytest.mark.parametrize(
    "n,rho_out,rho_in",
    [(32, 0.5, 0.1), (64, 0.1, 0.1), (16, 0.3, 0.3), (32, 0.9, 0.2), (600, 0.1, 0.1)],
)
def test_simclr_ring_masks_self_and_positive_then_takes_the_band(n, rho_out, rho_in):
    z1, z2 = views(n=n, d=8, seed=13)
    t = 0.1
    loss_fn = hardneg.create_loss("ring", temperature=t, rho_out=rho_out, rho_in=rho_in)

    def ref(a, b):
        pos, negs = simclr_pos_and_negs(a, b, t)  # M = 2N - 2 negatives per anchor
        return ring_formula(pos, negs, rho_out, rho_in)

    assert_same(value_and_grads(loss_fn, z1, z2), value_and_grads(ref, z1, z2))


def logits_contrast(x):
    """A contrast set whose negative logits are ``x`` (one positive of logit 0 per row)."""
    from hardneg.contrast import ContrastSet

    a = x.shape[0]
    finite = torch.isfinite(x)
    return ContrastSet(
        anchors=torch.zeros(a, 1),
        columns=torch.zeros(x.shape[1], 1),
        anchor_columns=None,
        positives=torch.zeros(a, 1, 1),
        positive_logits=torch.zeros(a, 1),
        positive_weight=torch.ones(a, 1),
        positive_index=None,
        negative_logits=x,
        negative_mask=finite,
        num_negatives=finite.sum(dim=1),
        temperature=1.0,
    )


@pytest.mark.parametrize("ties", [False, True])
def test_plain_ring_keeps_the_ranks_lower_to_upper_of_each_row(ties):
    from hardneg.strategies.ring import RingNegatives

    x = torch.randn(6, 3000, generator=torch.Generator().manual_seed(30))
    if ties:
        x = x.round(decimals=1)
    x[0, :5] = float("-inf")  # absent candidates rank last and do not count in M
    ranked = x.sort(dim=1, descending=True).values
    m = torch.isfinite(x).sum(dim=1)
    for rho_out, rho_in in [(1 / 3000, 0.0), (0.1, 0.0), (0.1, 0.1), (0.1, 0.999), (0.997, 0.034)]:
        ring = RingNegatives(rho_out=rho_out, rho_in=rho_in)
        log_w = ring.select(logits_contrast(x), StepContext(fast=False)).negative_log_weights
        kept = torch.isfinite(log_w)
        for row in range(6):
            lower, upper = ring_band(int(m[row]), rho_out, rho_in)
            assert int(kept[row].sum()) == upper - lower
            got = x[row][kept[row]].sort(descending=True).values
            torch.testing.assert_close(got, ranked[row, lower:upper], rtol=0, atol=0)


@pytest.mark.parametrize("ties", [False, True, "in one block"])
def test_fast_band_indices_keep_exactly_the_ranks_lower_to_upper(ties):
    from hardneg.fastpaths import band_indices, top_k_indices

    # 300 rows of 3000: several blocks of integer keys; zeros of both signs tie as floats
    x = torch.randn(300, 3000, generator=torch.Generator().manual_seed(31))
    if ties == "in one block":  # equal values at the edges in rows 200-209 only
        x[200:210] = x[200:210].round(decimals=1)
    elif ties:
        x = x.round(decimals=1)
        x[:, ::7] = -0.0
    x[0, :5] = float("-inf")
    ranked = x.sort(dim=1, descending=True).values
    for lower, upper in [(0, 1), (30, 300), (299, 300), (100, 2990)]:
        top = top_k_indices(x, upper)
        assert all(len(set(row.tolist())) == upper for row in top[:20])
        got = x.gather(1, top).sort(dim=1, descending=True).values
        torch.testing.assert_close(got, ranked[:, :upper], rtol=0, atol=0)
        band = band_indices(x, lower, upper)
        assert band.shape == (300, upper - lower)
        assert all(len(set(row.tolist())) == upper - lower for row in band[:20])
        kept = x.gather(1, band).sort(dim=1, descending=True).values
        torch.testing.assert_close(kept, ranked[:, lower:upper], rtol=0, atol=0)


@pytest.mark.parametrize("columns", [600, 2000])  # torch.topk and numpy selection paths
def test_ring_top_k_ranks_every_nan_highest_and_signed_zeros_by_their_order_keys(columns):
    from hardneg.fastpaths import _NUMPY_MIN_COLUMNS, top_k_indices

    assert (columns >= _NUMPY_MIN_COLUMNS) == (columns == 2000)
    # order as torch.topk / torch.sort (the plain form's argsort): a NaN of either sign >
    # +inf > 2 > 0.5 > +0.0 > -0.0 > -0.5 > -1 (the order keys alone would rank the NaN
    # with its sign bit set last)
    x = torch.full((5, columns), -1.0)
    nan = float("nan")
    x[:, :8] = torch.tensor([0.5, -0.5, 2.0, nan, -nan, float("inf"), 0.0, -0.0])
    assert x[0, 4].view(torch.int32) < 0  # the sign bit of -nan is set
    for k, expected in [(2, [3, 4]), (5, [0, 2, 3, 4, 5]), (7, [0, 2, 3, 4, 5, 6, 7])]:
        assert top_k_indices(x, k).sort(dim=1).values.tolist() == [expected] * 5
        assert x.topk(k, dim=1).indices.sort(dim=1).values.tolist() == [expected] * 5


@pytest.mark.parametrize("pooled", [False, True])
def test_ring_numpy_selection_matches_the_torch_topk_selection(pooled, monkeypatch):
    import hardneg.fastpaths as fastpaths

    z1, z2 = views(n=600 if not pooled else 64, d=16, seed=35)
    pool = queue(k=4096, d=16) if pooled else None
    loss_fn = hardneg.create_loss("ring", temperature=0.1)
    run = lambda a, b: loss_fn(a, b, negatives=pool)  # noqa: E731
    numpy_path = value_and_grads(run, z1, z2)
    monkeypatch.setattr(fastpaths, "_BAND_MIN_COLUMNS", 1 << 30)
    torch_path = value_and_grads(run, z1, z2)
    assert_same(numpy_path, torch_path, tol=dict(rtol=0, atol=1e-6))


@pytest.mark.parametrize("pooled", [False, True])
def test_ring_fast_path_equals_the_plain_band_in_value_and_gradient(pooled):
    z1, z2 = views(n=150, d=12, seed=32)
    pool = queue(k=700, d=12) if pooled else None
    losses = {
        fast: hardneg.create_loss("ring", temperature=0.2, rho_out=0.3, rho_in=0.2, fast=fast)
        for fast in (True, False)
    }
    assert_same(
        value_and_grads(lambda a, b: losses[True](a, b, negatives=pool), z1, z2),
        value_and_grads(lambda a, b: losses[False](a, b, negatives=pool), z1, z2),
        tol=dict(rtol=1e-6, atol=1e-7),
    )


@pytest.mark.parametrize("band", [dict(rho_out=0.9, rho_in=0.2), dict(rho_out=0.2, rho_in=0.3)])
def test_ring_keeps_exactly_its_band_when_every_negative_ties(band):
    z1 = torch.ones(6, 4).requires_grad_()
    z2 = torch.ones(6, 4).requires_grad_()
    pool = torch.ones(50, 4)
    t = 0.5
    out = hardneg.create_loss("ring", temperature=t, **band)(
        z1, z2, negatives=pool, return_diagnostics=True
    )
    lower, upper = ring_band(50, band["rho_out"], band["rho_in"])
    assert bool((out.diagnostics.kept_negatives == upper - lower).all())
    # every logit is 1/t: l = log(1 + (U - L)) exactly
    assert out.loss.item() == pytest.approx(math.log(1 + upper - lower), rel=1e-6)


def test_ring_band_arithmetic_truncates_like_the_authors_int_with_the_inner_cut_inside():
    assert ring_band(65536, 0.1, 0.1) == (655, 6553)
    # int() truncates where the float product falls just below an integer (0.7 * 90 = 62.99..)
    assert ring_band(90, 0.7, 0.0) == (0, int(0.7 * 90)) == (0, 62)
    assert ring_band(50, 0.58, 0.0) == (0, 28)
    assert ring_band(4096, 0.1, 0.1) == (40, 409)
    assert ring_band(510, 0.5, 0.1) == (25, 255)
    assert ring_band(100, 1.0, 0.0) == (0, 100)
    # degenerate bands keep one member (our choice; the reference would have an empty ring)
    assert ring_band(5, 0.1, 0.1) == (0, 1)
    assert ring_band(10, 0.2, 0.9) == (1, 2)


@pytest.mark.parametrize("band", [dict(lower=0.0, upper=100.0), dict(rho_out=1.0, rho_in=0.0)])
@pytest.mark.parametrize("pooled", [False, True])
def test_ring_with_band_0_100_equals_infonce(band, pooled):
    z1, z2 = views(n=16, d=8, seed=14)
    pool = queue(k=50) if pooled else None
    ring = hardneg.create_loss("ring", temperature=0.2, **band)
    infonce = hardneg.create_loss("infonce", temperature=0.2)
    ours = value_and_grads(lambda a, b: ring(a, b, negatives=pool), z1, z2)
    ref = value_and_grads(lambda a, b: infonce(a, b, negatives=pool), z1, z2)
    assert_same(ours, ref, dict(rtol=0, atol=1e-6))


def test_ring_percentiles_equal_the_fractions_they_stand_for():
    z1, z2 = views(n=8, d=8, seed=15)
    pool = queue(k=1000)
    by_rho = hardneg.create_loss("ring", rho_out=0.2, rho_in=0.25)
    by_pct = hardneg.create_loss("ring", lower=5.0, upper=20.0)
    assert_same(
        value_and_grads(lambda a, b: by_rho(a, b, negatives=pool), z1, z2),
        value_and_grads(lambda a, b: by_pct(a, b, negatives=pool), z1, z2),
        dict(rtol=0, atol=0),
    )


def test_ir_ring_draws_are_reproducible_and_equal_the_reference_draw():
    q, k = views(n=16, d=8, seed=16)
    bank = queue(k=500)
    t, rho_out, rho_in, samples = 0.07, 0.2, 0.1, 255
    loss_fn = hardneg.create_loss(
        "ring", temperature=t, rho_out=rho_out, rho_in=rho_in, num_samples=samples
    )

    def ours(seed):
        g = torch.Generator().manual_seed(seed)
        return value_and_grads(lambda a, b: loss_fn(a, b, negatives=bank, generator=g), q, k)

    def ref(a, b):
        pos, negs = moco_pos_and_negs(a, b, bank, t)
        upper = int(rho_out * bank.shape[0])
        lower = int(rho_in * upper)
        g = torch.Generator().manual_seed(0)
        # as NCERing: uniform draws with replacement among the ring's members, sorted descending
        draw = torch.randint(0, upper - lower, (a.shape[0], samples), generator=g)
        return ring_formula(pos, negs, rho_out, rho_in, draw=draw)

    first, again, other = ours(0), ours(0), ours(1)
    assert_same(first, again, dict(rtol=0, atol=0))
    assert not torch.equal(first[0], other[0])
    assert_same(first, value_and_grads(ref, q, k))


def test_ring_gradient_reaches_only_the_queries_through_the_band():
    q, k = views(n=8, d=8, seed=17)
    bank = queue(k=200).requires_grad_()
    loss = hardneg.create_loss("ring")(q, k, negatives=bank)
    loss.backward()
    assert bank.grad is None  # the pool is detached, as in MoCo
    assert q.grad is not None and bool(q.grad.abs().sum() > 0)


# ---------------------------------------------------------------------------- schedules


def reference_linear_policy(total_steps, max_anneal_step, final):
    """contrastive-ring-public ``LinearThresholdPolicy``: per-step values."""
    return np.concatenate(
        [
            np.linspace(final, 1.0, max_anneal_step)[::-1],
            np.ones(total_steps - max_anneal_step + 1) * final,
        ]
    )


def reference_step_policy(total_steps, max_anneal_step, final, step_size):
    """contrastive-ring-public ``StepThresholdPolicy``: per-step values."""
    stairs = np.arange(final, 1.0 + step_size, step_size)[::-1]
    stairs = np.repeat(stairs, int(max_anneal_step / len(stairs)))
    return np.concatenate([stairs, np.ones(total_steps - max_anneal_step + 1) * final])


@pytest.mark.parametrize(
    "total,anneal,final", [(1000, 500, 0.1), (2000, 1000, 0.2), (300, 300, 0.05)]
)
def test_ring_linear_anneal_matches_the_reference_policy(total, anneal, final):
    ref = reference_linear_policy(total, anneal, final)
    ours = np.array([ring_rho_out(final, s / total, until=anneal / total) for s in range(total)])
    assert ours[0] == 1.0
    np.testing.assert_allclose(ours[anneal:], final, atol=1e-12)
    # same line; the reference reaches the final value one step earlier (linspace over S points)
    assert np.abs(ours - ref[:total]).max() <= (1.0 - final) / (anneal - 1) + 1e-12
    assert np.all(np.diff(ours) <= 1e-15)


@pytest.mark.parametrize(
    "total,anneal,final,steps", [(1000, 500, 0.1, 10), (2000, 999, 0.2, 9), (1200, 600, 0.25, 4)]
)
def test_ring_staircase_anneal_equals_the_reference_step_policy(total, anneal, final, steps):
    step_size = (1.0 - final) / (steps - 1)
    ref = reference_step_policy(total, anneal, final, step_size)
    assert len(np.unique(ref.round(9))) == steps
    ours = np.array(
        [
            ring_rho_out(final, s / total, until=anneal / total, kind="staircase", steps=steps)
            for s in range(total)
        ]
    )
    cut = anneal - anneal % steps  # the reference repeats each stair int(S / steps) times
    np.testing.assert_allclose(ours[:cut], ref[:cut], atol=1e-9)
    np.testing.assert_allclose(ours[anneal:], final, atol=1e-12)


def reference_hcl_betas(beta, epochs, n_steps=9):
    """HCL ``anneal='down'``: the beta each epoch trains with (1-indexed loop of image/main.py)."""
    betas = iter(np.linspace(beta, 0, n_steps))
    used = []
    for epoch in range(1, epochs + 1):
        used.append(beta)
        if epoch % int(epochs / n_steps) == 0:
            beta = next(betas, None)  # the reference raises StopIteration after its last epoch
            if beta is None:
                assert epoch == epochs, "the reference would crash mid-training"
                break
    return np.array(used)


@pytest.mark.parametrize("epochs", [9, 18, 27, 90, 360])
def test_hcl_down_schedule_matches_the_reference_when_epochs_divide_by_9(epochs):
    ref = reference_hcl_betas(1.5, epochs)
    steps_per_epoch = 7
    total = epochs * steps_per_epoch
    for step in range(total):
        assert hcl_beta_down(1.5, step / total) == pytest.approx(
            ref[step // steps_per_epoch], abs=1e-12
        )


@pytest.mark.parametrize("epochs", [9, 19, 20, 100, 200, 400])
def test_hcl_down_schedule_with_epochs_matches_the_reference_for_any_epoch_count(epochs):
    ref = reference_hcl_betas(2.0, epochs)
    steps_per_epoch = 3
    total = epochs * steps_per_epoch
    for step in range(total):
        got = hcl_beta_down(2.0, step / total, epochs=epochs)
        assert got == pytest.approx(ref[step // steps_per_epoch], abs=1e-12)


def test_hcl_anneal_down_changes_the_loss_like_a_smaller_beta():
    z1, z2 = views(n=8, d=8, seed=18)
    annealed = hardneg.create_loss("hcl", beta=2.0, beta_anneal="down")
    fixed = hardneg.create_loss("hcl", beta=hcl_beta_down(2.0, 0.5))
    torch.testing.assert_close(annealed(z1, z2, progress=0.5), fixed(z1, z2))
    with pytest.raises(ValueError, match="progress"):
        annealed(z1, z2)


def test_hcl_anneal_down_with_anneal_epochs_follows_the_reference_epoch_stairs():
    """20 epochs: the reference changes beta after every 20 // 9 = 2 epochs, so at epoch 10
    (progress 0.5) it has taken 5 values of linspace(2, 0, 9): beta = 2 - 4 * 0.25 = 1.0. The
    ninths of training without ``anneal_epochs`` give floor(4.5) = 4 stairs there: 1.25. A run of
    one epoch keeps beta throughout."""
    z1, z2 = views(n=8, d=8, seed=18)
    annealed = hardneg.create_loss("hcl", beta=2.0, beta_anneal="down", anneal_epochs=20)
    assert annealed.strategy.anneal_epochs == 20
    torch.testing.assert_close(
        annealed(z1, z2, progress=0.5), hardneg.create_loss("hcl", beta=1.0)(z1, z2)
    )
    ninths = hardneg.create_loss("hcl", beta=2.0, beta_anneal="down")
    torch.testing.assert_close(
        ninths(z1, z2, progress=0.5), hardneg.create_loss("hcl", beta=1.25)(z1, z2)
    )
    one = hardneg.create_loss("hcl", beta=2.0, beta_anneal="down", anneal_epochs=1)
    assert one.strategy.anneal_epochs == 1
    torch.testing.assert_close(
        one(z1, z2, progress=0.9), hardneg.create_loss("hcl", beta=2.0)(z1, z2)
    )


def test_hcl_down_schedule_at_the_end_of_training_keeps_the_last_epochs_beta():
    # progress 1 is the end of the last epoch: the reference trained it with its last value
    # (an epoch index past the last epoch would take one more stair)
    for epochs in (9, 20):
        assert hcl_beta_down(2.0, 1.0, epochs=epochs) == pytest.approx(
            reference_hcl_betas(2.0, epochs)[-1], abs=1e-12
        )
    assert hcl_beta_down(2.0, 1.0, epochs=9) == pytest.approx(0.25, abs=1e-12)  # 2 - 7 * 2 / 8


def test_ring_staircase_defaults_to_10_stairs_and_holds_1_or_2_stairs():
    final, until = 0.1, 0.5
    # the default steps = 10: the stairs linspace(1, 0.1, 10), each a tenth of [0, until)
    stairs = np.linspace(1.0, final, 10)
    for m in range(10):
        progress = until * (m + 0.5) / 10
        assert ring_rho_out(final, progress, until=until, kind="staircase") == pytest.approx(
            stairs[m], abs=1e-12
        )
    # one stair holds 1 until `until`; two stairs: 1 on the first half, the final value after
    assert ring_rho_out(final, 0.49, until=until, kind="staircase", steps=1) == 1.0
    assert ring_rho_out(final, 0.2, until=until, kind="staircase", steps=2) == 1.0
    assert ring_rho_out(final, 0.3, until=until, kind="staircase", steps=2) == pytest.approx(final)
    # just before `until` the last stair holds, never a value past the final one
    just_before = until * (1 - 1e-13)
    assert ring_rho_out(final, just_before, until=until, kind="staircase") == pytest.approx(final)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: hcl_beta_down(1.0, -0.1), "progress must be in [0, 1], got -0.1"),
        (lambda: hcl_beta_down(1.0, 1.5), "progress must be in [0, 1], got 1.5"),
        (lambda: ring_rho_out(0.1, 1.01, until=0.5), "progress must be in [0, 1], got 1.01"),
        (lambda: hcl_beta_down(1.0, 0.5, epochs=0), "epochs must be in [1, inf), got 0"),
        (lambda: hcl_beta_down(1.0, 0.5, epochs=2.5), "epochs must be an integer, got 2.5"),
    ],
)
def test_schedules_refuse_a_progress_or_epoch_count_out_of_range(call, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        call()


# ------------------------------------------------------------------------ UnReMix


def unremix(**kw):
    return hardneg.create_loss("unremix", **kw)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("beta,tau_plus", [(0.0, 0.0), (1.0, 0.1), (3.0, 0.05)])
def test_unremix_with_lambdas_zero_equals_hcl(pooled, beta, tau_plus):
    z1, z2 = views(n=12, d=8, seed=19)
    pool = queue(k=70) if pooled else None
    a = unremix(beta=beta, tau_plus=tau_plus, lambda_u=0.0, lambda_d=0.0, temperature=0.4)
    b = hardneg.create_loss("hcl", beta=beta, tau_plus=tau_plus, temperature=0.4)
    assert_same(
        value_and_grads(lambda x, y: a(x, y, negatives=pool), z1, z2),
        value_and_grads(lambda x, y: b(x, y, negatives=pool), z1, z2),
        dict(rtol=0, atol=0),
    )


def per_sample_infonce_gradient(anchor, positive, negatives, t):
    """``delta = d l / d anchor`` of ``l = -log softmax([a.p, a.n_1, ...] / t)[0]`` by autograd."""
    a = anchor.detach().double().clone().requires_grad_()
    logits = torch.cat([(a * positive.double()).sum().view(1), negatives.double() @ a]) / t
    loss = torch.logsumexp(logits, 0) - logits[0]
    return torch.autograd.grad(loss, a)[0]


def materialised_in_batch_gradients(z1, z2, h, t):
    """``g_i = delta_i ⊗ h_i`` of every anchor, computed the slow way, flattened ``[2N, d*h]``."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    rows = []
    deltas = []
    for i in range(n2):
        p = (i + n2 // 2) % n2
        negs = z[[j for j in range(n2) if j not in (i, p)]]
        delta = per_sample_infonce_gradient(z[i], z[p], negs, t)
        deltas.append(delta)
        rows.append(torch.outer(delta, h[i].double()).flatten())
    return torch.stack(rows), torch.stack(deltas)


@pytest.mark.parametrize("with_h", [False, True])
def test_unremix_influence_equals_cosine_of_materialised_outer_product_gradients(with_h):
    z1, z2 = views(n=6, d=5, seed=20)
    t = 0.3
    h1 = torch.randn(6, 7, generator=torch.Generator().manual_seed(21))
    h2 = torch.randn(6, 7, generator=torch.Generator().manual_seed(22))
    scores = in_batch_contrast([z1.detach(), z2.detach()], temperature=t)
    h = torch.cat([h1, h2]) if with_h else scores.anchors
    g, deltas = materialised_in_batch_gradients(z1.detach(), z2.detach(), h, t)
    expected = F.normalize(g, dim=1) @ F.normalize(g, dim=1).T
    if with_h:
        scores.anchor_features = scores.column_features = h
    strategy = UnReMixNegatives()
    got = strategy.influence_scores(scores)
    mask = scores.negative_mask
    torch.testing.assert_close(got[mask].double(), expected[mask], **TOL)
    # the closed form of delta agrees with autograd
    from hardneg.strategies.unremix import anchor_gradients

    torch.testing.assert_close(anchor_gradients(scores).double(), deltas, **TOL)


def test_unremix_gradient_norm_equals_the_norm_of_the_materialised_gradient():
    z1, z2 = views(n=5, d=4, seed=23)
    t = 0.5
    h = torch.randn(10, 6, generator=torch.Generator().manual_seed(24))
    scores = in_batch_contrast([z1.detach(), z2.detach()], temperature=t)
    g, _ = materialised_in_batch_gradients(z1.detach(), z2.detach(), h, t)
    strategy = UnReMixNegatives(influence="gradient_norm")
    scores.anchor_features = scores.column_features = h
    got = strategy.influence_scores(scores)
    torch.testing.assert_close(got[0].double(), g.norm(dim=1), **TOL)


def test_unremix_pool_entry_gradient_equals_autograd_of_its_own_batch_softmax():
    q, k = views(n=6, d=5, seed=25)
    pool = queue(k=9, d=5)
    t = 0.4
    scores = pool_contrast(q.detach(), k.detach(), pool, temperature=t)
    from hardneg.strategies.unremix import column_gradients

    qn = F.normalize(q.detach().double(), dim=1)
    expected = []
    for entry in F.normalize(pool.double(), dim=1):
        # the entry as an anchor: itself as positive, the batch's queries as the softmax support
        e = entry.clone().requires_grad_()
        loss = torch.logsumexp(qn @ e / t, 0) - (e * entry).sum() / t
        expected.append(torch.autograd.grad(loss, e)[0])
    torch.testing.assert_close(column_gradients(scores).double(), torch.stack(expected), **TOL)


def unremix_step_by_step(strategy, scores, tau_plus):
    """The reconstruction of methods.md sec. 3 spelled out: scores, min-max, mix, tilt, HCL."""
    from hardneg.objectives import infonce_objective
    from hardneg.strategies import Selection, normalised_log_weights
    from hardneg.strategies.unremix import minmax_over_negatives

    mask = scores.mask()
    u = strategy.influence_scores(scores).expand_as(scores.negative_logits)
    d = UnReMixNegatives.representativeness_scores(scores).expand_as(scores.negative_logits)
    d = minmax_over_negatives(d, mask)
    if strategy.representativeness == "density":
        d = 1.0 - d
    mix = strategy.eps + strategy.lambda_u * minmax_over_negatives(u, mask) + strategy.lambda_d * d
    logits = scores.negative_logits
    tilt = (logits.detach() if strategy.detach_weights else logits) * strategy.beta
    tilt = tilt.masked_fill(~mask, float("-inf"))
    log_w = normalised_log_weights(tilt + mix.log(), scores)
    per_anchor = infonce_objective(scores, Selection(negative_log_weights=log_w), tau_plus=tau_plus)
    return per_anchor.mean()


@pytest.mark.parametrize("setup", ["in-batch", "pool", "bank"])
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(influence="gradient_norm"),
        dict(representativeness="density", lambda_u=0.5, lambda_d=2.0),
        dict(lambda_u=0.0, beta=0.0),
        dict(lambda_d=0.0, beta=3.0, detach_weights=True),
        dict(with_h=True),
        dict(with_h=True, influence="gradient_norm", eps=0.01),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_unremix_fused_weights_equal_the_step_by_step_definition(setup, options):
    options = dict(options)
    with_h = options.pop("with_h", False)
    t, tau_plus = 0.3, 0.1
    z1, z2 = views(n=10, d=6, seed=28)
    g = torch.Generator().manual_seed(29)
    h1, h2 = torch.randn(10, 9, generator=g), torch.randn(10, 9, generator=g)
    pool = queue(k=33, d=6) if setup != "in-batch" else None
    pool_h = torch.randn(33, 9, generator=g)
    own = torch.arange(10) * 3 if setup == "bank" else None
    loss_fn = unremix(temperature=t, tau_plus=tau_plus, **options)
    strategy = loss_fn.strategy

    def fused(a, b):
        kw = dict(negatives=pool, exclude_index=own)
        if with_h:
            kw.update(h1=h1, h2=h2, negative_h=pool_h if pool is not None else None)
        return loss_fn(a, b, **kw)

    def reference(a, b):
        if pool is None:
            scores = in_batch_contrast([a, b], temperature=t)
            if with_h:
                scores.anchor_features = scores.column_features = torch.cat([h1, h2])
        else:
            scores = pool_contrast(a, b, pool, temperature=t, exclude_index=own)
            if with_h:
                scores.anchor_features, scores.column_features = h1, pool_h
        return unremix_step_by_step(strategy, scores, tau_plus)

    assert_same(value_and_grads(fused, z1, z2), value_and_grads(reference, z1, z2))


@pytest.mark.parametrize("setup", ["in-batch", "pool"])
def test_unremix_fused_weights_equal_the_step_by_step_definition_over_several_row_blocks(setup):
    # 600 x 600 (in-batch) and 60 x 5000 (pool) scores: the fused tilted mass is built a
    # block of rows at a time (hardneg.fastpaths.row_blocks), here in two or more blocks
    from hardneg.fastpaths import row_blocks

    n = 300 if setup == "in-batch" else 60
    z1, z2 = views(n=n, d=8, seed=33)
    pool = queue(k=5000, d=8) if setup == "pool" else None
    t, tau_plus = 0.3, 0.1
    loss_fn = unremix(temperature=t, tau_plus=tau_plus)
    cells = (2 * n, 2 * n) if pool is None else (n, 5000)
    assert len(row_blocks(torch.empty(cells))) >= 2

    def reference(a, b):
        scores = (
            in_batch_contrast([a, b], temperature=t)
            if pool is None
            else pool_contrast(a, b, pool, temperature=t)
        )
        return unremix_step_by_step(loss_fn.strategy, scores, tau_plus)

    assert_same(
        value_and_grads(lambda a, b: loss_fn(a, b, negatives=pool), z1, z2),
        value_and_grads(reference, z1, z2),
    )


@pytest.mark.parametrize("beta", [1.0, 0.7])
@pytest.mark.parametrize("tilt_grad", [True, False])
def test_tilted_mass_with_a_factor_and_its_gradient_equal_the_log_sum_exp_form(beta, tilt_grad):
    # beta = 1 takes the product path (q = e f per block, in-place backward); float64 oracle
    from hardneg.fastpaths import tilted_log_mass

    g = torch.Generator().manual_seed(35)
    logits = (torch.randn(30, 700, generator=g) * 3).requires_grad_()
    absent = torch.zeros(30, 700, dtype=torch.bool)
    absent[:, :4] = True
    factor = (torch.rand(30, 700, generator=g) + 0.1).masked_fill(absent, 0.0)
    upstream = torch.randn(30, generator=g)
    got = tilted_log_mass(
        logits.masked_fill(absent, float("-inf")), beta, 696, factor=factor, tilt_grad=tilt_grad
    )
    (grad,) = torch.autograd.grad(got, logits, upstream)
    c = logits.double().masked_fill(absent, float("-inf"))
    tilt = c if tilt_grad else c.detach()
    log_f = factor.double().log()
    ref = (
        math.log(696)
        + torch.logsumexp(c + beta * tilt + log_f, dim=1)
        - torch.logsumexp(beta * tilt + log_f, dim=1)
    )
    (ref_grad,) = torch.autograd.grad(ref, logits, upstream.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_unremix_representativeness_equals_the_quadratic_definition():
    z1, z2 = views(n=7, d=6, seed=26)
    scores = in_batch_contrast([z1.detach(), z2.detach()], temperature=0.5)
    z = scores.columns.double()
    c = z.shape[0]
    expected = torch.tensor(
        [sum(1.0 - float(z[j] @ z[k]) for k in range(c) if k != j) / (c - 1) for j in range(c)]
    )
    got = UnReMixNegatives.representativeness_scores(scores)[0].double()
    torch.testing.assert_close(got, expected.double(), **TOL)


def test_unremix_density_and_diversity_order_the_negatives_in_opposite_directions():
    z1, z2 = views(n=10, d=6, seed=27)
    pool = queue(k=40, d=6)
    scores = pool_contrast(z1.detach(), z2.detach(), pool, temperature=0.5)
    d = UnReMixNegatives.representativeness_scores(scores)[0]
    order = torch.argsort(d)
    for kind, sign in (("diversity", 1), ("density", -1)):
        strategy = UnReMixNegatives(beta=0.0, lambda_u=0.0, lambda_d=1.0, representativeness=kind)
        context = StepContext(fast=False, want_log_mass=False)
        log_w = strategy.select(scores, context).negative_log_weights
        w_sorted = log_w[:, order]
        assert bool((sign * w_sorted.diff(dim=1) > 0).all()), kind


# ---------------------------------------------------------------------------- diagnostics


def vectors_at_cosines(cosines, d=4):
    """Unit vectors whose cosine with ``e_0`` is each given value (spread over the other axes)."""
    out = torch.zeros(len(cosines), d, dtype=torch.float64)
    for i, c in enumerate(cosines):
        out[i, 0] = c
        out[i, 1 + i % (d - 1)] = math.sqrt(1 - c**2)
    return out.float()


def diagnostic_setup(n_false=3, n_true=9, s_false=0.8, s_true=0.1):
    q = torch.zeros(2, 4)  # two identical anchors (a batch needs N >= 2)
    q[:, 0] = 1.0
    k = q.clone()
    pool = vectors_at_cosines([s_false] * n_false + [s_true] * n_true)
    labels = torch.tensor([0, 0])
    pool_labels = torch.tensor([0] * n_false + [1] * n_true)
    return q, k, pool, labels, pool_labels


def test_diagnostics_of_uniform_negatives_are_known_in_closed_form():
    q, k, pool, labels, pool_labels = diagnostic_setup()
    t = 0.5
    out = hardneg.create_loss("infonce", temperature=t)(
        q, k, negatives=pool, labels=labels, negative_labels=pool_labels, return_diagnostics=True
    )
    diag = out.diagnostics
    assert float(diag.effective_negatives[0]) == pytest.approx(12.0, rel=1e-5)
    assert float(diag.false_negative_mass[0]) == pytest.approx(3 / 12, rel=1e-5)
    wf, wt = math.exp(0.8 / t), math.exp(0.1 / t)
    assert float(diag.false_negative_gradient_mass[0]) == pytest.approx(
        3 * wf / (3 * wf + 9 * wt), rel=1e-5
    )
    # the 10 largest gradient weights: the 3 false negatives and 7 true ones
    assert float(diag.top_k_precision[0]) == pytest.approx(7 / 10)
    summary = diag.summary()
    assert summary["mean_negative_similarity"] == pytest.approx((3 * 0.8 + 9 * 0.1) / 12, rel=1e-5)


def test_unlabelled_anchors_have_no_false_negative_measures():
    # STL-10 pre-trains on train+unlabeled (label -1): two unlabelled images are not one class
    q, k, pool, _, _ = diagnostic_setup()
    labels = torch.tensor([0, -1])
    pool_labels = torch.tensor([0] * 3 + [1] * 5 + [-1] * 4)  # 4 unlabelled negatives
    loss = hardneg.create_loss("infonce", temperature=0.5)
    out = loss(q, k, negatives=pool, labels=labels, negative_labels=pool_labels,
               return_diagnostics=True)  # fmt: skip
    diag = out.diagnostics
    # the labelled anchor: unlabelled negatives count as other-class, uniform weights
    assert float(diag.false_negative_mass[0]) == pytest.approx(3 / 12, rel=1e-5)
    assert float(diag.top_k_precision[0]) == pytest.approx(7 / 10)
    for name in ("false_negative_mass", "false_negative_gradient_mass", "top_k_precision"):
        assert math.isnan(float(getattr(diag, name)[1])), name
    summary = diag.summary()  # the labelled anchors' means
    assert summary["false_negative_mass"] == pytest.approx(3 / 12, rel=1e-5)
    assert summary["top_k_precision"] == pytest.approx(7 / 10)
    # no labelled anchor: no label-based measure at all (not NaN in the logs)
    none = loss(q, k, negatives=pool, labels=torch.tensor([-1, -1]), negative_labels=pool_labels,
                return_diagnostics=True).diagnostics.summary()  # fmt: skip
    assert not {"false_negative_mass", "false_negative_gradient_mass", "top_k_precision"} & set(
        none
    )
    assert none["effective_negatives"] == pytest.approx(12.0, rel=1e-5)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_diagnostics_of_hcl_weights_are_known_in_closed_form(beta):
    q, k, pool, labels, pool_labels = diagnostic_setup()
    t = 0.5
    out = hardneg.create_loss("hcl", temperature=t, beta=beta, tau_plus=0.0)(
        q, k, negatives=pool, labels=labels, negative_labels=pool_labels, return_diagnostics=True
    )
    wf, wt = math.exp(beta * 0.8 / t), math.exp(beta * 0.1 / t)
    ess = (3 * wf + 9 * wt) ** 2 / (3 * wf**2 + 9 * wt**2)
    diag = out.diagnostics
    assert float(diag.effective_negatives[0]) == pytest.approx(ess, rel=1e-5)
    assert float(diag.false_negative_mass[0]) == pytest.approx(3 * wf / (3 * wf + 9 * wt), rel=1e-5)
    gf, gt = wf * math.exp(0.8 / t), wt * math.exp(0.1 / t)
    assert float(diag.false_negative_gradient_mass[0]) == pytest.approx(
        3 * gf / (3 * gf + 9 * gt), rel=1e-5
    )


def test_diagnostics_of_the_ring_count_its_band():
    # 3 false negatives on top, then 9 true ones: the band [25%, 75%) keeps ranks 3..8, all true
    q, k, pool, labels, pool_labels = diagnostic_setup()
    pool = vectors_at_cosines([0.9, 0.85, 0.8] + [0.5 - 0.05 * i for i in range(9)])
    out = hardneg.create_loss("ring", temperature=0.5, lower=25.0, upper=75.0)(
        q, k, negatives=pool, labels=labels, negative_labels=pool_labels, return_diagnostics=True
    )
    diag = out.diagnostics
    assert int(diag.kept_negatives[0]) == 6
    assert float(diag.effective_negatives[0]) == pytest.approx(6.0, rel=1e-5)
    assert float(diag.false_negative_mass[0]) == 0.0
    assert float(diag.top_k_precision[0]) == 1.0
    assert diag.summary()["mean_negative_similarity"] == pytest.approx(
        sum(0.5 - 0.05 * i for i in range(6)) / 6, rel=1e-5
    )
