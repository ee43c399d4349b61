"""SimCLR with several positives per anchor: ``framework.views`` full-size views and
``framework.small_crops`` low-resolution crops (multi-crop) of each image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hardneg
from hardneg.config import load_config
from hardneg.frameworks import SimCLR
from hardneg.models import build_head
from hardneg.train import train
from hardneg.train.trainer import small_crop_size


class Pooled(nn.Module):
    """A conv and a global average pool: takes any image side, as the real backbones do."""

    def __init__(self) -> None:
        super().__init__()
        self.out_dim = 16
        self.conv = nn.Conv2d(1, 16, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def parts(loss="infonce", **hparams):
    torch.manual_seed(0)
    backbone = Pooled()
    head = build_head("simclr", 16, out_dim=8, hidden_dim=10)
    return backbone, head, hardneg.create_loss(loss, **hparams)


def test_every_view_and_small_crop_is_an_anchor_with_the_others_as_positives():
    backbone, head, loss = parts("hcl", beta=0.5)
    model = SimCLR(backbone, head, loss, views=3, small_crops=2)
    assert model.num_views == 5 and model.num_small_crops == 2
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(6, 1, 8, 8, generator=g) for _ in range(3)]
    views += [torch.randn(6, 1, 5, 5, generator=g) for _ in range(2)]
    out = model(views, index=torch.arange(6), progress=0.5)
    z = [head(backbone(x)) for x in views]
    want = loss(z[0], z[1], extra_views=z[2:], progress=0.5)
    torch.testing.assert_close(out.loss, want)
    assert out.embeddings.shape == (30, 8)
    # the small crops are positives: without them the loss is another one
    fewer = loss(z[0], z[1], extra_views=z[2:3], progress=0.5)
    assert abs(float(want.detach()) - float(fewer.detach())) > 1e-3
    with pytest.raises(ValueError, match="takes 5 views per image, got 2"):
        model(views[:2], index=torch.arange(6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"views": 1}, "views must be an integer >= 2"),
        ({"small_crops": -1}, "small_crops must be an integer >= 0"),
        ({"views": 2.5}, "views must be an integer"),
    ],
)
def test_bad_view_counts_are_refused(kwargs, message):
    backbone, head, loss = parts()
    with pytest.raises(ValueError, match=message):
        SimCLR(backbone, head, loss, **kwargs)


def test_a_strategy_that_reads_two_views_features_is_refused():
    backbone, head, loss = parts("unremix")
    with pytest.raises(ValueError, match="exactly two views"):
        SimCLR(backbone, head, loss, views=2, small_crops=1)


TINY = [
    "data.dataset=digits",
    "data.subset=32",
    "model.backbone=digits_cnn",
    "model.head_hidden=32",
    "model.out_dim=16",
    "train.batch_size=16",
    "train.epochs=2",
    "train.device=cpu",
    "train.threads=1",
    "eval.knn=false",
]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["framework.name=moco", "framework.views=3"], "apply to simclr only"),
        (["framework.name=memory_bank", "framework.small_crops=2"], "apply to simclr only"),
        (["data.dataset=mnist1d", "model.backbone=cnn1d", "framework.small_crops=2"], "signals"),
        (["loss.name=potential", "framework.views=3"], "exactly two views"),
        (["loss.name=unremix", "framework.small_crops=1"], "exactly two views"),
        (["framework.small_crops=1", "augment.small_scale_min=0.5"], "must be below"),
        (["framework.views=1"], "framework.views"),
        # hardneg compare runs every strategy: the refusal says how to leave this one out
        (["loss.name=unremix", "framework.views=3"], r"leave 'unremix' out of --strategies"),
        # small-crop settings without small crops were silently unused
        (["augment.small_size=6"], r"augment.small_size .* framework.small_crops > 0, got 0"),
        (["augment.small_scale_max=0.3"], r"augment.small_scale_max .* framework.small_crops"),
    ],
)
def test_view_settings_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [*TINY, *overrides])


def test_training_makes_the_views_and_small_crops_at_their_sizes(tmp_path, monkeypatch):
    seen: list[list[tuple[int, ...]]] = []
    forward = SimCLR.forward

    def spy(self, views, **kwargs):
        seen.append([tuple(v.shape) for v in views])
        return forward(self, views, **kwargs)

    monkeypatch.setattr(SimCLR, "forward", spy)
    config = load_config(
        None, [*TINY, "framework.views=3", "framework.small_crops=2", "augment.small_size=5"]
    )
    result = train(config, run_dir=tmp_path, progress_bar=False)
    assert seen and all(shapes == [(16, 1, 8, 8)] * 3 + [(16, 1, 5, 5)] * 2 for shapes in seen), (
        seen[0]
    )
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] != losses[1]
    saved = (tmp_path / "config.yaml").read_text()
    assert "small_crops: 2" in saved and "views: 3" in saved


def test_full_size_views_alone_train_on_signals(tmp_path):
    config = load_config(
        None,
        [
            *TINY,
            "data.dataset=mnist1d",
            "model.backbone=cnn1d",
            "framework.views=4",
        ],
    )
    result = train(config, run_dir=tmp_path, progress_bar=False)
    assert all(np.isfinite(row["loss"]) for row in result.history)


def test_the_small_crops_default_to_swav_s_ratio():
    config = load_config(None, [*TINY, "framework.small_crops=2"])
    assert small_crop_size(config, 32) == 14  # 96 / 224 of 32
    assert small_crop_size(config, 96) == 41
    assert small_crop_size(config, 8) == 4  # at least 4 px
    config = load_config(None, [*TINY, "framework.small_crops=2", "augment.small_size=6"])
    assert small_crop_size(config, 32) == 6


def solo_learn_multicrop(z: torch.Tensor, indexes: torch.Tensor, t: float) -> torch.Tensor:
    """solo-learn's SimCLR loss over several views (``solo/losses/simclr.py``), re-stated in
    float64 with explicit sums: ``-mean_i log(pos_i / (pos_i + neg_i))``."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    sim = torch.exp(z @ z.T / t)
    same = indexes.unsqueeze(0) == indexes.unsqueeze(1)
    pos = (sim * (same & ~torch.eye(len(z), dtype=torch.bool))).sum(1)
    neg = (sim * ~same).sum(1)
    return -torch.log(pos / (pos + neg)).mean()


