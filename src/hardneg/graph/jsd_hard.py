"""HCL's graph objective (``JSD_hard`` in the authors' graph code), as that code computes it.

HCL's graph experiments (Robinson et al., ICLR 2021; code ``joshr17/HCL``, folder ``graph/``) keep
InfoGraph's local-global set-up and change only the Jensen-Shannon expectations. With the score
matrix ``r = l_enc g_enc^T`` over every (node, graph) pair of a batch of ``N`` nodes and ``G``
graphs, the code multiplies ``r`` by 0/1 masks, so each expectation runs over **all** ``N G``
cells, the masked ones entering as scores of 0:

    P_ij = r_ij  if node i belongs to graph j,  else 0
    Q_ij = r_ij  if node i does not belong to graph j, else 0
    E+   = (1/N)        sum_ij Ep(P_ij)
    E-   = (1/(N(G-1))) sum_ij Eq(Q_ij)
    loss = E- - E+

with ``rho = tau / (1 - tau)`` and ``tau = 0.5`` (the caller never passes another value):

    Ep(p) = log 2 - softplus(-p) - rho softplus(p)
    Eq(q) = (softplus(q) - log 2) / (1 - tau)                              (beta = 0)
    Eq(q) = w_ij softplus(q) / (1 - tau) - log 2                           (beta > 0)
    w_ij  = exp(-2 beta Q_ij / m) / mean_j' exp(-2 beta Q_ij' / m),   m = max(max Q, |min Q|)

The mean runs over all ``G`` columns of the row (the zeroed own-graph cell included) and ``m`` is
one maximum over the whole matrix; nothing is detached. The sign gives **more** weight to
**lower** scores (easier negatives), the reverse of the image code's ``e^{beta s}``.
``direction='authors'`` (the default) computes exactly this; ``direction='hard'`` flips the sign
of the exponent (``exp(+2 beta Q / m)``, harder negatives count more) and changes nothing else.
Both are listed in ``docs/deviations.md`` (D-G7, D-G8).

The sums are regrouped (the masked cells contribute closed-form constants or their own weight)
and the weights use a softmax, which is the same number without overflow; a test checks the
value and gradients against a line-by-line restatement of the authors' expressions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._checks import check_choice, check_number
from hardneg.contrast import ContrastSet

DIRECTIONS = ("authors", "hard")
LOG2 = math.log(2.0)


def jsd_hard_loss(
    contrast: ContrastSet,
    *,
    beta: float,
    tau: float = 0.5,
    direction: str = "authors",
) -> Tensor:
    """HCL's graph loss (scalar) on a node-graph contrast set.

    ``contrast`` holds ``N`` node anchors, ``G`` graph columns and each node's own graph as its
    one positive (``build_contrast(nodes, graphs, positive_index=batch[:, None],
    normalize=False, temperature=1.0)``); the score matrix is ``temperature *`` its logits.

    Args:
        beta: concentration ``>= 0`` (0 = the debiased JSD without weights).
        tau: class prior (the authors' code always runs with its default 0.5).
        direction: ``'authors'`` (weights ``exp(-2 beta q / m)``) or ``'hard'`` (``+``).
    """
    beta = check_number("beta", beta, low=0.0)
    tau = check_number("tau", tau, low=0.0, high=1.0, high_inclusive=False)
    direction = check_choice("direction", direction, DIRECTIONS)
    if contrast.anchor_columns is not None or not contrast.single_positive:
        raise ValueError("jsd_hard_loss expects node-graph pairs: one positive column per node")
    t = contrast.temperature
    logits = contrast.negative_logits
    num_nodes, num_graphs = logits.shape
    if num_graphs < 2:
        raise ValueError("the Jensen-Shannon graph objective needs at least 2 graphs per batch")
    rho = tau / (1.0 - tau)
    # Q: the scores of the negative cells, 0 in every masked cell (own graph, excluded)
    q = torch.where(torch.isfinite(logits), logits, 0.0) * t
    p = contrast.positive_logits[:, 0] * t  # [N] the own-graph scores
    # E+: the own-graph cells, plus G - 1 zero cells per row with Ep(0) = -rho log 2
    ep = LOG2 - F.softplus(-p) - rho * F.softplus(p)
    e_pos = ep.mean() - (num_graphs - 1) * rho * LOG2
    if beta == 0.0:
        # Eq(0) = 0: the masked cells add nothing
        e_neg = ((F.softplus(q) - LOG2) / (1.0 - tau)).sum() / (num_nodes * (num_graphs - 1))
        return e_neg - e_pos
    scale = torch.maximum(q.max(), q.min().abs()).clamp_min(torch.finfo(q.dtype).tiny)
    sign = -1.0 if direction == "authors" else 1.0
    # exp(a) / mean_j exp(a) = G softmax_j(a): the same weights, no overflow
    w = num_graphs * torch.softmax(sign * 2.0 * beta * q / scale, dim=1)
    cells = w * F.softplus(q) / (1.0 - tau) - LOG2
    e_neg = cells.sum() / (num_nodes * (num_graphs - 1))
    return e_neg - e_pos
