"""Strategies beyond the four papers, each against a re-statement of its published rule.

positive-aware filtering (NV-Retriever), SimANS sampling, stop-gradient hardness weighting
(LLaVE / sentence-transformers), and a filter composed in front of another strategy.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _laws import inclusion_probabilities

import hardneg
from hardneg.contrast import in_batch_contrast
from hardneg.mining import gumbel_top_k
from hardneg.strategies import StepContext


def views(n=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    z2 = z1 + 0.8 * torch.randn(n, d, generator=g)
    return z1, z2


def simclr_rows(z1, z2, t):
    """Per anchor of the SimCLR set-up: (positive cosine, [negative cosines]) in float64."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    sims = z @ z.T
    rows = []
    for i in range(n2):
        p = (i + n2 // 2) % n2
        rows.append((sims[i, p].item(), [sims[i, j].item() for j in range(n2) if j not in (i, p)]))
    return rows


def infonce_over(pos, negs, t, weights=None):
    weights = [1.0] * len(negs) if weights is None else weights
    mass = sum(w * math.exp(s / t) for w, s in zip(weights, negs))
    return math.log(math.exp(pos / t) + mass) - pos / t


def kept_by_rule(pos, negs, mode, margin, percent):
    limit = pos - margin if mode == "margin" else percent * pos
    kept = [s for s in negs if s <= limit]
    return kept or [min(negs)]  # our rule: never empty


@pytest.mark.parametrize("mode", ["margin", "percent"])
def test_positive_aware_filter_keeps_exactly_the_negatives_below_the_positive_rule(mode):
    z1, z2 = views(seed=1)
    t, margin, percent = 0.2, 0.1, 0.6
    loss = hardneg.create_loss(
        "positive_aware", temperature=t, mode=mode, margin=margin, percent=percent
    )
    expected = [
        infonce_over(p, kept_by_rule(p, negs, mode, margin, percent), t)
        for p, negs in simclr_rows(z1, z2, t)
    ]
    assert loss(z1, z2).item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_an_anchor_whose_negatives_all_fail_keeps_its_least_similar_one_and_stays_finite():
    z1 = torch.randn(4, 3)
    z1.requires_grad_()
    z2 = z1.detach() * -1.0  # every positive is the least similar vector: all negatives fail
    loss = hardneg.create_loss("positive_aware", mode="margin", margin=0.0)
    out = loss(z1, z2, return_diagnostics=True)
    assert bool((out.diagnostics.kept_negatives == 1).all())
    out.loss.backward()
    assert torch.isfinite(z1.grad).all()


def test_a_filter_in_front_of_hcl_equals_hcl_over_the_kept_negatives():
    z1, z2 = views(seed=2)
    t, beta, tau = 0.3, 1.5, 0.1
    composed = hardneg.create_loss(
        "hcl",
        temperature=t,
        beta=beta,
        tau_plus=tau,
        filter="positive_aware",
        filter_options={"mode": "margin", "margin": 0.05},
    )
    expected = []
    for pos, negs in simclr_rows(z1, z2, t):
        kept = kept_by_rule(pos, negs, "margin", 0.05, None)
        m = len(kept)
        neg = [math.exp(s / t) for s in kept]
        imp = [x**beta for x in neg]
        reweight = sum(i * x for i, x in zip(imp, neg)) / (sum(imp) / m)
        ng = max((reweight - tau * m * math.exp(pos / t)) / (1 - tau), m * math.exp(-1 / t))
        expected.append(math.log(math.exp(pos / t) + ng) - pos / t)
    for fast in (True, False):
        composed.fast = fast
        assert composed(z1, z2).item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def hcl_over(pos, kept, t, beta, tau):
    """HCL's per-anchor loss (Robinson et al., eq. 5 with the estimator's floor) over ``kept``."""
    m = len(kept)
    neg = [math.exp(s / t) for s in kept]
    imp = [x**beta for x in neg]
    reweight = sum(i * x for i, x in zip(imp, neg)) / (sum(imp) / m)
    ng = max((reweight - tau * m * math.exp(pos / t)) / (1 - tau), m * math.exp(-1 / t))
    return math.log(math.exp(pos / t) + ng) - pos / t


def test_false_negative_cancellation_as_a_filter_in_front_of_hcl_drops_the_found_negatives():
    """Huynh et al.'s elimination in front of HCL: each anchor's support view is its positive
    (two views); the ``top_k`` negatives most similar to it leave, and HCL weights the rest."""
    z1, z2 = views(n=7, seed=5)
    t, beta, tau, top_k = 0.4, 1.0, 0.1, 2
    composed = hardneg.create_loss(
        "hcl", temperature=t, beta=beta, tau_plus=tau, filter="fnc", filter_options={"top_k": top_k}
    )
    assert composed.filter_strategy.mode == "eliminate"  # the filter's default
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    sims = (z @ z.T).tolist()
    expected = []
    for i in range(n2):
        p = (i + n2 // 2) % n2
        negatives = [j for j in range(n2) if j not in (i, p)]
        found = sorted(negatives, key=lambda j: -sims[p][j])[:top_k]  # support: the positive
        kept = [sims[i][j] for j in negatives if j not in found]
        expected.append(hcl_over(sims[i][p], kept, t, beta, tau))
    for fast in (True, False):
        composed.fast = fast
        assert composed(z1, z2).item() == pytest.approx(sum(expected) / n2, rel=1e-5)
    plain = hardneg.create_loss("hcl", temperature=t, beta=beta, tau_plus=tau)
    assert plain(z1, z2).item() != pytest.approx(sum(expected) / n2, rel=1e-3)


def test_false_negative_cancellation_as_a_filter_on_retrieval_rows():
    """Text retrieval ``(anchor, positive, negative_1..h)``: anchor ``i``'s candidates are the
    other positives and every hard negative of the batch; the one most similar to its positive
    (the support view) is cancelled, and InfoNCE runs over the rest."""
    g = torch.Generator().manual_seed(9)
    b, h, d, t = 5, 2, 6, 0.2
    q = torch.randn(b, d, generator=g)
    pos = q + 0.7 * torch.randn(b, d, generator=g)
    hard = pos.unsqueeze(1) + 0.5 * torch.randn(b, h, d, generator=g)  # near the positives
    loss = hardneg.create_loss("infonce", temperature=t, filter="fnc")
    unit = lambda x: F.normalize(x.double(), dim=-1)  # noqa: E731
    qn, columns = unit(q), unit(torch.cat([pos, hard.reshape(-1, d)]))
    expected = []
    for i in range(b):
        candidates = [c for c in range(columns.shape[0]) if c != i]
        support = [float(columns[i] @ columns[c]) for c in candidates]
        found = candidates[max(range(len(candidates)), key=support.__getitem__)]
        kept = [float(qn[i] @ columns[c]) for c in candidates if c != found]
        expected.append(infonce_over(float(qn[i] @ columns[i]), kept, t))
    got = loss(q, pos, hard_negatives=hard).item()
    assert got == pytest.approx(sum(expected) / b, rel=1e-5)


def test_false_negative_cancellation_cannot_attract_as_a_filter():
    message = (
        "as a filter, fnc can only eliminate its false negatives (mode='eliminate'); got "
        "mode='attract': to attract them as positives, use the fnc loss itself"
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hardneg.create_loss("hcl", filter="fnc", filter_options={"mode": "attract"})


def test_a_filter_must_be_a_filter():
    with pytest.raises(ValueError, match="filter must name a filter strategy"):
        hardneg.create_loss("hcl", filter="ring")
    with pytest.raises(
        ValueError,
        match=r"got 'positive_awre' \(did you mean 'positive_aware'\?\); allowed: positive_aware, fnc$",
    ):
        hardneg.create_loss("hcl", filter="positive_awre")
    with pytest.raises(ValueError, match="filter_options needs a filter"):
        hardneg.create_loss("hcl", filter_options={"margin": 0.1})


# ------------------------------------------------------------------------------- SimANS


@pytest.mark.parametrize("k", [1, 2])
def test_gumbel_top_k_draws_without_replacement_with_the_sequential_law(k):
    log_p = torch.tensor([[0.0, -1.0, 1.5, -3.0, float("-inf")]])
    p = torch.softmax(log_p[0, :4].double(), 0).tolist()
    expected = inclusion_probabilities(p, k) + [0.0]
    trials = 20000
    g = torch.Generator().manual_seed(3)
    # the miner's draw (indices) as a mask of the drawn columns
    picks = gumbel_top_k(log_p.expand(trials, -1).contiguous(), k, g)
    drawn = torch.zeros(trials, 5, dtype=torch.bool).scatter_(1, picks, True)
    assert bool((drawn.sum(dim=1) == k).all())  # k distinct columns: without replacement
    counts = drawn.double().mean(dim=0)
    for got, want in zip(counts.tolist(), expected):
        assert got == pytest.approx(want, abs=0.015)


@pytest.mark.parametrize("fast", [True, False, "accelerator"])
@pytest.mark.parametrize(("a", "b", "k"), [(0.3, -1.0, 1), (0.3, -1.0, 2), (0.0, 0.0, 2)])
def test_simans_draws_follow_the_kernel_without_replacement(a, b, k, fast, monkeypatch):
    """The strategy's own draws, plain and fast (``fastpaths.simans_draw``, a block of rows at
    a time: 20000 rows are two blocks): inclusion frequencies of each negative against the
    exact probabilities of ``k`` sequential draws without replacement,
    ``p ∝ e^{-a (c - c+ - b)^2}``; the masked column (the query's own bank entry) is never
    drawn. ``'accelerator'``: the fast draw's ``torch.topk`` branch (what a CUDA machine
    runs), forced on the CPU."""
    from hardneg import fastpaths
    from hardneg.contrast import pool_contrast

    if fast == "accelerator":
        monkeypatch.setattr(fastpaths, "numpy_partitions", lambda t: False)
        fast = True

    g = torch.Generator().manual_seed(9)
    q, key, pool = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g), torch.randn(5, 4)
    t, trials = 0.5, 20000
    contrast = pool_contrast(
        q.expand(trials, -1),
        key.expand(trials, -1),
        pool,
        temperature=t,
        exclude_index=torch.full((trials,), 2),
    )
    strategy = hardneg.registry.strategy_class("simans")(a=a, b=b, num_samples=k)
    context = StepContext(generator=torch.Generator().manual_seed(4), fast=fast)
    drawn = strategy.draw(contrast, context)
    counts = torch.zeros(trials, 5).scatter_(1, drawn, 1.0)
    assert bool((counts.sum(dim=1) == k).all())
    c, c_pos = contrast.negative_logits[0].double(), contrast.positive_logits[0, 0].double()
    negatives = [0, 1, 3, 4]
    kernel = [math.exp(-a * float(c[j] - c_pos - b) ** 2) for j in negatives]
    expected = inclusion_probabilities([x / sum(kernel) for x in kernel], k)
    assert float(counts[:, 2].sum()) == 0.0
    for j, want in zip(negatives, expected):
        assert float(counts[:, j].mean()) == pytest.approx(want, abs=0.015)


def test_simans_weights_mode_is_the_kernel_normalised_over_the_negatives():
    z1, z2 = views(seed=4)
    t, a, b = 0.2, 0.3, -1.0
    loss = hardneg.create_loss("simans", temperature=t, a=a, b=b, num_samples=None)
    expected = []
    for pos, negs in simclr_rows(z1, z2, t):
        kernel = [math.exp(-a * (s / t - pos / t - b) ** 2) for s in negs]
        mean = sum(kernel) / len(kernel)
        expected.append(infonce_over(pos, negs, t, [k / mean for k in kernel]))
    assert loss(z1, z2).item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_simans_sampling_keeps_num_samples_negatives_and_is_repeatable_with_a_generator():
    z1, z2 = views(n=10, seed=5)
    loss = hardneg.create_loss("simans", num_samples=5)
    out = loss(z1, z2, generator=torch.Generator().manual_seed(0), return_diagnostics=True)
    assert bool((out.diagnostics.kept_negatives == 5).all())
    once = loss(z1, z2, generator=torch.Generator().manual_seed(0))
    again = loss(z1, z2, generator=torch.Generator().manual_seed(0))
    assert again.item() == once.item()
    # the same draws whether the loss sums the drawn columns or weighs every column (the
    # diagnostics take the plain path; the fast path draws other columns by the same law)
    plain = hardneg.create_loss("simans", num_samples=5, fast=False)
    once = plain(z1, z2, generator=torch.Generator().manual_seed(0))
    assert once.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_simans_kernel_stays_in_log_space_at_a_tiny_temperature():
    z1, z2 = views(seed=6)
    contrast = in_batch_contrast([z1, z2], temperature=0.001)
    strategy = hardneg.registry.strategy_class("simans")(a=5.0, num_samples=3)
    context = StepContext(generator=torch.Generator().manual_seed(1), want_log_mass=False)
    sel = strategy.select(contrast, context)
    kept = torch.isfinite(sel.negative_log_weights) & contrast.negative_mask
    assert bool((kept.sum(dim=1) == 3).all())  # exp(-5 * 1e6) underflows; the log does not
    value = hardneg.create_loss("simans", temperature=0.001, a=5.0, num_samples=3)(z1, z2)
    assert torch.isfinite(value)


# ------------------------------------------------------------------- stop-gradient hardness


def test_hardness_equals_cross_entropy_with_the_stop_gradient_bonus_on_negatives():
    z1, z2 = views(seed=7)
    t, alpha = 0.05, 9.0
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    got = hardneg.create_loss("hardness", temperature=t, alpha=alpha)(a1, a2)
    got.backward()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    z = F.normalize(torch.cat([b1, b2]), dim=1)
    cos = z @ z.T
    n2 = cos.shape[0]
    target = (torch.arange(n2) + n2 // 2) % n2
    bonus = alpha * cos.detach()
    bonus[torch.arange(n2), target] = 0.0  # the positive is unchanged
    logits = (cos / t + bonus).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    ref = F.cross_entropy(logits, target)
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(a1.grad, b1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a2.grad, b2.grad, rtol=1e-4, atol=1e-6)


def test_hardness_and_detached_hcl_share_relative_weights_and_differ_by_hcls_normaliser():
    z1, z2 = views(seed=8)
    t, beta = 0.5, 1.2
    alpha = beta / t
    hard = hardneg.create_loss("hardness", temperature=t, alpha=alpha)
    hcl = hardneg.create_loss("hcl", temperature=t, beta=beta, tau_plus=0.0, detach_weights=True)
    # the same distribution over each anchor's negatives
    d_hard = hard(z1, z2, return_diagnostics=True).diagnostics.sampling_weights
    d_hcl = hcl(z1, z2, return_diagnostics=True).diagnostics.sampling_weights
    torch.testing.assert_close(d_hard, d_hcl, rtol=1e-5, atol=1e-7)
    # ... but HCL divides out mean_j e^{beta c_ij}: the losses agree only after that shift
    rows = simclr_rows(z1, z2, t)
    hcl_ref = hard_ref = 0.0
    for pos, negs in rows:
        w = [math.exp(beta * s / t) for s in negs]
        mean = sum(w) / len(w)
        hard_ref += infonce_over(pos, negs, t, w)
        hcl_ref += infonce_over(pos, negs, t, [x / mean for x in w])
    assert hard(z1, z2).item() == pytest.approx(hard_ref / len(rows), rel=1e-5)
    assert hcl(z1, z2).item() == pytest.approx(hcl_ref / len(rows), rel=1e-5)
    assert abs(hard_ref - hcl_ref) > 1e-3  # they differ when the mean is not 1
    zero = [
        hardneg.create_loss(n, temperature=t, **kw)(z1, z2).item()
        for n, kw in (("hardness", dict(alpha=0.0)), ("hcl", dict(beta=0.0, tau_plus=0.0)))
    ]
    assert zero[0] == pytest.approx(zero[1], rel=1e-6)


@pytest.mark.parametrize("mode", ["all_negatives", "in_batch_negatives", "hard_negatives"])
def test_hardness_modes_touch_the_negatives_sentence_transformers_names(mode):
    a, p, n = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 2, 5)
    t, alpha = 0.1, 5.0
    loss = hardneg.create_loss("hardness", temperature=t, alpha=alpha, mode=mode)
    cand = F.normalize(torch.cat([p, n.reshape(-1, 5)]), dim=1)
    cos = F.normalize(a, dim=1) @ cand.T
    owner = torch.tensor([0, 1, 2, 3, 0, 0, 1, 1, 2, 2, 3, 3])  # column -> its anchor's tuple
    own = owner.unsqueeze(0) == torch.arange(4).unsqueeze(1)
    hard = torch.zeros(4, 12, dtype=torch.bool)
    hard[:, 4:] = True
    chosen = {
        "all_negatives": ~own | hard,
        "in_batch_negatives": ~own,
        "hard_negatives": own & hard,
    }
    bonus = torch.where(chosen[mode], alpha * cos, 0.0)
    bonus[torch.arange(4), torch.arange(4)] = 0.0  # never the positive
    ref = F.cross_entropy(cos / t + bonus, torch.arange(4))
    assert loss(a, p, hard_negatives=n).item() == pytest.approx(ref.item(), rel=1e-5)


def test_hcl_takes_the_fused_log_mass_only_when_fast_and_the_objective_needs_just_the_mass(
    monkeypatch,
):
    """``fastpaths`` is called only under ``fast=True`` with the InfoNCE objective (which reads
    nothing but each anchor's log-mass); ``fast=False``, diagnostics and JSD take the weights."""
    calls = []
    fused = hardneg.fastpaths.tilted_log_mass

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(hardneg.fastpaths, "tilted_log_mass", spy)
    z1, z2 = views(n=6, d=5, seed=3)
    hardneg.create_loss("hcl", beta=1.0)(z1, z2)
    assert len(calls) == 1
    hardneg.create_loss("hcl", beta=1.0, fast=False)(z1, z2)
    hardneg.create_loss("hcl", beta=1.0)(z1, z2, return_diagnostics=True)
    hardneg.create_loss("hcl", beta=1.0, objective="jsd")(z1, z2)
    assert len(calls) == 1
