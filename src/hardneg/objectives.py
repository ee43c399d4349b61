"""Objectives: a contrast set and a strategy's selection -> per-anchor loss, in log space.

**InfoNCE family** (:func:`infonce_objective`). For anchor ``i`` with positives ``a_ip = s(i,p)/t``
(weights ``v_ip``), the strategy's negatives ``c_ij = s(i,j)/t`` with weights ``w_ij`` and ``M_i``
negatives:

    R_i     = sum_j w_ij e^{c_ij}                                       (weighted negative mass)
    Ng_ip   = max( (R_i - tau_plus M_i e^{a_ip}) / (1 - tau_plus),  M_i e^{-1/t} )
    separate: l_ip = log(e^{a_ip} + Ng_ip) - a_ip                  (each positive its own partition)
    joint:    l_ip = log(sum_{p'} e^{a_ip'} + Ng_ip) - a_ip        (all positives in the partition)
    l_i     = sum_p v_ip l_ip / sum_p v_ip      (``positive_reduction='mean'``; ``'sum'``: no division)
    pooled:   l_i  = log(P_i + Ng_i) - log P_i,  P_i = sum_p v_ip e^{a_ip}   (one term per anchor)

The debiasing and its clamp (Chuang et al., NeurIPS 2020, "Debiased Contrastive Learning") apply
only when ``tau_plus > 0``; with one positive, ``tau_plus = 0`` and ``w = 1`` this is InfoNCE /
NT-Xent exactly. ``separate`` with several positives is SupCon's ``L_out`` form (Khosla et al.
2020); ``joint`` with ``'sum'`` is potential-sample mining's mined loss (Dong et al. 2023);
``pooled`` (the positives' total mass against the partition; SupCon's ``L_in`` less the
constant ``log |P_i|``, the number of positives; MIL-NCE's form) is solo-learn's multi-crop SimCLR loss, and with ``tau_plus > 0`` its
``Ng_i`` is debiased with the positives' mean mass ``P_i / sum_p v_ip`` in place of ``e^{a_i}``.

**Jensen-Shannon family** (:func:`jsd_objective`), the Fenchel-dual estimator of Deep InfoMax /
InfoGraph (Hjelm et al. 2019; Sun et al., ICLR 2020) on the same contrast set, with the
strategy's weights (mean 1 over the negatives) on the negative expectation:

    E+_i = sum_p v_ip (log 2 - softplus(-a_ip)) / sum_p v_ip
    E-_i = sum_j w_ij softplus(c_ij) / sum_j w_ij  - log 2      (mean over the kept negatives)
    l_i  = E-_i - E+_i

An anchor that keeps no negative (all ``w_ij = 0``) has no negative expectation: ``E-_i = 0``
(no debiasing correction either) and ``l_i = -E+_i``.

and with ``tau_plus > 0`` the debiased form of HCL's graph code (``JSD_hard``):
``E-_i -> (E-_i + log 2) / (1 - tau_plus) - log 2`` and ``E+_i -> E+_i - tau_plus / (1 - tau_plus)
* sum_p v_ip softplus(a_ip) / sum_p v_ip``. (The authors' code keeps the ``- log 2`` of ``Eq``
inside the division for ``beta = 0``; that differs by a constant, not in any gradient.)

**Joint partition of two anchors of one pair** (:func:`joint_partition_loss`), the "improved
contrastive loss" of GTE (Li et al. 2023, arXiv 2308.03281) and ``partition_mode='joint'`` of
sentence-transformers' ``MultipleNegativesRankingLoss``: a query ``q_i`` and its document ``d_i``
share one partition, ``Z_i = Zq_i + Zd_i`` with ``Zq_i`` the InfoNCE partition of ``q_i``'s set
(its positive ``e^{a_i}`` and its negatives) and ``Zd_i`` that of ``d_i``'s (positive ``q_i``, the
same ``e^{a_i}``). With ``l = log Z - a`` the per-anchor InfoNCE loss of each set:

    with d_i's positive term:     l_i = log(Zq_i + Zd_i) - a_i         = logaddexp(lq_i, ld_i)
    without it (only its negatives): l_i = log(Zq_i + Zd_i - e^{a_i}) - a_i
                                     = logaddexp(lq_i, log(e^{ld_i} - 1))

Every sum is a log-sum-exp or a softplus, so ``t = 0.05`` with ``beta = 10`` neither overflows nor
underflows; logits arrive in float32 or float64 (:mod:`hardneg.contrast`).

Example (uniform weights, one positive, ``tau_plus = 0``: the cross-entropy of InfoNCE):
    >>> import torch, torch.nn.functional as F
    >>> from hardneg.contrast import pool_contrast
    >>> from hardneg.objectives import infonce_objective
    >>> from hardneg.strategies import Selection
    >>> c = pool_contrast(torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8), temperature=0.5)
    >>> loss = infonce_objective(c, Selection())  # one value per anchor
    >>> logits = torch.cat([c.positive_logits, c.negative_logits], dim=1)  # the positive first
    >>> target = torch.zeros(4, dtype=torch.long)
    >>> torch.allclose(loss, F.cross_entropy(logits, target, reduction="none"), atol=1e-6)
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg import fastpaths
from hardneg.contrast import ContrastSet
from hardneg.strategies.base import Selection

OBJECTIVES = ("infonce", "jsd")
POSITIVE_MODES = ("separate", "joint", "pooled")
POSITIVE_REDUCTIONS = ("mean", "sum")


def _num_negatives(contrast: ContrastSet, selection: Selection) -> int | Tensor:
    m = contrast.num_negatives if selection.num_negatives is None else selection.num_negatives
    extra = selection.extra_negative_logits
    if extra is not None:
        m = m + extra.shape[1]
    return m


def _column(x: int | float | Tensor) -> float | Tensor:
    """A per-anchor quantity as something that broadcasts against ``[A, P]``."""
    if isinstance(x, Tensor):
        return x.unsqueeze(1)  # debias_log_mass converts it to the logits' dtype
    return float(x)


def positive_terms(contrast: ContrastSet, selection: Selection) -> tuple[Tensor, Tensor]:
    """``(a [A, P'], v [A, P'])``: every positive logit and its weight (extras appended)."""
    pos = contrast.positive_logits
    weight = (
        contrast.positive_weight if selection.positive_weight is None else selection.positive_weight
    )
    if selection.extra_positive_logits is not None:
        extra = selection.extra_positive_logits
        extra_w = (
            torch.ones_like(extra)
            if selection.extra_positive_weight is None
            else selection.extra_positive_weight.to(extra.dtype)
        )
        pos = torch.cat([pos, extra], dim=1)
        weight = torch.cat([weight, extra_w], dim=1)
    return pos, weight.to(pos.dtype)


def safe_logsumexp(x: Tensor, dim: int = 1) -> Tensor:
    """``logsumexp`` that is ``-inf`` with a zero gradient (not NaN) on an all ``-inf`` row."""
    kept = torch.isfinite(x).any(dim=dim, keepdim=True)
    out = torch.logsumexp(torch.where(kept, x, 0.0), dim=dim)
    return out.masked_fill(~kept.squeeze(dim), float("-inf"))


def log_negative_mass(contrast: ContrastSet, selection: Selection, fast: bool = False) -> Tensor:
    """``log R_i = log sum_j w_ij e^{c_ij}`` ``[A]`` (``-inf`` entries are absent negatives).

    With weights, a strategy may drop every negative of an anchor: the sum is then empty,
    ``log R = -inf`` and the loss term ``log(e^a + 0) - a = 0`` with a zero gradient.
    ``fast``: by :func:`hardneg.fastpaths.log_mass` (the same values, ``-inf`` with a zero
    gradient on an empty row too; a one-pass backward), unweighted cosine logits with the
    ``1/t`` bound (:func:`hardneg.fastpaths.contrast_log_mass`)."""
    if selection.negative_log_mass is not None:
        log_mass = selection.negative_log_mass
    elif selection.negative_log_weights is not None:
        terms = contrast.negative_logits + selection.negative_log_weights
        log_mass = fastpaths.log_mass(terms) if fast else safe_logsumexp(terms)
    elif fast:
        log_mass = fastpaths.contrast_log_mass(contrast)
    else:
        log_mass = torch.logsumexp(contrast.negative_logits, dim=1)
    if selection.extra_negative_logits is not None:
        log_mass = torch.logaddexp(
            log_mass, torch.logsumexp(selection.extra_negative_logits, dim=1)
        )
    return log_mass


def debias_log_mass(
    log_mass: Tensor,
    pos_logits: Tensor,
    *,
    tau_plus: float,
    num_negatives: int | float | Tensor,
    temperature: float,
) -> Tensor:
    """``log Ng`` of the debiased estimator from ``log R`` (broadcast against ``pos_logits``).

    ``R - tau_plus M e^{a}`` is ``log R + log(1 - exp(log(tau_plus M e^a) - log R))``; where that
    is not positive the clamp ``M e^{-1/t}`` holds, as ``torch.clamp`` does in the reference code
    (no gradient through the clamped branch, never NaN).
    """
    if tau_plus == 0.0:
        return log_mass
    log_m = (
        num_negatives.to(pos_logits.dtype).log()
        if isinstance(num_negatives, Tensor)
        else math.log(num_negatives)
    )
    floor = log_m - 1.0 / temperature
    gap = math.log(tau_plus) + log_m + pos_logits - log_mass  # < 0: a positive mass remains
    positive = gap < 0
    safe_gap = torch.where(positive, gap, -1.0)  # keep the unused branch finite
    corrected = log_mass + torch.log(-torch.expm1(safe_gap)) - math.log1p(-tau_plus)
    corrected = torch.where(positive, corrected, floor)
    return torch.maximum(
        corrected, torch.as_tensor(floor, dtype=corrected.dtype, device=corrected.device)
    )


def infonce_objective(
    contrast: ContrastSet,
    selection: Selection,
    *,
    tau_plus: float = 0.0,
    positive_mode: str = "separate",
    positive_reduction: str = "mean",
    fast: bool = False,
) -> Tensor:
    """Per-anchor InfoNCE-family loss ``[A]`` (see the module docstring). ``fast``: with one
    positive and ``tau_plus > 0``, the debiased terms by :func:`hardneg.fastpaths.debiased_infonce`
    (fewer ops, equal values and gradients; never under ``torch.compile``)."""
    if positive_mode not in POSITIVE_MODES or positive_reduction not in POSITIVE_REDUCTIONS:
        raise ValueError(
            f"positive_mode must be one of {POSITIVE_MODES} and positive_reduction one of "
            f"{POSITIVE_REDUCTIONS}, got {positive_mode!r} and {positive_reduction!r}"
        )
    if (
        fast
        and selection.unit_positive_weights
        and tau_plus == 0.0
        and positive_mode == "joint"
        and positive_reduction == "sum"
        and selection.extra_positive_logits is not None
    ):  # every weight 1: the joint terms without the weights' ops (the same values)
        return fastpaths.joint_positive_infonce(
            contrast.positive_logits,
            selection.extra_positive_logits,
            log_negative_mass(contrast, selection, fast),
        )
    pos, weight = positive_terms(contrast, selection)
    if fast and tau_plus > 0.0 and pos.shape[1] == 1 and positive_reduction == "mean":
        return fastpaths.debiased_infonce(
            log_negative_mass(contrast, selection, fast),
            pos.squeeze(1),  # a view (its backward too; a select's backward writes zeros)
            tau_plus=tau_plus,
            num_negatives=_num_negatives(contrast, selection),
            temperature=contrast.temperature,
        )
    log_mass = log_negative_mass(contrast, selection, fast).unsqueeze(1)  # [A, 1]
    if positive_mode == "pooled":  # one term per anchor: the positives' mass against Z
        log_w = torch.where(weight > 0, weight, 1.0).log()
        present = torch.where(weight > 0, pos + log_w, float("-inf"))  # log(v e^a)
        log_pos = torch.logsumexp(present, dim=1, keepdim=True)
        if tau_plus > 0.0:  # the positives' mean mass stands for the one positive's e^a
            mean_pos = log_pos - weight.sum(dim=1, keepdim=True).log()
            m = _column(_num_negatives(contrast, selection))
            log_mass = debias_log_mass(
                log_mass,
                mean_pos,
                tau_plus=tau_plus,
                num_negatives=m,
                temperature=contrast.temperature,
            )
        return (torch.logaddexp(log_pos, log_mass) - log_pos).squeeze(1)
    if tau_plus > 0.0:
        m = _column(_num_negatives(contrast, selection))
        log_ng = debias_log_mass(
            log_mass, pos, tau_plus=tau_plus, num_negatives=m, temperature=contrast.temperature
        )
    else:
        log_ng = log_mass
    if positive_mode == "joint" and pos.shape[1] > 1:
        present = torch.where(weight > 0, pos, float("-inf"))
        log_pos = torch.logsumexp(present, dim=1, keepdim=True)
        per_positive = torch.logaddexp(log_pos, log_ng) - pos
    else:
        per_positive = torch.logaddexp(pos, log_ng) - pos
    if pos.shape[1] == 1 and positive_reduction == "mean":
        return per_positive.squeeze(1)  # one positive: its weight cancels
    per_positive = torch.where(weight > 0, per_positive, 0.0)  # padding may be non-finite
    total = (weight * per_positive).sum(dim=1)
    if positive_reduction == "sum":
        return total
    return total / weight.sum(dim=1)


def jsd_objective(contrast: ContrastSet, selection: Selection, *, tau_plus: float = 0.0) -> Tensor:
    """Per-anchor Jensen-Shannon (Fenchel-dual) loss ``[A]`` (see the module docstring).

    The negative expectation is the strategy-weighted mean over the anchor's kept negatives,
    ``sum_j w_ij sp(c_ij) / sum_j w_ij`` (a softmax of the log-weights: no overflow whatever the
    scale of ``w``); uniform weights give InfoGraph's mean, mean-1 weights HCL's estimator."""
    if selection.negative_log_mass is not None and selection.negative_log_weights is None:
        raise ValueError("the Jensen-Shannon objective needs dense negative weights")
    log2 = math.log(2.0)
    pos, weight = positive_terms(contrast, selection)
    weight = torch.where(weight > 0, weight, 0.0)
    # a padding positive (weight 0) may hold any logit, +-inf included: 0 * inf would be NaN
    pos = torch.where(weight > 0, pos, 0.0)
    norm = weight.sum(dim=1)
    e_pos = (weight * (log2 - F.softplus(-pos))).sum(dim=1) / norm
    logits = contrast.negative_logits
    log_w = (
        torch.zeros_like(logits)
        if selection.negative_log_weights is None
        else selection.negative_log_weights
    )
    log_w = log_w.masked_fill(~torch.isfinite(logits), float("-inf"))
    if selection.extra_negative_logits is not None:  # synthetic negatives, weight 1
        extra = selection.extra_negative_logits
        logits = torch.cat([logits, extra], dim=1)
        log_w = torch.cat([log_w, torch.zeros_like(extra)], dim=1)
    # an anchor that keeps no negative has no negative expectation (a mean over nothing): its
    # negative side, the debiasing correction included, is 0 and only E+ trains it (a softmax
    # over all -inf would be NaN)
    has_negative = (log_w > float("-inf")).any(dim=1)
    log_w = torch.where(has_negative.unsqueeze(1), log_w, 0.0)
    share = torch.softmax(log_w, dim=1)  # w / sum w, 0 where dropped
    finite = torch.where(share > 0, logits, 0.0)  # no -inf * 0
    mean_neg = (share * F.softplus(finite)).sum(dim=1)
    if tau_plus > 0.0:
        mean_neg = mean_neg / (1.0 - tau_plus)
        correction = tau_plus / (1.0 - tau_plus) * (weight * F.softplus(pos)).sum(dim=1) / norm
        e_pos = e_pos - torch.where(has_negative, correction, 0.0)
    e_neg = torch.where(has_negative, mean_neg - log2, 0.0)
    return e_neg - e_pos


def objective_loss(
    name: str,
    contrast: ContrastSet,
    selection: Selection,
    *,
    tau_plus: float = 0.0,
    positive_mode: str = "separate",
    positive_reduction: str = "mean",
    fast: bool = False,
) -> Tensor:
    """Dispatch to the objective called ``name`` (``'infonce'`` or ``'jsd'``); ``fast``: see
    :func:`infonce_objective`."""
    if name == "infonce":
        return infonce_objective(
            contrast,
            selection,
            tau_plus=tau_plus,
            positive_mode=positive_mode,
            positive_reduction=positive_reduction,
            fast=fast,
        )
    if name == "jsd":
        return jsd_objective(contrast, selection, tau_plus=tau_plus)
    raise ValueError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {name!r}")


def joint_partition_loss(
    query_side: Tensor, doc_side: Tensor, *, doc_side_positive: bool = True
) -> Tensor:
    """Per-pair loss of one partition shared by a query's and its document's contrast sets.

    ``query_side [A]`` and ``doc_side [A]`` are the per-anchor InfoNCE losses ``log Z - a`` of
    the query-anchored and the document-anchored sets of the same pairs (one positive each, of
    the same logit ``a``, no positives added by the strategy); ``doc_side_positive``: whether
    the document side's positive term (``e^{a}`` once more: the ``doc_to_query`` block holds the
    pair itself) belongs to the partition (see the module docstring). Returns ``[A]``.
    """
    if doc_side_positive:
        return torch.logaddexp(query_side, doc_side)
    # log(e^{l} - 1) = l + log(1 - e^{-l}): no overflow for a large l; l = 0 (no negative on
    # the document side) gives -inf with a zero gradient, not the infinite derivative at 0
    has_mass = doc_side > 0
    safe = torch.where(has_mass, doc_side, 1.0)
    log_negatives = torch.where(has_mass, safe + torch.log(-torch.expm1(-safe)), float("-inf"))
    return torch.logaddexp(query_side, log_negatives)
