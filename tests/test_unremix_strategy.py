"""UnReMix (``unremix``, our reconstruction: docs/methods.md sec. 3) through the public API against
a float64 loop of its definition, one anchor and one negative at a time:

* ``delta_i = (1/t)(sum_k p_ik z_k - z_{i+})`` over the anchor's positive and negatives (a pool
  entry: ``(1/t)(sum_i p~_ji q_i - z_j)``, ``p~_j`` the softmax over the anchors that have it);
* ``U_ij = cos(delta_i, delta_j) cos(h_i, h_j)`` or ``U_j = ||delta_j|| ||h_j||``;
  ``D_j = mean_{k != j}(1 - s_jk)`` over the columns (``1 - D~`` for ``density``);
* min-max of each over the anchor's negatives (a constant row gives 0), the mix
  ``lambda_u U~ + lambda_d D~ + eps`` (no gradient) times the tilt ``e^{beta c_ij}``;
* the InfoNCE loss with the negative mass ``M sum_j w_j e^{c_j} / sum_j w_j`` (``tau_plus = 0``).

Written for mutation testing (docs/testing.md): nothing here calls the strategy's own helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hardneg
from hardneg.strategies import StepContext, UnReMixNegatives
from hardneg.strategies.unremix import column_gradients, minmax_over_negatives


def z(n, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def lse(values):
    """Log-sum-exp of a list of float64 scalars (tensors), differentiable."""
    return torch.logsumexp(torch.stack(list(values)), dim=0)


def cos(x, y):
    return float(x @ y) / (float(x.norm()) * float(y.norm()))


class Layout:
    """Anchors, their (first) positives, the shared columns and each anchor's negatives
    (positions); ``every_positive``: each anchor's list of positives when it has several."""

    def __init__(self, anchors, positives, columns, negatives, in_batch, h_a=None, h_c=None):
        self.anchors, self.positives, self.columns = anchors, positives, columns
        self.negatives, self.in_batch = negatives, in_batch
        self.every_positive = [[p] for p in positives]
        self.h_a = anchors.detach() if h_a is None else h_a.double()
        self.h_c = columns.detach() if h_c is None else h_c.double()


def in_batch_layout(z1, z2, h=None, ids=None):
    zz = F.normalize(torch.cat([z1, z2]), dim=1)
    n2, n = zz.shape[0], z1.shape[0]
    partner = [(i + n) % n2 for i in range(n2)]
    sample = list(range(n)) * 2 if ids is None else list(ids) * 2  # duplicates: equal ids
    negatives = [[j for j in range(n2) if sample[j] != sample[i]] for i in range(n2)]
    return Layout(zz, zz[partner], zz, negatives, True, h, h)


