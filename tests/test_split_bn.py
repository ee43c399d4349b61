"""Split batch norm (MoCo's per-GPU BN in one process) and its wiring into MoCo."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hardneg
from hardneg.config import load_config
from hardneg.frameworks import MoCo
from hardneg.frameworks.split_bn import SplitBatchNorm1d, SplitBatchNorm2d, split_batch_norm_
from hardneg.models import build_head


def reference_groups(layer: nn.Module, x: torch.Tensor, splits: int):
    """Each group of contiguous rows through its own copy of the plain ``layer``, in float64:
    ``(output, mean of the copies' running mean, ... running var)``."""
    outs, means, variances = [], [], []
    for group in x.double().chunk(splits):
        twin = copy.deepcopy(layer).double().train()
        outs.append(twin(group))
        means.append(twin.running_mean)
        variances.append(twin.running_var)
    return torch.cat(outs), torch.stack(means).mean(0), torch.stack(variances).mean(0)


@pytest.mark.parametrize(
    "make, shape",
    [(lambda: nn.BatchNorm2d(3), (8, 3, 5, 4)), (lambda: nn.BatchNorm1d(6), (12, 6))],
)
def test_each_group_of_rows_is_normalised_by_its_own_statistics(make, shape):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.normal_()
        layer.running_mean.normal_()
    x = torch.randn(shape) * 3 + torch.arange(shape[0]).view(-1, *[1] * (len(shape) - 1))
    x.requires_grad_(True)
    plain = copy.deepcopy(layer)
    split_batch_norm_(layer, 4)
    assert isinstance(layer, (SplitBatchNorm1d, SplitBatchNorm2d))
    want, want_mean, want_var = reference_groups(plain, x.detach(), 4)
    got = layer(x)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean.double(), want_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), want_var, atol=1e-6, rtol=1e-6)
    assert int(layer.num_batches_tracked) == 1
    # gradients: those of the groups' own BN
    w = torch.randn(shape, dtype=torch.float64)
    (got.double() * w).sum().backward()
    xd = x.detach().double().requires_grad_(True)
    twin = copy.deepcopy(plain).double().train()
    ref = torch.cat([copy.deepcopy(twin)(g) for g in xd.chunk(4)])
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-5, rtol=1e-5)
    # whole-batch BN differs (the test can tell the two apart)
    assert not torch.allclose(plain.train()(x.detach()), got.detach(), atol=1e-3)
    # eval mode: the plain layer with the running statistics
    layer.eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x.detach()), plain.eval()(x.detach()))


def test_split_layers_keep_their_state_dict_and_refuse_uneven_batches():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    keys = list(model.state_dict())
    params = list(model.parameters())
    split_batch_norm_(model, 2)
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)
    ).load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="a batch of 5 rows does not divide into 2 groups"):
        model(torch.randn(5, 3, 6, 6))
    with pytest.raises(ValueError, match="splits must be a positive integer, got 0"):
        split_batch_norm_(model, 0)


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out_dim = 16
        self.fc = nn.Linear(12, 16)

    def forward(self, x):
        return self.fc(x)


def test_moco_with_split_bn_computes_each_key_in_a_shuffled_group():
    torch.manual_seed(0)
    backbone, head = Flat(), build_head("simclr", 16, out_dim=8, hidden_dim=10)  # BN1d inside
    plain_head = copy.deepcopy(head)
    model = MoCo(backbone, head, hardneg.create_loss("infonce"), out_dim=8, queue_size=16,
                 bn_splits=2)  # fmt: skip
    assert isinstance(model.key_head.hidden[1], SplitBatchNorm1d)
    assert isinstance(model.head.hidden[1], SplitBatchNorm1d)
    x = torch.randn(8, 12)
    keys, _ = model.key(x, torch.Generator().manual_seed(3))
    # the expectation: the same permutation, each half of it through a plain-BN key encoder
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    want = torch.empty(8, 8)
    for group in perm.chunk(2):
        twin_head = copy.deepcopy(plain_head).train()
        want[group] = twin_head(backbone(x[group])).detach()
    torch.testing.assert_close(keys, want, atol=1e-5, rtol=1e-5)
    # without shuffle_bn the groups are the batch's own halves (no permutation)
    model.shuffle_bn = False
    keys, _ = model.key(x, torch.Generator().manual_seed(3))
    halves = torch.cat([copy.deepcopy(plain_head).train()(backbone(h)) for h in x.chunk(2)])
    torch.testing.assert_close(keys, halves.detach(), atol=1e-5, rtol=1e-5)


def test_bn_splits_is_checked_in_the_config():
    base = ["data.dataset=digits", "framework.name=moco", "train.batch_size=32"]
    assert load_config(None, [*base, "framework.bn_splits=8"]).framework.bn_splits == 8
    with pytest.raises(ValueError, match=r"framework.bn_splits=6 must divide train.batch_size=32"):
        load_config(None, [*base, "framework.bn_splits=6"])
    with pytest.raises(ValueError, match="bn_splits=32 leaves fewer than 2 rows per batch-norm"):
        load_config(None, [*base, "framework.bn_splits=32"])
    with pytest.raises(ValueError, match="bn_splits=8 and train.sync_bn=true contradict"):
        load_config(None, [*base, "framework.bn_splits=8", "train.sync_bn=true"])
    with pytest.raises(ValueError, match="framework.bn_splits applies to moco only"):
        load_config(None, [*base, "framework.name=simclr", "framework.bn_splits=2"])


@pytest.mark.parametrize("world, per_process", [(1, 8), (2, 4), (8, 1), (16, 1), (3, None)])
def test_bn_splits_counts_groups_of_the_global_batch(world, per_process, monkeypatch):
    import hardneg.frameworks as frameworks
    from hardneg.models import build_backbone

    config = load_config(
        None, ["data.dataset=digits", "framework.name=moco", "framework.bn_splits=8"]
    )
    monkeypatch.setattr(frameworks, "get_world_size", lambda: world)
    backbone = build_backbone("digits_cnn", in_channels=1, image_size=8)
    head = build_head("simclr", backbone.out_dim, out_dim=8)
    loss = hardneg.create_loss("infonce")
    if per_process is None:
        with pytest.raises(ValueError, match="must be a multiple of the number of processes"):
            frameworks.build_framework(config, backbone, head, loss, 100)
        return
    model = frameworks.build_framework(config, backbone, head, loss, 100)
    assert model.bn_splits == per_process
    layers = [m for m in model.modules() if isinstance(m, (SplitBatchNorm1d, SplitBatchNorm2d))]
    assert layers and {m.splits for m in layers} == {per_process}
