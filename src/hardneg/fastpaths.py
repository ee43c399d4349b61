"""Fast paths: the speed code of the strategies, apart from their plain form.

Each function here computes exactly what a plain expression in a strategy file computes, only
faster on some hardware; each is tested equal to its plain twin (``tests/test_fastpaths.py``).
Strategies call them only when ``StepContext.fast`` is set (never under ``torch.compile``, whose
own fusion is the accelerator's fast path, and never for diagnostics). Public torch and numpy API
only; no buffers kept between calls.

* :func:`tilted_log_mass` — HCL/UnReMix: ``log sum_j w_ij e^{c_ij}`` with
  ``w_ij = M e^{beta c_ij} f_ij / sum_k e^{beta c_ik} f_ik`` in one shifted pass and a
  hand-written backward (plain twin: ``logsumexp(c + normalised_log_weights(beta c + log f))``);
  ``overwrite``: the factor and the given exponentials are the caller's scratch (two in-place
  passes, no row blocks); ``gram = (z, t)``: in-batch logits ``z z^T / t`` differentiated to
  ``z`` by one product ``(G + G^T) z / t`` (from 1024 anchors on CPU a block of rows at a time,
  ``G[I, :] + G[:, I]^T`` in cache) (plain twin: the score matrix's backward, two);
  ``columns = (q, C, t)``: pool logits ``q C^T / t`` differentiated to ``q`` by ``G C / t`` with
  ``G`` formed a block of rows at a time in cache (plain twin: the score matrix's backward, no
  ``[A, S]`` gradient buffer here).
* :func:`top_k_indices` — linear-time selection over int32 keys that order like the floats,
  with numpy's SIMD partition on long rows (plain twin: ``torch.topk``); potential's neighbours.
* :func:`band_indices` — Ring on CPU: the band's edge values of each row by ``numpy.partition``
  (values only, in place, over integer keys that order like the floats) and its members as the
  entries between them (``flatnonzero``, :func:`_flat_members`); two
  ``numpy.argpartition`` calls over order keys where an edge value repeats or a row holds a NaN;
  row blocks split over torch's intra-op threads from 2^20 entries per thread (numpy releases
  the GIL) (plain twin: ``torch.topk(U, sorted=True).indices[:, L:]``).
* :func:`log_mass` / :func:`contrast_log_mass` — the InfoNCE objective's unweighted negative
  log-mass (and MoCHi's real negatives, Ring's band, the hardness tilt):
  :func:`kept_log_mass`'s one-exponential forward and one-pass backward (plain twin:
  ``torch.logsumexp``, seven passes over ``[A, S]`` with its backward).
* :func:`kept_counts` — potential: the kept cells per column drawn per column, ``Binomial(m, pi)``
  as layers of Bernoulli draws over the columns with more than ``r`` cells, or ``m pi`` in
  expected mode (plain twin: one uniform per grid cell, compared with ``pi`` and summed per
  column with ``scatter_add``; same law, not the same draws).
* :func:`weighted_log_mass` — potential: ``log sum_j w_ij e^{c_ij}`` from the counts themselves,
  no ``log w`` pass over ``[A, S]`` and a two-pass backward (plain twin:
  ``logsumexp(c + log w)``, ``-inf`` with a zero gradient on a row with nothing kept).
* :func:`row_exponentials` / :func:`unremix_factor` — UnReMix: the row-shifted exponentials
  ``e^{c - max_j c}`` (cosine logits: unshifted ``e^{c}`` when ``e^{(1 + beta) c}`` stays in
  range, no row maximum and subtraction passes) computed once for the influence score's
  softmax, the pool's column softmax over anchors (:func:`unremix_column_deltas`) and the
  objective's tilted mass; ``cos(delta_i, delta_j)`` from the deltas' directions only
  (``sum_j e_ij z_j - (sum_j e_ij) z_{i+}``: no softmax normaliser); ``cos(h_i, h_j)``
  read from the logits when ``h = z`` is L2-normalised; the mix, up to a per-row constant the
  tilted mass cancels, as ``U`` plus a rank-``r`` product in one pass over one ``[A, C]``
  buffer, row ranges of ``[C]`` vectors without an ``[A, C]`` pass (one mask look-up for both
  ends), the representativeness up to a positive scale and a shift (the min-max is the same)
  (plain twin: ``UnReMixNegatives.mix`` with ``minmax_over_negatives``).
* :func:`debiased_infonce` — the InfoNCE objective with ``tau_plus > 0`` and one positive: the
  debiased terms ``log(e^a + Ng) - a`` in one autograd node with a four-op backward (plain
  twin: ``objectives.debias_log_mass`` and ``logaddexp``, ~45 autograd ops of ``[A]``).
* :func:`mixed_column_logits` — MoCHi: the logits ``q · n_j / t`` of the drawn columns read
  from the contrast set's own logits, with a hand-written backward to the anchors only (plain
  twin: ``anchor_column_logits(contrast).gather(1, index)``, a second product with the columns
  detached).
* :func:`simans_draw` — SimANS: the Gumbel-top-k draw with uniforms from random 64-bit words
  (two per word; on CPU from a numpy stream seeded by the generator); on CPU the whole draw in
  numpy a block of rows at a time (words, keys and the ``k`` smallest keys by a values-only
  partition of integer keys, in cache; no torch pass over ``[A, S]``) (plain twin:
  ``SimANSNegatives.draw`` with ``torch.rand`` and ``torch.topk``; same law, other draws).
* :func:`hardest_columns` — MoCHi: the hardest set's columns in column order when no row ties
  at its ``N``-th largest logit, a block of rows at a time in numpy (partition, compare,
  ``flatnonzero``; on wide rows among a sample's candidates first, as Ring's band) (plain twin:
  ``HardNegativeMixing.hardest`` with ``torch.topk``);
  :func:`kth_largest` and :func:`row_members` take a tie: the ``N``-th largest logit by numpy's
  partition (plain twin: ``torch.topk``'s ``k``-th value) and the members by
  ``numpy.flatnonzero`` (plain twin: a cumsum / scatter compaction).
* :func:`pair_gram` — MoCHi: the pairs' ``n_i · n_j`` from the upper triangle of the columns'
  Gram matrix, by blocks of rows (plain twin: the full Gram matrix, looked up at the pairs);
  :func:`mochi_in_batch_cosine`: in-batch, read from the logits as ``t c_ij`` (no product).
* :func:`mochi_mix_log_mass` — MoCHi with InfoNCE: the synthetic negatives' log-mass drawn and
  summed a block of rows at a time (the draws of the plain path, bit for bit), the backward
  over shared columns one ``embedding_bag`` of the hardest set's members weighted by the
  softmax weights times the mixing coefficients summed per member (no ``[A, S]`` buffer, no
  product), else one product ``W C`` with those weights scatter-added per column (plain twin:
  ``HardNegativeMixing.select``'s logits and the objective's ``logsumexp``, back-propagated
  through the gathers). In-batch, MoCHi's contrast set comes from :func:`pair_contrast`
  (:func:`mochi_in_batch_fits`).
* :func:`potential_in_batch_terms` — potential, in-batch: the three terms from one Gram matrix
  of ``[z1; z2]`` (every logit, the neighbour look-up, one keep kernel pass for ``L_aug`` and
  both mined terms, with the anchors as the columns of the symmetric Gram matrix, so that each
  mined direction's thresholds ``floor(256 pi)`` are a block of it with the columns as rows: no
  transposed copy), the draws from one byte stream (:class:`_ByteStream`; on CPU numpy's
  ``PCG64`` seeded by the generator) (:func:`bernoulli_draws`, :func:`binomial_draws`: a byte
  against ``floor(256 pi)``, a float uniform on a tie settled with the kernel's own ``256 pi``;
  same law as the plain grid's uniforms, other draws; the bytes drawn, compared, summed and
  scanned for ties by 256 KiB chunks, on the CPU in numpy: ``_CPU_NUMPY``) and the negative
  masses (column sums) and mined positives'
  logits from one unshifted exponential (cosine logits are bounded by ``1 / t``) taken a block
  of rows at a time, with a one-pass backward, the products written over the weights
  (:func:`block_log_masses`) (plain twin: ``PotentialMining.mined`` twice and
  ``PotentialMining.augmentation``, three products and two look-ups).
* :func:`potential_pool_terms` — potential with a bank: only the keys (read from ``L_aug``'s
  Gram matrix, laid out as in-batch) and the bank rows in some block (one product
  ``q bank[U]^T``) are touched; the look-up ``k bank^T`` a block of rows at a time; the bank's
  cells drawn in layers of byte draws (:func:`layer_draws`) (plain twin:
  ``PotentialMining.mined`` over ``[k; bank]`` and ``PotentialMining.augmentation``; same law,
  other draws).
* :func:`pair_contrast` — the in-batch contrast set of two views without ids on cosines,
  for every strategy on the fast path (``ContrastInputs.standard_contrast(fast=True)``,
  potential's and MoCHi's own terms): ``in_batch_contrast`` whose Gram matrix reads the
  partners' logits and whose backward corrects the masked entries in ``O(N d)`` (plain twin:
  ``in_batch_contrast((z1, z2), ...)``).
* :func:`band_logits` — Ring: the ring's logits read from the score matrix with a sparse
  backward through the ring's members only (in-batch one product ``(G + G^T) z``; a wide band
  a dense product instead of an ``embedding_bag``) (plain twin: back-propagating through the
  gather). :func:`column_logits`: the same for Ring's band and SimANS's drawn columns wherever
  the logits are ``anchors @ columns.T / t`` (plain twin: ``negative_logits.gather``).
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# On CPU, row blocks of about this many elements keep the temporaries of row-wise products in
# cache instead of allocating a whole [A, S] matrix; every row is reduced exactly as in one
# call, so the results are bit-identical.
_BLOCK = 1 << 18


def row_blocks(x: Tensor, block: int = _BLOCK) -> list[slice]:
    """Slices of rows of about ``block`` elements on CPU; one slice on an accelerator."""
    if x.device.type != "cpu":  # on an accelerator one launch per op beats cache blocking
        return [slice(0, x.shape[0])]
    rows = max(1, block // max(1, x.shape[1]))
    return [slice(start, start + rows) for start in range(0, x.shape[0], rows)]


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
    def forward(ctx, logits, factor, beta, log_m, tilt_grad, shifted=None, overwrite=False):  # type: ignore[override]
        if overwrite:
            out, saved = _tilted_in_place(logits, factor, beta, log_m, shifted)
            ctx.save_for_backward(*saved)
            ctx.beta, ctx.tilt_grad, ctx.product, ctx.overwrite = beta, tilt_grad, False, True
            return out
        if shifted is None:
            row_max = logits.amax(dim=1, keepdim=True)
            s = logits - row_max  # <= 0, -inf where absent
            e = None
        else:  # the strategy already has e = exp(c - m): reuse it, a pass and a copy less
            row_max, e = shifted
            row_max = (
                logits.new_zeros(logits.shape[0], 1) if row_max is None else row_max.unsqueeze(1)
            )
            s = None if beta in (0.0, 1.0, 2.0) else logits - row_max
        if beta in (0.0, 1.0, 2.0):
            # the common betas need no second exponential: e^{beta s} = 1, e or e * e
            if e is None:
                e = s.exp_()
            q = None if beta == 0.0 else (e if beta == 1.0 else e.square())
            if q is None and factor is None:  # uniform weights over the present columns
                q = torch.isfinite(logits).to(e.dtype)
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
            ctx.save_for_backward(e, e, _nonzero(sum_q), _nonzero(sum_qe), factor)
        else:
            sum_q = q.sum(dim=1)
            sum_qe = _row_dot(q, e)
            ctx.save_for_backward(q, e, _nonzero(sum_q), _nonzero(sum_qe))
        ctx.beta, ctx.tilt_grad, ctx.product, ctx.overwrite = beta, tilt_grad, product, False
        return log_m + row_max.squeeze(1) + sum_qe.log() - sum_q.log()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        q, e, sum_q, sum_qe, *factor = ctx.saved_tensors
        beta = ctx.beta if ctx.tilt_grad else 0.0
        if ctx.overwrite:
            return _tilted_in_place_grad(ctx.saved_tensors, beta, grad), *(None,) * 6
        out = e * ((1.0 + beta) * grad / sum_qe).unsqueeze(1)
        if beta != 0.0:
            out.sub_((beta * grad / sum_q).unsqueeze(1))
        if ctx.product:
            for rows in row_blocks(out):  # (out e) f: within an ulp of out (e f), no temporary
                out[rows].mul_(e[rows]).mul_(factor[0][rows])
        else:
            out.mul_(q)
        return out, None, None, None, None, None, None


def _nonzero(total: Tensor) -> Tensor:
    """A row sum for the backward's divisions: 1 where it is 0 (a row without negatives, whose
    ``q`` and ``q e`` are 0: its gradient is then 0, not ``0 / 0``)."""
    return torch.where(total > 0, total, 1.0)


def _tilted_in_place(logits, factor, beta, log_m, shifted):
    """:class:`_TiltedLogMass` with ``overwrite``: the factor ``f`` and the exponentials ``e``
    are the caller's scratch. ``q = e^{beta s} f`` is formed in ``f``'s buffer and ``q e`` in
    ``e``'s: two in-place passes and two row sums (no ``[A, S]`` temporary, no row blocks).
    Returns the log-mass and the tensors the backward pass reads."""
    row_max, e = shifted
    if beta == 0.0:
        q = factor
    elif beta in (1.0, 2.0):
        q = factor.mul_(e) if beta == 1.0 else factor.mul_(e).mul_(e)
    elif row_max is None:  # unshifted: e^{beta c}
        q = factor.mul_(logits.detach().mul(beta).exp_())
    else:
        q = factor.mul_((logits.detach() - row_max.unsqueeze(1)).mul_(beta).exp_())
    qe = e.mul_(q)
    sum_q, sum_qe = q.sum(dim=1), qe.sum(dim=1)
    out = sum_qe.log().sub_(sum_q.log()).add_(log_m)  # sum_q, sum_qe are saved: not in place
    saved = (qe, q, _nonzero(sum_q), _nonzero(sum_qe))
    return (out if row_max is None else out.add_(row_max)), saved


def _tilted_in_place_grad(saved, beta: float, grad: Tensor) -> Tensor:
    """``dlogR/dc`` times ``grad`` from :func:`_tilted_in_place`'s tensors: ``(1 + beta) q e /
    sum(q e) - beta q / sum(q)``, two passes (``beta = 0`` when the tilt is detached)."""
    qe, q, sum_q, sum_qe = saved
    out = qe * ((1.0 + beta) * grad / sum_qe).unsqueeze(1)
    if beta != 0.0:
        out.addcmul_(q, (beta * grad / sum_q).unsqueeze(1), value=-1.0)
    return out


class _GramTiltedLogMass(torch.autograd.Function):
    """:func:`_tilted_in_place` for in-batch logits ``c = z z^T / t`` (the anchors are the
    columns), differentiated with respect to ``z`` directly: ``dL/dz = (G + G^T) z / t`` with
    ``G = dL/dc`` is one product, where the score matrix's own backward takes two (``G z`` and
    ``G^T z``). ``G^T`` is a blocked transposed copy (``contiguous``), a fraction of a product's
    time; a transposed element-wise add would cost more than the product it saves."""

    @staticmethod
    def forward(ctx, z, logits, factor, beta, log_m, tilt_grad, shifted, temperature):  # type: ignore[override]
        out, saved = _tilted_in_place(logits, factor, beta, log_m, shifted)
        ctx.save_for_backward(z, *saved)
        ctx.beta = beta if tilt_grad else 0.0
        ctx.temperature = temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        z, *saved = ctx.saved_tensors
        qe, q, sum_q, sum_qe = saved
        if qe.device.type != "cpu" or qe.shape[0] < _GRAM_BLOCKED_FROM:
            g = _tilted_in_place_grad(saved, ctx.beta, grad / ctx.temperature)
            sym = g.T.contiguous().add_(g)
            return (sym @ z.to(g.dtype)).to(z.dtype), *(None,) * 7
        # large A on CPU: (G + G^T) z a block of rows I at a time, G[I, :] + (G[:, I])^T formed
        # in cache from q e and q (no [A, A] G or G^T buffer: their fresh pages cost more than
        # the block loop's extra ops from A = 1024 on)
        beta = ctx.beta
        g = grad / ctx.temperature
        a = (1.0 + beta) * g / sum_qe
        b = beta * g / sum_q if beta != 0.0 else None
        zz = z.to(qe.dtype)
        out = qe.new_empty(zz.shape)
        for start in range(0, qe.shape[0], _GRAM_BLOCK_ROWS):
            rows = slice(start, start + _GRAM_BLOCK_ROWS)
            block = qe[rows] * a[rows].unsqueeze(1)
            column = torch.mul(qe[:, rows].T, a.unsqueeze(0))  # (G[:, I])^T, a transposed read
            if b is not None:
                block.addcmul_(q[rows], b[rows].unsqueeze(1), value=-1.0)
                column.addcmul_(q[:, rows].T, b.unsqueeze(0), value=-1.0)
            torch.mm(block.add_(column), zz, out=out[rows])
        return out.to(z.dtype), *(None,) * 7


# _GramTiltedLogMass' backward by blocks of rows from this many anchors (CPU), in blocks of
# this many rows (measured at N = 256 / 512 / 1024 in-batch: 1.02-1.04x / 0.92-0.99x /
# 0.79-0.92x the one-buffer form's step; 256-row blocks lost at N = 512)
_GRAM_BLOCKED_FROM = 1024
_GRAM_BLOCK_ROWS = 128


class _ColumnsTiltedLogMass(torch.autograd.Function):
    """:func:`_tilted_in_place` for logits ``c = q C^T / t`` whose columns ``C`` take no gradient
    (a pool), differentiated with respect to ``q`` directly: ``dL/dq = G C / t`` with
    ``G = dL/dc``, the score matrix's own backward product, but ``G`` formed a block of rows at a
    time and multiplied while in cache: no ``[A, C]`` gradient buffer (its fresh pages cost about
    as much as a pass over it) and no pass writing and re-reading it."""

    @staticmethod
    def forward(ctx, q, logits, factor, beta, log_m, tilt_grad, shifted, columns, temperature):  # type: ignore[override]
        out, saved = _tilted_in_place(logits, factor, beta, log_m, shifted)
        ctx.save_for_backward(q, columns, *saved)
        ctx.beta = beta if tilt_grad else 0.0
        ctx.temperature = temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        q, columns, qe, qq, sum_q, sum_qe = ctx.saved_tensors
        beta = ctx.beta
        g = grad / ctx.temperature
        a = ((1.0 + beta) * g / sum_qe).unsqueeze(1)
        b = (beta * g / sum_q).unsqueeze(1) if beta != 0.0 else None
        cols = columns.to(qe.dtype)
        out = qe.new_empty(q.shape)
        for rows in row_blocks(qe):  # (1 + beta) q e / sum(q e) - beta q / sum(q), then @ C
            block = qe[rows] * a[rows]
            if b is not None:
                block.addcmul_(qq[rows], b[rows], value=-1.0)
            torch.mm(block, cols, out=out[rows])
        return out.to(q.dtype), *(None,) * 8


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    """``sum_j x_ij y_ij`` per row, a block of rows at a time."""
    blocks = row_blocks(x)
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
    for rows in row_blocks(e, _BLOCK >> 2):
        q = e[rows] * factor[rows]
        torch.sum(q, dim=1, out=sum_q[rows])
        # vecdot(q, e) is this product and sum, here without a second temporary
        torch.sum(q.mul_(e[rows]), dim=1, out=sum_qe[rows])
    return sum_q, sum_qe


def tilted_log_mass(
    logits: Tensor,
    beta: float,
    num_negatives: int | Tensor,
    *,
    factor: Tensor | None = None,
    tilt_grad: bool = True,
    shifted: tuple[Tensor, Tensor] | None = None,
    overwrite: bool = False,
    gram: tuple[Tensor, float] | None = None,
    columns: tuple[Tensor, Tensor, float] | None = None,
) -> Tensor:
    """``[A]`` ``log sum_j w_ij e^{c_ij}`` for ``w_ij = M e^{beta c_ij} f_ij / sum_k e^{beta c_ik} f_ik``
    (mean 1 over the ``M`` negatives), in one fused pass; see :class:`_TiltedLogMass`.

    ``logits`` ``[A, S]`` (``-inf`` = not a negative); ``factor`` ``f`` (detached, 0 where the
    logits are ``-inf``, or any finite value there when ``beta > 0``, where ``e^{beta s}`` is 0;
    None = 1); ``tilt_grad``: let the gradient flow through the weights;
    ``shifted``: ``(max_j c_ij [A], e^{c - max_j c} [A, S])`` of the detached logits, exactly as
    computed here, when the caller already has them, or ``(None, e^{c})`` (no shift; the caller
    keeps every ``e^{(1 + beta) c}`` in range, :func:`row_exponentials`); ``overwrite`` (with ``shifted`` and a
    ``factor`` of the logits' dtype): both are the caller's scratch, overwritten by ``q = e^{beta
    s} f`` and ``q e`` (no ``[A, S]`` temporary in the forward pass); ``gram = (z, t)`` (with
    ``overwrite``): the logits are ``z z^T / t`` (in-batch: the contrast set's anchors are its
    columns) and the gradient goes to ``z`` by one product (:class:`_GramTiltedLogMass`), not
    through ``logits``; ``columns = (q, C, t)`` (with ``overwrite``): the logits are
    ``q C^T / t`` with ``C`` taking no gradient (a pool), and the gradient goes to ``q`` as
    ``G C / t`` a block of rows at a time (:class:`_ColumnsTiltedLogMass`). Computes in the
    logits' dtype.
    """
    log_m = (
        num_negatives.to(logits.dtype).log()
        if isinstance(num_negatives, Tensor)
        else math.log(num_negatives)
    )
    f = None if factor is None else factor.detach().to(logits.dtype)
    # the caller's own buffers (same dtype: no copy was made) may be overwritten
    overwrite = (
        bool(overwrite)
        and shifted is not None
        and factor is not None
        and factor.dtype == logits.dtype
    )
    if overwrite and gram is not None:
        z, temperature = gram
        return _GramTiltedLogMass.apply(
            z, logits.detach(), f, float(beta), log_m, bool(tilt_grad), shifted, float(temperature)
        )
    if overwrite and columns is not None:
        q, cols, temperature = columns
        return _ColumnsTiltedLogMass.apply(
            q,
            logits.detach(),
            f,
            float(beta),
            log_m,
            bool(tilt_grad),
            shifted,
            cols.detach(),
            float(temperature),
        )
    return _TiltedLogMass.apply(logits, f, float(beta), log_m, bool(tilt_grad), shifted, overwrite)


class _DebiasedInfoNCE(torch.autograd.Function):
    """Per-anchor ``log(e^a + Ng) - a`` with the debiased ``log Ng`` of ``log R``: the clamped
    estimator ``max(log R + log(1 - e^{gap}) - log(1 - tau), floor)``, ``gap = log(tau M) + a -
    log R``, ``floor = log M - 1/t`` (the floor where ``gap >= 0``), in ~15 ops on ``[A]`` and a
    four-op backward: ``dL/dlog R = s / r`` and ``dL/da = -s / r`` where the estimate is above
    the floor (``r = 1 - e^{gap}``), ``0`` and ``-s`` on the floor, ``s = sigmoid(log Ng - a)``
    (autograd through the plain expression: ~45 ops)."""

    @staticmethod
    def forward(ctx, log_mass, pos, log_m, tau_plus, floor):  # type: ignore[override]
        gap = (pos - log_mass).add_(log_m).add_(math.log(tau_plus))
        r = torch.expm1(gap).neg_()  # 1 - e^{gap}: > 0 where gap < 0, else <= 0 (log: nan/-inf)
        corrected = r.log().add_(log_mass).sub_(math.log1p(-tau_plus))
        corrected.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        active = corrected > floor
        log_ng = (
            torch.maximum(corrected, floor)
            if isinstance(floor, Tensor)
            else corrected.clamp_min_(floor)
        )
        out = torch.logaddexp(pos, log_ng).sub_(pos)
        inactive = ~active
        w_mass = r.reciprocal_()  # d log Ng / d log R above the floor
        w_pos = w_mass.masked_fill(inactive, 1.0).neg_()
        w_mass.masked_fill_(inactive, 0.0)
        ctx.save_for_backward(log_ng.sub_(pos), w_mass, w_pos)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, w_mass, w_pos = ctx.saved_tensors
        s = torch.sigmoid(x).mul_(grad)
        return s * w_mass, s.mul_(w_pos), None, None, None


def debiased_infonce(
    log_mass: Tensor,
    pos: Tensor,
    *,
    tau_plus: float,
    num_negatives: int | float | Tensor,
    temperature: float,
) -> Tensor:
    """``[A]`` per-anchor debiased InfoNCE ``log(e^{a_i} + Ng_i) - a_i`` for one positive logit
    ``a`` ``[A]`` and the negative log-mass ``log R`` ``[A]``, ``0 < tau_plus < 1`` (plain twin:
    ``logaddexp(a, objectives.debias_log_mass(log R, a, ...)) - a``); see
    :class:`_DebiasedInfoNCE`. Equal values and gradients, but at ``log R`` where the estimate
    is exactly the floor (``torch.maximum`` splits the gradient there, this takes the floor's)."""
    log_m = (
        num_negatives.to(pos.dtype).log()
        if isinstance(num_negatives, Tensor)
        else math.log(num_negatives)
    )
    floor = log_m - 1.0 / temperature
    return _DebiasedInfoNCE.apply(log_mass.to(pos.dtype), pos, log_m, float(tau_plus), floor)


def _order_keys(x: Tensor) -> Tensor:
    """int32 keys ordered as the float32 values: the IEEE bit pattern, with the magnitude bits
    of negative numbers flipped (``-inf`` lowest, ``-0.0`` just below ``+0.0``, a NaN with the
    sign bit clear above ``+inf`` as in ``torch.topk``)."""
    bits = x.view(torch.int32)
    keys = bits >> 31  # -1 for negative numbers, else 0
    keys &= 0x7FFFFFFF
    keys ^= bits
    return keys


# numpy's selection (introselect with SIMD partitioning in numpy >= 2) takes less than half the
# time of torch.topk per element on CPU (measured: 256 x 4096, top 409), but costs a few
# microseconds per row and per call: it wins on long rows and past a few thousand entries
_NUMPY_MIN_COLUMNS = 1024
_NUMPY_MIN_ELEMENTS = 1 << 12
_NUMPY_BLOCK = 1 << 17  # entries per block of rows: measured a few % faster than 1 << 18


def numpy_partitions(x: Tensor) -> bool:
    """Whether a row selection on ``x`` may run through numpy's partition: a float32 / float64
    tensor on the CPU. Elsewhere (an accelerator, other dtypes) the selections take
    ``torch.topk``; tests force that branch on the CPU by patching this function."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _numpy_selects(x: Tensor, k: int) -> bool:
    """Whether the CPU selection of the top ``k`` of each row of ``x`` goes through numpy."""
    return (
        numpy_partitions(x)
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.shape[1] >= _NUMPY_MIN_COLUMNS
        and 0 < k < x.shape[1]
    )


def top_k_indices(x: Tensor, k: int) -> Tensor:
    """``[A, k]`` column indices of the ``k`` largest entries of each row, in no order.

    On CPU the selection runs over int32 keys that order like the floats (:func:`_order_keys`;
    integer comparisons, no NaN-aware ones), a block of rows at a time so that the keys stay in
    cache: ``numpy.argpartition`` for rows of at least ``_NUMPY_MIN_COLUMNS`` entries,
    ``torch.topk`` for shorter ones; a block holding a NaN takes numpy's float partition (the
    keys rank a NaN with its sign bit set below ``-inf``; torch.topk ranks every NaN highest).
    The members are those of ``x.topk(k)``; only which of
    several *equal* values is taken may differ (their logits, hence the loss, are the same).
    """
    if not numpy_partitions(x) or x.dtype != torch.float32 or x.dim() != 2:
        return x.topk(k, dim=1, sorted=False).indices
    x = x.detach().contiguous()
    rows, cols = x.shape
    if _numpy_selects(x, k):
        values = x.numpy()
        out = np.empty((rows, k), dtype=np.int64)
        step = max(1, _NUMPY_BLOCK // cols)  # keys and argpartition's int64 output in cache
        for start in range(0, rows, step):
            block = values[start : start + step]
            # the keys rank a NaN with the sign bit set (the default NaN of an invalid operation
            # on x86) below -inf; numpy's float partition ranks every NaN highest, as torch.topk
            keys = block if math.isnan(block.max()) else _np_order_keys(block)
            out[start : start + step] = np.argpartition(keys, cols - k, axis=1)[:, cols - k :]
        return torch.from_numpy(out)
    if bool(x.isnan().any()):  # the keys would rank a NaN with the sign bit set lowest
        return x.topk(k, dim=1, sorted=False).indices
    blocks = row_blocks(x)  # ~1 MiB of keys per block
    if len(blocks) == 1:
        return _order_keys(x).topk(k, dim=1, sorted=False).indices
    out = torch.empty(rows, k, dtype=torch.long)
    for block in blocks:
        out[block] = _order_keys(x[block]).topk(k, dim=1, sorted=False).indices
    return out


def _np_order_keys(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`_order_keys` in numpy, for float32 (int32 keys) or float64 (int64 keys), into
    ``out`` if given: numpy's ufuncs release the GIL, so row blocks can run on several threads.
    The map is its own inverse: the keys of the keys (as floats) are the values' bits."""
    bits = x.view(np.int32 if x.dtype.itemsize == 4 else np.int64)
    width = bits.dtype.itemsize * 8
    keys = np.right_shift(bits, width - 1, out=out)  # -1 for negative numbers, else 0
    keys &= np.iinfo(bits.dtype).max
    keys ^= bits
    return keys


def _on_threads(work, rows: int, min_rows: int, step: int) -> None:
    """Run ``work(blocks)`` on up to ``torch.get_num_threads()`` threads (the calling thread
    one of them), ``blocks`` one shared iterator over the ``(first, last)`` row ranges of
    ``step`` rows that cover ``[0, rows)``: each thread takes the next block when it is done
    with one, so every block is worked on once, and a thread slowed down (after each parallel
    torch operation libgomp's worker spins on a core for milliseconds) takes fewer blocks
    instead of holding up the call. For numpy calls that release the GIL: they then use the
    cores that torch's own operations would use. One thread when there are fewer than
    ``2 * min_rows`` rows; no kept thread pool (fork-safe)."""
    blocks = iter([(first, min(first + step, rows)) for first in range(0, rows, step)])
    workers = max(1, min(torch.get_num_threads(), rows // max(1, min_rows)))
    if workers == 1:
        work(blocks)
        return
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work(blocks)  # (a list iterator's next() is atomic under the GIL)
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(workers - 1)]
    for thread in threads:
        thread.start()
    run()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# numpy's nonzero on a bool array runs a branchy loop (a memchr from member to member) up to a
# density of 10 % and a branchless one above: measured 1.4 ms per million entries at 9 % (ring's
# default band), 0.8 at 5 %, 0.4 above 10 % and with the padding below, 0.2-0.4 at 2 %
_SPARSE_NONZERO = (0.03, 0.1)


def _flat_members(write_mask, rows: int, cols: int, count: int) -> np.ndarray:
    """``numpy.flatnonzero`` of the ``[rows, cols]`` bool mask that ``write_mask(out)`` writes,
    expected to hold about ``count`` members. Between 3 % and 10 % the mask is written into a
    buffer followed by enough ``True`` entries to lift the density above 10 % (numpy's
    branchless loop), whose positions are then cut off the result."""
    n = rows * cols
    low, high = _SPARSE_NONZERO
    pad = int((high * n - count) / (1.0 - high)) + 64 if low * n <= count <= high * n else 0
    buffer = np.empty(n + pad, dtype=bool)
    buffer[n:] = True
    write_mask(buffer[:n].reshape(rows, cols))
    flat = np.flatnonzero(buffer)
    return flat[: flat.size - pad]


# numpy's selection beats torch.topk on CPU from rows of a few hundred entries (measured, one
# thread: 1024 x 1024, top 102: 6.5 ms against 12.5 ms); on shorter rows its per-row cost wins
_BAND_MIN_COLUMNS = 256
_BAND_MIN_ROWS = 64  # rows per thread: below this, one thread (a thread start is ~0.1 ms)
# entries per thread: below this, one thread. After each parallel torch operation libgomp's
# worker spins for ~5 ms (measured on the 2-core CPU: CPU burned in a sleep right after a
# product), so a second Python thread shares its core with the spinner for about that long;
# measured under load, two threads were slower than one up to 1024 x 1024 (x1.2-5.5) and faster
# from 512 x 4096 (x0.8-0.93)
_THREAD_MIN_ENTRIES = 1 << 20


# the sampled pre-selection of band_indices: rows of at least this many columns whose band ends
# in the top quarter; one sample every _BAND_STRIDE columns (_BAND_WIDE_STRIDE from
# _BAND_WIDE_COLUMNS: a sample's partition costs more than the extra candidates there; measured,
# 1 thread, hardest_columns 2048 x 2046 top 128: 10.5 ms against 14.4, band_indices 1024 x 5119
# ranks [51, 511): 18.3 against 21.7; at 1022 columns stride 4 stays faster), its threshold
# _BAND_SIGMAS standard deviations of the sample's count above the expected rank
_BAND_SAMPLE_MIN_COLUMNS = 768
_BAND_SAMPLE_MAX_SHARE = 4
# a row's candidates at most a third of it (a quarter made MoCHi's top 128 of 1022 columns fall
# back on a third of its blocks: 5.0 ms against 3.7, 1 thread)
_BAND_CANDIDATE_SHARE = 3
_BAND_STRIDE = 4
_BAND_WIDE_STRIDE = 8
_BAND_WIDE_COLUMNS = 2048
_BAND_SIGMAS = 3.0


def _samples_rows(cols: int, upper: int) -> bool:
    """Whether rows of ``cols`` columns whose selection ends at rank ``upper`` try
    :func:`_band_from_sample` first: wide rows, the selection in their top quarter."""
    return cols >= _BAND_SAMPLE_MIN_COLUMNS and upper * _BAND_SAMPLE_MAX_SHARE <= cols


def _band_from_sample(
    block: np.ndarray, lower: int, upper: int, out: np.ndarray, mask: np.ndarray
) -> bool:
    """Ranks ``[lower, upper)`` of each row of ``block`` ``[r, C]`` (no NaN) into ``out``
    ``[r, upper - lower]``, by selecting among a few candidates per row instead of the whole
    row: a threshold ``t_r`` per row from a sample of the row (every ``_BAND_STRIDE``-th entry,
    ``_BAND_WIDE_STRIDE``-th from ``_BAND_WIDE_COLUMNS`` columns;
    its ``j``-th largest, ``j`` a few standard deviations above the band's expected rank in the
    sample), the candidates ``x >= t_r`` (written into ``mask``), then the band of the
    candidates as in :func:`band_indices` (two ``numpy.partition`` calls over integer keys, the
    members between the edge keys) on a ``[r, W]`` array of the candidates' keys padded with
    keys below every value. Exact whatever the sample says: a row with at least ``upper``
    candidates holds its top ``upper`` among them (``t_r`` is then at most its ``upper``-th
    largest). Returns False, writing nothing, when a row has fewer candidates than ``upper``,
    too many for a gain, or a repeated value at a band edge (the caller then partitions whole
    rows)."""
    r, cols = block.shape
    width = upper - lower
    stride = _BAND_WIDE_STRIDE if cols >= _BAND_WIDE_COLUMNS else _BAND_STRIDE
    sample = block[:, ::stride]
    size = sample.shape[1]
    expected = upper * size / cols
    j = min(size, int(expected + _BAND_SIGMAS * math.sqrt(expected)) + 1)
    # about j * stride candidates a row: leave room below the cap for the rows above the mean
    if j * stride * (_BAND_CANDIDATE_SHARE + 1) > cols:
        return False
    threshold = np.partition(sample, size - j, axis=1)[:, size - j : size - j + 1]
    np.greater_equal(block, threshold, out=mask)
    flat = np.flatnonzero(mask)
    # each row's run of candidates in flat (sorted): no count over the mask
    bounds = np.searchsorted(flat, np.arange(0, (r + 1) * cols, cols))
    starts, counts = bounds[:-1], np.diff(bounds)
    most = int(counts.max())
    if int(counts.min()) < upper or most * _BAND_CANDIDATE_SHARE > cols:
        return False
    valid = np.arange(most) < counts[:, None]  # the candidates' slots, row-major as flat
    key_info = np.iinfo(np.int32 if block.dtype == np.float32 else np.int64)
    keys = np.full((r, most), key_info.min, dtype=key_info.dtype)  # below -inf's key
    keys[valid] = _np_order_keys(block.reshape(-1)[flat])
    top = np.partition(keys, most - upper, axis=1)[:, most - upper :]
    member = np.greater_equal(keys, top[:, :1])  # at or above rank upper - 1
    if lower:
        top.partition(width - 1, axis=1)
        member &= np.less_equal(keys, top[:, width - 1 : width])  # at or below rank lower
    slots = np.flatnonzero(member)  # row-major: each row's members in column order
    if slots.size != r * width:  # a repeated value at an edge (or -0.0 and +0.0)
        return False
    # slot (row, s) of the padded array is candidate starts[row] + s of flat
    slots = slots.reshape(r, width) + (starts - np.arange(0, r * most, most)).reshape(-1, 1)
    np.subtract(flat[slots], np.arange(0, r * cols, cols).reshape(-1, 1), out=out)
    return True


def band_indices(x: Tensor, lower: int, upper: int) -> Tensor:
    """``[A, upper - lower]`` column indices of the entries of ranks ``[lower, upper)`` of each
    row of ``x`` in decreasing order (rank 0 = the largest), in no order.

    Plain twin: ``x.topk(upper, dim=1, sorted=True).indices[:, lower:]``. The members have the
    values of those ranks; among *equal* values at a band edge, which entry is taken may differ
    (the loss depends on the values only). Order as ``torch.topk``: ``-inf`` lowest, NaN highest.
    On CPU (float32 / float64, rows of at least ``_BAND_MIN_COLUMNS``), a block of rows at a time
    (in cache), the blocks split over torch's intra-op threads (:func:`_on_threads`) from
    ``_THREAD_MIN_ENTRIES`` per thread, over integer keys that order like the floats
    (:func:`_np_order_keys`: numpy partitions integers about twice as fast as floats): the
    band's edge keys by ``numpy.partition`` (values only, no index array moved: ~3x cheaper than
    ``argpartition``), the smallest ``lo`` of the top ``upper``, then the largest ``hi`` among
    those; the members are then the entries with ``lo <= key <= hi``, read by
    :func:`_flat_members` in column order. Each row has at least ``upper - lower`` such
    entries, exactly that many unless a value at an edge is repeated; a block with more (ties)
    takes two ``numpy.argpartition`` calls over the keys instead, a block with a NaN (of either
    sign) the same over the floats (numpy ranks every NaN highest, as ``torch.topk``; the keys
    rank a NaN with the sign bit set, the default NaN of an invalid operation on x86, below
    ``-inf``). Rows of at least ``_BAND_SAMPLE_MIN_COLUMNS`` whose band ends in their top
    quarter first select among a few candidates per row (:func:`_band_from_sample`; measured
    on 1024 x 1024, ranks [10, 102): 3.4-4.0 ms against 6.0-7.3 ms for the whole-row partition).
    """
    rows, cols = x.shape
    width = upper - lower
    numpy_path = numpy_partitions(x) and cols >= _BAND_MIN_COLUMNS and 0 < width and upper <= cols
    if not numpy_path:
        return x.detach().topk(upper, dim=1, sorted=True).indices[:, lower:]
    values = x.detach().contiguous().numpy()
    out = np.empty((rows, width), dtype=np.int64)
    step = max(1, _NUMPY_BLOCK // cols)
    key_type = np.int32 if values.dtype == np.float32 else np.int64

    def by_argpartition(first: int, last: int, order: np.ndarray) -> None:
        # two argpartitions of the block's order array: its keys (ties at an edge), or its
        # floats when it holds a NaN (numpy's float partition ranks every NaN highest,
        # whatever its sign bit, as torch.topk; the keys rank a NaN with the sign bit set, the
        # default NaN of an invalid operation on x86, below -inf)
        top = np.argpartition(order, cols - upper, axis=1)[:, cols - upper :]
        if lower:  # the width smallest of the top upper: ranks [lower, upper)
            top_order = np.take_along_axis(order, top, axis=1)
            keep = np.argpartition(top_order, width - 1, axis=1)[:, :width]
            top = np.take_along_axis(top, keep, axis=1)
        out[first:last] = top

    sampled = _samples_rows(cols, upper)

    def work(blocks) -> None:
        # the block's keys partitioned in place and its masks in buffers of the thread: fresh
        # pages cost ~2 us each on a VM, about what the partition costs per page of keys
        r_max = min(step, rows)
        scratch = np.empty((r_max, cols), dtype=key_type)
        below = np.empty((r_max, cols), dtype=bool)
        offsets = np.arange(r_max, dtype=np.int64).reshape(-1, 1) * cols
        for first, last in blocks:
            r = last - first
            block, keys = values[first:last], scratch[:r]
            if math.isnan(block.max()):  # a NaN of either sign: the float partition
                by_argpartition(first, last, block)
                continue
            if sampled and _band_from_sample(block, lower, upper, out[first:last], below[:r]):
                continue
            _np_order_keys(block, out=keys)
            keys.partition(cols - upper, axis=1)
            top = keys[:, cols - upper :]
            # the edge keys back to values (the map is its own inverse): lo = rank upper - 1,
            # hi = rank lower, the width-th smallest of the top upper
            lo = _np_order_keys(top[:, :1].copy()).view(values.dtype)
            hi = None
            if lower:
                top.partition(width - 1, axis=1)
                hi = _np_order_keys(top[:, width - 1 : width].copy()).view(values.dtype)

            def members(mask: np.ndarray, block=block, lo=lo, hi=hi, r=r) -> None:
                np.greater_equal(block, lo, out=mask)
                if hi is not None:
                    mask &= np.less_equal(block, hi, out=below[:r])

            flat = _flat_members(members, r, cols, r * width)
            if flat.size != r * width:  # a repeated value at an edge (or -0.0 and +0.0)
                by_argpartition(first, last, _np_order_keys(block))
                continue
            np.subtract(flat.reshape(r, width), offsets[:r], out=out[first:last])

    _on_threads(work, rows, max(step, _BAND_MIN_ROWS, _THREAD_MIN_ENTRIES // cols), step)
    return torch.from_numpy(out)


def band_logits(
    anchors: Tensor, columns: Tensor, band: Tensor, indices: Tensor, temperature: float
) -> Tensor:
    """The ring's logits ``band`` (``[A, W]``, read from ``anchors @ columns.T / t`` at
    ``indices``) with a sparse backward to ``anchors`` and ``columns``."""
    return _BandLogits.apply(anchors, columns, band, indices, temperature)


def column_logits(contrast, indices: Tensor) -> Tensor:
    """Ring's band, SimANS's draws: ``[A, W]`` the negative logits at the columns ``indices``,
    with :func:`band_logits`' sparse backward where the logits are ``anchors @ columns.T / t``
    (no per-anchor columns) and need a gradient: no ``[A, S]`` gradient through the score
    matrix's two products (in-batch one product; with a detached pool an ``embedding_bag``, no
    product). Plain twin: ``contrast.negative_logits.gather(1, indices)``."""
    logits = contrast.negative_logits
    if contrast.anchor_columns is None and logits.requires_grad:
        band = logits.detach().gather(1, indices)
        return band_logits(contrast.anchors, contrast.columns, band, indices, contrast.temperature)
    return logits.gather(1, indices)  # per-anchor columns: back-propagate through the gather


# above this share of the columns in the band, the anchors' gradient is one dense product
# (BLAS) rather than an embedding_bag (measured, one thread, d = 128: the bag's cost per member
# is ~3x a product's per entry)
_DENSE_BAND_SHARE = 0.25


class _BandLogits(torch.autograd.Function):
    """The ring's logits ``c_ij = <a_i, x_k> / t`` (``k = indices[i, j]``), read from the score
    matrix, with a sparse backward: the ring holds ~``rho_out`` of the candidates, so

        dL/da_i = (1/t) sum_j g_ij x_{k_ij}             (an ``embedding_bag``, no [A, C] matrix)
        dL/dx_k = (1/t) sum_{i,j: k_ij = k} g_ij a_i    (dense ``G^T a``)

    replaces the gather's dense ``[A, C]`` gradient and the products of the score matrix's
    backward. A band wider than ``_DENSE_BAND_SHARE`` of the columns takes the anchors' part as
    one dense product ``G x`` instead of the bag. In-batch (the anchors are the columns, one
    tensor ``z``) the two parts are one product ``(G + G^T) z``, ``G^T`` scattered into the same
    buffer. Same gradient as back-propagating through ``logits = a @ x.T / t``; only the
    summation order differs.
    """

    @staticmethod
    def forward(ctx, anchors, candidates, band, indices, temperature):  # type: ignore[override]
        ctx.save_for_backward(anchors, candidates, indices)
        ctx.temperature = temperature
        ctx.shared = anchors is candidates
        return band.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        anchors, candidates, indices = ctx.saved_tensors
        g = grad / ctx.temperature
        if ctx.shared:  # dL/dz = (G + G^T) z: one product (None for the same tensor's twin)
            dense = g.new_zeros(indices.shape[0], candidates.shape[0])
            dense.scatter_(1, indices, g)
            dense.T.scatter_add_(1, indices, g)
            return (dense @ anchors.to(g.dtype)).to(anchors.dtype), None, None, None, None
        grad_anchors = grad_candidates = dense = None
        wide = indices.shape[1] > _DENSE_BAND_SHARE * candidates.shape[0]
        if ctx.needs_input_grad[1] or wide:
            dense = g.new_zeros(indices.shape[0], candidates.shape[0]).scatter_(1, indices, g)
        if ctx.needs_input_grad[0]:
            if wide:
                grad_anchors = (dense @ candidates.to(g.dtype)).to(anchors.dtype)
            else:
                grad_anchors = F.embedding_bag(
                    indices, candidates, per_sample_weights=g.to(candidates.dtype), mode="sum"
                ).to(anchors.dtype)
        if ctx.needs_input_grad[1]:
            grad_candidates = (dense.T @ anchors.to(g.dtype)).to(candidates.dtype)
        return grad_anchors, grad_candidates, None, None, None


class _KeptLogMass(torch.autograd.Function):
    """``log sum_j k_ij e^{c_ij}`` over the kept entries: ``k_ij = [c_ij <= limit_i]`` (no limit:
    every entry) and 0 at the columns ``drop`` ``[A, k]``; optionally the logits at ``drop``.

    One shifted exponential ``e = e^{c - max_j c}`` over every entry (no ``-inf`` written into
    the logits: ``exp(-inf)`` and data-dependent masked writes are slow on CPU), zeroed where
    not kept by a product with the float mask ``c <= limit``; saved for the backward pass
    ``dc = e g / R`` (one pass; the read logits' gradients added at their columns). A row whose
    kept sum is below ``sqrt(tiny)`` (nothing kept, or kept entries so far below the row
    maximum that ``e`` underflows) is recomputed exactly, shifted by its kept maximum, with the
    limit raised to its least negative (``negative_mask``) when it keeps nothing.

    ``bound``: every finite logit lies in ``[-bound, bound]`` (cosine logits: ``1/t``). When
    ``e^{±bound}`` is a normal float (``_EXP_RANGE``) the shift is 0: ``e = e^c`` neither
    overflows nor loses precision, and the row maximum and the subtraction (two of the passes
    over ``[A, S]``) are skipped; the result is the same up to rounding.
    """

    @staticmethod
    def forward(ctx, logits, limit, drop, negative_mask, read, bound):  # type: ignore[override]
        floor = math.sqrt(torch.finfo(logits.dtype).tiny)
        unshifted = bound is not None and bound <= _EXP_RANGE[logits.dtype]
        # nothing dropped and every kept e at least the floor (e^0 = 1 at the row maximum, or
        # e^{-bound} unshifted): only an empty row sums to less, and it is -inf with a zero
        # gradient as it stands; no look at the sums (on an accelerator, no sync)
        exact = limit is None and drop is None and (not unshifted or math.exp(-bound) >= floor)
        if unshifted:
            row_max = logits.new_zeros(logits.shape[0], 1)
            e = logits.exp()
        else:
            row_max = logits.amax(dim=1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
            e = (logits - row_max).exp_()
        if limit is not None:
            e.mul_(torch.le(logits, limit, out=torch.empty_like(e)))
        if drop is not None:
            e.scatter_(1, drop, 0.0)
        total = e.sum(dim=1)
        bad = None if exact else total < floor
        if bad is not None and bool(bad.any()):
            rows = bad.nonzero().squeeze(1)
            x = logits[rows]
            keep = torch.isfinite(x) if negative_mask is None else negative_mask[rows].clone()
            if limit is not None:
                low = torch.where(keep, x, float("inf")).amin(dim=1, keepdim=True)
                keep &= x <= torch.maximum(limit[rows], low)
            if drop is not None:
                keep.scatter_(1, drop[rows], False)
            kept = torch.where(keep, x, float("-inf"))
            top = kept.amax(dim=1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, 0.0)
            e_rows = (kept - top).exp_()
            e[rows], row_max[rows], total[rows] = e_rows, top, e_rows.sum(dim=1)
        ctx.save_for_backward(e, _nonzero(total), drop)
        ctx.read = read
        out = row_max.squeeze(1) + total.log()
        if read:
            return out, logits.gather(1, drop)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, *read_grad):  # type: ignore[override]
        e, total, drop = ctx.saved_tensors
        out = e * (grad / total).unsqueeze(1)
        if ctx.read and read_grad[0] is not None:
            out.scatter_add_(1, drop, read_grad[0])
        return out, None, None, None, None, None


# |logit| below which e^{logit} is a normal float with room to sum a row (float32: e^{±88.7}
# overflows / turns subnormal)
_EXP_RANGE = {torch.float32: 64.0, torch.float64: 640.0}


def kept_log_mass(
    logits: Tensor,
    *,
    limit: Tensor | None = None,
    drop: Tensor | None = None,
    negative_mask: Tensor | None = None,
    read: bool = False,
    bound: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``[A]`` ``log sum_j e^{c_ij}`` over the entries with ``c_ij <= limit_i`` (``limit``
    ``[A, 1]``, detached; a row that would keep nothing keeps its least negatives, as
    ``PositiveAwareFilter._limit``) other than the columns ``drop`` ``[A, k]`` (distinct per
    row); with ``read``, also ``logits.gather(1, drop)``; ``bound``: a bound on ``|logits|``
    (finite entries), which may spare the row maximum. See :class:`_KeptLogMass`. Plain
    twins: ``logsumexp(logits.masked_fill(logits > limit, -inf))`` (positive_aware) and
    ``logsumexp(logits.scatter(1, drop, -inf))`` with the gather (fnc)."""
    limit = None if limit is None else limit.detach().to(logits.dtype)
    bound = None if bound is None else float(bound)
    return _KeptLogMass.apply(logits, limit, drop, negative_mask, read, bound)


def log_mass(logits: Tensor, bound: float | None = None) -> Tensor:
    """``[A]`` ``log sum_j e^{c_ij}`` (``-inf`` entries absent) by :class:`_KeptLogMass`: one
    exponential (unshifted where ``bound`` bounds ``|c|`` and ``e^{±bound}`` is a normal float,
    else shifted by the row maximum), one sum, and a backward of one pass ``e g / R`` from the
    saved exponentials; ``-inf`` with a zero gradient on a row without entries. Plain twin:
    ``torch.logsumexp(logits, dim=1)``, whose backward recomputes the exponentials (``x - lse``,
    ``exp``, ``* g``: three passes over ``[A, S]``) after a forward of four (row maximum, shift,
    exponential, sum). Other dtypes than float32 / float64 take the plain twin."""
    if logits.dtype not in _EXP_RANGE or logits.dim() != 2:
        return torch.logsumexp(logits, dim=1)
    # the Function itself, not kept_log_mass: that entry point stays the filters' own (fnc,
    # positive_aware; their tests count its calls)
    return _KeptLogMass.apply(
        logits, None, None, None, False, None if bound is None else float(bound)
    )


def logit_bound(contrast, shift: float = 0.0) -> float | None:
    """A bound on ``|c|`` of the contrast set's logits moved by at most ``shift``: ``1/t +
    shift`` when they are cosines over the temperature, None (no bound) on raw dot products."""
    return 1.0 / contrast.temperature + shift if contrast.normalized else None


def contrast_log_mass(contrast) -> Tensor:
    """:func:`log_mass` of a contrast set's negative logits, bounded by :func:`logit_bound` (the
    InfoNCE objective's unweighted negative mass)."""
    return log_mass(contrast.negative_logits, logit_bound(contrast))


def kept_counts(
    log_keep: Tensor,
    multiplicity: Tensor | None,
    *,
    sample: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``[A, C]`` kept cells per column: ``m_ij`` cells of probability ``pi_ij = e^{log_keep_ij}``.

    ``multiplicity`` ``m`` ``[A, C]`` (integer-valued, None = 1): how many grid cells of row ``i``
    read column ``j``; every cell of a column shares its ``pi``. ``sample='expected'``: ``m pi``
    (what summing ``pi`` over the cells gives); ``'bernoulli'``: ``Binomial(m, pi)``, the law of
    the sum of the cells' independent draws, as layers: layer ``r`` draws one Bernoulli per entry
    of the columns where some row has more than ``r`` cells (``sum_j max_i m_ij`` draws per row,
    at most the grid's count, no per-cell gather or scatter), each a random byte against
    ``floor(256 pi)`` (:func:`bernoulli_bytes`) instead of a float uniform.
    """
    pi = log_keep.exp()
    if sample == "expected":
        return pi if multiplicity is None else pi.mul_(multiplicity.to(pi.dtype))
    if multiplicity is None:
        return bernoulli_bytes(pi.float(), generator).to(pi.dtype)
    # draws from float32 probabilities whatever the dtype: a seed gives the same draws in float64
    dtype, pi = pi.dtype, pi.float()
    m = multiplicity if multiplicity.dtype == pi.dtype else multiplicity.to(pi.dtype)
    counts = bernoulli_bytes(pi.masked_fill_(m == 0, 0.0), generator)
    # [C]; no anchors: no layer (amax has no row to reduce)
    top = m.amax(dim=0) if m.shape[0] else m.new_zeros(m.shape[1])
    layers = int(top.max()) if top.numel() else 0
    for r in range(1, layers):
        cols = (top > r).nonzero().squeeze(1)
        p = pi[:, cols] * (m[:, cols] > r)
        counts.index_add_(1, cols, bernoulli_bytes(p, generator))
    return counts.to(dtype)


class _WeightedLogMass(torch.autograd.Function):
    """``log sum_j w_ij e^{c_ij}`` for ``w >= 0``: shifted by the row maximum over the kept
    entries (``w > 0``; the others read as ``-inf``, so nothing overflows), gradient
    ``w e^{c - log R}``; a row with nothing kept is ``-inf`` with a zero gradient."""

    @staticmethod
    def forward(ctx, logits, weights):  # type: ignore[override]
        kept = torch.where(weights > 0, logits, float("-inf"))
        row_max = kept.amax(dim=1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        e = kept.sub_(row_max).exp_()  # 0 where not kept
        total = _row_dot(e, weights)
        ctx.save_for_backward(e, weights, _nonzero(total))
        return row_max.squeeze(1) + total.log()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        e, weights, total = ctx.saved_tensors
        return e.mul(weights).mul_((grad / total).unsqueeze(1)), None


def weighted_log_mass(logits: Tensor, weights: Tensor) -> Tensor:
    """``[A]`` ``log sum_j w_ij e^{c_ij}`` for detached weights ``w >= 0`` ``[A, S]`` (``-inf``
    logits only where ``w = 0``); ``-inf`` with a zero gradient where a row keeps nothing."""
    return _WeightedLogMass.apply(logits, weights.detach().to(logits.dtype))


def row_exponentials(logits: Tensor, bound: float | None = None) -> tuple[Tensor | None, Tensor]:
    """``(m [A], e^{c - m} [A, S])`` of the detached logits for a row constant ``m``: the row
    maximum ``max_j c_ij`` (every exponent ``<= 0``, as :func:`tilted_log_mass` computes them;
    its ``shifted`` argument), or ``(None, e^{c})`` (no shift) when ``bound`` is given and at
    most ``_EXP_RANGE / 2``. ``bound``: the largest ``|x|`` of any exponential ``e^{x}`` the
    caller forms from these (the tilted mass of cosine logits, ``|c| <= 1/t``, forms ``e^{c}``
    and ``e^{(1 + beta) c}``: ``(1 + max(beta, 1)) / t``); then ``e^{c}`` and its products
    neither overflow nor leave the normal range (with room for sums and factors), and the row
    maximum and the subtraction (two passes over ``[A, S]``) are skipped."""
    with torch.no_grad():
        if bound is not None and bound <= _EXP_RANGE.get(logits.dtype, 0.0) / 2:
            return None, logits.exp()
        row_max = logits.amax(dim=1, keepdim=True)
        return row_max.squeeze(1), (logits - row_max).exp_()


def softmax_expectation(
    shifted: tuple[Tensor, Tensor], positive: Tensor, columns: Tensor
) -> tuple[Tensor, Tensor]:
    """``(sum_k p_ik z_k [A, d], p_i+ [A])`` under the softmax over the positive logit
    ``positive`` ``[A]`` and the negatives, from the shifted exponentials: the product with the
    unnormalised ``e`` and a row scale after it (plain twin:
    ``hardneg.strategies.unremix.softmax_expectation``)."""
    row_max, e = shifted
    log_z = torch.logaddexp(e.sum(dim=1).log(), positive - row_max)  # log Z - max
    return (e @ columns) * (-log_z).exp().unsqueeze(1), (positive - row_max - log_z).exp()


def _vector_row_range(v: Tensor, contrast) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` ``[A]`` of a column vector ``v`` ``[C]`` over each anchor's negatives, without
    an ``[A, C]`` pass: with ``M`` the smallest count of negatives of a row, the ``C - M + 1``
    smallest (largest) entries hold at least one negative of every row, and the first of them in
    order is the row's minimum (maximum); one look-up of ``[A, 2 (C - M + 1)]`` mask bits for
    both ends. When that is more than a quarter of the columns, the masked reduction over
    ``[A, C]``."""
    mask = contrast.negative_mask
    if mask is None:  # every column is a negative of every anchor
        a = contrast.negative_logits.shape[0]
        return v.amin().expand(a), v.amax().expand(a)
    m = contrast.num_negatives
    m = m if isinstance(m, int) else (int(m.min()) if m.numel() else 0)
    c = v.shape[0]
    k = c - m + 1
    if 0 < m <= c and 4 * k <= c and mask.shape[1] == c:
        low, high = v.topk(k, largest=False), v.topk(k)  # each sorted from its end inwards
        hits = mask.index_select(1, torch.cat([low.indices, high.indices])).view(-1, 2, k)
        if bool(hits.any(dim=2).all()):  # else a row with fewer than M negatives
            first = hits.to(torch.uint8).argmax(dim=2)  # [A, 2]: the first hit in order
            ends = torch.stack([low.values, high.values]).gather(1, first.T)  # [2, A]
            return ends[0], ends[1]
    lo = torch.where(mask, v, float("inf")).amin(dim=1)
    hi = torch.where(mask, v, float("-inf")).amax(dim=1)
    return lo, hi


def _unit_rows(x: Tensor) -> Tensor:
    """``x`` with each row divided by its norm, in place (0 rows stay 0); ``F.normalize`` but
    for its floor of ``1e-12`` on the norm (rows given up to a positive scale)."""
    return x.div_(
        torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(torch.finfo(x.dtype).tiny)
    )


def _minmax_coefficients(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` of the min-max map ``x -> (x - lo) / (hi - lo)`` (0 and 0 on a constant
    or empty row, as ``hardneg.strategies.unremix.minmax_over_negatives``)."""
    span = hi - lo
    ok = span > 0
    scale = torch.where(ok, span.reciprocal(), 0.0)  # 1 / span where it is positive
    return scale, torch.where(ok, scale * -lo, 0.0)


def _zeroed_row_range(
    u: Tensor, mask: Tensor | None, lo: Tensor | None = None, hi: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` ``[A]`` of ``u`` over each row's negatives, ``u`` being 0 off them: one
    ``amin`` and one ``amax`` pass (no masked copy; or their results given, written over); a
    row whose minimum is not below 0 (maximum not above 0, so ``lo hi >= 0``) may owe it to a
    zero off the negatives, and only those rows are reduced again under the mask."""
    if lo is None or hi is None:
        lo, hi = u.amin(dim=1), u.amax(dim=1)
    if mask is None or not bool((lo * hi >= 0).any()):
        return lo, hi
    again = ((lo >= 0) | (hi <= 0)).nonzero().squeeze(1)
    rows, keep = u[again], mask[again]
    lo[again] = torch.where(keep, rows, float("inf")).amin(dim=1)
    hi[again] = torch.where(keep, rows, float("-inf")).amax(dim=1)
    return lo, hi


def unremix_column_deltas(
    contrast, shifted: tuple[Tensor | None, Tensor], *, direction: bool = False
) -> Tensor | None:
    """With a pool: ``delta_j = (1/t)(sum_i p~_ji q_i - z_j)``, ``p~_j = softmax_i(c_ij)`` ``[C, d]``
    from the row exponentials ``e_ij = e^{c_ij - m_i}`` already computed: with ``M = max_i m_i``
    and ``w_i = e^{m_i - M}``, ``p~_ij = e_ij w_i / sum_k e_kj w_k``, so ``sum_i p~_ji q_i`` is one
    product ``e^T (w q)`` and a column scale (no ``[A, C]`` softmax over anchors; ``w = 1`` when
    the exponentials are unshifted, ``m = None``). None when that could underflow (a column
    whose largest ``c_ij - M`` is below about ``log tiny / 2``, which the plain column softmax
    still resolves, or a row without negatives): the caller then uses the plain form (plain
    twin: ``hardneg.strategies.unremix.column_gradients``). ``direction``: ``delta_j`` times
    ``t sum_k e_kj w_k > 0`` instead, ``e^T (w q) - (sum_k e_kj w_k) z_j`` (no column scale; for
    ``cos(delta_i, delta_j)``, which only needs the directions)."""
    row_max, e = shifted
    anchors = contrast.anchors.detach().to(e.dtype)
    if row_max is None:
        total = e.sum(dim=0)  # [C]: sum_i e^{c_ij}
    else:
        if not bool(torch.isfinite(row_max).all()):
            return None
        w = (row_max - row_max.max()).exp()  # <= 1, one entry = 1
        total = w @ e  # [C]: sum_i e^{c_ij - M}
        anchors = anchors * w.unsqueeze(1)
    low = total < torch.finfo(e.dtype).tiny ** 0.5
    if bool(low.any()):
        mask = contrast.negative_mask
        if mask is None or bool(mask[:, low].any()):  # a negative whose mass would underflow
            return None
        total = torch.where(low, 1.0, total)  # columns no anchor has: p~ = 0, as plain
    expected = e.T @ anchors
    columns = contrast.columns.detach().to(e.dtype)
    if direction:
        return expected.addcmul_(columns, total.unsqueeze(1), value=-1.0)
    expected.div_(total.unsqueeze(1))
    return expected.sub_(columns).div_(contrast.temperature)


def unremix_factor(
    contrast,
    shifted: tuple[Tensor, Tensor],
    *,
    lambda_u: float,
    lambda_d: float,
    eps: float,
    gradient_norm: bool,
    density: bool,
    zero_absent: bool,
    plain_column_deltas=None,
) -> Tensor:
    """``[A, C]`` ``k_i (lambda_u U~_ij + lambda_d D~'_j + eps)`` on each anchor's negatives, for a
    per-row constant ``k_i > 0`` (the tilted mass normalises the weights per row, so it does not
    change the loss); finite off the negatives, and 0 there when ``zero_absent`` (needed when the
    factor is used without the exponential, ``beta = 0``). Plain twin:
    ``hardneg.strategies.unremix.UnReMixNegatives.mix`` (``k_i = 1``). Detached; computes in the
    logits' dtype. What it saves over the plain form:

    * with no hidden features on L2-normalised embeddings, ``cos(h_i, h_j)`` is ``t c_ij``: no
      product (the masked ``-inf`` entries are overwritten before the min-max);
    * ``cos(delta_i, delta_j) t c_ij`` as one product of rows normalised first (``t`` folded into
      the ``[A, d]`` side), multiplied in place by the logits;
    * ``U`` is 0 off the negatives; its row range from one ``amin`` and one ``amax`` pass (the
      rows that could owe an end to such a 0 reduced again under the mask,
      :func:`_zeroed_row_range`); ``D`` (and ``U`` for ``gradient_norm``) are ``[C]`` vectors:
      their row ranges without an ``[A, C]`` pass (:func:`_vector_row_range`);
    * the mix as ``U - lo`` plus the row constants plus one in-place rank-1 update per vector
      (``k_i = 1 / (lambda_u scale_i)``, so ``U~`` is never scaled), no ``[A, C]`` temporary
      and no masked pass (``-inf`` logits make the exponentials 0 off the negatives);
    * with a pool, the column softmax over anchors from the row exponentials
      (:func:`unremix_column_deltas`); ``plain_column_deltas(contrast)`` is the fallback.

    ``shifted``: :func:`row_exponentials` of the logits.
    """
    logits = contrast.negative_logits.detach()
    a, c = logits.shape
    dtype = logits.dtype
    mask = contrast.negative_mask
    # the [C] scores (D, and U for gradient_norm): (vector, weight, lo [A], hi [A]); the mix
    # minus U's term is base + sum_r weight_r (vector_rj - lo_ri) / (hi_ri - lo_ri)
    ranges: list[tuple[Tensor, float, Tensor, Tensor]] = []
    base = eps
    u = lo_u = hi_u = scale_u = None
    if lambda_u > 0:
        in_batch = contrast.columns is contrast.anchors  # the columns' deltas are the anchors'
        h_a, h_c = contrast.anchor_features, contrast.column_features
        from_logits = h_a is None or h_c is None
        if from_logits:
            h_a, h_c = contrast.anchors, contrast.columns
        h_a, h_c = h_a.detach().to(dtype), h_c.detach().to(dtype)
        if gradient_norm:  # ||delta_j||: the columns' deltas themselves
            delta_c = anchor_deltas(contrast, shifted) if in_batch else None
            if delta_c is None:
                delta_c = unremix_column_deltas(contrast, shifted)
            if delta_c is None:
                delta_c = plain_column_deltas(contrast).to(dtype)
            u_vec = delta_c.norm(dim=1) * h_c.norm(dim=1)
            ranges.append((u_vec, lambda_u, *_vector_row_range(u_vec, contrast)))
        else:
            # cos(delta_i, delta_j) needs only the deltas' directions (positive row scales)
            unit_a = _unit_rows(anchor_deltas(contrast, shifted, direction=True))
            if in_batch:
                unit_c = unit_a
            else:
                dir_c = unremix_column_deltas(contrast, shifted, direction=True)
                if dir_c is None:
                    dir_c = plain_column_deltas(contrast).to(dtype)
                unit_c = _unit_rows(dir_c)
            u = unit_a @ unit_c.T
            if from_logits and contrast.normalized:
                # cos(h_i, h_j) = t c_ij: U / t = cos(delta_i, delta_j) c_ij (the min-max is
                # the same for U / t)
                u.mul_(logits)
                if mask is not None:  # -inf logits off the negatives: +-inf or nan -> 0
                    u.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            else:
                u.mul_(F.normalize(h_a, dim=1) @ F.normalize(h_c, dim=1).T)
                if mask is not None:
                    u.masked_fill_(~mask, 0.0)
            lo_u, hi_u = u.amin(dim=1), u.amax(dim=1)
    if lambda_d > 0:
        z = contrast.columns.detach().to(dtype)
        # D_j = 1 + d_j / max(C - 1, 1) for d_j = |z_j|^2 - z_j . sum_k z_k: the min-max over
        # each row is the same for d as for D (a positive scale and a shift)
        # (|z_j|^2 by a norm: no [C, d] temporary, whose fresh pages cost more than the sum)
        d_vec = torch.addmv(
            torch.linalg.vector_norm(z, dim=1).square_(), z, z.sum(dim=0), alpha=-1.0
        )
        weight = -lambda_d if density else lambda_d  # 1 - D~ for density
        ranges.append((d_vec, weight, *_vector_row_range(d_vec, contrast)))
        base += lambda_d if density else 0.0
    if u is not None:
        span_u = hi_u - lo_u
        # lo < 0 < hi: no end is owed to a 0 off the negatives (else _zeroed_row_range)
        ok = span_u > 0 if mask is None else lo_u * hi_u < 0
        spans = [hi - lo for _, _, lo, hi in ranges]
        for span in spans:
            ok &= span > 0
        if bool(ok.all()):  # no constant row: k_i = lambda_u / span_u_i > 0
            # k_i (U - lo_u + span_u / lambda_u (base + sum_r w_r (v_rj - lo_ri) / span_ri)),
            # U - lo first (exact for close values, as the plain form's x - lo)
            inv_k = span_u.mul_(1.0 / lambda_u)
            shift: float | Tensor = base
            terms = []
            for (vector, weight, lo, _), span in zip(ranges, spans):
                coef = span.reciprocal_().mul_(weight)
                shift = torch.addcmul(torch.as_tensor(shift, dtype=dtype), coef, lo, value=-1.0)
                terms.append((coef.mul_(inv_k), vector))
            out = u.sub_(lo_u.unsqueeze(1)).add_((inv_k * shift).unsqueeze(1))
            for coef, vector in terms:  # rank-1 terms in place (a K = 1 product is slower)
                out.addcmul_(coef.unsqueeze(1), vector.unsqueeze(0))
            if zero_absent and mask is not None:
                out.masked_fill_(~mask, 0.0)
            return out
        lo_u, hi_u = _zeroed_row_range(u, mask, lo_u, hi_u)
        scale_u, _ = _minmax_coefficients(lo_u, hi_u)
    const: float | Tensor = base
    vectors: list[Tensor] = []
    coefs: list[Tensor] = []
    for vector, weight, lo, hi in ranges:
        scale, shift = _minmax_coefficients(lo, hi)
        vectors.append(vector)
        coefs.append(scale * weight)
        const = shift.mul(weight).add_(const)
    if u is None:
        const = torch.as_tensor(const, dtype=dtype).expand(a)
        out = torch.addcmul(const.unsqueeze(1), coefs[0].unsqueeze(1), vectors[0].unsqueeze(0))
        terms = zip(coefs[1:], vectors[1:])
    elif bool(scale_u.all()):  # k_i = lambda_u / span_i > 0: k_i (U - lo + (...) / k_i)
        # U - lo first (exact for close values, as the plain form's x - lo)
        inv_k = scale_u.reciprocal().div_(lambda_u)
        out = u.sub_(lo_u.unsqueeze(1)).add_((inv_k * const).unsqueeze(1))
        terms = ((coef.mul_(inv_k), vector) for coef, vector in zip(coefs, vectors))
    else:  # a row whose U is constant over its negatives: k_i = 1, U~ = 0 there
        out = u.sub_(torch.where(scale_u > 0, lo_u, 0.0).unsqueeze(1))
        out.mul_((scale_u * lambda_u).unsqueeze(1)).add_(
            torch.as_tensor(const, dtype=dtype).unsqueeze(-1)
        )
        terms = zip(coefs, vectors)
    for coef, vector in terms:  # rank-1 terms in place (a K = 1 product is slower on CPU)
        out.addcmul_(coef.unsqueeze(1), vector.unsqueeze(0))
    if zero_absent and mask is not None:
        out.masked_fill_(~mask, 0.0)
    return out


def anchor_deltas(
    contrast, shifted: tuple[Tensor | None, Tensor], *, direction: bool = False
) -> Tensor:
    """``delta_i = (1/t)(sum_k p_ik z_k - z_{i+})`` ``[A, d]`` from the row exponentials (plain
    twin: ``hardneg.strategies.unremix.anchor_gradients``; with ``direction``,
    ``anchor_gradient_directions``). ``direction``: ``delta_i`` times
    ``t Z_i e^{-m_i} > 0`` instead (``Z_i`` the softmax's normaliser), which is
    ``sum_j e_ij z_j - (sum_j e_ij) z_{i+}`` over the negatives (the positive's term of
    ``sum_k p_ik (z_k - z_{i+})`` is 0): one product and one row sum, no normaliser (for
    ``cos(delta_i, delta_j)``, which only needs the directions)."""
    row_max, e = shifted
    positive = contrast.positives.detach()[:, 0].to(e.dtype)
    if direction:
        expected = e @ contrast.columns.detach().to(e.dtype)
        return expected.addcmul_(positive, e.sum(dim=1, keepdim=True), value=-1.0)
    pos_logit = contrast.positive_logits.detach()[:, 0]
    expected, p_pos = softmax_expectation(
        (0.0 if row_max is None else row_max, e), pos_logit, contrast.columns.detach()
    )
    return expected.addcmul_(positive, (p_pos - 1.0).unsqueeze(1)).div_(contrast.temperature)


class _MixedColumnLogits(torch.autograd.Function):
    """Values: entries of the contrast set's own logits (no new product); gradient: to the
    anchors only, ``dL/dq = (G_shared @ C + sum_h G_own n_h) / t``, the columns detached."""

    @staticmethod
    def forward(ctx, anchors, logits, index, columns, anchor_columns, temperature):  # type: ignore[override]
        ctx.save_for_backward(index, columns, anchor_columns)
        ctx.temperature = temperature
        ctx.shape = logits.shape
        return logits.gather(1, index)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        index, columns, anchor_columns = ctx.saved_tensors
        dense = grad.new_zeros(ctx.shape).scatter_add_(1, index, grad)
        c = columns.shape[0]
        grad_q = dense[:, :c] @ columns
        if anchor_columns is not None:
            grad_q = grad_q + torch.einsum("ah,ahd->ad", dense[:, c:], anchor_columns)
        return grad_q / ctx.temperature, None, None, None, None, None


def mixed_column_logits(contrast, index: Tensor) -> Tensor:
    """MoCHi: ``[A, n]`` ``q · n_j / t`` of the columns ``index`` ``[A, n]`` of each anchor, with
    a gradient to the anchors only, read from the contrast set's logits instead of a second
    product (plain twin: ``anchor_column_logits(contrast).gather(1, index)`` in
    ``hardneg.strategies.mochi``). Equal on negative columns, the only ones MoCHi draws."""
    own = None if contrast.anchor_columns is None else contrast.anchor_columns.detach()
    return _MixedColumnLogits.apply(
        contrast.anchors,
        contrast.negative_logits.detach(),
        index,
        contrast.columns.detach(),
        own,
        contrast.temperature,
    )


def _scratch(specs: list[tuple[tuple[int, ...], torch.dtype]], device) -> list[Tensor]:
    """Tensors of the given shapes and dtypes for a call's temporaries: views of one fresh byte
    buffer (one allocation instead of one per temporary). Nothing is kept between calls: a
    buffer kept per thread cut MoCHi's page faults on the CPU, but its gain depended on the
    allocator's state (1.50 against 1.90x InfoNCE first in a process, 1.70 against 1.65 later;
    session 9) and the issue asks for no kept buffers."""
    sizes = [-(-math.prod(shape) * dtype.itemsize // 64) * 64 for shape, dtype in specs]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    out, at = [], 0
    for (shape, dtype), size in zip(specs, sizes):
        n = math.prod(shape) * dtype.itemsize
        out.append(buffer[at : at + n].view(dtype).view(shape))
        at += size
    return out


# entries of a [rows, 2 s + s'] block of MoCHi's draws: a block's temporaries stay in cache, and
# none reaches glibc's 32 MiB mmap threshold (N = 1024 in-batch drew 2048 x 2176 int64 columns,
# 36 MB, which page-fault on every call); measured at 1 thread (loaded machine) 2^18-2^19 best,
# 2^20 and one block 10-30 % slower; with 2 threads on the loaded machine fewer, larger blocks
# stall less (as SimANS's draw, docs/benchmarks.md)
_MIX_BLOCK = 1 << 19


def _mix_anchor_gradient(grad_q, ctx, grad, lse, row_scale, self_weight, q) -> tuple:
    """The end of both MoCHi mix backwards (:class:`_MixLogMass`, :class:`_MixBagLogMass`):
    ``grad_q`` (the columns' weighted sum) plus the query mixes' share ``w q``, times the
    incoming gradient and the row's softmax scale over ``t`` (0 on a row with no mix), and no
    gradient for the other eight inputs."""
    grad_q.addcmul_(self_weight, q)
    scale = torch.where(torch.isfinite(lse), grad * row_scale, 0.0)
    return grad_q.mul_(scale.div_(ctx.temperature).unsqueeze(1)), *([None] * 8)


class _MixLogMass(torch.autograd.Function):
    """MoCHi's synthetic negatives: forward the log-mass computed by :func:`mochi_mix_log_mass`;
    backward to the anchors only: the incoming gradient ``g [A]`` times ``(W C + w q) / t``, with
    ``W [A, S]`` the softmax weights times the mixing coefficients scatter-added per column and
    ``w [A, 1]`` the query mixes' share of the anchor itself (``q · q.detach()``), both from the
    forward (one product, no graph over ``[A, s + s']``)."""

    @staticmethod
    def forward(ctx, anchors, lse, row_scale, weights, self_weight, q, columns, anchor_columns, t):  # type: ignore[override]
        ctx.save_for_backward(lse, row_scale, weights, self_weight, q, columns, anchor_columns)
        ctx.temperature = t
        return lse.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        lse, row_scale, weights, self_weight, q, columns, anchor_columns = ctx.saved_tensors
        c = columns.shape[0]
        grad_q = weights[:, :c] @ columns
        if anchor_columns is not None:
            grad_q += torch.einsum("ah,ahd->ad", weights[:, c:], anchor_columns)
        return _mix_anchor_gradient(grad_q, ctx, grad, lse, row_scale, self_weight, q)


def _logit_cosine(
    logits: Tensor,
    columns: Tensor,
    t: float,
    first: Tensor,
    second: Tensor,
    scratch: tuple[Tensor, Tensor] | None = None,
):
    """In-batch (anchor ``i`` is column ``i``): ``n_i · n_j = t c_ij`` read from the logits; the
    few pairs on a masked entry (``i = j``, a positive pair, a duplicate) by row-wise dots.
    ``scratch``: contiguous int64 and float buffers of ``first.numel()`` entries for the flat
    positions and the result (the caller's dead memory: no fresh pages)."""
    cols = logits.shape[1]
    if scratch is None:
        flat = torch.add(second, first, alpha=cols).view(-1)
        cosine = logits.reshape(-1).index_select(0, flat)
    else:
        flat, cosine = scratch
        torch.add(second, first, alpha=cols, out=flat.view(first.shape))
        torch.index_select(logits.reshape(-1), 0, flat, out=cosine)
    cosine.mul_(t)
    if numpy_partitions(cosine) and numpy_partitions(columns):
        # the same in numpy (measured at N = 256 in-batch, 65k pairs of which ~700 masked:
        # 0.05 ms against torch's isinf / nonzero / gathers 0.34 ms)
        values = cosine.numpy()
        masked_at = np.flatnonzero(np.isinf(values))
        if masked_at.size:
            i, j = np.divmod(flat.numpy()[masked_at], cols)
            z = columns.numpy()
            values[masked_at] = np.einsum("ij,ij->i", z[i], z[j])
        return cosine.view(first.shape)
    masked = torch.isinf(cosine).nonzero().squeeze(1)
    if masked.numel():  # the pair from its flat position (no copy of the strided first, second)
        at = flat[masked]
        i = torch.div(at, cols, rounding_mode="floor")
        cosine[masked] = torch.linalg.vecdot(columns[i], columns[at - i * cols]).to(cosine.dtype)
    return cosine.view(first.shape)


# a shared pool's pair cosines: the (half) Gram matrix when C^2 <= this many times A s, else
# row-wise dots of the pairs (measured on CPU: a Gram entry costs about 1/27 of a row-wise dot)
_GRAM_PER_PAIR = 48


# entries of the gathered rows per chunk of _pair_dots: 1024 pairs of d = 128, two 512 KiB
# buffers in cache (measured in the loss, 1 thread: 2^17 3-8 % faster than 2^15, 5-14 % than 2^19)
_PAIR_DOTS_BLOCK = 1 << 17


def _pair_dots(columns: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``columns[first] · columns[second]`` per pair, about 1024 pairs (of ``d = 128``) at a
    time so that the gathered rows stay in cache."""
    out = columns.new_empty(first.numel())
    i, j = first.reshape(-1), second.reshape(-1)
    step = max(1, _PAIR_DOTS_BLOCK // max(1, columns.shape[1]))
    for start in range(0, out.numel(), step):
        part = slice(start, start + step)
        x, y = columns.index_select(0, i[part]), columns.index_select(0, j[part])
        torch.linalg.vecdot(x, y, out=out[part])
    return out.view(first.shape)


def _upper_gram(columns: Tensor) -> Tensor:
    """``[C, C]`` the columns' Gram matrix on and above its diagonal only (one product per block
    of rows from its diagonal on: up to 8 blocks of at least 512 rows, about 56 % of the full
    product's work); the entries below are left unset."""
    c = columns.shape[0]
    parts = max(1, min(8, c // 512))
    gram = columns.new_empty(c, c)
    step = -(-c // parts)
    for start in range(0, c, step):
        rows = columns[start : start + step]
        torch.mm(rows, columns[start:].T, out=gram[start : start + step, start:])
    return gram


def _upper_gram_at(gram: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``gram[i, j]`` at the pairs, read at ``(min, max)`` (the upper triangle)."""
    low, high = torch.minimum(first, second), torch.maximum(first, second)
    flat = torch.add(high, low, alpha=gram.shape[0]).view(-1)
    return gram.view(-1).index_select(0, flat).view(first.shape)


def _inverse_norm_into(
    out: Tensor, a: Tensor, cosine: Tensor, spread: Tensor | None = None
) -> Tensor:
    """``out = (1 - 2 a (1 - a) (1 - cosine))^-1/2`` (MoCHi's ``_inverse_mix_norm``, the
    squared norm clamped at ``1e-24``); ``spread``: a buffer of ``a``'s shape for ``a (1 - a)``."""
    spread = torch.addcmul(a, a, a, value=-1.0, out=spread)  # a (1 - a)
    torch.sub(cosine, 1.0, out=out).mul_(spread).mul_(2.0).add_(1.0)
    return out.clamp_(min=1e-24).rsqrt_()


def mochi_mix_log_mass(strategy, contrast, context) -> Tensor:
    """MoCHi: ``[A]`` ``log sum_k e^{q · h_k / t}`` over each anchor's ``s + s'`` synthetic
    negatives (``-inf`` on a row without negatives), with a gradient to the anchors only.
    Plain twin: ``HardNegativeMixing.draw`` and ``select`` (the mixes' logits from gathered
    dot products, coefficients detached) and the objective's ``logsumexp`` over them: the same
    draws for a seed (the uniforms of a block of rows are the next words of the generator, as
    in one call on the CPU; one block on an accelerator), the same logits up to rounding.

    A block of rows at a time: its uniforms, the drawn columns ``i``, ``j`` (from the hardest set
    ``Q~``, :meth:`HardNegativeMixing.hardest`), their logits ``d = q · n / t`` read from the
    contrast set's own logits, the pairs' ``n_i · n_j`` (in-batch read from the logits as
    ``t c_ij``; a shared pool from the upper triangle of its Gram matrix; otherwise row-wise
    dots of the gathered columns), the logits ``(d_j + a (d_i - d_j)) r`` and ``(b q·q / t +
    (1 - b) d_j) r'`` (``r``, ``r'`` the mixes' inverse norms; 1 with raw dot products), their
    log-sum-exp and softmax, and the softmax weights times the coefficients: summed per member
    of ``Q~`` (``[A, k']``) for an ``embedding_bag`` of the members in the backward where the
    columns are shared and not every column is a member (:class:`_MixBagLogMass`), else
    scatter-added into ``W [A, S]`` for one product ``W C`` (:class:`_MixLogMass`). The block's
    temporaries are views of one buffer of the call (:func:`_scratch`)."""
    s, s_query = strategy.num_mixed, strategy.num_query_mixed
    logits = contrast.negative_logits.detach()
    rows, width = logits.shape
    t = contrast.temperature
    dtype = logits.dtype
    n_draw, per_row = 2 * s + s_query, 3 * s + 2 * s_query
    with torch.no_grad():
        index, count = strategy.hardest(contrast, fast=True)
        columns = contrast.columns.detach()
        c = columns.shape[0]
        own = None if contrast.anchor_columns is None else contrast.anchor_columns.detach()
        q = contrast.anchors.detach().to(dtype)
        in_batch = contrast.anchors is contrast.columns and own is None
        gram = None
        step = max(2, _MIX_BLOCK // max(1, n_draw))
        if contrast.normalized and not in_batch:
            if own is None and c * c <= _GRAM_PER_PAIR * rows * s:
                gram = _upper_gram(columns)
            elif own is not None:  # row-wise dots: [rows, s, d] gathered columns per block
                step = min(step, max(2, (1 << 22) // max(1, s * columns.shape[1])))
        step -= step % 2  # an even number of uniforms per block: whole random words
        if logits.device.type != "cpu":
            step = rows
        # shared columns: the softmax weights times the coefficients summed per member of Q~
        # (a scatter-add at the drawn positions) for the backward's embedding_bag over the
        # k' members of a row (measured on CPU: a bag row of d entries costs about as much as
        # a column of W C, d multiply-adds per anchor, and k' <= S; the drawn columns need
        # not outlive the call); every column a member (index the expanded arange) or the
        # anchors' own columns: the weights per column W [A, S] for one product
        members = own is None and index.stride(0) != 0
        weights = logits.new_zeros(index.shape if members else (rows, width))
        lse = logits.new_empty(rows)
        row_scale = logits.new_empty(rows)  # 1 / the exponentials' row sum
        self_weight = logits.new_zeros(rows, 1)
        block = min(step, rows)
        n_mix = s + s_query
        # the block's temporaries, reused block after block
        words, positions, drawns, ds, flats, cosines, mixes, norms, firsts, spreads = _scratch(
            [
                ((-(-block * per_row // 2),), torch.int64),
                ((block * n_draw,), torch.int64),
                ((block * n_draw,), torch.int64),
                ((block * n_draw,), dtype),
                ((block * s,), torch.int64),
                ((block * s,), dtype),
                ((block * n_mix,), dtype),
                ((block * n_mix,), dtype),
                ((block * n_mix,), dtype),
                ((block * n_mix,), dtype),
            ],
            logits.device,
        )
        for start in range(0, rows, step):
            part = slice(start, start + step)
            m = min(step, rows - start)
            u = mochi_uniforms((m, per_row), context.generator, logits.device, out=words)
            position = positions[: m * n_draw].view(m, n_draw)
            position.copy_(u[:, :n_draw].mul_(count[part]))  # truncated, as .long()
            drawn = drawns[: m * n_draw].view(m, n_draw)
            torch.gather(index[part], 1, position, out=drawn)
            d = torch.gather(logits[part], 1, drawn, out=ds[: m * n_draw].view(m, n_draw))
            # g = [a | b]: each mix's coefficient of its first vector (n_i; the query itself),
            # 1 - g that of its second (n_j; the drawn column), with d = [d_i | d_j | d_q]
            g = u[:, n_draw:].to(dtype)
            g[:, s:].mul_(0.5)
            r = norms[: m * n_mix].view(m, n_mix)  # the mixes' cosines, then inverse norms
            if not contrast.normalized:
                r.fill_(1.0)
            else:
                if s > 0:
                    first, second = drawn[:, :s], drawn[:, s : 2 * s]
                    if in_batch:
                        scratch = (flats[: m * s], cosines[: m * s])
                        cosine = _logit_cosine(logits, columns, t, first, second, scratch)
                    elif gram is not None:
                        cosine = _upper_gram_at(gram, first, second)
                    elif own is None:
                        cosine = _pair_dots(columns, first, second)
                    else:
                        sub = replace(
                            contrast,
                            anchors=contrast.anchors[part],
                            anchor_columns=None if own is None else contrast.anchor_columns[part],
                        )
                        cosine = torch.linalg.vecdot(
                            strategy._column_vectors(sub, first),
                            strategy._column_vectors(sub, second),
                        )
                    r[:, :s].copy_(cosine)
                if s_query > 0:  # the query mix's cosine is q · n_j = t d_j
                    torch.mul(d[:, 2 * s :], t, out=r[:, s:])
                _inverse_norm_into(r, g, r, spreads[: m * n_mix].view(m, n_mix))
            first_scale = torch.mul(g, r, out=firsts[: m * n_mix].view(m, n_mix))  # g r
            second_scale = r.sub_(first_scale)  # (1 - g) r
            # the mixes' logits: (1 - g) r [d_j | d_q] + g r [d_i | q · q / t]
            x = torch.mul(second_scale, d[:, s:], out=mixes[: m * n_mix].view(m, n_mix))
            if s > 0:
                x[:, :s].addcmul_(first_scale[:, :s], d[:, :s])
            if s_query > 0:
                self_logit = _row_dot(q[part], q[part]).div_(t).unsqueeze(1)
                x[:, s:].addcmul_(first_scale[:, s:], self_logit)
            # their log-sum-exp from one exponential exp(x - max) (the max 0 where infinite, as
            # in torch.logsumexp): 0 on a row without negatives (it draws masked columns, index
            # 0 of an empty Q~: its d and x are -inf); the softmax weights are these
            # exponentials over their row sum, the division left to the backward's row scale
            top = torch.amax(x, dim=1, keepdim=True).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            block_lse = torch.sum(x.sub_(top).exp_(), dim=1, out=lse[part])
            torch.reciprocal(block_lse, out=row_scale[part])
            block_lse.log_().add_(top.squeeze(1))
            # the softmax weight times each drawn column's coefficient, in d's memory
            coefficient = d
            if s > 0:
                torch.mul(first_scale[:, :s], x[:, :s], out=coefficient[:, :s])
            torch.mul(second_scale, x, out=coefficient[:, s:])
            if s_query > 0:
                self_weight[part] = _row_dot(first_scale[:, s:], x[:, s:]).unsqueeze(1)
            weights[part].scatter_add_(1, position if members else drawn, coefficient)
    if members:
        return _MixBagLogMass.apply(
            contrast.anchors, lse, row_scale, index, weights, self_weight, q, columns, t
        )
    return _MixLogMass.apply(
        contrast.anchors, lse, row_scale, weights, self_weight, q, columns, own, t
    )


class _MixBagLogMass(torch.autograd.Function):
    """MoCHi's synthetic negatives over shared columns: forward the log-mass computed by
    :func:`mochi_mix_log_mass`; backward to the anchors only, ``g (sum_k w_k n_{j_k} + w q) /
    t`` with ``j_k`` the members of ``Q~`` and ``w_k`` the softmax weights times the mixing
    coefficients summed over a member's draws, by ``embedding_bag`` (a weighted sum of gathered
    rows per anchor: no ``[A, S]`` buffer, no product)."""

    @staticmethod
    def forward(ctx, anchors, lse, row_scale, members, weights, self_weight, q, columns, t):  # type: ignore[override]
        ctx.save_for_backward(lse, row_scale, members, weights, self_weight, q, columns)
        ctx.temperature = t
        return lse.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        lse, row_scale, members, weights, self_weight, q, columns = ctx.saved_tensors
        grad_q = F.embedding_bag(members, columns, per_sample_weights=weights, mode="sum")
        return _mix_anchor_gradient(grad_q, ctx, grad, lse, row_scale, self_weight, q)


def mochi_in_batch_cosine(contrast, first: Tensor, second: Tensor) -> Tensor | None:
    """MoCHi in-batch (the anchors are the columns): ``[A, s]`` the pairs' ``n_i · n_j`` read
    from the logits, ``t c_ij``, no Gram matrix; the few pairs on a masked entry (``i = j``, a
    positive pair, a duplicate) by row-wise dot products. None if the anchors are not the
    columns. Plain twin: ``HardNegativeMixing.pair_similarity`` (the Gram matrix)."""
    if contrast.anchors is not contrast.columns or contrast.anchor_columns is not None:
        return None
    logits = contrast.negative_logits.detach()
    return _logit_cosine(logits, contrast.columns.detach(), contrast.temperature, first, second)


# ---------------------------------------------------------------------------------------------
# SimANS: the Gumbel-top-k draw, uniforms cut from random words and the smallest k keys selected
# by numpy's partition


def unit_uniforms(words: Tensor, count: int) -> Tensor:
    """``count`` float32 uniforms from the int64 ``words`` (filled here from the full 64-bit
    range: two uniforms per word, one generator call): 23 random bits ``j`` each, placed as
    the mantissa of ``1 + j 2^-23`` and shifted to ``(2 j + 1) 2^-24``, the midpoints of
    ``2^23`` equal cells of ``(0, 1)`` (exact in float32; never 0 or 1, so ``log(-log u)`` is
    finite). ``torch.rand`` gives one uniform per generator call on a grid of ``2^-24``."""
    bits = words.view(torch.int32)[:count]
    bits &= 0x7FFFFF
    bits |= 0x3F800000  # the bit pattern of 1 + j 2^-23
    return bits.view(torch.float32).sub_(1.0 - 2.0**-24)


# entries per block of rows of the CPU draw: the block's keys, the scratch buffer and the random
# words stay in cache (measured, 1 thread: 2^14 and 2^16 alike, both faster than the [A, S] passes)
_SIMANS_BLOCK = 1 << 16
_ONE_LESS_HALF_CELL = np.float32(1.0 - 2.0**-24)


def simans_draw(
    logits: Tensor, centre: Tensor, a: float, k: int, generator: torch.Generator | None
) -> Tensor:
    """SimANS: ``[A, k]`` columns per row drawn without replacement with probabilities
    ``∝ exp(-a (c - centre)^2)``, as the ``k`` smallest keys ``a (c - centre)^2 + log(-log u)``
    (Gumbel-top-k; ``-inf`` logits are drawn last). Plain twin: ``SimANSNegatives.draw`` with
    ``fast=False`` (one ``torch.rand`` per entry and ``torch.topk``): the same law, other draws.

    The uniforms are cut from random 64-bit words (:func:`unit_uniforms`, two per word). On CPU
    the words come from one numpy ``PCG64`` stream seeded by two random words of ``generator``
    (a third faster than the generator's own words, whose Mersenne twister runs on one thread)
    and the whole draw runs in numpy a block of rows at a time, in cache, on the calling thread:
    the block's words, its uniforms, keys and each row's ``k`` smallest keys, those at or below
    its ``k``-th smallest (:func:`_np_smallest`: a values-only ``numpy.partition`` of integer
    keys, several times faster than ``torch.topk``; rows of at least
    ``_BAND_SAMPLE_MIN_COLUMNS`` with ``k`` in their first quarter: the ``k`` largest negated
    keys among a sample's candidates, :func:`_band_from_sample`, the same members; measured,
    1 thread, ``k = 64``: 1024 x 5119 41.9 ms against 72.2, 256 x 4351 8.8 against 14.8,
    1024 x 1022 9.0 against 12.5). No torch operation runs between the logits and the
    draw: after each parallel torch operation the OpenMP worker spins for milliseconds, and
    torch passes over ``[A, S]`` would fault their pages in anew. Elsewhere: the generator's
    words, the keys by torch operations and ``torch.topk``. ``k >= S`` returns every column."""
    rows, cols = logits.shape
    if k >= cols:
        return torch.arange(cols, device=logits.device).expand(rows, cols)
    if numpy_partitions(logits):
        return _simans_draw_numpy(logits, centre, a, k, generator)
    n = rows * cols
    words = torch.empty(-(-n // 2), dtype=torch.int64, device=logits.device)
    words.random_(-(2**63), None, generator=generator)
    keys = unit_uniforms(words, n).view(rows, cols).to(logits.dtype)
    keys.log_().neg_().log_()  # log(-log u) = -Gumbel
    distance = logits - centre  # -inf on a masked column: its key is +inf if a > 0
    keys.addcmul_(distance, distance, value=a)
    if a == 0.0:
        keys.masked_fill_(~torch.isfinite(logits), float("inf"))
    return keys.topk(k, dim=1, largest=False, sorted=False).indices


def _simans_draw_numpy(
    logits: Tensor, centre: Tensor, a: float, k: int, generator: torch.Generator | None
) -> Tensor:
    """:func:`simans_draw` on CPU: numpy, a block of an even number of rows at a time (whole
    random words: a seed draws the same columns whatever the blocks)."""
    rows, cols = logits.shape
    seed = torch.empty(2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    stream = np.random.PCG64(np.random.SeedSequence([word % 2**64 for word in seed.tolist()]))
    x = logits.detach().contiguous().numpy()
    shift = centre.detach().to(logits.dtype).expand(rows, 1).contiguous().numpy()
    step = max(2, _SIMANS_BLOCK // cols)
    step += step % 2
    keys = np.empty((min(step, rows), cols), dtype=x.dtype)
    distance = np.empty_like(keys)
    order = np.empty(keys.shape, dtype=np.int32 if x.dtype == np.float32 else np.int64)
    out = np.empty((rows, k), dtype=np.int64)
    # wide rows, k in their first quarter: the k smallest keys are the k largest of the
    # negated keys, taken among a sample's candidates (_band_from_sample; the same members)
    sampled = _samples_rows(cols, k)
    mask = np.empty(keys.shape, dtype=bool) if sampled else None
    for start in range(0, rows, step):
        r = min(step, rows - start)
        n = r * cols
        bits = stream.random_raw(-(-n // 2)).view(np.uint32)[:n]
        bits &= 0x7FFFFF
        bits |= 0x3F800000  # the bit pattern of 1 + j 2^-23
        u = bits.view(np.float32).reshape(r, cols)
        np.subtract(u, _ONE_LESS_HALF_CELL, out=u)  # (2 j + 1) 2^-24, in float32
        block, d = keys[:r], distance[:r]
        np.log(u, out=block)
        np.negative(block, out=block)
        np.log(block, out=block)  # log(-log u) = -Gumbel
        values = x[start : start + r]
        np.subtract(values, shift[start : start + r], out=d)  # -inf on a masked column
        if a == 0.0:
            block[~np.isfinite(values)] = np.inf
        else:  # a (c - centre)^2: +inf on a masked column
            np.multiply(d, d, out=d)
            np.multiply(d, a, out=d)
            block += d
        if sampled:
            np.negative(block, out=block)
            if not math.isnan(block.max()) and _band_from_sample(
                block, 0, k, out[start : start + r], mask[:r]
            ):
                continue
            np.negative(block, out=block)  # (exact: the keys as they were)
        out[start : start + r] = _np_smallest(block, k, order)
    return torch.from_numpy(out)


def _np_smallest(keys: np.ndarray, k: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """``[R, k]`` the columns of the ``k`` smallest entries of each row of ``keys`` (NaN
    largest, as ``torch.topk``): the ``k``-th smallest value by ``numpy.partition`` of integer
    keys that order like the floats (:func:`_np_order_keys`, written into ``scratch`` if given
    and partitioned in place: about twice as fast as a float partition, no copy) and the
    entries at or below it by ``flatnonzero`` (:func:`_flat_members`), in column order;
    ``numpy.argpartition`` where that does not give ``k`` per row (a value repeated at the
    edge, or a NaN)."""
    rows, cols = keys.shape
    order = _np_order_keys(keys, out=None if scratch is None else scratch[:rows])
    order.partition(k - 1, axis=1)
    below_minus_inf = _np_order_keys(np.array(-np.inf, dtype=keys.dtype))  # a negative NaN
    if (order[:, :k] < below_minus_inf).any():
        return np.argpartition(keys, k - 1, axis=1)[:, :k]
    edge = _np_order_keys(order[:, k - 1 : k].copy()).view(keys.dtype)  # the map is an involution
    flat = _flat_members(lambda mask: np.less_equal(keys, edge, out=mask), rows, cols, rows * k)
    if flat.size != rows * k:  # a tie at the edge (-0.0 and +0.0 too), or a NaN edge
        return np.argpartition(keys, k - 1, axis=1)[:, :k]
    flat = flat.reshape(rows, k)
    flat -= np.arange(0, rows * cols, cols).reshape(-1, 1)
    return flat


def kth_largest(x: Tensor, k: int) -> Tensor:
    """MoCHi: ``[A, 1]`` the ``k``-th largest entry of each row (``1 <= k <= S``); on CPU by
    ``numpy.partition`` a block of rows at a time (values only, several times faster than
    ``torch.topk``). Plain twin: ``x.topk(k, dim=1).values.amin(dim=1, keepdim=True)``."""
    if not numpy_partitions(x):
        return x.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    array = x.detach().contiguous().numpy()
    cols = array.shape[1]
    out = np.empty((array.shape[0], 1), dtype=array.dtype)
    for rows in row_blocks(x):
        out[rows] = np.partition(array[rows], cols - k, axis=1)[:, cols - k : cols - k + 1]
    return torch.from_numpy(out)


# entries of logits per block of hardest_columns: the block, its partition and its mask stay in
# cache (measured, 1 thread: 2^16 against 2^14 and 2^18, 2048 x 2048 and 1024 x 4096)
_HARDEST_BLOCK = 1 << 16


def hardest_columns(logits: Tensor, k: int) -> Tensor | None:
    """MoCHi: ``[A, k]`` the columns of each row's ``k`` largest logits in increasing column
    order (``0 < k < S``), when every row holds exactly ``k`` entries at or above its ``k``-th
    largest (no tie at that edge, no NaN); else None. On CPU, a block of rows at a time while it
    is in cache: the ``k``-th largest by ``numpy.partition`` of integer keys that order like the
    floats (:func:`_np_order_keys`, in place; values only), the entries at or above it and
    their columns by ``flatnonzero``; rows of at least ``_BAND_SAMPLE_MIN_COLUMNS`` whose ``k``
    is at most a quarter of the row first select among a sample's candidates
    (:func:`_band_from_sample` with ranks ``[0, k)``; its members come in column order too;
    measured, 1 thread: 1024 x 1022, top 128, 3.7 ms against 5.7; 2048 x 2046, 10.5 against
    26.6); the blocks split over torch's intra-op threads from
    ``_THREAD_MIN_ENTRIES`` per thread (numpy releases the GIL). None on an
    accelerator. Plain twin: ``HardNegativeMixing.hardest`` with ``fast=False``
    (``torch.topk``'s ``k``-th value and a cumsum / scatter compaction)."""
    if not numpy_partitions(logits):
        return None
    x = logits.detach().numpy()  # a strided view is fine: the blocks' masks are new arrays
    rows, cols = x.shape
    out = np.empty((rows, k), dtype=np.int64)
    step = max(1, _HARDEST_BLOCK // cols)
    offsets = np.arange(min(step, rows), dtype=np.int64).reshape(-1, 1) * cols
    tied: list[bool] = []
    # a NaN with its sign bit set: its key is below -inf's (a positive NaN's above +inf's)
    below_minus_inf = _np_order_keys(np.array(-np.inf, dtype=x.dtype))

    # wide rows whose k ends in their top quarter: the members among a few candidates a row
    sampled = _samples_rows(cols, k)

    def work(blocks) -> None:
        keys = np.empty((min(step, rows), cols), dtype=below_minus_inf.dtype)
        mask = np.empty(keys.shape, dtype=bool) if sampled else None
        for start, end in blocks:
            block = x[start:end]
            r = block.shape[0]
            if sampled and math.isnan(block.max()):
                tied.append(True)  # a NaN of either sign: the general path
                return
            # (_band_from_sample's members come in column order, as below)
            if sampled and _band_from_sample(block, 0, k, out[start : start + r], mask[:r]):
                continue
            # the k-th largest from integer keys that order like the floats, partitioned in
            # place (about twice as fast as numpy's float partition); the members by the
            # floats (a NaN is no member: its row comes up short, as with the float partition)
            order = _np_order_keys(block, out=keys[:r])
            order.partition(cols - k, axis=1)
            if order.min() < below_minus_inf:  # a negative NaN, ranked last by the keys
                tied.append(True)
                return
            edge = _np_order_keys(order[:, cols - k : cols - k + 1].copy()).view(x.dtype)
            flat = np.flatnonzero(block >= edge)
            # k per row: r k in all, and each row's first and last slots in the row (the flat
            # positions are sorted); a NaN leaves its row short, a tie at the edge another row
            # long, and the two can add up to r k in all
            if flat.size != r * k:
                tied.append(True)
                return
            flat = flat.reshape(r, k)
            flat -= offsets[:r]
            if flat[:, 0].min() < 0 or flat[:, -1].max() >= cols:
                tied.append(True)
                return
            out[start : start + r] = flat

    _on_threads(work, rows, max(step, _THREAD_MIN_ENTRIES // cols), step)
    return None if tied else torch.from_numpy(out)


def row_members(member: Tensor, count: Tensor, width: int, same_count: bool) -> Tensor:
    """MoCHi: the columns of the ``True`` entries of each row of ``member [A, S]``, in
    increasing column order, row ``a`` holding its ``count[a]`` (``count [A, 1]``) first:
    ``[A, count]`` when every row has the same count (``same_count``), else ``[A, width]``
    padded with 0. On CPU the flat positions by ``numpy.flatnonzero`` (about 10x faster than
    torch's 2-D ``nonzero`` on a 2048 x 2048 mask); elsewhere one ``nonzero``. Plain twin: the
    cumsum / scatter compaction of ``HardNegativeMixing.hardest``."""
    rows, cols = member.shape
    if member.device.type == "cpu":
        flat = np.flatnonzero(member.contiguous().numpy())
        if same_count and rows > 0:  # the rows' offsets taken off in place (no [A, S] passes)
            column = flat.reshape(rows, -1)
            column -= np.arange(0, rows * cols, cols, dtype=np.int64).reshape(-1, 1)
            return torch.from_numpy(column)
        flat = torch.from_numpy(flat)
        row = torch.div(flat, cols, rounding_mode="floor")
        column = flat - row * cols
    else:
        row, column = member.nonzero().unbind(1)
    if same_count:
        return column.view(rows, -1)
    counts = count.flatten()
    start = counts.cumsum(dim=0) - counts
    rank = torch.arange(row.shape[0], device=row.device) - start[row]
    return column.new_zeros(rows, width).index_put_((row, rank), column)


def mochi_uniforms(shape: tuple[int, int], generator, device, out: Tensor | None = None) -> Tensor:
    """MoCHi's float32 uniforms (``hardneg.strategies.mochi._unit_uniforms``: the same random
    words, the same numbers), the bits cut in place in the words' own memory
    (:func:`unit_uniforms`; the plain twin is out of place for ``torch.compile``). ``out``: an
    int64 buffer of at least ``ceil(n / 2)`` entries for the words."""
    n = shape[0] * shape[1]
    size = (-(-n // 2),)
    if out is None:
        words = torch.randint(-(2**63), 2**63 - 1, size, generator=generator, device=device)
    else:
        words = out[: size[0]]
        torch.randint(-(2**63), 2**63 - 1, size, generator=generator, out=words)
    return unit_uniforms(words, n).view(shape)


def pair_gram(columns: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """MoCHi: ``[A, s]`` ``n_i · n_j`` of the pairs ``(first, second)`` of rows of ``columns``
    ``[C, d]``, looked up in the upper triangle of the Gram matrix (``i <= j`` after swapping),
    which alone is computed (:func:`_upper_gram`). Plain twin: ``(columns @ columns.T)`` at
    ``[first, second]`` (``HardNegativeMixing.pair_similarity``)."""
    return _upper_gram_at(_upper_gram(columns), first, second)


# ---------------------------------------------------------------------------------------------
# potential, in-batch: one Gram matrix of [z1; z2] for every logit, the neighbour look-up and the
# keep probabilities of all three terms; draws from random bytes; the three negative masses in
# one pass over one exponential


def random_bytes(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Uniform random bytes (``uint8``) of ``shape``: the bytes of :class:`_ByteStream` (on the
    CPU cut from numpy ``PCG64`` words seeded by two words of ``generator``; elsewhere from
    int64 words of the generator over the full 64-bit range, 8 bytes per call)."""
    size = math.prod(shape)
    return _ByteStream(generator, device, size).take(size).view(shape)


def _numpy_words(device: torch.device) -> bool:
    """Whether :class:`_ByteStream` cuts its bytes from numpy ``PCG64`` words: on the CPU.
    Elsewhere the words come from the generator itself (``random_``); tests force that branch
    on the CPU by patching this function."""
    return device.type == "cpu"


class _ByteStream:
    """Random bytes taken piece by piece into one reused buffer: the same bytes as one
    :func:`random_bytes` call over their total (64-bit words drawn in order; the bytes of a word
    that one piece leaves over start the next), without a buffer of the total's size. A piece
    is a view, valid until the next :meth:`take`. On the CPU the words come from one numpy
    ``PCG64`` stream seeded (``SeedSequence``) by two int64 words of ``generator`` (about 1.5x
    faster than the generator's Mersenne twister; the generator advances by two words per
    stream), elsewhere from the generator itself."""

    def __init__(self, generator: torch.Generator | None, device, size: int) -> None:
        self.generator = generator
        device = torch.device(device)
        self.bits = None
        if _numpy_words(device):  # numpy words: a piece is a numpy view (take_np), no torch op
            seed = torch.empty(2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
            self.bits = np.random.PCG64(np.random.SeedSequence([w % 2**64 for w in seed.tolist()]))
            self.words = np.empty(1 + -(-size // 8), dtype=np.int64)
        else:
            self.words = torch.empty(1 + -(-size // 8), dtype=torch.int64, device=device)
        self.tail = None  # the bytes of the last word not yet taken

    def take_np(self, size: int) -> np.ndarray:
        """CPU: the next ``size`` bytes, a numpy view valid until the next take."""
        left = 0 if self.tail is None else self.tail.size
        fresh = -(-(size - left) // 8) if size > left else 0  # words to draw
        if 1 + fresh > self.words.size:
            self.words = np.empty(1 + fresh, dtype=np.int64)
        data = self.words.view(np.uint8)  # the tail at bytes [8 - left, 8), then the words
        if left:
            data[8 - left : 8] = self.tail
        if fresh:
            self.words[1 : 1 + fresh] = self.bits.random_raw(fresh).view(np.int64)
        used, end = 8 - left + size, 8 + 8 * fresh
        self.tail = data[used:end].copy() if end > used else None
        return data[8 - left : used]

    def take(self, size: int) -> Tensor:
        if self.bits is not None:
            return torch.from_numpy(self.take_np(size))
        left = 0 if self.tail is None else self.tail.numel()
        fresh = -(-(size - left) // 8) if size > left else 0  # words to draw
        if 1 + fresh > self.words.numel():
            self.words = torch.empty(1 + fresh, dtype=torch.int64, device=self.words.device)
        data = self.words.view(torch.uint8)  # the tail at bytes [8 - left, 8), then the words
        if left:
            data[8 - left : 8].copy_(self.tail)
        if fresh:
            self.words[1 : 1 + fresh].random_(-(2**63), None, generator=self.generator)
        used, end = 8 - left + size, 8 + 8 * fresh
        self.tail = data[used:end].clone() if end > used else None
        return data[8 - left : used]


def _threshold_bytes(p: Tensor) -> Tensor:
    """``floor(256 p)`` as ``uint8`` (255 at most: ``p = 1`` then keeps on every tie)."""
    return _to_bytes((p * 256.0).clamp_(max=255.0))


_BYTE_BLOCK = 1 << 15  # entries per block of rows of _to_bytes: a 64 KiB int16 temporary


def _to_bytes(x: Tensor, top: float = 256.0) -> Tensor:
    """``uint8`` of values in [0, 256] (truncated, 256 taken as 255), through ``int16``: a
    direct float -> ``uint8`` conversion is several times slower on the CPU. A 2-D ``x`` of more
    than ``_BYTE_BLOCK`` entries converts a block of rows at a time, so that the ``int16``
    temporary stays small and in cache (a fresh buffer of ``x``'s size costs more to fault in
    than the conversion itself: session 8, 0.45 ms against 0.05 ms for 512 x 512 in a loss
    step). ``top < 256``: the caller's bound on ``x``; on the CPU numpy's direct conversion
    (one call, no temporary: 22 us against 105 us for 512 x 512, 1 thread)."""
    if top < 256.0 and _cpu_numpy(x.device) and x.is_contiguous():
        with np.errstate(invalid="ignore"):  # (NaN inputs: NaN draws' thresholds, as torch's)
            return torch.from_numpy(x.numpy().astype(np.uint8))
    if x.dim() != 2 or x.numel() <= _BYTE_BLOCK:
        return x.to(torch.int16).clamp_(max=255).to(torch.uint8)
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    for block in row_blocks(x, _BYTE_BLOCK):
        out[block] = x[block].to(torch.int16).clamp_(max=255)
    return out


def _find(mask: Tensor) -> Tensor:
    """Flat positions (ascending) of the True entries of a contiguous bool tensor that is
    mostly False: ``numpy.flatnonzero`` on the CPU (about 10x faster there than
    ``torch.nonzero``, which counts and then writes in two passes), ``nonzero`` elsewhere."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flat.numpy()))
    return flat.nonzero().squeeze(1)


def _tie_keeps(
    at: Tensor, need_at: Tensor, p256: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Whether each tie (a byte equal to its threshold ``floor(256 p)``, probability 1/256)
    keeps: with probability ``256 p - floor(256 p)``, one float32 uniform per tie in the order
    of ``at``. Then ``P(keep) = floor(256 p) / 256 + (256 p - floor(256 p)) / 256 = p``."""
    u = torch.rand(at.shape, generator=generator, device=at.device)
    return u < p256.to(torch.float64) - need_at.to(torch.float64)


# bytes of draws compared per step of bernoulli_draws / binomial_draws / layer_draws: the
# comparisons, the tie scan and the sums of one chunk read its bytes from cache (session 8,
# potential's loss step on this CPU, 1 thread, CPU time relative to InfoNCE's: 256 KiB chunks
# 1.47-1.57x at N = 256 against 1.71-1.78x with 1 MiB, the same at N = 512 and 1024)
_CHUNK = 1 << 18


_DRAW_BLOCK = 1 << 22  # entries per block of rows of bernoulli_bytes


# on the CPU the byte draws (bernoulli_draws, binomial_draws), the masses' products with integer
# weights (_BlockLogMasses) and the bounded byte casts (_to_bytes) run in numpy: a numpy call
# costs about a microsecond against a few for a dispatched torch op, casts its operands in small
# buffers as it goes (torch first makes a float copy of an integer operand) and starts no
# intra-op threads. The same bytes, comparisons, uniforms and products as the torch form: the
# same draws and values for a seed. Tests set it False to run the torch form on the CPU.
_CPU_NUMPY = True


def _cpu_numpy(device) -> bool:
    return _CPU_NUMPY and torch.device(device).type == "cpu"


def _tie_keeps_np(count: int, need_at: np.ndarray, p256: np.ndarray, generator) -> np.ndarray:
    """:func:`_tie_keeps` in numpy: the same float32 uniforms of ``generator``, the same
    float64 comparison."""
    u = torch.rand(count, generator=generator).numpy()
    return u < p256.astype(np.float64) - need_at


def _bernoulli_draws_np(
    need: np.ndarray, p256_at, generator, kept: np.ndarray, stream: _ByteStream
) -> None:
    """:func:`bernoulli_draws` in numpy into ``kept`` (``need``'s shape, contiguous, any dtype):
    ``p256_at`` takes and gives numpy arrays."""
    flat_need, flat_kept = need.reshape(-1), kept.reshape(-1)
    size = flat_need.size
    scratch = np.empty(min(_CHUNK, size), dtype=np.bool_)
    found, p256 = [], []
    for s0 in range(0, size, _CHUNK):
        nn = flat_need[s0 : s0 + _CHUNK]
        vv = stream.take_np(nn.size)
        at = np.flatnonzero(np.equal(vv, nn, out=scratch[: nn.size]))
        if at.size:  # 256 p at the ties before the chunk's draws are written (into kept)
            at += s0
            found.append(at)
            p256.append(p256_at(at))
        np.less(vv, nn, out=flat_kept[s0 : s0 + _CHUNK])
    if found:
        at = np.concatenate(found)
        keep = _tie_keeps_np(at.size, flat_need[at], np.concatenate(p256), generator)
        flat_kept[at] = keep


def _binomial_draws_np(
    need_by_column: np.ndarray,
    trials: np.ndarray,
    p256_at,
    generator,
    rows: np.ndarray | None,
    stream: _ByteStream | None,
) -> np.ndarray:
    """:func:`binomial_draws` in numpy (``p256_at`` takes and gives numpy arrays): the same
    chunks, bytes, sums and ties."""
    c, a = trials.shape[0], need_by_column.shape[1]
    order = np.argsort(trials, kind="stable")
    sorted_trials = trials[order]
    most = int(sorted_trials[-1]) if c else 0
    count_dtype = np.int32 if most > 255 else np.uint8  # a uint8 sum holds 255 trials
    total = int(sorted_trials.sum())
    below = np.empty((c, a), dtype=count_dtype)
    chunk = max(min(_CHUNK, total * a), most * a, 1)  # at least one column's m rows
    if stream is None:
        stream = _ByteStream(generator, "cpu", chunk)
    key = np.repeat(order, sorted_trials)  # the column of each row of bytes
    source = key if rows is None else rows[key]  # its row of need_by_column
    edges = np.flatnonzero(np.diff(sorted_trials)) + 1 if c else np.zeros(0, dtype=np.int64)
    values = sorted_trials[np.concatenate([[0], edges])].tolist() if c else []
    sizes = np.diff(np.concatenate([[0], edges, [c]])).tolist() if c else []
    gathered = np.empty(chunk, dtype=np.uint8)  # each chunk's thresholds
    flags = np.empty(chunk, dtype=np.bool_)
    found, found_need = [], []
    for (r0, r1), runs in _chunks(values, sizes, max(1, chunk // max(1, a))):
        size = (r1 - r0) * a
        # the row count spelt out: reshape(-1, 0) of zero anchors' empty chunk is ambiguous
        shape = (r1 - r0, a)
        need = np.take(need_by_column, source[r0:r1], axis=0, out=gathered[:size].reshape(shape))
        vv = stream.take_np(size).reshape(shape)
        buf = flags[:size].reshape(shape)
        kept = np.less(vv, need, out=buf).view(np.uint8)
        for m, c0, c1, q0 in runs:  # columns [c0, c1) (sorted order) with m trials each
            if m == 0:
                below[c0:c1] = 0
            elif m == 1:
                below[c0:c1] = kept[q0 : q0 + c1 - c0]
            else:
                np.add.reduce(
                    kept[q0 : q0 + (c1 - c0) * m].reshape(c1 - c0, m, a), axis=1, out=below[c0:c1]
                )
        at = np.flatnonzero(np.equal(vv, need, out=buf))
        if at.size:
            found_need.append(need.reshape(-1)[at])
            at += r0 * a
            found.append(at)
    counts = np.empty_like(below)
    counts[order] = below  # back in column order
    if found:
        at = np.concatenate(found)
        row = at // a
        column, anchor = key[row], at - row * a
        keep = _tie_keeps_np(
            at.size, np.concatenate(found_need), p256_at(column, anchor), generator
        )
        np.add.at(counts.reshape(-1), column * a + anchor, keep.astype(count_dtype))
    return counts


def bernoulli_bytes(p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One ``Bernoulli(p)`` draw per entry of ``p`` (0/1 in ``p``'s dtype); see
    :func:`bernoulli_draws`. (Plain twin: ``torch.rand(p.shape) < p``; same law to float32,
    other draws.) A large ``p`` draws a block of rows at a time, so that the thresholds and
    bytes stay small next to the result."""
    if p.dim() == 2 and p.numel() > _DRAW_BLOCK and p.shape[0] > 1:
        out = torch.empty_like(p)
        rows = max(1, _DRAW_BLOCK // max(1, p.shape[1]))
        for start in range(0, p.shape[0], rows):
            out[start : start + rows] = bernoulli_bytes(p[start : start + rows], generator)
        return out
    flat = p.reshape(-1)
    kept = bernoulli_draws(
        _threshold_bytes(p), lambda at: flat[at].to(torch.float64) * 256.0, generator
    )
    return kept.to(p.dtype)


def bernoulli_draws(
    need: Tensor,
    p256_at,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.uint8,
    out: Tensor | None = None,
    stream: _ByteStream | None = None,
    p256_np=None,
) -> Tensor:
    """One Bernoulli draw per entry (0/1 in ``dtype``) from the thresholds ``need = floor(256
    p)`` (``uint8``, contiguous): a random byte ``v < need`` keeps, ``v > need`` drops, a tie
    is settled by a uniform (:func:`_tie_keeps`; ``p256_at(flat positions)`` gives ``256 p``
    there, called for each chunk's ties before its draws are written: ``out`` may hold ``256
    p`` until then). Draw order: the bytes (row-major), then one uniform per tie in the order of the
    bytes. The bytes are drawn, compared and scanned for ties by chunks of ``_CHUNK``
    (:class:`_ByteStream`: no buffer of all the bytes). ``out``: a
    contiguous tensor of ``need``'s shape to write the draws into (its dtype, not ``dtype``);
    ``stream``: the bytes' source (:class:`_ByteStream`) to go on with instead of a new one;
    ``p256_np``: ``p256_at`` on numpy arrays, for the CPU's numpy form (default: ``p256_at``
    through tensors that share the arrays' memory)."""
    size = need.numel()
    if stream is None:
        stream = _ByteStream(generator, need.device, min(_CHUNK, size))
    # the comparisons write bool (or float) directly: a bool -> uint8 cast is free (a view),
    # a uint8 output of torch.lt about 1.4x slower than a bool one on the CPU
    if out is not None:
        dtype = out.dtype
    out_dtype = torch.bool if dtype == torch.uint8 else dtype
    kept = torch.empty(need.shape, dtype=out_dtype, device=need.device) if out is None else out
    if _cpu_numpy(need.device):
        _bernoulli_draws_np(
            need.contiguous().numpy(),
            p256_np or (lambda at: p256_at(torch.from_numpy(at)).numpy()),
            generator,
            kept.numpy(),
            stream,
        )
        return kept.view(torch.uint8) if kept.dtype != dtype else kept
    flat_need, flat_kept = need.reshape(-1), kept.view(-1)
    scratch = torch.empty(min(_CHUNK, size), dtype=torch.bool, device=need.device)
    found, p256 = [], []
    for s0 in range(0, size, _CHUNK):
        nn = flat_need[s0 : s0 + _CHUNK]
        vv = stream.take(nn.numel())
        at = _find(torch.eq(vv, nn, out=scratch[: vv.numel()]))
        if at.numel():  # 256 p at the ties before the chunk's draws are written (into out)
            found.append(at + s0)
            p256.append(p256_at(found[-1]))
        torch.lt(vv, nn, out=flat_kept[s0 : s0 + _CHUNK])
    if found:
        at = torch.cat(found)
        keep = _tie_keeps(at, flat_need[at], torch.cat(p256), generator)
        flat_kept[at] = keep.to(out_dtype)
    return kept.view(torch.uint8) if kept.dtype != dtype else kept


def binomial_bytes(p: Tensor, trials: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``[A, C]`` counts ``Binomial(trials_j, p_ij)`` in ``p``'s dtype; see
    :func:`binomial_draws`. (Plain twin: one uniform per grid cell summed per column; same law,
    other draws.)"""
    a = p.shape[0]

    def p256_at(column: Tensor, anchor: Tensor) -> Tensor:
        return p[anchor, column].to(torch.float64) * 256.0

    counts = binomial_draws(_threshold_bytes(p).T.contiguous(), trials, p256_at, generator)
    return torch.empty(a, p.shape[1], dtype=p.dtype, device=p.device).copy_(counts.T)


def _chunks(values: list[int], sizes: list[int], rows: int):
    """The chunks of :func:`binomial_draws`: consecutive columns (sorted order; ``sizes[g]``
    columns with ``values[g]`` trials each) whose rows of bytes number at most ``rows`` (at
    least one column). Yields ``((first row, end row), runs)``, a run ``(m, first column, end
    column, first row within the chunk)`` per group met (a run of ``m = 0`` takes no rows)."""
    runs, first_row, row, column = [], 0, 0, 0
    for m, size in zip(values, sizes):
        done = 0
        while done < size:
            room = rows - (row - first_row)
            take = size - done if m == 0 else min(size - done, max(room // m, 0))
            if take == 0:  # the chunk is full: flush it (a chunk holds at least one column)
                if runs:
                    yield (first_row, row), runs
                    runs, first_row = [], row
                    continue
                take = 1
            runs.append((m, column, column + take, row - first_row))
            column += take
            row += take * m
            done += take
    if runs:
        yield (first_row, row), runs


def binomial_draws(
    need_by_column: Tensor,
    trials: Tensor,
    p256_at,
    generator: torch.Generator | None = None,
    *,
    rows: Tensor | None = None,
    stream: _ByteStream | None = None,
    p256_np=None,
) -> Tensor:
    """``[C, A]`` counts (``uint8``, or ``int32`` past 255 trials) ``Binomial(trials_j, p_ij)``:
    ``trials_j`` independent draws of :func:`bernoulli_draws` per entry of column ``j``, from
    the thresholds ``floor(256 p)`` with the columns as rows (``need_by_column`` ``[C, A]``,
    ``uint8``; ``p256_at(column, anchor)`` gives ``256 p`` there).

    Trial ``r`` of column ``j`` is a row of ``A`` bytes (one per anchor). The columns are taken
    in the stable ascending order of ``trials``, each with its ``trials_j`` rows in a row,
    ``[sum_j trials_j, A]`` bytes in all (one stream of bytes), so that the columns with the
    same count ``m`` form one block ``[C_m, m, A]``; then one uniform per tie, in the order of
    the bytes. The block is compared with its columns' thresholds broadcast over the ``m``
    trials (no ``[sum_j trials_j, A]`` copy of the thresholds), summed and scanned for ties by
    chunks of about ``_CHUNK`` bytes, each drawn just before (:class:`_ByteStream`: no buffer
    of all the bytes; ``stream``: one to go on with). ``need_by_column`` may be a strided view
    (each chunk gathers its rows); ``rows`` ``[C]``: the row of ``need_by_column`` that holds
    column ``j``'s thresholds (default ``j``); ``p256_np``: ``p256_at`` on numpy arrays, for the
    CPU's numpy form (default: ``p256_at`` through tensors that share the arrays' memory)."""
    c, a = len(trials), need_by_column.shape[1]
    device = need_by_column.device
    if _cpu_numpy(device):
        counts = _binomial_draws_np(
            need_by_column.numpy(),
            trials.cpu().numpy(),
            p256_np or (lambda c, a: p256_at(torch.from_numpy(c), torch.from_numpy(a)).numpy()),
            generator,
            None if rows is None else rows.cpu().numpy(),
            stream,
        )
        return torch.from_numpy(counts)
    trials = trials.to(device)
    order = torch.argsort(trials, stable=True)
    sorted_trials = trials[order]
    values, sizes = torch.unique_consecutive(sorted_trials, return_counts=True)
    total = int(sorted_trials.sum())
    most = int(values[-1]) if values.numel() else 0
    count_dtype = torch.int32 if most > 255 else torch.uint8  # a uint8 sum holds 255 trials
    below = torch.empty(c, a, dtype=count_dtype, device=device)
    chunk = max(min(_CHUNK, total * a), most * a)  # at least one column's m rows
    scratch = torch.empty(chunk, dtype=torch.bool, device=device)
    gathered = torch.empty(chunk, dtype=need_by_column.dtype, device=device)  # each chunk's
    # thresholds, one buffer for every chunk (not a fresh one per chunk)
    if stream is None:
        stream = _ByteStream(generator, device, chunk)
    key = order.repeat_interleave(sorted_trials)  # the column of each row of bytes
    source = key if rows is None else rows.to(device)[key]  # its row of need_by_column
    found = []
    for span, runs in _chunks(values.tolist(), sizes.tolist(), max(1, chunk // max(1, a))):
        need = torch.index_select(
            need_by_column,
            0,
            source[span[0] : span[1]],
            out=gathered[: (span[1] - span[0]) * a].view(span[1] - span[0], a),
        )  # [R, A]
        vv = stream.take(need.numel()).view(need.shape)
        buf = scratch[: vv.numel()].view(vv.shape)
        torch.lt(vv, need, out=buf)
        kept = buf.view(torch.uint8)
        for m, c0, c1, r0 in runs:  # columns [c0, c1) (sorted order) with m trials each
            out = below[c0:c1]
            if m == 0:
                out.zero_()
            elif m == 1:
                out.copy_(kept[r0 : r0 + c1 - c0])
            else:
                torch.sum(kept[r0 : r0 + (c1 - c0) * m].view(c1 - c0, m, a), dim=1, out=out)
        at = _find(torch.eq(vv, need, out=buf))
        if at.numel():
            found.append(at + span[0] * a)
    counts = below.index_select(0, torch.argsort(order))  # back in column order
    if found:
        at = torch.cat(found)
        column, anchor = key[at // a], at % a
        need_at = need_by_column[source[at // a], anchor]
        keep = _tie_keeps(at, need_at, p256_at(column, anchor), generator)
        counts.view(-1).index_add_(0, column * a + anchor, keep.to(count_dtype))
    return counts


def layer_draws(
    need: Tensor,
    trials: Tensor,
    p256_at,
    generator: torch.Generator | None = None,
    *,
    skip_first: Tensor | None = None,
    stream: _ByteStream | None = None,
) -> Tensor:
    """``[A, C]`` counts (``uint8``, or ``int32`` past 255 trials) ``Binomial(trials_j, p_ij)``
    from the thresholds ``need = floor(256 p)`` ``[A, C]`` (``uint8``, rows the anchors) whose
    columns are in non-increasing order of ``trials`` (``trials_j >= 1``): layer ``r`` is one
    byte draw (:func:`bernoulli_draws`' rule) per entry of the columns with more than ``r``
    trials, a prefix ``need[:, :w_r]`` (no copy of the thresholds), compared and added to the
    counts a block of rows at a time (about ``_CHUNK`` bytes), drawn just before. Draw order:
    layer 0, 1, ..., each row-major; then one uniform per tie in that order (``p256_at(rows,
    columns)`` gives ``256 p`` there). ``skip_first`` ``[A, C]`` (bool): the entries whose layer
    0 is no trial (their count is ``Binomial(trials_j - 1, p_ij)``). (Plain twin: one uniform
    per cell summed per column; same law, other draws.)"""
    a, c = need.shape
    device = need.device
    top = int(trials.max()) if c else 0
    count_dtype = torch.int32 if top > 255 else torch.uint8
    if top == 0 or a == 0:  # nothing to draw: no stream, so that both forms leave the
        # generator alone (a CPU stream takes two seed words from it)
        return torch.zeros(a, c, dtype=count_dtype, device=device)
    if _cpu_numpy(device):
        if stream is None:
            stream = _ByteStream(generator, device, _CHUNK)
        counts = _layer_draws_np(
            need.numpy(),
            trials.cpu().numpy(),
            lambda r, c: p256_at(torch.from_numpy(r), torch.from_numpy(c)).numpy(),
            generator,
            None if skip_first is None else skip_first.numpy(),
            stream,
        )
        return torch.from_numpy(counts)
    counts = torch.zeros(a, c, dtype=count_dtype, device=device)
    if stream is None:
        stream = _ByteStream(generator, device, _CHUNK)
    layers = torch.arange(top, device=trials.device).unsqueeze(1)
    widths = (trials.unsqueeze(0) > layers).sum(dim=1).tolist()  # [top], non-increasing
    scratch = torch.empty(max(_CHUNK, widths[0]), dtype=torch.bool, device=device)
    found_rows, found_cols, found_need = [], [], []
    for r, w in enumerate(widths):
        step = max(1, _CHUNK // w)
        for r0 in range(0, a, step):
            r1 = min(a, r0 + step)
            nn = need[r0:r1, :w]
            vv = stream.take((r1 - r0) * w).view(r1 - r0, w)
            buf = scratch[: vv.numel()].view(vv.shape)
            torch.lt(vv, nn, out=buf)
            if r == 0 and skip_first is not None:
                buf.masked_fill_(skip_first[r0:r1, :w], False)
            counts[r0:r1, :w] += buf.view(torch.uint8)
            at = _find(torch.eq(vv, nn, out=buf))
            if at.numel():
                rr, cc = at // w + r0, at % w
                if r == 0 and skip_first is not None:
                    live = ~skip_first[rr, cc]
                    rr, cc = rr[live], cc[live]
                found_rows.append(rr)
                found_cols.append(cc)
                found_need.append(need[rr, cc])
    if found_rows:
        rr, cc = torch.cat(found_rows), torch.cat(found_cols)
        keep = _tie_keeps(rr, torch.cat(found_need), p256_at(rr, cc), generator)
        counts.index_put_((rr, cc), keep.to(count_dtype), accumulate=True)
    return counts


def _layer_draws_np(
    need: np.ndarray,
    trials: np.ndarray,
    p256_at,
    generator,
    skip_first: np.ndarray | None,
    stream: _ByteStream,
) -> np.ndarray:
    """:func:`layer_draws` in numpy (``p256_at`` takes and gives numpy arrays): the same
    layers, blocks of rows, bytes, sums and ties."""
    a, c = need.shape
    top = int(trials.max()) if c else 0
    count_dtype = np.int32 if top > 255 else np.uint8
    counts = np.zeros((a, c), dtype=count_dtype)
    if top == 0 or a == 0:
        return counts
    widths = (trials[None, :] > np.arange(top)[:, None]).sum(axis=1).tolist()  # non-increasing
    scratch = np.empty(max(_CHUNK, widths[0]), dtype=np.bool_)
    found_rows, found_cols, found_need = [], [], []
    for r, w in enumerate(widths):
        step = max(1, _CHUNK // w)
        for r0 in range(0, a, step):
            r1 = min(a, r0 + step)
            nn = need[r0:r1, :w]
            vv = stream.take_np((r1 - r0) * w).reshape(r1 - r0, w)
            buf = scratch[: vv.size].reshape(vv.shape)
            np.less(vv, nn, out=buf)
            if r == 0 and skip_first is not None:
                buf[skip_first[r0:r1, :w]] = False
            counts[r0:r1, :w] += buf.view(np.uint8)
            at = np.flatnonzero(np.equal(vv, nn, out=buf))
            if at.size:
                rr, cc = at // w, at % w
                if r == 0 and skip_first is not None:
                    live = ~skip_first[rr + r0, cc]
                    rr, cc = rr[live], cc[live]
                found_need.append(nn[rr, cc])
                found_rows.append(rr + r0)
                found_cols.append(cc)
    if found_rows:
        rr, cc = np.concatenate(found_rows), np.concatenate(found_cols)
        keep = _tie_keeps_np(rr.size, np.concatenate(found_need), p256_at(rr, cc), generator)
        np.add.at(counts, (rr, cc), keep.astype(count_dtype))
    return counts


# entries per block of rows of an in-place product with integer weights (_BlockLogMasses): the
# weights' float copy (type promotion) is a 128 KiB temporary, reused from block to block
_CAST_BLOCK = 1 << 15


class _BlockLogMasses(torch.autograd.Function):
    """``log sum_j w_ij e^{c_ij}`` for several weight matrices ``w`` (no gradient), each on a
    block of rows and columns of one logits matrix ``c``, and logits read at given places of
    ``c`` (``c[r0:r1, c0:].gather(1, index)``: mined positives): one exponential serves every
    block, shifted ``e = e^{c - max_j c}`` (the maximum of the whole row) or, for logits bounded
    by the caller, ``e^c`` itself; the products ``w e`` give the sums and are saved (not ``e``
    and ``w``), so the backward pass ``dc = sum_blocks (w e) g / R`` plus the read logits'
    gradients fills one buffer in one pass (no zero-filled ``[A, S]`` gradient per read or
    block). The caller guarantees that no kept entry lies so far below its row's maximum that
    ``e`` underflows; a row of a block with nothing kept is ``-inf`` with a zero gradient.
    ``dim = 0``: every block sums its columns instead (``sum_i w_ij e^{c_ij}`` per column ``j``,
    shifted by the column maximum): the anchors are the columns."""

    @staticmethod
    def forward(ctx, logits, blocks, reads, unshifted, scratch, e, dim, *tensors):  # type: ignore[override]
        weights, indices = tensors[: len(blocks)], tensors[len(blocks) :]
        whole = (0, logits.shape[0], 0, logits.shape[1])
        top = None  # the row (dim 1) or column (dim 0) maxima, unless |c| is bounded
        if not unshifted:
            top = logits.amax(dim=dim, keepdim=True)
            top = torch.where(torch.isfinite(top), top, 0.0)
        # float scratch weights take their products; the others get a buffer each
        in_place = [scratch and w.is_floating_point() for w in weights]
        if e is not None:  # the exponentials in the caller's buffer, all at once
            if top is None:
                torch.exp(logits, out=e)
            else:
                torch.sub(logits, top, out=e).exp_()
            products = []
            order = sorted(range(len(blocks)), key=lambda b: blocks[b] == whole)
            by_block = {}
            for b in order:  # the last block over the whole matrix may overwrite e
                (r0, r1, c0, c1), w = blocks[b], weights[b]
                if in_place[b]:
                    by_block[b] = w.mul_(e[r0:r1, c0:c1])
                elif b == order[-1] and blocks[b] == whole:
                    if w.is_floating_point():
                        by_block[b] = e.mul_(w)
                    elif _cpu_numpy(e.device):  # numpy casts the integer weights in small
                        # buffers as it goes: one call, no float copy of w
                        np.multiply(e.numpy(), w.numpy(), out=e.numpy())
                        by_block[b] = e
                    else:  # a block of rows at a time: the integer weights' float copy (type
                        # promotion) stays small, not a fresh buffer of e's size per call
                        for part in row_blocks(e, _CAST_BLOCK):
                            e[part].mul_(w[part])
                        by_block[b] = e
                elif w.is_floating_point():
                    by_block[b] = e[r0:r1, c0:c1] * w
                elif _cpu_numpy(e.device):  # the product straight into a new buffer
                    by_block[b] = torch.empty(w.shape, dtype=e.dtype)
                    np.multiply(e[r0:r1, c0:c1].numpy(), w.numpy(), out=by_block[b].numpy())
                else:  # the product in the weights' float copy: one new buffer, not two
                    by_block[b] = w.to(e.dtype).mul_(e[r0:r1, c0:c1])
            products = [by_block[b] for b in range(len(blocks))]
        else:  # the exponentials a block of rows at a time, in cache: no [A, S] buffer
            products = [
                w if in_place[b] else torch.empty(w.shape, dtype=logits.dtype, device=w.device)
                for b, w in enumerate(weights)
            ]
            rows, width = logits.shape
            step = max(1, _BLOCK // max(1, width))
            buf = torch.empty(min(step, rows), width, dtype=logits.dtype, device=logits.device)
            for s0 in range(0, rows, step):
                s1 = min(rows, s0 + step)
                part = buf[: s1 - s0]
                if top is None:
                    torch.exp(logits[s0:s1], out=part)
                else:
                    shift = top[s0:s1] if dim == 1 else top
                    torch.sub(logits[s0:s1], shift, out=part).exp_()
                for b, (r0, r1, c0, c1) in enumerate(blocks):
                    lo, hi = max(s0, r0), min(s1, r1)
                    if lo >= hi:
                        continue
                    here = part[lo - s0 : hi - s0, c0:c1]
                    if in_place[b]:
                        products[b][lo - r0 : hi - r0].mul_(here)
                    else:
                        torch.mul(
                            here, weights[b][lo - r0 : hi - r0], out=products[b][lo - r0 : hi - r0]
                        )
        outs, totals = [], []
        for b, (r0, r1, c0, c1) in enumerate(blocks):
            total = products[b].sum(dim=dim)
            if top is None:
                outs.append(total.log())
            else:
                outs.append((top[r0:r1, 0] if dim == 1 else top[0, c0:c1]) + total.log())
            totals.append(torch.where(total > 0, total, 1.0))
        for (r0, c0), index in zip(reads, indices):
            outs.append(logits[r0 : r0 + index.shape[0], c0:].gather(1, index))
        ctx.blocks, ctx.reads, ctx.shape, ctx.dim = blocks, reads, logits.shape, dim
        ctx.save_for_backward(*products, *totals, *indices)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        saved = ctx.saved_tensors
        k = len(ctx.blocks)
        products, totals, indices = saved[:k], saved[k : 2 * k], saved[2 * k :]
        whole = (0, ctx.shape[0], 0, ctx.shape[1])
        out = None
        # a block over the whole matrix first: it writes the buffer instead of zero-filling it
        for b in sorted(range(k), key=lambda b: ctx.blocks[b] != whole):
            (r0, r1, c0, c1), g = ctx.blocks[b], grads[b]
            if g is None:
                continue
            scale = (g / totals[b]).unsqueeze(ctx.dim)
            if out is None and ctx.blocks[b] == whole:
                out = products[b] * scale
                continue
            if out is None:
                out = products[0].new_zeros(ctx.shape)
            out[r0:r1, c0:c1].addcmul_(products[b], scale)
        if out is None:
            out = products[0].new_zeros(ctx.shape) if k else None
        for (r0, c0), index, g in zip(ctx.reads, indices, grads[k:]):
            if g is not None:
                out[r0 : r0 + index.shape[0], c0:].scatter_add_(1, index, g)
        return (out, None, None, None, None, None, None, *([None] * (k + len(indices))))


def block_log_masses(
    logits: Tensor,
    blocks: list[tuple[int, int, int, int]],
    weights: list[Tensor],
    reads: list[tuple[int, int, Tensor]] = (),
    *,
    bound: float | None = None,
    scratch: bool = False,
    exp_out: Tensor | None = None,
    dim: int = 1,
) -> tuple[Tensor, ...]:
    """``log sum_j w_ij e^{c_ij}`` per row of each block ``(r0, r1, c0, c1)`` of ``logits``
    with its detached weights ``w >= 0`` (``-inf`` logits only where ``w = 0``), then the
    logits ``logits[r0:, c0:].gather(1, index)`` of each read ``(r0, c0, index)`` (distinct
    columns per row); see :class:`_BlockLogMasses`. ``bound``: the caller's bound on the finite
    ``|c|`` (cosine logits: ``1 / t``); up to 60 (float32) or 600 (float64) ``e^c`` is taken
    without the row maximum (no ``amax`` and subtraction passes). ``scratch``: the weights are
    the caller's scratch (distinct tensors, not used after the call): each product ``w e`` is
    written over its weights, no new buffer (integer or bool weights, taken as they are, get a
    float buffer for their products); ``exp_out``: a free buffer of ``logits``' shape and dtype
    for the exponentials, all at once; without it they are taken a block of rows at a time
    (``_BLOCK`` entries, a buffer in cache: no ``[A, S]`` one; the same values). ``dim = 0``: per column of each block, ``log sum_i w_ij e^{c_ij}`` (the reads stay
    row gathers). (Plain twin: ``weighted_log_mass(logits[r0:r1, c0:c1], w)`` and the gather;
    with ``dim = 0`` on the transposes.)"""
    ws = [w.detach() if not w.is_floating_point() else w.detach().to(logits.dtype) for w in weights]
    spots = tuple((r0, c0) for r0, c0, _ in reads)
    limit = 600.0 if logits.dtype == torch.float64 else 60.0
    unshifted = bound is not None and bound <= limit
    return _BlockLogMasses.apply(
        logits,
        tuple(blocks),
        spots,
        unshifted,
        bool(scratch),
        exp_out,
        int(dim),
        *ws,
        *[index for _, _, index in reads],
    )


def _kernel(
    values: Tensor,
    shift: Tensor,
    coef: float,
    *,
    scale: float = 1.0,
    cap: float = 1.0,
    columns: bool = False,
) -> Tensor:
    """``min(cap, scale exp(coef (v - shift_r)^2))`` per entry of ``values`` ``[R, S]`` (row
    shifts ``shift`` ``[R]``, or with ``columns`` column shifts ``[S]``; ``coef <= 0``), 0 where
    ``values`` is ``-inf`` (no negative): the square, the factor and ``log scale`` in one
    ``addcmul`` pass."""
    if coef == 0.0:
        keep = torch.tensor(min(cap, scale), dtype=values.dtype, device=values.device)
        return torch.where(torch.isinf(values), 0.0, keep)  # (a float scalar: float32 only)
    x = values - (shift.unsqueeze(0) if columns else shift.unsqueeze(1))
    base = torch.tensor(math.log(scale), dtype=x.dtype, device=x.device)
    return torch.addcmul(base, x, x, value=coef, out=x).exp_().clamp_(max=cap)


class _PairGram(torch.autograd.Function):
    """SimCLR's logits of two views from the rows ``z`` ``[2N, d]`` of ``[z1; z2]``: the Gram
    matrix ``G = z z^T / t`` with ``-inf`` on the diagonal and the partners ``(i, i +- N)``,
    and the partners' logits ``G_{i, p(i)}`` read before they are masked. The backward pass:
    ``dz = (M + M^T) z / t`` with ``M`` the incoming ``dG`` whose masked entries are replaced
    (the diagonal by 0, the partners by their logits' gradients) by an ``O(N d)`` correction:
    no ``[2N, 2N]`` pass for the masking (autograd's ``index_put`` backward) nor a product for
    the partners' logits (an ``einsum`` and its backward)."""

    @staticmethod
    def forward(ctx, z, temperature):  # type: ignore[override]
        n = z.shape[0] // 2
        logits = ((z / temperature) @ z.T).to(z.dtype)  # autocast: promote, as the plain form
        # the partners (i, i + N) and (i + N, i) are the diagonals at offsets N and -N: views,
        # no index / index_put (several times dearer on the CPU for 2N entries)
        pos = torch.cat([logits.diagonal(n), logits.diagonal(-n)])  # a copy
        for offset in (0, n, -n):
            logits.diagonal(offset).fill_(float("-inf"))
        ctx.temperature = temperature
        ctx.save_for_backward(z)
        # an output that nothing differentiates arrives as None, not as zeros: a strategy that
        # reads its negatives' logits with a backward of its own (Ring's band, SimANS's draws)
        # back-propagates only the positives' logits here, O(N d), not two [2N, 2N] products
        # with a zero matrix
        ctx.set_materialize_grads(False)
        return logits, pos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logits, grad_pos):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        n = z.shape[0] // 2
        # dz = (M + M^T) z with M = dG, its masked entries replaced: the diagonal by 0, the
        # partners by their logits' gradients. Two products with dG as it came (a transposed
        # operand costs BLAS nothing; an explicit M + M^T pass costs about a product on a CPU),
        # then the replaced entries' share, O(N d).
        with torch.autocast(z.device.type, enabled=False):  # z's dtype, whatever the caller's
            # (None: an output nothing differentiates, see forward)
            c = z.new_zeros(2 * n) if grad_pos is None else grad_pos.to(z.dtype)
            if grad_logits is None:
                out = torch.zeros_like(z)
            else:
                m = grad_logits.to(z.dtype)
                # (addmm out of place: the benchmark's product floor and the flop counter see it)
                out = torch.addmm(torch.mm(m, z), m.T, z)
                out.sub_(z * (2.0 * m.diagonal()).unsqueeze(1))
                c = c - torch.cat([m.diagonal(n), m.diagonal(-n)])
            # the partner of row i is row (i + N) mod 2N: a roll by N
            out.add_(z.roll(n, 0) * (c + c.roll(n)).unsqueeze(1))
        return out / ctx.temperature, None


class _UnitRows(torch.autograd.Function):
    """``x / max(||x||, eps)`` along the last dimension, as ``F.normalize``, with the backward
    written out: ``dx = (g - y (g . y)) / n`` (``y`` the output, ``n`` the clamped norm; a row
    whose norm is clamped is ``x / eps``, linear: ``dx = g / eps``). Autograd's form divides by
    the norm broadcast over the row four times (strided, about twice the time of the whole
    written-out pass on the CPU)."""

    @staticmethod
    def forward(ctx, x, eps):  # type: ignore[override]
        raw = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        norm = raw.clamp_min(eps)
        y = x / norm
        ctx.save_for_backward(y, norm, raw > eps)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        y, norm, live = ctx.saved_tensors
        along = (grad * y).sum(dim=-1, keepdim=True).mul_(live)
        return (grad - y * along) / norm, None


def unit_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, dim=-1, eps=eps)`` with a written-out backward (:class:`_UnitRows`; plain
    twin: ``F.normalize``, same values and gradients up to rounding)."""
    return _UnitRows.apply(x, eps)


def _pair_mask(logits: Tensor) -> Tensor:
    """The negative mask of :func:`pair_contrast`'s ``[2N, 2N]`` logits: all but the diagonal
    and the partners ``(i, i +- N)``."""
    two = logits.shape[0]
    idx = torch.arange(two, device=logits.device)
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[idx, idx] = False
    mask[idx, idx.roll(two // 2)] = False
    return mask


def pair_contrast(z1: Tensor, z2: Tensor, *, temperature: float, mask: bool = True):
    """``in_batch_contrast((z1, z2), temperature=t, normalize=True)`` with its logits and the
    partners' logits from :class:`_PairGram` (no masking pass in the backward, no einsum for
    the partners). Same fields, same values; ``mask=False``: ``negative_mask`` None (the caller
    makes it, :func:`_pair_mask`, if something reads it)."""
    from hardneg.contrast import ContrastSet, compute_dtype

    n = z1.shape[0]
    z = unit_rows(torch.cat([z1, z2]).to(compute_dtype(z1, z2)))
    logits, pos = _PairGram.apply(z, float(temperature))
    idx = torch.arange(2 * n, device=z.device)
    partner = idx.roll(n).unsqueeze(1)
    pos = pos.unsqueeze(1)
    return ContrastSet(
        anchors=z,
        columns=z,
        anchor_columns=None,
        positives=z[partner],
        positive_logits=pos,
        positive_weight=torch.ones_like(pos),
        positive_index=partner,
        negative_logits=logits,
        negative_mask=_pair_mask(logits) if mask else None,
        num_negatives=2 * n - 2,
        temperature=float(temperature),
        normalized=True,
    )


def mochi_in_batch_fits(strategy, inputs, context) -> bool:
    """Whether MoCHi's in-batch step takes :func:`pair_contrast`: two views, no ids, cosine
    logits, the InfoNCE objective (the mixes' log-mass) and some mixes."""
    return (
        context.want_log_mass
        and inputs.negatives is None
        and inputs.hard_negatives is None
        and not inputs.extra_views
        and inputs.ids is None
        and inputs.normalize
        and strategy.num_mixed + strategy.num_query_mixed > 0
    )


# rows at most this wide take the values-only partition of _top_few (measured on this CPU, k = 5:
# 0.13 ms against torch.topk's 0.5 ms on 256 x 256; 2.3 ms against 2.0 ms on 1024 x 1024)
_FEW_WIDTH = 384


def _top_few(x: Tensor, k: int) -> Tensor:
    """``[A, k]`` columns of the ``k`` largest entries of each row for a small ``k`` (the
    neighbours). Rows of at most ``_FEW_WIDTH`` on the CPU: each row's ``k``-th largest value by
    numpy's values-only partition, then the entries at or above it (``flatnonzero``, in column
    order) where that gives exactly ``k`` in every row (no tie at the edge, no NaN), else
    ``torch.topk``; wider rows: ``torch.topk`` (its partial selection beats
    :func:`top_k_indices`' numpy partition for ``k`` of a few, measured 3 ms against 10 ms on
    1024 x 1024, 7 ms against 15 ms on 1024 x 4096); ``k > 32``: :func:`top_k_indices`. Same
    members as ``x.topk(k)``."""
    if k > 32:
        return top_k_indices(x, k)
    rows, width = x.shape
    if 0 < k < width and width <= _FEW_WIDTH and rows > 0:
        index = hardest_columns(x, k)  # None on an accelerator, a tie at the edge or a NaN
        if index is not None:
            return index
    return x.topk(k, dim=1, sorted=False).indices


def potential_in_batch_fits(strategy, inputs, context) -> bool:
    """Whether :func:`potential_in_batch_terms` serves this call: two views, no ids, cosine
    logits (the Gram matrix is the neighbour look-up), the InfoNCE objective (log masses), and a
    temperature at which no kept exponential underflows: ``e^{-2 / t}`` stays normal."""
    if inputs.negatives is not None or inputs.ids is not None or not inputs.normalize:
        return False
    if not context.want_log_mass:
        return False
    dtype = torch.float64 if torch.float64 in (inputs.z1.dtype, inputs.z2.dtype) else None
    limit = 600.0 if dtype is torch.float64 else 60.0
    return 2.0 / inputs.temperature <= limit


def potential_in_batch_terms(strategy, inputs, context):
    """Potential-sample mining's three in-batch terms from one Gram matrix of ``[z1; z2]``.

    Plain twin: ``PotentialMining.mined`` twice and ``PotentialMining.augmentation`` (two
    neighbour look-ups, three score products). Here the ``L_aug`` contrast set's logits ``G``
    (``[2N, 2N]``, ``s / t``, ``-inf`` on the diagonal and the partners) give everything: the
    mined logits of ``L_mined(z1; z2)`` and ``L_mined(z2; z1)`` are its blocks ``G[:N, N:]`` and
    ``G[N:, :N]``, the keys' neighbours come from ``G[N:, N:]`` and ``G[:N, :N]`` (same ranking
    as the cosines), the keep probabilities of the mined terms are those of ``L_aug``'s kernel
    on the same blocks (same similarity and centre; ``select_on='cosine'``).

    ``G`` is symmetric, so every term is laid out with its anchors as the columns: the cell
    (anchor ``y``, column ``x``) is read at ``G[x, y]`` and its kernel taken around the anchor's
    centre, one shift per column. Then one kernel pass over ``G`` gives ``L_aug``'s cells and,
    as its off-diagonal blocks ``[N:, :N]`` and ``[:N, N:]``, each mined direction's cells with
    the columns as rows, the layout of :func:`binomial_draws` (no transposed copy); the masses
    are column sums (:func:`block_log_masses` with ``dim = 0``), and their gradients land on
    ``G``'s transposed entries, which the Gram's backward ``(M + M^T) z`` treats alike. The kept
    cells per column are ``Binomial(m_j, pi_ij)`` (``m_j`` the column's cells; the anchor's own
    block set to 0 after the draw; ``m pi`` in expected mode), ``L_aug``'s one Bernoulli per
    cell, all from one :class:`_ByteStream` (both directions' columns in one
    :func:`binomial_draws`, then ``L_aug``, each followed by its ties' uniforms), and the three negative masses come from one exponential
    written over the kernel's buffer. Returns the terms of ``strategy.terms`` with each mass
    attached (``fast_log_mass``)."""
    z1, z2 = inputs.z1, inputs.z2
    n, t = z1.shape[0], inputs.temperature
    # no [2N, 2N] mask: the loss reads none (L_aug's is made on first read, _lazy_cells)
    aug = pair_contrast(z1, z2, temperature=t, mask=False)
    g = aug.negative_logits
    zn = aug.anchors
    bernoulli = strategy.sample == "bernoulli"
    clamp = strategy.clamp
    use_aug = strategy.aug_weight > 0
    raw = strategy.select_on == "raw"
    exp_out = None  # a free float buffer of G's shape for the masses' exponentials
    with torch.no_grad():
        gd = g.detach()
        # the kernel exp(-a (s - s+ - b)^2) on s / t: coefficient -a t^2, shift (s+ + b) / t
        coef = -strategy.a * t * t
        shift = aug.positive_logits.detach()[:, 0] + strategy.b / t
        rows = torch.arange(n, device=g.device)
        num = min(strategy.num_neighbors, n - 1)
        # the keys' neighbours: z2 among z2 (direction 1), z1 among z1 (direction 2); the
        # Gram's diagonal is -inf, so a key is not its own neighbour
        nb1 = _top_few(gd[n:, n:], num) if num > 0 else rows.new_zeros(n, 0)
        nb2 = _top_few(gd[:n, :n], num) if num > 0 else rows.new_zeros(n, 0)
        on_numpy = _cpu_numpy(g.device)
        if on_numpy:  # the blocks' bookkeeping in numpy on the same memory (no torch ops)
            col = np.arange(n).reshape(-1, 1)
            b1, b2 = (np.concatenate([col, nb.numpy()], axis=1) for nb in (nb1, nb2))
            blocks1, blocks2 = torch.from_numpy(b1), torch.from_numpy(b2)
            both = np.concatenate([np.bincount(b.reshape(-1), minlength=n) for b in (b1, b2)])
            both_trials = torch.from_numpy(both)
            trials1, trials2 = both_trials[:n], both_trials[n:]
            anchor_of = np.repeat(np.arange(n), num + 1)
            own1, own2 = b1.reshape(-1), b2.reshape(-1)
        else:
            blocks1 = torch.cat([rows.unsqueeze(1), nb1.to(rows.device)], dim=1)
            blocks2 = torch.cat([rows.unsqueeze(1), nb2.to(rows.device)], dim=1)
            trials1 = torch.bincount(blocks1.reshape(-1), minlength=n)
            trials2 = torch.bincount(blocks2.reshape(-1), minlength=n)
            both_trials = torch.cat([trials1, trials2])
            anchor_of = rows.repeat_interleave(num + 1)  # each anchor's own block: the rows ...
            own1, own2 = blocks1.reshape(-1), blocks2.reshape(-1)  # ... (keys) [N (K+1)]
        aug_values, aug_shift, aug_coef = gd, shift, coef
        if use_aug and raw:  # the code's kernel on unnormalised dot products (symmetric too)
            x = torch.cat([z1, z2]).detach().to(g.dtype)
            aug_values = x @ x.T
            aug_shift, aug_coef = (x * x.roll(n, dims=0)).sum(dim=1) + strategy.b, -strategy.a
            aug_values.masked_fill_(~_pair_mask(g), float("-inf"))
        # the mined terms read L_aug's kernel on the same blocks (select_on='cosine')
        shared = use_aug and not raw
        # bernoulli: 256 pi, whose bytes floor(256 pi) (255 at most) are the thresholds and whose
        # fraction above them settles a tie (read from this buffer)
        scale, cap = (256.0, 256.0 * clamp) if bernoulli else (1.0, clamp)
        # column layout: entry (x, y) around the centre of the anchor y
        whole = None  # L_aug's kernel [2N, 2N]; after the draws, the exponentials' buffer
        if use_aug:
            whole = _kernel(aug_values, aug_shift, aug_coef, scale=scale, cap=cap, columns=True)
        if shared:
            k1, k2 = whole[n:, :n], whole[:n, n:]  # [key, anchor] of each direction
        else:
            k1 = _kernel(gd[n:, :n], shift[:n], coef, scale=scale, cap=cap, columns=True)
            k2 = _kernel(gd[:n, n:], shift[n:], coef, scale=scale, cap=cap, columns=True)
        if bernoulli:
            need = _to_bytes(whole, cap) if use_aug else None
            # both directions in one call: columns 0..N-1 direction 1's keys, N..2N-1 direction
            # 2's; shared, row 2x + h of need.view(4N, N) is need[x, hN:(h + 1)N]
            if shared:
                need_cols = need.view(4 * n, n)
                if on_numpy:
                    source = torch.from_numpy(
                        np.concatenate([2 * (n + col[:, 0]), 2 * col[:, 0] + 1])
                    )
                else:
                    source = torch.cat([2 * (n + rows), 2 * rows + 1])
            else:
                need_cols, source = torch.cat([_to_bytes(k1, cap), _to_bytes(k2, cap)]), None

            def p256_mined(column: Tensor, anchor: Tensor) -> Tensor:  # the kernel's 256 pi
                c = column % n
                if shared:  # one gather from the kernel: k1[c, y] = whole[N + c, y],
                    # k2[c, y] = whole[c, N + y]
                    at = c * (2 * n) + anchor
                    at += torch.where(column < n, 2 * n * n, n)
                    return whole.view(-1)[at]
                return torch.where(column < n, k1[c, anchor], k2[c, anchor])

            def p256_aug(at: Tensor) -> Tensor:  # read before the draws overwrite the kernel
                return whole.view(-1)[at]

            p256_mined_np = p256_aug_np = None  # the same look-ups on numpy arrays (CPU)
            if _cpu_numpy(g.device):
                flat = whole.view(-1).numpy() if use_aug else None
                k1n, k2n = (None, None) if shared else (k1.numpy(), k2.numpy())

                def p256_mined_np(column: np.ndarray, anchor: np.ndarray) -> np.ndarray:
                    c = column % n
                    if shared:
                        at = c * (2 * n) + anchor
                        at += np.where(column < n, 2 * n * n, n)
                        return flat[at]
                    return np.where(column < n, k1n[c, anchor], k2n[c, anchor])

                def p256_aug_np(at: np.ndarray) -> np.ndarray:
                    return flat[at]

            stream = _ByteStream(context.generator, g.device, _CHUNK)
            w = binomial_draws(
                need_cols,
                both_trials,
                p256_mined,
                context.generator,
                rows=source,
                stream=stream,
                p256_np=p256_mined_np,
            )
            w1, w2 = w[:n], w[n:]
            del need_cols, k1, k2, w
            kept_aug = None
            if use_aug and whole.numel() <= _BLOCK:  # L_aug's draws as bytes; the kernel's
                # float buffer is then spent and takes the masses' exponentials, all at once (no
                # fresh [2N, 2N] float buffer: the row-block form's buffer would be as large)
                kept_aug = bernoulli_draws(
                    need, p256_aug, context.generator, stream=stream, p256_np=p256_aug_np
                )
                exp_out = whole
            elif use_aug:  # the kernel is spent: its float buffer takes L_aug's draws, the
                # exponentials go a block of rows at a time (in cache)
                kept_aug = bernoulli_draws(
                    need, p256_aug, context.generator, out=whole, stream=stream, p256_np=p256_aug_np
                )
            del need
        else:
            w1 = k1 * trials1.to(k1.dtype).unsqueeze(1) if shared else k1.mul_(trials1.unsqueeze(1))
            w2 = k2 * trials2.to(k2.dtype).unsqueeze(1) if shared else k2.mul_(trials2.unsqueeze(1))
            kept_aug = whole
        # the anchor's own block holds its positives, no negatives (drawn, then dropped)
        if on_numpy:
            w1.numpy()[own1, anchor_of] = 0
            w2.numpy()[own2, anchor_of] = 0
        else:
            w1[own1, anchor_of] = 0
            w2[own2, anchor_of] = 0
        whole = None  # (kept_aug holds it now)
    blocks = [(n, 2 * n, 0, n), (0, n, n, 2 * n)]  # [keys, anchors] of each direction
    weights = [w1, w2]
    if kept_aug is not None:
        blocks.append((0, 2 * n, 0, 2 * n))
        weights.append(kept_aug)
    del w1, w2, kept_aug
    reads = []
    if strategy.weighting == "hard" and num > 0:  # the mined positives' logits, read from G
        reads = [(0, n, nb1), (n, 0, nb2)]
    # cosine logits, |c| <= 1 / t; the weights are this call's own buffers: the float products
    # overwrite them, the counts' get their own (with exp_out, L_aug's product is written over
    # the exponentials, the last block taken)
    masses = block_log_masses(
        g, blocks, weights, reads, bound=1.0 / t, scratch=True, exp_out=exp_out, dim=0
    )
    del weights, exp_out
    extra = masses[len(blocks) :] if reads else (None, None)
    out = []
    terms = (
        (0, (0, n), nb1, blocks1, trials1, inputs.h1),
        (1, (n, 0), nb2, blocks2, trials2, inputs.h2),
    )
    for d, (r0, c0), nb, own_block, trials, h in terms:
        anchors, columns = zn[r0 : r0 + n], zn[c0 : c0 + n]

        # the dense fields the loss never reads, made on first read (a copy and a scatter
        # over each anchor's own block: no [N, N] mask passes)
        def negative(own_block=own_block):
            mask = torch.ones(n, n, dtype=torch.bool, device=g.device)
            return mask.scatter_(1, own_block, False)

        def negative_logits(r0=r0, c0=c0, own_block=own_block):
            return g[r0 : r0 + n, c0 : c0 + n].scatter(1, own_block, float("-inf"))

        def multiplicity(trials=trials, own_block=own_block):
            with torch.no_grad():  # the cells of each column, 0 on the anchor's own block
                return trials.to(g.dtype).repeat(n, 1).scatter_(1, own_block, 0.0)

        lazy = {
            "negative_mask": negative,
            "negative_logits": negative_logits,
            "multiplicity": multiplicity,
        }
        mined = _lazy_cells(
            aug,
            lazy,
            anchors=anchors,
            columns=columns,
            positives=columns.unsqueeze(1),
            positive_logits=aug.positive_logits[r0 : r0 + n],
            positive_weight=aug.positive_weight[r0 : r0 + n],
            positive_index=rows.unsqueeze(1),
            num_negatives=n - 1 - num,
            neighbours=nb,
            anchor_features=h,
            fast_log_mass=masses[d],
            fast_extra_positive_logits=extra[d],
        )
        out.append((0.5, mined, "mined"))
    if use_aug:
        lazy = {"negative_mask": lambda: _pair_mask(g)}
        out.append((strategy.aug_weight, _lazy_cells(aug, lazy, fast_log_mass=masses[2]), "aug"))
    return out


def joint_positive_infonce(pos: Tensor, extra: Tensor, log_mass: Tensor) -> Tensor:
    """``[A]`` the InfoNCE objective's joint positives summed (``positive_mode='joint'``,
    ``positive_reduction='sum'``, no debiasing) when every positive weight is 1:
    ``sum_p [log(sum_q e^{a_q} + R) - a_p]`` over the positives ``a = [pos, extra]`` (``pos``
    ``[A, P]``, ``extra`` ``[A, Q]``), ``log R`` = ``log_mass`` ``[A]``. Plain twin:
    ``objectives.infonce_objective``, whose weight ops (``where(w > 0, .)``, ``w *``, the
    weights' concatenation) are then identities (``1 x = x``): the same ops otherwise, the
    same values and gradients bit for bit, about 15 fewer dispatched ops per term."""
    a = torch.cat([pos, extra], dim=1)
    log_pos = torch.logsumexp(a, dim=1, keepdim=True)
    return (torch.logaddexp(log_pos, log_mass.unsqueeze(1)) - a).sum(dim=1)


def _safe_logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """``log(e^a + e^b)`` per entry, ``-inf`` with a zero gradient (not NaN) where both are."""
    kept = torch.isfinite(a) | torch.isfinite(b)
    out = torch.logaddexp(torch.where(kept, a, 0.0), torch.where(kept, b, 0.0))
    return out.masked_fill(~kept, float("-inf"))


class _LazyField:
    """A field of :func:`_lazy_cells`' contrast sets: its value is made by the instance's thunk
    for it on first read, then kept (a set value is kept as given)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        values = obj.__dict__
        if self.name not in values:
            values[self.name] = values["_lazy"].pop(self.name)()
        return values[self.name]

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.name] = value


_LAZY_FIELDS = ("negative_logits", "negative_mask", "num_negatives", "multiplicity")


@functools.cache
def _lazy_cell_class() -> type:
    """The class of :func:`_lazy_cells`' sets, made on first use (it subclasses ``potential``'s
    ``CellContrast``, which imports this module)."""
    from hardneg.strategies.potential import CellContrast

    return type("LazyCellContrast", (CellContrast,), {n: _LazyField() for n in _LAZY_FIELDS})


def _lazy_cells(contrast, lazy: dict, **extra):
    """``potential``'s ``_with_cells(contrast, **extra)`` whose fields named in ``lazy`` (some of
    ``negative_logits``, ``negative_mask``, ``num_negatives``, ``multiplicity``) are made by
    their thunks on first read: the fused fast paths' dense ``[A, C]`` fields that the InfoNCE
    loss never reads (it takes ``fast_log_mass``), so that a loss step allocates and fills none
    of them; any reader (a test, soft weights) gets the values of the eager fields."""
    from dataclasses import fields

    from hardneg.strategies.potential import CellContrast, _with_cells

    eager = _with_cells(contrast, **{k: v for k, v in extra.items() if k not in lazy})
    out = object.__new__(_lazy_cell_class())
    out.__dict__["_lazy"] = dict(lazy)
    for f in fields(CellContrast):
        if f.name not in lazy:
            setattr(out, f.name, getattr(eager, f.name))
    return out


def potential_pool_fits(strategy, inputs, context) -> bool:
    """Whether :func:`potential_pool_terms` serves this call: a shared bank ``[Q, d]``, cosine
    logits, the InfoNCE objective (log masses), no ``pool_as_negatives`` (every bank row a
    candidate: nothing to skip), one compute dtype for the queries, keys and bank, and a
    temperature at which no kept exponential underflows (as :func:`potential_in_batch_fits`)."""
    from hardneg.contrast import compute_dtype

    pool = inputs.negatives
    if pool is None or pool.dim() != 2 or not inputs.normalize or not context.want_log_mass:
        return False
    if strategy.pool_as_negatives:
        return False
    dtype = compute_dtype(inputs.z1, inputs.z2)
    if compute_dtype(inputs.z1, inputs.z2, pool) != dtype:
        return False
    limit = 600.0 if dtype is torch.float64 else 60.0
    return 2.0 / inputs.temperature <= limit


def potential_pool_terms(strategy, inputs, context):
    """Potential-sample mining's terms with a bank: ``L_mined(q; k)`` and ``L_aug(q, k)``.

    Plain twin: ``PotentialMining.mined`` (the mined logits ``q [k; bank]^T`` ``[N, N + Q]``, the
    keep probabilities and one draw per column over all of them) and
    ``PotentialMining.augmentation``. Here only the columns that hold a cell are touched: the
    keys, read from ``L_aug``'s Gram matrix ``G`` of ``[q; k]``, and the ``U`` bank rows that are
    some key's neighbour (a bank row in no block is no negative: its probability and draw are
    never needed), through one product ``q bank[U]^T`` ``[N, U]``. ``L_aug`` and the keys are
    laid out as in :func:`potential_in_batch_terms` (anchors as the columns of the symmetric
    ``G``: one kernel pass gives ``L_aug``'s cells and, as its block ``[N:, :N]``, the keys'; the
    partners, the own keys, are ``-inf`` there); the bank with the anchors as rows, its columns
    ordered by their number of cells (most first). Per column ``u`` of ``U`` with ``m_u``
    cells, anchor ``i`` draws ``Binomial(m_u - own_iu, pi_iu)`` (its own block's cell is a
    positive; ``exclude_index`` drops the column) by layers (:func:`layer_draws`, layer 0
    skipping the own cells); the keys one Bernoulli each. Draw order, from one
    :class:`_ByteStream`: the keys, the bank's layers, then ``L_aug``'s cells, each followed by
    its ties' uniforms. The masses: the keys' and ``L_aug``'s from one exponential of ``G``
    (column sums), the bank's with the mined positives' logits from one of ``q bank[U]^T``
    (:func:`block_log_masses`), each written over its kernel's buffer, summed per anchor.
    Returns the terms of ``strategy.terms`` with each mass attached."""
    from hardneg.strategies.potential import _with_cells

    q, k, pool, exclude = inputs.z1, inputs.z2, inputs.negatives, inputs.exclude_index
    n, t = q.shape[0], inputs.temperature
    aug = pair_contrast(q, k, temperature=t)
    g = aug.negative_logits
    zn = aug.anchors
    bernoulli = strategy.sample == "bernoulli"
    clamp = strategy.clamp
    use_aug = strategy.aug_weight > 0
    raw = strategy.select_on == "raw"
    with torch.no_grad():
        gd = g.detach()
        coef = -strategy.a * t * t
        shift = aug.positive_logits.detach()[:, 0] + strategy.b / t
        rows = torch.arange(n, device=g.device)
        # the neighbour look-up of the plain form: each key among the bank (cosine)
        key = F.normalize(k.detach().to(g.dtype), dim=1)
        bank = F.normalize(pool.detach().to(g.dtype), dim=1)
        if exclude is not None:
            exclude = exclude.to(device=g.device, dtype=torch.long)
        num = min(strategy.num_neighbors, bank.shape[0] - int(exclude is not None))
        nb = rows.new_zeros(n, 0)
        if num > 0:  # key @ bank^T a block of rows at a time (no [N, Q] buffer)
            nb = torch.empty(n, num, dtype=torch.long, device=g.device)
            step = max(1, _BLOCK // max(1, bank.shape[0]))
            for s0 in range(0, n, step):
                lookup = key[s0 : s0 + step] @ bank.T
                if exclude is not None:  # nor its sample's own bank entry
                    lookup[rows[: lookup.shape[0]], exclude[s0 : s0 + step]] = float("-inf")
                nb[s0 : s0 + step] = _top_few(lookup, num)
            del lookup
        # the bank rows in some block, U of them, ordered by their number of cells (most
        # first, ties by row): the columns with more than r cells are then the first c_r
        cells = torch.bincount(nb.reshape(-1), minlength=bank.shape[0])
        held = cells.nonzero().squeeze(1)
        held = held[torch.argsort(cells[held], descending=True, stable=True)]
        u = held.shape[0]
        trials = cells[held]  # [U], >= 1 each, non-increasing
        remap = torch.full((bank.shape[0],), -1, dtype=torch.long, device=g.device)
        remap[held] = torch.arange(u, device=g.device)
        nbu = remap[nb]  # [N, K] neighbours as columns of bank[U]
        own = torch.zeros(n, u, dtype=torch.bool, device=g.device).scatter_(1, nbu, True)
        gone = None  # [N] column of U of each anchor's excluded bank entry, -1 if none
        if exclude is not None:
            gone = remap[exclude]
        held_rows = bank[held]
    # the mined logits of the bank's held rows: gradient to q only (the bank is detached)
    p = ((zn[:n] / t) @ held_rows.T.to(zn.dtype)).to(zn.dtype)  # autocast: promote
    with torch.no_grad():
        pd = p.detach()
        aug_values, aug_shift, aug_coef = gd, shift, coef
        if use_aug and raw:  # the code's kernel on unnormalised dot products (symmetric too)
            x = torch.cat([q, k]).detach().to(g.dtype)
            aug_values = x @ x.T
            aug_shift, aug_coef = (x * x.roll(n, dims=0)).sum(dim=1) + strategy.b, -strategy.a
            aug_values.masked_fill_(~aug.mask(), float("-inf"))
        shared = use_aug and not raw  # the keys' kernel is L_aug's on the block G[N:, :N]
        # bernoulli: 256 pi, whose bytes floor(256 pi) (255 at most) are the thresholds and whose
        # fraction above them settles a tie (read from this buffer)
        scale, cap = (256.0, 256.0 * clamp) if bernoulli else (1.0, clamp)
        whole = None  # L_aug's kernel, column layout; after the draws the exponentials' buffer
        if use_aug:
            whole = _kernel(aug_values, aug_shift, aug_coef, scale=scale, cap=cap, columns=True)
        if shared:
            keys = whole[n:, :n]  # [key, anchor]; the own key (the partner) is -inf: 0
        else:
            keys = _kernel(gd[n:, :n], shift[:n], coef, scale=scale, cap=cap, columns=True)
        kp = _kernel(pd, shift[:n], coef, scale=scale, cap=cap)  # [N, U], anchors as rows
        if bernoulli:
            need = _to_bytes(whole, cap) if use_aug else None
            need_keys = need[n:, :n].contiguous() if shared else _to_bytes(keys, cap)
            need_pool = _to_bytes(kp, cap)

            # 256 pi at a tie, read from the kernels' buffers (before the draws overwrite them)
            def keys_p256(at: Tensor) -> Tensor:  # flat positions of [key, anchor]
                return keys[at // n, at % n]

            def pool_p256(r: Tensor, c: Tensor) -> Tensor:
                return kp[r, c]

            def aug_p256(at: Tensor) -> Tensor:
                return whole.view(-1)[at]

            stream = _ByteStream(context.generator, g.device, _CHUNK)
            counts_keys = bernoulli_draws(
                need_keys, keys_p256, context.generator, dtype=g.dtype, stream=stream
            )
            del need_keys, keys
            drawn = layer_draws(
                need_pool, trials, pool_p256, context.generator, skip_first=own, stream=stream
            )
            del need_pool
            counts_pool = kp.copy_(drawn)  # the kernels are spent: their buffers take the draws
            del drawn
            kept_aug = None
            if use_aug:
                kept_aug = bernoulli_draws(
                    need, aug_p256, context.generator, out=whole, stream=stream
                )
            del need
        else:
            counts_keys = keys.clone() if shared else keys
            counts_pool = kp.mul_(trials.to(pd.dtype) - own.to(pd.dtype))
            kept_aug = whole
        if gone is not None:  # the excluded entry's cells are no negatives
            counts_pool[rows[gone >= 0], gone[gone >= 0]] = 0
        whole = kp = None  # (the weights hold them now)
    blocks, weights = [(n, 2 * n, 0, n)], [counts_keys]
    if kept_aug is not None:
        blocks.append((0, 2 * n, 0, 2 * n))
        weights.append(kept_aug)
    del counts_keys, kept_aug
    # cosine logits, |c| <= 1 / t; the weights are this call's own buffers (scratch)
    key_masses = block_log_masses(g, blocks, weights, bound=1.0 / t, scratch=True, dim=0)
    del weights
    hard = strategy.weighting == "hard" and num > 0
    if u > 0:
        reads = [(0, 0, nbu)] if hard else []
        pool_masses = block_log_masses(
            p, [(0, n, 0, u)], [counts_pool], reads, bound=1.0 / t, scratch=True
        )
        mass = _safe_logaddexp(key_masses[0], pool_masses[0])
    else:  # K = 0: no bank row holds a cell
        mass = key_masses[0]
    del counts_pool
    # the columns [k; bank[U]] of the contrast set and their dense fields, which the loss never
    # reads: made on first read
    cells = {}

    def multiplicity() -> Tensor:  # each column's cells per anchor
        if "m" in cells:
            return cells["m"]
        with torch.no_grad():
            m = torch.empty(n, n + u, dtype=g.dtype, device=g.device)
            m[:, :n] = 1.0
            m[rows, rows] = 0.0  # the own key is the positive
            m[:, n:] = trials.to(g.dtype)
            # the own block's cell is no negative; nor is the excluded bank entry
            off_rows, off_cols = rows.repeat_interleave(nbu.shape[1]), n + nbu.reshape(-1)
            m[off_rows, off_cols] -= 1.0
            if gone is not None:
                off_rows = torch.cat([off_rows, rows[gone >= 0]])
                off_cols = torch.cat([off_cols, n + gone[gone >= 0]])
                m[rows[gone >= 0], n + gone[gone >= 0]] = 0.0
            dropped = m[off_rows, off_cols] == 0
            cells.update(m=m, off=(off_rows[dropped], off_cols[dropped]))
        return m

    def negative() -> Tensor:
        if "negative" not in cells:
            cells["negative"] = multiplicity() > 0
        return cells["negative"]

    def negative_logits() -> Tensor:
        multiplicity()
        # the partners (own keys) are -inf in G already; the few dropped bank entries set here
        logits = torch.cat([g[:n, n:], p], dim=1)
        minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
        return logits.index_put_(cells["off"], minus_inf)

    def num_negatives() -> Tensor:
        # (a bool sum accumulates in int64 element by element: 10x slower than in int32)
        return negative().view(torch.uint8).sum(dim=1, dtype=torch.int32).long()

    lazy = {
        "multiplicity": multiplicity,
        "negative_mask": negative,
        "negative_logits": negative_logits,
        "num_negatives": num_negatives,
    }
    column_index = torch.cat([rows, n + held])  # in the plain form's [k; bank]
    columns = torch.cat([zn[n:], held_rows.to(zn.dtype)])
    mined = _lazy_cells(
        aug,
        lazy,
        anchors=zn[:n],
        columns=columns,
        positives=zn[n:].unsqueeze(1),
        positive_logits=aug.positive_logits[:n],
        positive_weight=aug.positive_weight[:n],
        positive_index=rows.unsqueeze(1),
        neighbours=nbu + n,
        column_index=column_index,
        anchor_features=inputs.h1,
        fast_log_mass=mass,
        fast_extra_positive_logits=pool_masses[1] if hard else None,
    )
    out = [(1.0, mined, "mined")]
    if use_aug:
        out.append((strategy.aug_weight, _with_cells(aug, fast_log_mass=key_masses[1]), "aug"))
    return out
