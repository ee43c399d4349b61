"""The directions and partition of sentence-transformers' ``MultipleNegativesRankingLoss`` (and
``GISTEmbedLoss``'s anchor and positive blocks) in ``HardNegativeLoss``: against the two losses
themselves for uniform weights, and against a float64 loop over each pair's candidates for a
strategy that weights them (HCL), which no sentence-transformers loss computes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentence_transformers")

from _text_models import (  # noqa: E402
    assert_same,
    distinct_columns,
    tiny_model,
    value_and_grads,
)
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    GISTEmbedLoss,
    MultipleNegativesRankingLoss,
)

import hardneg  # noqa: E402
from hardneg.integrations.sentence_transformers import (  # noqa: E402
    DIRECTIONS,
    CachedHardNegativeLoss,
    HardNegativeLoss,
)
from hardneg.objectives import joint_partition_loss  # noqa: E402

torch.set_num_threads(1)

OPTIONAL = ("query_to_query", "doc_to_query", "doc_to_doc")
JOINT = [
    ("query_to_doc", *extra)
    for r in range(len(OPTIONAL) + 1)
    for extra in itertools.combinations(OPTIONAL, r)
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    return tiny_model(root, seed=0), tiny_model(root, seed=1)


def columns(k: int, batch: int = 5, seed: int = 4) -> list[list[str]]:
    return distinct_columns(k, batch, seed)


# -- against sentence-transformers --------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("directions", JOINT, ids="+".join)
def test_joint_partition_equals_multiple_negatives_ranking_loss(models, directions, k):
    model, _ = models
    cols = columns(k)
    ours = HardNegativeLoss(model, scale=10.0, directions=directions, partition_mode="joint")
    ref = MultipleNegativesRankingLoss(
        model, scale=10.0, directions=directions, partition_mode="joint"
    )
    assert_same(value_and_grads(model, ours, cols), value_and_grads(model, ref, cols))


@pytest.mark.parametrize("k", [0, 1])
def test_per_direction_equals_multiple_negatives_ranking_loss_and_symmetric(models, k):
    model, _ = models
    cols = columns(k)
    both = ("query_to_doc", "doc_to_query")
    ours = HardNegativeLoss(model, scale=10.0, directions=both, partition_mode="per_direction")
    ref = MultipleNegativesRankingLoss(
        model, scale=10.0, directions=both, partition_mode="per_direction"
    )
    assert_same(value_and_grads(model, ours, cols), value_and_grads(model, ref, cols))
    assert_same(
        value_and_grads(model, ours, cols),
        value_and_grads(model, HardNegativeLoss(model, scale=10.0, symmetric=True), cols),
    )


@pytest.mark.parametrize("k", [0, 1])
def test_one_pair_batch_equals_multiple_negatives_ranking_loss(models, k):
    """One pair: the query's set has only its hard negatives, the document's only the pair
    itself (``doc_to_query``); GTE's partition gives log 2 without hard negatives."""
    model, _ = models
    cols = columns(k, batch=1)
    ours = HardNegativeLoss(model, directions=DIRECTIONS)
    ref = MultipleNegativesRankingLoss(model, directions=DIRECTIONS)
    got, want = value_and_grads(model, ours, cols), value_and_grads(model, ref, cols)
    assert_same(got, want)
    if k == 0:
        assert float(got[0]) == pytest.approx(math.log(2.0), abs=1e-6)


@pytest.mark.parametrize(
    "k, anchors, positives, mode, margin",
    [
        (0, True, True, "absolute", 0.0),
        (1, True, True, "absolute", 0.0),
        (1, True, False, "relative", 0.01),
        (1, False, True, "absolute", 0.0),
        (1, True, True, "relative", 0.01),
    ],
)
def test_gist_blocks_equal_gistembed_loss(models, k, anchors, positives, mode, margin):
    model, guide = models
    cols = columns(k, batch=8, seed=3)
    ours = HardNegativeLoss(
        model,
        scale=20.0,
        guide=guide,
        guide_margin=margin,
        guide_margin_strategy=mode,
        contrast_anchors=anchors,
        contrast_positives=positives,
    )
    theirs = GISTEmbedLoss(
        model,
        guide,
        temperature=0.05,
        margin=margin,
        margin_strategy=mode,
        contrast_anchors=anchors,
        contrast_positives=positives,
    )
    got = value_and_grads(model, ours, cols)
    assert_same(got, value_and_grads(model, theirs, cols))
    # the blocks change the loss (the test is not one of the plain layout)
    plain = HardNegativeLoss(model, scale=20.0, guide=guide, guide_margin=margin,
                             guide_margin_strategy=mode)  # fmt: skip
    assert abs(float(value_and_grads(model, plain, cols)[0]) - float(got[0])) > 1e-3


