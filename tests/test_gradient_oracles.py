"""Independent gradient oracles: every loss against a float64, one-anchor-at-a-time re-statement
of its equation in ``docs/methods.md`` (autograd through the loop), values and gradients w.r.t.
both inputs to 1e-5.

The library runs on float32 inputs through ``hardneg.create_loss(name, **hparams)`` only (the
public API); the references below know nothing of its internals: they loop over anchors and
candidates, in float64, exactly as the papers write the estimators. A wrong sign, a missing
detach, a shifted band or a mis-weighted term changes the value or the gradient by far more than
the tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

import hardneg

TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- inputs


def make_inputs(n=10, d=8, pool=0, seed=0):
    """float32 leaves ``z1, z2`` (two correlated views) and an optional ``[pool, d]`` bank."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=g)
    bank = torch.randn(pool, d, generator=g) if pool else None
    return z1.requires_grad_(), z2.requires_grad_(), bank


def as64(*tensors):
    """float64 leaves with the values of ``tensors`` (None passes through)."""
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def check(loss_fn, reference, z1, z2, bank, **call):
    """The library on float32 vs ``reference`` on float64: value and d/dz1, d/dz2 to 1e-5."""
    got = loss_fn(z1, z2, negatives=bank, **call)
    g1, g2 = torch.autograd.grad(got, (z1, z2))
    r1, r2, rb = as64(z1, z2, bank)
    want = reference(r1, r2, None if rb is None else rb.detach())
    w1, w2 = torch.autograd.grad(want, (r1, r2))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), **TOL)
    torch.testing.assert_close(g1.double(), w1, **TOL)
    torch.testing.assert_close(g2.double(), w2, **TOL)
    # the oracle is not trivially satisfied: the gradients are not zero
    assert float(w1.abs().max()) > 1e-3 and float(w2.abs().max()) > 1e-3


# ------------------------------------------------------------------- candidate layouts


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


def anchors(z1, z2, bank, exclude=None):
    """Yield ``(anchor, positive, [negatives])`` (unit float64 vectors) per anchor.

    In-batch (``bank`` None): the 2N views; the positive of ``i`` is the other view of the same
    image, the negatives the 2N - 2 other views. With a bank: the N queries ``z1``, positive
    ``z2_i``, negatives every bank row (but row ``exclude[i]`` when given).
    """
    n = z1.shape[0]
    if bank is None:
        views = unit(torch.cat([z1, z2]))
        for i in range(2 * n):
            partner = (i + n) % (2 * n)
            yield (
                views[i],
                views[partner],
                [views[j] for j in range(2 * n) if j not in (i, partner)],
            )
    else:
        q, k, b = unit(z1), unit(z2), unit(bank)
        for i in range(n):
            rows = [r for r in range(b.shape[0]) if exclude is None or r != int(exclude[i])]
            yield q[i], k[i], [b[r] for r in rows]


def mean(terms):
    return torch.stack(terms).mean()


# ------------------------------------------------------------- the papers' estimators


def hcl_anchor(a, p, negs, t, beta, tau_plus, detach):
    """joshr17/HCL image/main.py, 'hard' estimator (methods.md section 1), one anchor."""
    m = len(negs)
    pos = torch.exp(a @ p / t)
    neg = [torch.exp(a @ x / t) for x in negs]
    imp = [v**beta for v in neg]
    if detach:
        imp = [v.detach() for v in imp]
    reweight_neg = sum(w * v for w, v in zip(imp, neg)) / (sum(imp) / m)
    ng = (-tau_plus * m * pos + reweight_neg) / (1 - tau_plus)
    floor = torch.tensor(m * math.exp(-1 / t), dtype=torch.float64)
    ng = torch.maximum(ng, floor)
    return -torch.log(pos / (pos + ng))


def hcl_reference(t, beta, tau_plus, detach=False, exclude=None):
    def reference(z1, z2, bank):
        return mean(
            [
                hcl_anchor(a, p, negs, t, beta, tau_plus, detach)
                for a, p, negs in anchors(z1, z2, bank, exclude)
            ]
        )

    return reference


def infonce_reference(t):
    def reference(z1, z2, bank):
        terms = []
        for a, p, negs in anchors(z1, z2, bank):
            pos = torch.exp(a @ p / t)
            terms.append(-torch.log(pos / (pos + sum(torch.exp(a @ x / t) for x in negs))))
        return mean(terms)

    return reference


def debiased_reference(t, tau_plus):
    """Chuang et al. 2020: Ng = max((sum_j e^{s/t} - tau+ M pos) / (1 - tau+), M e^{-1/t})."""

    def reference(z1, z2, bank):
        terms = []
        for a, p, negs in anchors(z1, z2, bank):
            m = len(negs)
            pos = torch.exp(a @ p / t)
            ng = (sum(torch.exp(a @ x / t) for x in negs) - tau_plus * m * pos) / (1 - tau_plus)
            ng = torch.maximum(ng, torch.tensor(m * math.exp(-1 / t), dtype=torch.float64))
            terms.append(-torch.log(pos / (pos + ng)))
        return mean(terms)

    return reference


