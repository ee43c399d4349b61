"""Positive-aware filtering (``positive_aware``) through the public API against float64 loops of
its rule: negative ``j`` of anchor ``i`` is kept when ``s_ij <= s+_i - margin``, the limit raised
to the anchor's least similar negative. Written for mutation testing (docs/testing.md)."""

from __future__ import annotations

import math

import pytest
import torch
from _float64_loops import cos, lse, z

import hardneg
from hardneg.contrast import in_batch_contrast, pool_contrast
from hardneg.strategies.base import StepContext
from hardneg.strategies.positive_aware import PositiveAwareFilter


def test_an_anchor_whose_every_negative_breaks_the_rule_keeps_its_least_similar_one():
    q, k, t = z(4, seed=1), z(4, seed=2), 0.5
    views = torch.cat([q, k])
    expected = []
    for i in range(8):
        pos = (i + 4) % 8
        a = cos(views[i], views[pos]) / t
        least = min(cos(views[i], views[j]) for j in range(8) if j not in (i, pos))
        expected.append(lse([a, least / t]) - a)
    loss = hardneg.create_loss("positive_aware", mode="margin", margin=10.0, temperature=t)
    assert loss(q, k).item() == pytest.approx(sum(expected) / 8, rel=1e-10)
    dense = loss(q, k, return_diagnostics=True).per_anchor
    assert dense.tolist() == pytest.approx(expected, rel=1e-10)
    options = dict(mode="margin", margin=10.0)  # as a filter in front of InfoNCE
    filtered = hardneg.create_loss(
        "infonce", temperature=t, filter="positive_aware", filter_options=options
    )
    assert filtered(q, k).item() == pytest.approx(sum(expected) / 8, rel=1e-10)


def test_with_three_views_the_rule_reads_the_first_positive():
    views = [z(3, seed=s) for s in (3, 4, 5)]
    t, margin = 0.5, 0.05
    rows = torch.cat(views)
    expected = []
    for v in range(3):
        for i in range(3):
            anchor = views[v][i]
            others = [w for w in range(3) if w != v]
            positives = [cos(anchor, views[w][i]) for w in others]
            negs = [cos(anchor, rows[c]) for c in range(9) if c % 3 != i]
            limit = max(positives[0] - margin, min(negs))
            kept = [s / t for s in negs if s <= limit]
            per = [lse([p / t] + kept) - p / t for p in positives]
            expected.append(sum(per) / 2)
    loss = hardneg.create_loss("positive_aware", mode="margin", margin=margin, temperature=t)
    out = loss(views[0], views[1], extra_views=[views[2]], return_diagnostics=True)
    assert out.per_anchor.tolist() == pytest.approx(expected, rel=1e-10)


def test_one_negative_each_is_enough_for_the_log_mass():
    q, k, pool, t = z(3, seed=6), z(3, seed=7), z(1, seed=8), 0.5
    contrast = pool_contrast(q, k, pool, temperature=t)
    selection = PositiveAwareFilter().select(contrast, StepContext(want_log_mass=True))
    assert selection.negative_log_weights is None
    expected = [cos(q[i], pool[0]) / t for i in range(3)]  # the only negative always stays
    assert selection.negative_log_mass.tolist() == pytest.approx(expected, rel=1e-10)


def test_duplicate_ids_are_filtered_per_anchor():
    q, k, t, margin = z(4, seed=9), z(4, seed=10), 0.5, 0.2
    ids = torch.tensor([0, 1, 0, 2])
    views = torch.cat([q, k])
    expected = []
    for i in range(8):
        pos = (i + 4) % 8
        s_pos = cos(views[i], views[pos])
        negs = [cos(views[i], views[j]) for j in range(8) if ids[j % 4] != ids[i % 4]]
        limit = max(s_pos - margin, min(negs))
        expected.append(lse([s_pos / t] + [s / t for s in negs if s <= limit]) - s_pos / t)
    loss = hardneg.create_loss("positive_aware", mode="margin", margin=margin, temperature=t)
    assert loss(q, k, ids=ids).item() == pytest.approx(sum(expected) / 8, rel=1e-10)
    options = dict(mode="margin", margin=margin)
    filtered = hardneg.create_loss(
        "infonce", temperature=t, filter="positive_aware", filter_options=options
    )
    assert filtered(q, k, ids=ids).item() == pytest.approx(sum(expected) / 8, rel=1e-10)


def test_as_a_filter_on_a_pool_without_a_mask_the_rule_drops_the_pools_close_negatives():
    q, k, pool, t, margin = z(3, seed=16), z(3, seed=17), z(6, seed=18), 0.5, 0.1
    expected = []
    for i in range(3):
        s_pos = cos(q[i], k[i])
        negs = [cos(q[i], pool[j]) for j in range(6)]  # 2, 4 and 5 of 6 kept
        limit = max(s_pos - margin, min(negs))
        expected.append(lse([s_pos / t] + [s / t for s in negs if s <= limit]) - s_pos / t)
    options = dict(mode="margin", margin=margin)
    filtered = hardneg.create_loss(
        "infonce", temperature=t, filter="positive_aware", filter_options=options
    )
    out = filtered(q, k, negatives=pool, return_diagnostics=True)
    assert out.per_anchor.tolist() == pytest.approx(expected, rel=1e-10)


def test_keep_marks_only_negatives_that_pass_the_rule():
    q, k, t, margin = z(3, seed=14), z(3, seed=15), 0.5, 0.2
    contrast = in_batch_contrast([q, k], temperature=t)
    keep = PositiveAwareFilter(mode="margin", margin=margin).keep(contrast, StepContext())
    views = torch.cat([q, k])
    expected = []
    for i in range(6):
        pos = (i + 3) % 6
        s_pos = cos(views[i], views[pos])
        negs = {j: cos(views[i], views[j]) for j in range(6) if j not in (i, pos)}
        limit = max(s_pos - margin, min(negs.values()))
        expected.append([j in negs and negs[j] <= limit for j in range(6)])
    assert keep.tolist() == expected  # the anchor itself and its positive are not negatives


@pytest.mark.parametrize("fast", [True, False])
def test_the_log_mass_and_the_jsd_objective_sum_over_the_negatives_the_rule_keeps(fast):
    q, k, t, margin = z(4, seed=36), z(4, seed=37), 0.5, 0.05  # 1 to 5 of 6 kept
    views = torch.cat([q, k])
    infonce, jsd = [], []
    for i in range(8):
        pos = (i + 4) % 8
        a = cos(views[i], views[pos]) / t
        negs = [cos(views[i], views[j]) for j in range(8) if j not in (i, pos)]
        limit = max(a * t - margin, min(negs))
        kept = [s / t for s in negs if s <= limit]
        infonce.append(lse([a] + kept) - a)
        softplus = [math.log1p(math.exp(c)) for c in kept]  # JSD: E_neg sp(c) - log 2 - E_pos
        jsd.append(
            sum(softplus) / len(kept) - math.log(2) - (math.log(2) - math.log1p(math.exp(-a)))
        )
    options = dict(mode="margin", margin=margin, temperature=t, fast=fast)
    loss = hardneg.create_loss("positive_aware", **options)
    assert loss(q, k).item() == pytest.approx(sum(infonce) / 8, rel=1e-10)
    loss = hardneg.create_loss("positive_aware", objective="jsd", **options)
    assert loss(q, k).item() == pytest.approx(sum(jsd) / 8, rel=1e-10)