def test_cached_joint_equals_plain_joint(models):
    model, guide = models
    cols = columns(1, batch=6)
    kw = {"directions": DIRECTIONS, "guide": guide, "beta": 0.5}
    plain = value_and_grads(model, HardNegativeLoss(model, "hcl", **kw), cols)
    cached = value_and_grads(
        model, CachedHardNegativeLoss(model, "hcl", mini_batch_size=2, **kw), cols
    )
    assert_same(plain, cached)


# -- a weighting strategy: each anchor's set weighted on its own, one partition per pair --------


def hcl_partition(scores: list[float], pos: float, t: float, beta: float, tau_plus: float) -> float:
    """``Z = e^a + Ng`` of HCL's estimator over one anchor's negatives' cosines (float64 loop)."""
    m = len(scores)
    if m == 0:
        return math.exp(pos / t)
    tilt = [math.exp(beta * s / t) for s in scores]
    mean_tilt = sum(tilt) / m
    mass = sum(w / mean_tilt * math.exp(s / t) for w, s in zip(tilt, scores))
    ng = (mass - tau_plus * m * math.exp(pos / t)) / (1.0 - tau_plus)
    return math.exp(pos / t) + max(ng, m * math.exp(-1.0 / t))


def joint_oracle(q, d, negs, directions, t, beta, tau_plus, doc_candidates="all"):
    """Mean over pairs of ``log(Zq + Zd) - a`` (``Zd`` without ``e^a`` unless doc_to_query)."""
    cos = lambda x, y: float(F.cosine_similarity(x, y, dim=0))  # noqa: E731
    b, k = negs.shape[0], negs.shape[1]
    total = 0.0
    for i in range(b):
        pos = cos(q[i], d[i])
        q_scores = [cos(q[i], d[j]) for j in range(b) if j != i]
        q_scores += [cos(q[i], negs[j, m]) for j in range(b) for m in range(k)]
        if "query_to_query" in directions:
            q_scores += [cos(q[i], q[j]) for j in range(b) if j != i]
        z = hcl_partition(q_scores, pos, t, beta, tau_plus)
        d_scores = []
        if "doc_to_query" in directions:
            d_scores += [cos(d[i], q[j]) for j in range(b) if j != i]
        if "doc_to_doc" in directions:
            d_scores += [cos(d[i], d[j]) for j in range(b) if j != i]
            if doc_candidates == "all":
                d_scores += [cos(d[i], negs[j, m]) for j in range(b) if j != i for m in range(k)]
        if "doc_to_query" in directions or "doc_to_doc" in directions:
            zd = hcl_partition(d_scores, pos, t, beta, tau_plus)
            z += zd if "doc_to_query" in directions else zd - math.exp(pos / t)
        total += math.log(z) - pos / t
    return total / b


