"""``ContrastiveLoss`` itself: what it refuses (exact messages), what it reports, and that each
call form builds the contrast set its docstring describes.

The values are checked against the float64 loops of ``tests/test_core.py``'s definitions,
restated here for the call forms the other files do not reach (a per-anchor pool, the retrieval
layout with ids, features and labels). Written for mutation testing (docs/testing.md).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import hardneg
from hardneg.losses.contrastive import ContrastInputs, ContrastiveLoss
from hardneg.registry import register_strategy, unregister_strategy
from hardneg.strategies.base import Selection, StepContext, Strategy
from hardneg.strategies.ring import RingNegatives
from hardneg.strategies.uniform import UniformNegatives


def z(n=4, d=3, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def exactly(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


def lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def cos(x, y):
    return float(F.normalize(x, dim=-1) @ F.normalize(y, dim=-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(check_inputs=1), "check_inputs must be True or False, got 1"),
        (dict(fast="no"), "fast must be True or False, got 'no'"),
        (dict(normalize=None), "normalize must be True or False, got None"),
        (dict(filter_options={"a": 1}), "filter_options needs a filter (filter='positive_aware', ...)"),
        (dict(objective="nce"), "objective must be one of 'infonce', 'jsd', got 'nce'"),
        (dict(positive_mode="both"), "positive_mode must be one of 'separate', 'joint', 'pooled', got 'both'"),
        # the Jensen-Shannon objective has no partition: 'joint' / 'pooled' were ignored
        (dict(objective="jsd", positive_mode="pooled"), "objective='jsd' averages the positives' terms and has no partition for them to share: positive_mode must be 'separate' (the default), got 'pooled'"),
        (dict(objective="jsd", positive_mode="joint"), "objective='jsd' averages the positives' terms and has no partition for them to share: positive_mode must be 'separate' (the default), got 'joint'"),
    ],
)  # fmt: skip
def test_the_constructor_refuses_bad_settings_with_exact_messages(kwargs, message):
    with exactly(message):
        ContrastiveLoss(UniformNegatives(), **kwargs)


def test_the_constructor_refuses_a_non_strategy_and_tau_plus_for_selecting_strategies():
    with exactly("strategy must be a hardneg Strategy instance, got str"):
        ContrastiveLoss("infonce")
    with exactly(
        "tau_plus must be 0 for the RingNegatives strategy (it selects negatives and has no "
        "debiased estimator), got 0.1"
    ):
        ContrastiveLoss(RingNegatives(), tau_plus=0.1)
    with exactly(
        "filter must name a filter strategy (one that only drops negatives), got 'hcl'; "
        "allowed: positive_aware, fnc"
    ):
        hardneg.create_loss("infonce", filter="hcl")
    with exactly(
        "a filter cannot stand in front of PotentialMining: it builds several contrast "
        "terms of its own"
    ):
        hardneg.create_loss("potential", filter="positive_aware")


def test_the_loss_reports_its_settings_and_its_strategys():
    loss = hardneg.create_loss("hcl", beta=0.5, tau_plus=0.2, temperature=0.3)
    hp = loss.hparams()
    assert {k: hp[k] for k in list(hp)[:7]} == {
        "temperature": 0.3,
        "tau_plus": 0.2,
        "objective": "infonce",
        "positive_mode": "separate",
        "normalize": True,
        "filter": None,
        "filter_options": {},
    }
    assert hp["beta"] == 0.5
    assert loss.extra_repr() == "temperature=0.3, tau_plus=0.2, objective='infonce'"
    assert loss.feature_kind is None and loss.draws is False and loss.per_anchor_columns is True
    potential = hardneg.create_loss("potential")
    assert potential.feature_kind == "projection"
    assert potential.draws is True and potential.per_anchor_columns is False
    filtered = hardneg.create_loss(
        "infonce", filter="positive_aware", filter_options={"percent": 0.9}
    )
    assert filtered.hparams()["filter"] == "positive_aware"
    assert filtered.hparams()["filter_options"] == {"percent": 0.9}
    assert filtered.filter_strategy.percent == 0.9


def test_the_repr_shows_every_setting_that_changes_the_loss():
    """``print(model)`` is how a training script records its loss: a setting that changes the
    value (no normalisation, joint positives, a filter) must appear in it, the defaults stay
    out of the way."""
    jsd = hardneg.create_loss("hcl", objective="jsd", temperature=1.0, normalize=False)
    assert jsd.extra_repr() == ("temperature=1.0, tau_plus=0.1, objective='jsd', normalize=False")
    joint = hardneg.create_loss("infonce", positive_mode="joint")
    assert joint.extra_repr().endswith(", positive_mode='joint'")
    filtered = hardneg.create_loss("ring", filter="fnc", filter_options={"top_k": 2})
    assert "filter='fnc'" in filtered.extra_repr()
    assert "top_k=2" in repr(filtered)  # the filter's own settings, as a child module


def test_call_inputs_are_checked_with_exact_messages():
    loss = hardneg.create_loss("infonce")
    q, k = z(4, seed=1), z(4, seed=2)
    diag = dict(return_diagnostics=True)  # labels are read (and checked) for diagnostics only
    with exactly("generator must be a torch.Generator, got int"):
        loss(q, k, generator=3)
    with exactly("a per-anchor pool must have shape (N, K, d) with N = 4 queries, got (3, 5, 3)"):
        loss(q, k, negatives=torch.zeros(3, 5, 3, dtype=torch.float64))
    with exactly("give either negatives (a pool) or hard_negatives, not both"):
        loss(q, k, negatives=z(5), hard_negatives=torch.zeros(4, 1, 3, dtype=torch.float64))
    for bad, shape in [
        (torch.zeros(4, 2, dtype=torch.float64), "(4, 2)"),
        (torch.zeros(3, 1, 3, dtype=torch.float64), "(3, 1, 3)"),
        (torch.zeros(4, 1, 2, dtype=torch.float64), "(4, 1, 2)"),
        ([1.0], "list"),
    ]:
        with exactly(f"hard_negatives must have shape (N, k, d) = (4, k, 3), got {shape}"):
            loss(q, k, hard_negatives=bad)
    with exactly("negative_h needs a shared pool (negatives [K, d]), not a per-anchor one"):
        loss(q, k, negatives=torch.zeros(4, 2, 3, dtype=torch.float64), negative_h=z(2))
    with exactly("exclude_index needs a shared external pool (negatives=[K, d])"):
        loss(q, k, exclude_index=torch.zeros(4, dtype=torch.long))
    with exactly("exclude_index needs a shared external pool (negatives=[K, d])"):
        loss(
            q,
            k,
            negatives=torch.zeros(4, 2, 3, dtype=torch.float64),
            exclude_index=torch.zeros(4, dtype=torch.long),
        )
    with exactly("a pool with exclude_index needs at least 2 entries"):
        loss(q, k, negatives=z(1), exclude_index=torch.zeros(4, dtype=torch.long))
    with exactly("negative_h must have 5 rows (one per sample), got 4"):
        loss(q, k, negatives=z(5), negative_h=z(4))
    with exactly("h2 must have 4 rows (one per sample), got 3"):
        loss(q, k, h2=z(3))
    with exactly("ids must have shape (8,), got (4,)"):
        loss(q, k, hard_negatives=torch.zeros(4, 1, 3, dtype=torch.float64), ids=torch.arange(4))
    with exactly("ids must have shape (4,), got (8,)"):
        loss(q, k, ids=torch.arange(8))
    with exactly("labels must have shape (4,), got (3,)"):
        loss(q, k, labels=torch.arange(3), return_diagnostics=True)
    with exactly("negative_labels must have shape (5,), got (4,)"):
        loss(q, k, negatives=z(5), negative_labels=torch.arange(4), return_diagnostics=True)
    with exactly("negative_labels must have shape (8,), got (6,)"):
        loss(q, k, negatives=torch.zeros(4, 2, 3), negative_labels=torch.zeros(2, 3).long(), **diag)
    with exactly("negative_labels of a per-anchor pool must have shape (4, 2), got (2, 4)"):
        loss(q, k, negatives=torch.zeros(4, 2, 3), negative_labels=torch.zeros(2, 4).long(), **diag)
    with exactly("z1 and extra_views[0] must have the same shape, got (4, 3) and (4, 2)"):
        loss(q, k, extra_views=[z(4, 2)])
    with exactly("extra_views[1] must be 2-D (rows x embedding dim), got shape (4,)"):
        loss(q, k, extra_views=[z(4), torch.zeros(4)])
    with exactly("negatives must be 2-D (rows x embedding dim), got shape (5,)"):
        loss(q, k, negatives=torch.zeros(5))
    # unchecked, the same bad call reaches the builders
    unchecked = hardneg.create_loss("infonce", check_inputs=False)
    with pytest.raises(RuntimeError):
        unchecked(q, k, extra_views=[z(4, 2)])


def test_a_per_anchor_pool_is_infonce_over_each_querys_own_rows():
    q, k = z(3, seed=3), z(3, seed=4)
    pool = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = 0.4
    loss = hardneg.create_loss("infonce", temperature=t)
    out = loss(q, k, negatives=pool, return_diagnostics=True)
    expected = []
    for i in range(3):
        a = cos(q[i], k[i]) / t
        negs = [cos(q[i], pool[i, j]) / t for j in range(4)]
        expected.append(lse([a] + negs) - a)
    assert out.per_anchor.tolist() == pytest.approx(expected, rel=1e-10)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-10)
    assert out.terms == {"main": pytest.approx(sum(expected) / 3, rel=1e-10)}


def test_the_retrieval_form_with_ids_masks_the_duplicates_of_each_positive():
    a, p = z(3, seed=6), z(3, seed=7)
    hard = torch.randn(3, 1, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ids = torch.tensor([1, 2, 3, 2, 5, 6])  # anchor 1's hard negative duplicates its positive
    loss = hardneg.create_loss("infonce", temperature=1.0)
    cols = [p[0], p[1], p[2], hard[0, 0], hard[1, 0], hard[2, 0]]
    expected = []
    for i in range(3):
        logits = [cos(a[i], c) for j, c in enumerate(cols) if j == i or ids[j] != ids[i]]
        pos = cos(a[i], p[i])
        expected.append(lse(logits) - pos)
    got = loss(a, p, hard_negatives=hard, ids=ids)
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-10)


def test_standard_contrast_attaches_features_and_labels_of_each_call_form():
    q, k, h1, h2 = z(3, seed=9), z(3, seed=10), z(3, 2, seed=11), z(3, 2, seed=12)
    labels = torch.tensor([0, 1, 0])
    cs = ContrastInputs(q, k, 1.0, h1=h1, h2=h2, labels=labels).standard_contrast()
    torch.testing.assert_close(cs.anchor_features, torch.cat([h1, h2]))
    torch.testing.assert_close(cs.column_features, torch.cat([h1, h2]))
    assert cs.anchor_labels.tolist() == [0, 1, 0, 0, 1, 0] == cs.column_labels.tolist()
    three = ContrastInputs(q, k, 1.0, h1=h1, h2=h2, extra_views=(z(3, seed=13),), labels=labels)
    cs = three.standard_contrast()
    assert cs.anchor_features is None and cs.column_labels.tolist() == [0, 1, 0] * 3
    pool, ph = z(5, seed=14), z(5, 2, seed=15)
    form = ContrastInputs(q, k, 1.0, negatives=pool, h1=h1, negative_h=ph, labels=labels)
    assert form.form == "pool"
    cs = form.standard_contrast()
    assert cs.anchor_features is h1 and cs.column_features is ph
    assert cs.anchor_labels is None and cs.column_labels is None  # no pool labels: none
    nl = torch.arange(5)
    cs = ContrastInputs(
        q, k, 1.0, negatives=pool, labels=labels, negative_labels=nl
    ).standard_contrast()
    assert cs.anchor_labels is labels and cs.column_labels is nl
    per_anchor = torch.randn(3, 2, 3, dtype=torch.float64)
    form = ContrastInputs(q, k, 1.0, negatives=per_anchor, h1=h1, labels=labels)
    cs = form.standard_contrast()
    assert cs.anchor_features is h1 and cs.num_shared == 0 and cs.anchor_columns.shape == (3, 2, 3)
    assert cs.anchor_labels is None
    nl = torch.zeros(3, 2, dtype=torch.long)
    form = ContrastInputs(q, k, 1.0, negatives=per_anchor, labels=labels, negative_labels=nl)
    cs = form.standard_contrast()
    assert cs.anchor_labels is labels and cs.column_labels is nl
    form = ContrastInputs(q, k, 1.0, hard_negatives=per_anchor, h1=h1)
    assert form.form == "retrieval"
    assert form.standard_contrast().anchor_features is h1
    assert ContrastInputs(q, k, 1.0).form == "in_batch"
    raw = ContrastInputs(q * 3, k, 0.5, normalize=False).standard_contrast()
    assert raw.positive_logits[0, 0].item() == pytest.approx(float(3 * q[0] @ k[0]) / 0.5)


def test_every_call_form_honours_normalize_false():
    q, k = z(3, seed=16) * 2, z(3, seed=17)
    pool = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    forms = {
        "per-anchor pool": dict(negatives=pool),
        "pool": dict(negatives=pool[0]),
        "retrieval": dict(hard_negatives=pool),
        "in batch": {},
    }
    for name, extra in forms.items():
        cs = ContrastInputs(q, k, 0.5, normalize=False, **extra).standard_contrast()
        assert cs.normalized is False, name
        expected = (q * k).sum(1) / 0.5
        torch.testing.assert_close(cs.positive_logits[:3, 0], expected, rtol=1e-12, atol=0)


def test_non_finite_pools_and_features_are_located_exactly():
    loss = hardneg.create_loss("infonce")
    q, k = z(4, seed=19), z(4, seed=20)
    pool = torch.zeros(4, 3, 5, dtype=torch.float64)
    pool[1, 2, 0] = float("nan")  # row 1 * 3 + 2 of the flattened pool
    with exactly(
        "negatives contains 1 NaN or Inf value(s) (first in row 5); only finite embeddings are allowed"
    ):
        loss(z(4, 5), z(4, 5), negatives=pool)
    hard = torch.zeros(4, 1, 3, dtype=torch.float64)
    hard[2, 0, 1] = float("inf")  # h = 1: row 2 of the flattened hard negatives
    with exactly(
        "hard_negatives contains 1 NaN or Inf value(s) (first in row 2); "
        "only finite embeddings are allowed"
    ):
        loss(q, k, hard_negatives=hard)
    hard = torch.zeros(4, 2, 3, dtype=torch.float64)
    hard[1, 1, 2] = float("nan")
    with exactly(
        "hard_negatives contains 1 NaN or Inf value(s) (first in row 3); "
        "only finite embeddings are allowed"
    ):
        loss(q, k, hard_negatives=hard)
    # h = 0 is the pair layout, not an empty set of embeddings
    assert torch.isfinite(loss(q, k, hard_negatives=torch.zeros(4, 0, 3, dtype=torch.float64)))
    with exactly("h1 must be 2-D (rows x embedding dim), got shape (4,)"):
        loss(q, k, h1=torch.zeros(4, dtype=torch.float64))
    # features have a row per sample and any width
    assert torch.isfinite(loss(q, k, h1=z(4, 2), h2=z(4, 2)))


def test_the_smallest_batch_is_two_and_the_message_names_the_inputs():
    """In-batch, two samples; with a pool (which holds the negatives), one query."""
    loss = hardneg.create_loss("infonce")
    assert torch.isfinite(loss(z(2, seed=21), z(2, seed=22)))
    assert torch.isfinite(loss(z(1, seed=21), z(1, seed=22), negatives=z(3)))
    with exactly(
        "q and k need a batch of at least N = 1 samples (a contrastive loss needs negatives), "
        "got N = 0"
    ):
        loss(z(0), z(0), negatives=z(3))
    with exactly(
        "z1 and z2 need a batch of at least N = 2 samples (a contrastive loss needs negatives), "
        "got N = 1"
    ):
        loss(z(1), z(1))


class Recorder(Strategy):
    """Every negative once (InfoNCE); records the step context and the labels it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[StepContext, object, object]] = []

    def select(self, contrast, context):
        self.seen.append((context, contrast.anchor_labels, contrast.column_labels))
        return Selection()


