"""Edge cases of the speed paths of HCL / debiased, Ring, SimANS, MoCHi and UnReMix
(``hardneg.fastpaths``) that the twin comparisons of ``tests/test_fastpaths.py`` do not reach.

Each test compares the fast path with an independent expectation: its plain twin (``fast=False``
or the plain expression) in float64 to 1e-10, the equation re-stated here, or, for the draws
that the docs promise equal for a seed, the plain twin's draws. They were written against the
survivors of the mutation run of ``fastpaths.py`` (docs/testing.md, "fastpaths.py: mixing,
band and tilt paths").
"""

from __future__ import annotations

import math

import torch
from _same import assert_same
from _threads import band_over_four_threads, torch_threads

from hardneg import fastpaths
from hardneg.objectives import debias_log_mass


def _plain_debiased(log_mass, pos, *, tau, m, t):
    """The plain twin of ``debiased_infonce``: ``logaddexp(a, debias_log_mass(log R, a)) - a``."""
    ng = debias_log_mass(
        log_mass.unsqueeze(1), pos.unsqueeze(1), tau_plus=tau, num_negatives=m, temperature=t
    )
    return (torch.logaddexp(pos.unsqueeze(1), ng) - pos.unsqueeze(1)).squeeze(1)


def test_debiased_infonce_at_a_zero_estimate_and_an_infinite_mass_equals_the_plain_terms():
    """Two edges of the estimator ``R - tau M e^a``: exactly 0 (``tau M e^a = R``: here
    ``tau = 1/2``, ``M = 2``, ``a = log R``, so ``log(1 - e^gap) = log 0 = -inf``), where the
    floor holds, and ``log R = +inf`` (an overflowed mass), where the term is ``+inf`` as in the
    plain objective (not a huge finite number that would hide the overflow). Values and, on the
    finite rows, gradients against the plain twin in float64."""
    t, tau, m = 0.5, 0.5, 2
    log_mass = torch.tensor([1.25, -0.5, 3.0, math.inf], dtype=torch.float64)
    pos = torch.tensor([1.25, -0.5, 0.2, 0.1], dtype=torch.float64)  # rows 0, 1: gap exactly 0
    fast = fastpaths.debiased_infonce(log_mass, pos, tau_plus=tau, num_negatives=m, temperature=t)
    plain = _plain_debiased(log_mass, pos, tau=tau, m=float(m), t=t)
    floor = math.log(m) - 1.0 / t
    expected_floor = torch.logaddexp(pos[:2], torch.tensor(floor, dtype=torch.float64)) - pos[:2]
    torch.testing.assert_close(fast[:2], expected_floor, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    assert fast[3] == math.inf and plain[3] == math.inf

    finite = slice(0, 3)
    results = []
    for fused in (True, False):
        lm = log_mass[finite].clone().requires_grad_()
        p = pos[finite].clone().requires_grad_()
        if fused:
            out = fastpaths.debiased_infonce(lm, p, tau_plus=tau, num_negatives=m, temperature=t)
        else:
            out = _plain_debiased(lm, p, tau=tau, m=float(m), t=t)
        up = torch.tensor([0.7, 1.3, 0.9], dtype=torch.float64)
        results.append(torch.autograd.grad(out, (lm, p), up))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert bool((results[0][0][:2] == 0).all())  # on the floor: no gradient to log R


def test_debiased_infonce_exactly_on_the_floor_takes_the_floors_gradient():
    """An estimate exactly equal to the floor ``log M - 1/t`` takes the floor's gradient (the
    documented choice: 0 to ``log R``, ``-sigmoid(floor - a)`` to ``a``), where
    ``torch.maximum`` in the plain twin would split it. Built exactly: ``a`` far below ``log R``
    makes ``1 - e^{gap}`` round to 1, so the estimate is ``log R - log(1 - tau)``, and ``log R``
    is chosen with ``(floor + log(1 - tau)) - log(1 - tau) == floor`` in float64."""
    t, tau = 0.5, 0.3
    shift = math.log1p(-tau)
    m = next(
        m for m in range(2, 2000) if ((math.log(m) - 1.0 / t) + shift) - shift == math.log(m) - 2.0
    )
    floor = math.log(m) - 1.0 / t
    log_mass = torch.tensor([floor + shift], dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([floor + shift - 60.0], dtype=torch.float64, requires_grad=True)
    out = fastpaths.debiased_infonce(log_mass, pos, tau_plus=tau, num_negatives=m, temperature=t)
    a = float(pos.detach())
    expected = math.log1p(math.exp(floor - a))  # logaddexp(a, floor) - a
    assert abs(float(out.detach()) - expected) <= 1e-12 * expected
    grad_mass, grad_pos = torch.autograd.grad(out, (log_mass, pos))
    sigmoid = 1.0 / (1.0 + math.exp(a - floor))
    assert float(grad_mass) == 0.0
    assert abs(float(grad_pos) + sigmoid) <= 1e-12


def _mixed_layout(dtype=torch.float64, *, normalize=True, seed=9):
    """Shared columns and each anchor's own columns in one contrast set (``build_contrast``'s
    general form), the anchors a leaf with a gradient."""
    from hardneg.contrast import build_contrast

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 4, generator=g, dtype=dtype).requires_grad_()
    columns = torch.randn(5, 4, generator=g, dtype=dtype)
    positives = torch.randn(6, 4, generator=g, dtype=dtype)
    own = torch.randn(6, 3, 4, generator=g, dtype=dtype)
    contrast = build_contrast(
        a, columns, positives=positives, anchor_columns=own, temperature=0.3, normalize=normalize
    )
    return a, contrast


def _assert_mix_log_mass_is_plain(strategy, contrast, anchors, seed=4):
    """``mochi_mix_log_mass`` against the plain path's ``logsumexp`` over ``select``'s mixes for
    the same seed, in float64: values to 1e-12, the gradient to ``anchors`` to 1e-10."""
    from hardneg.strategies.base import StepContext

    fast = fastpaths.mochi_mix_log_mass(
        strategy, contrast, StepContext(generator=torch.Generator().manual_seed(seed))
    )
    plain_context = StepContext(generator=torch.Generator().manual_seed(seed), fast=False)
    plain = torch.logsumexp(strategy.select(contrast, plain_context).extra_negative_logits, 1)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    up = torch.linspace(0.5, 2.0, fast.shape[0], dtype=torch.float64)
    (gf,) = torch.autograd.grad((fast * up).sum(), anchors, retain_graph=True)
    (gp,) = torch.autograd.grad((plain * up).sum(), anchors)
    torch.testing.assert_close(gf, gp, rtol=1e-10, atol=1e-12)


def test_mochi_mix_log_mass_over_shared_and_own_columns_equals_the_plain_logsumexp():
    """``mochi_mix_log_mass`` where each anchor draws both shared columns and its own (the
    backward's ``W C`` plus the own columns' ``einsum``): value and gradient to the anchors
    equal the plain path's ``logsumexp`` over ``select``'s mixes for the same seed (float64)."""
    import hardneg
    from hardneg.strategies.base import StepContext

    strategy = hardneg.registry.strategy_class("mochi")(
        num_hardest=6, num_mixed=8, num_query_mixed=4
    )
    for normalize in (True, False):
        a, contrast = _mixed_layout(normalize=normalize)
        fast = fastpaths.mochi_mix_log_mass(
            strategy, contrast, StepContext(generator=torch.Generator().manual_seed(4))
        )
        plain_context = StepContext(generator=torch.Generator().manual_seed(4), fast=False)
        draws = strategy.draw(contrast, plain_context)
        drawn = set(draws.columns.flatten().tolist())
        assert drawn & {0, 1, 2, 3, 4} and drawn & {5, 6, 7}  # shared and own columns
        plain_context = StepContext(generator=torch.Generator().manual_seed(4), fast=False)
        plain = torch.logsumexp(strategy.select(contrast, plain_context).extra_negative_logits, 1)
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
        up = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
        (gf,) = torch.autograd.grad((fast * up).sum(), a, retain_graph=True)
        (gp,) = torch.autograd.grad((plain * up).sum(), a)
        torch.testing.assert_close(gf, gp, rtol=1e-10, atol=1e-12)


def test_mochi_mix_log_mass_by_blocks_with_a_short_last_block_and_wide_own_columns(monkeypatch):
    """The block loop of ``mochi_mix_log_mass``: 7 anchors by blocks of 2 rows (the last block
    holds one row: its uniforms are the stream's next words, as in the plain draw), with a
    shared pool, and in-batch with three views (21 anchors); and anchors with their own columns of width ``d = 64`` (the
    row-wise dots' block bound ``2^22 / (s d)`` below the default block): both equal the plain
    path for the same seed."""
    import hardneg
    from hardneg.contrast import build_contrast, in_batch_contrast, pool_contrast

    strategy = hardneg.registry.strategy_class("mochi")(
        num_hardest=5, num_mixed=7, num_query_mixed=3
    )
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(7, 6, generator=g, dtype=torch.float64).requires_grad_()
    z2 = torch.randn(7, 6, generator=g, dtype=torch.float64)
    pool = torch.randn(20, 6, generator=g, dtype=torch.float64)
    with monkeypatch.context() as patch:
        patch.setattr(fastpaths, "_MIX_BLOCK", 1)  # blocks of 2 rows
        three = in_batch_contrast((z1, z2, z2 + 0.3 * pool[:7]), temperature=0.3)
        _assert_mix_log_mass_is_plain(strategy, three, z1)
        _assert_mix_log_mass_is_plain(strategy, pool_contrast(z1, z2, pool, temperature=0.3), z1)
    a = torch.randn(6, 64, generator=g, dtype=torch.float64).requires_grad_()
    contrast = build_contrast(
        a,
        torch.zeros(0, 64, dtype=torch.float64),
        positives=torch.randn(6, 64, generator=g, dtype=torch.float64),
        anchor_columns=torch.randn(6, 9, 64, generator=g, dtype=torch.float64),
        temperature=0.3,
    )
    _assert_mix_log_mass_is_plain(strategy, contrast, a)


def test_mochi_mix_log_mass_with_one_mix_of_each_kind_equals_the_plain_path():
    """``num_mixed = num_query_mixed = 1``: one pair mix and one query mix per anchor, whose
    cosines (``n_i · n_j``: in-batch from the logits, with a pool from the Gram matrix; ``q ·
    n_j = t d_j``), logits and softmax weights (the pair's first coefficient, the query's share
    ``w q``, which reaches the anchors only with raw dot products: the normalisation's backward
    projects it out) must still be formed; cosine and raw logits, against the plain path for
    the same seed (float64)."""
    import hardneg
    from hardneg.contrast import in_batch_contrast, pool_contrast

    strategy = hardneg.registry.strategy_class("mochi")(
        num_hardest=4, num_mixed=1, num_query_mixed=1
    )
    g = torch.Generator().manual_seed(6)
    z1 = torch.randn(8, 5, generator=g, dtype=torch.float64).requires_grad_()
    z2 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    pool = torch.randn(10, 5, generator=g, dtype=torch.float64)
    for normalize in (True, False):  # raw: the query's share w q reaches z1 (no projection)
        in_batch = in_batch_contrast((z1, z2), temperature=0.3, normalize=normalize)
        _assert_mix_log_mass_is_plain(strategy, in_batch, z1)
        with_pool = pool_contrast(z1, z2, pool, temperature=0.3, normalize=normalize)
        _assert_mix_log_mass_is_plain(strategy, with_pool, z1)


def test_mochi_mix_log_mass_of_raw_logits_far_apart_shifts_each_row_by_its_own_maximum():
    """Raw dot products (``normalize=False``) with anchors of norms 1 and 300: one row's mixes
    lie thousands below another's, so a log-sum-exp shifted by anything but each row's own
    maximum would underflow; values and gradients equal the plain path (float64)."""
    import hardneg
    from hardneg.contrast import pool_contrast

    strategy = hardneg.registry.strategy_class("mochi")(
        num_hardest=4, num_mixed=3, num_query_mixed=2
    )
    g = torch.Generator().manual_seed(7)
    scale = torch.tensor([1.0, 300.0] * 3, dtype=torch.float64).unsqueeze(1)
    z1 = (scale * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    z2 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    pool = torch.randn(9, 5, generator=g, dtype=torch.float64)
    contrast = pool_contrast(z1, z2, pool, temperature=0.3, normalize=False)
    logits = contrast.negative_logits.detach()
    assert float(logits[1].max() - logits[0].max()) > 800  # e^{-800} underflows in float64
    _assert_mix_log_mass_is_plain(strategy, contrast, z1)


def test_band_indices_of_half_precision_rows_and_empty_bands_equal_the_topk_band():
    """``band_indices`` beyond its numpy path's dtypes and widths: float16 / bfloat16 rows (no
    integer order keys of that width: ``torch.topk``) of 300 columns, above and below the numpy
    threshold of columns, hold the values of ranks ``[L, U)`` as ``topk(U, sorted=True)``; an
    empty band (``L = U``, also ``0 = 0``) is ``[A, 0]`` on either path."""
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float16, torch.bfloat16):
        for cols in (300, 40):
            x = torch.randn(6, cols, generator=g).to(dtype)
            got = fastpaths.band_indices(x, 3, 17)
            want = x.topk(17, dim=1, sorted=True).indices[:, 3:]
            assert got.shape == (6, 14) and got.dtype == torch.long
            assert bool((got.sort(dim=1).values.diff(dim=1) > 0).all())  # distinct columns
            values = x.gather(1, got).sort(dim=1).values
            assert torch.equal(values, x.gather(1, want).sort(dim=1).values), (dtype, cols)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5, 300, generator=g, dtype=torch.float64).to(dtype)
        for band in ((3, 3), (0, 0)):
            got = fastpaths.band_indices(x, *band)
            assert got.shape == (5, 0) and got.dtype == torch.long, (dtype, band)


