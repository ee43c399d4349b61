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


class _TiltedLogMass(torch.autograd.Function):
    """``log R_i = log sum_j w_ij e^{c_ij}`` with ``w_ij = M e^{beta c_ij} f_ij / sum_k e^{beta c_ik} f_ik``.

    Equal to ``log M + LSE_j((1 + beta) c_ij + log f_ij) - LSE_j(beta c_ij + log f_ij)`` but
    computed from one shifted copy of the logits: with ``s = c - max_j c``, ``e = e^{s}`` and
    ``q = e^{beta s} f``, ``log R = log M + max_j c + log sum(q e) - log sum(q)``; the backward
    pass is ``dlogR/dc = (1 + beta) q e / sum(q e) - beta q / sum(q)`` (only the first term when
    the tilt is detached), three in-place passes. With ``beta = 1`` and a factor, ``q = e f`` is
    formed a block of rows at a time and never stored (saved: ``e`` and ``f``; the backward pass
    multiplies by ``e`` and then by ``f`` in place, no ``[A, S]`` temporary). Every exponent is
    <= 0 and the row maximum contributes ``e^0 f``, so nothing overflows and the sums stay
    positive for ``f > 0``.
    """

    @staticmethod
    def forward(ctx, logits, factor, beta, log_m, tilt_grad, shifted=None):  # type: ignore[override]
        if shifted is None:
            row_max = logits.amax(dim=1, keepdim=True)
            s = logits - row_max  # <= 0, -inf where absent
            e = None
        else:  # the strategy already has e = exp(c - max_j c): reuse it, a pass and a copy less
            row_max, e = shifted
            row_max = row_max.unsqueeze(1)
            s = None if beta in (0.0, 1.0, 2.0) else logits - row_max
        if beta in (0.0, 1.0, 2.0):
            # the common betas need no second exponential: e^{beta s} = 1, e or e * e
            if e is None:
                e = s.exp_()
            q = None if beta == 0.0 else (e if beta == 1.0 else e.square())
        else:
            assert s is not None
            q = (s * beta).exp_()
            if e is None:
                e = s.exp_()
        product = factor is not None and q is e  # q = e * f: never stored, formed per block
        if factor is not None and not product:
            # a fresh e^{beta s} (beta != 1) is scaled in place
            q = factor if q is None else q.mul_(factor)  # factor is 0 where absent
        assert q is not None and e is not None
        if product:
            sum_q, sum_qe = _product_sums(e, factor)
            ctx.save_for_backward(e, e, sum_q, sum_qe, factor)
        else:
            sum_q = q.sum(dim=1)
            sum_qe = _row_dot(q, e)
            ctx.save_for_backward(q, e, sum_q, sum_qe)
        ctx.beta, ctx.tilt_grad, ctx.product = beta, tilt_grad, product
        return log_m + row_max.squeeze(1) + sum_qe.log() - sum_q.log()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        q, e, sum_q, sum_qe, *factor = ctx.saved_tensors
        beta = ctx.beta if ctx.tilt_grad else 0.0
        out = e * ((1.0 + beta) * grad / sum_qe).unsqueeze(1)
        if beta != 0.0:
            out.sub_((beta * grad / sum_q).unsqueeze(1))
        if ctx.product:
            for rows in _row_blocks(out):  # (out e) f: within an ulp of out (e f), no temporary
                out[rows].mul_(e[rows]).mul_(factor[0][rows])
        else:
            out.mul_(q)
        return out, None, None, None, None, None


# On CPU, row blocks of about this many elements keep the temporaries of row-wise products in
# cache instead of allocating (and page-faulting) a whole [A, S] matrix; every row is reduced
# exactly as in one call, so the results are bit-identical.
_BLOCK = 1 << 18


