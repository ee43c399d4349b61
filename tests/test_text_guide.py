"""Guided false-negative masking (GISTEmbed) in front of any strategy: ``HardNegativeLoss(...,
guide=...)`` against sentence-transformers' ``GISTEmbedLoss``, and the core's
``false_negatives=`` against each anchor's loss over its kept candidates alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentence_transformers")

from _text_models import (  # noqa: E402
    WORDS,
    assert_same,
    distinct_columns,
    tiny_model,
    value_and_grads,
)
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss  # noqa: E402

import hardneg  # noqa: E402
from hardneg.contrast import guided_false_negatives  # noqa: E402
from hardneg.integrations.sentence_transformers import (  # noqa: E402
    CachedHardNegativeLoss,
    HardNegativeLoss,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    return tiny_model(root, seed=0), tiny_model(root, seed=1)


def columns(k: int, batch: int = 8, seed: int = 3) -> list[list[str]]:
    return distinct_columns(k, batch, seed)


def guide_cosines(guide, texts_a, texts_c):
    """The guide's cosines by an explicit loop over pairs (independent of the mask helper)."""
    with torch.no_grad():
        ea = guide.encode(texts_a, convert_to_tensor=True)
        ec = guide.encode(texts_c, convert_to_tensor=True)
    return [[float(F.cosine_similarity(x, y, dim=0)) for y in ec] for x in ea]


@pytest.mark.parametrize(
    "k, mode, margin",
    [(0, "absolute", 0.0), (1, "absolute", 0.0), (1, "absolute", 0.1), (1, "relative", 0.01)],
)
def test_guide_equals_gistembed_without_anchor_and_positive_columns(models, k, mode, margin):
    model, guide = models
    cols = columns(k)
    # the guide masks some candidates and keeps others (else the test would not test it)
    cands = cols[1] + [t for c in cols[2:] for t in c]
    sims = guide_cosines(guide, cols[0], cands)
    masked = sum(
        sims[i][j] > sims[i][i] - (margin if mode == "absolute" else abs(sims[i][i]) * margin)
        for i in range(len(cols[0]))
        for j in range(len(cands))
        if j != i
    )
    assert 0 < masked < len(cols[0]) * (len(cands) - 1)
    ours = HardNegativeLoss(
        model, "infonce", scale=20.0, guide=guide, guide_margin=margin, guide_margin_strategy=mode
    )
    theirs = GISTEmbedLoss(
        model,
        guide,
        temperature=0.05,
        margin_strategy=mode,
        margin=margin,
        contrast_anchors=False,
        contrast_positives=False,
    )
    assert not ours._retokenize
    assert_same(value_and_grads(model, ours, cols), value_and_grads(model, theirs, cols))
    # and the guide changes the loss: without it, the masked candidates count again
    plain = value_and_grads(model, HardNegativeLoss(model, "infonce", scale=20.0), cols)[0]
    assert abs(float(plain) - float(value_and_grads(model, ours, cols)[0])) > 1e-3


def test_a_guide_with_another_vocabulary_gets_its_own_tokens(tmp_path, models):
    model, _ = models
    guide = tiny_model(tmp_path, seed=2, words=tuple(reversed(WORDS)))
    cols = columns(1)
    ours = HardNegativeLoss(model, "infonce", scale=20.0, guide=guide)
    assert ours._retokenize
    theirs = GISTEmbedLoss(
        model, guide, temperature=0.05, contrast_anchors=False, contrast_positives=False
    )
    assert_same(value_and_grads(model, ours, cols), value_and_grads(model, theirs, cols))


def test_symmetric_guide_masks_each_direction_by_its_own_anchor(models):
    model, guide = models
    cols = columns(0)
    loss = HardNegativeLoss(model, "infonce", scale=10.0, symmetric=True, guide=guide)
    with torch.no_grad():
        got = loss([model.preprocess(c) for c in cols], None)
        a, p = (model.encode(c, convert_to_tensor=True) for c in cols)

    def direction(x, y, sims):  # x_i's candidates y_j, masked where the guide says so
        total = 0.0
        for i in range(x.shape[0]):
            keep = [j for j in range(y.shape[0]) if j == i or sims[i][j] <= sims[i][i]]
            logits = 10.0 * F.cosine_similarity(x[i : i + 1], y[keep], dim=1)
            total += float(torch.logsumexp(logits, 0) - 10.0 * F.cosine_similarity(x[i], y[i], 0))
        return total / x.shape[0]

    forward = direction(a, p, guide_cosines(guide, cols[0], cols[1]))
    back = direction(p, a, guide_cosines(guide, cols[1], cols[0]))
    assert float(got) == pytest.approx((forward + back) / 2, rel=1e-5)


def test_cached_guide_equals_plain_guide(models):
    model, guide = models
    cols = columns(1)
    plain = HardNegativeLoss(model, "hcl", beta=0.5, guide=guide, guide_margin=0.05)
    cached = CachedHardNegativeLoss(
        model, "hcl", beta=0.5, guide=guide, guide_margin=0.05, mini_batch_size=3
    )
    assert_same(value_and_grads(model, cached, cols), value_and_grads(model, plain, cols))


