"""UnReMix negatives — a **reconstruction** (Tabassum, Wahed, Eldardiry, Lourentzou, 2022,
"Hard Negative Sampling Strategies for Contrastive Representation Learning", arXiv 2206.01197).

What is certain (the abstract): the importance of a negative combines *anchor similarity*, *model
uncertainty* and *representativeness*. The paper's exact formulas and code are not public; this
module implements the reconstruction of ``docs/methods.md`` (following the later "UnDiMix"
description), every choice a parameter, all scores on detached embeddings:

1. similarity (HCL tilt):         ``A_ij = s_ij / t``, weight ``∝ e^{beta A_ij}``
2. influence / uncertainty:       per-sample InfoNCE gradient w.r.t. the embedding
       ``delta_j = (1/t) (sum_k p_jk z_k - z_{j+})``  (``p`` = softmax over positive and negatives)
   last-layer gradient ``g_j = delta_j ⊗ h_j`` (``h`` = input of the head's last linear layer, or
   ``z`` when not given), so ``cos(g_i, g_j) = cos(delta_i, delta_j) · cos(h_i, h_j)``
   (computed in O(N^2 d), ``g`` is never materialised).
   ``influence='gradient_similarity'``: ``U_ij = cos(g_i, g_j)``;
   ``influence='gradient_norm'``:       ``U_j = ||g_j|| = ||delta_j|| ||h_j||`` (plain uncertainty).
3. representativeness ``D_j = mean_{k != j} (1 - s_jk)`` over the candidates;
   ``representativeness='diversity'`` uses ``D``, ``'density'`` uses ``1 - D~`` (the direction in
   the 2022 paper is unknown).
4. min-max normalise ``U`` and ``D`` over each anchor's negatives (``~``), then
       ``w_ij ∝ e^{beta A_ij} (lambda_u U~_ij + lambda_d D~_j + eps)``,
   normalised to mean 1 and used in the HCL estimator in place of ``imp``
   (so ``lambda_u = lambda_d = 0`` is HCL exactly).

With an external pool (queue, bank) the pool entries have no positive in the batch, so their
``delta_j`` is undefined; our choice: treat each entry as an anchor whose positive is itself and
whose candidates are the batch's queries, ``delta_j = (1/t)(sum_i p~_ji q_i - z_j)`` with
``p~_j = softmax_i(s_ij / t)``; it reuses the score matrix, so costs one extra matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._checks import check_choice, check_number
from hardneg.pool import ContrastiveScores
from hardneg.strategies.base import (
    NegativeSelection,
    StrategyInputs,
    normalised_log_weights,
)
from hardneg.strategies.importance import ImportanceNegatives


def anchor_gradients(scores: ContrastiveScores) -> Tensor:
    """``delta_i = (1/t)(sum_k p_ik z_k - z_{i+})``: InfoNCE gradient w.r.t. each anchor ``[A, d]``."""
    logits = scores.logits.detach()
    pos = scores.pos_logits.detach().unsqueeze(1)
    log_norm = torch.logsumexp(torch.cat([pos, logits], dim=1), dim=1, keepdim=True)
    p_neg = torch.exp(logits - log_norm)  # masked -inf -> 0
    p_pos = torch.exp(pos - log_norm)
    expected = p_neg @ scores.candidates + p_pos * scores.positives
    return (expected - scores.positives) / scores.temperature


def pool_gradients(scores: ContrastiveScores) -> Tensor:
    """``delta_j`` of each pool entry as an anchor of its own against the batch ``[K, d]``."""
    logits_t = scores.logits.detach().T  # [K, A]
    p = torch.softmax(logits_t.masked_fill(~torch.isfinite(logits_t), float("-inf")), dim=1)
    p = torch.nan_to_num(p, nan=0.0)  # an entry masked for every anchor has no distribution
    return (p @ scores.anchors - scores.candidates) / scores.temperature


def minmax_over_negatives(x: Tensor, neg_mask: Tensor | None) -> Tensor:
    """Rescale each row to [0, 1] over the anchor's negatives (constant rows become 0)."""
    if neg_mask is None:
        lo = x.min(dim=1, keepdim=True).values
        hi = x.max(dim=1, keepdim=True).values
    else:
        lo = x.masked_fill(~neg_mask, float("inf")).min(dim=1, keepdim=True).values
        hi = x.masked_fill(~neg_mask, float("-inf")).max(dim=1, keepdim=True).values
    span = hi - lo
    out = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, out, torch.zeros_like(out))
    return out if neg_mask is None else out.masked_fill(~neg_mask, 0.0)