@pytest.mark.parametrize("fast", [True, False])
def test_pooled_positives_equal_solo_learn_s_multicrop_loss(fast):
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    loss = hardneg.create_loss("infonce", temperature=0.2, positive_mode="pooled", fast=fast)
    got = loss(views[0], views[1], extra_views=views[2:])
    want = solo_learn_multicrop(torch.cat(views), torch.arange(5).repeat(4), 0.2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # with two views every mode is InfoNCE; with four they differ
    for mode in ("separate", "joint"):
        other = hardneg.create_loss("infonce", temperature=0.2, positive_mode=mode, fast=fast)
        assert abs(float(other(views[0], views[1], extra_views=views[2:])) - float(got)) > 1e-3
        two = other(views[0], views[1])
        torch.testing.assert_close(two, loss(views[0], views[1]), rtol=1e-10, atol=1e-12)


def test_pooled_is_supcon_s_l_in_less_the_log_of_the_number_of_positives():
    """SupCon's ``L_in`` (Khosla et al. 2020, Eq. 3), ``-log((1/|P|) sum_p e^{a_p} / Z)``, as a
    float64 loop: the pooled loss is it minus the constant ``log |P|`` (3 positives here)."""
    import math

    g = torch.Generator().manual_seed(6)
    views = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    t, n = 0.4, 3
    loss = hardneg.create_loss("infonce", temperature=t, positive_mode="pooled")
    got = float(loss(views[0], views[1], extra_views=views[2:]))
    z = torch.nn.functional.normalize(torch.cat(views), dim=1)
    total = 0.0
    for i in range(12):
        e = {j: math.exp(float(z[i] @ z[j]) / t) for j in range(12) if j != i}
        positives = [e[j] for j in e if j % n == i % n]
        total += -math.log(sum(positives) / len(positives) / sum(e.values()))
    assert got == pytest.approx(total / 12 - math.log(3), rel=1e-10)


def test_pooled_debiasing_uses_the_positives_mean_mass():
    """HCL's estimator with several pooled positives, as a float64 loop: ``Ng`` from the
    tilted negatives minus ``tau_plus M`` times the positives' mean ``e^{a}``, clamped."""
    import math

    g = torch.Generator().manual_seed(4)
    views = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    t, beta, tau = 0.5, 0.8, 0.1
    loss = hardneg.create_loss(
        "hcl", temperature=t, beta=beta, tau_plus=tau, positive_mode="pooled"
    )
    got = float(loss(views[0], views[1], extra_views=views[2:]))
    z = torch.nn.functional.normalize(torch.cat(views), dim=1)
    n, total = 4, 0.0
    for i in range(12):
        positives = [j for j in range(12) if j != i and j % n == i % n]
        negatives = [j for j in range(12) if j % n != i % n]
        s = lambda j, i=i: float(z[i] @ z[j]) / t  # noqa: E731
        pos = [math.exp(s(j)) for j in positives]
        tilt = [math.exp(beta * s(j)) for j in negatives]
        mass = sum(w * math.exp(s(j)) for w, j in zip(tilt, negatives)) / (sum(tilt) / len(tilt))
        m = len(negatives)
        ng = max((mass - tau * m * sum(pos) / len(pos)) / (1 - tau), m * math.exp(-1 / t))
        total += math.log(sum(pos) + ng) - math.log(sum(pos))
    assert got == pytest.approx(total / 12, rel=1e-10)


def test_a_resumed_multicrop_run_is_bit_exact(tmp_path, monkeypatch):
    """The small crops draw from the augmentation generator after the views: a run cut after
    its first epoch and resumed ends with the weights and losses of the uninterrupted run."""
    from _crash import CrashAt, boom

    from hardneg.train.checkpoint import load_checkpoint

    overrides = [*TINY, "framework.views=3", "framework.small_crops=2", "loss.name=hcl"]
    full = train(load_config(None, overrides), run_dir=tmp_path / "full", progress_bar=False)
    with monkeypatch.context() as patch:
        CrashAt(patch, at=3, action=boom)  # epoch 0 (steps 0-1) is checkpointed, then a crash
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(load_config(None, overrides), run_dir=tmp_path / "cut", progress_bar=False)
    resumed = train(
        load_config(None, overrides), run_dir=tmp_path / "cut", progress_bar=False, resume=True
    )
    a, b = (load_checkpoint(r.checkpoint)["model"] for r in (full, resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
