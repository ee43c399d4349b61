"""MoCHi (``mochi``): its hyper-parameters, the hardest set ``Q~`` restated by sorting in Python
(ties at the ``N``-th logit settled by column order), the law of its uniforms and the rows
without negatives; the mixes themselves are checked in ``tests/test_strategies_mixing.py``."""

from __future__ import annotations

import math

import pytest
import torch

import hardneg
from hardneg.contrast import build_contrast, in_batch_contrast, pool_contrast
from hardneg.registry import strategy_class
from hardneg.strategies import StepContext


def mochi(**kw):
    return strategy_class("mochi")(**kw)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_hardest=0), "num_hardest must be in [1, inf), got 0"),
        (dict(num_hardest=2.5), "num_hardest must be an integer, got 2.5"),
        (dict(num_mixed=-1), "num_mixed must be in [0, inf), got -1"),
        (dict(num_mixed=1.5), "num_mixed must be an integer, got 1.5"),
        (dict(num_query_mixed=-1), "num_query_mixed must be in [0, inf), got -1"),
        (dict(num_query_mixed="3"), "num_query_mixed must be an integer, got '3' (str)"),
    ],
)
def test_bad_hyper_parameters_are_refused_with_exact_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        hardneg.create_loss("mochi", **kwargs)
    assert str(info.value) == message


def test_the_defaults_are_the_papers_configuration_and_the_lower_bounds_are_accepted():
    assert mochi().hparams() == {"num_hardest": 1024, "num_mixed": 1024, "num_query_mixed": 128}
    edge = mochi(num_hardest=1, num_mixed=0, num_query_mixed=0)
    assert edge.hparams() == {"num_hardest": 1, "num_mixed": 0, "num_query_mixed": 0}
    assert all(type(v) is int for v in mochi(num_hardest=3.0, num_mixed=2.0).hparams().values())


def hardest_by_sorting(logits, n):
    """Per row, the columns of the ``n`` largest finite logits (a tie settled by the smaller
    column), in increasing column order."""
    rows = []
    for row in logits.tolist():
        finite = [(v, j) for j, v in enumerate(row) if math.isfinite(v)]
        best = sorted(finite, key=lambda vj: (-vj[0], vj[1]))[:n]
        rows.append(sorted(j for _, j in best))
    return rows


def contrasts():
    """Contrast sets with ties at the ``N``-th logit, per-anchor counts below ``N``, a mask."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    pool = torch.randn(5, 3, generator=g)
    tied = torch.cat([pool, pool, pool[:2]])  # every logit of the first 2 rows three times
    views = [torch.randn(6, 3, generator=g) for _ in range(2)]
    ids = torch.tensor([0, 0, 0, 0, 1, 2])  # anchors of sample 0..3: M = 4; of 4, 5: M = 10
    return {
        "pool_ties": pool_contrast(q, k, tied, temperature=0.5),
        "pool_exclude_ties": pool_contrast(
            q, k, tied, temperature=0.5, exclude_index=torch.tensor([0, 5, 11, 3])
        ),
        "in_batch_ids": in_batch_contrast(views, temperature=0.5, ids=ids),
        "in_batch": in_batch_contrast(views, temperature=0.5),
    }


@pytest.mark.parametrize("name", ["pool_ties", "pool_exclude_ties", "in_batch_ids", "in_batch"])
@pytest.mark.parametrize("n", [1, 4, 7, 11, 12, 30])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_the_hardest_set_is_the_n_largest_logits_first_in_column_order(name, n, fast):
    contrast = contrasts()[name]
    index, count = mochi(num_hardest=n).hardest(contrast, fast=fast)
    want = hardest_by_sorting(contrast.negative_logits, n)
    assert count.shape == (contrast.num_anchors, 1)
    assert count.flatten().tolist() == [len(row) for row in want]
    assert [index[i, : len(row)].tolist() for i, row in enumerate(want)] == want


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_ties_in_some_rows_only_are_settled_row_by_row(n, fast):
    """Some rows tie at their ``N``-th logit (logits rounded to one decimal: many equal values)
    and the others do not, with per-anchor counts below ``N`` (ids): the fast path settles only
    the tied rows (no ``[A, S]`` integer buffers for the others), every row as sorting does."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(9)
    views = [torch.randn(8, 4, generator=g) for _ in range(2)]
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    contrast = in_batch_contrast(views, temperature=0.5, ids=ids)
    logits = contrast.negative_logits.detach().clone()
    for row in (0, 3, 9, 12):  # rounded rows: ties; the other rows keep distinct floats
        logits[row] = (logits[row] * 10).round() / 10
    contrast = replace(contrast, negative_logits=logits)
    index, count = mochi(num_hardest=n).hardest(contrast, fast=fast)
    want = hardest_by_sorting(logits, n)
    assert count.flatten().tolist() == [len(row) for row in want]
    assert [index[i, : len(row)].tolist() for i, row in enumerate(want)] == want


