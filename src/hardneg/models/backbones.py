"""Encoders: ResNet-18/50 (torchvision, random init) with the right stem, and two small CNNs
for the built-in datasets. Every backbone has an int ``out_dim`` and maps a batch to
``[B, out_dim]`` features (the input of the projection head; kNN/linear evaluation uses them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier (``fc = Identity``).

    ``image_size <= 32``: CIFAR stem (3x3 conv, stride 1, no max-pool), as in SimCLR's CIFAR
    experiments and the HCL code; larger images: the standard 7x7/2 conv + 3x3/2 max-pool.
    ``cifar_stem`` forces either.
    """

    def __init__(
        self,
        depth: str = "resnet18",
        in_channels: int = 3,
        image_size: int = 32,
        cifar_stem: bool | None = None,
    ) -> None:
        super().__init__()
        import torchvision

        ctor = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
        net = ctor[depth](weights=None)
        self.cifar_stem = (image_size <= 32) if cifar_stem is None else bool(cifar_stem)
        if self.cifar_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.out_dim = int(net.fc.in_features)
        net.fc = nn.Identity()
        self.net = net
        self.in_channels = in_channels
        self.image_size = image_size

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_bn(conv: nn.Module, channels: int, dims: int) -> list[nn.Module]:
    bn = nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    return [conv, bn, nn.ReLU(inplace=True)]


class CNN1d(nn.Module):
    """Small 1-D CNN for mnist1d (signals ``[B, C, L]``), fast on a CPU.

    Four conv-BN-ReLU layers (kernel 5, channels 32-64-128-``width``, strides 1-2-2-1) then
    global average *and* max pooling (concatenated) and a linear layer to ``out_dim``.
    """

    def __init__(self, in_channels: int = 1, out_dim: int = 128, width: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = [in_channels, 32, 64, 128, width]
        strides = [1, 2, 2, 1]
        for cin, cout, s in zip(chans[:-1], chans[1:], strides):
            layers += _conv_bn(nn.Conv1d(cin, cout, 5, stride=s, padding=2, bias=False), cout, 1)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * width, out_dim)
        self.out_dim = int(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x.unsqueeze(1)
        h = self.features(x)
        return self.fc(torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=1))


class DigitsCNN(nn.Module):
    """Small 2-D CNN for the 8x8 digits: 3x3 convs 32-64(stride 2)-128, global average pool."""

    def __init__(self, in_channels: int = 1, out_dim: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), 32, 2),
            *_conv_bn(nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), 64, 2),
            *_conv_bn(nn.Conv2d(64, out_dim, 3, padding=1, bias=False), out_dim, 2),
        )
        self.out_dim = int(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


BACKBONES = ("resnet18", "resnet50", "cnn1d", "digits_cnn")


def build_backbone(name: str, in_channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """Backbone ``name`` for inputs with ``in_channels`` channels and side ``image_size``
    (signal length for cnn1d). Extra keywords go to the class (e.g. ``cifar_stem=False``,
    ``out_dim=256`` for the small CNNs)."""
    if not isinstance(name, str) or name.lower() not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    name = name.lower()
    if isinstance(in_channels, bool) or int(in_channels) != in_channels or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if image_size is not None and (
        isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if name in ("resnet18", "resnet50"):
        return ResNetBackbone(name, int(in_channels), int(image_size or 32), **kwargs)
    if name == "cnn1d":
        return CNN1d(int(in_channels), **kwargs)
    return DigitsCNN(int(in_channels), **kwargs)
