"""The one objective every negative strategy plugs into, computed in log space.

For anchor ``i`` with positive logit ``a_i = s(i, i+)/t`` and the strategy's negatives
``c_ij = s(i, j)/t`` with weights ``w_ij`` (``w = 1`` when the strategy only selects):

    R_i  = sum_j w_ij * exp(c_ij)                                  (weighted negative mass)
    Ng_i = max( (R_i - tau_plus * M * exp(a_i)) / (1 - tau_plus),  M * exp(-1/t) )
    l_i  = -log( exp(a_i) / (exp(a_i) + Ng_i) ) = logaddexp(a_i, log Ng_i) - a_i

The debiasing correction and its clamp (Chuang et al., NeurIPS 2020, "Debiased Contrastive
Learning", eq. for ``g(x, {u}, {v})``) are applied only when ``tau_plus > 0``; with
``tau_plus = 0`` and ``w = 1`` this is InfoNCE / NT-Xent exactly.

Everything is a log-sum-exp, so ``t = 0.05`` with ``beta = 10`` neither overflows nor underflows in
float32, and bf16/fp16 inputs are promoted before any exponential.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log_negative_mass(neg_logits: Tensor, neg_log_weights: Tensor | None) -> Tensor:
    """``log sum_j w_ij exp(c_ij)`` per anchor; ``-inf`` entries are absent negatives."""
    if neg_log_weights is not None:
        neg_logits = neg_logits + neg_log_weights
    return torch.logsumexp(neg_logits, dim=1)


def debias_log_mass(
    log_mass: Tensor,
    pos_logits: Tensor,
    *,
    tau_plus: float,
    num_negatives: int,
    temperature: float,
) -> Tensor:
    """``log Ng`` of the debiased estimator from ``log R``, kept in log space.

    ``R - tau_plus*M*pos`` is evaluated as ``log R + log(1 - exp(log(tau_plus*M*pos) - log R))``;
    where that difference is not positive the clamp ``M * exp(-1/t)`` holds, exactly as
    ``torch.clamp`` does in the reference code (no gradient flows through the clamped branch).
    """
    log_m = math.log(num_negatives)
    floor = log_m - 1.0 / temperature
    if tau_plus == 0.0:
        return log_mass
    log_bias = math.log(tau_plus) + log_m + pos_logits
    gap = log_bias - log_mass  # < 0 where the correction leaves a positive mass
    positive = gap < 0
    # keep the unused branch finite so that its gradient is 0, never NaN
    safe_gap = torch.where(positive, gap, torch.full_like(gap, -1.0))
    corrected = log_mass + torch.log(-torch.expm1(safe_gap)) - math.log1p(-tau_plus)
    corrected = torch.where(positive, corrected, torch.full_like(corrected, floor))
    return torch.clamp(corrected, min=floor)


def contrastive_objective(
    pos_logits: Tensor,
    neg_logits: Tensor,
    neg_log_weights: Tensor | None = None,
    *,
    tau_plus: float = 0.0,
    num_negatives: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-anchor loss ``[A]`` from positive logits ``[A]`` and negative logits ``[A, S]``.

    Args:
        pos_logits: ``a_i``.
        neg_logits: ``c_ij`` for the negatives the strategy kept (``-inf`` = not kept).
        neg_log_weights: ``log w_ij`` (None = all weights 1).
        tau_plus: class prior of the debiased estimator; 0 disables debiasing.
        num_negatives: ``M`` of the debiased estimator (defaults to ``S``).
        temperature: ``t``, needed for the clamp of the debiased estimator.
    """
    pos_logits = pos_logits.float()
    log_mass = log_negative_mass(neg_logits.float(), neg_log_weights)
    if tau_plus > 0.0:
        m = neg_logits.shape[1] if num_negatives is None else num_negatives
        log_mass = debias_log_mass(
            log_mass, pos_logits, tau_plus=tau_plus, num_negatives=m, temperature=temperature
        )
    return torch.logaddexp(pos_logits, log_mass) - pos_logits