def test_the_strategy_gets_the_calls_progress_and_generator_and_the_fast_path_choice():
    q, k, g = z(4, seed=23), z(4, seed=24), torch.Generator()
    cases = [  # (loss settings, call options) -> (fast, want_log_mass)
        ({}, dict(progress=0.25, generator=g), (True, True)),
        ({}, dict(return_diagnostics=True), (False, False)),  # diagnostics need dense weights
        (dict(fast=False), {}, (False, True)),
        (dict(objective="jsd"), {}, (True, False)),  # JSD needs every weight, not the mass
        (dict(objective="jsd", fast=False), dict(return_diagnostics=True), (False, False)),
    ]
    for settings, call, (fast, want_log_mass) in cases:
        recorder = Recorder()
        ContrastiveLoss(recorder, **settings)(q, k, **call)
        ((context, _, _),) = recorder.seen
        assert (context.fast, context.want_log_mass) == (fast, want_log_mass), (settings, call)
        assert context.progress == call.get("progress")
        assert context.generator is call.get("generator")


def test_labels_reach_the_strategy_only_when_diagnostics_are_asked_for():
    q, k, labels = z(4, seed=25), z(4, seed=26), torch.tensor([0, 1, 0, 2])
    pool, pool_labels = z(5, seed=27), torch.tensor([2, 0, 0, 1, 3])
    per_anchor = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(28))
    per_anchor_labels = torch.tensor([[0, 1], [1, 1], [2, 0], [3, 2]])
    forms = [
        ({}, [0, 1, 0, 2] * 2, [0, 1, 0, 2] * 2),
        (dict(negatives=pool, negative_labels=pool_labels), [0, 1, 0, 2], [2, 0, 0, 1, 3]),
        (
            dict(negatives=per_anchor, negative_labels=per_anchor_labels),
            [0, 1, 0, 2],
            [[0, 1], [1, 1], [2, 0], [3, 2]],
        ),
    ]
    for form, anchor_labels, column_labels in forms:
        recorder = Recorder()
        loss = ContrastiveLoss(recorder)
        loss(q, k, labels=labels, **form)  # never used by the loss, not even checked
        loss(q, k, labels=torch.arange(7), **form)
        loss(q, k, labels=labels, return_diagnostics=True, **form)
        assert [(a, c) for _, a, c in recorder.seen[:2]] == [(None, None), (None, None)]
        _, a, c = recorder.seen[2]
        assert (a.tolist(), c.tolist()) == (anchor_labels, column_labels)