def three_view_layout(v1, v2, v3):
    """In-batch over 3 views: each anchor's positives are its sample's 2 other views, in view
    order (the first one is the one the influence score's gradient uses)."""
    zz = F.normalize(torch.cat([v1, v2, v3]), dim=1)
    n = v1.shape[0]
    others = [[v * n + i % n for v in range(3) if v != i // n] for i in range(3 * n)]
    negatives = [[j for j in range(3 * n) if j % n != i % n] for i in range(3 * n)]
    lay = Layout(zz, zz[[o[0] for o in others]], zz, negatives, True)
    lay.every_positive = [[zz[j] for j in o] for o in others]
    return lay


def pool_layout(q, k, pool, exclude=None, h_a=None, h_c=None):
    qn, kn, pn = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(pool, dim=1)
    negatives = [
        [j for j in range(pool.shape[0]) if exclude is None or j != exclude[i]]
        for i in range(q.shape[0])
    ]
    return Layout(qn, kn, pn, negatives, False, h_a, h_c)


def deltas(lay, t):
    """``(delta of each anchor, delta of each column)``, float64, detached."""
    a, p, c = lay.anchors.detach(), lay.positives.detach(), lay.columns.detach()
    anchor_deltas = []
    for i in range(a.shape[0]):
        support = [p[i]] + [c[j] for j in lay.negatives[i]]
        logits = [float(a[i] @ v) / t for v in support]
        m = max(logits)
        total = sum(math.exp(x - m) for x in logits)
        # sum_k p_k z_k - z_i+ = sum_k p_k (z_k - z_i+) (the p_k sum to 1): the second form
        # keeps delta's direction where the positive dominates and p_i+ rounds to 1
        anchor_deltas.append(
            sum(math.exp(x - m) / total * (v - p[i]) for x, v in zip(logits, support)) / t
        )
    if lay.in_batch:
        return anchor_deltas, anchor_deltas
    column_deltas = []
    for j in range(c.shape[0]):
        who = [i for i in range(a.shape[0]) if j in lay.negatives[i]]
        if not who:  # no anchor has it: no distribution over anchors
            column_deltas.append(-c[j] / t)
            continue
        logits = [float(a[i] @ c[j]) / t for i in who]
        m = max(logits)
        total = sum(math.exp(x - m) for x in logits)
        expected = sum(math.exp(x - m) / total * a[i] for x, i in zip(logits, who))
        column_deltas.append((expected - c[j]) / t)
    return anchor_deltas, column_deltas


def minmax(values):
    lo, hi = min(values), max(values)
    return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]


def mixes(lay, t, *, lambda_u, lambda_d, eps, influence, representativeness):
    """``{(i, j): lambda_u U~_ij + lambda_d D~_j + eps}`` over each anchor's negatives."""
    da, dc = deltas(lay, t)
    c = lay.columns.detach()
    n_cols = c.shape[0]
    d = [
        sum(1.0 - float(c[j] @ c[k]) for k in range(n_cols) if k != j) / (n_cols - 1)
        for j in range(n_cols)
    ]
    out = {}
    for i, negs in enumerate(lay.negatives):
        if influence == "gradient_norm":
            u = [float(dc[j].norm()) * float(lay.h_c[j].norm()) for j in negs]
        else:
            u = [cos(da[i], dc[j]) * cos(lay.h_a[i], lay.h_c[j]) for j in negs]
        dd = minmax([d[j] for j in negs])
        if representativeness == "density":
            dd = [1.0 - x for x in dd]
        for j, uu, ddd in zip(negs, minmax(u), dd):
            out[i, j] = lambda_u * uu + lambda_d * ddd + eps
    return out


def oracle(
    lay,
    t,
    *,
    beta=1.0,
    lambda_u=1.0,
    lambda_d=1.0,
    eps=0.1,
    influence="gradient_similarity",
    representativeness="diversity",
    detach_weights=False,
    objective="infonce",
):
    """Mean over anchors of ``log(e^a + M sum_j w_j e^{c_j} / sum_j w_j) - a`` (averaged over the
    anchor's positives ``a``), or with ``objective='jsd'`` of
    ``sum_j w_j softplus(c_j) / sum_j w_j - log 2 - (log 2 - softplus(-a))``; differentiable."""
    mix = mixes(
        lay,
        t,
        lambda_u=lambda_u,
        lambda_d=lambda_d,
        eps=eps,
        influence=influence,
        representativeness=representativeness,
    )
    terms = []
    for i, negs in enumerate(lay.negatives):
        c = [lay.anchors[i] @ lay.columns[j] / t for j in negs]
        log_w = [
            beta * (x.detach() if detach_weights else x) + math.log(mix[i, j])
            for x, j in zip(c, negs)
        ]
        if objective == "jsd":
            a = lay.anchors[i] @ lay.positives[i] / t
            share = torch.softmax(torch.stack(log_w), dim=0)
            e_neg = (share * F.softplus(torch.stack(c))).sum() - math.log(2)
            terms.append(e_neg - (math.log(2) - F.softplus(-a)))
            continue
        log_mass = math.log(len(negs)) + lse(lw + x for lw, x in zip(log_w, c)) - lse(log_w)
        per_positive = []
        for positive in lay.every_positive[i]:
            a = lay.anchors[i] @ positive / t
            per_positive.append(torch.logaddexp(a, log_mass) - a)
        terms.append(torch.stack(per_positive).mean())
    return torch.stack(terms).mean()


def value_and_grads(fn, *tensors):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-9, atol=1e-10)
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