class UnReMixNegatives(ImportanceNegatives):
    """Similarity × uncertainty × representativeness weights (reconstruction, see module doc).

    Args:
        beta: HCL concentration of the similarity tilt, ``>= 0``.
        lambda_u: weight of the influence/uncertainty score, ``>= 0``.
        lambda_d: weight of the representativeness score, ``>= 0``.
        eps: floor added to the mixed score, ``> 0`` (keeps every negative in the support).
        influence: ``'gradient_similarity'`` or ``'gradient_norm'``.
        representativeness: ``'diversity'`` or ``'density'``.
        detach_weights: stop the gradient through the similarity tilt (as in HCL).
    """

    def __init__(
        self,
        beta: float = 1.0,
        lambda_u: float = 1.0,
        lambda_d: float = 1.0,
        eps: float = 0.1,
        influence: str = "gradient_similarity",
        representativeness: str = "diversity",
        detach_weights: bool = False,
    ) -> None:
        super().__init__(beta=beta, detach_weights=detach_weights)
        self.lambda_u = check_number("lambda_u", lambda_u, low=0.0)
        self.lambda_d = check_number("lambda_d", lambda_d, low=0.0)
        self.eps = check_number("eps", eps, low=0.0, low_inclusive=False)
        self.influence = check_choice(
            "influence", influence, ("gradient_similarity", "gradient_norm")
        )
        self.representativeness = check_choice(
            "representativeness", representativeness, ("diversity", "density")
        )

    def hparams(self) -> dict[str, object]:
        return {
            "beta": self.beta,
            "lambda_u": self.lambda_u,
            "lambda_d": self.lambda_d,
            "eps": self.eps,
            "influence": self.influence,
            "representativeness": self.representativeness,
            "detach_weights": self.detach_weights,
        }

    def influence_scores(self, scores: ContrastiveScores, inputs: StrategyInputs) -> Tensor:
        """``U`` as ``[A, C]`` (or ``[1, C]`` for the per-negative ``gradient_norm``)."""
        delta_a = anchor_gradients(scores)
        delta_c = delta_a if scores.in_batch else pool_gradients(scores)
        h_a, h_c = inputs.anchor_features, inputs.candidate_features
        if self.influence == "gradient_norm":
            h_norm = scores.candidates.norm(dim=1) if h_c is None else h_c.detach().float().norm(dim=1)
            return (delta_c.norm(dim=1) * h_norm).unsqueeze(0)
        cos_delta = F.normalize(delta_a, dim=1) @ F.normalize(delta_c, dim=1).T
        if h_a is None or h_c is None:
            cos_h = scores.similarities.detach()  # h = z: cos(z_i, z_j) = s_ij, already computed
            if scores.neg_mask is not None:
                cos_h = cos_h.masked_fill(~scores.neg_mask, 0.0)
        else:
            cos_h = F.normalize(h_a.detach().float(), dim=1) @ F.normalize(h_c.detach().float(), dim=1).T
        return cos_delta * cos_h

    @staticmethod
    def representativeness_scores(scores: ContrastiveScores) -> Tensor:
        """``D_j = mean_{k != j}(1 - s_jk)`` over the candidates, ``[1, C]``."""
        z = scores.candidates.detach()
        c = z.shape[0]
        total = z.sum(dim=0)
        mean_sim = (z @ total - (z * z).sum(dim=1)) / max(c - 1, 1)
        return (1.0 - mean_sim).unsqueeze(0)

    def select(self, scores: ContrastiveScores, inputs: StrategyInputs) -> NegativeSelection:
        log_w = self.tilted_log_weights(scores, self.current_beta(inputs.progress))
        if self.lambda_u > 0 or self.lambda_d > 0:
            with torch.no_grad():
                mix = torch.full_like(scores.logits, self.eps)
                if self.lambda_u > 0:
                    u = self.influence_scores(scores, inputs).expand_as(mix)
                    mix = mix + self.lambda_u * minmax_over_negatives(u, scores.neg_mask)
                if self.lambda_d > 0:
                    d = self.representativeness_scores(scores).expand_as(mix)
                    d = minmax_over_negatives(d, scores.neg_mask)
                    if self.representativeness == "density":
                        d = 1.0 - d
                    mix = mix + self.lambda_d * d
            log_w = log_w + torch.log(mix)
        return NegativeSelection(
            logits=scores.logits, log_weights=normalised_log_weights(log_w, scores)
        )
