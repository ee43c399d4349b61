"""Batched, on-device data augmentation (no per-image PIL work in the training loop).

>>> import torch
>>> from hardneg.augment import build_augmentation
>>> aug = build_augmentation("cifar10")
>>> x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
>>> v1, v2 = aug(x), aug(x)
>>> v1.shape, v1.dtype
(torch.Size([4, 3, 32, 32]), torch.float32)
"""

from hardneg.augment.build import RECIPES, build_augmentation, build_eval_transform
from hardneg.augment.image import EvalTransform, ImageAugmentation, Normalize
from hardneg.augment.signal import SignalAugmentation, SignalEvalTransform

__all__ = [
    "RECIPES",
    "EvalTransform",
    "ImageAugmentation",
    "Normalize",
    "SignalAugmentation",
    "SignalEvalTransform",
    "build_augmentation",
    "build_eval_transform",
]
