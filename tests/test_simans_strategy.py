"""SimANS (``simans``) through the public API against float64 loops of its definition
(docs/methods.md; Zhou et al. 2022): ``p_ij ∝ exp(-a (c_ij - c+_i - b)^2)`` over each anchor's
negatives (``c+`` the logit of its first positive), ``num_samples`` negatives drawn without
replacement by Gumbel-top-k, the loss over the positive and the drawn negatives; without
``num_samples`` the kernel as mean-1 importance weights. The plain draw is restated here from
its documented recipe: ``u`` from ``torch.rand`` (float32, the loss's generator), keys
``a (c - c+ - b)^2 + log(-log u)``, the ``k`` smallest drawn. Written for mutation testing
(docs/testing.md): nothing here calls the strategy's own helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hardneg
from hardneg import fastpaths


def z(n, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def in_batch_rows(z1, z2, ids=None):
    """``(anchors, first positives, columns, negatives, every positive)`` of the 2-view batch."""
    zz = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sample = list(range(n)) * 2 if ids is None else list(ids) * 2
    partner = [(i + n) % (2 * n) for i in range(2 * n)]
    negatives = [[j for j in range(2 * n) if sample[j] != sample[i]] for i in range(2 * n)]
    return zz, zz[partner], zz, negatives, [[zz[p]] for p in partner]


def three_view_rows(v1, v2, v3):
    zz = F.normalize(torch.cat([v1, v2, v3]), dim=1)
    n = v1.shape[0]
    others = [[v * n + i % n for v in range(3) if v != i // n] for i in range(3 * n)]
    negatives = [[j for j in range(3 * n) if j % n != i % n] for i in range(3 * n)]
    first = zz[[o[0] for o in others]]
    return zz, first, zz, negatives, [[zz[j] for j in o] for o in others]


def pool_rows(q, k, pool, exclude=None):
    qn, kn, pn = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(pool, dim=1)
    negatives = [
        [j for j in range(pool.shape[0]) if exclude is None or j != exclude[i]]
        for i in range(q.shape[0])
    ]
    return qn, kn, pn, negatives, [[p] for p in kn]


def plain_draws(rows, t, a, b, k, seed):
    """Each anchor's drawn columns: the ``k`` smallest keys ``a (c - c+ - b)^2 + log(-log u)``
    over its negatives (a masked column's key is infinite: drawn only to fill ``k``, ignored)."""
    anchors, first, columns, negatives, _ = rows
    anchors, first, columns = anchors.detach(), first.detach(), columns.detach()
    u = torch.rand(
        (anchors.shape[0], columns.shape[0]),
        generator=torch.Generator().manual_seed(seed),
        dtype=torch.float32,
    ).double()
    out = []
    for i, negs in enumerate(negatives):
        centre = float(anchors[i] @ first[i]) / t + b
        keys = {
            j: a * (float(anchors[i] @ columns[j]) / t - centre) ** 2
            + math.log(-math.log(float(u[i, j])))
            for j in negs
        }
        out.append(sorted(negs, key=keys.get)[:k])
    return out


def loss_over(rows, t, drawn, objective="infonce", weights=None):
    """Mean over anchors of the loss over each anchor's positives and its ``drawn`` negatives
    (``weights``: ``{(i, j): w}``, mean 1 over the negatives; default 1 each), differentiable."""
    anchors, _, columns, _, every_positive = rows
    terms = []
    for i, cols in enumerate(drawn):
        c = [anchors[i] @ columns[j] / t for j in cols]
        w = [1.0 if weights is None else weights[i, j] for j in cols]
        if objective == "jsd":
            a = anchors[i] @ every_positive[i][0] / t
            e_neg = sum(wj * F.softplus(cj) for wj, cj in zip(w, c)) / sum(w) - math.log(2)
            terms.append(e_neg - (math.log(2) - F.softplus(-a)))
            continue
        log_mass = torch.logsumexp(torch.stack([cj + math.log(wj) for wj, cj in zip(w, c)]), 0)
        per_positive = []
        for positive in every_positive[i]:
            a = anchors[i] @ positive / t
            per_positive.append(torch.logaddexp(a, log_mass) - a)
        terms.append(torch.stack(per_positive).mean())
    return torch.stack(terms).mean()


def kernel_weights(rows, t, a, b):
    """``{(i, j): p_ij / mean_j p_ij}`` over each anchor's negatives (no gradient)."""
    anchors, first, columns, negatives, _ = rows
    anchors, first, columns = anchors.detach(), first.detach(), columns.detach()
    out = {}
    for i, negs in enumerate(negatives):
        centre = float(anchors[i] @ first[i]) / t + b
        p = [math.exp(-a * (float(anchors[i] @ columns[j]) / t - centre) ** 2) for j in negs]
        mean = sum(p) / len(p)
        out.update({(i, j): x / mean for j, x in zip(negs, p)})
    return out


def value_and_grads(fn, *tensors):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    for x, y in zip(got[1], expected[1]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


CASES = {
    # name: (setup, a, b, num_samples)
    "in-batch": ("in-batch", 0.5, 0.3, 3),
    "pool": ("pool", 2.0, -1.0, 2),
    "uniform kernel": ("in-batch", 0.0, 0.0, 2),
    "every negative": ("pool", 0.7, 0.0, 50),
    "duplicates": ("duplicates", 0.4, 0.5, 5),  # rows of 4 and of 6 negatives
}


def call(case, loss, seed):
    """``(loss function of the two views, rows function, tensors)`` of a case."""
    g = torch.Generator().manual_seed
    if case == "pool":
        pool, exclude = z(7, seed=3), torch.tensor([0, 3, 5])

        def fn(x, y):
            return loss(x, y, negatives=pool, exclude_index=exclude, generator=g(seed))

        return (
            fn,
            (lambda x, y: pool_rows(x, y, pool, exclude.tolist())),
            (z(3, seed=1), z(3, seed=2)),
        )
    ids = [0, 1, 0, 2] if case == "duplicates" else None
    kw = {} if ids is None else dict(ids=torch.tensor(ids))

    def fn(x, y):
        return loss(x, y, generator=g(seed), **kw)

    return fn, (lambda x, y: in_batch_rows(x, y, ids)), (z(4, seed=4), z(4, seed=5))


@pytest.mark.parametrize("objective", ["infonce", "jsd"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_plain_draw_is_the_k_smallest_keys_and_the_loss_is_over_those(name, objective):
    setup, a, b, k = CASES[name]
    t, seed = 0.5, 11
    loss = hardneg.create_loss(
        "simans", temperature=t, a=a, b=b, num_samples=k, fast=False, objective=objective
    )
    fn, rows_of, inputs = call(setup, loss, seed)

    def expected(x, y):
        rows = rows_of(x, y)
        return loss_over(rows, t, plain_draws(rows, t, a, b, k, seed), objective)

    assert_same(value_and_grads(fn, *inputs), value_and_grads(expected, *inputs))


def fast_draw_loss(rows, t, a, b, k, seed):
    """The loss over the columns ``fastpaths.simans_draw`` draws with the logits and centres
    ``c+ + b`` of the loop (the law of that draw: tests/test_fastpaths.py and
    tests/test_strategies_more.py)."""
    anchors, first, columns, negatives, _ = (r.detach() if torch.is_tensor(r) else r for r in rows)
    logits = torch.full((anchors.shape[0], columns.shape[0]), float("-inf"), dtype=torch.float64)
    for i, negs in enumerate(negatives):
        for j in negs:
            logits[i, j] = float(anchors[i] @ columns[j]) / t
    centre = torch.tensor(
        [[float(anchors[i] @ first[i]) / t + b] for i in range(len(first))], dtype=torch.float64
    )
    k = min(k, columns.shape[0])
    drawn = fastpaths.simans_draw(logits, centre, a, k, torch.Generator().manual_seed(seed))
    cols = [[j for j in row if j in negatives[i]] for i, row in enumerate(drawn.tolist())]
    assert all(len(c) == min(k, len(n)) for c, n in zip(cols, negatives))
    return loss_over(rows, t, cols)


@pytest.mark.parametrize("name", list(CASES))
def test_the_fast_draw_sums_the_logits_of_the_columns_it_draws(name):
    setup, a, b, k = CASES[name]
    t, seed = 0.5, 12
    loss = hardneg.create_loss("simans", temperature=t, a=a, b=b, num_samples=k, fast=True)
    fn, rows_of, inputs = call(setup, loss, seed)
    assert_same(
        value_and_grads(fn, *inputs),
        value_and_grads(lambda x, y: fast_draw_loss(rows_of(x, y), t, a, b, k, seed), *inputs),
    )


@pytest.mark.parametrize("setup", ["pool", "three views"])
def test_without_num_samples_the_kernel_weighs_every_negative(setup):
    t, a, b = 0.5, 0.6, -0.4
    loss = hardneg.create_loss("simans", temperature=t, a=a, b=b, num_samples=None)
    if setup == "pool":
        pool, exclude = z(6, seed=6), torch.tensor([2, 2, 4])

        def fn(x, y):
            return loss(x, y, negatives=pool, exclude_index=exclude)

        def rows_of(x, y):
            return pool_rows(x, y, pool, exclude.tolist())

        inputs = z(3, seed=7), z(3, seed=8)
    else:
        extra = z(3, seed=9)

        def fn(x, y):
            return loss(x, y, extra_views=[extra])

        def rows_of(x, y):
            return three_view_rows(x, y, extra)

        inputs = z(3, seed=10), z(3, seed=11)

    def expected(x, y):
        rows = rows_of(x, y)
        return loss_over(rows, t, rows[3], weights=kernel_weights(rows, t, a, b))

    assert_same(value_and_grads(fn, *inputs), value_and_grads(expected, *inputs))


@pytest.mark.parametrize("fast", [False, True])
def test_with_three_views_the_kernel_is_centred_on_the_first_positive(fast):
    t, a, b, k, seed = 0.5, 1.5, 0.2, 2, 13
    loss = hardneg.create_loss("simans", temperature=t, a=a, b=b, num_samples=k, fast=fast)
    extra = z(3, seed=14)

    def expected(x, y):
        rows = three_view_rows(x, y, extra)
        if fast:
            return fast_draw_loss(rows, t, a, b, k, seed)
        return loss_over(rows, t, plain_draws(rows, t, a, b, k, seed))

    g = torch.Generator().manual_seed
    assert_same(
        value_and_grads(
            lambda x, y: loss(x, y, extra_views=[extra], generator=g(seed)),
            z(3, seed=15),
            z(3, seed=16),
        ),
        value_and_grads(expected, z(3, seed=15), z(3, seed=16)),
    )


def test_the_draws_flag_and_the_checked_arguments():
    assert hardneg.create_loss("simans").draws is True
    assert hardneg.create_loss("simans", num_samples=None).draws is False
    assert hardneg.create_loss("simans", num_samples=3).strategy.num_samples == 3
    for kwargs, message in [
        (dict(a=-0.5), "a must be in [0, inf), got -0.5"),
        (dict(b=float("inf")), "b must be finite, got inf"),
        (dict(b="0"), "b must be a number, got '0' (str)"),
        (dict(num_samples=0), "num_samples must be in [1, inf), got 0"),
        (dict(num_samples=2.5), "num_samples must be an integer, got 2.5"),
    ]:
        with pytest.raises(ValueError) as info:
            hardneg.create_loss("simans", **kwargs)
        assert str(info.value) == message, kwargs
