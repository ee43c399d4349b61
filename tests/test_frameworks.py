"""Frameworks: what each one feeds the loss, and how its state (queue, bank, momentum encoder)
evolves. Tiny linear encoders on random data; the trainer tests run the real models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hardneg
from hardneg.frameworks import MemoryBank, MoCo, SimCLR
from hardneg.frameworks.base import StepOutput
from hardneg.models import build_head, build_predictor

# the potential loss is being ported to the new core (strategies/potential.py); its framework
# tests run again as soon as it is registered
needs_potential = pytest.mark.skipif(
    "potential" not in hardneg.list_losses(), reason="potential is not registered yet"
)


class Flat(nn.Module):
    """A linear backbone with the ``out_dim`` attribute the frameworks expect."""

    def __init__(self, in_dim: int = 12, out_dim: int = 16) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.fc(x.flatten(1))


def parts(loss="infonce", **hparams):
    torch.manual_seed(0)
    backbone = Flat()
    head = build_head("simclr", backbone.out_dim, out_dim=8, hidden_dim=10)
    return backbone, head, hardneg.create_loss(loss, **hparams)


def views(b=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 12, generator=g), torch.randn(b, 12, generator=g)]


def step(model, b=6, diagnostics=False):
    return model(
        views(b)[: model.num_views],
        index=torch.arange(b),
        labels=torch.arange(b) % 3,
        progress=0.5,
        generator=torch.Generator().manual_seed(2),
        diagnostics=diagnostics,
    )


def test_simclr_is_the_loss_on_both_views_projections():
    backbone, head, loss = parts("hcl")
    model = SimCLR(backbone, head, loss)
    out = step(model)
    x1, x2 = views()
    z1, z2 = head(backbone(x1)), head(backbone(x2))
    assert torch.allclose(out.loss, loss(z1, z2, progress=0.5))
    assert out.embeddings.shape == (12, 8) and not out.embeddings.requires_grad


def test_simclr_gives_the_hidden_features_to_a_strategy_that_asks_for_them():
    backbone, head, loss = parts("unremix")
    assert loss.feature_kind == "hidden"
    out = step(SimCLR(backbone, head, loss))
    x1, x2 = views()
    z1, h1 = head(backbone(x1), return_hidden=True)
    z2, h2 = head(backbone(x2), return_hidden=True)
    assert torch.allclose(out.loss, loss(z1, z2, h1=h1, h2=h2, progress=0.5))
    assert (out.loss - loss(z1, z2, progress=0.5)).abs() > 1e-5  # the features matter


class SpyLoss(nn.Module):
    """A loss that records what the framework passed; it declares what it needs."""

    def __init__(self, feature_kind=None, draws=False):
        super().__init__()
        self.feature_kind, self.draws = feature_kind, draws
        self.calls = []

    def forward(self, z1, z2, negatives=None, **kwargs):
        self.calls.append(dict(kwargs, z1=z1, negatives=negatives))
        return (z1 * z2).sum()


def spy_model(framework, loss, predictor=False):
    backbone, head, _ = parts()
    if framework == "simclr":
        return SimCLR(backbone, head, loss)
    if framework == "moco":
        pred = build_predictor(dim=8, hidden=12) if predictor else None
        return MoCo(backbone, head, loss, out_dim=8, queue_size=16, predictor=pred)
    return MemoryBank(backbone, head, loss, dataset_size=20, out_dim=8, negatives=5)


@pytest.mark.parametrize("framework", ["simclr", "moco", "memory_bank"])
def test_a_framework_passes_only_what_the_loss_asks_for(framework):
    plain = SpyLoss()
    step(spy_model(framework, plain))
    (call,) = plain.calls
    assert not {"h1", "h2", "negative_h", "generator"} & set(call)
    assert call["progress"] == 0.5

    drawing = SpyLoss(draws=True)
    step(spy_model(framework, drawing))
    assert isinstance(drawing.calls[0]["generator"], torch.Generator)

    hidden = SpyLoss("hidden")
    model = spy_model(framework, hidden)
    step(model)
    (call,) = hidden.calls
    assert call["h1"].shape == (6, 10) and not call["h1"].requires_grad  # head's hidden width
    if framework == "simclr":
        assert call["h2"].shape == (6, 10)
    if framework == "moco":
        assert call["negative_h"] is model.queue_hidden and model.queue_hidden.shape == (16, 10)
    elif framework == "memory_bank":
        # per-anchor draws (the spy scores per-anchor columns): the loss takes no negative_h
        assert "negative_h" not in call and model.bank_hidden.shape == (20, 10)
    else:
        assert "negative_h" not in call

    projection = SpyLoss("projection")
    step(spy_model(framework, projection))
    (call,) = projection.calls
    assert call["h1"] is call["z1"]  # no predictor: the projection is the query itself


def test_moco_with_a_predictor_gives_the_projection_before_it():
    loss = SpyLoss("projection")
    model = spy_model("moco", loss, predictor=True)
    step(model)
    (call,) = loss.calls
    x1, _ = views()
    p1 = model.head(model.backbone(x1))
    assert torch.allclose(call["h1"], p1) and call["h1"].requires_grad
    assert torch.allclose(call["z1"], model.predictor(p1))


def test_a_framework_rejects_an_unknown_feature_kind():
    with pytest.raises(ValueError, match="feature_kind"):
        SimCLR(*parts()[:2], SpyLoss("logits"))


def test_labels_reach_the_loss_only_on_diagnostics_steps():
    backbone, head, loss = parts("hcl")
    model = SimCLR(backbone, head, loss)
    plain, with_diag = step(model), step(model, diagnostics=True)
    assert plain.diagnostics is None
    assert with_diag.diagnostics is not None
    assert with_diag.diagnostics.false_negative_mass is not None
    # labels never change the loss (a diagnostics step takes the plain path, not the fast one:
    # equal to rounding)
    assert torch.allclose(plain.loss, with_diag.loss, rtol=0, atol=1e-6)


def test_moco_queries_against_the_queue_with_detached_keys():
    backbone, head, loss = parts("infonce", temperature=0.2)
    model = MoCo(backbone, head, loss, out_dim=8, momentum=0.9, queue_size=16)
    queue = model.queue.clone()
    out = step(model)
    x1, x2 = views()
    q = head(backbone(x1))
    with torch.no_grad():
        k = model.key_head(model.key_backbone(x2))
    assert torch.allclose(out.loss, loss(q, k, negatives=queue), atol=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in model.key_backbone.parameters())
    assert backbone.fc.weight.grad is not None


def test_moco_momentum_update_is_an_ema_of_the_query_encoder():
    backbone, head, loss = parts()
    model = MoCo(backbone, head, loss, out_dim=8, momentum=0.9, queue_size=16)
    with torch.no_grad():
        backbone.fc.weight.add_(1.0)
    before = model.key_backbone.fc.weight.clone()
    step(model)
    expected = 0.9 * before + 0.1 * backbone.fc.weight
    assert torch.allclose(model.key_backbone.fc.weight, expected)


def test_moco_enqueues_after_the_step_and_wraps_around():
    backbone, head, loss = parts()
    model = MoCo(backbone, head, loss, out_dim=8, queue_size=10)
    out = step(model, b=6)
    queue = model.queue.clone()
    assert torch.equal(queue, model.queue)  # forward alone does not touch the queue
    model.commit(out)
    keys = F.normalize(out.pending["keys"], dim=1)
    assert torch.allclose(model.queue[:6], keys)
    assert torch.equal(model.queue_labels[:6], torch.arange(6) % 3)
    assert int(model.queue_ptr) == 6
    out = step(model, b=6)
    model.commit(out)
    keys = F.normalize(out.pending["keys"], dim=1)
    assert torch.allclose(model.queue[[6, 7, 8, 9, 0, 1]], keys)
    assert int(model.queue_ptr) == 2


def test_symmetric_moco_averages_both_directions_and_enqueues_as_asked():
    backbone, head, loss = parts()
    both = MoCo(backbone, head, loss, out_dim=8, queue_size=32, symmetric=True, enqueue="both")
    out = step(both)
    assert out.pending["keys"].shape == (12, 8)
    x1, x2 = views()
    q1, q2 = head(backbone(x1)), head(backbone(x2))
    with torch.no_grad():
        k1 = both.key_head(both.key_backbone(x1))
        k2 = both.key_head(both.key_backbone(x2))
    expected = (loss(q1, k2, negatives=both.queue) + loss(q2, k1, negatives=both.queue)) / 2
    assert torch.allclose(out.loss, expected, atol=1e-6)
    second = MoCo(*parts(), out_dim=8, queue_size=32, symmetric=True, enqueue="second")
    assert step(second).pending["keys"].shape == (6, 8)


def psm_model(loss):
    backbone, head, _ = parts()
    predictor = build_predictor(dim=8, hidden=12)
    model = MoCo(
        backbone,
        head,
        loss,
        out_dim=8,
        queue_size=32,
        symmetric=True,
        predictor=predictor,
        enqueue="second",
    )
    return model, backbone, head, predictor


@needs_potential
def test_psm_set_up_applies_the_predictor_to_the_queries():
    model, _, _, predictor = psm_model(parts("potential")[2])
    out = step(model)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in predictor.parameters() if p.requires_grad)


@needs_potential
def test_psm_soft_weights_use_the_projections_before_the_predictor():
    loss = hardneg.create_loss("potential", weighting="soft", num_neighbors=3)
    model, backbone, head, predictor = psm_model(loss)
    assert model.feature_kind == "projection"
    queue = model.queue.clone()
    out = step(model)
    x1, x2 = views()
    p1, p2 = head(backbone(x1)), head(backbone(x2))  # online projections, before the predictor
    q1, q2 = predictor(p1), predictor(p2)
    with torch.no_grad():
        k1 = model.key_head(model.key_backbone(x1))
        k2 = model.key_head(model.key_backbone(x2))

    def hand(**kw1):
        g = torch.Generator().manual_seed(2)  # the generator step() passes
        one = loss(q1, k2, negatives=queue, generator=g, progress=0.5, **kw1)
        kw2 = {"h1": p2} if kw1 else {}
        two = loss(q2, k1, negatives=queue, generator=g, progress=0.5, **kw2)
        return (one + two) / 2

    expected, without = hand(h1=p1), hand()
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert (out.loss - without).abs() > 1e-4  # soft weights from q itself differ
    out.loss.backward()
    assert backbone.fc.weight.grad is not None


@needs_potential
def test_potential_hard_weighting_ignores_the_projection_in_moco():
    loss = hardneg.create_loss("potential", weighting="hard", num_neighbors=3)
    model, backbone, head, predictor = psm_model(loss)
    queue = model.queue.clone()
    out = step(model)
    x1, x2 = views()
    q1, q2 = predictor(head(backbone(x1))), predictor(head(backbone(x2)))
    with torch.no_grad():
        k1 = model.key_head(model.key_backbone(x1))
        k2 = model.key_head(model.key_backbone(x2))
    g = torch.Generator().manual_seed(2)
    expected = (
        loss(q1, k2, negatives=queue, generator=g) + loss(q2, k1, negatives=queue, generator=g)
    ) / 2
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_unremix_in_moco_keeps_a_queue_of_hidden_features():
    backbone, head, loss = parts("unremix")
    model = MoCo(backbone, head, loss, out_dim=8, queue_size=16)  # asked by loss.feature_kind
    assert model.queue_hidden.shape == (16, 10)
    out = step(model)
    model.commit(out)
    assert model.queue_hidden[:6].abs().sum() > 0
    assert "queue_hidden" in model.state_dict()
    plain = MoCo(*parts(), out_dim=8, queue_size=16)
    assert "queue_hidden" not in plain.state_dict()


def test_memory_bank_update_and_positive_are_the_images_entry():
    backbone, head, loss = parts("infonce", temperature=0.07)
    model = MemoryBank(
        backbone, head, loss, dataset_size=20, out_dim=8, momentum=0.5, negatives="all"
    )
    bank = model.bank.clone()
    out = step(model)
    (x,) = views()[:1]
    q = head(backbone(x))
    index = torch.arange(6)
    expected = loss(q, bank[index], negatives=bank, exclude_index=index)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    model.commit(out)
    mixed = F.normalize(0.5 * bank[index] + 0.5 * F.normalize(q.detach(), dim=1), dim=1)
    assert torch.allclose(model.bank[index], mixed, atol=1e-6)
    assert torch.equal(model.bank[6:], bank[6:])
    assert torch.equal(model.bank_labels[:6], torch.arange(6) % 3)


def test_memory_bank_draws_negatives_with_the_given_generator():
    backbone, head, loss = parts()
    model = MemoryBank(backbone, head, loss, dataset_size=50, out_dim=8, negatives=7)
    a, b = step(model), step(model)
    assert torch.equal(a.loss, b.loss)  # same generator seed, same draw
    assert model.num_views == 1


def manual_infonce(q, k, negatives, t):
    """``[N]`` InfoNCE of each query against its own rows ``negatives [N, K, d]``, by hand."""
    q, k, negatives = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(negatives, dim=2)
    pos = (q * k).sum(dim=1) / t
    neg = torch.einsum("nd,nkd->nk", q, negatives) / t
    return torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos


def test_plain_ir_draws_its_noise_per_anchor_as_the_authors_nce():
    backbone, head, loss = parts("infonce", temperature=0.07)
    model = MemoryBank(backbone, head, loss, dataset_size=50, out_dim=8, negatives=7)
    bank = model.bank.clone()
    out = step(model)
    draw = torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(2))
    assert not all(torch.equal(draw[0], row) for row in draw[1:])  # each anchor its own rows
    (x,) = views()[:1]
    q = head(backbone(x))
    expected = manual_infonce(q, bank[:6], bank[draw], 0.07).mean()
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # the batch sharing one draw is another loss
    shared = MemoryBank(*parts("infonce", temperature=0.07), dataset_size=50, out_dim=8,
                        negatives=7, draws="shared")  # fmt: skip
    out_shared = step(shared)
    row = torch.randint(0, 50, (7,), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out_shared.loss, loss(q, bank[:6], negatives=bank[row]), atol=1e-6)
    assert (out.loss - out_shared.loss).abs() > 1e-4
    with pytest.raises(ValueError, match="draws"):
        MemoryBank(*parts(), dataset_size=50, out_dim=8, draws="per_batch")


def test_a_strategy_that_scores_shared_columns_gets_a_shared_bank_draw():
    backbone, head, loss = parts("unremix")
    assert not loss.per_anchor_columns
    model = MemoryBank(backbone, head, loss, dataset_size=50, out_dim=8, negatives=7)
    assert model.draws == "shared" and torch.isfinite(step(model).loss)
    assert MemoryBank(*parts(), dataset_size=50, out_dim=8, negatives=7).draws == "per_anchor"
    forced = MemoryBank(*parts("unremix"), dataset_size=50, out_dim=8, negatives=7,
                        draws="per_anchor")  # fmt: skip
    with pytest.raises(ValueError, match="shared columns"):
        step(forced)


def test_per_anchor_pool_is_each_querys_own_infonce_and_has_diagnostics():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(5, 8, generator=g, requires_grad=True), torch.randn(5, 8, generator=g)
    pool = torch.randn(5, 6, 8, generator=g)
    loss = hardneg.create_loss("infonce", temperature=0.3)
    value = loss(q, k, negatives=pool)
    assert torch.allclose(value, manual_infonce(q, k, pool, 0.3).mean(), atol=1e-6)
    value.backward()
    assert q.grad is not None
    labels, pool_labels = torch.arange(5), torch.arange(30).reshape(5, 6) % 5
    out = loss(q, k, negatives=pool, labels=labels, negative_labels=pool_labels,
               return_diagnostics=True)  # fmt: skip
    same = (pool_labels == labels[:, None]).float()
    assert torch.allclose(out.diagnostics.false_negative_mass, same.mean(dim=1))  # uniform
    for name in ("hcl", "ring"):
        assert torch.isfinite(hardneg.create_loss(name)(q, k, negatives=pool)), name
    with pytest.raises(ValueError, match="exclude_index"):
        loss(q, k, negatives=pool, exclude_index=torch.arange(5))
    with pytest.raises(ValueError, match="N = 5"):
        loss(q, k, negatives=pool[:4])


def test_framework_state_lives_in_the_state_dict():
    moco = MoCo(*parts(), out_dim=8, queue_size=16)
    keys = moco.state_dict().keys()
    assert {"queue", "queue_labels", "queue_ptr"} <= set(keys)
    assert any(k.startswith("key_backbone.") for k in keys)
    bank = MemoryBank(*parts(), dataset_size=20, out_dim=8)
    assert {"bank", "bank_labels"} <= set(bank.state_dict())


@pytest.mark.parametrize("negatives", [0, "some"])
def test_memory_bank_rejects_bad_negative_counts(negatives):
    with pytest.raises(ValueError, match="positive integer or 'all'"):
        MemoryBank(*parts(), dataset_size=20, out_dim=8, negatives=negatives)


def _built(*overrides):
    from hardneg.config import load_config
    from hardneg.frameworks import build_framework

    if "potential" not in hardneg.list_losses():  # until the port lands: the same layout
        overrides = ("loss={name: infonce, temperature: 0.2}", *overrides)
    config = load_config("cifar10_moco_potential", list(overrides))
    backbone = Flat()
    head = build_head(config.model.head, backbone.out_dim, config.model.out_dim)
    loss = hardneg.create_loss(config.loss.name, **config.loss.params)
    return build_framework(config, backbone, head, loss, dataset_size=64)


def test_packaged_psm_config_builds_the_authors_layout():
    model = _built()
    bns = [m for m in model.predictor.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [bn.affine for bn in bns] == [True, False]  # predictor ends with BN(affine=False)
    assert all(m.bias is None for m in model.predictor.modules() if isinstance(m, nn.Linear))
    assert len([m for m in model.head.modules() if isinstance(m, nn.Linear)]) == 2
    assert model.shuffle_bn  # auto: shuffle-BN (a no-op in one process)
    old = _built("model.predictor_last_bn=false")
    assert len([m for m in old.predictor.modules() if isinstance(m, nn.BatchNorm1d)]) == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), True),
        (("train.sync_bn=true",), False),  # auto: SyncBN already gives global statistics
        (("framework.shuffle_bn=false",), False),
        (("framework.shuffle_bn=true", "train.sync_bn=true"), True),
    ],
)
def test_shuffle_bn_auto_resolution(overrides, expected):
    assert _built(*overrides).shuffle_bn is expected


@needs_potential
def test_packaged_psm_config_gives_potential_the_projections_before_the_predictor():
    model = _built()
    assert model.feature_kind == "projection" and model.predictor is not None


def test_shuffle_bn_is_a_no_op_in_one_process():
    model_a = MoCo(*parts(), out_dim=8, queue_size=16, shuffle_bn=True)
    model_b = MoCo(*parts(), out_dim=8, queue_size=16, shuffle_bn=False)
    a, b = step(model_a), step(model_b)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.pending["keys"], b.pending["keys"])


class Recording(nn.Module):
    """A real loss that records the keyword arguments of every call (what the framework feeds)."""

    def __init__(self, name="infonce", **hparams):
        super().__init__()
        self.inner = hardneg.create_loss(name, **hparams)
        self.calls = []

    # what a framework asks a loss: hidden features and the generator are always wanted here
    feature_kind = "hidden"
    draws = True

    @property
    def per_anchor_columns(self):
        return self.inner.per_anchor_columns

    def forward(self, z1, z2, negatives=None, **kwargs):
        self.calls.append(dict(kwargs, z1=z1, z2=z2, negatives=negatives))
        return self.inner(z1, z2, negatives=negatives, **kwargs)


def test_memory_bank_feeds_the_loss_everything_it_needs():
    backbone, head, _ = parts()
    loss = Recording()
    model = MemoryBank(
        backbone, head, loss, dataset_size=20, out_dim=8, momentum=0.5, negatives="all"
    )
    bank = model.bank.clone()
    assert torch.allclose(bank.norm(dim=1), torch.ones(20))  # unit rows at the start
    assert torch.equal(model.bank_labels, torch.full((20,), -1))  # no label known yet
    generator = torch.Generator().manual_seed(2)
    (x,) = views()[:1]
    out = model([x], index=torch.arange(6), labels=torch.arange(6) % 3, progress=0.25,
                generator=generator, diagnostics=True)  # fmt: skip
    (call,) = loss.calls
    _, h = head(backbone(x), return_hidden=True)
    assert call["progress"] == 0.25 and call["generator"] is generator
    assert torch.allclose(call["h1"], h) and call["return_diagnostics"] is True
    assert torch.equal(call["labels"], torch.arange(6) % 3)
    assert call["negative_labels"] is model.bank_labels and call["negatives"] is model.bank
    assert torch.equal(call["exclude_index"], torch.arange(6))
    assert torch.equal(call["z2"], bank[:6])
    assert out.diagnostics is not None and out.diagnostics.false_negative_mass is not None
    plain = model([x], index=torch.arange(6), progress=0.25, generator=generator)
    assert plain.diagnostics is None and "labels" not in loss.calls[-1]


def test_unremix_in_a_memory_bank_scores_the_entries_with_their_stored_hidden_features():
    backbone, head, loss = parts("unremix")
    model = MemoryBank(backbone, head, loss, dataset_size=20, out_dim=8, momentum=0.25,
                       negatives=7)  # fmt: skip
    assert model.draws == "shared" and model.bank_hidden.shape == (20, 10)
    assert torch.equal(model.bank_hidden, torch.zeros(20, 10))
    x1, x2 = views()
    idx1, idx2 = torch.arange(6), torch.arange(6, 12)
    model.commit(model([x1], index=idx1, generator=torch.Generator().manual_seed(3)))
    # bank_hidden[idx] <- m * bank_hidden[idx] + (1 - m) * h, from zeros
    _, h1 = head(backbone(x1), return_hidden=True)
    torch.testing.assert_close(model.bank_hidden[idx1], 0.75 * h1.detach())
    assert torch.equal(model.bank_hidden[6:], torch.zeros(14, 10))
    model.commit(model([x2], index=idx2, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(model.bank_hidden[idx1], 0.75 * h1.detach())  # untouched

    # the next step: the loss scores the drawn rows with their stored hidden features
    bank, bank_hidden = model.bank.clone(), model.bank_hidden.clone()
    out = model([x1], index=idx1, generator=torch.Generator().manual_seed(5))
    draw = torch.randint(0, 20, (7,), generator=torch.Generator().manual_seed(5))
    assert len(set(draw.tolist()) & set(range(12))) >= 3  # some drawn rows were written
    z, h = head(backbone(x1), return_hidden=True)
    expected = loss(z, bank[idx1], negatives=bank[draw], h1=h.detach(),
                    negative_h=bank_hidden[draw])  # fmt: skip
    torch.testing.assert_close(out.loss, expected)
    without = loss(z, bank[idx1], negatives=bank[draw], h1=h.detach())
    assert (out.loss - without).abs() > 1e-5  # the stored features matter
    model.commit(out)  # a rewrite mixes the stored features with the new ones
    torch.testing.assert_close(
        model.bank_hidden[idx1], 0.25 * bank_hidden[idx1] + 0.75 * h.detach()
    )


def test_the_hidden_width_is_read_on_the_heads_device():
    # a model built on an accelerator: the probe must run where the head's weights are ('meta'
    # stands in for a GPU here: a CPU probe against its weights fails the same way)
    from hardneg.frameworks.base import hidden_dim

    head = build_head("simclr", 16, out_dim=8, hidden_dim=10).to("meta")
    assert hidden_dim(head, Flat()) == 10
    assert head.training  # the head's mode is put back


def test_unremix_in_a_memory_bank_with_every_entry_gets_the_whole_hidden_bank():
    backbone, head, _ = parts()
    loss = Recording("unremix")
    model = MemoryBank(backbone, head, loss, dataset_size=20, out_dim=8, negatives="all")
    model([views()[0]], index=torch.arange(6))
    assert loss.calls[-1]["negative_h"] is model.bank_hidden
    assert model.bank_hidden.shape == (20, 10)
    # a loss that asks for no hidden features: no second bank, nothing in the checkpoint
    plain = MemoryBank(*parts(), dataset_size=20, out_dim=8, negatives="all")
    assert plain.bank_hidden is None and "bank_hidden" not in plain.state_dict()


def test_a_memory_bank_checkpoint_without_hidden_features_still_resumes():
    backbone, head, loss = parts("unremix")
    model = MemoryBank(backbone, head, loss, dataset_size=20, out_dim=8, negatives=7)
    model.commit(model([views()[0]], index=torch.arange(6)))
    state = {k: v for k, v in model.state_dict().items() if k != "bank_hidden"}  # older format
    fresh = MemoryBank(*parts("unremix"), dataset_size=20, out_dim=8, negatives=7)
    fresh.bank_hidden.fill_(1.0)
    with pytest.warns(UserWarning, match="start from zeros"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.bank, model.bank)
    assert torch.equal(fresh.bank_hidden, torch.zeros(20, 10))
    fresh.load_state_dict(model.state_dict())  # the current format: no warning needed
    assert torch.equal(fresh.bank_hidden, model.bank_hidden)


def test_memory_bank_draws_its_negatives_from_the_whole_bank_with_the_generator():
    backbone, head, _ = parts()
    loss = Recording()
    model = MemoryBank(backbone, head, loss, dataset_size=50, out_dim=8, negatives=300)
    (x,) = views()[:1]
    model([x], index=torch.arange(6), generator=torch.Generator().manual_seed(5))
    drawn = loss.calls[-1]["negatives"]
    # each anchor its own 300 rows (IR's NCE noise), from the given generator
    expected = torch.randint(0, 50, (6, 300), generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, model.bank[expected])
    assert loss.calls[-1].get("exclude_index") is None
    # 300 uniform draws over 50 rows reach the first and the last rows
    assert int(expected.min()) == 0 and int(expected.max()) == 49


@pytest.mark.parametrize("dataset_size", [1])
def test_memory_bank_with_every_negative_needs_two_images(dataset_size):
    with pytest.raises(
        ValueError, match="^a memory bank with negatives='all' needs at least 2 images$"
    ):
        MemoryBank(*parts(), dataset_size=dataset_size, out_dim=8, negatives="all")
    MemoryBank(*parts(), dataset_size=2, out_dim=8, negatives="all")
    MemoryBank(*parts(), dataset_size=1, out_dim=8, negatives=1)  # drawn negatives: fine


def test_memory_bank_default_momentum_is_irs():
    model = MemoryBank(*parts(), dataset_size=20, out_dim=8)
    assert model.momentum == 0.5 and model.negatives == 4096


def test_moco_feeds_the_loss_everything_it_needs():
    backbone, head, _ = parts()
    loss = Recording("unremix")
    model = MoCo(backbone, head, loss, out_dim=8, queue_size=16, symmetric=True)
    generator = torch.Generator().manual_seed(2)
    x1, x2 = views()
    out = model([x1, x2], index=torch.arange(6), labels=torch.arange(6) % 3, progress=0.75,
                generator=generator, diagnostics=True)  # fmt: skip
    first, second = loss.calls
    for call, xq in ((first, x1), (second, x2)):
        _, h = head(backbone(xq), return_hidden=True)
        assert call["progress"] == 0.75 and call["generator"] is generator
        assert torch.allclose(call["h1"], h)
        assert call["negative_h"] is model.queue_hidden
        assert call["negatives"] is model.queue
    # labels (analysis only) go with the diagnostics, of the first direction only
    assert torch.equal(first["labels"], torch.arange(6) % 3)
    assert first["negative_labels"] is model.queue_labels
    assert first["return_diagnostics"] is True and "return_diagnostics" not in second
    assert "labels" not in second
    assert out.diagnostics is not None
    assert torch.equal(out.pending["labels"], torch.cat([torch.arange(6) % 3] * 2))


# ------------------------------------------------- MoCo: state, enqueue order, shuffle-BN wiring


def test_moco_defaults_and_initial_state():
    backbone, head, loss = parts()
    model = MoCo(backbone, head, loss, out_dim=8)
    assert model.momentum == 0.99 and model.symmetric is False and model.enqueue == "both"
    assert model.shuffle_bn is True and model.predictor is None
    assert model.queue.shape == (4096, 8) and model.queue.dtype == torch.float32
    # random unit rows (MoCo's initial queue), not all the same
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(4096))
    assert model.queue.std(dim=0).min() > 0.1
    assert model.queue_labels.dtype == torch.long
    assert torch.equal(model.queue_labels, torch.full((4096,), -1))
    assert model.queue_ptr.dtype == torch.long and model.queue_ptr.shape == ()
    assert int(model.queue_ptr) == 0 and model.queue_hidden is None
    # the key encoder starts as a frozen copy of the query encoder
    for key, query in ((model.key_backbone, backbone), (model.key_head, head)):
        for k, q in zip(key.parameters(), query.parameters()):
            assert torch.equal(k, q) and not k.requires_grad and q.requires_grad


@pytest.mark.parametrize("training", [True, False])
def test_moco_reads_the_hidden_width_without_changing_the_heads_mode(training):
    backbone, head, loss = parts("unremix")
    head.train(training)
    model = MoCo(backbone, head, loss, out_dim=8, queue_size=16)
    assert head.training is training
    assert model.queue_hidden.shape == (16, 10) and model.queue_hidden.dtype == torch.float32
    assert torch.equal(model.queue_hidden, torch.zeros(16, 10))  # nothing queued yet


def _keys(model, x):
    with torch.no_grad():
        return model.key_head(model.key_backbone(x), return_hidden=True)


def test_symmetric_moco_enqueues_view_1_keys_then_view_2_keys():
    backbone, head, loss = parts("unremix")
    model = MoCo(backbone, head, loss, out_dim=8, queue_size=32, symmetric=True, enqueue="both")
    out = step(model)
    x1, x2 = views()
    (k1, kh1), (k2, kh2) = _keys(model, x1), _keys(model, x2)
    torch.testing.assert_close(out.pending["keys"], torch.cat([k1, k2]))
    torch.testing.assert_close(out.pending["hidden"], torch.cat([kh1, kh2]))
    assert torch.equal(out.pending["labels"], torch.cat([torch.arange(6) % 3] * 2))
    # the embeddings of the step are the queries of both directions, detached
    q1, q2 = head(backbone(x1)), head(backbone(x2))
    torch.testing.assert_close(out.embeddings, torch.cat([q1, q2]).detach())
    assert not out.embeddings.requires_grad

    second = MoCo(*parts("unremix"), out_dim=8, queue_size=32, symmetric=True, enqueue="second")
    out = step(second)
    (k2, kh2) = _keys(second, views()[1])
    torch.testing.assert_close(out.pending["keys"], k2)
    torch.testing.assert_close(out.pending["hidden"], kh2)
    assert torch.equal(out.pending["labels"], torch.arange(6) % 3)


def test_moco_commit_of_more_keys_than_the_queue_keeps_the_newest():
    backbone, head, loss = parts("unremix")
    model = MoCo(backbone, head, loss, out_dim=8, queue_size=8, symmetric=True, enqueue="both")
    out = step(model)  # 12 keys for 8 slots
    model.commit(out)
    newest = F.normalize(out.pending["keys"][4:], dim=1)
    torch.testing.assert_close(model.queue, newest)
    assert torch.equal(model.queue_labels, out.pending["labels"][4:])
    torch.testing.assert_close(model.queue_hidden, out.pending["hidden"][4:])
    assert int(model.queue_ptr) == 0


def test_moco_commit_without_labels_forgets_the_labels_of_the_slots_it_writes():
    model = MoCo(*parts(), out_dim=8, queue_size=10)
    model.commit(step(model))  # labelled keys in slots 0..5
    assert torch.equal(model.queue_labels[:6], torch.arange(6) % 3)
    x1, x2 = views()
    out = model([x1, x2], index=torch.arange(6))  # no labels
    assert "labels" not in out.pending
    assert out.diagnostics is None  # diagnostics only when asked for
    model.commit(out)  # slots 6..9, 0, 1
    assert torch.equal(model.queue_labels, torch.tensor([-1, -1, 2, 0, 1, 2, -1, -1, -1, -1]))
    assert int(model.queue_ptr) == 2


def test_moco_commit_normalises_half_precision_keys_in_float32():
    model = MoCo(*parts(), out_dim=8, queue_size=10)
    keys = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 7
    model.commit(StepOutput(torch.zeros(()), keys, pending={"keys": keys}))
    assert model.queue.dtype == torch.float32
    assert torch.equal(model.queue[:4], F.normalize(keys.float(), dim=1))


@pytest.mark.parametrize("shuffle_bn", [True, False])
def test_moco_shuffle_bn_shuffles_the_key_batch_with_the_step_generator_and_restores_its_order(
    monkeypatch, shuffle_bn
):
    """In one process shuffle-BN does nothing; a stand-in for the multi-process shuffle (a real
    permutation, its inverse as ``restore``) shows the wiring: each key batch is shuffled with the
    step's generator and both the keys and their hidden features come back in batch order."""
    import hardneg.frameworks.moco as moco_module

    calls = []

    def fake_shuffle(x, generator=None):
        calls.append(generator)
        perm = torch.tensor([3, 0, 5, 1, 4, 2])
        return x[perm], torch.argsort(perm)

    monkeypatch.setattr(moco_module, "shuffle_batch", fake_shuffle)
    backbone, head, loss = parts("unremix")
    head.eval()  # per-row outputs: the order of the rows cannot change them
    model = MoCo(backbone, head, loss, out_dim=8, queue_size=32, symmetric=True,
                 shuffle_bn=shuffle_bn)  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    x1, x2 = views()
    out = model([x1, x2], index=torch.arange(6), generator=generator)
    assert calls == ([generator, generator] if shuffle_bn else [])
    (k1, kh1), (k2, kh2) = _keys(model, x1), _keys(model, x2)
    torch.testing.assert_close(out.pending["keys"], torch.cat([k1, k2]))
    torch.testing.assert_close(out.pending["hidden"], torch.cat([kh1, kh2]))


@pytest.mark.parametrize("predictor", [False, True])
def test_moco_gathers_the_queries_once_when_they_are_the_projections_the_loss_asks_for(
    monkeypatch, predictor
):
    """Without a predictor the queries are the projections: the loss's ``h1`` is the gathered
    queries, not a second all-gather of the same rows (one collective per direction saved under
    ``torchrun``); with a predictor the projections before it are gathered separately."""
    import hardneg.frameworks.base as base_module
    import hardneg.frameworks.moco as moco_module

    gathered = []

    def counting_gather(x, **kwargs):
        gathered.append(x)
        return x

    monkeypatch.setattr(moco_module, "gather_with_grad", counting_gather)
    monkeypatch.setattr(base_module, "gather_with_grad", counting_gather)
    loss = SpyLoss("projection")
    model = spy_model("moco", loss, predictor=predictor)
    step(model)
    assert len(gathered) == (2 if predictor else 1)