def ring_reference(t, rho_out, rho_in, exclude=None, largest=True):
    """Wu et al. 2021 (methods.md section 2): per anchor, sort the M candidates by similarity,
    keep ranks [L, U) with U = floor(rho_out M), L = floor(rho_in U); the positive stays in the
    partition: l = logsumexp({a} + ring) - a. ``largest=False`` ranks from the least similar end
    (a deliberately wrong variant, to show the oracle tells the two apart)."""

    def reference(z1, z2, bank):
        terms = []
        for a, p, negs in anchors(z1, z2, bank, exclude):
            m = len(negs)
            upper = math.floor(rho_out * m)
            lower = math.floor(rho_in * upper)
            logits = [a @ x / t for x in negs]
            sign = -1.0 if largest else 1.0
            ranked = sorted(range(m), key=lambda j: sign * float(logits[j].detach()))
            ring = [logits[j] for j in ranked[lower:upper]]
            pos = a @ p / t
            terms.append(torch.logsumexp(torch.stack([pos, *ring]), dim=0) - pos)
        return mean(terms)

    return reference


# ----------------------------------------------------------------------------- tests

POOLS = [pytest.param(0, id="in-batch"), pytest.param(40, id="pool")]


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("t", [0.5, 0.2])
def test_infonce_gradients_equal_the_float64_equation(pool, t):
    z1, z2, bank = make_inputs(pool=pool, seed=1)
    check(hardneg.create_loss("infonce", temperature=t), infonce_reference(t), z1, z2, bank)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("tau_plus", [0.05, 0.1, 0.3])
def test_debiased_gradients_equal_the_float64_equation(pool, tau_plus):
    z1, z2, bank = make_inputs(pool=pool, seed=2)
    loss_fn = hardneg.create_loss("debiased", temperature=0.5, tau_plus=tau_plus)
    check(loss_fn, debiased_reference(0.5, tau_plus), z1, z2, bank)


def floor_inputs():
    z1, z2, _ = make_inputs(n=8, seed=3)
    with torch.no_grad():
        z2.copy_(z1 + 0.3 * torch.randn(z1.shape, generator=torch.Generator().manual_seed(0)))
    return z1, z2


def test_debiased_floor_is_active_in_the_reference_case():
    """With tau+ = 0.2 and close positives, half the anchors hit the floor M e^{-1/t}: the
    oracle covers both branches of the clamp (a wrong floor changes the value)."""
    z1, z2 = floor_inputs()
    loss_fn = hardneg.create_loss("debiased", temperature=0.5, tau_plus=0.2)
    check(loss_fn, debiased_reference(0.5, 0.2), z1, z2, None)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize(("beta", "tau_plus"), [(1.0, 0.1), (0.5, 0.0), (2.0, 0.2), (0.0, 0.1)])
def test_hcl_gradients_equal_the_float64_equation(pool, detach, beta, tau_plus):
    z1, z2, bank = make_inputs(pool=pool, seed=4)
    loss_fn = hardneg.create_loss(
        "hcl", temperature=0.5, beta=beta, tau_plus=tau_plus, detach_weights=detach
    )
    check(loss_fn, hcl_reference(0.5, beta, tau_plus, detach), z1, z2, bank)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("detach", [False, True])
def test_hcl_plain_log_weights_give_the_float64_equation(pool, detach):
    """``fast=False``: the weights go through the log-space form, not the fused log-mass."""
    z1, z2, bank = make_inputs(pool=pool, seed=4)
    loss_fn = hardneg.create_loss(
        "hcl", temperature=0.5, beta=1.0, tau_plus=0.1, detach_weights=detach, fast=False
    )
    check(loss_fn, hcl_reference(0.5, 1.0, 0.1, detach), z1, z2, bank)


def test_hcl_detached_and_attached_weights_have_different_gradients():
    """The switch matters (else the detach tests above could not tell the two apart)."""
    z1, z2, _ = make_inputs(seed=5)
    grads = []
    for detach in (False, True):
        loss_fn = hardneg.create_loss("hcl", beta=1.0, tau_plus=0.1, detach_weights=detach)
        grads.append(torch.autograd.grad(loss_fn(z1, z2), z1)[0])
    assert float((grads[0] - grads[1]).abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("rho_out", "rho_in"),
    [(0.1, 0.1), (0.5, 0.2), (0.7, 0.5), (1.0, 0.0), (0.35, 0.6)],
)
def test_ring_in_batch_gradients_equal_the_float64_band(rho_out, rho_in):
    z1, z2, _ = make_inputs(n=12, seed=6)  # M = 22 candidates per anchor
    loss_fn = hardneg.create_loss("ring", temperature=0.1, rho_out=rho_out, rho_in=rho_in)
    check(loss_fn, ring_reference(0.1, rho_out, rho_in), z1, z2, None)