def test_the_guide_runs_in_eval_mode_and_is_left_as_it_was(tmp_path, models):
    model, _ = models
    noisy = tiny_model(tmp_path, seed=4, dropout=0.5)
    noisy.train()
    loss = HardNegativeLoss(model, "infonce", guide=noisy)
    cols = columns(1)
    feats = [model.preprocess(c) for c in cols]
    first, second = (loss.guide_embed(feats[0]) for _ in range(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout in the verdict
    assert noisy.training


def test_guide_settings_in_the_model_card(models):
    model, guide = models
    loss = HardNegativeLoss(model, "hcl", guide=guide, guide_margin=0.1)
    config = loss.get_config_dict()
    assert config["guide_margin"] == 0.1 and config["guide_margin_strategy"] == "absolute"
    assert isinstance(config["guide"], str) and "tiny_bert_1" in config["guide"]
    assert "solatorio2024gistembed" in loss.citation and "robinson2021" in loss.citation
    assert "guide" not in HardNegativeLoss(model, "hcl").get_config_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guide_margin": 0.1}, "pass guide="),
        ({"guide_margin_strategy": "relative"}, "pass guide="),
        ({"guide": "all-MiniLM-L6-v2"}, "guide must be a SentenceTransformer"),
        ({"margin_strategy": "relative"}, "guide_margin_strategy"),
    ],
)
def test_guide_arguments_say_what_is_wrong(models, kwargs, message):
    model, _ = models
    with pytest.raises(ValueError, match=message):
        HardNegativeLoss(model, "infonce", **kwargs)


@pytest.mark.parametrize("kwargs", [{"guide_margin": -0.1}, {"guide_margin_strategy": "cosine"}])
def test_bad_guide_margins_are_refused(models, kwargs):
    model, guide = models
    with pytest.raises(ValueError, match="guide_margin"):
        HardNegativeLoss(model, "infonce", guide=guide, **kwargs)


# -- the core's false_negatives (no sentence model needed, but kept beside its only user) --------


@pytest.mark.parametrize(
    "name, hp",
    [
        ("infonce", {}),
        ("debiased", {"tau_plus": 0.1}),
        ("hcl", {"beta": 1.0, "tau_plus": 0.1}),
        ("ring", {"rho_out": 0.7, "rho_in": 0.2}),
        ("hardness", {"alpha": 5.0}),
        ("positive_aware", {"mode": "margin", "margin": 0.05}),
    ],
)
def test_false_negatives_equal_each_anchor_s_loss_over_its_kept_candidates(name, hp):
    """Masking candidates in the retrieval form equals, anchor by anchor, the loss whose
    negatives are the kept candidates alone (given as that anchor's own pool)."""
    gen = torch.Generator().manual_seed(0)
    n, h, d = 6, 2, 16
    a, p = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen)
    p = p.double()
    hard = torch.randn(n, h, d, generator=gen, dtype=torch.float64)
    cands = torch.cat([p, hard.reshape(-1, d)])
    mask = torch.rand(n, n * (1 + h), generator=gen) < 0.3
    mask[0, 0] = True  # marking the positive itself changes nothing: it stays the positive
    loss_fn = hardneg.create_loss(name, temperature=0.2, **hp)
    got = loss_fn(a, p, hard_negatives=hard, false_negatives=mask)
    # (one query at a time: the batch-size check, meant for in-batch negatives, is off)
    one = hardneg.create_loss(name, temperature=0.2, check_inputs=False, **hp)
    per_anchor = []
    for i in range(n):
        kept = [j for j in range(cands.shape[0]) if j != i and not mask[i, j]]
        per_anchor.append(one(a[i : i + 1], p[i : i + 1], negatives=cands[kept].unsqueeze(0)))
    torch.testing.assert_close(got, torch.stack(per_anchor).mean(), rtol=1e-7, atol=1e-9)
    assert not torch.allclose(got, loss_fn(a, p, hard_negatives=hard))


def test_guided_false_negatives_against_a_loop():
    gen = torch.Generator().manual_seed(1)
    a, c = torch.randn(5, 4, generator=gen), torch.randn(12, 4, generator=gen)
    c[:5] = a + 0.8 * torch.randn(5, 4, generator=gen)
    c[0] = -a[0]  # a positive the guide scores below 0: the relative margin reads |g+|
    for mode, margin in (("absolute", 0.0), ("absolute", 0.3), ("relative", 0.5)):
        got = guided_false_negatives(a, c, margin=margin, mode=mode)
        for i in range(5):
            g_pos = float(F.cosine_similarity(a[i], c[i], dim=0))
            slack = margin if mode == "absolute" else abs(g_pos) * margin
            for j in range(12):
                g = float(F.cosine_similarity(a[i], c[j], dim=0))
                if abs(g - (g_pos - slack)) > 1e-5:  # (not at the threshold: rounding)
                    assert bool(got[i, j]) == (j != i and g > g_pos - slack)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f, a, p, hn, m: f(a, p, false_negatives=m), "retrieval form"),
        (lambda f, a, p, hn, m: f(a, p, hard_negatives=hn, false_negatives=m.int()), "bool"),
        (lambda f, a, p, hn, m: f(a, p, hard_negatives=hn, false_negatives=m[:, :4]), r"\(4, 12\)"),
        (lambda f, a, p, hn, m: f(a, p, torch.randn(7, 8), false_negatives=m), "retrieval form"),
    ],
)
def test_false_negatives_say_what_is_wrong(call, message):
    f = hardneg.create_loss("hcl")
    a, p, hn = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2, 8)
    m = torch.zeros(4, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        call(f, a, p, hn, m)