def test_a_pool_of_two_with_exclude_index_leaves_each_query_the_other_entry():
    q, k, pool = z(3, seed=29), z(3, seed=30), z(2, seed=31)
    exclude = torch.tensor([0, 1, 0])
    t = 0.5
    out = hardneg.create_loss("infonce", temperature=t)(
        q, k, negatives=pool, exclude_index=exclude, return_diagnostics=True
    )
    expected = []
    for i in range(3):
        a = cos(q[i], k[i]) / t
        expected.append(lse([a, cos(q[i], pool[1 - exclude[i]]) / t]) - a)
    assert out.per_anchor.tolist() == pytest.approx(expected, rel=1e-10)


def in_batch_infonce(z1, z2, t, keep=lambda i, j: True):
    """Per-anchor float64 InfoNCE over the 2N in-batch anchors, negatives filtered by keep."""
    views = torch.cat([z1, z2])
    n2 = views.shape[0]
    out = []
    for i in range(n2):
        p = (i + n2 // 2) % n2
        a = cos(views[i], views[p]) / t
        negs = [cos(views[i], views[j]) / t for j in range(n2) if j not in (i, p) and keep(i, j)]
        out.append(lse([a] + negs) - a)
    return out


def test_the_defaults_are_temperature_one_half_normalised_and_checked():
    loss = ContrastiveLoss(UniformNegatives())
    assert loss.hparams() == {
        "temperature": 0.5,
        "tau_plus": 0.0,
        "objective": "infonce",
        "positive_mode": "separate",
        "normalize": True,
        "filter": None,
        "filter_options": {},
    }
    q, k = z(4, seed=32), z(4, seed=33)
    expected = sum(in_batch_infonce(q, k, 0.5)) / 8
    assert loss(3 * q, k).item() == pytest.approx(expected, rel=1e-10)  # cosine: scale-free
    with exactly("z1 must be 2-D (rows x embedding dim), got shape (4,)"):
        loss(torch.zeros(4, dtype=torch.float64), k)


def test_a_filter_drops_the_negatives_its_rule_rejects_before_the_strategy_runs():
    q, k = z(4, seed=34), z(4, seed=35)
    t, margin = 0.5, 0.1
    views = torch.cat([q, k])

    def keep(i, j):  # NV-Retriever's TopK-MarginPos, raised to the least similar negative
        p = (i + 4) % 8
        sims = [cos(views[i], views[c]) for c in range(8) if c not in (i, p)]
        limit = max(cos(views[i], views[p]) - margin, min(sims))
        return cos(views[i], views[j]) <= limit

    dropped = sum(not keep(i, j) for i in range(8) for j in range(8) if j not in (i, (i + 4) % 8))
    assert 0 < dropped < 48  # the data exercise the rule
    loss = hardneg.create_loss(
        "infonce",
        temperature=t,
        filter="positive_aware",
        filter_options=dict(mode="margin", margin=margin),
    )
    out = loss(q, k, return_diagnostics=True)
    assert out.per_anchor.tolist() == pytest.approx(in_batch_infonce(q, k, t, keep), rel=1e-10)
    assert loss(q, k).item() == pytest.approx(out.loss.item(), rel=1e-12)


class ThreeTerms(Strategy):
    """The standard set three times, two of the terms under the same role."""

    def terms(self, inputs, context):
        contrast = inputs.standard_contrast()
        return [(0.5, contrast, "main"), (0.25, contrast, "main"), (2.0, contrast, "extra")]


def test_terms_are_weighted_summed_and_reported_per_role_with_the_first_terms_diagnostics():
    q, k = z(4, seed=36), z(4, seed=37)
    per_anchor = in_batch_infonce(q, k, 0.5)
    value = sum(per_anchor) / 8
    out = ContrastiveLoss(ThreeTerms())(q, k, return_diagnostics=True)
    assert out.loss.item() == pytest.approx(2.75 * value, rel=1e-10)
    assert out.terms == {"main": pytest.approx(0.75 * value), "extra": pytest.approx(2 * value)}
    assert out.per_anchor.tolist() == pytest.approx(per_anchor, rel=1e-10)
    # every anchor keeps its 2N - 2 = 6 negatives at weight 1
    assert out.diagnostics.effective_negatives.tolist() == pytest.approx([6.0] * 8)


class KeepAll(Strategy):
    """A test filter that keeps every negative and records the step context it is handed."""

    is_filter = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[StepContext] = []

    def keep(self, contrast, context):
        self.seen.append(context)
        return torch.isfinite(contrast.negative_logits)


def test_a_filter_is_handed_the_step_context_of_the_strategy():
    register_strategy("keep_all_test_filter", summary="test filter")(KeepAll)
    try:
        loss = ContrastiveLoss(Recorder(), filter="keep_all_test_filter")
        g = torch.Generator()
        loss(z(4, seed=38), z(4, seed=39), progress=0.5, generator=g)
        (context,) = loss.filter_strategy.seen
        assert context is loss.strategy.seen[0][0]
        assert context.progress == 0.5 and context.generator is g
    finally:
        unregister_strategy("keep_all_test_filter")


def test_one_anchor_with_hard_negatives_is_a_batch_and_equals_cross_entropy():
    """A single (anchor, positive, negatives) row has k negatives: it is accepted and equals
    the cross-entropy over [positive, negatives] (float64, written out); without hard
    negatives one anchor has none and is refused."""
    loss = hardneg.create_loss("infonce", temperature=0.1)
    a, p, n = z(1, d=5, seed=1), z(1, d=5, seed=2), z(3, d=5, seed=3)
    unit = torch.nn.functional.normalize
    logits = (unit(a, dim=1) @ unit(torch.cat([p, n]), dim=1).T / 0.1)[0]
    want = -(logits[0] - torch.logsumexp(logits, dim=0))
    torch.testing.assert_close(loss(a, p, hard_negatives=n[None]), want)
    with exactly(
        "z1 and z2 need a batch of at least N = 2 samples (a contrastive loss needs negatives), "
        "got N = 1"
    ):
        loss(a, p, hard_negatives=n[None, :0])


@pytest.mark.parametrize("name", hardneg.list_losses())
def test_every_strategy_takes_one_anchor_with_hard_negatives(name):
    from hardneg.registry import strategy_class

    if not strategy_class(name).__module__.startswith("hardneg."):
        pytest.skip("a plug-in registered by another test")
    loss = hardneg.create_loss(name, temperature=0.05)
    a = z(1, d=6, seed=4).requires_grad_()
    kw = {"generator": torch.Generator().manual_seed(0)} if loss.draws else {}
    try:
        value = loss(a, z(1, d=6, seed=5), hard_negatives=z(3, d=6, seed=6)[None], **kw)
    except ValueError as err:
        assert "not hard_negatives" in str(err)  # potential: no retrieval layout at all
        return
    (grad,) = torch.autograd.grad(value, a)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