@pytest.mark.parametrize(
    ("rho_out", "rho_in"),
    [(0.1, 0.1), (0.5, 0.2), (0.3, 0.5), (1.0, 0.0)],
)
def test_ring_pool_gradients_equal_the_float64_band(rho_out, rho_in):
    z1, z2, bank = make_inputs(n=8, pool=50, seed=7)
    loss_fn = hardneg.create_loss("ring", temperature=0.07, rho_out=rho_out, rho_in=rho_in)
    check(loss_fn, ring_reference(0.07, rho_out, rho_in), z1, z2, bank)


def test_ring_memory_bank_excluding_the_own_entry_equals_the_float64_band():
    z1, z2, bank = make_inputs(n=6, pool=30, seed=8)
    index = torch.tensor([3, 0, 17, 29, 8, 11])
    loss_fn = hardneg.create_loss("ring", temperature=0.07, rho_out=0.5, rho_in=0.25)
    check(
        loss_fn,
        ring_reference(0.07, 0.5, 0.25, exclude=index),
        z1,
        z2,
        bank,
        exclude_index=index,
    )


def test_ring_band_is_not_the_bottom_of_the_ranking():
    """The same band counted from the least similar end gives another loss (guards the
    direction of the sort: ``topk`` of the largest similarities)."""
    z1, z2, bank = make_inputs(n=8, pool=50, seed=9)
    loss_fn = hardneg.create_loss("ring", temperature=0.07, rho_out=0.3, rho_in=0.2)
    got = float(loss_fn(z1, z2, negatives=bank).detach())
    z1_64, z2_64, bank_64 = (x.detach().double() for x in (z1, z2, bank))
    top = float(ring_reference(0.07, 0.3, 0.2)(z1_64, z2_64, bank_64))
    bottom = float(ring_reference(0.07, 0.3, 0.2, largest=False)(z1_64, z2_64, bank_64))
    assert got == pytest.approx(top, abs=1e-5)
    assert abs(got - bottom) > 1e-2


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize(("beta", "tau_plus"), [(1.0, 0.1), (2.0, 0.0)])
def test_unremix_without_uncertainty_and_representativeness_is_hcl(pool, detach, beta, tau_plus):
    z1, z2, bank = make_inputs(pool=pool, seed=10)
    loss_fn = hardneg.create_loss(
        "unremix",
        temperature=0.5,
        beta=beta,
        tau_plus=tau_plus,
        lambda_u=0.0,
        lambda_d=0.0,
        detach_weights=detach,
    )
    check(loss_fn, hcl_reference(0.5, beta, tau_plus, detach), z1, z2, bank)


# ------------------------------------------------------------ potential-sample mining
#
# methods.md section 4 and the docstring of hardneg.losses.potential, with sample='expected'
# (each negative cell weighted by its keep probability pi instead of a Bernoulli draw):
#
#   block B_j = {k_j} + the K nearest neighbours of k_j (cosine) in the support set
#   D_i = sum_{p in B_i} e^{s(q_i,p)/T} + sum_{j != i} sum_{n in B_j} pi_in e^{s(q_i,n)/T}
#   pi_in = min(clamp, exp(-a (s(q_i,n) - s(q_i,k_i) - b)^2))        (no gradient through pi)
#   l_i = sum_{p in B_i} w_ip (log D_i - s(q_i,p)/T)
#   w = 1 (hard); soft: w_{i,k_i} = 1, w_{i,n_im} = softmax_m cos(g_i, n_im), g_i = q_i
#   L_aug: SimCLR over the rows of [q; k] with the same kernel on the candidates
#   in-batch: 1/2 [L_mined(z1; z2) + L_mined(z2; z1)] + lambda L_aug(z1, z2); the support set of
#     L_mined(q; k) is the other keys, and a candidate that is one of i's own positives is no
#     negative of i; with a bank: L_mined(q; k) + lambda L_aug(q, k).

PSM = dict(temperature=0.5, a=0.5, b=0.0, clamp=0.999)


def keep(s, s_plus, a, b, clamp):
    return torch.clamp(torch.exp(-a * (s - s_plus - b) ** 2), max=clamp).detach()