def test_the_uniforms_are_odd_multiples_of_2_to_the_minus_24_with_every_bit_random():
    """``(2 j + 1) 2^-24`` with ``j`` of 23 random bits: each bit of ``j`` is set half of the
    time (5 standard errors), every value strictly inside ``(0, 1)``."""
    from hardneg.strategies.mochi import _unit_uniforms

    u = _unit_uniforms((301, 7), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert u.shape == (301, 7) and u.dtype == torch.float32
    scaled = u.double() * 2**24
    assert torch.equal(scaled, scaled.round())
    j = ((scaled - 1) / 2).long().flatten()
    assert bool(((scaled.long() % 2) == 1).all())
    assert bool((j >= 0).all()) and bool((j < 2**23).all())
    n = j.numel()
    for bit in range(23):
        share = float(((j >> bit) & 1).double().mean())
        assert share == pytest.approx(0.5, abs=5 * math.sqrt(0.25 / n)), bit
    assert len(set(j.tolist())) > n - 5  # 2107 draws of 2^23 values: almost no repeat


def test_a_row_without_negatives_mixes_nothing():
    g = torch.Generator().manual_seed(1)
    a, columns = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    positives = torch.randn(3, 4, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False  # anchor 1 has no negative
    mask[2, :3] = False
    contrast = build_contrast(a, columns, positives=positives, negative_mask=mask, temperature=0.2)
    strategy = mochi(num_hardest=2, num_mixed=3, num_query_mixed=2)
    for fast in (False, True):
        context = StepContext(
            generator=torch.Generator().manual_seed(2), fast=fast, want_log_mass=False
        )
        extra = strategy.select(contrast, context).extra_negative_logits
        assert extra.shape == (3, 5)
        assert bool(torch.isneginf(extra[1]).all())
        assert bool(torch.isfinite(extra[[0, 2]]).all())
    # the fast log mass: nothing for anchor 1, the real and the mixed logits for the others
    context = StepContext(generator=torch.Generator().manual_seed(2), fast=True)
    mass = strategy.select(contrast, context).negative_log_mass
    want = torch.cat([contrast.negative_logits, extra], 1).logsumexp(1)
    assert bool(torch.isneginf(mass[1])) and bool(torch.isfinite(mass[[0, 2]]).all())
    torch.testing.assert_close(mass, want, rtol=1e-5, atol=1e-6)


def test_the_plain_hardest_set_is_the_default_and_has_min_n_s_slots():
    """``hardest(contrast)`` is the plain form: ``k' = min(N, S)`` slots per row even where
    every anchor has fewer negatives (the fast form may return ``min(N, M)``)."""
    contrast = contrasts()["pool_exclude_ties"]  # S = 12, M = 11
    for n, width in ((30, 12), (12, 12), (11, 11), (4, 4)):
        index, count = mochi(num_hardest=n).hardest(contrast)
        assert index.shape == (4, width)
        assert count.flatten().tolist() == [min(n, 11)] * 4


def vectors_of(contrast):
    """``[A, S, d]`` float64 embedding of every column of every anchor, by hand: shared
    columns first, then the anchor's own."""
    rows = []
    for i in range(contrast.num_anchors):
        row = [contrast.columns[j].double() for j in range(contrast.num_shared)]
        if contrast.anchor_columns is not None:
            row += [v.double() for v in contrast.anchor_columns[i]]
        rows.append(torch.stack(row))
    return torch.stack(rows)


def mixes_by_hand(contrast, draws):
    """``[A, s + s', d]``: ``a n_i + (1 - a) n_j`` and ``b q + (1 - b) n_j``, normalised when
    the contrast set is."""
    vectors = vectors_of(contrast)
    s = draws.alpha.shape[1]
    out = []
    for i in range(contrast.num_anchors):
        cols = draws.columns[i].tolist()
        q = contrast.anchors[i].double()
        row = []
        for k in range(s):
            a = float(draws.alpha[i, k])
            row.append(a * vectors[i, cols[k]] + (1 - a) * vectors[i, cols[s + k]])
        for k in range(draws.beta.shape[1]):
            b = float(draws.beta[i, k])
            row.append(b * q + (1 - b) * vectors[i, cols[2 * s + k]])
        h = torch.stack(row)
        out.append(h / h.norm(dim=1, keepdim=True) if contrast.normalized else h)
    return torch.stack(out)


def mixed_layout(normalize=True):
    """Shared columns and each anchor's own columns in one contrast set (``build_contrast``)."""
    g = torch.Generator().manual_seed(9)
    a, columns = torch.randn(3, 4, generator=g), torch.randn(4, 4, generator=g)
    positives, own = torch.randn(3, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    return build_contrast(
        a, columns, positives=positives, anchor_columns=own, temperature=0.3, normalize=normalize
    )


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_mixes_of_shared_and_own_columns_take_each_columns_own_vector(fast):
    """Columns ``0..C-1`` are the shared vectors, ``C..S-1`` the anchor's own: the mixes and
    their logits ``q . h / t`` match vectors looked up by hand."""
    contrast = mixed_layout()
    strategy = mochi(num_hardest=6, num_mixed=8, num_query_mixed=4)
    context = StepContext(generator=torch.Generator().manual_seed(4), fast=fast)
    draws = strategy.draw(contrast, context)
    assert {4, 5} & set(draws.columns.flatten().tolist())  # own columns are drawn
    assert set(range(4)) & set(draws.columns.flatten().tolist())
    want = mixes_by_hand(contrast, draws)
    got = strategy.synthetic_negatives(contrast, context, draws)
    assert (got.double() - want).abs().max().item() < 1e-6
    context = StepContext(
        generator=torch.Generator().manual_seed(4), fast=fast, want_log_mass=False
    )
    extra = strategy.select(contrast, context).extra_negative_logits
    logits = torch.einsum("ad,akd->ak", contrast.anchors.double(), want) / 0.3
    assert (extra.double() - logits).abs().max().item() < 1e-5
    # the objective's log mass (the fast path's only output): the real and synthetic logits
    context = StepContext(generator=torch.Generator().manual_seed(4), fast=fast)
    selection = strategy.select(contrast, context)
    real = contrast.negative_logits.double()
    mass = selection.negative_log_mass
    if mass is None:  # the plain form gives the synthetic logits
        mass = torch.cat([real, selection.extra_negative_logits.double()], 1).logsumexp(1)
    want_mass = torch.cat([real, logits], 1).logsumexp(1)
    assert (mass.double() - want_mass).abs().max().item() < 1e-5


def test_given_draws_are_used_and_raw_dot_products_are_not_normalised():
    from hardneg.strategies.mochi import MixDraws

    contrast = mixed_layout(normalize=False)
    draws = MixDraws(
        columns=torch.tensor([[0, 4, 5, 2, 1], [3, 3, 4, 0, 5], [5, 1, 2, 4, 3]]),
        alpha=torch.tensor([[0.25, 0.5], [0.75, 0.125], [0.5, 0.5]]),
        beta=torch.tensor([[0.25], [0.125], [0.375]]),
    )
    strategy = mochi(num_hardest=6, num_mixed=2, num_query_mixed=1)
    context = StepContext(generator=torch.Generator().manual_seed(0))
    got = strategy.synthetic_negatives(contrast, context, draws)
    want = mixes_by_hand(contrast, draws)
    assert (got.double() - want).abs().max().item() < 1e-6
    assert float(want.norm(dim=2).sub(1).abs().max()) > 0.1  # the test can tell


@pytest.mark.parametrize("s,s_query", [(1, 0), (0, 1), (3, 3)])
def test_each_anchor_gets_num_mixed_plus_num_query_mixed_synthetic_negatives(s, s_query):
    contrast = contrasts()["pool_exclude_ties"]
    strategy = mochi(num_hardest=3, num_mixed=s, num_query_mixed=s_query)
    context = StepContext(generator=torch.Generator().manual_seed(5), want_log_mass=False)
    extra = strategy.select(contrast, context).extra_negative_logits
    assert extra.shape == (4, s + s_query)
    context = StepContext(generator=torch.Generator().manual_seed(5))
    draws = strategy.draw(contrast, context)
    h = mixes_by_hand(contrast, draws)
    want = torch.einsum("ad,akd->ak", contrast.anchors.double(), h) / 0.5
    assert (extra.double() - want).abs().max().item() < 1e-5


def test_pair_similarity_row_by_row_covers_every_anchor(monkeypatch):
    """Row-wise dot products in blocks of one anchor (``_BLOCK`` tiny) with fewer pairs than
    anchors: every anchor's ``n_i . n_j``, by hand."""
    import hardneg.strategies.mochi as mochi_module

    monkeypatch.setattr(mochi_module, "_BLOCK", 1)
    contrast = mixed_layout()
    first = torch.tensor([[0, 5], [4, 1], [2, 3]])
    second = torch.tensor([[4, 5], [3, 3], [5, 0]])
    got = mochi().pair_similarity(contrast, first, second)
    vectors = vectors_of(contrast)
    for i in range(3):
        for k in range(2):
            want = float(vectors[i, first[i, k]] @ vectors[i, second[i, k]])
            assert float(got[i, k]) == pytest.approx(want, abs=1e-6)


def layouts():
    """Every kind of contrast set the fast log mass serves: in-batch (the anchors are the
    columns; duplicates masked), a shared pool with an excluded column, shared and own columns,
    and raw dot products."""
    g = torch.Generator().manual_seed(11)
    views = [torch.randn(6, 3, generator=g) for _ in range(2)]
    q, k, pool = (torch.randn(n, 3, generator=g) for n in (4, 4, 9))
    return {
        "in_batch_ids": in_batch_contrast(
            views, temperature=0.5, ids=torch.tensor([0, 0, 1, 2, 3, 4])
        ),
        "pool_exclude": pool_contrast(
            q, k, pool, temperature=0.4, exclude_index=torch.tensor([0, 3, 8, 1])
        ),
        "shared_and_own": mixed_layout(),
        "raw": mixed_layout(normalize=False),
    }


@pytest.mark.parametrize("name", ["in_batch_ids", "pool_exclude", "shared_and_own", "raw"])
def test_the_fast_log_mass_is_the_logsumexp_of_the_real_and_hand_made_synthetic_logits(name):
    """With ``want_log_mass`` the fast path returns only ``log sum e^logit`` over the real
    negatives and the ``s + s'`` mixes: equal to the log-sum-exp of the real logits and of
    ``q . h / t`` with ``h`` built by hand from the draws of the same seed; and the count ``M``
    the debiased estimator reads includes the mixes."""
    contrast = layouts()[name]
    s, s_query = 5, 3
    strategy = mochi(num_hardest=3, num_mixed=s, num_query_mixed=s_query)
    context = StepContext(generator=torch.Generator().manual_seed(6), fast=True)
    selection = strategy.select(contrast, context)
    assert selection.extra_negative_logits is None
    draws = strategy.draw(contrast, StepContext(generator=torch.Generator().manual_seed(6)))
    h = mixes_by_hand(contrast, draws)
    t = contrast.temperature
    synthetic = torch.einsum("ad,akd->ak", contrast.anchors.double(), h) / t
    real = contrast.negative_logits.double()
    want = torch.cat([real, synthetic], 1).logsumexp(1)
    assert selection.negative_log_mass.shape == (contrast.num_anchors,)
    assert (selection.negative_log_mass.double() - want).abs().max().item() < 1e-5
    # the mixes change the mass (the test can tell them from the real negatives alone)
    assert (want - real.logsumexp(1)).abs().min().item() > 1e-3
    m = contrast.num_negatives
    got = selection.num_negatives
    if isinstance(m, int):
        assert got == m + s + s_query
    else:
        assert got.tolist() == [v + s + s_query for v in m.tolist()]


def test_the_plain_form_calls_no_fast_path(monkeypatch):
    """``fast=False`` (torch.compile, diagnostics) stays on the plain torch form: nothing of
    :mod:`hardneg.fastpaths` runs, whether or not the objective wants only the log mass, and
    the plain form returns the synthetic logits (the objective sums them)."""
    from hardneg import fastpaths

    def refuse(*args, **kwargs):
        raise AssertionError("a fast path on the plain form")

    for name in dir(fastpaths):
        if callable(getattr(fastpaths, name)) and not name.startswith("_"):
            monkeypatch.setattr(fastpaths, name, refuse)
    strategy = mochi(num_hardest=3, num_mixed=4, num_query_mixed=2)
    for contrast in layouts().values():
        for want_log_mass in (True, False):
            context = StepContext(
                generator=torch.Generator().manual_seed(1), fast=False, want_log_mass=want_log_mass
            )
            selection = strategy.select(contrast, context)
            assert selection.negative_log_mass is None
            assert selection.extra_negative_logits.shape == (contrast.num_anchors, 6)


def test_in_batch_pair_similarity_on_the_fast_path_is_each_pairs_dot_product():
    """In-batch, the fast form reads ``n_i . n_j = t c_ij`` from the logits; pairs on a masked
    entry (``i = j``, the two views of a sample, duplicates) by row-wise dots: every pair's dot
    product equals the vectors' by hand, and so do the synthetic logits of the fast path."""
    contrast = layouts()["in_batch_ids"]  # 12 anchors = columns; 0, 1, 6, 7 one sample
    vectors = contrast.columns.double()
    first = torch.tensor([[0, 1, 2, 5], [6, 3, 11, 0]]).repeat(6, 1)
    second = torch.tensor([[0, 6, 7, 4], [0, 9, 11, 1]]).repeat(6, 1)
    assert bool(torch.isneginf(contrast.negative_logits[first, second]).any())
    assert bool(torch.isfinite(contrast.negative_logits[first, second]).any())
    for fast in (False, True):
        got = mochi().pair_similarity(contrast, first, second, fast)
        want = (vectors[first] * vectors[second]).sum(-1)
        assert got.shape == (12, 4)
        assert (got.double() - want).abs().max().item() < 1e-6
    strategy = mochi(num_hardest=2, num_mixed=12, num_query_mixed=2)  # pairs i = j drawn
    context = StepContext(generator=torch.Generator().manual_seed(8), want_log_mass=False)
    extra = strategy.select(contrast, context).extra_negative_logits
    draws = strategy.draw(contrast, StepContext(generator=torch.Generator().manual_seed(8)))
    assert bool((draws.first == draws.second).any()) and bool((draws.first != draws.second).any())
    want = torch.einsum("ad,akd->ak", contrast.anchors.double(), mixes_by_hand(contrast, draws))
    assert (extra.double() - want / 0.5).abs().max().item() < 1e-5


def test_the_fast_hardest_set_has_min_n_m_slots_when_every_anchor_has_m():
    """The fast form's index is as wide as the set when every anchor has the same ``M`` (an
    int): ``min(N, M)`` slots, no padding; with a count per anchor ``min(N, S)``, padded."""
    contrast = contrasts()["pool_exclude_ties"]  # S = 12, M = 11 for every anchor
    for n, width in ((30, 11), (12, 11), (11, 11), (4, 4)):
        index, count = mochi(num_hardest=n).hardest(contrast, fast=True)
        assert index.shape == (4, width)
        assert count.flatten().tolist() == [min(n, 11)] * 4
    contrast = contrasts()["in_batch_ids"]  # S = 12, M = 4 or 10
    for n, width in ((30, 12), (7, 7)):
        index, count = mochi(num_hardest=n).hardest(contrast, fast=True)
        assert index.shape == (12, width)