OPTIONS = [
    dict(),
    dict(influence="gradient_norm"),
    dict(representativeness="density", lambda_u=0.5, lambda_d=2.0),
    dict(lambda_u=0.0, lambda_d=1.5, beta=0.0),
    dict(lambda_u=2.0, lambda_d=0.0, beta=3.0),
    dict(lambda_u=0.7, lambda_d=0.3, beta=0.5, eps=0.02, detach_weights=True),
    dict(hidden=True),  # the head's features h: cos(h_i, h_j) and ||h_j|| from them
    dict(hidden=True, influence="gradient_norm", lambda_d=0.0),
]
IDS = [",".join(f"{k}={v}" for k, v in o.items()) or "defaults" for o in OPTIONS]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_in_batch_loss_and_gradients_equal_the_float64_loop(options, fast):
    options, t = dict(options), 0.5
    h1, h2 = (z(4, 5, seed=6), z(4, 5, seed=7)) if options.pop("hidden", False) else (None, None)
    h = None if h1 is None else torch.cat([h1, h2])
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    got = value_and_grads(lambda a, b: loss(a, b, h1=h1, h2=h2), z(4, seed=1), z(4, seed=2))
    expected = value_and_grads(
        lambda a, b: oracle(in_batch_layout(a, b, h), t, **options), z(4, seed=1), z(4, seed=2)
    )
    assert_same(got, expected)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_pool_loss_and_gradients_equal_the_float64_loop(options, fast):
    options, t, exclude = dict(options), 0.4, torch.tensor([0, 3, 5])
    hidden = options.pop("hidden", False)
    h1, pool_h = (z(3, 5, seed=8), z(7, 5, seed=9)) if hidden else (None, None)
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    pool = z(7, seed=5)  # a queue: no gradient flows into it
    kw = dict(negatives=pool, exclude_index=exclude, h1=h1, h2=h1, negative_h=pool_h)
    got = value_and_grads(lambda a, b: loss(a, b, **kw), z(3, seed=3), z(3, seed=4))
    expected = value_and_grads(
        lambda a, b: oracle(pool_layout(a, b, pool, exclude.tolist(), h1, pool_h), t, **options),
        z(3, seed=3),
        z(3, seed=4),
    )
    assert_same(got, expected)


@pytest.mark.parametrize("fast", [False, True])
def test_with_duplicate_ids_each_anchor_mixes_over_its_own_negatives(fast):
    t, ids = 0.5, [0, 1, 0, 2]  # samples 0 and 2 are duplicates: 4 negatives each, else 6
    options = dict(lambda_u=1.0, lambda_d=0.5, beta=0.7)
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    got = value_and_grads(
        lambda a, b: loss(a, b, ids=torch.tensor(ids)), z(4, seed=10), z(4, seed=11)
    )
    expected = value_and_grads(
        lambda a, b: oracle(in_batch_layout(a, b, ids=ids), t, **options),
        z(4, seed=10),
        z(4, seed=11),
    )
    assert_same(got, expected)


@pytest.mark.parametrize("fast", [False, True])
def test_anchors_with_a_single_negative_give_it_the_whole_mass(fast):
    # a pool of 2 with one excluded each: every min-max row is constant (U~ = D~ = 0), the one
    # negative's weight is 1 and the loss is InfoNCE over the positive and that negative
    t = 0.5
    q, k, pool, exclude = z(3, seed=12), z(3, seed=13), z(2, seed=14), torch.tensor([0, 1, 1])
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast)
    qn, kn, pn = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(pool, dim=1)
    expected = 0.0
    for i, j in enumerate([1, 0, 0]):
        a, c = float(qn[i] @ kn[i]) / t, float(qn[i] @ pn[j]) / t
        expected += (math.log(math.exp(a) + math.exp(c)) - a) / 3
    got = loss(q, k, negatives=pool, exclude_index=exclude)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("options", OPTIONS[:3], ids=IDS[:3])
