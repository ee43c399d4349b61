"""The objectives (``hardneg.objectives``) against a float64 anchor-by-anchor re-statement.

The oracle below is written from the module docstring's equations, one anchor and one positive at
a time with scalar tensors (so autograd gives its gradients too): every option the objectives
take (negative log-weights with dropped columns, a precomputed log-mass, synthetic negatives and
positives with weights, padding positives, a per-anchor or overridden ``M``, ``tau_plus`` with
its clamp, ``separate`` / ``joint``, ``mean`` / ``sum``) is compared in value and in gradient.
Written for mutation testing (docs/testing.md): each case exists because a mutant survived
without it.
"""

from __future__ import annotations

import math

import pytest
import torch

from hardneg.contrast import ContrastSet
from hardneg.objectives import (
    debias_log_mass,
    infonce_objective,
    jsd_objective,
    objective_loss,
    safe_logsumexp,
)
from hardneg.strategies import Selection

NEG_INF = float("-inf")


def contrast_of(pos, neg, t=1.0, num_negatives=None, weight=None):
    a = pos.shape[0]
    return ContrastSet(
        anchors=torch.zeros(a, 1, dtype=pos.dtype),
        columns=torch.zeros(neg.shape[1], 1, dtype=pos.dtype),
        anchor_columns=None,
        positives=torch.zeros(a, pos.shape[1], 1, dtype=pos.dtype),
        positive_logits=pos,
        positive_weight=torch.ones_like(pos) if weight is None else weight,
        positive_index=None,
        negative_logits=neg,
        negative_mask=torch.isfinite(neg),
        num_negatives=torch.isfinite(neg).sum(dim=1) if num_negatives is None else num_negatives,
        temperature=t,
    )


def finite(x):
    return math.isfinite(float(x.detach()) if isinstance(x, torch.Tensor) else x)


def lse(values):
    return torch.logsumexp(torch.stack(values), dim=0)


def oracle_positives(contrast, sel, i):
    """Anchor ``i``'s positive logits and weights, extras (weight 1 unless given) appended."""
    pos = list(contrast.positive_logits[i])
    pw = contrast.positive_weight if sel.positive_weight is None else sel.positive_weight
    weights = [float(w) for w in pw[i]]
    if sel.extra_positive_logits is not None:
        pos += list(sel.extra_positive_logits[i])
        ew = sel.extra_positive_weight
        weights += [1.0] * len(sel.extra_positive_logits[i]) if ew is None else ew[i].tolist()
    return pos, weights


def oracle_infonce(contrast, sel, tau, mode, reduction):
    """Per-anchor loss, anchor by anchor, from the module docstring's equations."""
    out = []
    for i in range(contrast.positive_logits.shape[0]):
        pos, weights = oracle_positives(contrast, sel, i)
        terms = []  # log of each term of R_i
        if sel.negative_log_mass is not None:
            terms.append(sel.negative_log_mass[i])
        else:
            for j, c in enumerate(contrast.negative_logits[i]):
                lw = 0.0 if sel.negative_log_weights is None else sel.negative_log_weights[i, j]
                if finite(c) and finite(lw):
                    terms.append(c + lw)
        m = contrast.num_negatives if sel.num_negatives is None else sel.num_negatives
        m = float(m[i]) if isinstance(m, torch.Tensor) else float(m)
        if sel.extra_negative_logits is not None:
            terms += list(sel.extra_negative_logits[i])
            m += sel.extra_negative_logits.shape[1]
        r = torch.exp(lse(terms)) if terms else torch.zeros((), dtype=torch.float64)
        kept = [(a, w) for a, w in zip(pos, weights) if w > 0]
        losses = []
        for a, _ in kept:
            ng = r
            if tau > 0:
                floor = m * math.exp(-1.0 / contrast.temperature)
                ng = torch.clamp((r - tau * m * torch.exp(a)) / (1 - tau), min=floor)
            if mode == "joint" and len(pos) > 1:
                denom = sum(torch.exp(b) for b, _ in kept) + ng
            else:
                denom = torch.exp(a) + ng
            losses.append(torch.log(denom) - a)
        total = sum(w * x for (_, w), x in zip(kept, losses))
        out.append(total if reduction == "sum" else total / sum(w for _, w in kept))
    return torch.stack(out)


