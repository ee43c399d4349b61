"""MoCHi and false-negative cancellation against re-statements of their papers' rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hardneg
from hardneg.contrast import in_batch_contrast, pool_contrast
from hardneg.registry import strategy_class
from hardneg.strategies import StepContext


def column_embeddings(contrast) -> torch.Tensor:
    """``[A, S, d]`` embedding of every column of every anchor: the shared columns, then the
    anchor's own (the layout of ``negative_logits``)."""
    shared = contrast.columns.unsqueeze(0).expand(contrast.num_anchors, -1, -1)
    if contrast.anchor_columns is None:
        return shared
    return torch.cat([shared, contrast.anchor_columns], dim=1)


def lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def test_mochi_mixes_are_unit_convex_combinations_of_two_of_the_hardest_negatives():
    g = torch.Generator().manual_seed(0)
    q, k, pool = (
        torch.randn(3, 4, generator=g),
        torch.randn(3, 4, generator=g),
        torch.randn(12, 4, generator=g),
    )
    contrast = pool_contrast(q, k, pool, temperature=0.2)
    n = 4
    mochi = strategy_class("mochi")(num_hardest=n, num_mixed=6, num_query_mixed=5)
    synth = mochi.synthetic_negatives(
        contrast, StepContext(generator=torch.Generator().manual_seed(1))
    )
    assert synth.shape == (3, 11, 4)
    torch.testing.assert_close(synth.norm(dim=2), torch.ones(3, 11))
    bank = F.normalize(pool, dim=1)
    qn = F.normalize(q, dim=1)
    for i in range(3):
        hardest = (qn[i] @ bank.T).argsort(descending=True)[:n].tolist()
        for row, h in enumerate(synth[i]):
            # h = c1 x + c2 y with c1, c2 >= 0 for some pair of the hardest (x = the query for
            # the second kind): least squares over every pair, the best must fit exactly
            fits = []
            for a_idx in hardest:
                for b_idx in hardest:
                    x = qn[i] if row >= 6 else bank[a_idx]
                    basis = torch.stack([x, bank[b_idx]], dim=1).double()
                    coef = torch.linalg.lstsq(basis, h.double().unsqueeze(1)).solution.flatten()
                    err = float((basis @ coef - h.double()).norm())
                    fits.append((err, coef))
            err, coef = min(fits, key=lambda f: f[0])
            assert err < 1e-4, (i, row)
            assert bool((coef >= -1e-4).all())
            if row >= 6:  # the query's share stays below one half
                assert float(coef[0] / coef.sum()) < 0.5 + 1e-4


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_mochi_draws_pairs_uniformly_from_the_hardest_set_and_uniform_coefficients(fast):
    """The law of the draws: every column of a pair or query mix uniform over the anchor's 4
    hardest of its 6 negatives (the excluded bank entry and the 2 easiest never), ``i`` and
    ``j`` independent (``P(i = j) = 1/4``), ``a ~ U(0, 1)`` and ``b ~ U(0, 0.5)`` (mean and
    quartiles, within 5 standard errors)."""
    g = torch.Generator().manual_seed(6)
    q, k, pool = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g), torch.randn(7, 4)
    rows = 4000
    contrast = pool_contrast(
        q.expand(rows, -1),
        k.expand(rows, -1),
        pool,
        temperature=0.2,
        exclude_index=torch.full((rows,), 5),
    )
    mochi = strategy_class("mochi")(num_hardest=4, num_mixed=6, num_query_mixed=3)
    draws = mochi.draw(contrast, StepContext(generator=torch.Generator().manual_seed(2), fast=fast))
    logits = contrast.negative_logits[0].clone()
    logits[5] = float("-inf")
    hardest = set(logits.topk(4).indices.tolist())
    counts = torch.bincount(draws.columns.flatten(), minlength=7).double() / draws.columns.numel()
    n = draws.columns.numel()
    for column in range(7):
        want = 0.25 if column in hardest else 0.0
        assert float(counts[column]) == pytest.approx(want, abs=5 * math.sqrt(0.25 * 0.75 / n))
    same = (draws.first == draws.second).double().mean()
    assert float(same) == pytest.approx(0.25, abs=5 * math.sqrt(0.25 * 0.75 / draws.first.numel()))
    for x, top in ((draws.alpha, 1.0), (draws.beta, 0.5)):
        x = x.double().flatten() / top
        assert bool((x > 0).all()) and bool((x < 1).all())
        se = 1 / math.sqrt(12 * x.numel())
        assert float(x.mean()) == pytest.approx(0.5, abs=5 * se)
        for p in (0.25, 0.75):
            share = float((x < p).double().mean())
            assert share == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / x.numel()))


