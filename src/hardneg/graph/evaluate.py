"""Frozen graph embeddings -> accuracy: the InfoGraph / HCL SVM protocol, kNN and a linear probe.

:func:`svm_accuracy` follows HCL's ``graph/evaluate_embedding.py`` (InfoGraph's): 10-fold
stratified cross-validation over the whole data set; inside each training fold an RBF ``SVC`` whose
``C`` is chosen from ``{1e-3, ..., 1e3}`` by a 5-fold grid search; the reported figure is the mean
test accuracy over the 10 folds. Features are used as they are (no scaling), as there.
:func:`knn_accuracy` and :func:`linear_accuracy` score the same folds with the library's weighted
kNN (:func:`hardneg.evaluation.knn.knn_scores`) and linear probe
(:func:`hardneg.evaluation.linear.linear_probe`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

SVM_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def _arrays(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
    x = (
        embeddings.detach().cpu().double().numpy()
        if isinstance(embeddings, Tensor)
        else np.asarray(embeddings, dtype=float)
    )
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need embeddings [n, d] and labels [n], got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the embeddings contain NaN or inf")
    _, y = np.unique(y, return_inverse=True)
    return x, y


def check_scorable(labels, name: str = "the data set") -> None:
    """The stratified folds' condition, for callers to check before training rather than
    after it: every class has at least 2 graphs."""
    values, y = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.bincount(y)
    if len(values) < 2:  # the SVM failed after training: "The number of classes has to be..."
        raise ValueError(
            f"{name}: every graph has the label {values.tolist()}: scoring classifies graphs, "
            "and needs at least two classes"
        )
    if counts.min() < 2:
        classes = np.unique(np.asarray(labels))[counts < 2].tolist()
        raise ValueError(
            f"{name}: class(es) {classes} have a single graph (classes are numbered from 0 in "
            "the sorted order of the label file's values); every class needs at least 2 graphs "
            "for stratified cross-validation"
        )


def _folds(y: np.ndarray, folds: int, seed: int):
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y)
    smallest = int(counts.min())
    if len(counts) < 2:
        raise ValueError("the labels hold a single class: scoring needs at least two classes")
    if smallest < 2:
        raise ValueError("every class needs at least 2 graphs for stratified cross-validation")
    k = min(folds, smallest)
    if k < folds:  # the reports name the folds asked for: say that fewer were run
        warnings.warn(
            f"{folds}-fold stratified cross-validation runs {k} folds: the smallest class has "
            f"{smallest} graphs",
            stacklevel=3,
        )
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)


def svm_accuracy(
    embeddings,
    labels,
    *,
    folds: int = 10,
    inner_folds: int = 5,
    c_grid: tuple[float, ...] = SVM_C_GRID,
    seed: int = 0,
    gamma: str | float = "scale",
) -> dict[str, float]:
    """RBF SVM with ``C`` grid-searched inside each of ``folds`` stratified folds; ``gamma``
    the kernel width (``'scale'``, scikit-learn's default since 0.22; ``'auto'`` before it).

    Returns ``{"svm": mean accuracy (percent), "svm_std": std over folds}``.
    """
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    x, y = _arrays(embeddings, labels)
    scores = []
    for train, test in _folds(y, folds, seed):
        inner = min(inner_folds, int(np.bincount(y[train]).min()))
        if inner >= 2:
            model = GridSearchCV(
                SVC(gamma=gamma), {"C": list(c_grid)}, cv=inner, scoring="accuracy"
            )
        else:
            model = SVC(C=10.0, gamma=gamma)
        model.fit(x[train], y[train])
        scores.append(float((model.predict(x[test]) == y[test]).mean()))
    return {"svm": 100.0 * float(np.mean(scores)), "svm_std": 100.0 * float(np.std(scores))}


def knn_accuracy(embeddings, labels, *, folds: int = 10, k: int = 20, seed: int = 0) -> float:
    """Weighted kNN (cosine, ``t = 0.1``) accuracy in percent, over stratified folds."""
    from hardneg.evaluation.knn import knn_scores

    x, y = _arrays(embeddings, labels)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
    correct = 0
    for train, test in _folds(y, folds, seed):
        scores = knn_scores(xt[train], yt[train], xt[test], k=k, num_classes=int(y.max()) + 1)
        correct += int((scores.argmax(1) == yt[test]).sum())
    return 100.0 * correct / len(y)


def linear_accuracy(
    embeddings, labels, *, folds: int = 10, seed: int = 0, max_iter: int = 1000
) -> float:
    """Linear probe accuracy in percent (features standardised on each training fold)."""
    from hardneg.evaluation.linear import linear_probe

    x, y = _arrays(embeddings, labels)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
    correct = 0.0
    for train, test in _folds(y, folds, seed):
        mean, std = xt[train].mean(0), xt[train].std(0).clamp_min(1e-6)
        out = linear_probe(
            (xt[train] - mean) / std,
            yt[train],
            (xt[test] - mean) / std,
            yt[test],
            num_classes=int(y.max()) + 1,
            seed=seed,
            max_iter=max_iter,
        )
        correct += out["top1"] / 100.0 * len(test)
    return 100.0 * correct / len(y)


def evaluate_embeddings(
    embeddings, labels, *, folds: int = 10, seed: int = 0, svm: bool = True
) -> dict[str, float]:
    """``svm``, ``svm_std`` (if ``svm``), ``knn`` and ``linear`` accuracies in percent."""
    out: dict[str, float] = {}
    if svm:
        out.update(svm_accuracy(embeddings, labels, folds=folds, seed=seed))
    out["knn"] = knn_accuracy(embeddings, labels, folds=folds, seed=seed)
    out["linear"] = linear_accuracy(embeddings, labels, folds=folds, seed=seed)
    return out
