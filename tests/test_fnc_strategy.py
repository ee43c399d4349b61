"""False-negative cancellation (``fnc``) against the paper's rule restated per anchor in float64
loops, built from the raw embeddings of each call form (not from the contrast set): the
support views of an anchor score every negative (the max or the mean of their cosines), the
top-``k`` scores and every cosine above ``threshold`` are the false negatives (never the least
supported negative), then eliminated or also attracted as extra positives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _float64_loops import lse

import hardneg
from hardneg import fastpaths
from hardneg.contrast import build_contrast, in_batch_contrast, pool_contrast
from hardneg.registry import strategy_class

T = 0.4


def unit(x):
    return F.normalize(x.double(), dim=-1)


def anchors_of(form, data, normalize=True):
    """Per anchor ``(query, support vectors, candidate negatives)``, unit float64 vectors (the
    raw ones with ``normalize=False``: the logits are then dot products)."""
    vec = unit if normalize else torch.Tensor.double
    rows = []
    if form in ("in_batch", "in_batch_ids"):
        views = [vec(v) for v in data["views"]]
        n = views[0].shape[0]
        ids = data.get("ids", torch.arange(n))
        for v, view in enumerate(views):
            for i in range(n):
                support = [views[w][i] for w in range(len(views)) if w != v]
                cands = [
                    views[w][j] for w in range(len(views)) for j in range(n) if ids[j] != ids[i]
                ]
                rows.append((view[i], support, cands))
    elif form in ("pool", "pool_exclude"):
        q, k, pool = vec(data["q"]), vec(data["k"]), vec(data["negatives"])
        skip = data.get("exclude_index", torch.full((q.shape[0],), -1))
        for i in range(q.shape[0]):
            cands = [pool[j] for j in range(pool.shape[0]) if j != int(skip[i])]
            rows.append((q[i], [k[i]], cands))
    elif form == "per_anchor_pool":
        q, k, pool = vec(data["q"]), vec(data["k"]), vec(data["negatives"])
        for i in range(q.shape[0]):
            rows.append((q[i], [k[i]], list(pool[i])))
    elif form == "retrieval":
        a, p, hard = vec(data["q"]), vec(data["k"]), vec(data["hard_negatives"])
        b, h = hard.shape[0], hard.shape[1]
        every_hard = [hard[j, m] for j in range(b) for m in range(h)]
        for i in range(b):
            rows.append((a[i], [p[i]], [p[j] for j in range(b) if j != i] + every_hard))
    else:
        raise AssertionError(form)
    return rows


def found_of(support, cands, top_k, threshold, agg):
    """Indices of the false negatives among ``cands`` (the paper's rule, no tensor ops)."""
    score = []
    for c in cands:
        cosines = [float(s @ c) for s in support]
        score.append(max(cosines) if agg == "max" else sum(cosines) / len(cosines))
    order = sorted(range(len(cands)), key=lambda j: -score[j])
    found = set(order[:top_k])
    if threshold is not None:
        found |= {j for j in range(len(cands)) if score[j] > threshold}
    found.discard(order[-1])  # the least supported negative always stays
    return found


def reference_loss(
    form,
    data,
    *,
    mode,
    top_k=1,
    threshold=None,
    agg="max",
    t=T,
    objective="infonce",
    normalize=True,
):
    total = 0.0
    rows = anchors_of(form, data, normalize)
    for q, support, cands in rows:
        found = found_of(support, cands, top_k, threshold, agg)
        negs = [float(q @ c) / t for j, c in enumerate(cands) if j not in found]
        pos = [float(q @ s) / t for s in support]
        if mode == "attract":
            pos += [float(q @ cands[j]) / t for j in sorted(found)]
        if objective == "infonce":  # each positive in its own partition, averaged
            log_r = lse(negs)
            total += sum(lse([p, log_r]) - p for p in pos) / len(pos)
        else:  # Jensen-Shannon: mean softplus of the kept negatives, of -p over the positives

            def sp(x):
                return math.log1p(math.exp(-abs(x))) + max(x, 0.0)

            e_pos = sum(math.log(2) - sp(-p) for p in pos) / len(pos)
            e_neg = sum(sp(c) for c in negs) / len(negs) - math.log(2)
            total += e_neg - e_pos
    return total / len(rows)


def inputs(form, seed=0, n=4, d=5, views=3, pool=7):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if form in ("in_batch", "in_batch_ids"):
        base = r(n, d)
        data = {"views": [base + 0.6 * r(n, d) for _ in range(views)]}
        if form == "in_batch_ids":
            data["ids"] = torch.tensor([0, 1, 0, 2, 3, 1])[:n]
        return data
    data = {"q": r(n, d), "k": r(n, d)}
    if form == "pool":
        data["negatives"] = r(pool, d)
    if form == "pool_exclude":
        data["negatives"] = r(pool, d)
        data["exclude_index"] = torch.arange(n) * 2 % pool
    if form == "per_anchor_pool":
        data["negatives"] = r(n, pool, d)
    if form == "retrieval":
        data["hard_negatives"] = r(n, 2, d)
    return data


def call(loss, form, data, **kw):
    if form in ("in_batch", "in_batch_ids"):
        views = data["views"]
        if "ids" in data:
            kw["ids"] = data["ids"]
        return loss(views[0], views[1], extra_views=views[2:], **kw)
    extra = {
        key: data[key] for key in ("negatives", "exclude_index", "hard_negatives") if key in data
    }
    return loss(data["q"], data["k"], **extra, **kw)


def every_path(loss, form, data):
    """The loss on its three paths: fast log mass, plain log mass, dense weights (diagnostics)."""
    loss.fast = True
    fast = call(loss, form, data)
    loss.fast = False
    plain = call(loss, form, data)
    dense = call(loss, form, data, return_diagnostics=True).loss
    return {"fast": fast.item(), "plain": plain.item(), "dense": dense.item()}


CASES = [
    ("in_batch", dict(mode="eliminate", top_k=2, agg="mean"), {}),
    ("in_batch", dict(mode="attract", top_k=1, agg="mean"), {}),
    ("in_batch", dict(mode="attract", top_k=3, agg="max"), dict(views=2)),
    ("in_batch_ids", dict(mode="attract", top_k=2, agg="mean"), dict(n=6)),
    ("pool", dict(mode="attract", top_k=2), {}),
    ("pool_exclude", dict(mode="eliminate", top_k=3), {}),
    ("per_anchor_pool", dict(mode="attract", top_k=1), {}),
    ("per_anchor_pool", dict(mode="eliminate", top_k=3), {}),
    ("retrieval", dict(mode="attract", top_k=2), {}),
    # a threshold (alone, or with top_k), on the cosine, not on the logit
    ("in_batch", dict(mode="attract", top_k=0, threshold=0.3, agg="mean"), {}),
    ("in_batch", dict(mode="eliminate", top_k=1, threshold=0.5), dict(views=2)),
    ("pool", dict(mode="attract", top_k=0, threshold=0.2), {}),
    ("retrieval", dict(mode="eliminate", top_k=0, threshold=0.0), {}),
    # top_k at or above M: every negative but the least supported one is found
    ("in_batch", dict(mode="attract", top_k=4), dict(n=3, views=2)),  # M = 4
    ("in_batch", dict(mode="eliminate", top_k=50), dict(n=3, views=2)),
    ("pool", dict(mode="attract", top_k=10), dict(n=3, pool=5)),  # A = 3 < S = 5 < top_k
    ("pool", dict(mode="eliminate", top_k=5), dict(n=6, pool=5)),  # A = 6 > S = M = 5
]


@pytest.mark.parametrize(
    "form,hparams,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_every_path_of_every_call_form_equals_the_float64_rule(form, hparams, shape):
    data = inputs(form, **shape)
    loss = hardneg.create_loss("fnc", temperature=T, **hparams)
    want = reference_loss(form, data, **hparams)
    got = every_path(loss, form, data)
    for path, value in got.items():
        assert value == pytest.approx(want, rel=1e-9), path


@pytest.mark.parametrize("mode", ["eliminate", "attract"])
@pytest.mark.parametrize(
    "setting",
    [
        # cosine logits up to 1/t = 200: e^c overflows float32 (and e^-c underflows to 0)
        dict(temperature=0.005),
        # raw dot products of a few hundred: no 1/t bound holds
        dict(temperature=T, normalize=False),
    ],
    ids=["t=0.005", "raw"],
)
def test_the_fused_log_mass_in_float32_holds_past_the_range_of_an_unshifted_exponential(
    mode, setting
):
    """The fused path skips the row maximum only when the logits are bounded by a small
    ``1/t`` (cosines): float32 inputs whose logits reach far past ``e^x``'s normal range must
    still equal the float64 rule (a bound claimed for raw dot products, or a ``t`` in place
    of ``1/t``, leaves ``e^c`` unshifted: inf or 0)."""
    data = inputs("pool", seed=4, n=6, pool=9)
    scale = 1.0 if setting.get("normalize", True) else 8.0
    data = {key: value * scale for key, value in data.items()}
    want = reference_loss(
        "pool",
        data,
        mode=mode,
        top_k=2,
        t=setting["temperature"],
        normalize=setting.get("normalize", True),
    )
    rows = anchors_of("pool", data, setting.get("normalize", True))
    logits = [float(q @ c) / setting["temperature"] for q, _, cands in rows for c in cands]
    assert max(logits) > 100 and min(logits) < -100  # past float32's e^x both ways
    loss = hardneg.create_loss("fnc", mode=mode, top_k=2, **setting)
    got = call(loss, "pool", {key: value.float() for key, value in data.items()})
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_the_defaults_attract_the_one_negative_best_supported_by_the_most_similar_view():
    data = inputs("in_batch", seed=3, n=5, views=3)
    loss = hardneg.create_loss("fnc")
    assert loss.strategy.hparams() == {
        "mode": "attract",
        "top_k": 1,
        "threshold": None,
        "agg": "max",
    }
    want = reference_loss("in_batch", data, mode="attract", top_k=1, agg="max", t=0.5)
    for path, value in every_path(loss, "in_batch", data).items():
        assert value == pytest.approx(want, rel=1e-9), path
    # the other aggregation and mode do give other values here (the test can fail)
    assert want != pytest.approx(
        reference_loss("in_batch", data, mode="attract", agg="mean", t=0.5)
    )
    assert want != pytest.approx(reference_loss("in_batch", data, mode="eliminate", t=0.5))


@pytest.mark.parametrize("mode", ["eliminate", "attract"])
def test_the_jensen_shannon_objective_averages_over_the_kept_negatives_and_every_positive(mode):
    data = inputs("in_batch", seed=5, n=4, views=3)
    hp = dict(mode=mode, top_k=2, agg="mean")
    loss = hardneg.create_loss("fnc", temperature=T, objective="jsd", **hp)
    want = reference_loss("in_batch", data, objective="jsd", **hp)
    assert call(loss, "in_batch", data).item() == pytest.approx(want, rel=1e-9)


def test_a_cosine_equal_to_the_threshold_is_not_a_false_negative():
    """Scores are compared with ``threshold`` strictly, on the cosine scale: cosines exact in
    binary (0.6 = 3/5 of a 3-4-5 triangle; the temperature a power of two)."""
    q = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)  # the support view
    pool = torch.tensor(
        [[3.0, 4.0, 0.0], [4.0, 3.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64
    )
    contrast = pool_contrast(q, k, pool, temperature=0.5)
    fnc = strategy_class("fnc")(top_k=0, threshold=0.6)
    assert fnc.false_negatives(contrast).tolist() == [[False, True, False, False]]
    fnc = strategy_class("fnc")(top_k=0, threshold=0.59)
    assert fnc.false_negatives(contrast).tolist() == [[True, True, False, False]]
    scores = fnc.support_scores(contrast)[0].tolist()
    assert scores == pytest.approx([0.6, 0.8, 0.0, -1.0], rel=0, abs=1e-15)


@pytest.mark.parametrize("agg", ["max", "mean"])
def test_padding_positives_are_not_support_views(agg):
    """``support_scores``: the cosines of each negative with the anchor's support views (its
    positives of weight > 0), aggregated; ``-inf`` where a column is not a negative."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    columns = torch.randn(5, 4, generator=g, dtype=torch.float64)
    positives = torch.randn(3, 3, 4, generator=g, dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.5, 2.0, 1.0]])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 4] = False
    contrast = build_contrast(
        a, columns, positives=positives, positive_weight=weight, negative_mask=mask, temperature=0.3
    )
    got = strategy_class("fnc")(agg=agg).support_scores(contrast)
    c, p = unit(columns), unit(positives)
    for i in range(3):
        support = [p[i, m] for m in range(3) if weight[i, m] > 0]
        for j in range(5):
            cosines = [float(s @ c[j]) for s in support]
            want = max(cosines) if agg == "max" else sum(cosines) / len(cosines)
            if not mask[i, j]:
                want = float("-inf")
            assert float(got[i, j]) == pytest.approx(want, rel=1e-12, abs=1e-15), (i, j)


def test_support_scores_of_in_batch_views_are_cosines():
    data = inputs("in_batch", seed=2, n=3, views=3)
    views = data["views"]
    contrast = in_batch_contrast(views, temperature=0.3)
    got = strategy_class("fnc")(agg="mean").support_scores(contrast)
    z = [unit(v) for v in views]
    n = 3
    for v in range(3):
        for i in range(n):
            for w in range(3):
                for j in range(n):
                    value = float(got[v * n + i, w * n + j])
                    if j == i:
                        assert value == float("-inf")
                        continue
                    cosines = [float(z[u][i] @ z[w][j]) for u in range(3) if u != v]
                    assert value == pytest.approx(sum(cosines) / 2, rel=1e-12)


@pytest.mark.parametrize(
    "hparams,kw,called",
    [
        ({}, {}, True),
        ({}, {"fast": False}, False),
        ({"threshold": 0.5}, {}, False),
        ({"top_k": 12}, {}, False),  # top_k = M = 12: the dense form keeps one negative
        ({}, {"objective": "jsd"}, False),
        ({"mode": "eliminate", "top_k": 3}, {}, True),
    ],
)
def test_the_fused_log_mass_is_taken_only_when_fast_for_exactly_top_k_dropped_columns(
    hparams, kw, called, monkeypatch
):
    calls = []
    real = fastpaths.kept_log_mass

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastpaths, "kept_log_mass", spy)
    data = inputs("pool", seed=1, pool=12)
    loss = hardneg.create_loss("fnc", temperature=T, **hparams, **kw)
    call(loss, "pool", data)
    assert len(calls) == int(called)
    if called:
        assert calls[0]["read"] is (loss.strategy.mode == "attract")
    calls.clear()
    call(loss, "pool", data, return_diagnostics=True)  # diagnostics: the dense form
    data = inputs("in_batch_ids", seed=1, n=6)
    call(loss, "in_batch_ids", data)  # per-anchor counts: the dense form
    assert calls == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mode="cancel"), "mode must be one of 'eliminate', 'attract', got 'cancel'"),
        (dict(agg="sum"), "agg must be one of 'max', 'mean', got 'sum'"),
        (dict(top_k=-1), "top_k must be in [0, inf), got -1"),
        (dict(top_k=1.5), "top_k must be an integer, got 1.5"),
        (dict(threshold="0.5"), "threshold must be a number, got '0.5' (str)"),
        (dict(threshold=float("inf")), "threshold must be finite, got inf"),
        (dict(top_k=0), "fnc needs top_k >= 1 or a threshold to find false negatives"),
    ],
)
def test_bad_hyper_parameters_are_refused_with_exact_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        hardneg.create_loss("fnc", **kwargs)
    assert str(info.value) == message


def test_top_k_zero_with_a_threshold_is_accepted_and_a_threshold_is_a_float():
    fnc = strategy_class("fnc")(top_k=0, threshold=1)
    assert fnc.top_k == 0 and fnc.threshold == 1.0 and isinstance(fnc.threshold, float)


@pytest.mark.parametrize("agg", ["max", "mean"])
def test_a_single_column_is_scored_by_every_support_view(agg):
    """One negative column and two support views: the score still aggregates both views."""
    g = torch.Generator().manual_seed(8)
    a = torch.randn(2, 4, generator=g, dtype=torch.float64)
    column = torch.randn(1, 4, generator=g, dtype=torch.float64)
    positives = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    contrast = build_contrast(a, column, positives=positives, temperature=0.3)
    got = strategy_class("fnc")(agg=agg).support_scores(contrast)
    c, p = unit(column)[0], unit(positives)
    for i in range(2):
        cosines = [float(p[i, 0] @ c), float(p[i, 1] @ c)]
        want = max(cosines) if agg == "max" else sum(cosines) / 2
        assert float(got[i, 0]) == pytest.approx(want, rel=1e-12)
