"""Hardness weighting (``hardness``) against a float64 loop of its definition,
``c'_ij = c_ij + alpha * sg(s_ij)`` on the negatives its ``mode`` names, on both the log-mass
path (InfoNCE, fast and plain) and the dense-weight path (diagnostics, duplicate ids). Written
for mutation testing (docs/testing.md)."""

from __future__ import annotations

import pytest
import torch
from _float64_loops import cos, lse, z

import hardneg
from hardneg.contrast import pool_contrast
from hardneg.strategies.base import StepContext
from hardneg.strategies.hardness import HardnessWeighting


@pytest.mark.parametrize("mode", ["all_negatives", "in_batch_negatives", "hard_negatives"])
def test_each_mode_raises_the_logits_of_its_negatives_on_both_paths(mode):
    n, h, t, alpha = 3, 2, 0.5, 2.0
    a, p = z(n, seed=1), z(n, seed=2)
    hard = torch.randn(n, h, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = []
    for i in range(n):
        columns = [(p[j], j == i) for j in range(n)]  # (embedding, of the anchor's own tuple)
        columns += [(hard[j, m], j == i) for j in range(n) for m in range(h)]
        terms = [cos(a[i], p[i]) / t]
        for j, (c, own) in enumerate(columns):
            if j == i:
                continue  # the positive
            s = cos(a[i], c)
            raised = {"all_negatives": True, "in_batch_negatives": not own, "hard_negatives": own}
            terms.append(s / t + (alpha * s if raised[mode] else 0.0))
        expected.append(lse(terms) - terms[0])
    loss = hardneg.create_loss("hardness", alpha=alpha, mode=mode, temperature=t)
    dense = loss(a, p, hard_negatives=hard, return_diagnostics=True).per_anchor
    assert dense.tolist() == pytest.approx(expected, rel=1e-10)
    assert loss(a, p, hard_negatives=hard).item() == pytest.approx(sum(expected) / n, rel=1e-10)
    # the log-mass path without the fast path (a plain log-sum-exp of the raised logits)
    loss.fast = False
    assert loss(a, p, hard_negatives=hard).item() == pytest.approx(sum(expected) / n, rel=1e-10)


def test_duplicate_ids_give_each_anchor_its_own_count_of_raised_negatives():
    q, k, t, alpha = z(4, seed=4), z(4, seed=5), 0.5, 1.5
    ids = torch.tensor([0, 1, 0, 2])  # samples 0 and 2 are duplicates
    views = torch.cat([q, k])
    expected = []
    for i in range(8):
        pos = (i + 4) % 8
        terms = [cos(views[i], views[pos]) / t]
        for j in range(8):
            if j not in (i, pos) and ids[j % 4] != ids[i % 4]:
                s = cos(views[i], views[j])
                terms.append(s / t + alpha * s)
        expected.append(lse(terms) - terms[0])
    loss = hardneg.create_loss("hardness", alpha=alpha, temperature=t)
    assert loss(q, k, ids=ids).item() == pytest.approx(sum(expected) / 8, rel=1e-10)


def test_one_negative_each_is_enough_for_the_log_mass():
    q, k, pool, t, alpha = z(3, seed=6), z(3, seed=7), z(1, seed=8), 0.5, 2.0
    contrast = pool_contrast(q, k, pool, temperature=t)
    selection = HardnessWeighting(alpha=alpha).select(contrast, StepContext(want_log_mass=True))
    assert selection.negative_log_weights is None
    expected = [cos(q[i], pool[0]) * (1 / t + alpha) for i in range(3)]
    assert selection.negative_log_mass.tolist() == pytest.approx(expected, rel=1e-10)