@pytest.mark.parametrize("setup", ["in-batch", "pool"])
def test_mix_is_the_mixed_score_on_each_anchors_negatives_and_zero_elsewhere(setup, options):
    # the documented contract of UnReMixNegatives.mix: lambda_u U~ + lambda_d D~ + eps [A, C]
    # over each anchor's negatives, 0 where a column is not a negative
    from hardneg.contrast import in_batch_contrast, pool_contrast

    t = 0.5
    strategy = UnReMixNegatives(**options)
    if setup == "in-batch":
        z1, z2 = z(4, seed=15), z(4, seed=16)
        contrast, lay = in_batch_contrast([z1, z2], temperature=t), in_batch_layout(z1, z2)
    else:
        q, k, pool, exclude = z(3, seed=17), z(3, seed=18), z(6, seed=19), [2, 2, 4]
        contrast = pool_contrast(q, k, pool, temperature=t, exclude_index=torch.tensor(exclude))
        lay = pool_layout(q, k, pool, exclude)
    expected = mixes(
        lay,
        t,
        lambda_u=strategy.lambda_u,
        lambda_d=strategy.lambda_d,
        eps=strategy.eps,
        influence=strategy.influence,
        representativeness=strategy.representativeness,
    )
    got = strategy.mix(contrast)
    for i in range(got.shape[0]):
        for j in range(got.shape[1]):
            want = expected.get((i, j), 0.0)
            assert got[i, j].item() == pytest.approx(want, rel=1e-10, abs=1e-12), (i, j)