def draw(seed, *shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()


def case(name):
    """(contrast, selection, tau, leaves) of one configuration."""
    pos, neg = draw(1, 4, 3), draw(2, 4, 6)
    log_w = draw(3, 4, 6)
    with torch.no_grad():
        neg[0, 2] = NEG_INF  # not a negative of anchor 0
        log_w[1, 4] = NEG_INF  # dropped by the strategy
    weight = torch.tensor(
        [[1.0, 1.0, 0.0], [1.0, 0.5, 2.0], [1.0, 0.0, 0.0], [0.25, 1.0, 1.0]], dtype=torch.float64
    )
    leaves = [pos, neg]
    if name == "weighted separate, padding":
        with torch.no_grad():
            pos[0, 2] = NEG_INF  # padding need not be finite
        contrast = contrast_of(pos, neg, weight=weight)
        return contrast, Selection(negative_log_weights=log_w), 0.0, leaves + [log_w]
    if name == "debiased per-anchor M, extras":
        extra_neg, extra_pos = draw(4, 4, 2), draw(5, 4, 1)
        ew = torch.tensor([[0.5], [0.0], [2.0], [1.0]], dtype=torch.float64)
        contrast = contrast_of(pos, neg, t=0.5, weight=weight)
        sel = Selection(
            negative_log_weights=log_w,
            extra_negative_logits=extra_neg,
            extra_positive_logits=extra_pos,
            extra_positive_weight=ew,
        )
        return contrast, sel, 0.2, leaves + [log_w, extra_neg, extra_pos]
    if name == "debiased int M override, clamp":
        # large positives and tau: R - tau M e^a < 0 for some pairs (the clamp holds)
        with torch.no_grad():
            pos[:, 0] += 3.0
        contrast = contrast_of(pos, neg, t=0.7, num_negatives=5)
        sel = Selection(num_negatives=3, extra_positive_logits=draw(6, 4, 2))
        return contrast, sel, 0.6, leaves + [sel.extra_positive_logits]
    if name == "log mass, extra negatives":
        log_mass = draw(7, 4)
        extra_neg = draw(8, 4, 3)
        contrast = contrast_of(pos[:, :1], neg, t=0.3, num_negatives=6)
        sel = Selection(negative_log_mass=log_mass, extra_negative_logits=extra_neg)
        return contrast, sel, 0.1, leaves + [log_mass, extra_neg]
    if name == "one positive, weight":
        contrast = contrast_of(pos[:, :1], neg)
        sel = Selection(positive_weight=torch.full((4, 1), 0.5, dtype=torch.float64))
        return contrast, sel, 0.0, leaves
    if name == "debiased one positive":  # the fused debiased terms when fast
        contrast = contrast_of(pos[:, :1], neg, t=0.5)
        return contrast, Selection(negative_log_weights=log_w), 0.3, leaves + [log_w]
    if name == "unit weights, extras":  # the joint terms without weights when fast
        contrast = contrast_of(pos[:, :1], neg, t=0.5)
        sel = Selection(extra_positive_logits=draw(9, 4, 2), unit_positive_weights=True)
        return contrast, sel, 0.0, leaves + [sel.extra_positive_logits]
    raise AssertionError(name)


CASES = [
    "weighted separate, padding",
    "debiased per-anchor M, extras",
    "debiased int M override, clamp",
    "log mass, extra negatives",
    "one positive, weight",
    "debiased one positive",
    "unit weights, extras",
]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["separate", "joint"])
@pytest.mark.parametrize("name", CASES)
def test_infonce_objective_equals_the_equations_in_value_and_gradient(name, mode, reduction, fast):
    """Plain and fast (the fused terms of hardneg.fastpaths where they apply: one positive with
    ``tau_plus > 0``, or every positive weight 1 in the joint sum) against the equations."""
    contrast, sel, tau, leaves = case(name)
    got = infonce_objective(
        contrast, sel, tau_plus=tau, positive_mode=mode, positive_reduction=reduction, fast=fast
    )
    expected = oracle_infonce(contrast, sel, tau, mode, reduction)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    probe = torch.linspace(0.5, 2.0, got.shape[0], dtype=torch.float64)
    grads = torch.autograd.grad((got * probe).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad((expected * probe).sum(), leaves, allow_unused=True)
    for g, w in zip(grads, want):
        if g is None and w is None:
            continue
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        assert torch.isfinite(g).all()


def test_the_clamp_case_exercises_both_branches():
    """Guard of the case above: some pairs are clamped, some are not."""
    contrast, sel, tau, _ = case("debiased int M override, clamp")
    with torch.no_grad():
        pos = torch.cat([contrast.positive_logits, sel.extra_positive_logits], dim=1)
        r = torch.logsumexp(contrast.negative_logits, dim=1, keepdim=True).exp()
        clamped = r - tau * 3 * pos.exp() < 0
    assert clamped.any() and (~clamped).any()


def test_debias_log_mass_is_the_clamped_estimator():
    log_mass = torch.tensor([[1.0], [0.0], [2.0]], dtype=torch.float64)
    pos = torch.tensor([[0.5], [1.0], [-3.0]], dtype=torch.float64)
    tau, m, t = 0.25, 4, 0.5
    got = debias_log_mass(log_mass, pos, tau_plus=tau, num_negatives=m, temperature=t)
    for i in range(3):
        r, a = math.exp(log_mass[i, 0]), math.exp(pos[i, 0])
        ng = max((r - tau * m * a) / (1 - tau), m * math.exp(-1 / t))
        assert got[i, 0].item() == pytest.approx(math.log(ng), rel=1e-12)
    # the floor also bounds a positive but tiny remainder: R slightly above tau M e^a
    tiny = torch.tensor([[math.log(tau * m * math.e + 1e-6)]], dtype=torch.float64)
    got = debias_log_mass(tiny, torch.ones(1, 1, dtype=torch.float64), tau_plus=tau,
                          num_negatives=m, temperature=t)  # fmt: skip
    assert got.item() == pytest.approx(math.log(m) - 1 / t, rel=1e-12)
    # tau_plus = 0 returns log R untouched
    assert debias_log_mass(log_mass, pos, tau_plus=0.0, num_negatives=m, temperature=t) is log_mass


def test_a_remainder_of_exactly_zero_is_clamped_with_a_zero_gradient():
    """``R = tau_plus M e^a`` exactly (``log(0.5) + log(2) == 0`` in floating point): the floor
    holds and no gradient (not NaN) flows into ``log R`` or the positive."""
    log_mass = torch.tensor([[0.0], [0.0]], dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    got = debias_log_mass(log_mass, pos, tau_plus=0.5, num_negatives=2, temperature=0.5)
    assert got[0, 0].item() == math.log(2) - 2.0
    assert got[1, 0].item() == pytest.approx(math.log((1 - math.exp(-1)) / 0.5), rel=1e-12)
    got.sum().backward()
    assert log_mass.grad[0, 0].item() == 0.0 and pos.grad[0, 0].item() == 0.0
    assert log_mass.grad[1, 0].item() != 0.0


def test_safe_logsumexp_of_an_empty_row_is_minus_infinity_with_a_zero_gradient():
    x = torch.tensor([[0.5, NEG_INF, 1.0], [NEG_INF, NEG_INF, NEG_INF]], requires_grad=True)
    out = safe_logsumexp(x)
    assert out[0].item() == pytest.approx(math.log(math.exp(0.5) + math.e), rel=1e-6)
    assert out[1].item() == NEG_INF
    out[0].backward()
    assert x.grad[1].tolist() == [0.0, 0.0, 0.0]
    assert x.grad[0, 1].item() == 0.0
    # over dim 0
    col = safe_logsumexp(x.detach().T, dim=0)
    assert col[1].item() == NEG_INF and col[0].item() == pytest.approx(out[0].item())


def oracle_jsd(contrast, sel, tau):
    sp = torch.nn.functional.softplus
    log2 = math.log(2.0)
    out = []
    for i in range(contrast.positive_logits.shape[0]):
        pos, weights = oracle_positives(contrast, sel, i)
        kept = [(a, w) for a, w in zip(pos, weights) if w > 0]
        norm = sum(w for _, w in kept)
        e_pos = sum(w * (log2 - sp(-a)) for a, w in kept) / norm
        correction = tau / (1 - tau) * sum(w * sp(a) for a, w in kept) / norm
        num, den = 0.0, 0.0
        for j, c in enumerate(contrast.negative_logits[i]):
            lw = 0.0 if sel.negative_log_weights is None else sel.negative_log_weights[i, j]
            if finite(c) and finite(lw):
                w = torch.exp(torch.as_tensor(lw, dtype=torch.float64))
                num, den = num + w * sp(c), den + w
        if sel.extra_negative_logits is not None:
            for c in sel.extra_negative_logits[i]:
                num, den = num + sp(c), den + 1.0
        if isinstance(den, float) and den == 0.0:  # no negative kept: no negative side at all
            out.append(-e_pos)
            continue
        mean_neg = num / den
        if tau > 0:
            mean_neg = mean_neg / (1 - tau)
            e_pos = e_pos - correction
        out.append(mean_neg - log2 - e_pos)
    return torch.stack(out)


@pytest.mark.parametrize("tau", [0.0, 0.3])
@pytest.mark.parametrize("extras", [False, True])
# a padding positive (weight 0) may hold any logit, -inf or +inf included: it must not count
@pytest.mark.parametrize("padding", [40.0, NEG_INF, float("inf")], ids=["40", "-inf", "+inf"])
def test_jsd_objective_equals_the_equations_with_padding_and_synthetic_columns(
    tau, extras, padding
):
    pos, neg = draw(11, 3, 2, scale=2.0), draw(12, 3, 5, scale=2.0)
    log_w = draw(13, 3, 5)
    with torch.no_grad():
        pos[1, 1] = padding  # padding (weight 0): far from the other logits
        neg[0, 3] = NEG_INF
        log_w[2, 0] = NEG_INF
    weight = torch.tensor([[1.0, 0.5], [2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    contrast = contrast_of(pos, neg, weight=weight)
    leaves = [pos, neg, log_w]
    sel = Selection(negative_log_weights=log_w)
    if extras:
        sel.extra_negative_logits = draw(14, 3, 2)
        sel.extra_positive_logits = draw(15, 3, 1)
        leaves += [sel.extra_negative_logits, sel.extra_positive_logits]
    got = jsd_objective(contrast, sel, tau_plus=tau)
    expected = oracle_jsd(contrast, sel, tau)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), leaves)
    want = torch.autograd.grad(expected.sum(), leaves)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # the dispatcher gives the same
    via = objective_loss("jsd", contrast, sel, tau_plus=tau, positive_mode="joint")
    torch.testing.assert_close(via, expected, rtol=1e-10, atol=1e-12)


def test_jsd_without_weights_is_the_plain_mean_over_the_negatives():
    pos, neg = draw(16, 2, 1), draw(17, 2, 4)
    with torch.no_grad():
        neg[1, 1] = NEG_INF
    contrast = contrast_of(pos, neg)
    got = jsd_objective(contrast, Selection())
    torch.testing.assert_close(got, oracle_jsd(contrast, Selection(), 0.0), rtol=1e-10, atol=0)


@pytest.mark.parametrize("tau", [0.0, 0.3])
@pytest.mark.parametrize("how", ["weights", "mask"])
def test_jsd_of_an_anchor_that_keeps_no_negative_is_its_positive_side_alone(tau, how):
    # InfoNCE's loss of such an anchor is 0; the Jensen-Shannon estimator has no negative
    # expectation to take: -E+ (no debiasing correction), finite, with finite gradients
    pos, neg, log_w = draw(21, 3, 2), draw(22, 3, 4), draw(23, 3, 4)
    with torch.no_grad():
        if how == "weights":
            log_w[1] = NEG_INF  # the strategy drops every negative of anchor 1
        else:
            neg[1] = NEG_INF  # anchor 1 has no negative column at all
    contrast = contrast_of(pos, neg)
    sel = Selection(negative_log_weights=log_w)
    got = jsd_objective(contrast, sel, tau_plus=tau)
    sp = torch.nn.functional.softplus
    alone = (math.log(2.0) - sp(-pos[1])).mean()
    torch.testing.assert_close(got[1], -alone, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, oracle_jsd(contrast, sel, tau), rtol=1e-10, atol=1e-12)
    leaves = [pos, neg, log_w]
    grads = torch.autograd.grad(got.sum(), leaves, allow_unused=True)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    assert float(grads[0][1].abs().sum()) > 0  # the positive side still trains anchor 1


def test_jsd_refuses_a_selection_with_only_a_log_mass():
    contrast = contrast_of(draw(18, 2, 1), draw(19, 2, 3))
    with pytest.raises(ValueError, match="^the Jensen-Shannon objective needs dense negative"):
        jsd_objective(contrast, Selection(negative_log_mass=torch.zeros(2, dtype=torch.float64)))
    both = Selection(
        negative_log_mass=torch.zeros(2, dtype=torch.float64),
        negative_log_weights=torch.zeros(2, 3, dtype=torch.float64),
    )
    assert torch.isfinite(jsd_objective(contrast, both)).all()


@pytest.mark.parametrize("mode", ["separate", "joint"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_objective_loss_passes_every_option_to_infonce(mode, reduction):
    contrast, sel, tau, _ = case("debiased per-anchor M, extras")
    got = objective_loss(
        "infonce", contrast, sel, tau_plus=tau, positive_mode=mode, positive_reduction=reduction
    )
    torch.testing.assert_close(got, oracle_infonce(contrast, sel, tau, mode, reduction))


def test_objective_loss_names_the_objectives_it_knows():
    contrast = contrast_of(draw(20, 2, 1), draw(21, 2, 3))
    with pytest.raises(ValueError) as err:
        objective_loss("nce", contrast, Selection())
    assert str(err.value) == "objective must be one of 'infonce', 'jsd', got 'nce'"


def test_the_defaults_are_plain_infonce_with_separate_positives_averaged():
    contrast, sel, _, _ = case("weighted separate, padding")
    expected = oracle_infonce(contrast, sel, 0.0, "separate", "mean")
    torch.testing.assert_close(infonce_objective(contrast, sel), expected)
    torch.testing.assert_close(objective_loss("infonce", contrast, sel), expected)
    contrast, sel, _, _ = case("debiased per-anchor M, extras")  # finite padding for JSD
    plain = Selection(negative_log_weights=sel.negative_log_weights)
    torch.testing.assert_close(
        objective_loss("jsd", contrast, plain), jsd_objective(contrast, plain, tau_plus=0.0)
    )
    torch.testing.assert_close(jsd_objective(contrast, plain), oracle_jsd(contrast, plain, 0.0))


def test_an_unknown_positive_mode_or_reduction_is_refused():
    contrast, sel, _, _ = case("one positive, weight")
    message = (
        "positive_mode must be one of ('separate', 'joint', 'pooled') and positive_reduction one of "
        "('mean', 'sum'), got {!r} and {!r}"
    )
    for mode, reduction in [("jiont", "mean"), ("separate", "avg")]:
        with pytest.raises(ValueError) as err:
            objective_loss(
                "infonce", contrast, sel, positive_mode=mode, positive_reduction=reduction
            )
        assert str(err.value) == message.format(mode, reduction)


def test_two_positives_of_unequal_weight_are_averaged_per_anchor():
    pos, neg = draw(30, 3, 2).detach(), draw(31, 3, 4).detach()
    weight = torch.tensor([[1.0, 0.25], [0.5, 2.0], [1.0, 1.0]], dtype=torch.float64)
    contrast = contrast_of(pos, neg, weight=weight)
    got = infonce_objective(contrast, Selection())
    assert got.shape == (3,)
    torch.testing.assert_close(got, oracle_infonce(contrast, Selection(), 0.0, "separate", "mean"))


def test_a_single_positives_weight_cancels_exactly():
    pos, neg = draw(32, 16, 1).detach(), draw(33, 16, 5).detach()
    plain = infonce_objective(contrast_of(pos, neg), Selection())
    weighted = Selection(positive_weight=torch.full((16, 1), 0.1, dtype=torch.float64))
    assert torch.equal(infonce_objective(contrast_of(pos, neg), weighted), plain)


def test_the_loss_has_the_logits_precision_whatever_the_weights_dtype():
    pos, neg = draw(34, 3, 2).float(), draw(35, 3, 4).float()
    sel = Selection(
        positive_weight=torch.tensor([[1.0, 0.5]] * 3, dtype=torch.float64),
        extra_positive_logits=torch.zeros(3, 1),
        extra_positive_weight=torch.ones(3, 1, dtype=torch.float64),
    )
    for mode in ("separate", "joint"):
        assert (
            infonce_objective(contrast_of(pos, neg), sel, positive_mode=mode).dtype == torch.float32
        )
    assert jsd_objective(contrast_of(pos, neg), sel).dtype == torch.float32
