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

Shared columns only: the influence and representativeness scores are defined over the shared
columns; per-anchor explicit columns (retrieval hard negatives) are not supported yet.

Cost: the influence score needs, by its definition, ``sum_k p_ik z_k`` for every anchor and
``delta_i . delta_j`` for every pair, two (with a pool three) products of the size of the score
matrix on top of InfoNCE's, and ``cos(h_i, h_j)`` one more. Fast path (``context.fast``, InfoNCE
objective): the row exponentials ``e^{c - max}`` (cosine logits in range: ``e^{c}``, no shift)
once for the influence score's softmax, the pool's column softmax and the objective
(:func:`hardneg.fastpaths.row_exponentials`); for ``cos(delta_i, delta_j)`` only the deltas'
directions (no softmax normaliser);
``cos(h_i, h_j) = t c_ij`` read from the logits when ``h = z`` is L2-normalised; the mix in one
buffer, up to a per-row constant that the normalised weights cancel
(:func:`hardneg.fastpaths.unremix_factor`); the weighted negative mass with the mix as a factor
in one fused pass over the mix's and the exponentials' own buffers, and in-batch a backward to
the embeddings by one product ``(G + G^T) z / t`` where the score matrix's takes two
(:func:`hardneg.fastpaths.tilted_log_mass` with ``overwrite`` and ``gram``): in-batch four
products of the score matrix's size against InfoNCE's three, with a pool five against two; each
tested equal to the plain form.

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("unremix", beta=1.0, lambda_u=1.0, lambda_d=1.0)
    >>> bool(loss_fn(torch.randn(8, 16), torch.randn(8, 16)) > 0)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg import fastpaths
from hardneg._checks import check_choice, check_flag, check_number
from hardneg.contrast import ContrastSet
from hardneg.registry import register_strategy
from hardneg.strategies.base import Selection, StepContext, Strategy, normalised_log_weights
from hardneg.strategies.importance import hcl_selection


def softmax_expectation(contrast: ContrastSet) -> tuple[Tensor, Tensor]:
    """``(sum_k p_ik z_k [A, d], p_i+ [A])`` under each anchor's InfoNCE softmax ``p`` over its
    first positive and its negatives (detached)."""
    logits = contrast.negative_logits.detach()
    pos = contrast.positive_logits.detach()[:, :1]
    log_z = torch.logaddexp(torch.logsumexp(logits, dim=1, keepdim=True), pos)
    p = (logits - log_z).exp()  # masked -inf -> 0
    return p @ contrast.columns.detach(), (pos - log_z).exp().squeeze(1)


def anchor_gradients(contrast: ContrastSet) -> Tensor:
    """``delta_i = (1/t)(sum_k p_ik z_k - z_{i+})``: InfoNCE gradient w.r.t. each anchor ``[A, d]``
    (``z_k`` over the positive and the negatives; the first positive when there are several)."""
    expected, p_pos = softmax_expectation(contrast)
    positive = contrast.positives.detach()[:, 0]
    return (expected + p_pos.unsqueeze(1) * positive - positive) / contrast.temperature


def anchor_gradient_directions(contrast: ContrastSet) -> Tensor:
    """``delta_i`` of :func:`anchor_gradients` times ``t / (1 - p_i+) > 0`` ``[A, d]``:
    ``sum_j p'_ij (z_j - z_{i+})`` with ``p'`` the softmax over the negatives alone (the
    positive's own term is 0), for ``cos(delta_i, delta_j)``. Where the positive dominates,
    ``p_i+`` rounds to 1 and ``delta_i``'s two terms cancel to nothing (its direction lost: an
    influence of 0); this form keeps it (as the fast path's
    :func:`hardneg.fastpaths.anchor_deltas` with ``direction``). 0 without negatives."""
    p = torch.softmax(contrast.negative_logits.detach(), dim=1)
    p = torch.nan_to_num(p, nan=0.0)  # an anchor without negatives: a row of -inf
    positive = contrast.positives.detach()[:, 0]
    return p @ contrast.columns.detach() - p.sum(dim=1, keepdim=True) * positive


