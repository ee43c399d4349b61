"""Encoders and heads.

>>> import torch
>>> from hardneg.models import build_backbone, build_head
>>> f = build_backbone("resnet18", in_channels=3, image_size=32)
>>> g = build_head("simclr", f.out_dim)
>>> z, h = g(f(torch.randn(2, 3, 32, 32)), return_hidden=True)
>>> tuple(z.shape), tuple(h.shape)
((2, 128), (2, 512))
"""

from hardneg.models.backbones import (
    BACKBONES,
    CNN1d,
    DigitsCNN,
    ResNetBackbone,
    build_backbone,
)
from hardneg.models.heads import (
    HEADS,
    IdentityHead,
    ProjectionHead,
    build_head,
    build_predictor,
)

__all__ = [
    "BACKBONES",
    "CNN1d",
    "DigitsCNN",
    "HEADS",
    "IdentityHead",
    "ProjectionHead",
    "ResNetBackbone",
    "build_backbone",
    "build_head",
    "build_predictor",
]
