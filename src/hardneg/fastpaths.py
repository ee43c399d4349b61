"""Fast paths: the speed code of the strategies, apart from their plain form.

Each function here computes exactly what a plain expression in a strategy file computes, only
faster on some hardware; each is tested equal to its plain twin (``tests/test_fastpaths.py``).
Strategies call them only when ``StepContext.fast`` is set (never under ``torch.compile``, whose
own fusion is the accelerator's fast path, and never for diagnostics). Public torch and numpy API
only; no kept buffers.

* :func:`tilted_log_mass` — HCL/UnReMix: ``log sum_j w_ij e^{c_ij}`` with
  ``w_ij = M e^{beta c_ij} f_ij / sum_k e^{beta c_ik} f_ik`` in one shifted pass and a
  hand-written backward (plain twin: ``logsumexp(c + normalised_log_weights(beta c + log f))``).
* :func:`top_k_indices` / :func:`drop_top` — Ring on CPU: linear-time selection over int32 keys
  that order like the floats, with numpy's SIMD partition on long rows (plain twin:
  ``torch.topk``).
* :func:`kept_counts` — potential: the kept cells per column drawn per column, ``Binomial(m, pi)``
  as layers of Bernoulli draws over the columns with more than ``r`` cells, or ``m pi`` in
  expected mode (plain twin: one uniform per grid cell, compared with ``pi`` and summed per
  column with ``scatter_add``; same law, not the same draws).
* :func:`weighted_log_mass` — potential: ``log sum_j w_ij e^{c_ij}`` from the counts themselves,
  no ``log w`` pass over ``[A, S]`` and a two-pass backward (plain twin:
  ``logsumexp(c + log w)``, ``-inf`` with a zero gradient on a row with nothing kept).
* :func:`row_exponentials` / :func:`unremix_mix` — UnReMix: the row-shifted exponentials
  ``e^{c - max_j c}`` computed once for the influence score's softmax and the objective's tilted
  mass, and the mix ``lambda_u U~ + lambda_d D~ + eps`` built in one ``[A, C]`` buffer (per-row
  affine in place, representativeness as a rank-1 update) (plain twin:
  ``UnReMixNegatives.mix`` with ``minmax_over_negatives``).
* :func:`mixed_column_logits` — MoCHi: the logits ``q · n_j / t`` of the drawn columns read
  from the contrast set's own logits, with a hand-written backward to the anchors only (plain
  twin: ``anchor_column_logits(contrast).gather(1, index)``, a second product with the columns
  detached).
* :func:`potential_in_batch_terms` — potential, in-batch: the three terms from one Gram matrix
  of ``[z1; z2]`` (every logit, the neighbour look-up, one keep kernel for ``L_aug`` and both
  mined terms, computed as threshold bytes ``floor(256 pi)``), the draws from random bytes
  (:func:`bernoulli_draws`, :func:`binomial_draws`: a byte against ``floor(256 pi)``, a float
  uniform on a tie; same law as the plain grid's uniforms, other draws) and the negative masses
  and mined positives' logits from one exponential with a one-pass backward
  (:func:`block_log_masses`) (plain twin: ``PotentialMining.mined`` twice and
  ``PotentialMining.augmentation``, three products and two look-ups).
* :func:`potential_pool_terms` — potential with a bank: only the keys (read from ``L_aug``'s
  Gram matrix) and the bank rows in some block (one product ``q bank[U]^T``) are touched, the
  bank's cells drawn in layers of byte draws (plain twin: ``PotentialMining.mined`` over
  ``[k; bank]`` and ``PotentialMining.augmentation``; same law, other draws).
* :func:`pair_contrast` — potential's fast paths: ``in_batch_contrast`` of two views whose
  Gram matrix reads the partners' logits and whose backward corrects the masked entries in
  ``O(N d)`` (plain twin: ``in_batch_contrast((z1, z2), ...)``).
* :func:`band_logits` — Ring: the ring's logits read from the score matrix with a sparse
  backward through the ring's members only (plain twin: back-propagating through the gather).
"""

from __future__ import annotations

import math

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
            for rows in row_blocks(out):  # (out e) f: within an ulp of out (e f), no temporary
                out[rows].mul_(e[rows]).mul_(factor[0][rows])
        else:
            out.mul_(q)
        return out, None, None, None, None, None


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
) -> Tensor:
    """``[A]`` ``log sum_j w_ij e^{c_ij}`` for ``w_ij = M e^{beta c_ij} f_ij / sum_k e^{beta c_ik} f_ik``
    (mean 1 over the ``M`` negatives), in one fused pass; see :class:`_TiltedLogMass`.

    ``logits`` ``[A, S]`` (``-inf`` = not a negative); ``factor`` ``f`` (detached, 0 where the
    logits are ``-inf``; None = 1); ``tilt_grad``: let the gradient flow through the weights;
    ``shifted``: ``(max_j c_ij [A], e^{c - max_j c} [A, S])`` of the detached logits, exactly as
    computed here, when the caller already has them. Computes in the logits' dtype.
    """
    log_m = (
        num_negatives.to(logits.dtype).log()
        if isinstance(num_negatives, Tensor)
        else math.log(num_negatives)
    )
    f = None if factor is None else factor.detach().to(logits.dtype)
    return _TiltedLogMass.apply(logits, f, float(beta), log_m, bool(tilt_grad), shifted)