def test_mochi_loss_is_infonce_with_the_synthetic_logits_appended_and_no_gradient_through_them():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(5, 4, generator=g).requires_grad_()
    z2 = torch.randn(5, 4, generator=g).requires_grad_()
    t = 0.3
    loss_fn = hardneg.create_loss(
        "mochi", temperature=t, num_hardest=3, num_mixed=4, num_query_mixed=2
    )
    loss = loss_fn(z1, z2, generator=torch.Generator().manual_seed(3))
    loss.backward()
    contrast = in_batch_contrast([z1.detach(), z2.detach()], temperature=t)
    synth = loss_fn.strategy.synthetic_negatives(
        contrast, StepContext(generator=torch.Generator().manual_seed(3))
    )
    a1, a2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    z = F.normalize(torch.cat([a1, a2]), dim=1)
    expected = 0.0
    for i in range(10):
        p = (i + 5) % 10
        negs = [z[i] @ z[j] / t for j in range(10) if j not in (i, p)]
        negs += [z[i] @ h / t for h in synth[i]]  # detached mixes: gradient only through z_i
        pos = z[i] @ z[p] / t
        expected = expected + torch.logsumexp(torch.stack([pos, *negs]), 0) - pos
    expected = expected / 10
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(z1.grad, a1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z2.grad, a2.grad, rtol=1e-4, atol=1e-6)


def test_mochi_without_mixes_is_infonce():
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    a = hardneg.create_loss("mochi", temperature=0.2, num_mixed=0, num_query_mixed=0)(z1, z2)
    b = hardneg.create_loss("infonce", temperature=0.2)(z1, z2)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def fnc_reference(views, t, mode, top_k):
    """Per anchor: support = its other views; score = max cosine to them; top-k false negatives."""
    v, n = len(views), views[0].shape[0]
    z = [F.normalize(x.double(), dim=1) for x in views]
    total = 0.0
    for av in range(v):
        for i in range(n):
            anchor = z[av][i]
            support = [z[w][i] for w in range(v) if w != av]
            cols = [(w, j) for w in range(v) for j in range(n) if j != i]
            score = {c: max(float(s @ z[c[0]][c[1]]) for s in support) for c in cols}
            found = sorted(cols, key=lambda c: -score[c])[:top_k]
            negs = [float(anchor @ z[w][j]) / t for (w, j) in cols if (w, j) not in found]
            pos = [float(s @ anchor) / t for s in support]
            if mode == "attract":
                pos += [float(anchor @ z[w][j]) / t for (w, j) in found]
            log_r = lse(negs)
            terms = [lse([p, log_r]) - p for p in pos]
            total += sum(terms) / len(terms)
    return total / (v * n)


@pytest.mark.parametrize("mode", ["eliminate", "attract"])
@pytest.mark.parametrize("num_views", [2, 3])
def test_false_negative_cancellation_equals_the_support_set_rule(mode, num_views):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 4, generator=g)
    views = [base + 0.5 * torch.randn(5, 4, generator=g) for _ in range(num_views)]
    t = 0.4
    loss = hardneg.create_loss("fnc", temperature=t, mode=mode, top_k=2)
    got = loss(views[0], views[1], extra_views=views[2:])
    assert got.item() == pytest.approx(fnc_reference(views, t, mode, 2), rel=1e-5)


