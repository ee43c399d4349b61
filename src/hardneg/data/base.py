"""In-memory datasets and their static descriptions.

Every data set is loaded once into one :class:`ArrayDataset`: images as ``uint8`` tensors
``[N, C, H, W]`` (augmented later, batched, on the training device), 1-D signals as ``float32``
tensors ``[N, 1, L]``. There is no per-sample ``__getitem__`` work; training code indexes the
tensors with a batch of indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class DatasetFormatError(ValueError):
    """A dataset file exists but is corrupt, truncated or inconsistent (names the file)."""


@dataclass
class ArrayDataset:
    """A whole split held in memory.

    inputs: ``uint8 [N, C, H, W]`` for ``kind == "image"``, ``float32 [N, 1, L]`` for
    ``kind == "signal"``. labels: ``int64 [N]``, ``-1`` for unlabeled samples (STL-10's
    unlabeled split).
    """

    inputs: Tensor
    labels: Tensor
    num_classes: int
    kind: str
    name: str
    split: str = ""
    classes: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("image", "signal"):
            raise ValueError(f"ArrayDataset.kind must be 'image' or 'signal', got {self.kind!r}")
        if self.kind == "image":
            if self.inputs.dtype != torch.uint8 or self.inputs.ndim != 4:
                raise ValueError(
                    f"{self.name}: image inputs must be uint8 [N, C, H, W], got "
                    f"{self.inputs.dtype} {tuple(self.inputs.shape)}"
                )
        else:
            if self.inputs.dtype != torch.float32 or self.inputs.ndim != 3:
                raise ValueError(
                    f"{self.name}: signal inputs must be float32 [N, 1, L], got "
                    f"{self.inputs.dtype} {tuple(self.inputs.shape)}"
                )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(f"{self.name}: labels must be int64 [N], got {self.labels.dtype}")
        if self.labels.shape[0] != self.inputs.shape[0]:
            raise ValueError(
                f"{self.name}: {self.inputs.shape[0]} inputs but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def image_size(self) -> int:
        """Spatial size (images: H, assumed square; signals: length L)."""
        return int(self.inputs.shape[-1])

    @property
    def in_channels(self) -> int:
        return int(self.inputs.shape[1])

    def subset(self, index: Tensor | slice | list[int]) -> ArrayDataset:
        """A new dataset with ``inputs[index]`` and ``labels[index]`` (views where possible)."""
        return ArrayDataset(
            inputs=self.inputs[index],
            labels=self.labels[index],
            num_classes=self.num_classes,
            kind=self.kind,
            name=self.name,
            split=self.split,
            classes=self.classes,
        )


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without loading it.

    image_size is the native side length (signal length for 1-D data); ``None`` (imagefolder)
    means "known only after loading". ``pretrain_split`` is the split used for self-supervised
    training, ``eval_train_split``/``eval_test_split`` those of the kNN / linear evaluation.
    """

    name: str
    kind: str
    image_size: int | None
    in_channels: int
    num_classes: int | None
    pretrain_split: str
    eval_train_split: str
    eval_test_split: str
    splits: tuple[str, ...] = ("train", "test")
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


# Normalisation statistics. CIFAR-10's are the values of the HCL / DCL code (joshr17/HCL,
# chingyaoc/DCL), which use them for STL-10 as well; the others are the usual per-dataset values.
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2023, 0.1994, 0.2010)

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10",
        "image",
        32,
        3,
        10,
        "train",
        "train",
        "test",
        mean=_CIFAR10_MEAN,
        std=_CIFAR10_STD,
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        "image",
        32,
        3,
        100,
        "train",
        "train",
        "test",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    "stl10": DatasetInfo(
        "stl10",
        "image",
        96,
        3,
        10,
        "train+unlabeled",
        "train",
        "test",
        splits=("train", "test", "unlabeled", "train+unlabeled"),
        mean=_CIFAR10_MEAN,
        std=_CIFAR10_STD,
    ),
    "tiny-imagenet": DatasetInfo(
        "tiny-imagenet",
        "image",
        64,
        3,
        200,
        "train",
        "train",
        "test",
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262),
    ),
    "imagefolder": DatasetInfo(
        "imagefolder",
        "image",
        None,
        3,
        None,
        "train",
        "train",
        "test",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
    "mnist1d": DatasetInfo(
        "mnist1d",
        "signal",
        40,
        1,
        10,
        "train",
        "train",
        "test",
        mean=(0.0,),
        std=(1.0,),
    ),
    "digits": DatasetInfo(
        "digits",
        "image",
        8,
        1,
        10,
        "train",
        "train",
        "test",
        mean=(0.3053,),
        std=(0.3759,),
    ),
}

ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "stl-10": "stl10",
    "tinyimagenet": "tiny-imagenet",
    "tiny_imagenet": "tiny-imagenet",
    "tiny-imagenet-200": "tiny-imagenet",
    "image_folder": "imagefolder",
    "mnist-1d": "mnist1d",
    "mnist_1d": "mnist1d",
}


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {name!r}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Static description of dataset ``name`` (see :class:`DatasetInfo`)."""
    return DATASETS[canonical_name(name)]


def list_datasets() -> list[str]:
    return sorted(DATASETS)
