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

Cost: the influence score needs, by its definition, ``sum_k p_ik z_k`` for every anchor and
``delta_i . delta_j`` for every pair, two (with a pool three) products of the size of the score
matrix on top of InfoNCE's; everything else is a few passes over the ``[A, C]`` scores, and
the weights are never materialised (the objective fuses them, see
:func:`hardneg.objective.tilted_log_negative_mass`). The shifted exponentials
``E = e^{c - max c}`` of the softmax are computed once and handed to the objective
(``NegativeSelection.tilt_shifted``); the min-max normalisation and the mix run a block of rows at
a time so that each block is read and rewritten in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._buffers import FreeBuffers
from hardneg._checks import check_choice, check_number
from hardneg.objective import _row_blocks
from hardneg.pool import ContrastiveScores
from hardneg.strategies.base import NegativeSelection, StrategyInputs
from hardneg.strategies.importance import ImportanceNegatives


def _row_softmax_parts(
    scores: ContrastiveScores, buffers: FreeBuffers | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``E = e^{c - m}`` ``[A, C]``, the row maxima of the logits ``m`` ``[A]`` and the log
    partition ``log Z = log(sum_k E_k + e^{a - m})`` ``[A]`` of each anchor's softmax over
    positive and negatives. ``E`` and ``m`` are exactly the objective's shifted exponentials
    (:func:`hardneg.objective.tilted_log_negative_mass`), which reuses them; ``E`` is a buffer
    of ``buffers`` if given."""
    logits = scores.logits.detach().float()
    pos = scores.pos_logits.detach()
    row_max = logits.amax(dim=1)
    if buffers is None:
        e = logits - row_max.unsqueeze(1)
    else:
        e = buffers.get("exp", tuple(logits.shape), logits.dtype, logits.device)
        torch.sub(logits, row_max.unsqueeze(1), out=e)
    e.exp_()  # masked -inf -> 0
    # the row maximum contributes e^0 = 1, so the log is finite; e^{a - m} may be huge
    log_z = torch.logaddexp(e.sum(dim=1).log(), pos - row_max)
    return e, row_max, log_z


def anchor_gradients(scores: ContrastiveScores, parts=None) -> Tensor:
    """``delta_i = (1/t)(sum_k p_ik z_k - z_{i+})``: InfoNCE gradient w.r.t. each anchor ``[A, d]``."""
    e, row_max, log_z = _row_softmax_parts(scores) if parts is None else parts
    p_pos = (scores.pos_logits.detach() - row_max - log_z).exp_().unsqueeze(1)
    # in place on the product: the same operations, in the same order, fewer temporaries
    expected = (e @ scores.candidates).mul_((-log_z).exp_().unsqueeze(1))
    expected.add_(p_pos * scores.positives).sub_(scores.positives)
    return expected.div_(scores.temperature)


def pool_gradients(scores: ContrastiveScores, parts=None) -> Tensor:
    """``delta_j`` of each pool entry as an anchor of its own against the batch ``[K, d]``.

    ``p~_j = softmax_i(c_ij)`` reuses the row-shifted ``E_ij = e^{c_ij - m_i}``:
    ``e^{c_ij - G} = E_ij e^{m_i - G}`` with ``G = max_i m_i`` (no overflow; exponents stay above
    ``-2/t``, so this is exact unless ``t < 0.025``, where the column softmax is taken directly).
    """
    logits = scores.logits.detach()
    if scores.temperature < 0.025 or scores.neg_mask is not None:
        p = torch.softmax(logits, dim=0)  # [A, K], over the batch
        p = torch.nan_to_num(p, nan=0.0)  # an entry masked for every anchor has no distribution
        return (p.T @ scores.anchors - scores.candidates) / scores.temperature
    e, row_max, _ = _row_softmax_parts(scores) if parts is None else parts
    w = (row_max - row_max.max()).exp()  # [A]
    # numerator and partition apart: a [d]-wide product is faster than a [d + 1]-wide one
    expected = (e.T @ (scores.anchors * w.unsqueeze(1))) / (w @ e).unsqueeze(1)
    return (expected - scores.candidates) / scores.temperature


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


def _affine_to_unit(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale, offset)`` with ``scale * x + offset = (x - lo) / (hi - lo)``; 0 for constant rows."""
    span = hi - lo
    scale = torch.where(span > 0, span.reciprocal(), 0.0)  # 1/0 = inf is never selected
    return scale, -lo * scale


def _in_batch_masked_index(scores: ContrastiveScores) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, and for each row its own column and its positive's (the non-negatives)."""
    rows = torch.arange(scores.logits.shape[0], device=scores.logits.device)
    assert scores.positive_index is not None
    return rows, rows, scores.positive_index


def _column_range(col: Tensor, scores: ContrastiveScores) -> tuple[Tensor, Tensor]:
    """Per-row min and max of a per-candidate score ``col`` ``[C]`` over each anchor's negatives."""
    a = scores.logits.shape[0]
    if scores.neg_mask is None:
        return col.min().expand(a), col.max().expand(a)
    if scores.in_batch:
        # the extremes over all but two columns are among the three smallest / largest
        rows, own, pos = _in_batch_masked_index(scores)
        out = []
        for largest in (False, True):
            idx = col.topk(min(3, col.shape[0]), largest=largest).indices  # [3], best first
            allowed = (idx.unsqueeze(0) != own.unsqueeze(1)) & (
                idx.unsqueeze(0) != pos.unsqueeze(1)
            )
            first = allowed.int().argmax(dim=1)  # first allowed of the three
            out.append(col[idx[first]])
        return out[0], out[1]
    expanded = col.unsqueeze(0).expand(a, -1)
    return (
        expanded.masked_fill(~scores.neg_mask, float("inf")).amin(dim=1),
        expanded.masked_fill(~scores.neg_mask, float("-inf")).amax(dim=1),
    )


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
        self._free_buffers = FreeBuffers()  # CPU buffers of E and the mix

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
        with torch.no_grad():
            return self._influence(scores, inputs, _row_softmax_parts(scores), exact_h=True)

    def _influence(
        self, scores: ContrastiveScores, inputs: StrategyInputs, parts, *, exact_h: bool
    ) -> Tensor:
        """``U``; with ``exact_h=False`` and ``h = z`` the factor ``cos(h_i, h_j) = s_ij`` is taken
        as the logits ``s_ij / t`` (a positive scale that the min-max normalisation removes) and
        the non-negative entries are left arbitrary."""
        delta_a = anchor_gradients(scores, parts)
        delta_c = delta_a if scores.in_batch else pool_gradients(scores, parts)
        h_a, h_c = inputs.anchor_features, inputs.candidate_features
        if self.influence == "gradient_norm":
            h_norm = (
                scores.candidates.norm(dim=1) if h_c is None else h_c.detach().float().norm(dim=1)
            )
            return (delta_c.norm(dim=1) * h_norm).unsqueeze(0)
        unit_a = F.normalize(delta_a, dim=1)
        unit_c = unit_a if delta_c is delta_a else F.normalize(delta_c, dim=1)
        if exact_h or torch.is_autocast_enabled(unit_a.device.type):
            u = unit_a @ unit_c.T
        else:  # the mix, saved by the objective for the backward
            shape = (unit_a.shape[0], unit_c.shape[0])
            u = torch.mm(
                unit_a,
                unit_c.T,
                out=self._free_buffers.get("mix", shape, unit_a.dtype, unit_a.device),
            )
        if h_a is None or h_c is None:
            if exact_h:
                cos_h = scores.similarities.detach()  # h = z: cos(z_i, z_j) = s_ij
                if scores.neg_mask is not None:
                    cos_h = cos_h.masked_fill(~scores.neg_mask, 0.0)
                return u * cos_h
            logits = scores.logits.detach()
            if scores.neg_mask is not None and not scores.in_batch:
                logits = logits.masked_fill(~scores.neg_mask, 0.0)
            # in-batch the two non-negatives per row turn non-finite here; _finish_rows and
            # mix() overwrite exactly those entries
            return u.mul_(logits)
        cos_h = (
            F.normalize(h_a.detach().float(), dim=1) @ F.normalize(h_c.detach().float(), dim=1).T
        )
        return u.mul_(cos_h)

    @staticmethod
    def representativeness_scores(scores: ContrastiveScores) -> Tensor:
        """``D_j = mean_{k != j}(1 - s_jk)`` over the candidates, ``[1, C]``."""
        z = scores.candidates.detach()
        c = z.shape[0]
        total = z.sum(dim=0)
        mean_sim = (z @ total - (z * z).sum(dim=1)) / max(c - 1, 1)
        return (1.0 - mean_sim).unsqueeze(0)

    def mix(self, scores: ContrastiveScores, inputs: StrategyInputs) -> Tensor:
        """``lambda_u U~ + lambda_d D~ + eps`` ``[A, C]``, 0 at non-negatives.

        Each min-max normalised score enters as ``scale_i * x + offset_i`` (its range over
        anchor ``i``'s negatives), so the mix is built in place from the influence matrix.
        """
        return self._mix(scores, inputs, None)

    def _mix(self, scores: ContrastiveScores, inputs: StrategyInputs, parts) -> Tensor:
        a = scores.logits.shape[0]
        eps = torch.full((a,), self.eps, device=scores.logits.device)
        d = d_term = d_off = None
        if self.lambda_d > 0:
            d = self.representativeness_scores(scores)[0]
            lo, hi = _column_range(d, scores)
            scale, off = _affine_to_unit(lo, hi)
            if self.representativeness == "density":  # 1 - D~
                scale, off = -scale, 1.0 - off
            d_term, d_off = scale * self.lambda_d, self.lambda_d * off
        u = None
        if self.lambda_u > 0:
            parts = _row_softmax_parts(scores) if parts is None else parts
            u = self._influence(scores, inputs, parts, exact_h=False)
        if u is not None and self.influence == "gradient_similarity":
            # every step below is row-wise: run them a block of rows at a time, in cache
            for rows in _row_blocks(u):
                self._finish_rows(u, rows, scores, eps, d, d_term, d_off)
            return u
        offset = eps
        mix = None
        if u is not None:  # gradient_norm: one score per candidate
            lo, hi = _column_range(u[0], scores)
            scale, off = _affine_to_unit(lo, hi)
            mix = torch.outer(scale * self.lambda_u, u[0])
            offset = offset + self.lambda_u * off
        if d is not None:
            assert d_term is not None and d_off is not None
            if mix is None:
                mix = torch.outer(d_term, d)
            else:
                mix.addcmul_(d_term.unsqueeze(1), d.unsqueeze(0))
            offset = offset + d_off
        assert mix is not None
        mix.add_(offset.unsqueeze(1)).clamp_(min=self.eps)
        if scores.neg_mask is not None:
            if scores.in_batch:
                rows, own, pos = _in_batch_masked_index(scores)
                mix[rows, own] = 0.0
                mix[rows, pos] = 0.0
            else:
                mix.masked_fill_(~scores.neg_mask, 0.0)
        return mix

    def _finish_rows(
        self,
        u: Tensor,
        rows: slice,
        scores: ContrastiveScores,
        eps: Tensor,
        d: Tensor | None,
        d_term: Tensor | None,
        d_off: Tensor | None,
    ) -> None:
        """Turn rows ``rows`` of the influence matrix into the mix, in place: the same
        operations, in the same order, as on the whole matrix (:meth:`_mix`)."""
        block = u[rows]
        index = mask = None
        if scores.neg_mask is not None and scores.in_batch:
            assert scores.positive_index is not None
            index = torch.arange(rows.start, rows.start + block.shape[0], device=u.device)
            local = torch.arange(block.shape[0], device=u.device)
            # give the two non-negatives a negative's value: (i + 1) mod 2N is one
            filler = block[local, (index + 1) % u.shape[1]]
            block[local, index] = filler
            block[local, scores.positive_index[rows]] = filler
        elif scores.neg_mask is not None:
            mask = scores.neg_mask[rows]
        if mask is None:
            lo, hi = block.amin(dim=1), block.amax(dim=1)
        else:  # the range over the anchor's negatives only
            lo = block.masked_fill(~mask, float("inf")).amin(dim=1)
            hi = block.masked_fill(~mask, float("-inf")).amax(dim=1)
        scale, off = _affine_to_unit(lo, hi)
        block.mul_((scale * self.lambda_u).unsqueeze(1))
        offset = eps[rows] + self.lambda_u * off
        if d is not None:
            assert d_term is not None and d_off is not None
            block.addcmul_(d_term[rows].unsqueeze(1), d.unsqueeze(0))
            offset = offset + d_off[rows]
        block.add_(offset.unsqueeze(1)).clamp_(min=self.eps)
        if index is not None:
            block[local, index] = 0.0
            block[local, scores.positive_index[rows]] = 0.0
        elif mask is not None:
            block.masked_fill_(~mask, 0.0)

    def select(self, scores: ContrastiveScores, inputs: StrategyInputs) -> NegativeSelection:
        beta = self.current_beta(inputs.progress)
        if self.lambda_u == 0 and self.lambda_d == 0:
            return super().select(scores, inputs)  # the eps factor is a constant: HCL exactly
        with torch.no_grad():
            # E = e^{c - max c} serves the influence score and the objective's tilted mass
            parts = _row_softmax_parts(scores, self._free_buffers) if self.lambda_u > 0 else None
            mix = self._mix(scores, inputs, parts)
        return NegativeSelection(
            logits=scores.logits,
            tilt=beta,
            tilt_factor=mix,
            tilt_grad=not self.detach_weights,
            tilt_shifted=None if parts is None else (parts[1], parts[0]),
        )