def test_false_negative_threshold_and_the_kept_least_similar_negative():
    z = F.normalize(torch.randn(4, 3), dim=1)
    contrast = in_batch_contrast([z, z.clone()], temperature=1.0)
    fnc = strategy_class("fnc")(top_k=0, threshold=-2.0, mode="eliminate")  # every cosine > -2
    found = fnc.false_negatives(contrast)
    assert bool((found.sum(dim=1) == contrast.num_negatives - 1).all())  # one always stays
    value = hardneg.create_loss("fnc", top_k=0, threshold=-2.0, mode="eliminate")(z, z.clone())
    assert torch.isfinite(value)
    with pytest.raises(ValueError, match="top_k >= 1 or a threshold"):
        strategy_class("fnc")(top_k=0)


def test_mochi_mixes_the_columns_of_a_pool_per_anchor():
    g = torch.Generator().manual_seed(5)
    # 3 rows per anchor in 8 dimensions: their span is a proper subspace
    q, k = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    per_anchor = torch.randn(3, 3, 8, generator=g)
    loss = hardneg.create_loss("mochi", num_hardest=2, num_mixed=3, num_query_mixed=0)
    contrast = loss.strategy  # the synthetic vectors lie in the span of the anchor's own rows
    from hardneg.contrast import build_contrast

    c = build_contrast(
        q, per_anchor.new_zeros(0, 8), positives=k, anchor_columns=per_anchor, temperature=0.2
    )
    synth = contrast.synthetic_negatives(c, StepContext(generator=torch.Generator().manual_seed(0)))
    rows = F.normalize(per_anchor, dim=2)
    for i in range(3):
        basis = rows[i].T.double()  # [d, 3]
        coef = torch.linalg.lstsq(basis, synth[i].T.double()).solution
        assert float((basis @ coef - synth[i].T.double()).norm()) < 1e-5
        other = rows[(i + 1) % 3].T.double()  # not in another anchor's span
        coef = torch.linalg.lstsq(other, synth[i].T.double()).solution
        assert float((other @ coef - synth[i].T.double()).norm()) > 1e-2
    assert torch.isfinite(loss(q, k, negatives=per_anchor))


MOCHI_FORMS = ["in_batch", "in_batch_ids", "pool", "pool_exclude", "retrieval", "per_anchor_pool"]


def _mochi_inputs(form: str, dtype: torch.dtype):
    from hardneg.losses.contrastive import ContrastInputs

    g = torch.Generator().manual_seed(11)
    n, d = 6, 5
    z1 = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    z2 = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    kwargs: dict = {}
    if form == "in_batch_ids":
        kwargs["ids"] = torch.tensor([0, 1, 0, 2, 3, 1])  # duplicates: fewer negatives
    if form in ("pool", "pool_exclude"):
        # a pool of 20 gives the Gram-matrix path of the pair similarities, 120 the row dots
        k = 20 if form == "pool" else 120
        kwargs["negatives"] = torch.randn(k, d, generator=g, dtype=dtype)
    if form == "pool_exclude":
        kwargs["exclude_index"] = torch.tensor([0, 3, 5, 7, 9, 11])
    if form == "retrieval":
        kwargs["hard_negatives"] = torch.randn(n, 2, d, generator=g, dtype=dtype)
    if form == "per_anchor_pool":
        kwargs["negatives"] = torch.randn(n, 7, d, generator=g, dtype=dtype)

    def contrast(a, b, t, normalize):
        return ContrastInputs(z1=a, z2=b, temperature=t, normalize=normalize, **kwargs)

    return z1, z2, kwargs, contrast


