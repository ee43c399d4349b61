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
    if test_labels.shape[0] != test_features.shape[0]:
        raise ValueError(
            f"test_features has {test_features.shape[0]} rows but test_labels has {test_labels.shape[0]}"
        )
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(
        train_features, train_labels, test_features, k, temperature, num_classes, chunk_size
    )
    return topk_accuracy(scores, test_labels)


def _check_inputs(train_f, train_y, test_f, k, temperature, chunk_size) -> None:
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
    if int(train_y.min()) < 0:
        raise ValueError("train labels must be >= 0 (drop unlabelled examples before the kNN)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