@pytest.mark.parametrize("tau_plus", [0.0, 0.1])
@pytest.mark.parametrize(
    "directions",
    [DIRECTIONS, ("query_to_doc", "doc_to_doc"), ("query_to_doc", "query_to_query")],
    ids="+".join,
)
def test_hcl_weights_each_anchor_s_set_in_the_joint_partition(models, directions, tau_plus):
    model, _ = models
    gen = torch.Generator().manual_seed(5)
    b, k, dim = 5, 2, 12
    q, d = (
        torch.randn(b, dim, generator=gen, dtype=torch.float64),
        torch.randn(b, dim, generator=gen, dtype=torch.float64),
    )
    negs = torch.randn(b, k, dim, generator=gen, dtype=torch.float64)
    loss = HardNegativeLoss(
        model, "hcl", scale=4.0, beta=0.7, tau_plus=tau_plus, directions=directions
    )
    got = loss.compute_loss_from_embeddings([q, d, *negs.unbind(1)])
    want = joint_oracle(q, d, negs, directions, t=0.25, beta=0.7, tau_plus=tau_plus)
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_ir_ring_draws_in_the_joint_partition_and_with_duplicate_masks(models):
    """Ring's ``num_samples`` (IR-Ring) with the four blocks, whose masks give each anchor a
    count of its own: with a band of one rank every draw is the set's hardest negative, so
    ``Z = e^a + S e^{c_max}`` on each side (a float64 loop). Both, and a text batch with the
    default duplicate masks, were refused ('num_samples needs the same number of negatives')."""
    model, _ = models
    gen = torch.Generator().manual_seed(7)
    b, k, dim, t, s = 4, 1, 8, 0.25, 3
    q, d = (torch.randn(b, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    negs = torch.randn(b, k, dim, generator=gen, dtype=torch.float64)
    loss = HardNegativeLoss(
        model, "ring", scale=1 / t, rho_out=0.01, num_samples=s, directions=DIRECTIONS
    )
    got = loss.compute_loss_from_embeddings([q, d, *negs.unbind(1)])
    cos = lambda x, y: float(F.cosine_similarity(x, y, dim=0)) / t  # noqa: E731
    total = 0.0
    for i in range(b):
        a = cos(q[i], d[i])
        q_side = [cos(q[i], d[j]) for j in range(b) if j != i]
        q_side += [cos(q[i], negs[j, m]) for j in range(b) for m in range(k)]
        q_side += [cos(q[i], q[j]) for j in range(b) if j != i]
        d_side = [cos(d[i], q[j]) for j in range(b) if j != i]
        d_side += [cos(d[i], d[j]) for j in range(b) if j != i]
        d_side += [cos(d[i], negs[j, m]) for j in range(b) if j != i for m in range(k)]
        z = 2 * math.exp(a) + s * math.exp(max(q_side)) + s * math.exp(max(d_side))
        total += math.log(z) - a
    assert float(got) == pytest.approx(total / b, rel=1e-10)
    cols = columns(0, batch=4)
    feats = [model.preprocess(c) for c in cols]
    masked = HardNegativeLoss(model, "ring", rho_out=0.01, num_samples=s)  # mask_duplicates
    plain = HardNegativeLoss(model, "ring", rho_out=0.01, num_samples=s, mask_duplicates=False)
    with torch.no_grad():  # distinct texts: the masks drop nothing
        assert float(masked(feats, None)) == pytest.approx(float(plain(feats, None)), rel=1e-6)


def test_contrast_positives_compares_documents_with_the_positives_only(models):
    model, _ = models
    gen = torch.Generator().manual_seed(6)
    q, d = (
        torch.randn(4, 8, generator=gen, dtype=torch.float64),
        torch.randn(4, 8, generator=gen, dtype=torch.float64),
    )
    negs = torch.randn(4, 1, 8, generator=gen, dtype=torch.float64)
    loss = HardNegativeLoss(
        model, "hcl", scale=5.0, beta=0.3, tau_plus=0.0, contrast_positives=True
    )
    got = loss.compute_loss_from_embeddings([q, d, negs[:, 0]])
    directions = ("query_to_doc", "doc_to_doc")
    want = joint_oracle(q, d, negs, directions, 0.2, 0.3, 0.0, doc_candidates="positives")
    assert float(got) == pytest.approx(want, rel=1e-10)
    everything = joint_oracle(q, d, negs, directions, 0.2, 0.3, 0.0, doc_candidates="all")
    assert abs(want - everything) > 1e-3


def test_a_duplicate_query_text_is_masked_in_query_to_query(models):
    """Two rows with the same query: with mask_duplicates (default), the other copy is neither
    positive nor negative of the query (at cosine 1 it would dominate the query block); the
    loss equals the partition without that candidate, as the loop below computes."""
    model, _ = models
    cols = columns(0, batch=4)
    cols[0][2] = cols[0][0]
    feats = [model.preprocess(c) for c in cols]
    loss = HardNegativeLoss(model, scale=10.0, directions=("query_to_doc", "query_to_query"))
    with torch.no_grad():
        q, d = (model(f)["sentence_embedding"].double() for f in feats)
        got = loss(feats, None)
    total = 0.0
    for i in range(4):
        logits = [10 * F.cosine_similarity(q[i], d[j], dim=0) for j in range(4)]
        # the other row of the same query: its document is a positive of this query too
        logits = [x for j, x in enumerate(logits) if not (j != i and {i, j} == {0, 2})]
        twins = {0: 2, 2: 0}
        logits += [
            10 * F.cosine_similarity(q[i], q[j], dim=0)
            for j in range(4)
            if j != i and twins.get(i) != j
        ]
        total += float(torch.logsumexp(torch.stack(logits), 0)) - 10 * float(
            F.cosine_similarity(q[i], d[i], dim=0)
        )
    assert float(got) == pytest.approx(total / 4, rel=1e-4)
    unmasked = HardNegativeLoss(
        model, scale=10.0, directions=("query_to_doc", "query_to_query"), mask_duplicates=False
    )
    with torch.no_grad():
        assert float(unmasked(feats, None)) > float(got) + 0.1


@pytest.mark.parametrize("name", sorted(hardneg.list_losses()))
def test_every_strategy_takes_the_joint_partition_or_says_why(models, name):
    model, _ = models
    try:
        loss = HardNegativeLoss(model, name, directions=DIRECTIONS)
    except ValueError as err:
        # the retrieval layout itself, several positives or another objective: named
        assert any(
            w in str(err)
            for w in ("retrieval", "positives", "objective", "hard_negatives", "takes")
        ), err
        return
    gen = torch.Generator().manual_seed(0)
    emb = [torch.randn(6, 16, generator=gen, requires_grad=True) for _ in range(3)]
    value = loss.compute_loss_from_embeddings(emb)
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert all(torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0 for e in emb)


# -- the objective and the core's per-anchor losses ---------------------------------------------


def test_joint_partition_loss_adds_the_partitions():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(7, generator=gen, dtype=torch.float64)
    zq = a.exp() + torch.rand(7, generator=gen, dtype=torch.float64) * 5
    negatives_d = torch.rand(7, generator=gen, dtype=torch.float64) * 3
    lq, ld = zq.log() - a, (a.exp() + negatives_d).log() - a
    with_pos = joint_partition_loss(lq, ld, doc_side_positive=True)
    torch.testing.assert_close(with_pos, (zq + a.exp() + negatives_d).log() - a)
    without = joint_partition_loss(lq, ld, doc_side_positive=False)
    torch.testing.assert_close(without, (zq + negatives_d).log() - a)
    # a document side without negatives (l = 0): its mass is 0, with a finite gradient
    ld0 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    lq0 = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = joint_partition_loss(lq0, ld0, doc_side_positive=False)
    out.sum().backward()
    torch.testing.assert_close(out, lq0.detach())
    assert torch.isfinite(ld0.grad).all() and torch.isfinite(lq0.grad).all()
    big = joint_partition_loss(torch.tensor([1.0]), torch.tensor([200.0]), doc_side_positive=False)
    assert float(big) == pytest.approx(200.0, abs=1e-4)  # no overflow of e^l - 1


def test_reduction_none_gives_the_per_anchor_losses():
    gen = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    loss = hardneg.create_loss("infonce", temperature=0.5)
    per_anchor = loss(z1, z2, reduction="none")
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(6, 12), torch.arange(6)])
    torch.testing.assert_close(per_anchor, F.cross_entropy(logits, target, reduction="none"))
    torch.testing.assert_close(per_anchor.mean(), loss(z1, z2))
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss(z1, z2, reduction="sum")
    with pytest.raises(ValueError, match="ask for one of the two"):
        loss(z1, z2, reduction="none", return_diagnostics=True)
    with pytest.raises(ValueError, match=r"PotentialMining sums \d terms"):
        hardneg.create_loss("potential")(z1, z2, reduction="none")


