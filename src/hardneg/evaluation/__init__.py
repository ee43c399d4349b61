"""Evaluation of learned representations on frozen backbone features.

* :func:`extract_features` runs a backbone over a data set once (eval mode, no grad).
* :func:`weighted_knn` is the weighted kNN monitor of Wu et al. 2018 (k = 200, t = 0.1).
* :func:`linear_probe` trains a linear classifier on the frozen features to convergence.
* :func:`evaluate_checkpoint` does all three for a training checkpoint on the splits the papers
  use for its data set.
"""

from hardneg.evaluation.evaluate import evaluate_backbone, evaluate_checkpoint
from hardneg.evaluation.features import extract_features
from hardneg.evaluation.knn import knn_scores, topk_accuracy, weighted_knn
from hardneg.evaluation.linear import linear_probe

__all__ = [
    "evaluate_backbone",
    "evaluate_checkpoint",
    "extract_features",
    "knn_scores",
    "linear_probe",
    "topk_accuracy",
    "weighted_knn",
]
