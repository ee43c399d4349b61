"""Bad inputs found by the session-17 audit of the public API: each one used to end in a stack
trace from inside torch (or pathlib, pyarrow, numpy), a silent NaN or a silently wrong result.
Every test pins the error type and the part of the message that says what was wrong and what
is allowed."""

from __future__ import annotations

import re

import pytest
import torch

import hardneg


def raises(message: str, error: type[Exception] = ValueError):
    """pytest.raises(error) whose message contains ``message`` literally."""
    return pytest.raises(error, match=re.escape(message))


def z(n: int = 4, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ the loss: features


@pytest.mark.parametrize("name", ["hcl", "unremix", "ring"])
def test_h1_and_h2_of_different_widths_are_named(name):
    """Different widths reached torch.cat ("Sizes of tensors must match") when the standard
    contrast set stacks [h1; h2]."""
    with raises("h1 and h2 must have the same shape, got (4, 5) and (4, 3)"):
        hardneg.create_loss(name)(z(), z(seed=1), h1=z(4, 5), h2=z(4, 3))


@pytest.mark.parametrize("which", ["h1", "h2"])
def test_features_on_another_device_than_the_embeddings_are_named(which):
    """A feature tensor on another device reached the strategies' arithmetic (on a GPU:
    torch's "Expected all tensors to be on the same device"); 'meta' stands in for a second
    device on a CPU-only machine."""
    h = {"h1": z(4, 5), "h2": z(4, 5, seed=1)}
    h[which] = h[which].to("meta")
    with raises(f"z1 and {which} must be on the same device, got cpu and meta"):
        hardneg.create_loss("unremix")(z(), z(seed=2), **h)


def test_pool_features_on_another_device_than_the_queries_are_named():
    loss_fn = hardneg.create_loss("hcl")
    with raises("q and negative_h must be on the same device, got cpu and meta"):
        loss_fn(z(), z(seed=1), z(10), h1=z(4, 5), negative_h=z(10, 5).to("meta"))


# ------------------------------------------------------------------------ evaluation: kNN


def knn_args(**kwargs):
    g = torch.Generator().manual_seed(0)
    args = {
        "train_features": torch.randn(12, 4, generator=g),
        "train_labels": torch.arange(12) % 3,
        "test_features": torch.randn(5, 4, generator=g),
        "test_labels": torch.arange(5) % 3,
    }
    args.update(kwargs)
    return args


def test_knn_refuses_non_finite_features():
    """A NaN train feature ranked its neighbours arbitrarily and an accuracy came back."""
    from hardneg.evaluation import weighted_knn

    bad = knn_args()["train_features"].clone()
    bad[3, 1] = float("nan")
    with raises("train_features contains 1 NaN or Inf value(s) (first in row 3)"):
        weighted_knn(**knn_args(train_features=bad))
    bad = knn_args()["test_features"].clone()
    bad[2, 0] = float("inf")
    with raises("test_features contains 1 NaN or Inf value(s) (first in row 2)"):
        weighted_knn(**knn_args(test_features=bad))


def test_knn_refuses_fractional_labels_and_labels_that_cannot_be_predicted():
    """Float labels were truncated by .long() (0.5 voted for class 0); a test label outside
    [0, num_classes) counted as a miss, so -1 rows lowered the accuracy without a word."""
    from hardneg.evaluation import weighted_knn

    with raises("train_labels must hold integer class ids, got dtype torch.float32"):
        weighted_knn(**knn_args(train_labels=torch.arange(12) % 3 + 0.5))
    with raises("test labels must be in [0, 3) (num_classes = 3), got -1"):
        weighted_knn(**knn_args(test_labels=torch.tensor([0, 1, -1, 2, 0])))
    with raises("test labels must be in [0, 3) (num_classes = 3), got 7"):
        weighted_knn(**knn_args(test_labels=torch.tensor([0, 1, 7, 2, 0])), num_classes=3)


def test_knn_refuses_an_empty_test_set_and_settings_of_the_wrong_type():
    """An empty test set failed in max() of its labels; a float k in topk(); a string
    temperature in a comparison with 0; a fractional chunk_size in range()."""
    from hardneg.evaluation import weighted_knn

    empty = knn_args(test_features=torch.zeros(0, 4), test_labels=torch.zeros(0, dtype=torch.long))
    with raises("test_features must have at least 1 rows, got 0"):
        weighted_knn(**empty)
    with raises("k must be an integer, got 2.5"):
        weighted_knn(**knn_args(), k=2.5)
    with raises("temperature must be a number, got '0.1' (str)"):
        weighted_knn(**knn_args(), temperature="0.1")
    with raises("chunk_size must be an integer, got 2.5"):
        weighted_knn(**knn_args(), chunk_size=2.5)
    with raises("num_classes must be an integer, got 3.5"):
        weighted_knn(**knn_args(), num_classes=3.5)
    with raises("train_features must be a torch.Tensor, got list"):
        weighted_knn(**knn_args(train_features=[[0.0] * 4] * 12))
    # whole numbers written as floats (a YAML 5.0) still work, as before
    assert weighted_knn(**knn_args(), k=5.0, chunk_size=2.0) == weighted_knn(**knn_args(), k=5)


def test_topk_accuracy_refuses_no_cut_off_and_mismatched_labels():
    from hardneg.evaluation import topk_accuracy

    scores = torch.randn(5, 3)
    with raises("ks must be a non-empty tuple of integers >= 1, got ()"):
        topk_accuracy(scores, torch.arange(5) % 3, ks=())
    with raises("ks entries must be in [1, inf), got 0"):
        topk_accuracy(scores, torch.arange(5) % 3, ks=(0,))
    with raises("labels must have shape (5,), got (4,)"):
        topk_accuracy(scores, torch.arange(4) % 3)


# ------------------------------------------------------------------------ evaluation: probe


def probe_args(**kwargs):
    g = torch.Generator().manual_seed(0)
    args = {
        "train_f": torch.randn(12, 4, generator=g),
        "train_y": torch.arange(12) % 3,
        "test_f": torch.randn(6, 4, generator=g),
        "test_y": torch.arange(6) % 3,
        "max_iter": 5,
    }
    args.update(kwargs)
    return args


def test_linear_probe_refuses_non_finite_features():
    """A NaN feature stopped L-BFGS with "value cannot be converted to type float without
    overflow" from inside torch.optim."""
    from hardneg.evaluation import linear_probe

    bad = probe_args()["train_f"].clone()
    bad[5, 2] = float("nan")
    with raises("train_f contains 1 NaN or Inf value(s) (first in row 5)"):
        linear_probe(**probe_args(train_f=bad))


def test_linear_probe_refuses_labels_beyond_num_classes_and_empty_splits():
    """A train label >= num_classes failed inside cross_entropy ("Target 3 is out of bounds");
    a test label beyond it counted as a miss; an empty split failed in min()."""
    from hardneg.evaluation import linear_probe

    with raises("train labels go up to 2 but num_classes=2"):
        linear_probe(**probe_args(), num_classes=2)
    with raises("test labels must be in [0, 3) (num_classes = 3), got -1"):
        linear_probe(**probe_args(test_y=torch.tensor([0, 1, 2, -1, 0, 1])))
    with raises("the probe needs train and test rows, got 12 and 0"):
        linear_probe(**probe_args(test_f=torch.zeros(0, 4), test_y=torch.zeros(0).long()))
    with raises("train_y must hold integer class ids, got dtype torch.float32"):
        linear_probe(**probe_args(train_y=(torch.arange(12) % 3).float()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_decay": float("nan")}, "weight_decay must be finite, got nan"),
        ({"weight_decay": "0.1"}, "weight_decay must be a number, got '0.1' (str)"),
        ({"lr": 0.0}, "lr must be in (0, inf), got 0.0"),
        ({"lr": "1"}, "lr must be a number, got '1' (str)"),
        ({"max_iter": -1}, "max_iter must be in [0, inf), got -1"),
        ({"max_iter": "10"}, "max_iter must be an integer, got '10' (str)"),
        ({"tol": -1.0}, "tol must be in [0, inf), got -1.0"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"device": "tpu"}, "device must be a torch device (cpu, cuda, cuda:1, mps), got 'tpu'"),
        ({"num_classes": 3.5}, "num_classes must be an integer, got 3.5"),
    ],
)
def test_linear_probe_settings_are_checked_before_torch_sees_them(kwargs, message):
    """Each reached torch.optim / manual_seed / torch.device as given: "Invalid learning
    rate", "float division by zero", "manual_seed expected a long", or (a negative max_iter)
    a probe that silently never trained."""
    from hardneg.evaluation import linear_probe

    with raises(message):
        linear_probe(**probe_args(**kwargs))
