"""Backbones (stems, shapes, out_dim) and heads (structure, return_hidden)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hardneg.models import ProjectionHead, build_backbone, build_head, build_predictor


def test_resnet18_cifar_stem():
    f = build_backbone("resnet18", 3, 32)
    assert f.out_dim == 512
    conv = f.net.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert isinstance(f.net.maxpool, nn.Identity) and isinstance(f.net.fc, nn.Identity)
    assert f(torch.randn(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize("size", [64, 96])
def test_resnet18_standard_stem(size):
    f = build_backbone("resnet18", 3, size)
    assert f.net.conv1.kernel_size == (7, 7) and f.net.conv1.stride == (2, 2)
    assert isinstance(f.net.maxpool, nn.MaxPool2d)
    assert f(torch.randn(2, 3, size, size)).shape == (2, 512)


def test_resnet50_and_channels():
    f = build_backbone("resnet50", 1, 16)
    assert f.out_dim == 2048 and f.net.conv1.in_channels == 1
    f.eval()
    assert f(torch.randn(1, 1, 16, 16)).shape == (1, 2048)
    assert build_backbone("resnet18", 1, 96).net.conv1.in_channels == 1
    assert not build_backbone("resnet18", 3, 32, cifar_stem=False).cifar_stem


def test_small_cnns():
    f = build_backbone("cnn1d", 1, 40)
    y = f(torch.randn(5, 1, 40))
    assert y.shape == (5, f.out_dim) and 128 <= f.out_dim <= 256
    y.sum().backward()
    assert all(p.grad is not None for p in f.parameters())
    assert build_backbone("cnn1d", 1, 40, out_dim=256)(torch.randn(2, 1, 33)).shape == (2, 256)
    g = build_backbone("digits_cnn", 1, 8)
    assert g(torch.randn(5, 1, 8, 8)).shape == (5, g.out_dim)


def test_backbone_errors():
    with pytest.raises(ValueError, match="unknown backbone 'vit'"):
        build_backbone("vit", 3, 32)
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("resnet18", 0, 32)


def _linears(head):
    return [m for m in head.modules() if isinstance(m, nn.Linear)]


def _bns(head):
    return [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]


def test_simclr_head_structure():
    head = build_head("simclr", 2048, 128)
    lin = _linears(head)
    assert [(m.in_features, m.out_features) for m in lin] == [(2048, 512), (512, 128)]
    assert lin[0].bias is None and lin[1].bias is not None and len(_bns(head)) == 1
    z, h = head(torch.randn(4, 2048), return_hidden=True)
    assert z.shape == (4, 128) and h.shape == (4, 512) and (h >= 0).all()


def test_moco_v2_head_structure():
    head = build_head("moco_v2", 512, 128)
    lin = _linears(head)
    assert [(m.in_features, m.out_features) for m in lin] == [(512, 512), (512, 128)]
    assert not _bns(head) and all(m.bias is not None for m in lin)


def test_linear_head_is_one_linear_layer_and_h_is_its_input():
    head = build_head("linear", 512, 128)
    lin = _linears(head)
    assert len(lin) == 1 and lin[0].in_features == 512 and lin[0].out_features == 128
    assert lin[0].bias is not None and not _bns(head)
    x = torch.randn(4, 512)
    z, h = head(x, return_hidden=True)
    assert torch.equal(h, x) and torch.allclose(z, x @ lin[0].weight.T + lin[0].bias)


def test_psm_head_structure():
    # the PSM code's projector: _build_mlp(2, 512, 512, 128) with its default last_bn=True
    head = build_head("psm", 512)
    lin = _linears(head)
    assert [(m.in_features, m.out_features) for m in lin] == [(512, 512), (512, 128)]
    assert all(m.bias is None for m in lin)
    assert _layer_types(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    bns = _bns(head)
    assert len(bns) == 2 and bns[-1].affine is False and bns[0].affine is True
    head.train()
    z = head(torch.randn(16, 512))
    assert torch.allclose(z.mean(0), torch.zeros(128), atol=1e-5)  # last BN, no affine
    assert [m.out_features for m in _linears(build_head("psm", 64, 32, 48))] == [48, 32]


def _layer_types(module):
    leaves = [m for m in module.modules() if not list(m.children())]
    return [type(m) for m in leaves if not isinstance(m, nn.Identity)]


def test_return_hidden_is_input_of_last_linear():
    head = ProjectionHead(32, (16, 8), 4)
    seen = {}
    head.last.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0]))
    z, h = head(torch.randn(3, 32), return_hidden=True)
    assert torch.equal(h, seen["in"]) and h.shape == (3, 8)
    assert torch.equal(
        head.eval()(torch.ones(2, 32)), head(torch.ones(2, 32), return_hidden=True)[0]
    )


def test_predictor_and_errors():
    p = build_predictor(128, 512)
    assert p(torch.randn(4, 128)).shape == (4, 128)
    assert [(m.in_features, m.out_features) for m in _linears(p)] == [(128, 512), (512, 128)]
    assert build_head("none", 64)(torch.ones(2, 64), return_hidden=True)[1].shape == (2, 64)
    with pytest.raises(ValueError, match="unknown head 'byol'"):
        build_head("byol", 512)
    with pytest.raises(ValueError, match="positive integers"):
        ProjectionHead(0, 16, 4)
    with pytest.raises(ValueError, match="last_bn must be true or false, got 'yes'"):
        build_predictor(128, 512, last_bn="yes")


def test_predictor_default_is_the_psm_layout():
    # Linear(bias=False)-BN-ReLU-Linear(bias=False)-BN(affine=False), as PSM's _build_mlp
    p = build_predictor(8, 16)
    assert _layer_types(p) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert all(m.bias is None for m in _linears(p))
    assert [bn.affine for bn in _bns(p)] == [True, False]
    out = p.train()(torch.randn(32, 8))
    assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(out.var(0, unbiased=False), torch.ones(8), atol=1e-3)


def test_predictor_without_last_bn():
    p = build_predictor(8, 16, last_bn=False)
    assert _layer_types(p) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [m.bias is None for m in _linears(p)] == [True, False]
    assert len(_bns(p)) == 1
