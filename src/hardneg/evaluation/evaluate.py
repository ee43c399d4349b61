"""Evaluate a trained backbone (or a checkpoint) with the weighted kNN and a linear probe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from hardneg.evaluation.features import extract_features
from hardneg.evaluation.knn import weighted_knn
from hardneg.evaluation.linear import linear_probe


@dataclass
class Evaluation:
    """Metrics (percent) plus the test features, kept for plots such as t-SNE."""

    metrics: dict[str, float | int | str]
    test_features: Tensor = field(repr=False)
    test_labels: Tensor = field(repr=False)


def evaluate_backbone(
    backbone: nn.Module,
    dataset: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    recipe: str = "simclr",
    knn_k: int = 200,
    knn_t: float = 0.1,
    linear: bool = True,
    batch_size: int = 512,
    device: str | torch.device | None = "auto",
    seed: int = 0,
) -> Evaluation:
    """kNN (and linear) accuracy of ``backbone`` on ``dataset``'s evaluation splits.

    The splits are those the papers use, from ``hardneg.data.dataset_info(dataset)``
    (``eval_train_split`` / ``eval_test_split``; e.g. STL-10 evaluates on its labelled ``train``
    split even when pre-training used ``train+unlabeled``). Unlabelled rows (label -1) are dropped.
    ``image_size`` and ``recipe`` select the deterministic eval transform the training run used.
    """
    from hardneg.augment import build_eval_transform
    from hardneg.data import dataset_info, decode_size, load_dataset
    from hardneg.train.runtime import select_device

    device = select_device(str(device or "auto"))
    info = dataset_info(dataset)
    size = decode_size(dataset, image_size)  # imagefolder images may differ in size
    train = load_dataset(
        dataset, info.eval_train_split, data_dir=data_dir, download=download, image_size=size
    )
    test = load_dataset(
        dataset, info.eval_test_split, data_dir=data_dir, download=download, image_size=size
    )
    if not bool((train.labels >= 0).all()):
        train = train.subset(train.labels >= 0)
    transform = build_eval_transform(dataset, image_size, recipe).to(device)
    backbone = backbone.to(device)
    train_f, train_y = extract_features(backbone, train, transform, batch_size, device)
    test_f, test_y = extract_features(backbone, test, transform, batch_size, device)
    num_classes = train.num_classes

    knn = weighted_knn(
        train_f.to(device),
        train_y.to(device),
        test_f.to(device),
        test_y.to(device),
        k=knn_k,
        temperature=knn_t,
        num_classes=num_classes,
    )
    metrics: dict[str, float | int | str] = {
        "dataset": dataset,
        "train_split": info.eval_train_split,
        "test_split": info.eval_test_split,
        "train_size": int(train_y.shape[0]),
        "test_size": int(test_y.shape[0]),
        "feature_dim": int(train_f.shape[1]),
        "knn_k": min(knn_k, int(train_y.shape[0])),
        "knn_t": knn_t,
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
    }
    if linear:
        probe = linear_probe(
            train_f, train_y, test_f, test_y, num_classes=num_classes, seed=seed, device=device
        )
        metrics.update(linear_top1=probe["top1"], linear_top5=probe["top5"])
    return Evaluation(metrics=metrics, test_features=test_f, test_labels=test_y)


def check_backbone_reads(config: dict, dataset: str) -> None:
    """Refuse, in one line, a data set whose inputs the checkpoint's backbone cannot read: a
    CIFAR ResNet on mnist1d's 1-D signals or 1-channel digits stopped in a convolution with a
    shape error. Transfer between image sets of the same channels (CIFAR-10 to STL-10) is
    fine: the backbone reads the kind and channels of the set it was trained on."""
    from hardneg.data import dataset_info

    trained_on = (config.get("data") or {}).get("dataset")
    if not trained_on or trained_on == dataset:
        return
    have, want = dataset_info(trained_on), dataset_info(dataset)
    if (have.kind, have.in_channels) != (want.kind, want.in_channels):

        def what(info) -> str:
            return "1-D signals" if info.kind == "signal" else f"{info.in_channels}-channel images"

        backbone = (config.get("model") or {}).get("backbone")
        raise ValueError(
            f"the checkpoint's backbone ({backbone}) was trained on {trained_on!r}, "
            f"{what(have)}: it cannot read {dataset!r}, {what(want)}"
        )


def evaluate_checkpoint(
    ckpt_path: str | Path,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    *,
    image_size: int | None = None,
    knn_k: int | None = None,
    knn_t: float | None = None,
    linear: bool = True,
    batch_size: int = 512,
    device: str | torch.device | None = "auto",
    download: bool = False,
    seed: int = 0,
    return_features: bool = False,
) -> dict:
    """Rebuild the backbone of a training checkpoint and evaluate it.

    Args:
        ckpt_path: a checkpoint written by ``hardneg train`` (``checkpoints/final.pt``).
        dataset: data set to evaluate on; defaults to the one the checkpoint was trained on.
        data_dir: where that data set lives; defaults to the training config's ``data.data_dir``
            when ``dataset`` is the training one, else to the library default (that folder may
            be another data set's own).
        image_size: side the images are evaluated at; None: the training config's
            ``data.image_size`` (an imagefolder of mixed sizes needs one).
        knn_k, knn_t: weighted-kNN neighbours and temperature; None: the checkpoint's
            ``eval.knn_k`` / ``eval.knn_temperature`` (what its training monitor and
            ``hardneg compare`` used), else Wu et al.'s 200 and 0.1.
        linear: also train the linear probe.
        return_features: add ``"test_features"`` / ``"test_labels"`` tensors to the result.

    Returns:
        ``{"knn_top1", "knn_top5", "linear_top1", "linear_top5", "dataset", ...}`` (percent).
    """
    from hardneg.train import load_backbone

    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    backbone, config = load_backbone(ckpt_path)
    data_cfg = dict(config.get("data") or {})
    dataset = dataset or data_cfg.get("dataset")
    if not dataset:
        raise ValueError(f"{ckpt_path}: the checkpoint names no data set; pass dataset=...")
    if data_dir is None and dataset == data_cfg.get("dataset"):
        data_dir = data_cfg.get("data_dir")
    check_backbone_reads(config, dataset)
    eval_cfg = dict(config.get("eval") or {})
    knn_k = int(eval_cfg.get("knn_k", 200)) if knn_k is None else knn_k
    knn_t = float(eval_cfg.get("knn_temperature", 0.1)) if knn_t is None else knn_t
    result = evaluate_backbone(
        backbone,
        dataset,
        data_dir=data_dir,
        download=download,
        image_size=data_cfg.get("image_size") if image_size is None else image_size,
        recipe=(config.get("augment") or {}).get("recipe", "simclr"),
        knn_k=knn_k,
        knn_t=knn_t,
        linear=linear,
        batch_size=batch_size,
        device=device,
        seed=seed,
    )
    out = dict(result.metrics, checkpoint=str(ckpt_path))
    if return_features:
        out.update(test_features=result.test_features, test_labels=result.test_labels)
    return out