@pytest.mark.parametrize("form", MOCHI_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "raw"])
def test_mochi_dot_product_logits_equal_the_explicit_mixes(
    form, dtype, fast, normalize, monkeypatch
):
    """The loss computes the mixes' logits from dot products; restated here in float64 with
    every mixed vector built explicitly, ``h = normalise(a n_i + (1 - a) n_j)`` and
    ``h' = normalise(b q + (1 - b) n_j)``, detached, appended to the negatives."""
    import hardneg.strategies.mochi as mochi_module

    monkeypatch.setattr(mochi_module, "_BLOCK", 40)  # row dots: one anchor per block
    t = 0.3
    hp = {"num_hardest": 4, "num_mixed": 9, "num_query_mixed": 5}
    z1, z2, kwargs, contrast_of = _mochi_inputs(form, dtype)
    loss_fn = hardneg.create_loss("mochi", temperature=t, normalize=normalize, fast=fast, **hp)
    loss = loss_fn(z1, z2, generator=torch.Generator().manual_seed(3), **kwargs)
    loss.backward()
    # the same draws: they depend on the detached logits and the generator only
    contrast = contrast_of(z1.detach(), z2.detach(), t, normalize).standard_contrast()
    context = StepContext(generator=torch.Generator().manual_seed(3), fast=fast)
    draws = loss_fn.strategy.draw(contrast, context)
    a1 = z1.detach().double().requires_grad_()
    a2 = z2.detach().double().requires_grad_()
    k64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kwargs.items()}
    from hardneg.losses.contrastive import ContrastInputs

    c64 = ContrastInputs(z1=a1, z2=a2, temperature=t, normalize=normalize, **k64)
    c64 = c64.standard_contrast()
    vectors = column_embeddings(c64).detach()  # [A, S, d]
    s = hp["num_mixed"]
    total = 0.0
    for i in range(c64.num_anchors):
        q = c64.anchors[i]
        cols = draws.columns[i].tolist()
        mixes = []
        for k in range(s):
            a = float(draws.alpha[i, k])
            mixes.append(a * vectors[i, cols[k]] + (1 - a) * vectors[i, cols[s + k]])
        for k in range(hp["num_query_mixed"]):
            b = float(draws.beta[i, k])
            assert 0.0 <= b < 0.5
            mixes.append(b * q.detach() + (1 - b) * vectors[i, cols[2 * s + k]])
        h = torch.stack(mixes)
        if normalize:
            h = h / h.norm(dim=1, keepdim=True)
        negatives = c64.negative_logits[i]
        drawn = set(cols)  # only the anchor's negatives are mixed
        assert all(bool(torch.isfinite(negatives[j])) for j in drawn)
        hardest = negatives.topk(min(4, int(torch.isfinite(negatives).sum()))).values.min()
        assert all(bool(negatives[j] >= hardest) for j in drawn)  # and only the hardest
        pos = c64.positive_logits[i, 0]
        every = torch.cat([pos.view(1), negatives[torch.isfinite(negatives)], h @ q / t])
        total = total + torch.logsumexp(every, 0) - pos
    expected = total / c64.num_anchors
    expected.backward()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(loss.detach().double(), expected.detach(), **tol)
    torch.testing.assert_close(z1.grad.double(), a1.grad, **tol)
    torch.testing.assert_close(z2.grad.double(), a2.grad, **tol)


@pytest.mark.parametrize("form", ["in_batch", "in_batch_ids", "pool", "pool_exclude", "retrieval"])
@pytest.mark.parametrize("mode", ["eliminate", "attract"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_false_negative_cancellation_in_every_call_form(form, mode, top_k):
    """Support = the anchor's positive; score = cosine of the support with each negative
    column, from the embeddings; the top-k are dropped (and attracted), restated per anchor."""
    from hardneg.losses.contrastive import ContrastInputs

    t = 0.4
    z1, z2, kwargs, _ = _mochi_inputs(form, torch.float64)
    loss = hardneg.create_loss("fnc", temperature=t, mode=mode, top_k=top_k)
    got = loss(z1, z2, **kwargs)
    c = ContrastInputs(z1=z1.detach(), z2=z2.detach(), temperature=t, **kwargs)
    c = c.standard_contrast()
    vectors = column_embeddings(c)
    total = 0.0
    for i in range(c.num_anchors):
        q, support = c.anchors[i], c.positives[i, 0]
        cols = [j for j in range(vectors.shape[1]) if bool(torch.isfinite(c.negative_logits[i, j]))]
        score = {j: float(support @ vectors[i, j]) for j in cols}
        found = sorted(cols, key=lambda j: -score[j])[:top_k]
        negs = [float(q @ vectors[i, j]) / t for j in cols if j not in found]
        pos = [float(q @ support) / t]
        if mode == "attract":
            pos += [float(q @ vectors[i, j]) / t for j in found]
        log_r = lse(negs)
        total += sum(lse([p, log_r]) - p for p in pos) / len(pos)
    assert got.item() == pytest.approx(total / c.num_anchors, rel=1e-9)
