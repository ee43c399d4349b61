"""Candidate pools: who an anchor is compared with.

Two set-ups share one description, :class:`ContrastiveScores`:

* **in-batch** (SimCLR): ``z1, z2`` of shape ``[N, d]`` give ``A = 2N`` anchors; every view is a
  candidate (``C = 2N``); the anchor itself and its positive (the other view) are masked, leaving
  ``M = 2N - 2`` negatives per anchor.
* **external pool** (MoCo queue, memory bank): ``q, k`` of shape ``[N, d]`` and a pool of
  ``K`` vectors give ``A = N`` anchors, ``C = M = K`` candidates, all negatives.

The scores are computed once here, in float32 after normalisation (under autocast the matmul may
run in bf16/fp16; the result is promoted before any exponentials), and handed to a strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ContrastiveScores:
    """Per-anchor similarities to its positive and to every candidate.

    Attributes:
        anchors: ``[A, d]`` L2-normalised anchor embeddings.
        positives: ``[A, d]`` L2-normalised positive of each anchor.
        candidates: ``[C, d]`` L2-normalised candidate embeddings.
        pos_logits: ``[A]`` ``s(i, i+) / t``.
        logits: ``[A, C]`` ``s(i, j) / t`` with ``-inf`` where ``j`` is not a negative of ``i``.
        neg_mask: ``[A, C]`` bool, True where ``j`` is a negative of ``i``; None means all are.
        num_negatives: ``M``, the number of negatives of every anchor.
        temperature: ``t``.
        positive_index: ``[A]`` index in the candidates of each anchor's positive (in-batch only).
        in_batch: True for the SimCLR set-up (candidates are the anchors themselves).
        bilinear: True when ``logits = anchors @ candidates.T / t`` (before masking) with the
            gradient flowing through ``anchors`` and ``candidates``; a strategy that keeps few
            entries may then back-propagate them sparsely instead of through the dense matrix.
    """

    anchors: Tensor
    positives: Tensor
    candidates: Tensor
    pos_logits: Tensor
    logits: Tensor
    neg_mask: Tensor | None
    num_negatives: int
    temperature: float
    positive_index: Tensor | None
    in_batch: bool
    bilinear: bool = False

    @property
    def similarities(self) -> Tensor:
        """``[A, C]`` cosine similarities (``-inf`` where masked)."""
        return self.logits * self.temperature

    @property
    def log_num_negatives(self) -> float:
        return math.log(self.num_negatives)


def _normalise(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=1)


def in_batch_scores(z1: Tensor, z2: Tensor, temperature: float) -> ContrastiveScores:
    """Scores of the SimCLR set-up: both directions, ``2N`` anchors, ``2N - 2`` negatives each."""
    n = z1.shape[0]
    z = _normalise(torch.cat([z1, z2], dim=0))
    # 1/t folded into the [2N, d] operand: one pass less over the [2N, 2N] scores (and backward)
    logits = ((z / temperature) @ z.T).float()
    index = torch.arange(2 * n, device=z.device)
    positive_index = (index + n) % (2 * n)
    positives = z[positive_index]
    pos_logits = (z * positives).sum(dim=1) / temperature
    rows = torch.cat([index, index])
    cols = torch.cat([index, positive_index])
    # in place on the matmul output (its backward does not need it): no mask pass, no copy
    logits.index_put_((rows, cols), torch.tensor(float("-inf"), device=z.device))
    neg_mask = torch.ones(2 * n, 2 * n, dtype=torch.bool, device=z.device)
    neg_mask[rows, cols] = False
    return ContrastiveScores(
        anchors=z,
        positives=positives,
        candidates=z,
        pos_logits=pos_logits,
        logits=logits,
        neg_mask=neg_mask,
        num_negatives=2 * n - 2,
        temperature=temperature,
        positive_index=positive_index,
        in_batch=True,
        bilinear=True,
    )


def pool_scores(
    q: Tensor,
    k: Tensor,
    negatives: Tensor,
    temperature: float,
    *,
    exclude_index: Tensor | None = None,
) -> ContrastiveScores:
    """Scores against an external pool (queue or memory bank), which is never back-propagated.

    ``exclude_index[i]`` (optional) is the pool row holding anchor ``i``'s own entry (a memory
    bank stores every training image, the anchor included); it is masked out, leaving
    ``M = K - 1`` negatives per anchor.
    """
    q = _normalise(q)
    k = _normalise(k)
    pool = _normalise(negatives.detach())
    pos_logits = (q * k).sum(dim=1) / temperature
    logits = ((q / temperature) @ pool.T).float()
    neg_mask = None
    num_negatives = pool.shape[0]
    if exclude_index is not None:
        exclude_index = exclude_index.to(device=logits.device, dtype=torch.long)
        if exclude_index.shape != (q.shape[0],) or not bool(
            ((exclude_index >= 0) & (exclude_index < pool.shape[0])).all()
        ):
            raise ValueError(
                f"exclude_index must hold one pool row in [0, {pool.shape[0]}) per query "
                f"(shape ({q.shape[0]},)), got shape {tuple(exclude_index.shape)}"
            )
        if pool.shape[0] < 2:
            raise ValueError("a pool with exclude_index needs at least 2 entries")
        rows = torch.arange(q.shape[0], device=logits.device)
        neg_mask = torch.ones_like(logits, dtype=torch.bool)
        neg_mask[rows, exclude_index] = False
        logits.index_put_((rows, exclude_index), torch.tensor(float("-inf"), device=logits.device))
        num_negatives -= 1
    return ContrastiveScores(
        anchors=q,
        positives=k,
        candidates=pool,
        pos_logits=pos_logits.float(),
        logits=logits,
        neg_mask=neg_mask,
        num_negatives=num_negatives,
        temperature=temperature,
        positive_index=None,
        in_batch=False,
        bilinear=True,
    )
