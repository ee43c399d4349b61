"""The Core v2 data model and objectives against loop-based float64 re-statements.

Each expectation is written from the definitions (methods.md; the module docstrings of
``hardneg.contrast`` and ``hardneg.objectives``), one anchor at a time, without the library's
vectorised code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hardneg
from hardneg.contrast import (
    build_contrast,
    in_batch_contrast,
    pool_contrast,
    retrieval_contrast,
)
from hardneg.objectives import infonce_objective, jsd_objective
from hardneg.strategies import Selection

TOL = dict(rtol=1e-5, atol=1e-6)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def unit(x):
    return F.normalize(x.double(), dim=-1)


def lse(values):
    values = [v for v in values if v != float("-inf")]
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


# ------------------------------------------------------------------------ contrast sets


def in_batch_reference(views, t, ids=None, mode="separate"):
    """SupCon-style loop: anchor (v, i), positives (v', i), negatives every other sample's views."""
    v, n = len(views), views[0].shape[0]
    z = [unit(x) for x in views]
    ids = list(range(n)) if ids is None else ids.tolist()
    losses = []
    for a_view in range(v):
        for i in range(n):
            anchor = z[a_view][i]
            pos = [float(anchor @ z[w][i]) / t for w in range(v) if w != a_view]
            neg = [
                float(anchor @ z[w][j]) / t for w in range(v) for j in range(n) if ids[j] != ids[i]
            ]
            log_r = lse(neg)
            if mode == "separate":
                terms = [lse([p, log_r]) - p for p in pos]
            else:
                terms = [lse(pos + [log_r]) - p for p in pos]
            losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("num_views", [2, 3])
@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_in_batch_infonce_with_several_views_equals_the_loop_definition(num_views, mode):
    views = [randn(5, 4, seed=s) for s in range(num_views)]
    loss = hardneg.create_loss("infonce", temperature=0.4, positive_mode=mode)
    got = loss(views[0], views[1], extra_views=views[2:])
    assert got.item() == pytest.approx(in_batch_reference(views, 0.4, mode=mode), rel=1e-5)


def test_two_views_is_nt_xent_whatever_the_positive_mode():
    z1, z2 = randn(6, 4, seed=1), randn(6, 4, seed=2)
    a = hardneg.create_loss("infonce", positive_mode="separate")(z1, z2)
    b = hardneg.create_loss("infonce", positive_mode="joint")(z1, z2)
    assert a.item() == pytest.approx(in_batch_reference([z1, z2], 0.5), rel=1e-6)
    assert a.item() == pytest.approx(b.item(), rel=1e-7)


def test_duplicate_ids_are_neither_positives_nor_negatives():
    z1, z2 = randn(6, 4, seed=3), randn(6, 4, seed=4)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    got = hardneg.create_loss("infonce", temperature=0.3)(z1, z2, ids=ids)
    assert got.item() == pytest.approx(in_batch_reference([z1, z2], 0.3, ids=ids), rel=1e-5)
    contrast = in_batch_contrast([z1, z2], temperature=0.3, ids=ids)
    # sample 1 and 2 are duplicates: M = 12 - 2 (own) - 2 (duplicate's views)
    assert contrast.num_negatives.tolist() == [10, 8, 8, 10, 8, 8] * 2


def test_in_batch_positive_index_and_mask_follow_the_view_layout():
    z = [randn(3, 2, seed=s) for s in range(3)]
    c = in_batch_contrast(z, temperature=1.0)
    assert c.positive_index.tolist()[0] == [3, 6]
    assert c.positive_index.tolist()[4] == [1, 7]  # anchor (view 1, sample 1)
    for row in range(9):
        expected = [j % 3 != row % 3 for j in range(9)]
        assert c.negative_mask[row].tolist() == expected
    assert c.num_negatives == 6


def test_pool_contrast_masks_only_the_excluded_entry():
    q, k, pool = randn(4, 3, seed=5), randn(4, 3, seed=6), randn(10, 3, seed=7)
    own = torch.tensor([2, 0, 9, 2])
    c = pool_contrast(q, k, pool, temperature=0.2, exclude_index=own)
    assert c.num_negatives == 9
    for i in range(4):
        row = c.negative_logits[i]
        assert torch.isinf(row).nonzero().flatten().tolist() == [own[i].item()]
        j = (own[i].item() + 1) % 10
        assert row[j].item() == pytest.approx(float(unit(q)[i] @ unit(pool)[j]) / 0.2, rel=1e-5)


def test_retrieval_layout_is_cross_entropy_over_every_positive_and_hard_negative():
    b, h, d, t = 4, 2, 5, 0.05
    a, p, n = randn(b, d, seed=8), randn(b, d, seed=9), randn(b, h, d, seed=10)
    got = hardneg.create_loss("infonce", temperature=t)(a, p, hard_negatives=n)
    candidates = unit(torch.cat([p, n.reshape(-1, d)]))
    logits = unit(a) @ candidates.T / t
    expected = F.cross_entropy(logits, torch.arange(b))  # MNRL's formulation
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_retrieval_candidate_ids_mask_duplicates_of_the_positive():
    b, d = 3, 4
    a, p, n = randn(b, d, seed=11), randn(b, d, seed=12), randn(b, 1, d, seed=13)
    ids = torch.tensor([0, 1, 2])
    candidate_ids = torch.tensor([0, 1, 2, 1, 5, 6])  # anchor 0's hard negative repeats text 1
    c = retrieval_contrast(a, p, n, temperature=0.1, ids=ids, candidate_ids=candidate_ids)
    assert c.negative_mask[1].tolist() == [True, False, True, False, True, True]
    assert c.num_negatives.tolist() == [5, 4, 5]


def test_float64_inputs_compute_in_float64_and_half_inputs_in_float32():
    z1, z2 = randn(4, 3, seed=14, dtype=torch.float64), randn(4, 3, seed=15, dtype=torch.float64)
    for name in hardneg.list_losses():
        loss = hardneg.create_loss(name)
        assert loss(z1, z2).dtype == torch.float64, name
        assert loss(z1.half(), z2.half()).dtype == torch.float32, name


# ------------------------------------------------------------------------------ objectives


def pos_neg_contrast(pos, neg, t=1.0, anchor_labels=None, column_labels=None):
    """A contrast set with given positive logits [A, P] and negative logits [A, S] (t = 1),
    optionally labelled."""
    from hardneg.contrast import ContrastSet

    a = pos.shape[0]
    return ContrastSet(
        anchors=torch.zeros(a, 1, dtype=pos.dtype),
        columns=torch.zeros(neg.shape[1], 1, dtype=pos.dtype),
        anchor_columns=None,
        positives=torch.zeros(a, pos.shape[1], 1, dtype=pos.dtype),
        positive_logits=pos,
        positive_weight=torch.ones_like(pos),
        positive_index=None,
        negative_logits=neg,
        negative_mask=torch.isfinite(neg),
        num_negatives=torch.isfinite(neg).sum(dim=1),
        temperature=t,
        anchor_labels=anchor_labels,
        column_labels=column_labels,
    )


def test_debiased_objective_with_weights_and_extras_equals_the_formula():
    g = torch.Generator().manual_seed(16)
    pos = torch.randn(3, 2, generator=g, dtype=torch.float64)
    neg = torch.randn(3, 6, generator=g, dtype=torch.float64)
    neg[0, 1] = float("-inf")
    log_w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    extra_neg = torch.randn(3, 2, generator=g, dtype=torch.float64)
    extra_pos = torch.randn(3, 1, generator=g, dtype=torch.float64)
    extra_w = torch.tensor([[0.5], [0.0], [2.0]], dtype=torch.float64)
    tau, t = 0.2, 0.5
    contrast = pos_neg_contrast(pos, neg, t)
    sel = Selection(
        negative_log_weights=log_w,
        extra_negative_logits=extra_neg,
        extra_positive_logits=extra_pos,
        extra_positive_weight=extra_w,
    )
    got = infonce_objective(contrast, sel, tau_plus=tau)
    for i in range(3):
        r = sum(
            math.exp(log_w[i, j] + neg[i, j]) for j in range(6) if neg[i, j] != float("-inf")
        ) + sum(math.exp(x) for x in extra_neg[i].tolist())
        m = int(torch.isfinite(neg[i]).sum()) + 2
        positives = pos[i].tolist() + extra_pos[i].tolist()
        weights = [1.0, 1.0, float(extra_w[i, 0])]
        terms = []
        for a in positives:
            ng = max((r - tau * m * math.exp(a)) / (1 - tau), m * math.exp(-1 / t))
            terms.append(math.log(math.exp(a) + ng) - a)
        expected = sum(w * x for w, x in zip(weights, terms)) / sum(weights)
        assert got[i].item() == pytest.approx(expected, rel=1e-9)


def test_joint_positives_with_sum_reduction_is_the_psm_form():
    g = torch.Generator().manual_seed(17)
    pos = torch.randn(2, 3, generator=g, dtype=torch.float64)
    neg = torch.randn(2, 4, generator=g, dtype=torch.float64)
    w = torch.tensor([[1.0, 0.5, 0.25], [1.0, 1.0, 0.0]], dtype=torch.float64)
    contrast = pos_neg_contrast(pos, neg)
    got = infonce_objective(
        contrast, Selection(positive_weight=w), positive_mode="joint", positive_reduction="sum"
    )
    for i in range(2):
        present = [pos[i, p].item() for p in range(3) if w[i, p] > 0]
        log_d = lse(present + neg[i].tolist())
        expected = sum(w[i, p].item() * (log_d - pos[i, p].item()) for p in range(3) if w[i, p] > 0)
        assert got[i].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_jensen_shannon_objective_equals_the_fenchel_dual_formula(tau):
    g = torch.Generator().manual_seed(18)
    pos = torch.randn(4, 1, generator=g, dtype=torch.float64) * 3
    neg = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
    neg[1, 0] = float("-inf")  # not a negative of anchor 1
    log_w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    contrast = pos_neg_contrast(pos, neg)
    got = jsd_objective(contrast, Selection(negative_log_weights=log_w), tau_plus=tau)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    for i in range(4):
        cols = [j for j in range(5) if neg[i, j] != float("-inf")]
        total = sum(math.exp(log_w[i, j]) for j in cols)
        e_neg = sum(math.exp(log_w[i, j]) * sp(neg[i, j].item()) for j in cols) / total
        e_neg = e_neg / (1 - tau) - math.log(2)
        a = pos[i, 0].item()
        e_pos = math.log(2) - sp(-a) - tau / (1 - tau) * sp(a)
        assert got[i].item() == pytest.approx(e_neg - e_pos, rel=1e-9)


def test_jsd_loss_with_uniform_negatives_is_infographs_estimator():
    z1, z2 = randn(5, 3, seed=19), randn(5, 3, seed=20)
    loss = hardneg.create_loss("infonce", objective="jsd", temperature=1.0, normalize=False)
    z = torch.cat([z1, z2]).double()
    scores = z @ z.T
    n2 = 10
    e_pos = e_neg = 0.0
    for i in range(n2):
        p = (i + 5) % n2
        e_pos += math.log(2) - F.softplus(-scores[i, p]).item()
        negs = [j for j in range(n2) if j not in (i, p)]
        e_neg += sum(F.softplus(scores[i, j]).item() - math.log(2) for j in negs) / len(negs)
    assert loss(z1, z2).item() == pytest.approx((e_neg - e_pos) / n2, rel=1e-5)


def test_build_contrast_with_explicit_positives_and_per_anchor_columns():
    a, c = randn(3, 4, seed=21), randn(5, 4, seed=22)
    p, own = randn(3, 2, 4, seed=23), randn(3, 2, 4, seed=24)
    contrast = build_contrast(a, c, temperature=0.5, positives=p, anchor_columns=own)
    assert contrast.negative_logits.shape == (3, 7)
    assert contrast.num_negatives == 7
    expected_own = torch.einsum("ad,ahd->ah", unit(a), unit(own)) / 0.5
    torch.testing.assert_close(contrast.negative_logits[:, 5:].double(), expected_own, **TOL)
    expected_pos = torch.einsum("ad,apd->ap", unit(a), unit(p)) / 0.5
    torch.testing.assert_close(contrast.positive_logits.double(), expected_pos, **TOL)


# ----------------------------------------------------------------------- registry contract


@pytest.mark.parametrize("name", hardneg.list_losses())
def test_every_hyper_parameter_is_written_once_and_read_back(name):
    from hardneg.registry import strategy_class

    cls = strategy_class(name)
    defaults = cls.hparam_defaults()
    strategy = cls()
    assert strategy.hparams() == defaults  # hparams() reads the attributes named as in __init__
    assert set(hardneg.loss_hparams(name)) >= set(defaults)


def test_an_unknown_setting_names_the_closest_one():
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        hardneg.create_loss("hcl", temprature=0.1)
    with pytest.raises(ValueError, match="ring selects negatives"):
        hardneg.create_loss("ring", tau_plus=0.1)


def test_describe_loss_lists_every_hyper_parameter_with_its_meaning():
    for name in hardneg.list_losses():
        text = hardneg.describe_loss(name)
        for key, default in hardneg.loss_hparams(name).items():
            line = next(x for x in text.splitlines() if x.strip().startswith(f"{key}="))
            assert repr(default) in line
            assert len(line.split(": ", 1)) == 2 and line.split(": ", 1)[1].strip(), line


def test_label_free_diagnostics_count_what_they_name():
    # one anchor pair with hand-made cosines: positive 0.5; negatives 0.9, 0.48, 0.2, -0.3
    from hardneg.diagnostics import negative_diagnostics
    from hardneg.strategies.base import Selection

    t = 0.5
    pos = torch.tensor([[0.5]]) / t
    neg = torch.tensor([[0.995, 0.48, 0.2, -0.3]]) / t
    contrast = pos_neg_contrast(pos, neg, t)
    d = negative_diagnostics(contrast, Selection(), margin=0.05, duplicate_threshold=0.99)
    assert d.positive_rank.tolist() == [1]
    assert d.near_duplicate_rate.item() == pytest.approx(0.25)
    assert d.margin_removal_share.item() == pytest.approx(0.5)  # 0.995 and 0.48 >= 0.45
    w = torch.softmax(neg[0], 0)
    assert d.mass_above_positive.item() == pytest.approx(w[0].item(), rel=1e-6)
    summary = d.summary()
    for key in (
        "mass_above_positive",
        "positive_rank",
        "near_duplicate_rate",
        "margin_removal_share",
    ):
        assert key in summary


def test_an_anchor_with_every_negative_dropped_contributes_zero_loss_and_no_nan_gradient():
    pos = torch.tensor([[0.3], [0.2]], dtype=torch.float64, requires_grad=True)
    neg = torch.tensor([[0.1, -0.4], [0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    log_w = torch.tensor([[0.0, 0.0], [float("-inf"), float("-inf")]], dtype=torch.float64)
    contrast = pos_neg_contrast(pos, neg)
    per_anchor = infonce_objective(contrast, Selection(negative_log_weights=log_w))
    assert per_anchor[1].item() == 0.0
    per_anchor.sum().backward()
    assert torch.isfinite(neg.grad).all() and torch.isfinite(pos.grad).all()
    assert neg.grad[1].abs().sum().item() == 0.0


def test_help_of_create_loss_and_of_each_strategy_is_generated_from_the_registry():
    from hardneg.registry import register_strategy, strategy_class, unregister_strategy
    from hardneg.strategies import Strategy

    doc = hardneg.create_loss.__doc__
    for name in hardneg.list_losses():
        assert f"\n{name}: " in doc
        cls_doc = strategy_class(name).__doc__
        for key, default in hardneg.loss_hparams(name).items():
            assert f"{key}={default!r}" in doc and f"{key}={default!r}" in cls_doc

    @register_strategy("doc_probe")
    class DocProbe(Strategy):
        """A probe.

        Args:
            gamma: the probe's only knob.
        """

        def __init__(self, *, gamma: float = 3.0) -> None:
            super().__init__()
            self.gamma = gamma

    try:
        assert "gamma=3.0: the probe's only knob." in hardneg.create_loss.__doc__
    finally:
        unregister_strategy("doc_probe")
        hardneg.registry.refresh_docs()
    assert "doc_probe" not in hardneg.create_loss.__doc__
