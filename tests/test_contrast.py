"""The contrast-set builders and ``ContrastSet``'s helpers, entry by entry.

Every expectation is written from the definitions in ``hardneg.contrast``'s docstrings (who is a
positive, a negative or neither of each anchor; ``s / t``; the per-anchor counts), with explicit
loops over anchors and columns. Written for mutation testing (docs/testing.md).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _same import assert_same

from hardneg.contrast import build_contrast, in_batch_contrast, pool_contrast, retrieval_contrast

NEG_INF = float("-inf")


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def cos(x, y):
    return float(F.normalize(x.detach(), dim=-1) @ F.normalize(y.detach(), dim=-1))


def test_build_contrast_masks_positives_and_masked_columns_and_appends_own_columns():
    a, c, own = randn(3, 4, seed=1), randn(5, 4, seed=2), randn(3, 2, 4, seed=3)
    a.requires_grad_()
    c.requires_grad_()
    index = torch.tensor([0, 3, 4])  # one positive each, given as [A]
    user_mask = torch.tensor(
        [[True, True, False, True, True], [True] * 5, [False, True, True, True, True]]
    )
    kept = user_mask.clone()
    weight = torch.tensor([0.5, 1.0, 2.0])
    t = 0.25
    cs = build_contrast(
        a,
        c,
        temperature=t,
        positive_index=index,
        positive_weight=weight,
        negative_mask=user_mask,
        anchor_columns=own,
    )
    assert torch.equal(user_mask, kept)  # the caller's mask is not written to
    assert cs.negative_logits.shape == (3, 7) and cs.num_shared == 5 and cs.num_anchors == 3
    assert cs.single_positive
    assert cs.positive_index.tolist() == [[0], [3], [4]]
    assert cs.positive_weight.tolist() == [[0.5], [1.0], [2.0]]
    for i in range(3):
        assert cs.positive_logits[i, 0].item() == pytest.approx(
            cos(a[i], c[index[i]]) / t, rel=1e-10
        )
        torch.testing.assert_close(cs.positives[i, 0], F.normalize(c[index[i]], dim=0))
        for j in range(7):
            negative = j >= 5 or (bool(user_mask[i, j]) and j != index[i])
            assert bool(cs.negative_mask[i, j]) == negative, (i, j)
            if not negative:
                assert cs.negative_logits[i, j].item() == NEG_INF
            else:
                other = c[j] if j < 5 else own[i, j - 5]
                assert cs.negative_logits[i, j].item() == pytest.approx(
                    cos(a[i], other) / t, rel=1e-10
                )
        assert int(cs.num_negatives[i]) == int(cs.negative_mask[i].sum())
    assert cs.num_negatives.tolist() == [5, 6, 5]
    assert cs.negative_mask.dtype == torch.bool
    assert cs.positive_weight.dtype == torch.float64  # the logits' dtype, not the weight's
    torch.testing.assert_close(cs.anchor_columns, F.normalize(own, dim=-1))
    assert cs.own_column_mask().tolist() == [[False] * 5 + [True] * 2] * 3
    # gradient reaches the shared columns unless they are detached
    grad = torch.autograd.grad(cs.negative_logits[:, :5].masked_fill(~user_mask, 0).sum(), c)[0]
    assert grad.abs().sum() > 0
    detached = build_contrast(a, c, temperature=t, positive_index=index, detach_columns=True)
    assert not detached.columns.requires_grad
    finite = detached.negative_logits.masked_fill(~detached.negative_mask, 0.0)
    assert torch.autograd.grad(finite.sum(), c, allow_unused=True)[0] is None
    assert torch.autograd.grad(finite.sum(), a)[0].abs().sum() > 0


def test_build_contrast_counts_every_column_but_the_positives_without_a_mask():
    a, c = randn(2, 3, seed=4), randn(6, 3, seed=5)
    index = torch.tensor([[1, 2], [0, 5]])
    cs = build_contrast(a, c, temperature=1.0, positive_index=index)
    assert cs.num_negatives == 4
    assert cs.negative_mask.sum(dim=1).tolist() == [4, 4]
    assert not cs.single_positive
    assert cs.positive_weight.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    for i in range(2):
        for p in range(2):
            expected = cos(a[i], c[index[i, p]])
            assert cs.positive_logits[i, p].item() == pytest.approx(expected, rel=1e-10)
    # explicit positives: nothing is masked, M = C
    p = randn(2, 3, seed=6)
    cs = build_contrast(a, c, temperature=0.5, positives=p)
    assert cs.num_negatives == 6 and cs.negative_mask is None and cs.positive_index is None
    assert cs.mask().tolist() == [[True] * 6] * 2
    assert cs.log_num_negatives() == pytest.approx(math.log(6))
    assert cs.own_column_mask().tolist() == [[False] * 6] * 2
    assert cs.positive_logits[1, 0].item() == pytest.approx(cos(a[1], p[1]) / 0.5, rel=1e-10)
    with pytest.raises(ValueError, match="^give exactly one of positive_index and positives$"):
        build_contrast(a, c, temperature=1.0)
    with pytest.raises(ValueError, match="^give exactly one of positive_index and positives$"):
        build_contrast(a, c, temperature=1.0, positives=p, positive_index=index)


def test_build_contrast_without_normalisation_uses_raw_dot_products():
    a, c = randn(2, 3, seed=7) * 3, randn(4, 3, seed=8) * 2
    cs = build_contrast(a, c, temperature=0.5, positive_index=torch.tensor([0, 1]), normalize=False)
    assert not cs.normalized
    assert cs.negative_logits[0, 2].item() == pytest.approx(float(a[0] @ c[2]) / 0.5, rel=1e-10)
    assert cs.positive_logits[1, 0].item() == pytest.approx(float(a[1] @ c[1]) / 0.5, rel=1e-10)


def test_restricted_keeps_only_the_chosen_negatives_and_counts_them_per_anchor():
    a, c = randn(2, 3, seed=9), randn(4, 3, seed=10)
    cs = build_contrast(a, c, temperature=1.0, positive_index=torch.tensor([0, 1]))
    keep = torch.tensor([[True, False, True, True], [True, True, False, False]])
    r = cs.restricted(keep)
    assert r.negative_mask.tolist() == [[False, False, True, True], [True, False, False, False]]
    assert r.num_negatives.tolist() == [2, 1]
    log_m = r.log_num_negatives()
    assert log_m.dtype == torch.float64  # the logits' precision, not the default float32
    assert log_m.tolist() == [math.log(2), 0.0]
    for i in range(2):
        for j in range(4):
            if keep[i, j]:
                assert r.negative_logits[i, j] == cs.negative_logits[i, j]
            else:
                assert r.negative_logits[i, j].item() == NEG_INF
    assert cs.num_negatives == 3  # the original is unchanged


@pytest.mark.parametrize("with_ids", [False, True])
def test_in_batch_contrast_follows_the_view_layout(with_ids):
    v, n, t = 3, 3, 0.5
    views = [randn(n, 4, seed=20 + k) for k in range(v)]
    ids = torch.tensor([7, 8, 7]) if with_ids else None
    cs = in_batch_contrast(views, temperature=t, ids=ids)
    sample_id = (ids if with_ids else torch.arange(n)).tolist()
    assert cs.positive_index.tolist() == [
        [w * n + i for w in range(v) if w != a_view] for a_view in range(v) for i in range(n)
    ]
    for row in range(v * n):
        a_view, i = divmod(row, n)
        others = [w for w in range(v) if w != a_view]
        for p, w in enumerate(others):
            expected = cos(views[a_view][i], views[w][i]) / t
            assert cs.positive_logits[row, p].item() == pytest.approx(expected, rel=1e-10)
        for col in range(v * n):
            w, j = divmod(col, n)
            negative = sample_id[j] != sample_id[i]
            assert bool(cs.negative_mask[row, col]) == negative, (row, col)
            if negative:
                expected = cos(views[a_view][i], views[w][j]) / t
                assert cs.negative_logits[row, col].item() == pytest.approx(expected, rel=1e-10)
            else:
                assert cs.negative_logits[row, col].item() == NEG_INF
    if with_ids:
        assert cs.num_negatives.tolist() == [3, 6, 3] * v
    else:
        assert cs.num_negatives == v * n - v
    assert cs.positive_weight.tolist() == [[1.0, 1.0]] * (v * n)


def test_pool_contrast_masks_each_querys_own_entry_and_never_backpropagates_into_the_pool():
    q, k, pool = randn(3, 4, seed=30), randn(3, 4, seed=31), randn(5, 4, seed=32)
    pool.requires_grad_()
    t = 0.2
    cs = pool_contrast(q, k, pool, temperature=t, exclude_index=torch.tensor([4, 0, 4]))
    assert cs.num_negatives == 4
    assert not cs.columns.requires_grad
    for i in range(3):
        assert cs.positive_logits[i, 0].item() == pytest.approx(cos(q[i], k[i]) / t, rel=1e-10)
        for j in range(5):
            excluded = j == [4, 0, 4][i]
            assert bool(cs.negative_mask[i, j]) != excluded
            if excluded:
                assert cs.negative_logits[i, j].item() == NEG_INF
            else:
                assert cs.negative_logits[i, j].item() == pytest.approx(
                    cos(q[i], pool[j]) / t, rel=1e-10
                )
    plain = pool_contrast(q, k, pool, temperature=t)
    assert plain.num_negatives == 5 and plain.negative_mask is None
    raw = pool_contrast(q, k, pool, temperature=t, normalize=False)
    assert raw.positive_logits[2, 0].item() == pytest.approx(float(q[2] @ k[2]) / t, rel=1e-10)
    assert raw.negative_logits[1, 3].item() == pytest.approx(
        float(q[1] @ pool[3].detach()) / t, rel=1e-10
    )


def test_retrieval_contrast_marks_each_anchors_own_tuple_and_masks_duplicate_candidates():
    b, h = 3, 2
    anchors, positives = randn(b, 4, seed=40), randn(b, 4, seed=41)
    hard = randn(b, h, 4, seed=42)
    cs = retrieval_contrast(anchors, positives, hard, temperature=1.0)
    # columns: positives 0..2, then anchor i's hard negatives at 3 + i h + m
    for i in range(b):
        own = [i] + [b + i * h + m for m in range(h)]
        assert cs.own_column_mask()[i].nonzero().flatten().tolist() == own
        expected = cos(anchors[i], hard[i, 1])
        assert cs.negative_logits[i, b + i * h + 1].item() == pytest.approx(expected, rel=1e-10)
    assert cs.num_negatives == b + b * h - 1
    # candidate ids alone: the first B are the positives' ids
    candidate_ids = torch.tensor([1, 2, 3, 2, 9, 9, 1, 3, 3])
    dup = retrieval_contrast(anchors, positives, hard, temperature=1.0, candidate_ids=candidate_ids)
    for i in range(b):
        for j in range(b + b * h):
            negative = int(candidate_ids[j]) != int(candidate_ids[i])
            assert bool(dup.negative_mask[i, j]) == negative, (i, j)
    assert dup.num_negatives.tolist() == [7, 7, 6]
    # explicit anchor ids override
    ids = torch.tensor([9, 5, 5])
    other = retrieval_contrast(
        anchors, positives, hard, temperature=1.0, ids=ids, candidate_ids=candidate_ids
    )
    masked = [(i, j) for i in range(b) for j in range(b + b * h) if not other.negative_mask[i, j]]
    assert masked == [(0, 0), (0, 4), (0, 5), (1, 1), (2, 2)]
    # the anchors' own texts: a candidate with the anchor's id is masked as well as one with
    # its positive's id (a chained pair puts the anchor's text among the candidates)
    anchor_ids = torch.tensor([3, 7, 1])
    own = retrieval_contrast(
        anchors,
        positives,
        hard,
        temperature=1.0,
        candidate_ids=candidate_ids,
        anchor_ids=anchor_ids,
    )
    for i in range(b):
        for j in range(b + b * h):
            cid = int(candidate_ids[j])
            negative = cid != int(candidate_ids[i]) and cid != int(anchor_ids[i])
            assert bool(own.negative_mask[i, j]) == negative, (i, j)
    assert own.num_negatives.tolist() == [4, 7, 4]
    # pairs only (no hard negatives): every positive is a column, only its own is its tuple
    pairs = retrieval_contrast(anchors, positives, temperature=1.0)
    assert pairs.own_column_mask().tolist() == torch.eye(b, dtype=torch.bool).tolist()
    empty = retrieval_contrast(anchors, positives, hard[:, :0], temperature=1.0)
    assert empty.own_column_mask().tolist() == torch.eye(b, dtype=torch.bool).tolist()


def test_retrieval_contrast_with_one_hard_negative_each_and_raw_dot_products():
    b = 3
    anchors, positives = randn(b, 4, seed=43) * 2, randn(b, 4, seed=44)
    hard = randn(b, 1, 4, seed=45) * 3
    cs = retrieval_contrast(anchors, positives, hard, temperature=0.5, normalize=False)
    for i in range(b):
        assert cs.own_column_mask()[i].nonzero().flatten().tolist() == [i, b + i]
        expected = float(anchors[i] @ hard[i, 0]) / 0.5
        assert cs.negative_logits[i, b + i].item() == pytest.approx(expected, rel=1e-10)
        expected = float(anchors[i] @ positives[i]) / 0.5
        assert cs.positive_logits[i, 0].item() == pytest.approx(expected, rel=1e-10)


def _inputs(names, wide):
    """float32 inputs except ``wide`` (float64); each drawn in float64 and rounded to float32, so
    the float64 reference of the float32 ones is exact."""
    out = {}
    for k, name in enumerate(names):
        x = randn(3, 4, seed=50 + k).float().double()
        out[name] = x if name == wide else x.float()
    return out


@pytest.mark.parametrize("wide", ["q", "k", "pool"])
def test_pool_contrast_computes_in_float64_when_any_input_is_float64(wide):
    x = _inputs(["q", "k", "pool"], wide)
    cs = pool_contrast(x["q"], x["k"], x["pool"], temperature=0.5)
    assert cs.negative_logits.dtype == cs.positive_logits.dtype == torch.float64
    q, k, pool = (F.normalize(x[n].double(), dim=1) for n in ("q", "k", "pool"))
    torch.testing.assert_close(cs.negative_logits, q @ pool.T / 0.5, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        cs.positive_logits[:, 0], (q * k).sum(1) / 0.5, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("wide", ["anchors", "columns", "positives", "anchor_columns"])
def test_build_contrast_computes_in_float64_when_any_input_is_float64(wide):
    x = _inputs(["anchors", "columns", "positives", "anchor_columns"], wide)
    own = x["anchor_columns"].unsqueeze(1)
    cs = build_contrast(
        x["anchors"], x["columns"], temperature=2.0, positives=x["positives"], anchor_columns=own
    )
    a, c, p, o = (F.normalize(x[n].double(), dim=-1) for n in x)
    expected = torch.cat([a @ c.T, (a * o).sum(1, keepdim=True)], dim=1) / 2.0
    assert cs.negative_logits.dtype == cs.positive_logits.dtype == torch.float64
    assert cs.anchor_columns.dtype == cs.positives.dtype == cs.anchors.dtype == torch.float64
    torch.testing.assert_close(cs.negative_logits, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cs.positive_logits[:, 0], (a * p).sum(1) / 2.0, rtol=1e-12, atol=0)


@pytest.mark.parametrize("wide", ["z1", "z2"])
def test_in_batch_and_retrieval_contrasts_compute_in_float64_when_any_view_is(wide):
    x = _inputs(["z1", "z2"], wide)
    z = F.normalize(torch.cat([x["z1"].double(), x["z2"].double()]), dim=1)
    cs = in_batch_contrast([x["z1"], x["z2"]], temperature=0.5)
    assert cs.negative_logits.dtype == cs.positive_logits.dtype == torch.float64
    finite = torch.isfinite(cs.negative_logits)
    torch.testing.assert_close(cs.negative_logits[finite], (z @ z.T / 0.5)[finite], rtol=1e-12, atol=1e-12)  # fmt: skip
    r = retrieval_contrast(x["z1"], x["z2"], temperature=0.5)
    assert r.negative_logits.dtype == torch.float64
    expected = z[:3] @ z[3:].T / 0.5
    torch.testing.assert_close(r.positive_logits[:, 0], expected.diagonal(), rtol=1e-12, atol=0)


def test_half_precision_inputs_and_bfloat16_autocast_give_float32_logits():
    h = [randn(3, 4, seed=60 + k).half() for k in range(5)]
    hard = h[3].unsqueeze(1)
    built = [
        pool_contrast(h[0], h[1], h[2], temperature=0.5),
        build_contrast(h[0], h[2], temperature=0.5, positives=h[1], anchor_columns=hard),
        in_batch_contrast([h[0], h[1]], temperature=0.5),
        retrieval_contrast(h[0], h[1], hard, temperature=0.5),
    ]
    f = [x.float() for x in h]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        built += [
            pool_contrast(f[0], f[1], f[2], temperature=0.5),
            build_contrast(
                f[0], f[2], temperature=0.5, positives=f[1], anchor_columns=hard.float()
            ),
            in_batch_contrast([f[0], f[1]], temperature=0.5),
            retrieval_contrast(f[0], f[1], hard.float(), temperature=0.5),
        ]
    for k, cs in enumerate(built):
        assert cs.negative_logits.dtype == torch.float32, k
        assert cs.positive_logits.dtype == torch.float32, k
        assert cs.anchors.dtype == torch.float32, k


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_pool_contrast_reads_an_exclude_index_of_any_integer_dtype_as_positions(dtype):
    q, k, pool = randn(3, 4, seed=70), randn(3, 4, seed=71), randn(5, 4, seed=72)
    index = torch.tensor([4, 0, 1])
    want = pool_contrast(q, k, pool, temperature=0.5, exclude_index=index)
    got = pool_contrast(q, k, pool, temperature=0.5, exclude_index=index.to(dtype))
    assert_same(got.negative_mask, want.negative_mask)
    assert_same(got.negative_logits, want.negative_logits)
    assert [int(x) for x in (~got.negative_mask).nonzero()[:, 1]] == [4, 0, 1]


def test_every_builder_fills_the_fields_it_documents():
    q, k, pool = randn(3, 4, seed=80), randn(3, 4, seed=81), randn(5, 4, seed=82)
    hard = randn(3, 2, 4, seed=83)
    for normalize in (True, False):
        prep = (lambda x: F.normalize(x, dim=-1)) if normalize else (lambda x: x)
        sets = {
            "pool": pool_contrast(
                q, k, pool, temperature=0.5, exclude_index=torch.tensor([0, 1, 2]),
                normalize=normalize,
            ),
            "pool, no index": pool_contrast(q, k, pool, temperature=0.5, normalize=normalize),
            "in batch": in_batch_contrast([q, k], temperature=0.5, normalize=normalize),
            "retrieval": retrieval_contrast(q, k, hard, temperature=0.5, normalize=normalize),
            "build": build_contrast(
                q, pool, temperature=0.5, positives=k, anchor_columns=hard, normalize=normalize
            ),
        }  # fmt: skip
        for name, cs in sets.items():
            assert cs.normalized is normalize, name
            assert cs.mask().dtype == torch.bool, name
            assert cs.own_column_mask().dtype == torch.bool, name
            assert cs.temperature == 0.5 and isinstance(cs.temperature, float), name
        torch.testing.assert_close(sets["pool"].positives, prep(k).unsqueeze(1))
        torch.testing.assert_close(sets["pool"].anchors, prep(q))
        torch.testing.assert_close(sets["pool"].columns, prep(pool))
        assert sets["pool"].negative_mask.dtype == torch.bool
        torch.testing.assert_close(sets["build"].positives, prep(k).unsqueeze(1))
        torch.testing.assert_close(sets["in batch"].positives[:3, 0], prep(k))
        torch.testing.assert_close(sets["in batch"].positives[3:, 0], prep(q))
        torch.testing.assert_close(sets["retrieval"].positives[:, 0], prep(k))


def test_build_contrast_reads_a_positive_index_of_any_integer_dtype():
    a, c = randn(3, 4, seed=90), randn(5, 4, seed=91)
    index = torch.tensor([[0, 2], [4, 1], [3, 0]])
    want = build_contrast(a, c, temperature=0.5, positive_index=index)
    got = build_contrast(a, c, temperature=0.5, positive_index=index.to(torch.int32))
    assert got.positive_index.dtype == torch.long
    assert_same(got.negative_logits, want.negative_logits)
    assert_same(got.positive_logits, want.positive_logits)