def test_minmax_rescales_each_row_over_its_negatives_and_zeroes_the_rest():
    x = torch.tensor([[1.0, 5.0, 3.0, 9.0], [2.0, 2.0, 7.0, 2.0], [4.0, -1.0, 6.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, True], [False] * 4])
    expected = [[0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert minmax_over_negatives(x, mask).tolist() == expected


def test_a_pool_entry_no_anchor_has_as_a_negative_gets_the_delta_of_an_empty_softmax():
    # every anchor excludes entry 1: its delta is (1/t)(0 - z_1), finite; the others the loop's
    from hardneg.contrast import pool_contrast

    t, q, k, pool = 0.4, z(3, seed=20), z(3, seed=21), z(4, seed=22)
    exclude = [1, 1, 1]
    contrast = pool_contrast(q, k, pool, temperature=t, exclude_index=torch.tensor(exclude))
    _, expected = deltas(pool_layout(q, k, pool, exclude), t)
    torch.testing.assert_close(
        column_gradients(contrast), torch.stack(expected), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("influence", ["gradient_similarity", "gradient_norm"])
@pytest.mark.parametrize("fast", [False, True])
def test_a_pool_entry_far_from_every_anchor_keeps_its_influence_score(fast, influence):
    # t = 0.002: the entry 3 (at a cosine of about 0 to every anchor) has c - max c < -400, the
    # column softmax of the fast path would underflow, and it falls back to the plain column
    # deltas (their directions for gradient_similarity, the deltas themselves for
    # gradient_norm); the loss stays the loop's
    t = 0.002
    q = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.95, 0.0, 0.05]], dtype=torch.float64)
    k = q + 0.01 * z(3, seed=23)
    pool = torch.tensor(
        [[1.0, 0.02, 0.0], [0.97, 0.0, 0.02], [0.99, 0.01, 0.01], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    options = dict(beta=0.0, lambda_u=1.0, lambda_d=0.0, influence=influence)
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    got = loss(q, k, negatives=pool)
    expected = oracle(pool_layout(q, k, pool), t, **options)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("influence", ["gradient_similarity", "gradient_norm"])
@pytest.mark.parametrize("fast", [False, True])
def test_an_anchor_whose_positive_dominates_keeps_the_direction_of_its_delta(fast, influence):
    """t = 0.01, samples 0 and 1 with views at a cosine near 1: their positive logits are more
    than 40 above their negatives', so ``p_i+`` rounds to 1 in float64 and
    ``sum_k p_k z_k - z_i+`` cancels to (almost) nothing. Their own losses are then ~0, but
    as columns of samples 2 and 3 (views far apart) they take the influence
    ``cos(delta_i, delta_j)``, which needs their deltas' directions: ``sum_k p_k (z_k -
    z_i+)`` keeps them (the plain path once gave them an influence of 0 in every row, where the
    fast path kept it)."""
    t = 0.01
    z1 = torch.eye(4, dtype=torch.float64) + 0.2 * z(4, 4, seed=30)  # four directions apart
    z2 = z1 + 0.02 * z(4, 4, seed=31)
    z2[2:] = -z1[2:]  # samples 2 and 3: views opposite
    lay = in_batch_layout(z1, z2)
    for i in (0, 1, 4, 5):  # the regime the test is about
        gap = float(lay.anchors[i] @ lay.positives[i]) / t
        assert gap - max(float(lay.anchors[i] @ lay.columns[j]) / t for j in lay.negatives[i]) > 40
    options = dict(beta=0.0, lambda_u=1.0, lambda_d=0.0, influence=influence)
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    got = value_and_grads(loss, z1, z2)
    expected = value_and_grads(lambda a, b: oracle(in_batch_layout(a, b), t, **options), z1, z2)
    assert_same(got, expected)


@pytest.mark.parametrize("lambda_d", [0.0, 1.0])
@pytest.mark.parametrize("fast", [False, True])
def test_a_pool_of_one_entry_is_infonce_with_one_negative(fast, lambda_d):
    # one negative per anchor: U and D are constant over each row (min-max 0), and the weights
    # of a single negative normalise to 1 whatever its mix: log(e^a + e^c) - a per anchor
    t, q, k, pool = 0.5, z(3, seed=40), z(3, seed=41), z(1, seed=42)
    options = dict(beta=1.0, lambda_u=1.0, lambda_d=lambda_d)
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    got = loss(q, k, negatives=pool)
    qn, kn, pn = (F.normalize(x, dim=1) for x in (q, k, pool))
    a, c = (qn * kn).sum(dim=1) / t, (qn @ pn.T)[:, 0] / t
    assert got.item() == pytest.approx((torch.logaddexp(a, c) - a).mean().item(), rel=1e-12)


@pytest.mark.parametrize("fast", [False, True])
def test_two_pool_entries_of_equal_representativeness_take_the_loops_weights(fast):
    # two orthogonal unit entries: D_1 = D_2 exactly (|z_j|^2 - z_j . (z_1 + z_2) = 1 - 1 for
    # both), so every row's D is constant over its negatives (D~ = 0) while U is not
    t, q, k = 0.5, z(3, seed=43), z(3, seed=44)
    pool = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    options = dict(beta=1.0, lambda_u=1.0, lambda_d=1.0)
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    got = loss(q, k, negatives=pool)
    expected = oracle(pool_layout(q, k, pool), t, **options)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("fast", [False, True])
def test_a_row_whose_influence_is_negative_on_all_its_negatives_takes_the_loops_weights(fast):
    # two of three pool entries per anchor (one excluded): for some rows U < 0 on both
    # negatives, so the row maximum over all columns, 0, is the excluded entry's (U is 0
    # off the negatives) and the row is reduced again under the mask
    t, q, k, pool = 0.5, z(3, seed=69), z(3, seed=169), z(3, seed=269)
    exclude = [0, 1, 2]
    options = dict(beta=1.0, lambda_u=1.0, lambda_d=0.0)
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    got = loss(q, k, negatives=pool, exclude_index=torch.tensor(exclude))
    expected = oracle(pool_layout(q, k, pool, exclude), t, **options)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)


def test_per_anchor_hard_negative_columns_are_refused():
    loss = hardneg.create_loss("unremix")
    with pytest.raises(ValueError) as info:
        loss(z(3, seed=24), z(3, seed=25), negatives=z(3 * 5, seed=26).view(3, 5, 3))
    assert str(info.value) == (
        "unremix scores the shared columns only; per-anchor hard-negative columns are not "
        "supported (use hcl, ring or another strategy with hard_negatives)"
    )


def test_the_plain_selection_gives_mean_one_weights_over_each_anchors_negatives():
    # select() without the fast path: log-weights whose exponentials average 1 over the
    # negatives, -inf elsewhere, in the ratios e^{beta c} mix of the loop
    from hardneg.contrast import in_batch_contrast

    t, z1, z2 = 0.5, z(3, seed=27), z(3, seed=28)
    strategy = UnReMixNegatives(beta=1.5, lambda_u=0.5, lambda_d=1.0)
    contrast = in_batch_contrast([z1, z2], temperature=t)
    lay = in_batch_layout(z1, z2)
    mix = mixes(
        lay,
        t,
        lambda_u=0.5,
        lambda_d=1.0,
        eps=0.1,
        influence="gradient_similarity",
        representativeness="diversity",
    )
    log_w = strategy.select(contrast, StepContext(fast=False)).negative_log_weights
    for i, negs in enumerate(lay.negatives):
        raw = [math.exp(1.5 * float(lay.anchors[i] @ lay.columns[j]) / t) * mix[i, j] for j in negs]
        mean = sum(raw) / len(raw)
        for j in range(log_w.shape[1]):
            want = raw[negs.index(j)] / mean if j in negs else 0.0
            assert log_w[i, j].exp().item() == pytest.approx(want, rel=1e-10, abs=1e-300), (i, j)


@pytest.mark.parametrize("influence", ["gradient_similarity", "gradient_norm"])
@pytest.mark.parametrize("fast", [False, True])
def test_with_three_views_the_gradient_takes_the_first_positive_and_the_loss_both(fast, influence):
    t, options = 0.5, dict(lambda_u=1.0, lambda_d=0.0, beta=0.5, influence=influence)
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    v1, v2, v3 = z(3, seed=29), z(3, seed=30), z(3, seed=31)
    got = value_and_grads(lambda a, b, c: loss(a, b, extra_views=[c]), v1, v2, v3)
    expected = value_and_grads(
        lambda a, b, c: oracle(three_view_layout(a, b, c), t, **options), v1, v2, v3
    )
    assert_same(got, expected)


@pytest.mark.parametrize("fast", [False, True])
def test_the_jsd_objective_averages_the_softplus_under_the_unremix_weights(fast):
    # the JSD objective needs dense weights: the fast path (a log mass) must not be taken
    t, exclude, options = 0.5, torch.tensor([1, 0, 4]), dict(beta=0.8, lambda_d=0.5)
    loss = hardneg.create_loss(
        "unremix", temperature=t, tau_plus=0.0, objective="jsd", fast=fast, **options
    )
    pool = z(6, seed=32)
    got = value_and_grads(
        lambda a, b: loss(a, b, negatives=pool, exclude_index=exclude), z(3, seed=33), z(3, seed=34)
    )
    expected = value_and_grads(
        lambda a, b: oracle(
            pool_layout(a, b, pool, exclude.tolist()), t, objective="jsd", **options
        ),
        z(3, seed=33),
        z(3, seed=34),
    )
    assert_same(got, expected)


def test_in_batch_the_column_deltas_are_the_anchor_deltas():
    from hardneg.contrast import in_batch_contrast

    t, z1, z2 = 0.5, z(3, seed=35), z(3, seed=36)
    _, expected = deltas(in_batch_layout(z1, z2), t)
    got = column_gradients(in_batch_contrast([z1, z2], temperature=t))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_representativeness_of_two_columns_is_one_minus_their_similarity():
    from hardneg.contrast import pool_contrast

    q, k, pool = z(2, seed=37), z(2, seed=38), z(2, seed=39)
    contrast = pool_contrast(q, k, pool, temperature=0.5)
    s = cos(pool[0], pool[1])
    got = UnReMixNegatives.representativeness_scores(contrast)
    torch.testing.assert_close(got, torch.tensor([[1.0 - s, 1.0 - s]], dtype=torch.float64))


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("features", ["anchors only", "float32"])
def test_hidden_features_missing_for_the_pool_or_in_another_dtype(features, fast):
    # h1 without negative_h: h = z on both sides; float32 h with float64 embeddings: the cosines
    # of h computed in float64 (the loop's, up to float32 rounding of h)
    t, options = 0.4, dict(lambda_u=1.0, lambda_d=0.0, beta=0.5)
    loss = hardneg.create_loss("unremix", temperature=t, tau_plus=0.0, fast=fast, **options)
    q, k, pool = z(3, seed=40), z(3, seed=41), z(5, seed=42)
    h1, pool_h = z(3, 4, seed=43), z(5, 4, seed=44)
    if features == "anchors only":
        got = loss(q, k, negatives=pool, h1=h1, h2=h1)
        lay = pool_layout(q, k, pool)
    else:
        h1, pool_h = h1.float(), pool_h.float()
        got = loss(q, k, negatives=pool, h1=h1, h2=h1, negative_h=pool_h)
        lay = pool_layout(q, k, pool, h_a=h1, h_c=pool_h)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(oracle(lay, t, **options).item(), rel=1e-12)


def test_a_non_flag_detach_weights_is_refused_by_name():
    with pytest.raises(ValueError) as info:
        hardneg.create_loss("unremix", detach_weights="yes")
    assert str(info.value) == "detach_weights must be True or False, got 'yes'"


def test_the_fast_mass_works_in_its_own_buffers_and_in_batch_differentiates_z(monkeypatch):
    """The fast path hands the tilted mass its mix and exponentials as scratch (``overwrite``)
    and, in-batch, ``gram = (z, t)`` (one product for the gradient to ``z``); with a pool no
    ``gram``. Values and gradients are the float64 loop's (tests above); this pins the form."""
    from hardneg import fastpaths

    seen = []
    original = fastpaths.tilted_log_mass
    monkeypatch.setattr(
        fastpaths, "tilted_log_mass", lambda *a, **k: seen.append(k) or original(*a, **k)
    )
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    pool = torch.randn(11, 4, generator=g)
    for negatives in (None, pool):
        seen.clear()
        loss_fn = hardneg.create_loss("unremix", fast=True, temperature=0.4)
        loss_fn(z1.requires_grad_(), z2.requires_grad_(), negatives=negatives).backward()
        assert len(seen) == 1 and seen[0]["overwrite"] is True
        if negatives is None:
            z, t = seen[0]["gram"]
            assert z.shape == (12, 4) and t == 0.4
        else:
            assert seen[0]["gram"] is None


def test_behind_a_filter_the_in_batch_fast_path_equals_the_plain_one():
    """A filter restricts the in-batch contrast set (``-inf`` at the dropped negatives, the same
    ``z``): the fast path's gradient to ``z`` by one product still equals the plain loss's."""
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(40, 8, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(40, 8, generator=g, dtype=torch.float64)
    results = []
    for fast in (True, False):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = hardneg.create_loss("unremix", filter="positive_aware", fast=fast)(a, b)
        results.append((loss, *torch.autograd.grad(loss, (a, b))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_columns_that_take_a_gradient_get_the_plain_paths_gradient_on_the_fast_path():
    """The loss detaches a pool, but a contrast set handed to the strategy directly may have
    shared columns that differentiate (the current step's embeddings, not a queue): the fast
    path's gradient to the anchors alone (``G C / t``, for detached columns) must not be taken
    for them, or their gradient is lost. Against the plain path (dense weights, autograd)."""
    from hardneg.contrast import build_contrast
    from hardneg.objectives import infonce_objective

    strategy = UnReMixNegatives()
    grads = []
    for fast in (True, False):
        q, k, pool = z(3, seed=3), z(3, seed=4), z(7, seed=5)
        leaves = [x.requires_grad_() for x in (q, k, pool)]
        contrast = build_contrast(q, pool, positives=k, temperature=0.4)
        context = StepContext(fast=fast)
        selection = strategy.select(contrast, context)
        loss = infonce_objective(contrast, selection).mean()
        grads.append(torch.autograd.grad(loss, leaves))
    assert float(grads[1][2].abs().max()) > 1e-3  # the columns' gradient is not zero
    for fast_grad, plain_grad in zip(*grads):
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-9, atol=1e-12)
