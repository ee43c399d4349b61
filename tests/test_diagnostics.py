"""``hardneg.diagnostics.negative_diagnostics`` against its definitions restated per anchor in
float64 loops (one column at a time, no tensor ops): the strategy's weights over the kept
negatives (synthetic ones with weight 1), their share of the negative mass, Kish's effective
number, the label-free facts relative to the first positive and the label facts (same-class
mass, top-k precision), on hand-made logits whose cosines are exact in binary (``t = 0.5``) so
that the ties the definitions decide (``>`` the positive, ``>=`` the thresholds) are exact."""

from __future__ import annotations

import math

import pytest
import torch
from test_core import pos_neg_contrast

from hardneg.contrast import ContrastSet
from hardneg.diagnostics import negative_diagnostics
from hardneg.strategies.base import Selection

T = 0.5
INF = float("inf")

# cosines of the positive and of the 4 shared columns; -inf = not a negative of that anchor
POSITIVE = [0.5, 0.25, 0.5]
COSINES = [
    [0.75, 0.5, 0.25, -0.5],  # a negative tied with the positive (not above it)
    [0.75, -INF, 0.5, 0.0],  # column 1 masked; column 0 dropped by the weights below
    [-INF, -INF, 0.25, -INF],  # a single negative left, at the margin (counted alone)
]
LOG_W = [
    [0.0, math.log(2.0), 0.0, math.log(0.5)],
    [-INF, 0.0, math.log(3.0), 0.0],
    [0.0, 0.0, 0.0, 0.0],
]
EXTRA = [[0.875], [0.0], [0.25]]  # cosines of one synthetic negative per anchor (MoCHi's mixes)
ANCHOR_LABELS = [0, 1, 2]
COLUMN_LABELS = [0, 1, 1, 2]


def contrast_of(positive, cosines, anchor_labels=None, column_labels=None) -> ContrastSet:
    pos = torch.tensor(positive, dtype=torch.float64).unsqueeze(1) / T
    neg = torch.tensor(cosines, dtype=torch.float64) / T
    labels = (None if x is None else torch.tensor(x) for x in (anchor_labels, column_labels))
    return pos_neg_contrast(pos, neg, T, *labels)


def expected_of(positive, cosines, log_w, extra, *, labels, top_k, margin, threshold):
    """Every field of the diagnostics, per anchor, from the definitions."""
    out: dict[str, list] = {}
    for i, pos_cos in enumerate(positive):
        logits = [c / T for c in cosines[i]]
        weights = list(log_w[i])
        if extra is not None:
            logits += [c / T for c in extra[i]]
            weights += [0.0] * len(extra[i])
        cols = len(logits)
        kept = [math.isfinite(logits[j]) and math.isfinite(weights[j]) for j in range(cols)]
        w = [math.exp(weights[j]) if kept[j] else 0.0 for j in range(cols)]
        g = [math.exp(weights[j] + logits[j]) if kept[j] else 0.0 for j in range(cols)]
        sampling = [x / sum(w) for x in w]
        gradient = [x / sum(g) for x in g]
        sims = [logits[j] * T if kept[j] else -INF for j in range(cols)]
        n_kept = sum(kept)
        above = [kept[j] and logits[j] > pos_cos / T for j in range(cols)]
        row = {
            "sampling_weights": sampling,
            "gradient_weights": gradient,
            "effective_negatives": 1.0 / sum(x * x for x in sampling),
            "kept_negatives": n_kept,
            "similarities": sims,
            "mass_above_positive": sum(gradient[j] for j in range(cols) if above[j]),
            "positive_rank": sum(above),
            "near_duplicate_rate": sum(kept[j] and sims[j] >= threshold for j in range(cols))
            / max(n_kept, 1),
            "margin_removal_share": sum(
                kept[j] and sims[j] >= pos_cos - margin for j in range(cols)
            )
            / max(n_kept, 1),
        }
        if labels:
            # synthetic columns have no label: another class
            same = [
                kept[j] and j < len(COLUMN_LABELS) and COLUMN_LABELS[j] == ANCHOR_LABELS[i]
                for j in range(cols)
            ]
            row["false_negative_mass"] = sum(sampling[j] for j in range(cols) if same[j])
            row["false_negative_gradient_mass"] = sum(gradient[j] for j in range(cols) if same[j])
            top = sorted(range(cols), key=lambda j: -gradient[j])[: min(top_k, cols)]
            top_kept = [j for j in top if kept[j]]
            true_neg = [j for j in top_kept if not same[j]]
            row["top_k_precision"] = len(true_neg) / max(len(top_kept), 1)
        for key, value in row.items():
            out.setdefault(key, []).append(value)
    return out


def assert_fields(diag, want):
    for key, value in want.items():
        got = getattr(diag, key)
        assert got is not None, key
        expected = torch.tensor(value, dtype=torch.float64)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no_labels"])