def _order_keys(x: Tensor) -> Tensor:
    """int32 keys ordered as the float32 values: the IEEE bit pattern, with the magnitude bits
    of negative numbers flipped (``-inf`` lowest, ``-0.0`` just below ``+0.0``, a NaN with the
    sign bit clear above ``+inf`` as in ``torch.topk``)."""
    bits = x.view(torch.int32)
    keys = bits >> 31  # -1 for negative numbers, else 0
    keys &= 0x7FFFFFFF
    keys ^= bits
    return keys


def _order_keys_np(x: np.ndarray) -> np.ndarray:
    """:func:`_order_keys` of a contiguous float32 array (through a tensor sharing its memory)."""
    return _order_keys(torch.from_numpy(x)).numpy()


# numpy's selection (introselect with SIMD partitioning in numpy >= 2) takes less than half the
# time of torch.topk per element on CPU (measured: 256 x 4096, top 409), but costs a few
# microseconds per row and per call: it wins on long rows and past a few thousand entries
_NUMPY_MIN_COLUMNS = 1024
_NUMPY_MIN_ELEMENTS = 1 << 12
_NUMPY_BLOCK = 1 << 17  # entries per block of rows: measured a few % faster than 1 << 18


def _numpy_selects(x: Tensor, k: int) -> bool:
    """Whether the CPU selection of the top ``k`` of each row of ``x`` goes through numpy."""
    return (
        x.device.type == "cpu"
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
    ``torch.topk`` for shorter ones. The members are those of ``x.topk(k)``; only which of
    several *equal* values is taken may differ (their logits, hence the loss, are the same).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        return x.topk(k, dim=1, sorted=False).indices
    x = x.detach().contiguous()
    rows, cols = x.shape
    if _numpy_selects(x, k):
        values = x.numpy()
        out = np.empty((rows, k), dtype=np.int64)
        step = max(1, _NUMPY_BLOCK // cols)  # keys and argpartition's int64 output in cache
        for start in range(0, rows, step):
            keys = _order_keys_np(values[start : start + step])
            out[start : start + step] = np.argpartition(keys, cols - k, axis=1)[:, cols - k :]
        return torch.from_numpy(out)
    blocks = row_blocks(x)  # ~1 MiB of keys per block
    if len(blocks) == 1:
        return _order_keys(x).topk(k, dim=1, sorted=False).indices
    out = torch.empty(rows, k, dtype=torch.long)
    for block in blocks:
        out[block] = _order_keys(x[block]).topk(k, dim=1, sorted=False).indices
    return out


def drop_top(values: Tensor, k: int) -> None:
    """Set the ``k`` largest entries of each row of ``values`` to ``-inf``, in place.

    On CPU, a block of rows at a time (in cache): the ``k``-th largest order key of each row
    by ``numpy.partition`` (values only, cheaper than an index selection), then every entry at
    or above it; a block where that is not exactly ``k`` entries in some row (equal values at
    the edge) takes the index selection instead.
    """
    cols = values.shape[1]
    small = values.numel() < _NUMPY_MIN_ELEMENTS  # numpy's fixed cost would dominate
    if small or values.device.type != "cpu" or values.dtype != torch.float32:
        values.scatter_(1, top_k_indices(values, k), float("-inf"))
        return
    array = values.detach().numpy()  # shares memory with values
    kth = cols - k
    for rows in row_blocks(values):
        keys = _order_keys_np(array[rows])
        top = keys >= np.partition(keys, kth, axis=1)[:, kth : kth + 1]
        block = values[rows]
        if bool((np.count_nonzero(top, axis=1) == k).all()):
            block.masked_fill_(torch.from_numpy(top), float("-inf"))
        else:
            block.scatter_(1, top_k_indices(block, k), float("-inf"))


def band_logits(
    anchors: Tensor, columns: Tensor, band: Tensor, indices: Tensor, temperature: float
) -> Tensor:
    """The ring's logits ``band`` (``[A, U]``, read from ``anchors @ columns.T / t`` at
    ``indices``; ``-inf`` = dropped) with a sparse backward to ``anchors`` and ``columns``."""
    return _BandLogits.apply(anchors, columns, band, indices, temperature)


class _BandLogits(torch.autograd.Function):
    """The ring's logits ``c_ij = <a_i, x_k> / t`` (``k = indices[i, j]``), read from the score
    matrix, with a sparse backward: the ring holds ~``rho_out`` of the candidates, so

        dL/da_i = (1/t) sum_j g_ij x_{k_ij}             (an ``embedding_bag``, no [A, C] matrix)
        dL/dx_k = (1/t) sum_{i,j: k_ij = k} g_ij a_i    (in-batch only; dense ``G^T a``)

    replaces the gather's dense ``[A, C]`` gradient and the two products of the score matrix's
    backward. Same gradient as back-propagating through ``logits = a @ x.T / t``; only the
    summation order differs. ``-inf`` entries (dropped top ``L``) get no gradient.
    """

    @staticmethod
    def forward(ctx, anchors, candidates, band, indices, temperature):  # type: ignore[override]
        ctx.save_for_backward(anchors, candidates, indices, torch.isfinite(band))
        ctx.temperature = temperature
        return band.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        anchors, candidates, indices, kept = ctx.saved_tensors
        g = torch.where(kept, grad, 0.0).div_(ctx.temperature)
        grad_anchors = grad_candidates = None
        if ctx.needs_input_grad[0]:
            grad_anchors = F.embedding_bag(
                indices, candidates, per_sample_weights=g.to(candidates.dtype), mode="sum"
            ).to(anchors.dtype)
        if ctx.needs_input_grad[1]:
            dense = g.new_zeros(indices.shape[0], candidates.shape[0]).scatter_(1, indices, g)
            grad_candidates = (dense.T @ anchors.to(g.dtype)).to(candidates.dtype)
        return grad_anchors, grad_candidates, None, None, None


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
    top = m.amax(dim=0)  # [C]
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
        ctx.save_for_backward(e, weights, torch.where(total > 0, total, 1.0))
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


def row_exponentials(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(max_j c_ij [A], e^{c - max_j c} [A, S])`` of the detached logits, exactly as
    :func:`tilted_log_mass` computes them (its ``shifted`` argument)."""
    with torch.no_grad():
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


def _row_range(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` ``[A, 1]`` of the min-max map ``(x - lo) / (hi - lo)`` over each row's
    masked entries (0 and 0 on a constant or empty row, as the plain form)."""
    lo = torch.where(mask, x, float("inf")).amin(dim=1, keepdim=True)
    hi = torch.where(mask, x, float("-inf")).amax(dim=1, keepdim=True)
    span = hi - lo
    ok = span > 0
    scale = torch.where(ok, 1.0 / torch.where(ok, span, 1.0), 0.0)
    return scale, torch.where(ok, -lo * scale, 0.0)


def unremix_mix(
    u: Tensor | None,
    d: Tensor | None,
    mask: Tensor,
    *,
    lambda_u: float,
    lambda_d: float,
    eps: float,
    density: bool,
) -> Tensor:
    """``lambda_u U~ + lambda_d D~' + eps`` ``[A, C]``, 0 off ``mask`` (``~``: min-max over each
    row's masked entries; ``D~' = 1 - D~`` when ``density``). ``u``: ``[A, C]`` (overwritten) or
    ``[1, C]``; ``d``: ``[1, C]``; None where the weight is 0. One buffer: ``U``'s per-row affine
    in place, ``D`` as a rank-1 update, the row constants in one pass."""
    a, c = mask.shape
    dtype = (u if u is not None else d).dtype
    const = torch.full((a, 1), eps, dtype=dtype, device=mask.device)
    if u is not None:
        scale, shift = _row_range(u.expand(a, c), mask)
        const += lambda_u * shift
        if u.shape[0] == a:
            mix = u.mul_(lambda_u * scale)
        else:
            mix = torch.outer(lambda_u * scale.squeeze(1), u[0])
    else:
        mix = torch.zeros(a, c, dtype=dtype, device=mask.device)
    if d is not None:
        scale, shift = _row_range(d.expand(a, c), mask)
        sign = -1.0 if density else 1.0
        const += lambda_d * (sign * shift + (1.0 if density else 0.0))
        mix.addr_(sign * lambda_d * scale.squeeze(1), d[0])
    return mix.add_(const).masked_fill_(~mask, 0.0)


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


# ---------------------------------------------------------------------------------------------
# potential, in-batch: one Gram matrix of [z1; z2] for every logit, the neighbour look-up and the
# keep probabilities of all three terms; draws from random bytes; the three negative masses in
# one pass over one exponential


def random_bytes(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Uniform random bytes (``uint8``) of ``shape``, cut from int64 words drawn over the full
    64-bit range: one call of the generator gives 8 bytes (``torch.rand`` gives one number)."""
    size = math.prod(shape)
    words = torch.empty(-(-size // 8), dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)
    return words.view(torch.uint8)[:size].view(shape)


def _threshold_bytes(p: Tensor) -> Tensor:
    """``floor(256 p)`` as ``uint8`` (255 at most: ``p = 1`` then keeps on every tie)."""
    return _to_bytes((p * 256.0).clamp_(max=255.0))


def _to_bytes(x: Tensor) -> Tensor:
    """``uint8`` of values in [0, 255] (truncated), through ``int32``: a direct float ->
    ``uint8`` conversion is several times slower on the CPU."""
    return x.to(torch.int32).to(torch.uint8)


def _find(mask: Tensor) -> Tensor:
    """Flat positions of the True entries of a contiguous bool tensor that is mostly False:
    the scan runs over 8-byte words, and only the words that hold a True are opened."""
    flat = mask.reshape(-1)
    whole = flat.numel() // 8 * 8
    words = flat[:whole].view(torch.int64)
    hit = words.nonzero().squeeze(1)
    word, byte = words[hit].view(torch.uint8).view(-1, 8).nonzero().unbind(1)
    at = torch.cat([hit[word] * 8 + byte, torch.arange(whole, flat.numel(), device=mask.device)])
    return at[flat[at]] if whole < flat.numel() else at


def _settle_ties(
    v: Tensor, need: Tensor, p_at, generator: torch.Generator | None
) -> tuple[Tensor, Tensor] | None:
    """The draws whose byte equals its threshold (probability 1/256 each): flat positions and
    whether each keeps, kept with probability ``256 p - floor(256 p)`` by one float32 uniform
    (``p_at(positions)`` gives ``256 p`` there). Then ``P(keep) = floor(256 p) / 256 +
    (256 p - floor(256 p)) / 256 = p``."""
    at = _find(v == need)
    if at.numel() == 0:
        return None
    rest = p_at(at) - need.view(-1)[at].to(torch.float64)
    u = torch.rand(at.shape, generator=generator, device=v.device)
    return at, u < rest


_DRAW_BLOCK = 1 << 22  # entries per block of rows of bernoulli_bytes


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


def bernoulli_draws(need: Tensor, p256_at, generator: torch.Generator | None = None) -> Tensor:
    """One Bernoulli draw per entry (``uint8`` 0/1) from the thresholds ``need = floor(256 p)``
    (``uint8``): a random byte ``v < need`` keeps, ``v > need`` drops, a tie is settled by a
    uniform (:func:`_settle_ties`; ``p256_at(flat positions)`` gives ``256 p`` there). Draw
    order: the bytes (row-major), then one uniform per tie."""
    v = random_bytes(tuple(need.shape), generator, need.device)
    kept = (v < need).view(torch.uint8)
    ties = _settle_ties(v, need, p256_at, generator)
    if ties is not None:
        kept.view(-1)[ties[0]] = ties[1].view(torch.uint8)
    return kept


def binomial_bytes(p: Tensor, trials: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``[A, C]`` counts ``Binomial(trials_j, p_ij)`` in ``p``'s dtype; see
    :func:`binomial_draws`. (Plain twin: one uniform per grid cell summed per column; same law,
    other draws.)"""
    a = p.shape[0]

    def p256_at(column: Tensor, anchor: Tensor) -> Tensor:
        return p[anchor, column].to(torch.float64) * 256.0

    counts = binomial_draws(_threshold_bytes(p).T.contiguous(), trials, p256_at, generator)
    return torch.empty(a, p.shape[1], dtype=p.dtype, device=p.device).copy_(counts.T)


def binomial_draws(
    need_by_column: Tensor, trials: Tensor, p256_at, generator: torch.Generator | None = None
) -> Tensor:
    """``[C, A]`` counts (``uint8``, or ``int32`` past 255 trials) ``Binomial(trials_j, p_ij)``:
    ``trials_j`` independent draws of :func:`bernoulli_draws` per entry of column ``j``, from
    the thresholds ``floor(256 p)`` with the columns as rows (``need_by_column`` ``[C, A]``,
    ``uint8``; ``p256_at(column, anchor)`` gives ``256 p`` there).

    Trial ``r`` of column ``j`` is a row of ``A`` bytes (one per anchor). The columns are taken
    in the stable ascending order of ``trials``, each with its ``trials_j`` rows in a row,
    ``[sum_j trials_j, A]`` bytes in all, so that the columns with the same count ``m`` form one
    block ``[C_m, m, A]`` summed at once; then one uniform per tie, in the order of the bytes."""
    c, a = need_by_column.shape
    device = need_by_column.device
    trials = trials.to(device)
    order = torch.argsort(trials, stable=True)
    sorted_trials = trials[order]
    values, sizes = torch.unique_consecutive(sorted_trials, return_counts=True)
    key = order.repeat_interleave(sorted_trials)  # the column of each row of bytes
    need = need_by_column.index_select(0, key)  # [G, A]
    v = random_bytes(tuple(need.shape), generator, device)
    wide = bool(values.numel()) and int(values[-1]) > 255  # a uint8 sum holds 255 trials
    count_dtype = torch.int32 if wide else torch.uint8
    kept = (v < need).view(torch.uint8)
    below = torch.empty(c, a, dtype=count_dtype, device=device)
    start = offset = 0
    for m, size in zip(values.tolist(), sizes.tolist()):
        out = below[start : start + size]
        if m == 0:
            out.zero_()
        elif m == 1:
            out.copy_(kept[offset : offset + size])
        else:
            torch.sum(kept[offset : offset + m * size].view(size, m, a), dim=1, out=out)
        start += size
        offset += m * size
    counts = torch.empty_like(below).index_copy_(0, order, below)  # back in column order
    ties = _settle_ties(v, need, lambda at: p256_at(key[at // a], at % a), generator)
    if ties is not None:
        at, keep = ties
        counts.view(-1).index_add_(0, key[at // a] * a + at % a, keep.to(count_dtype))
    return counts


class _BlockLogMasses(torch.autograd.Function):
    """``log sum_j w_ij e^{c_ij}`` for several weight matrices ``w`` (no gradient), each on a
    block of rows and columns of one logits matrix ``c``, and logits read at given places of
    ``c`` (``c[r0:r1, c0:].gather(1, index)``: mined positives): one shifted exponential
    ``e = e^{c - max_j c}`` (the maximum of the whole row) serves every block; the products
    ``w e`` give the sums and are saved (not ``e`` and ``w``), so the backward pass
    ``dc = sum_blocks (w e) g / R`` plus the read logits' gradients fills one buffer in one pass
    (no zero-filled ``[A, S]`` gradient per read or block). The caller guarantees that no kept entry
    lies so far below its row's maximum that ``e`` underflows; a row of a block with nothing
    kept is ``-inf`` with a zero gradient."""

    @staticmethod
    def forward(ctx, logits, blocks, reads, *tensors):  # type: ignore[override]
        weights, indices = tensors[: len(blocks)], tensors[len(blocks) :]
        row_max = logits.amax(dim=1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        e = (logits - row_max).exp_()
        outs, products, totals = [], [], []
        for (r0, r1, c0, c1), w in zip(blocks, weights):
            product = e[r0:r1, c0:c1] * w  # w e: the sum here, the gradient's shape later
            total = product.sum(dim=1)
            outs.append(row_max[r0:r1, 0] + total.log())
            products.append(product)
            totals.append(torch.where(total > 0, total, 1.0))
        for (r0, c0), index in zip(reads, indices):
            outs.append(logits[r0 : r0 + index.shape[0], c0:].gather(1, index))
        ctx.blocks, ctx.reads, ctx.shape = blocks, reads, logits.shape
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
            scale = (g / totals[b]).unsqueeze(1)
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
        return (out, None, None, *([None] * (k + len(indices))))


def block_log_masses(
    logits: Tensor,
    blocks: list[tuple[int, int, int, int]],
    weights: list[Tensor],
    reads: list[tuple[int, int, Tensor]] = (),
) -> tuple[Tensor, ...]:
    """``log sum_j w_ij e^{c_ij}`` per row of each block ``(r0, r1, c0, c1)`` of ``logits``
    with its detached weights ``w >= 0`` (``-inf`` logits only where ``w = 0``), then the
    logits ``logits[r0:, c0:].gather(1, index)`` of each read ``(r0, c0, index)`` (distinct
    columns per row); see :class:`_BlockLogMasses`. (Plain twin:
    ``weighted_log_mass(logits[r0:r1, c0:c1], w)`` and the gather.)"""
    ws = [w.detach().to(logits.dtype) for w in weights]
    spots = tuple((r0, c0) for r0, c0, _ in reads)
    return _BlockLogMasses.apply(
        logits, tuple(blocks), spots, *ws, *[index for _, _, index in reads]
    )


def _kernel(
    values: Tensor, shift: Tensor, coef: float, *, scale: float = 1.0, cap: float = 1.0
) -> Tensor:
    """``min(cap, scale exp(coef (v - shift_r)^2))`` per entry of ``values`` ``[R, S]`` (row
    shifts ``shift`` ``[R]``, ``coef <= 0``), 0 where ``values`` is ``-inf`` (no negative): the
    square, the factor and ``log scale`` in one ``addcmul`` pass."""
    if coef == 0.0:
        keep = torch.tensor(min(cap, scale), dtype=values.dtype, device=values.device)
        return torch.where(torch.isinf(values), 0.0, keep)  # (a float scalar: float32 only)
    x = values - shift.unsqueeze(1)
    base = torch.tensor(math.log(scale), dtype=x.dtype, device=x.device)
    return torch.addcmul(base, x, x, value=coef, out=x).exp_().clamp_(max=cap)


def _kernel_at(values: Tensor, shift: Tensor, coef: float, cap: float) -> Tensor:
    """:func:`_kernel` with ``scale = 1`` at a few entries, in float64 (the ties' ``p``)."""
    x = values.to(torch.float64) - shift.to(torch.float64)
    return torch.where(torch.isinf(x), 0.0, (coef * x * x).exp().clamp(max=cap))


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
        two = z.shape[0]
        idx = torch.arange(two, device=z.device)
        partner = idx.roll(two // 2)
        logits = ((z / temperature) @ z.T).to(z.dtype)  # autocast: promote, as the plain form
        pos = logits[idx, partner]  # a copy
        logits[idx, idx] = float("-inf")
        logits[idx, partner] = float("-inf")
        ctx.temperature = temperature
        ctx.save_for_backward(z)
        return logits, pos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logits, grad_pos):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        two = z.shape[0]
        idx = torch.arange(two, device=z.device)
        partner = idx.roll(two // 2)
        # dz = (M + M^T) z with M = dG, its masked entries replaced: the diagonal by 0, the
        # partners by their logits' gradients. Two products with dG as it came (a transposed
        # operand costs BLAS nothing; an explicit M + M^T pass costs about a product on a CPU),
        # then the replaced entries' share, O(N d). (An unused output's gradient arrives as
        # zeros: autograd materialises it.)
        with torch.autocast(z.device.type, enabled=False):  # z's dtype, whatever the caller's
            m = grad_logits.to(z.dtype)
            out = torch.mm(m, z).addmm_(m.T, z)
            out.sub_(z * (2.0 * m[idx, idx]).unsqueeze(1))
            c = grad_pos.to(z.dtype) - m[idx, partner]
            out.add_(z[partner] * (c + c[partner]).unsqueeze(1))
        return out / ctx.temperature, None


def pair_contrast(z1: Tensor, z2: Tensor, *, temperature: float):
    """``in_batch_contrast((z1, z2), temperature=t, normalize=True)`` with its logits and the
    partners' logits from :class:`_PairGram` (no masking pass in the backward, no einsum for
    the partners). Same fields, same values."""
    from hardneg.contrast import ContrastSet, compute_dtype

    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).to(compute_dtype(z1, z2)), dim=-1)
    logits, pos = _PairGram.apply(z, float(temperature))
    idx = torch.arange(2 * n, device=z.device)
    partner = idx.roll(n).unsqueeze(1)
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[idx, idx] = False
    mask[idx, partner[:, 0]] = False
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
        negative_mask=mask,
        num_negatives=2 * n - 2,
        temperature=float(temperature),
        normalized=True,
    )


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
    on the same blocks (same similarity and centre; ``select_on='cosine'``). The kept cells per
    column are ``Binomial(m_j, pi_ij)`` (:func:`binomial_bytes`; ``m_j`` the column's cells,
    ``m pi`` in expected mode), and the three negative masses come from one exponential
    (:func:`block_log_masses`). Returns the terms of ``strategy.terms`` with each mass attached
    (``fast_log_mass``)."""
    from hardneg.strategies.potential import _with_cells

    z1, z2 = inputs.z1, inputs.z2
    n, t = z1.shape[0], inputs.temperature
    aug = pair_contrast(z1, z2, temperature=t)
    g = aug.negative_logits
    zn = aug.anchors
    bernoulli = strategy.sample == "bernoulli"
    clamp = strategy.clamp
    with torch.no_grad():
        gd = g.detach()
        # the kernel exp(-a (s - s+ - b)^2) on s / t: coefficient -a t^2, shift (s+ + b) / t
        coef = -strategy.a * t * t
        shift = aug.positive_logits.detach()[:, 0] + strategy.b / t
        rows = torch.arange(n, device=g.device)
        num = min(strategy.num_neighbors, n - 1)
        # the keys' neighbours: z2 among z2 (direction 1), z1 among z1 (direction 2); the
        # Gram's diagonal is -inf, so a key is not its own neighbour
        nb1 = top_k_indices(gd[n:, n:], num) if num > 0 else rows.new_zeros(n, 0)
        nb2 = top_k_indices(gd[:n, :n], num) if num > 0 else rows.new_zeros(n, 0)
        blocks1 = torch.cat([rows.unsqueeze(1), nb1.to(rows.device)], dim=1)
        blocks2 = torch.cat([rows.unsqueeze(1), nb2.to(rows.device)], dim=1)
        own = torch.zeros(n, 2 * n, dtype=torch.bool, device=g.device)
        own[:, :n].scatter_(1, blocks1, True)
        own[:, n:].scatter_(1, blocks2, True)
        trials = torch.cat(
            [
                torch.bincount(blocks1.reshape(-1), minlength=n),
                torch.bincount(blocks2.reshape(-1), minlength=n),
            ]
        )
        multiplicity = torch.where(own, 0.0, trials.to(g.dtype))
        use_aug = strategy.aug_weight > 0
        raw = strategy.select_on == "raw"
        if use_aug and raw:  # the code's kernel on unnormalised dot products
            x = torch.cat([z1, z2]).detach().to(g.dtype)
            aug_values = x @ x.T
            aug_shift, aug_coef = (x * x.roll(n, dims=0)).sum(dim=1) + strategy.b, -strategy.a
            aug_values.masked_fill_(~aug.mask(), float("-inf"))
        else:
            aug_values, aug_shift, aug_coef = gd, shift, coef
        # the mined terms read L_aug's kernel on the same blocks (select_on='cosine')
        shared = use_aug and not raw
        if bernoulli:
            cap = min(255.0, 256.0 * clamp)
            kept_aug = need_aug = None
            if use_aug:
                need_aug = _kernel(aug_values, aug_shift, aug_coef, scale=256.0, cap=cap)
                need_aug = _to_bytes(need_aug)
            if shared:
                need_by_column = torch.cat([need_aug[:n, n:].T, need_aug[n:, :n].T])
            else:
                need_by_column = torch.cat(
                    [
                        _kernel(gd[:n, n:], shift[:n], coef, scale=256.0, cap=cap).T,
                        _kernel(gd[n:, :n], shift[n:], coef, scale=256.0, cap=cap).T,
                    ]
                )
                need_by_column = _to_bytes(need_by_column)
            # [2N, N]: direction 1's columns, then direction 2's; 0 on each anchor's own block
            anchor_of = rows.repeat_interleave(num + 1)
            need_by_column[blocks1.reshape(-1), anchor_of] = 0
            need_by_column[blocks2.reshape(-1) + n, anchor_of] = 0

            def mined_p256(column: Tensor, anchor: Tensor) -> Tensor:
                second = column >= n  # direction 2: anchor z2_i (row N + i), column z1_c
                r = torch.where(second, anchor + n, anchor)
                c = torch.where(second, column - n, column + n)
                p256 = 256.0 * _kernel_at(gd.reshape(-1)[r * 2 * n + c], shift[r], coef, clamp)
                return p256.masked_fill_(own[anchor, column], 0.0)  # own block: no negative

            by_column = binomial_draws(need_by_column, trials, mined_p256, context.generator)
            counts = torch.empty(n, 2 * n, dtype=g.dtype, device=g.device)
            counts[:, :n].copy_(by_column[:n].T)
            counts[:, n:].copy_(by_column[n:].T)
            if use_aug:
                flat, width = aug_values.reshape(-1), aug_values.shape[1]

                def aug_p256(at: Tensor) -> Tensor:
                    return 256.0 * _kernel_at(flat[at], aug_shift[at // width], aug_coef, clamp)

                kept_aug = bernoulli_draws(need_aug, aug_p256, context.generator)
        else:
            pi_aug = _kernel(aug_values, aug_shift, aug_coef, cap=clamp) if use_aug else None
            if shared:
                mined_pi = torch.cat([pi_aug[:n, n:], pi_aug[n:, :n]], dim=1)
            else:
                mined_pi = torch.cat(
                    [
                        _kernel(gd[:n, n:], shift[:n], coef, cap=clamp),
                        _kernel(gd[n:, :n], shift[n:], coef, cap=clamp),
                    ],
                    dim=1,
                )
            counts = mined_pi.mul_(multiplicity)  # 0 on each anchor's own block
            kept_aug = pi_aug
    blocks = [(0, n, n, 2 * n), (n, 2 * n, 0, n)]
    weights = [counts[:, :n], counts[:, n:]]
    if kept_aug is not None:
        blocks.append((0, 2 * n, 0, 2 * n))
        weights.append(kept_aug)
    reads = []
    if strategy.weighting == "hard" and num > 0:  # the mined positives' logits, read from G
        reads = [(0, n, nb1), (n, 0, nb2)]
    masses = block_log_masses(g, blocks, weights, reads)
    extra = masses[len(blocks) :] if reads else (None, None)
    out = []
    for d, (r0, c0), nb, h in ((0, (0, n), nb1, inputs.h1), (1, (n, 0), nb2, inputs.h2)):
        negative = ~own[:, d * n : (d + 1) * n]
        anchors, columns = zn[r0 : r0 + n], zn[c0 : c0 + n]
        mined = _with_cells(
            aug,
            anchors=anchors,
            columns=columns,
            positives=columns.unsqueeze(1),
            positive_logits=aug.positive_logits[r0 : r0 + n],
            positive_weight=aug.positive_weight[r0 : r0 + n],
            positive_index=rows.unsqueeze(1),
            negative_logits=g[r0 : r0 + n, c0 : c0 + n].masked_fill(~negative, float("-inf")),
            negative_mask=negative,
            num_negatives=n - 1 - num,
            multiplicity=multiplicity[:, d * n : (d + 1) * n],
            neighbours=nb,
            anchor_features=h,
            fast_log_mass=masses[d],
            fast_extra_positive_logits=extra[d],
        )
        out.append((0.5, mined, "mined"))
    if kept_aug is not None:
        out.append((strategy.aug_weight, _with_cells(aug, fast_log_mass=masses[2]), "aug"))
    return out


def _safe_logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """``log(e^a + e^b)`` per entry, ``-inf`` with a zero gradient (not NaN) where both are."""
    kept = torch.isfinite(a) | torch.isfinite(b)
    out = torch.logaddexp(torch.where(kept, a, 0.0), torch.where(kept, b, 0.0))
    return out.masked_fill(~kept, float("-inf"))


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
    keys, read from ``L_aug``'s Gram matrix ``G`` of ``[q; k]`` (its block ``G[:N, N:]``, whose
    diagonal, the partners, is already ``-inf``), and the ``U`` bank rows that are some key's
    neighbour (a bank row in no block is no negative: its probability and draw are never
    needed), through one product ``q bank[U]^T`` ``[N, U]``. Per column ``u`` of ``U`` with
    ``m_u`` cells, anchor ``i`` draws ``Binomial(m_u - own_iu, pi_iu)`` (its own block's cell is a
    positive; ``exclude_index`` drops the column) as one Bernoulli layer where ``own_iu = 0``
    (:func:`bernoulli_draws`) plus ``Binomial(m_u - 1, pi_iu)`` (:func:`binomial_draws`); the keys
    one Bernoulli each. Draw order: the keys (row-major), the bank's first layer, its other
    layers, then ``L_aug``'s cells (the in-batch order of :func:`potential_in_batch_terms`).
    The masses: the keys' and ``L_aug``'s from one exponential of ``G``, the bank's with the
    mined positives' logits from one of ``q bank[U]^T`` (:func:`block_log_masses`), summed per
    anchor. Returns the terms of ``strategy.terms`` with each mass attached."""
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
        lookup = key @ bank.T
        if exclude is not None:
            exclude = exclude.to(device=g.device, dtype=torch.long)
            lookup[rows, exclude] = float("-inf")  # nor its sample's own bank entry
        num = min(strategy.num_neighbors, bank.shape[0] - int(exclude is not None))
        nb = top_k_indices(lookup, num).to(g.device) if num > 0 else rows.new_zeros(n, 0)
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
        if use_aug and raw:  # the code's kernel on unnormalised dot products
            x = torch.cat([q, k]).detach().to(g.dtype)
            aug_values = x @ x.T
            aug_shift, aug_coef = (x * x.roll(n, dims=0)).sum(dim=1) + strategy.b, -strategy.a
            aug_values.masked_fill_(~aug.mask(), float("-inf"))
        shared = use_aug and not raw  # the keys' kernel is L_aug's on the block G[:N, N:]
        kept_aug = None
        if bernoulli:
            cap = min(255.0, 256.0 * clamp)
            need_aug = None
            if use_aug:
                need_aug = _to_bytes(_kernel(aug_values, aug_shift, aug_coef, scale=256.0, cap=cap))
            if shared:
                need_keys = need_aug[:n, n:].contiguous()
            else:
                need_keys = _to_bytes(_kernel(gd[:n, n:], shift[:n], coef, scale=256.0, cap=cap))

            def keys_p256(at: Tensor) -> Tensor:
                r, c = at // n, at % n
                return 256.0 * _kernel_at(gd[r, c + n], shift[r], coef, clamp)

            counts_keys = bernoulli_draws(need_keys, keys_p256, context.generator)
            need = _to_bytes(_kernel(pd, shift[:n], coef, scale=256.0, cap=cap))  # [N, U]
            if gone is not None:
                need[rows[gone >= 0], gone[gone >= 0]] = 0

            def pool_p256(width: int, first: bool):
                def p256_at(at: Tensor) -> Tensor:  # at: flat positions in [N, width]
                    r, c = at // width, at % width
                    p256 = 256.0 * _kernel_at(pd[r, c], shift[r], coef, clamp)
                    if gone is not None:
                        p256.masked_fill_(gone[r] == c, 0.0)
                    return p256.masked_fill_(own[r, c], 0.0) if first else p256

                return p256_at

            # layer r draws one cell of each column with more than r cells; the first layer
            # skips each anchor's own block (that cell is a positive), the others do not
            later = [(r, int((trials > r).sum())) for r in range(1, int(trials[0]) if u else 1)]
            later_need = [need[:, :width].contiguous() for _, width in later]
            need.masked_fill_(own, 0)
            counts_pool = bernoulli_draws(need, pool_p256(u, True), context.generator)
            counts_pool = counts_pool.to(g.dtype)
            for (_, width), need_r in zip(later, later_need):
                kept = bernoulli_draws(need_r, pool_p256(width, False), context.generator)
                counts_pool[:, :width] += kept
            if use_aug:
                flat, width = aug_values.reshape(-1), aug_values.shape[1]

                def aug_p256(at: Tensor) -> Tensor:
                    return 256.0 * _kernel_at(flat[at], aug_shift[at // width], aug_coef, clamp)

                kept_aug = bernoulli_draws(need_aug, aug_p256, context.generator)
            counts_keys = counts_keys.to(g.dtype)
        else:
            pi_aug = _kernel(aug_values, aug_shift, aug_coef, cap=clamp) if use_aug else None
            if shared:
                counts_keys = pi_aug[:n, n:].clone()
            else:
                counts_keys = _kernel(gd[:n, n:], shift[:n], coef, cap=clamp)
            counts_pool = _kernel(pd, shift[:n], coef, cap=clamp)
            counts_pool.mul_(trials.to(pd.dtype) - own.to(pd.dtype))
            if gone is not None:
                counts_pool[rows[gone >= 0], gone[gone >= 0]] = 0.0
            kept_aug = pi_aug
    blocks, weights = [(0, n, n, 2 * n)], [counts_keys]
    if kept_aug is not None:
        blocks.append((0, 2 * n, 0, 2 * n))
        weights.append(kept_aug)
    key_masses = block_log_masses(g, blocks, weights)
    hard = strategy.weighting == "hard" and num > 0
    if u > 0:
        reads = [(0, 0, nbu)] if hard else []
        pool_masses = block_log_masses(p, [(0, n, 0, u)], [counts_pool], reads)
        mass = _safe_logaddexp(key_masses[0], pool_masses[0])
    else:  # K = 0: no bank row holds a cell
        mass = key_masses[0]
    with torch.no_grad():  # the columns [k; bank[U]] of the contrast set, their cells per anchor
        multiplicity = torch.empty(n, n + u, dtype=g.dtype, device=g.device)
        multiplicity[:, :n] = 1.0
        multiplicity[rows, rows] = 0.0  # the own key is the positive
        multiplicity[:, n:] = trials.to(g.dtype)
        # the own block's cell is no negative; nor is the excluded bank entry
        off_rows, off_cols = rows.repeat_interleave(nbu.shape[1]), n + nbu.reshape(-1)
        multiplicity[off_rows, off_cols] -= 1.0
        if gone is not None:
            off_rows = torch.cat([off_rows, rows[gone >= 0]])
            off_cols = torch.cat([off_cols, n + gone[gone >= 0]])
            multiplicity[rows[gone >= 0], n + gone[gone >= 0]] = 0.0
        dropped = multiplicity[off_rows, off_cols] == 0
        off_rows, off_cols = off_rows[dropped], off_cols[dropped]
        negative = multiplicity > 0
    # the partners (own keys) are -inf in G already; the few dropped bank entries set here
    logits = torch.cat([g[:n, n:], p], dim=1)
    minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    logits.index_put_((off_rows, off_cols), minus_inf)
    column_index = torch.cat([rows, n + held])  # in the plain form's [k; bank]
    columns = torch.cat([zn[n:], held_rows.to(zn.dtype)])
    mined = _with_cells(
        aug,
        anchors=zn[:n],
        columns=columns,
        positives=zn[n:].unsqueeze(1),
        positive_logits=aug.positive_logits[:n],
        positive_weight=aug.positive_weight[:n],
        positive_index=rows.unsqueeze(1),
        negative_logits=logits,
        negative_mask=negative,
        num_negatives=negative.sum(dim=1),
        multiplicity=multiplicity,
        neighbours=nbu + n,
        column_index=column_index,
        anchor_features=inputs.h1,
        fast_log_mass=mass,
        fast_extra_positive_logits=pool_masses[1] if hard else None,
    )
    out = [(1.0, mined, "mined")]
    if kept_aug is not None:
        out.append((strategy.aug_weight, _with_cells(aug, fast_log_mass=key_masses[1]), "aug"))
    return out