def test_band_indices_with_a_nan_in_an_early_row_block_equals_the_topk_band(monkeypatch):
    """A row with a NaN (ranked above ``+inf``, as ``torch.topk``) sends its block of rows to the
    ``argpartition`` fallback; the blocks after it still take the partition path. 40 rows of
    300 distinct values by blocks of 4 rows, NaNs in rows 1 and 22: every row's band holds the
    very columns of ``topk(U, sorted=True)[:, L:]``."""
    monkeypatch.setattr(fastpaths, "_NUMPY_BLOCK", 4 * 300)
    g = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(40, 300, generator=g, dtype=torch.float64).to(dtype)
        x[1, 7] = x[22, 250] = math.nan
        for lower, upper in ((0, 9), (2, 30)):
            got = fastpaths.band_indices(x, lower, upper)
            want = x.topk(upper, dim=1, sorted=True).indices[:, lower:]
            assert_same(got.sort(dim=1).values, want.sort(dim=1).values, (dtype, lower))


def test_band_indices_split_over_fewer_chunks_than_threads_equals_the_topk_band(monkeypatch):
    """Rows split over threads when the rows per thread (``_THREAD_MIN_ENTRIES // cols``, a
    whole number of rows) allow fewer chunks than torch's threads: 14 rows of 512 at 4.19 rows'
    worth of entries per thread (3 chunks), 4 threads; every row's band as ``topk``."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(14, 512, generator=g)
    got = band_over_four_threads(monkeypatch, x, 7, 60, thread_min_entries=4 * 512 + 100)
    want = x.topk(60, dim=1).indices[:, 7:].sort(dim=1).values
    assert_same(got, want)


def test_hardest_columns_is_none_when_a_short_row_meets_a_long_row_at_column_0():
    """``hardest_columns`` (MoCHi, ``k = 3``): row 0 holds a NaN (no member: 2 entries at or
    above its 3rd largest key), row 1 a tie at its edge (4 entries, the first at column 0).
    The counts add up to ``2 k``, and the flat positions cut into rows of ``k`` would give row
    0 the column ``6 = S`` (row 1's column 0): not the hardest set, so None (the caller then
    takes the plain form), in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor(
            [[math.nan, 5.0, 4.0, 1.0, 0.0, -1.0], [9.0, 8.0, 3.0, 3.0, 0.0, 0.0]], dtype=dtype
        )
        assert fastpaths.hardest_columns(x, 3) is None, dtype
        distinct = torch.arange(12.0, dtype=dtype).view(2, 6)  # no tie, no NaN: the set
        want = torch.tensor([[3, 4, 5], [3, 4, 5]])
        assert_same(fastpaths.hardest_columns(distinct, 3), want)