def column_gradients(contrast: ContrastSet) -> Tensor:
    """``delta_j`` of each shared column as an anchor of its own: in-batch, the anchors' own
    (the columns are the anchors); otherwise (a pool) ``(1/t)(sum_i p~_ji q_i - z_j)`` with
    ``p~_j = softmax_i(c_ij)`` over the anchors that have ``j`` as a negative."""
    if contrast.columns is contrast.anchors:
        return anchor_gradients(contrast)
    p = torch.softmax(contrast.negative_logits.detach(), dim=0)
    p = torch.nan_to_num(p, nan=0.0)  # a column masked for every anchor has no distribution
    return (p.T @ contrast.anchors.detach() - contrast.columns.detach()) / contrast.temperature


def minmax_over_negatives(x: Tensor, mask: Tensor) -> Tensor:
    """Rescale each row to [0, 1] over the anchor's negatives (constant rows become 0)."""
    lo = x.masked_fill(~mask, float("inf")).amin(dim=1, keepdim=True)
    hi = x.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return out.masked_fill(~mask, 0.0)


@register_strategy(
    "unremix",
    summary="UnReMix (Tabassum et al. 2022), our reconstruction: similarity x uncertainty x representativeness",
)
class UnReMixNegatives(Strategy):
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

    loss_defaults = {"tau_plus": 0.1}
    feature_kind = "hidden"
    per_anchor_columns = False

    def __init__(
        self,
        *,
        beta: float = 1.0,
        lambda_u: float = 1.0,
        lambda_d: float = 1.0,
        eps: float = 0.1,
        influence: str = "gradient_similarity",
        representativeness: str = "diversity",
        detach_weights: bool = False,
    ) -> None:
        super().__init__()
        self.beta = check_number("beta", beta, low=0.0)
        self.lambda_u = check_number("lambda_u", lambda_u, low=0.0)
        self.lambda_d = check_number("lambda_d", lambda_d, low=0.0)
        self.eps = check_number("eps", eps, low=0.0, low_inclusive=False)
        self.influence = check_choice(
            "influence", influence, ("gradient_similarity", "gradient_norm")
        )
        self.representativeness = check_choice(
            "representativeness", representativeness, ("diversity", "density")
        )
        self.detach_weights = check_flag("detach_weights", detach_weights)

    def influence_scores(self, contrast: ContrastSet) -> Tensor:
        """``U``: ``[A, C]`` for ``gradient_similarity``, ``[1, C]`` for ``gradient_norm``."""
        with torch.no_grad():
            # the cosine needs only the directions, which survive a dominant positive
            norm = self.influence == "gradient_norm"
            delta_a = anchor_gradients(contrast) if norm else anchor_gradient_directions(contrast)
            # in-batch the columns are the anchors: their deltas are the same, computed once
            delta_c = (
                delta_a if contrast.columns is contrast.anchors else column_gradients(contrast)
            )
            h_a, h_c = contrast.anchor_features, contrast.column_features
            if h_a is None or h_c is None:  # h = z
                h_a, h_c = contrast.anchors, contrast.columns
            h_a, h_c = h_a.detach().to(delta_a.dtype), h_c.detach().to(delta_a.dtype)
            if norm:
                return (delta_c.norm(dim=1) * h_c.norm(dim=1)).unsqueeze(0)
            cos_delta = F.normalize(delta_a, dim=1) @ F.normalize(delta_c, dim=1).T
            return cos_delta * (F.normalize(h_a, dim=1) @ F.normalize(h_c, dim=1).T)

    @staticmethod
    def representativeness_scores(contrast: ContrastSet) -> Tensor:
        """``D_j = mean_{k != j}(1 - s_jk)`` over the shared columns, ``[1, C]``."""
        z = contrast.columns.detach()
        c = z.shape[0]
        mean_sim = (z @ z.sum(dim=0) - (z * z).sum(dim=1)) / max(c - 1, 1)
        return (1.0 - mean_sim).unsqueeze(0)

    def mix(self, contrast: ContrastSet) -> Tensor:
        """``lambda_u U~ + lambda_d D~ + eps`` ``[A, C]`` (min-max over each anchor's negatives),
        0 where a column is not a negative."""
        mask = contrast.mask()
        mix = torch.full_like(contrast.negative_logits, self.eps)
        if self.lambda_u > 0:
            u = self.influence_scores(contrast).expand_as(mix)
            mix = mix + self.lambda_u * minmax_over_negatives(u, mask)
        if self.lambda_d > 0:
            d = minmax_over_negatives(self.representativeness_scores(contrast).expand_as(mix), mask)
            if self.representativeness == "density":
                d = 1.0 - d
            mix = mix + self.lambda_d * d
        return mix.masked_fill(~mask, 0.0)

    def fast_mix(self, contrast: ContrastSet, shifted: tuple[Tensor | None, Tensor]) -> Tensor:
        """:meth:`mix` up to a positive constant per row, from the row exponentials ``shifted``
        (:func:`hardneg.fastpaths.row_exponentials`): :func:`hardneg.fastpaths.unremix_factor`
        with these hyper-parameters. Detached."""
        with torch.no_grad():
            return fastpaths.unremix_factor(
                contrast,
                shifted,
                lambda_u=self.lambda_u,
                lambda_d=self.lambda_d,
                eps=self.eps,
                gradient_norm=self.influence == "gradient_norm",
                density=self.representativeness == "density",
                zero_absent=self.beta == 0,
                plain_column_deltas=column_gradients,
            )

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        if contrast.anchor_columns is not None:
            raise ValueError(
                "unremix scores the shared columns only; per-anchor hard-negative columns "
                "are not supported (use hcl, ring or another strategy with hard_negatives)"
            )
        if self.lambda_u == 0 and self.lambda_d == 0:  # the eps factor is a constant: HCL exactly
            return hcl_selection(contrast, context, self.beta, self.detach_weights)
        logits = contrast.negative_logits
        if context.fast and context.want_log_mass:
            # e^{c - m} once: the influence score's softmax and the objective's tilted mass;
            # cosine logits (|c| <= 1/t): the tilted mass forms e^{(1 + beta) c}, so no shift
            # (m = 0) when that stays within range
            bound = (1.0 + max(self.beta, 1.0)) / contrast.temperature
            shifted = fastpaths.row_exponentials(logits, bound if contrast.normalized else None)
            mix = self.fast_mix(contrast, shifted)
            log_mass = fastpaths.tilted_log_mass(
                logits,
                self.beta,
                contrast.num_negatives,
                factor=mix,
                tilt_grad=not self.detach_weights,
                shifted=shifted,
                overwrite=True,  # the mix and the exponentials are this step's scratch
                # in-batch (c = z z^T / t): the gradient to z by one product, (G + G^T) z / t
                gram=(contrast.anchors, contrast.temperature)
                if contrast.columns is contrast.anchors and contrast.anchor_columns is None
                else None,
                # columns that take no gradient (a pool): the gradient to the anchors, G C / t,
                # a block of rows at a time (no [A, C] gradient buffer)
                columns=(contrast.anchors, contrast.columns, contrast.temperature)
                if contrast.columns is not contrast.anchors and not contrast.columns.requires_grad
                else None,
            )
            return Selection(negative_log_mass=log_mass)
        with torch.no_grad():
            mix = self.mix(contrast)
        tilted = logits.detach() if self.detach_weights else logits
        log_w = (tilted * self.beta if self.beta != 0 else torch.zeros_like(tilted)) + mix.log()
        return Selection(negative_log_weights=normalised_log_weights(log_w, contrast))
