"""Augmentation recipes per dataset.

``recipe="simclr"`` (default), SimCLR (Chen et al. 2020) as commonly used per dataset:

* cifar10 / cifar100: ``RandomResizedCrop(32, scale=(0.08, 1))``, flip p=0.5,
  ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` p=0.8, grayscale p=0.2, no blur (SimCLR's CIFAR setting).
* stl10 (96 px), tiny-imagenet (64 px): the same plus Gaussian blur p=0.5, kernel 10% of the
  side (odd), sigma U(0.1, 2) - SimCLR's ImageNet-size recipe with CIFAR's jitter strength.
* imagefolder: SimCLR's ImageNet recipe, jitter (0.8, 0.8, 0.8, 0.2), blur p=0.5.

``recipe="hcl"``: exactly the transform of the HCL / DCL image code (joshr17/HCL
``image/utils.py``), used there for CIFAR-10, CIFAR-100 *and STL-10*: ``RandomResizedCrop(32)``
(so STL-10 is trained at 32 px and evaluated on the full 96 px images), flip, jitter
(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, OpenCV Gaussian blur with kernel
``int(0.1 * 32) = 3``, sigma U(0.1, 2), p=0.5; CIFAR-10 normalisation statistics.

``recipe="mocov2"``: MoCo v2's (Chen, Fan, Girshick, He 2020, "Improved Baselines"), for every
image size: ``RandomResizedCrop(scale=(0.2, 1))`` (SimCLR's crops go down to 8%), flip,
jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, Gaussian blur sigma U(0.1, 2) p=0.5 (kernel:
10% of the side, odd; the MoCo code blurs with PIL, untruncated); the dataset's normalisation.

Small built-in datasets (any recipe):

* digits (8x8, 1 channel): crop scale (0.5, 1), ratio (0.8, 1.25), rotation +-15 degrees
  (black fill), no flip, brightness/contrast jitter 0.4 p=0.8, pixel noise std 0.05.
* mnist1d (signals): crop+resize scale (0.8, 1), shift +-4 samples, amplitude U(0.8, 1.2),
  Gaussian noise std 0.1, correlated noise std 0.3 (see :mod:`hardneg.augment.signal`).

Any keyword of :class:`~hardneg.augment.image.ImageAugmentation` /
:class:`~hardneg.augment.signal.SignalAugmentation` can be overridden, e.g.
``build_augmentation("cifar10", scale=(0.2, 1.0))``.
"""

from __future__ import annotations

import inspect

from torch import nn

from hardneg.augment.image import EvalTransform, ImageAugmentation
from hardneg.augment.signal import SignalAugmentation, SignalEvalTransform
from hardneg.data.base import canonical_name, dataset_info

RECIPES = ("simclr", "hcl", "mocov2")

_CIFAR_JITTER = (0.4, 0.4, 0.4, 0.1)


def _recipe_kwargs(name: str, recipe: str) -> dict:
    if name == "digits":
        return dict(
            scale=(0.5, 1.0),
            ratio=(0.8, 1.25),
            flip_p=0.0,
            rotation=15.0,
            jitter=(0.4, 0.4, 0.0, 0.0),
            jitter_p=0.8,
            gray_p=0.0,
            blur_p=0.0,
            noise_std=0.05,
            padding_mode="zeros",
        )
    if recipe == "hcl":
        return dict(
            size=32,
            scale=(0.08, 1.0),
            flip_p=0.5,
            jitter=_CIFAR_JITTER,
            jitter_p=0.8,
            gray_p=0.2,
            blur_p=0.5,
            blur_kernel=3,
            blur_sigma=(0.1, 2.0),
            mean=dataset_info("cifar10").mean,
            std=dataset_info("cifar10").std,
        )
    base = dict(scale=(0.08, 1.0), flip_p=0.5, jitter=_CIFAR_JITTER, jitter_p=0.8, gray_p=0.2)
    if recipe == "mocov2":
        return dict(base, scale=(0.2, 1.0), blur_p=0.5, blur_sigma=(0.1, 2.0))
    if name in ("cifar10", "cifar100"):
        return dict(base, blur_p=0.0)
    if name in ("stl10", "tiny-imagenet"):
        return dict(base, blur_p=0.5, blur_sigma=(0.1, 2.0))
    # imagefolder: ImageNet recipe
    return dict(base, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, blur_sigma=(0.1, 2.0))


def _check_overrides(cls, overrides: dict) -> None:
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"unknown augmentation option(s) {', '.join(unknown)} for {cls.__name__}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def build_augmentation(
    dataset_name: str, image_size: int | None = None, recipe: str = "simclr", **overrides
) -> nn.Module:
    """The training augmentation for ``dataset_name``: ``aug(x, generator=None)`` -> one
    normalised float32 view with per-sample random parameters, on ``x``'s device.

    ``image_size``: output side (signal length for mnist1d); ``None`` = the recipe's size, else
    the input's own size.
    """
    name = canonical_name(dataset_name)
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    info = dataset_info(name)
    if info.kind == "signal":
        _check_overrides(SignalAugmentation, overrides)
        kw = dict(length=image_size, mean=info.mean[0], std=info.std[0])
        kw.update(overrides)
        return SignalAugmentation(**kw)
    kw = dict(size=None, mean=info.mean, std=info.std)
    kw.update(_recipe_kwargs(name, recipe))
    if image_size is not None:
        kw["size"] = image_size
    _check_overrides(ImageAugmentation, overrides)
    kw.update(overrides)
    size = kw.pop("size")
    mean = kw.pop("mean")
    std = kw.pop("std")
    return ImageAugmentation(size, mean, std, **kw)


def build_eval_transform(
    dataset_name: str, image_size: int | None = None, recipe: str = "simclr"
) -> nn.Module:
    """Deterministic evaluation transform: uint8 -> normalised float (resized to
    ``image_size`` when given; ``None`` keeps the native size, as the HCL code does)."""
    name = canonical_name(dataset_name)
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    info = dataset_info(name)
    if info.kind == "signal":
        return SignalEvalTransform(info.mean[0], info.std[0])
    if recipe == "hcl" and name != "digits":
        stats = dataset_info("cifar10")
        return EvalTransform(image_size, stats.mean, stats.std)
    return EvalTransform(image_size, info.mean, info.std)
