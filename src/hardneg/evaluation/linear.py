"""Linear evaluation: a softmax classifier trained on frozen, pre-extracted features.

The standard protocol of SimCLR / HCL / Ring trains a linear layer on top of the frozen backbone.
Features are extracted once (no augmentation), so training the probe is a convex problem solved
here to convergence, full batch:

    min_{W, b}  CE(W x_std + b, y) + (weight_decay / 2) ||W||^2,

with ``x_std = (x - mean_train) / std_train``. The default solver is L-BFGS with a strong-Wolfe line
search, stopped when the largest gradient entry falls below ``tol`` (or the loss stops changing),
which is faster and more reproducible than a fixed schedule of SGD epochs; full-batch Adam with a
relative-loss-change stop is the alternative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._checks import check_embeddings, check_labels, check_number
from hardneg.evaluation.knn import check_tensor, check_test_labels, topk_accuracy


def linear_probe(
    train_f: Tensor,
    train_y: Tensor,
    test_f: Tensor,
    test_y: Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-3,
    optimizer: str = "lbfgs",
    max_iter: int = 1000,
    lr: float | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Train a linear classifier on ``train_f`` and report its test accuracy (percent).

    Args:
        train_f: ``[N, D]`` frozen train features; ``train_y`` ``[N]`` labels in ``[0, C)``.
        test_f: ``[M, D]``; ``test_y`` ``[M]``.
        num_classes: ``C``; defaults to ``max(labels) + 1``.
        weight_decay: L2 penalty on the weights (not the bias).
        optimizer: ``"lbfgs"`` (default) or ``"adam"``, both full batch.
        max_iter: iteration cap (L-BFGS iterations or Adam steps).
        lr: step size (default 1.0 for L-BFGS, which uses a line search, 0.01 for Adam).
        tol: stop when ``max |grad| <= tol`` (L-BFGS) or the relative loss change over 10 Adam
            steps is below ``tol``.
        seed: seeds the (small random) initialisation, so a call is deterministic.
        device: where the probe trains.

    Returns:
        ``{"top1", "top5"}`` on the test set, plus ``train_top1`` and ``iterations``.
    """
    for name, x in (
        ("train_f", train_f),
        ("train_y", train_y),
        ("test_f", test_f),
        ("test_y", test_y),
    ):
        check_tensor(name, x)
    if train_f.ndim != 2 or test_f.ndim != 2 or train_f.shape[1] != test_f.shape[1]:
        raise ValueError(
            f"features must be [rows, dim] with equal dims, got {tuple(train_f.shape)} and {tuple(test_f.shape)}"
        )
    if train_f.shape[0] != train_y.shape[0] or test_f.shape[0] != test_y.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if train_f.shape[0] == 0 or test_f.shape[0] == 0:  # (the labels' max below has none)
        raise ValueError(
            f"the probe needs train and test rows, got {train_f.shape[0]} and {test_f.shape[0]}"
        )
    check_labels("train_y", train_y, train_f.shape[0])  # 1-D integer class ids
    check_labels("test_y", test_y, test_f.shape[0])
    if int(train_y.min()) < 0:
        raise ValueError("train labels must be >= 0 (drop unlabelled examples before the probe)")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    # each of these reached torch's optimiser or generator as given: a NaN weight_decay made
    # L-BFGS fail on a float conversion, a string seed failed inside manual_seed
    weight_decay = check_number("weight_decay", weight_decay, low=0.0)
    max_iter = int(check_number("max_iter", max_iter, low=0, integer=True))
    if lr is not None:
        lr = check_number("lr", lr, low=0.0, low_inclusive=False)
    tol = check_number("tol", tol, low=0.0)
    seed = int(check_number("seed", seed, integer=True))
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be a torch device (cpu, cuda, cuda:1, mps), got {device!r}"
        ) from None
    check_embeddings("train_f", train_f)  # floating and finite: a NaN stopped L-BFGS deep inside
    check_embeddings("test_f", test_f)
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    num_classes = int(check_number("num_classes", num_classes, low=1, integer=True))
    if int(train_y.max()) >= num_classes:
        raise ValueError(
            f"train labels go up to {int(train_y.max())} but num_classes={num_classes}"
        )
    check_test_labels(test_y, num_classes)

    x = train_f.to(device, torch.float32)
    y = train_y.to(device).long()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant dims carry no information
    x = (x - mean) / std
    x_test = (test_f.to(device, torch.float32) - mean) / std

    gen = torch.Generator().manual_seed(seed)
    weight = (
        (0.01 * torch.randn(num_classes, x.shape[1], generator=gen)).to(device).requires_grad_()
    )
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    params = [weight, bias]

    def objective() -> Tensor:
        return F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            params,
            lr=1.0 if lr is None else lr,
            max_iter=max_iter,
            max_eval=2 * max_iter,
            tolerance_grad=tol,
            tolerance_change=1e-10,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)
        iterations = int(opt.state[opt._params[0]]["n_iter"])
    else:
        opt = torch.optim.Adam(params, lr=0.01 if lr is None else lr)
        previous = float("inf")
        iterations = 0
        for iterations in range(1, max_iter + 1):
            opt.zero_grad()
            loss = objective()
            loss.backward()
            opt.step()
            if iterations % 10 == 0:
                value = float(loss.detach())
                if abs(previous - value) <= tol * max(abs(value), 1e-12):
                    break
                previous = value

    with torch.no_grad():
        train_acc = topk_accuracy(x @ weight.T + bias, y, ks=(1,))["top1"]
        result = topk_accuracy(x_test @ weight.T + bias, test_y.to(device))
    result.update(train_top1=train_acc, iterations=float(iterations))
    return result
