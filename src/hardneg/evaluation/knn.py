"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al., CVPR 2018).

For a test feature ``x`` and L2-normalised train features ``f_j`` (labels ``y_j``):

    s_j = cos(x, f_j),   N_k(x) = the k train points with the largest s_j,
    score_c(x) = sum_{j in N_k(x), y_j = c} exp(s_j / t),

and the prediction ranks classes by ``score_c``. This is the monitor of the instance-discrimination
paper, used by HCL (k = 200, t = 0.5) and by PSM (k = 200, t = 0.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._checks import check_embeddings, check_labels, check_number


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores ``[M, C]`` of the weighted kNN vote for every test row.

    Test rows are processed ``chunk_size`` at a time, so memory stays at
    ``O(chunk_size * N_train)`` however large the test set is. ``k`` is clipped to the train size.
    Each row's weights are computed as ``exp((s_j - max_j s_j) / t)``: the same ranking as
    ``exp(s_j / t)`` (a per-row constant factor) but finite for any temperature.
    """
    _check_inputs(train_features, train_labels, test_features, k, temperature, chunk_size)
    train_labels = train_labels.to(train_features.device).long()
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    num_classes = int(check_number("num_classes", num_classes, low=1, integer=True))
    k, chunk_size = int(k), int(chunk_size)  # checked whole numbers (a YAML 200.0 included)
    if int(train_labels.max()) >= num_classes:
        raise ValueError(
            f"train labels go up to {int(train_labels.max())} but num_classes={num_classes}"
        )
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(bank.device), dim=1)
    out = []
    for start in range(0, test.shape[0], chunk_size):
        sims = test[start : start + chunk_size] @ bank.T  # [m, N]
        top_sims, top_idx = sims.topk(k, dim=1)  # [m, k], sorted descending
        weights = ((top_sims - top_sims[:, :1]) / temperature).exp()
        scores = torch.zeros(top_sims.shape[0], num_classes, device=bank.device)
        scores.scatter_add_(1, train_labels[top_idx], weights)
        out.append(scores)
    return torch.cat(out)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent (``top1``, ``top5``, ...); k is clipped to the class count."""
    check_tensor("scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [rows, classes], got shape {tuple(scores.shape)}")
    check_labels("labels", labels, scores.shape[0])
    if isinstance(ks, (str, bytes)) or not isinstance(ks, (tuple, list)) or not ks:
        raise ValueError(f"ks must be a non-empty tuple of integers >= 1, got {ks!r}")
    for k in ks:
        check_number("ks entries", k, low=1, integer=True)
    labels = labels.to(scores.device).long()
    kmax = min(max(ks), scores.shape[1])
    ranked = scores.topk(kmax, dim=1).indices  # [M, kmax]
    hits = ranked == labels.unsqueeze(1)
    n = max(labels.shape[0], 1)
    return {f"top{k}": 100.0 * int(hits[:, : min(k, kmax)].any(dim=1).sum()) / n for k in ks}


def weighted_knn(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted kNN classifier.

    Args:
        train_features: ``[N, D]`` features of the labelled train split (normalised here).
        train_labels: ``[N]`` int labels in ``[0, num_classes)``.
        test_features: ``[M, D]``.
        test_labels: ``[M]``.
        k: neighbours (200 in Wu et al.); clipped to ``N``.
        temperature: ``t`` in the weights ``exp(s / t)`` (0.1 in Wu et al.).
        num_classes: defaults to ``max(train_labels, test_labels) + 1``.
        chunk_size: test rows per similarity block.

    Returns:
        ``{"top1": float, "top5": float}`` in percent.

    >>> f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> weighted_knn(f, torch.tensor([0, 0, 1]), f[[0, 2]], torch.tensor([0, 1]), k=1)["top1"]
    100.0
    """
    check_tensor("test_features", test_features)
    check_tensor("test_labels", test_labels)
    if test_labels.shape[0] != test_features.shape[0]:
        raise ValueError(
            f"test_features has {test_features.shape[0]} rows but test_labels has {test_labels.shape[0]}"
        )
    check_labels("test_labels", test_labels, test_features.shape[0])
    # before the labels' max below: an empty split has none
    _check_inputs(train_features, train_labels, test_features, k, temperature, chunk_size)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    num_classes = int(check_number("num_classes", num_classes, low=1, integer=True))
    check_test_labels(test_labels, num_classes)
    scores = knn_scores(
        train_features, train_labels, test_features, k, temperature, num_classes, chunk_size
    )
    return topk_accuracy(scores, test_labels)


def check_tensor(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_test_labels(test_y: Tensor, num_classes: int) -> None:
    """A test label outside ``[0, num_classes)`` can never be predicted: it counted as a miss
    without a word (an unlabelled -1 row, or labels of another class numbering)."""
    bad = (test_y < 0) | (test_y >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"test labels must be in [0, {num_classes}) (num_classes = {num_classes}), got "
            f"{int(test_y[bad][0])}: drop unlabelled test rows, or give the right num_classes"
        )


def _check_inputs(train_f, train_y, test_f, k, temperature, chunk_size) -> None:
    for name, x in (
        ("train_features", train_f),
        ("train_labels", train_y),
        ("test_features", test_f),
    ):
        check_tensor(name, x)
    if train_f.ndim != 2 or test_f.ndim != 2:
        raise ValueError(
            f"features must be 2-D [rows, dim], got {tuple(train_f.shape)} and {tuple(test_f.shape)}"
        )
    if train_f.shape[1] != test_f.shape[1]:
        raise ValueError(f"feature dims differ: train {train_f.shape[1]}, test {test_f.shape[1]}")
    if train_f.shape[0] == 0:
        raise ValueError("the train set is empty")
    if train_y.shape[0] != train_f.shape[0]:
        raise ValueError(
            f"train_features has {train_f.shape[0]} rows but train_labels has {train_y.shape[0]}"
        )
    check_labels("train_labels", train_y, train_f.shape[0])  # 1-D integer class ids
    if int(train_y.min()) < 0:
        raise ValueError("train labels must be >= 0 (drop unlabelled examples before the kNN)")
    check_number("k", k, integer=True)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    check_number("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_number("chunk_size", chunk_size, integer=True)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # floating, at least one column, finite: a NaN feature ranked its neighbours arbitrarily
    check_embeddings("train_features", train_f)
    check_embeddings("test_features", test_f)