def test_hardest_columns_split_over_fewer_chunks_than_threads_are_the_topk_columns(monkeypatch):
    """``hardest_columns`` split over threads when the rows per thread (a whole number of rows)
    allow fewer chunks than torch's threads: 14 rows of 512 at 4.19 rows' worth of entries per
    thread (3 chunks), 4 threads; each row's ``k`` largest in column order, as ``topk``."""
    monkeypatch.setattr(fastpaths, "_HARDEST_BLOCK", 2048)  # 4 rows per block
    monkeypatch.setattr(fastpaths, "_THREAD_MIN_ENTRIES", 4 * 512 + 100)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(14, 512, generator=g)
    with torch_threads(4):
        got = fastpaths.hardest_columns(x, 20)
    assert got is not None
    assert_same(got, x.topk(20, dim=1).indices.sort(dim=1).values)


def test_simans_accelerator_draw_is_seeded_by_its_generator_for_an_odd_entry_count(monkeypatch):
    """SimANS' torch draw (the accelerators' branch, forced on the CPU): 5 rows of 41 columns
    (an odd number of uniforms: half of the last word unused) draw ``k`` distinct columns, the
    same for the same seed (the words come from the given generator, not the global one)."""
    monkeypatch.setattr(fastpaths, "numpy_partitions", lambda x: False)
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(5, 41, generator=g, dtype=torch.float64)
    centre = logits.mean(dim=1, keepdim=True)
    draws = [
        fastpaths.simans_draw(logits, centre, 0.5, 6, torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert draws[0].shape == (5, 6)
    assert all(len(set(row)) == 6 for row in draws[0].tolist())
    torch.manual_seed(0)  # the global generator moves between the draws: it must not be read
    assert torch.equal(draws[0], draws[1])
    other = fastpaths.simans_draw(logits, centre, 0.5, 6, torch.Generator().manual_seed(3))
    assert torch.equal(draws[0], other)


def test_simans_cpu_draw_reads_the_stream_seeded_by_both_words_even_negative_ones():
    """The CPU draw's ``PCG64`` stream is seeded by the generator's two words taken modulo
    ``2^64`` (a negative word as its unsigned bits): for a seed with a negative word, the draw
    equals the keys ``log(-log u) + a (c - centre)^2`` re-stated from that stream, for ``a = 0``
    (the ``k`` largest uniforms) and ``a = 1``."""
    import numpy as np

    def words(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.empty(2, dtype=torch.int64).random_(-(2**63), None, generator=gen).tolist()

    seed = next(s for s in range(100) if min(words(s)) < 0)
    rows, cols, k = 4, 64, 9
    logits = torch.randn(rows, cols, generator=torch.Generator().manual_seed(17)).double()
    centre = logits[:, :1] + 0.5
    for a in (0.0, 1.0):
        got = fastpaths.simans_draw(logits, centre, a, k, torch.Generator().manual_seed(seed))
        unsigned = [w + 2**64 if w < 0 else w for w in words(seed)]
        stream = np.random.PCG64(np.random.SeedSequence(unsigned))
        raw = torch.from_numpy(stream.random_raw(rows * cols // 2).view(np.int64))
        u = fastpaths.unit_uniforms(raw, rows * cols).view(rows, cols).double()
        keys = u.log().neg().log() + a * (logits - centre).square()
        want = keys.topk(k, dim=1, largest=False).indices
        assert_same(got.sort(dim=1).values, want.sort(dim=1).values, a)


def test_np_smallest_with_a_tie_at_the_edge_takes_the_k_smallest_values():
    """``_np_smallest`` where each row's ``k``-th and ``k+1``-th smallest are equal (the
    ``argpartition`` fallback): 20 rows of 1000, ``k = 300`` (long rows: numpy's partition
    leaves the entries before its pivot unsorted); the values taken are each row's ``k``
    smallest, as ``torch.topk(largest=False)``."""
    import numpy as np

    g = torch.Generator().manual_seed(16)
    keys = torch.randn(20, 1000, generator=g, dtype=torch.float64)
    ranked = keys.sort(dim=1).values
    rows = torch.arange(20)
    edge = keys.argsort(dim=1)[:, 300]  # the k+1-th smallest takes the k-th's value
    keys[rows, edge] = ranked[:, 299]
    for dtype in (np.float64, np.float32):
        x = keys.numpy().astype(dtype)
        got = torch.from_numpy(fastpaths._np_smallest(x, 300))
        xt = torch.from_numpy(x)
        want = xt.topk(300, dim=1, largest=False).values.sort(dim=1).values
        assert torch.equal(xt.gather(1, got).sort(dim=1).values, want), dtype


def test_unremix_column_deltas_hand_back_an_underflowing_negative_under_a_mask():
    """``unremix_column_deltas`` with a negative mask (a pool with ``exclude_index``): column 1
    is a negative of both anchors whose mass ``e^{c - M}`` underflows in float32 (its best logit
    -70.7 against ``M = 100``), so the fast form declines (None: the caller takes the plain
    column softmax); column 2, excluded for every anchor, alone would not make it decline."""
    from hardneg.contrast import pool_contrast
    from hardneg.strategies.unremix import column_gradients

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool = torch.tensor([[1.0, 0.0], [-1.0, -1.0], [0.5, 0.5]])
    exclude = torch.tensor([2, 2])
    c = pool_contrast(q, q.clone(), pool, temperature=0.01, exclude_index=exclude)
    assert c.negative_mask is not None
    shifted = fastpaths.row_exponentials(c.negative_logits)
    assert fastpaths.unremix_column_deltas(c, shifted) is None
    near = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    c64 = pool_contrast(q.double(), q.double(), near, temperature=0.01, exclude_index=exclude)
    got = fastpaths.unremix_column_deltas(c64, fastpaths.row_exponentials(c64.negative_logits))
    want = column_gradients(c64)
    torch.testing.assert_close(got[:2], want[:2], rtol=1e-10, atol=1e-12)  # the negatives