@pytest.mark.parametrize("extra", [None, EXTRA], ids=["columns", "with_synthetic"])
def test_every_field_equals_its_definition(extra, labels):
    contrast = contrast_of(
        POSITIVE,
        COSINES,
        ANCHOR_LABELS if labels else None,
        COLUMN_LABELS if labels else None,
    )
    selection = Selection(
        negative_log_weights=torch.tensor(LOG_W, dtype=torch.float64),
        extra_negative_logits=None
        if extra is None
        else torch.tensor(extra, dtype=torch.float64) / T,
        extras={"ring_lower": 3.0},
    )
    diag = negative_diagnostics(contrast, selection, top_k=2, margin=0.25, duplicate_threshold=0.75)
    want = expected_of(
        POSITIVE,
        COSINES,
        LOG_W,
        extra,
        labels=labels,
        top_k=2,
        margin=0.25,
        threshold=0.75,
    )
    assert_fields(diag, want)
    if not labels:
        assert diag.false_negative_mass is None and diag.top_k_precision is None
    # the summary: batch means, the similarity weighted by the sampling weights over every
    # kept negative of the batch, and the strategy's scalar extras
    mean = {
        key: sum(map(float, value)) / len(value)
        for key, value in want.items()
        if not isinstance(value[0], list)  # the per-anchor scalars
    }
    weighted = [
        (s, w)
        for sims, ws in zip(want["similarities"], want["sampling_weights"])
        for s, w in zip(sims, ws)
        if math.isfinite(s)
    ]
    expected_summary = {
        "mean_negative_similarity": sum(s * w for s, w in weighted) / sum(w for _, w in weighted),
        "ring_lower": 3.0,
    }
    for key in (
        "effective_negatives",
        "kept_negatives",
        "false_negative_mass",
        "false_negative_gradient_mass",
        "top_k_precision",
        "mass_above_positive",
        "positive_rank",
        "near_duplicate_rate",
        "margin_removal_share",
    ):
        if key in mean:
            expected_summary[key] = mean[key]
    summary = diag.summary()
    assert sorted(summary) == sorted(expected_summary)
    for key, value in expected_summary.items():
        assert summary[key] == pytest.approx(value, rel=1e-6), key


def test_the_defaults_are_a_margin_of_0_05_and_a_duplicate_threshold_of_0_99():
    # one anchor, positive 0.5: 0.995 is a near duplicate; 0.47 is within 0.05 of the
    # positive, 0.0 is not
    contrast = contrast_of([0.5], [[0.995, 0.0, 0.47]])
    diag = negative_diagnostics(contrast, Selection())
    want = expected_of(
        [0.5],
        [[0.995, 0.0, 0.47]],
        [[0.0, 0.0, 0.0]],
        None,
        labels=False,
        top_k=10,
        margin=0.05,
        threshold=0.99,
    )
    assert_fields(diag, want)
    assert diag.near_duplicate_rate.tolist() == pytest.approx([1 / 3])
    assert diag.margin_removal_share.tolist() == pytest.approx([2 / 3])


def test_labels_of_the_anchors_alone_give_no_label_facts():
    """Class facts need both sides; anchor labels without column labels are ignored."""
    contrast = contrast_of(POSITIVE, COSINES)
    diag = negative_diagnostics(contrast, Selection(), anchor_labels=torch.tensor(ANCHOR_LABELS))
    assert diag.false_negative_mass is None
    assert diag.false_negative_gradient_mass is None
    assert diag.top_k_precision is None
    assert "false_negative_mass" not in diag.summary()


def test_facts_are_relative_to_the_first_positive_and_labels_may_be_per_anchor():
    """Two positives per anchor (the first decides the rank) and ``[A, S]`` column labels (each
    anchor's own columns): hand-made cosines, uniform weights, the facts written out."""
    positive = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64) / T
    cosines = [[0.75, 0.25, 0.5], [0.25, -0.25, 0.5]]
    contrast = pos_neg_contrast(
        positive,
        torch.tensor(cosines, dtype=torch.float64) / T,
        T,
        torch.tensor([3, 4]),
        torch.tensor([[3, 4, 3], [3, 4, 4]]),  # same class: columns 0, 2 of anchor 0; 1, 2 of 1
    )
    diag = negative_diagnostics(contrast, Selection())
    # uniform weights: the gradient weights are the softmax of the logits cos / T
    gradient = [[math.exp(c / T) for c in row] for row in cosines]
    gradient = [[g / sum(row) for g in row] for row in gradient]
    # above the first positive: 0.75 for anchor 0 (0.5 ties it), 0.25 and 0.5 for anchor 1
    # (against the second positive the ranks would be 3 and 0)
    assert diag.positive_rank.tolist() == [1, 2]
    torch.testing.assert_close(
        diag.mass_above_positive.double(),
        torch.tensor([gradient[0][0], gradient[1][0] + gradient[1][2]], dtype=torch.float64),
    )
    torch.testing.assert_close(
        diag.false_negative_mass.double(), torch.tensor([2 / 3, 2 / 3], dtype=torch.float64)
    )
    torch.testing.assert_close(
        diag.false_negative_gradient_mass.double(),
        torch.tensor(
            [gradient[0][0] + gradient[0][2], gradient[1][1] + gradient[1][2]], dtype=torch.float64
        ),
    )
    # the top 10 are all 3 columns of each anchor: one true negative of three
    torch.testing.assert_close(
        diag.top_k_precision.double(), torch.tensor([1 / 3, 1 / 3], dtype=torch.float64)
    )