def mined_reference(q, k, support, kk, weighting, hp):
    t = hp["temperature"]
    n = q.shape[0]
    qn, kn = unit(q), unit(k)
    in_batch = support is None
    bank = kn if in_batch else unit(support)
    with torch.no_grad():  # the neighbour lookup carries no gradient
        neighbours = []
        for j in range(n):
            rows = [r for r in range(bank.shape[0]) if not (in_batch and r == j)]
            rows.sort(key=lambda r: -float(kn[j] @ bank[r]))
            neighbours.append(rows[:kk])
    blocks = [[("key", j)] + [("support", r) for r in neighbours[j]] for j in range(n)]

    def vector(member):
        kind, r = member
        return kn[r] if kind == "key" or in_batch else bank[r]

    def ident(member):  # in-batch a neighbour is a key of the batch
        kind, r = member
        return ("key", r) if in_batch else member

    terms = []
    for i in range(n):
        own = [ident(m) for m in blocks[i]]
        pos = [qn[i] @ vector(m) for m in blocks[i]]
        s_plus = pos[0].detach()
        d = sum(torch.exp(s / t) for s in pos)
        for j in range(n):
            if j == i:
                continue
            for m in blocks[j]:
                if in_batch and ident(m) in own:
                    continue
                s = qn[i] @ vector(m)
                d = d + keep(s, s_plus, hp["a"], hp["b"], hp["clamp"]) * torch.exp(s / t)
        weights = [torch.ones((), dtype=torch.float64)] * len(pos)
        if weighting == "soft" and len(pos) > 1:
            att = torch.stack([qn[i] @ vector(m) for m in blocks[i][1:]])
            weights = [weights[0], *torch.softmax(att, dim=0)]
        terms.append(sum(w * (torch.log(d) - s / t) for w, s in zip(weights, pos)))
    return mean(terms)


def aug_reference(q, k, hp, select_on, pairing):
    t = hp["temperature"]
    n = q.shape[0]
    x = torch.cat([q, k])
    xn = unit(x)
    sigma = x if select_on == "raw" else xn
    pos, mass = [], []
    for r in range(2 * n):
        partner = (r + n) % (2 * n)
        s_plus = (sigma[r] @ sigma[partner]).detach()
        total = torch.zeros((), dtype=torch.float64)
        for c in range(2 * n):
            if c in (r, partner):
                continue
            pi = keep(sigma[r] @ sigma[c], s_plus, hp["a"], hp["b"], hp["clamp"])
            total = total + pi * torch.exp(xn[r] @ xn[c] / t)
        pos.append(torch.exp(xn[r] @ xn[partner] / t))
        mass.append(total)
    if pairing == "broadcast":
        return mean([-torch.log(p / (p + g)) for p in pos for g in mass])
    return mean([-torch.log(p / (p + g)) for p, g in zip(pos, mass)])


def potential_reference(kk, lam, weighting, select_on="cosine", pairing="matched"):
    def reference(z1, z2, bank):
        if bank is None:
            mined = (
                mined_reference(z1, z2, None, kk, weighting, PSM)
                + mined_reference(z2, z1, None, kk, weighting, PSM)
            ) / 2
        else:
            mined = mined_reference(z1, z2, bank, kk, weighting, PSM)
        if lam == 0:
            return mined
        return mined + lam * aug_reference(z1, z2, PSM, select_on, pairing)

    return reference


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize(("kk", "lam"), [(3, 0.5), (5, 0.0), (0, 1.0)])
def test_potential_expected_gradients_equal_the_float64_equations(pool, weighting, kk, lam):
    z1, z2, bank = make_inputs(n=8, pool=pool and 24, seed=11)
    loss_fn = hardneg.create_loss(
        "potential",
        **PSM,
        num_neighbors=kk,
        aug_weight=lam,
        weighting=weighting,
        sample="expected",
    )
    check(loss_fn, potential_reference(kk, lam, weighting), z1, z2, bank)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("pairing", ["matched", "broadcast"])
def test_potential_raw_kernel_and_pairings_equal_the_float64_equations(pool, pairing):
    z1, z2, bank = make_inputs(n=6, pool=pool and 20, seed=12)
    with torch.no_grad():  # raw dot products of unnormalised rows: keep them O(1)
        z1.mul_(0.4)
        z2.mul_(0.4)
    loss_fn = hardneg.create_loss(
        "potential",
        **PSM,
        num_neighbors=2,
        aug_weight=0.5,
        sample="expected",
        select_on="raw",
        aug_pairing=pairing,
    )
    check(loss_fn, potential_reference(2, 0.5, "hard", "raw", pairing), z1, z2, bank)


def test_the_debiased_floor_case_really_clamps():
    """Guard for ``test_debiased_floor_is_active_in_the_reference_case``: its inputs clamp."""
    z1, z2 = floor_inputs()
    clamped = 0
    for a, p, negs in anchors(z1.detach().double(), z2.detach().double(), None):
        m = len(negs)
        pos = torch.exp(a @ p / 0.5)
        raw = (sum(torch.exp(a @ x / 0.5) for x in negs) - 0.2 * m * pos) / 0.8
        clamped += int(raw < m * math.exp(-1 / 0.5))
    assert 0 < clamped < 16