# -- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"directions": ("doc_to_query",)}, "must include 'query_to_doc'"),
        ({"directions": ("query_to_doc", "doc_to_qeury")}, "did you mean 'doc_to_query'"),
        ({"directions": "query_to_doc"}, "a tuple of direction names"),
        ({"directions": ("query_to_doc", "query_to_doc")}, "twice"),
        ({"partition_mode": "both"}, "partition_mode must be one of"),
        (
            {"directions": ("query_to_doc", "query_to_query"), "partition_mode": "per_direction"},
            "use partition_mode='joint'",
        ),
        ({"symmetric": True, "partition_mode": "joint"}, "not both"),
        # GISTEmbedLoss's blocks with symmetric=True: the advice must name symmetric (the
        # advice "use partition_mode='joint'" then failed with "not both")
        (
            {"symmetric": True, "contrast_anchors": True},
            r"symmetric=True .* contrast_anchors .* directions=\('query_to_doc', "
            r"'doc_to_query'\) with partition_mode='joint'",
        ),
        (
            {"symmetric": True, "contrast_positives": True},
            r"symmetric=True .* contrast_positives .* partition_mode='joint'",
        ),
        ({"contrast_positives": True, "directions": DIRECTIONS}, "give one of them"),
        ({"contrast_anchors": 1}, "contrast_anchors must be True or False"),
        ({"directions": DIRECTIONS, "objective": "jsd"}, "objective='infonce'"),
        ({"strategy": "fnc", "directions": DIRECTIONS}, "attracts positives of its own"),
    ],
)
def test_bad_partition_arguments_say_what_is_wrong(models, kwargs, message):
    model, _ = models
    with pytest.raises(ValueError, match=message):
        HardNegativeLoss(model, **kwargs)


def test_partition_settings_in_the_model_card(models):
    model, _ = models
    loss = HardNegativeLoss(model, directions=("doc_to_doc", "query_to_doc"), contrast_anchors=True)
    cfg = loss.get_config_dict()
    assert cfg["directions"] == ("query_to_doc", "query_to_query", "doc_to_doc")
    assert cfg["partition_mode"] == "joint"
    assert "Li" not in loss.citation.split("Henderson")[0]  # GTE only with its four blocks
    assert (
        "Towards General Text Embeddings" in HardNegativeLoss(model, directions=DIRECTIONS).citation
    )
    sym = HardNegativeLoss(model, symmetric=True).get_config_dict()
    assert sym["directions"] == ("query_to_doc", "doc_to_query")
    assert sym["partition_mode"] == "per_direction"