def _row_blocks(x: Tensor, block: int = _BLOCK) -> list[slice]:
    if x.device.type != "cpu":  # on an accelerator one launch per op beats cache blocking
        return [slice(0, x.shape[0])]
    rows = max(1, block // max(1, x.shape[1]))
    return [slice(start, start + rows) for start in range(0, x.shape[0], rows)]


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    """``sum_j x_ij y_ij`` per row, a block of rows at a time."""
    blocks = _row_blocks(x)
    if len(blocks) == 1:
        return torch.linalg.vecdot(x, y, dim=1)
    out = x.new_empty(x.shape[0])
    for rows in blocks:
        torch.linalg.vecdot(x[rows], y[rows], dim=1, out=out[rows])
    return out


def _product_sums(e: Tensor, factor: Tensor) -> tuple[Tensor, Tensor]:
    """``sum_j q_ij`` and ``sum_j q_ij e_ij`` for ``q = e * factor``, without storing ``q``."""
    sum_q = e.new_empty(e.shape[0])
    sum_qe = e.new_empty(e.shape[0])
    # quarter blocks: the temporary q (~256 KiB) is reused from the heap block after block
    # instead of a fresh [A, S]-sized allocation (page faults) at small A * S
    for rows in _row_blocks(e, _BLOCK >> 2):
        q = e[rows] * factor[rows]
        torch.sum(q, dim=1, out=sum_q[rows])
        # vecdot(q, e) is this product and sum, here without a second temporary
        torch.sum(q.mul_(e[rows]), dim=1, out=sum_qe[rows])
    return sum_q, sum_qe


def tilted_log_negative_mass(
    neg_logits: Tensor,
    tilt: float,
    tilt_factor: Tensor | None = None,
    *,
    num_negatives: int,
    tilt_grad: bool = True,
    shifted: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``log sum_j w_ij e^{c_ij}`` for ``w_ij ∝ e^{tilt c_ij} f_ij`` with mean 1 over the ``M``
    negatives, in one fused pass; see :class:`_TiltedLogMass`. ``f`` must be 0 where ``c`` is
    ``-inf``. ``shifted`` = ``(max_j c_ij [A], e^{c - max_j c} [A, S])`` (float32, exactly as
    computed here) when the caller already has them."""
    factor = None if tilt_factor is None else tilt_factor.detach().float()
    return _TiltedLogMass.apply(
        neg_logits.float(), factor, float(tilt), math.log(num_negatives), bool(tilt_grad), shifted
    )


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
    tilt: float = 0.0,
    tilt_factor: Tensor | None = None,
    tilt_grad: bool = True,
    tilt_shifted: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Per-anchor loss ``[A]`` from positive logits ``[A]`` and negative logits ``[A, S]``.

    Args:
        pos_logits: ``a_i``.
        neg_logits: ``c_ij`` for the negatives the strategy kept (``-inf`` = not kept).
        neg_log_weights: ``log w_ij`` (None = all weights 1).
        tau_plus: class prior of the debiased estimator; 0 disables debiasing.
        num_negatives: ``M`` of the debiased estimator (defaults to ``S``).
        temperature: ``t``, needed for the clamp of the debiased estimator.
        tilt, tilt_factor, tilt_grad: tilted weights ``w ∝ e^{tilt c} f`` (mean 1) instead of
            ``neg_log_weights`` (see :class:`~hardneg.strategies.NegativeSelection`).
        tilt_shifted: ``(max_j c_ij, e^{c - max_j c})`` of ``neg_logits`` if the strategy
            already computed them (reused by the tilted mass, not recomputed).
    """
    pos_logits = pos_logits.float()
    m = neg_logits.shape[1] if num_negatives is None else num_negatives
    if tilt != 0.0 or tilt_factor is not None:
        if neg_log_weights is not None:
            raise ValueError("give either neg_log_weights or a tilt, not both")
        log_mass = tilted_log_negative_mass(
            neg_logits,
            tilt,
            tilt_factor,
            num_negatives=m,
            tilt_grad=tilt_grad,
            shifted=tilt_shifted,
        )
    else:
        log_mass = log_negative_mass(neg_logits.float(), neg_log_weights)
    if tau_plus > 0.0:
        log_mass = debias_log_mass(
            log_mass, pos_logits, tau_plus=tau_plus, num_negatives=m, temperature=temperature
        )
    return torch.logaddexp(pos_logits, log_mass) - pos_logits
