"""Potential-sample mining (Dong, Long, Li, arXiv 2311.00358, 2023, "Rethinking Samples Selection
for Contrastive Learning: Mining of Potential Samples"), as in the authors' code (class ``PSM``,
built on SNCLR: ``soft_constrastive``, ``hard_contrastive`` and ``NNMemoryBankModuleNormMultiKeep``).

Notation: ``q_i`` are online outputs after the predictor, ``k_i`` the positive keys (momentum
outputs of the other view), both L2-normalised here; ``s(x, y)`` is the cosine; ``T`` the
temperature; ``K`` the number of mined neighbours. ``n_j1..n_jK`` are the ``K`` nearest neighbours
of ``k_j`` (by cosine) in a support set, and ``B_j = {k_j, n_j1, ..., n_jK}`` is sample ``j``'s block.

Mined loss, one direction (``soft_constrastive``)::

    l_i   = sum_{p in B_i} w_ip * (log D_i - s(q_i, p)/T)
    D_i   = sum_{p in B_i} e^{s(q_i, p)/T}  +  sum_{j != i} sum_{n in B_j} m_in * e^{s(q_i, n)/T}
    m_in  ~ Bernoulli(pi_in),   pi_in = min(clamp, exp(-a * (s(q_i, n) - s+_i - b)^2)),
    s+_i  = s(q_i, k_i)                                   (SimANS kernel; no gradient through m)
    L_mined(q; k) = mean_i l_i

The own block holds the positives, every other block (a key and its neighbours) the candidate
negatives; a negative about as similar to the anchor as the positive (``b = 0``) is kept with
probability up to ``clamp``, far easier or far harder ones are mostly dropped. Positive weights:
``weighting='hard'``: ``w_ip = 1``; ``weighting='soft'``: ``w_{i,k_i} = 1`` and
``w_{i,n_im} = softmax_m s(g_i, n_im)`` (temperature 1), with ``g_i`` the online projection *before*
the predictor (forward kwarg ``proj1``; ``q_i`` itself when not given). The weights multiply the
log-terms only; ``D_i`` always sums the positives unweighted, as in the code.

Augmentation loss (``hard_contrastive``): SimCLR over the ``2N`` rows ``r`` of ``[q; k]``, each
with its partner ``r'`` (``q_i <-> k_i``) as positive and the other ``2N - 2`` rows as candidate
negatives, selected by the same kernel around ``sigma(r, r')``::

    l_r = log( e^{s(r, r')/T} + sum_{u != r, r'} m_ru e^{s(r, u)/T} ) - s(r, r')/T
    m_ru ~ Bernoulli(min(clamp, exp(-a * (sigma(r, u) - sigma(r, r') - b)^2)))
    L_aug(q, k) = mean_r l_r

with ``sigma`` the cosine (``select_on='cosine'``, default) or the raw dot product of the
unnormalised inputs (``select_on='raw'``, what ``hard_contrastive`` does; ``select_on`` only
affects ``L_aug``: the code applies the kernel of ``L_mined`` to normalised vectors).
``aug_pairing='broadcast'`` reproduces a shape bug of ``hard_contrastive``:
``L_aug = mean_{r, c} [log(e^{s(r, r')/T} + Ng_c) - s(r, r')/T]`` over all pairs of rows, with
``Ng_c`` the selected negative mass of row ``c`` (see the list below); ``'matched'`` (default) is
the SimCLR loss above. ``select_on='raw', aug_pairing='broadcast', weighting='hard'`` is the code.

The full objective of the code (``PSM.forward``) is
``L = 1/2 [L_mined(q1; k2) + L_mined(q2; k1)] + lambda * 1/2 [L_aug(q1, k2) + L_aug(q2, k1)]``.

Call forms (shapes: ``N`` samples, ``d`` dims, a pool of ``Q`` rows):

* ``loss(q, k, negatives=pool)``: one direction, ``L_mined(q; k) + lambda * L_aug(q, k)``,
  ``q, k: [N, d]``, ``pool: [Q, d]`` (detached). The pool is the **support set** of the neighbour
  lookup (in the code a FIFO of momentum keys of view 2, looked up *before* the current batch is
  enqueued; both directions use the same, pre-enqueue bank). With ``pool_as_negatives=True`` every
  pool row except the anchor's own neighbours is also a candidate negative of every anchor (same
  kernel; not in the code). An explicit ``support=[S, d]`` overrides ``negatives`` as the support
  set. A MoCo-style framework that calls ``loss(q1, k2, negatives=queue)`` and
  ``loss(q2, k1, negatives=queue)`` (q from the online branch with predictor, k from the momentum
  branch), averages the two and then enqueues ``k2`` gets exactly ``L`` above; with
  ``select_on='raw', aug_pairing='broadcast'`` it matched a (private, uncommitted) transcription of
  the authors' code in value and gradients to 1e-6, hard and soft weighting, same draws.
* ``loss(z1, z2)``: in-batch, symmetric:
  ``1/2 [L_mined(z1; z2) + L_mined(z2; z1)] + lambda * 1/2 [L_aug(z1, z2) + L_aug(z2, z1)]``
  (drawn: one ``L_aug`` selection serves both directions, see Randomness).
  With no bank the support set of ``L_mined(q; k)`` is the other keys of the batch: the
  neighbours of ``k_j`` are the ``K`` keys ``k_l, l != j`` closest to it, and a candidate that is
  one of anchor ``i``'s own positives (its key, or a key among its neighbours) is not a negative
  of ``i`` (our rule: otherwise ``k_i`` would be both the positive and a negative of ``q_i``
  whenever ``k_i`` is a neighbour of another key).

``K`` is capped at the size of the support set (``N - 1`` in-batch), so any batch size works;
``K = 0`` gives blocks ``{k_j}`` and ``L_mined`` is an InfoNCE over ``(q, k)`` with selected
negatives (with ``a = 0, clamp = 1, lambda = 0`` exactly InfoNCE). ``lambda = 0`` skips ``L_aug``.

How it is computed. A grid cell is a (anchor, block member) pair, but ``D_i`` only needs, for
every distinct candidate ``c``, the number of its cells that are kept: with ``S`` the logits
``s/T``, ``D_i = sum_c w_ic e^{S_ic}`` with ``w_ic`` = (1 if ``c`` is a positive of ``i``) +
(kept negative cells of ``c`` in row ``i``). So the grid ``[N, N(K+1)]`` is never built:

* In-batch the block members are keys of the batch, key ``l`` sits in ``mult_l = 1 + #{j: l is
  a neighbour of k_j}`` blocks, and all of them are other blocks of an anchor ``i`` whose own
  block does not hold ``l``; ``pi_il`` depends on ``(i, l)`` only. Hence
  ``w_il = 1`` for ``l in B_i`` and otherwise ``w_il = count_il ~ Binomial(mult_l, pi_il)``
  (``'expected'``: ``mult_l * pi_il``), over ``[N, N]`` instead of ``[N, N(K+1)]``. One matmul
  of ``[z1; z2]`` gives every logit: its off-diagonal blocks are ``q @ k^T`` of the two
  directions, its diagonal blocks the neighbour lookups, the whole matrix the cosines of
  ``L_aug`` (whose two directions have the same rows in another order), and the kernel
  ``pi`` of the cosine ``L_aug`` is that of ``L_mined`` on the off-diagonal blocks. The weights
  of both ``L_mined`` live in one ``[N, 2N]`` layout (column ``l``: key ``z2_l`` of anchor
  ``z1_i``; column ``N + l``: key ``z1_l`` of anchor ``z2_i``). All ``D`` (both ``L_mined``,
  ``L_aug``) are weighted row sums of one exponential ``e^S`` (``S = cos / T``, unshifted: the
  matmul keeps ``d`` columns), which stays a normal float32 for ``T >= 0.03`` (``|S| <= 34``);
  below, each sum is its own log-sum-exp. Only the weighted exponentials are kept for the
  backward (``dS = sum_s (g_s / D_s) W_s e^S``, then ``dx = (dS + dS^T) x / T`` for the rows
  ``x`` of ``[z1; z2]``). On the CPU (float32, no autocast) the logits, ``dS`` and the
  temporaries of the selection live in buffers the module keeps between calls (a fresh large
  tensor is paged in afresh on every call, which cost as much as its pass); none of them is
  saved for the backward.
* With a bank, the columns are the ``N`` keys and the bank rows that are somebody's neighbour
  (all bank rows with ``pool_as_negatives``), weighted by their kept cells (``'expected'``: the
  sum of ``pi`` over their cells in other blocks); a bank row that is an own neighbour and
  sits in other blocks too has weight ``1 + kept``, as in the code. The positive logits are
  read off the same logits matrix (so that they match the terms inside ``D``).

Randomness: ``sample='bernoulli'`` keeps a negative cell with probability ``pi``, and
``sample='expected'`` uses ``pi`` as a deterministic weight of each cell (the expectation of
``D_i``), with no draw. No gradient flows through the selection or ``pi``; the neighbour lookup
runs under ``no_grad`` (in-batch, the neighbour vectors are keys and carry their gradient like
the keys do). The draws of the generator, in order:

* With a bank (the authors' set-up; unchanged): ``u = torch.rand(grid, generator=generator)``
  over the full mined grid ``[N, N(K+1) + Q']`` (column ``j(K+1) + m`` is member ``m`` of block
  ``j``, then the ``Q'`` pool columns when ``pool_as_negatives``; masked cells draw too), a cell
  kept when ``u < pi``; then ``torch.rand`` over the ``L_aug`` grid ``[2N, 2N]`` of ``[q; k]``.
* In-batch (our construction, so the layout is ours; the law of every selection is that of
  independent Bernoulli cells): first the counts ``count_il`` of both ``L_mined`` directions,
  drawn with the ``2N`` columns of their ``[N, 2N]`` layout (above) as rows: one run of random
  bytes ``[sum_l mult_l, N]``, the columns in the stable ascending order of ``mult``, each with
  its ``mult_l`` rows in a row (a row holds one Bernoulli trial of every anchor), then one
  ``torch.rand`` uniform per tie (below), in the row-major order of the bytes; then bytes
  ``[2N, 2N]`` for the one selection of ``L_aug`` over the rows ``[z1; z2]``, then one uniform
  per tie. (Before, the mined bytes were laid out ``[m, N, C_m]`` per distinct ``m`` with the
  anchors as rows, and the ties of a cell drew in rounds: same law, other stream.)
  ``L_aug(z2, z1)`` has the rows, partners, candidates and kernel of ``L_aug(z1, z2)`` in
  another order, so one selection serves both (as the expected mode evaluates it once): the two
  are then equal, with the expectation of two independent selections and the variance of one
  (before, each direction drew its own). A trial with probability ``p`` keeps when its
  byte ``v < floor(256 p)``, drops when ``v > floor(256 p)`` and on a tie (probability 1/256)
  keeps when a ``torch.rand`` uniform is below ``256 p - floor(256 p)``: exactly ``p`` (to
  float32). Bytes come 8 at a time from ``random_`` int64 words over the full 64-bit range:
  the generator, one call per number, dominated the CPU time.

Cost (``N`` samples, ``d`` dims, ``K`` neighbours, ``Q`` bank rows, ``U <= min(Q, NK)``
distinct neighbours): in-batch one ``[2N, d] x [d, 2N]`` matmul and its backward (as InfoNCE),
one top-``K`` over two ``[N, N]`` (on the CPU rows shorter than ``64 K`` are padded to it when
that at most doubles them: ``topk`` then runs a partial sort, about twice as fast at
``N = 256, K = 5``), ``O(N^2)`` elementwise work (about 15 float passes over ``[2N, 2N]``
against InfoNCE's 10, two byte transposes ``[N, 2N]``, and byte passes over the trials) and
``16 N^2`` Bernoulli trials (``N(K+1)`` per anchor and direction for ``L_mined``, ``2N`` per
row for ``L_aug``, with ``K = 5``); on the CPU the module keeps about ``(124 + 6 K) N^2`` bytes
of buffers (none over 64 MiB; those of the saved products are reused only once released; one
module must not run in several threads at once). With a bank: the lookup ``[N, d] x [d, Q]``
(no gradient) and its top-``K``, ``[N, d] x [d, N + U]``, the ``L_aug`` matmul
``[2N, d] x [d, 2N]`` (the last two with their backward), and ``N(K+1) N + 4 N^2`` ``torch.rand``
numbers; InfoNCE with the same bank: one ``[N, d] x [d, Q]`` and its backward.
Everything is float32 in log space, so ``T = 0.05`` and bf16 autocast stay finite.

Checked line by line against the code; where it and ``docs/methods.md`` section 4 disagree, we
follow the code unless a point says otherwise:

* Neighbours: cosine between each momentum key and the bank, ``topk(K)``, bank rows returned
  (normalised before use); the bank is read before ``_dequeue_and_enqueue`` (lightly's
  ``MemoryBankModule``), and only view-2 keys are enqueued. A bank row that is a neighbour of
  both ``k_i`` and ``k_j`` is a positive and a negative of ``q_i`` in the code; kept so here
  (in-batch, our own rule above removes such overlaps).
* ``s+_i`` of the kernel is ``s(q_i, k_i)``, the predictor output against the momentum key (the
  ``pos`` argument of ``soft_constrastive`` is the key the neighbours were mined for).
* Soft weights: ``att_clc(q_pre, k)`` = softmax over the anchor's own ``K`` neighbours of the cosine
  between the online projection **before the predictor** (``q_pre``, here ``proj1``) and each
  neighbour, temperature 1 (not divided by ``T``), not detached (gradient flows into ``q_pre``, and
  here into ``proj1``); the key itself gets weight 1. methods.md says ``cos(p_i, nn)``.
* Positive weights do **not** enter ``D_i``: ``pos1`` sums ``e^{s_ip/T}`` unweighted whether or not
  the weights are soft; methods.md writes ``D_i = sum_p w_ip e^{s_ip/T} + ...``.
* The code runs ``weighting='hard'``: ``self.threshold = True`` overwrites the constructor
  argument, and ``labelsnew_1[labelsnew_1 > 0] = 1`` turns every (positive) softmax weight into 1.
  ``hard`` is the default here.
* Unselected negatives are removed by ``exp(0 * s / T) == 1 -> 0``; a *selected* negative with
  ``s == 0`` exactly is removed too (a measure-zero quirk we do not copy).
* ``L_aug`` applies the kernel to raw dot products of the unnormalised ``q`` and ``k``
  (``logits_pos``, ``logits_neg``) and uses cosines in the loss, as methods.md says.
* ``L_aug`` is not the per-row SimCLR loss: in ``(- torch.log(pos / (pos + Ng))).mean()`` ``pos``
  has shape ``[2B, 1]`` and ``Ng`` shape ``[2B]``, so the quotient broadcasts to ``[2B, 2B]`` and
  the mean runs over every (positive of row r, negative mass of row c) pair. methods.md describes
  the intended per-row loss; we default to it (``aug_pairing='matched'``) and keep the code's as
  ``aug_pairing='broadcast'``.
* Framework details in the same class (for the trainer, not this loss): projector and predictor
  are ``Linear(bias=False)-BN-ReLU-Linear(bias=False)-BN(affine=False)`` (the predictor ends with
  the affine-free BN too), the EMA update runs *before* the keys are computed, no batch shuffle.
* The code hard-codes the batch (``2 * 256 - 2``, ``self.batch = 256``) and ``topk = 5``; not here.
* Not verifiable from the code alone (the launch script was not found): ``T`` (``L_mined`` uses
  ``self.T``, default 1.0, ``L_aug`` uses ``args.temperature``; we use one ``temperature``,
  default 0.5 per methods.md), ``a``, ``b``, ``lambda`` (``args.a``, ``args.b``, ``args.aa``), the
  bank size (class default 98304; methods.md: 16384) and the EMA momentum (``args.queue_momentum``).

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("potential", temperature=0.5, num_neighbors=5)
    >>> q = torch.randn(32, 128, requires_grad=True)     # online branch, after the predictor
    >>> k, queue = torch.randn(32, 128), torch.randn(1024, 128)   # momentum keys, FIFO bank
    >>> g = torch.Generator().manual_seed(0)
    >>> loss = loss_fn(q, k, negatives=queue, generator=g)
    >>> loss.backward()
    >>> out = loss_fn(q, k, negatives=queue, labels=torch.arange(32) % 4,
    ...               negative_labels=torch.arange(1024) % 4, return_diagnostics=True)
    >>> out.per_anchor.shape, bool(torch.isfinite(out.loss))
    (torch.Size([32]), True)
    >>> bool(loss_fn(q, k) > 0)                          # in-batch, symmetric, no bank
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg._buffers import FreeBuffers, ScratchBuffers
from hardneg._checks import check_choice, check_embeddings, check_labels, check_number
from hardneg.diagnostics import NegativeDiagnostics, negative_diagnostics
from hardneg.losses.contrastive import LossOutput, check_views
from hardneg.pool import ContrastiveScores
from hardneg.strategies.base import NegativeSelection

_NEG_INF = float("-inf")


@dataclass
class _Grid:
    """One direction of ``L_mined`` in the grid layout ``[N, N(K+1) (+ Q')]`` (column
    ``j(K+1) + m`` = member ``m`` of block ``j``), for the diagnostics; built only on request."""

    scores: ContrastiveScores  # logits of the candidate negatives (-inf = not a negative)
    selection: NegativeSelection  # the selected negatives, log-weights, candidate ids


def _normalise(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=1)


class _Scratch(ScratchBuffers):
    """The buffers of one potential module (:mod:`hardneg._buffers`): the large temporaries of a
    call (the draws, the kernel, the exponentials) and, apart, the products saved for the
    backward (:meth:`saved`). At most about 0.6 GB stays allocated whatever the batch size
    (about ``(124 + 6 K) N^2`` bytes in-batch, ``K`` neighbours; the most near ``N = 2048``)."""

    def __init__(self) -> None:
        super().__init__()
        self._saved = FreeBuffers()  # tensors saved for the backward: reused once released

    def saved(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        """A buffer for a tensor saved for the backward: handed out again only once nothing
        holds it any more (:class:`~hardneg._buffers.FreeBuffers`)."""
        return self._saved.get(name, shape, dtype, device)


def _buffer(
    scratch: _Scratch | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device
) -> Tensor:
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return scratch.get(name, shape, dtype, device)


def _product(scratch: _Scratch | None, name: str, a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` (same shapes), into a reused buffer of ``scratch`` if given: the product is
    saved for the backward."""
    if scratch is None:
        return a * b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return torch.mul(a, b, out=scratch.saved(name, tuple(a.shape), dtype, a.device))


def _random_bytes(
    shape: tuple[int, ...], generator, device, scratch: _Scratch | None = None, name: str = "bytes"
) -> Tensor:
    """Uniform random bytes (``uint8``) of ``shape``, cut from int64 words of ``random_`` over
    the full 64-bit range: the generator is the costliest part on the CPU (one call per
    number, also for ``torch.rand``), and one call gives 8 bytes."""
    size = math.prod(shape)
    words = _buffer(scratch, name, (-(-size // 8),), torch.int64, device)
    words.random_(-(2**63), None, generator=generator)
    return words.view(torch.uint8)[:size].view(shape)


def _top_byte(
    scaled: Tensor, saturate: bool, scratch: _Scratch | None = None, name: str = "top"
) -> Tensor:
    """``floor(256 p)`` as ``uint8`` from ``scaled = 256 p``; ``saturate`` maps ``p = 1`` to 255
    (whose ties then always keep), needed only when ``p`` can be 1 (``scaled`` is not changed:
    its ties need the unclamped value)."""
    top = _buffer(scratch, name, tuple(scaled.shape), torch.uint8, scaled.device)
    if saturate:
        scaled = scaled.clamp(max=255.0)
    return top.copy_(scaled)


def _as_float(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """0/1 of a bool tensor as ``dtype``, through ``uint8`` (a direct bool cast is slow on the
    CPU)."""
    return mask.view(torch.uint8).to(dtype)


def _find(mask: Tensor) -> Tensor:
    """Flat indices of the nonzero entries of a contiguous bool or integer tensor that is
    mostly zero: the scan runs over 8-byte words, and only the words that hold one are opened."""
    flat = mask.view(-1)
    per = 8 // flat.element_size()  # entries per word
    whole = flat.numel() // per * per
    hit = flat[:whole].view(torch.int64).nonzero().squeeze(1)
    at = (hit.unsqueeze(1) * per + torch.arange(per, device=mask.device)).reshape(-1)
    tail = torch.arange(whole, flat.numel(), device=mask.device)
    at = torch.cat([at, tail])
    return at[flat.index_select(0, at) != 0]


def _bernoulli(
    scaled: Tensor,
    generator: torch.Generator | None,
    saturate: bool = True,
    top: Tensor | None = None,
    scratch: _Scratch | None = None,
) -> Tensor:
    """One draw ``Bernoulli(p)`` per cell from ``scaled = 256 p`` (contiguous): a float 0/1
    tensor like ``scaled``, exact to float32 (``top``: its :func:`_top_byte`, if at hand). (A
    ``uint8`` mask would save a pass here, but the float product it feeds converts it afresh.)

    A draw compares one random byte ``v`` with ``t = floor(256 p)``: ``v < t`` keeps,
    ``v > t`` drops, and a tie (probability 1/256) keeps when a ``torch.rand`` uniform is below
    ``256 p - t``, so ``P(keep) = t / 256 + (256 p - t) / 256 = p``. Draw order: the bytes
    (row-major), then one uniform per tie in the same order. With ``scratch`` the result is a
    scratch buffer (valid until the next call).
    """
    if top is None:
        top = _top_byte(scaled, saturate, scratch, "bernoulli_top")
    device = scaled.device
    v = _random_bytes(tuple(scaled.shape), generator, device, scratch, "bernoulli_bytes")
    mask = _buffer(scratch, "bernoulli_mask", tuple(scaled.shape), torch.bool, device)
    dtype = scaled.dtype
    keep = _buffer(scratch, "bernoulli_keep", tuple(scaled.shape), dtype, device)
    keep.copy_(torch.lt(v, top, out=mask).view(torch.uint8))
    at = _find(torch.eq(v, top, out=mask))
    if at.numel() > 0:
        u = torch.rand(at.shape, generator=generator, device=device)
        rest = scaled.reshape(-1).index_select(0, at) - top.view(-1).index_select(0, at)
        keep.view(-1).index_copy_(0, at, _as_float(u < rest, dtype))
    return keep


def _count_into(bits: Tensor, out: Tensor) -> None:
    """Sum ``bits`` (0/1 ``uint8`` ``[C, m, R]``) over its middle dim into ``out`` ``[C, R]``
    (``uint8``, or ``int32`` when some key has more than 255 trials: a ``uint8`` sum holds 255
    terms, and a sum straight to ``int32`` is slow)."""
    m = bits.shape[1]
    if m == 1:
        out.copy_(bits[:, 0])
    elif out.dtype == torch.uint8:
        torch.sum(bits, dim=1, dtype=torch.uint8, out=out)
    else:
        out.zero_()
        for lo in range(0, m, 255):
            out.add_(bits[:, lo : lo + 255].sum(dim=1, dtype=torch.uint8))


def _binomial(
    scaled: Tensor,
    trials: Tensor,
    generator: torch.Generator | None,
    saturate: bool = True,
    top: Tensor | None = None,
    scratch: _Scratch | None = None,
) -> Tensor:
    """Counts ``c_rl ~ Binomial(trials_l, p_rl)`` (float ``[R, C]``) from ``scaled = 256 p``,
    independent over cells. ``scaled`` is ``[R, C]`` or a (strided) ``[R, H, C / H]`` whose
    last two dims, flattened, are the ``C`` columns; ``top`` its :func:`_top_byte` with the
    columns as rows, ``[C, R]``, if at hand.

    Every trial is a draw of :func:`_bernoulli`. The draws run with the columns as rows, so
    that a trial of column ``l`` is a whole row of ``R`` bytes (one per cell of the column):
    the columns are taken in the stable ascending order of ``trials``, each with its
    ``trials_l`` rows in a row, ``[sum_l trials_l, R]`` bytes in all (the columns with the
    same count ``m`` are then one block ``[C_m, m, R]``, summed at once), then one
    ``torch.rand`` uniform per tie, in the row-major order of the bytes.
    """
    rows, cols, device = scaled.shape[0], trials.shape[0], scaled.device
    grid = scaled if scaled.dim() == 3 else scaled.unsqueeze(1)
    width = grid.shape[2]
    if top is None:
        top = _top_byte(grid.permute(1, 2, 0).reshape(cols, rows), saturate)
    order = torch.argsort(trials, stable=True)
    counts_sorted = trials.index_select(0, order)
    values, sizes = torch.unique_consecutive(counts_sorted, return_counts=True)
    values, sizes = values.tolist(), sizes.tolist()
    total = sum(m * size for m, size in zip(values, sizes))
    key = order.repeat_interleave(counts_sorted, output_size=total)  # column of each byte row
    need = _buffer(scratch, "binomial_top", (total, rows), torch.uint8, device)
    torch.index_select(top, 0, key, out=need)  # floor(256 p) of every byte
    v = _random_bytes((total, rows), generator, device, scratch, "binomial_bytes")
    mask = _buffer(scratch, "binomial_mask", (total, rows), torch.bool, device)
    bits = torch.lt(v, need, out=mask).view(torch.uint8)
    dtype = torch.int32 if values[-1] > 255 else torch.uint8
    below = _buffer(scratch, "binomial_below", (cols, rows), dtype, device)
    start = offset = 0
    for m, size in zip(values, sizes):
        _count_into(
            bits[offset : offset + m * size].view(size, m, rows), below[start : start + size]
        )
        start += size
        offset += m * size
    back = torch.empty_like(order).index_copy_(0, order, torch.arange(cols, device=device))
    unsorted = _buffer(scratch, "binomial_unsorted", (cols, rows), dtype, device)
    torch.index_select(below, 0, back, out=unsorted)
    counts = _buffer(scratch, "binomial_counts", (rows, cols), scaled.dtype, device)
    counts.copy_(unsorted.T)
    at = _find(torch.eq(v, need, out=mask))
    if at.numel() > 0:
        r, c = at % rows, key.index_select(0, at // rows)  # cell (row r, column c) of each tie
        # 256 p of these cells through the strides of `grid` (an index per dim is slow)
        s0, s1, s2 = grid.stride()
        span = sum((size - 1) * st for size, st in zip(grid.shape, grid.stride())) + 1
        where = r * s0 + (c // width) * s1 + (c % width) * s2
        flat = grid.as_strided((span,), (1,), grid.storage_offset())
        rest = flat.index_select(0, where) - need.view(-1).index_select(0, at)
        u = torch.rand(at.shape, generator=generator, device=device)
        counts.view(-1).index_add_(0, r * cols + c, _as_float(u < rest, scaled.dtype))
    return counts


_Block = tuple[int, int, int, int]  # rows [r0, r1) and columns [c0, c1) of a weight matrix


class _RowLogSums(torch.autograd.Function):
    """``log D_s = shift + log sum_c W_s[r, c] e^{L[r, c]}`` for weights ``W_s`` (no gradient)
    on blocks of the shifted logits ``L``, from one exponential ``E = e^L`` shared by all ``s``,
    and the logits ``L.gather(1, index)`` (the positives, so that their gradient lands in the
    same buffer instead of a zero-filled one of its own). Only the products ``P_s = W_s E`` are
    saved: the backward is ``dL = sum_s (g_s / D_s) P_s`` (each on its block) plus the scattered
    gradient of the gathered logits, so ``E`` and the weights are temporaries (``scratch``
    holds ``E``). ``L`` must be small enough that no weighted ``E`` underflows (see
    :func:`_row_log_sums`).
    """

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        shift: float,
        blocks: list[_Block],
        scratch,
        index: Tensor,
        *weights: Tensor,
    ):  # type: ignore[override]
        return _log_sums_forward(ctx, logits, shift, blocks, scratch, index, weights)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        acc = _log_sums_backward(ctx, grads)
        return (acc, None, None, None, None, *([None] * len(ctx.blocks)))


def _log_sums_forward(
    ctx,
    logits: Tensor,
    shift: float,
    blocks: list[_Block],
    scratch,
    index: Tensor,
    weights: tuple[Tensor, ...],
    saved: tuple[Tensor, ...] = (),
) -> tuple[Tensor, ...]:
    """Forward of :class:`_RowLogSums` (``saved``: more tensors to save, first)."""
    e = _buffer(scratch, "exp", tuple(logits.shape), logits.dtype, logits.device)
    torch.exp(logits, out=e)
    prods = [
        _product(scratch, f"prod{i}", e[r0:r1, c0:c1], w)
        for i, ((r0, r1, c0, c1), w) in enumerate(zip(blocks, weights))
    ]
    sums = [p.sum(dim=1) for p in prods]
    ctx.blocks, ctx.shape, ctx.extra = blocks, logits.shape, len(saved)
    ctx.save_for_backward(*saved, index, *prods, *sums)
    return (*(d.log().add_(shift) for d in sums), logits.gather(1, index))


def _log_sums_backward(ctx, grads: tuple[Tensor, ...], out: Tensor | None = None) -> Tensor:
    """``dL`` of :class:`_RowLogSums` (in ``out`` if given, else a new tensor)."""
    index, *saved = ctx.saved_tensors[ctx.extra :]
    k = len(ctx.blocks)
    prods, sums = saved[:k], saved[k:]
    full = (0, ctx.shape[0], 0, ctx.shape[1])
    acc = None
    for block, p, d, g in sorted(
        zip(ctx.blocks, prods, sums, grads[:k]), key=lambda item: item[0] != full
    ):
        coef = torch.where(d > 0, g / d, torch.zeros_like(d)).unsqueeze(1)
        if acc is None and block == full:
            acc = p * coef if out is None else torch.mul(p, coef, out=out)
            continue
        if acc is None:
            acc = p.new_zeros(ctx.shape) if out is None else out.zero_()
        r0, r1, c0, c1 = block
        acc[r0:r1, c0:c1].addcmul_(p, coef)
    acc.scatter_add_(1, index, grads[k])
    return acc


def _shifted_logits(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """``a @ b^T / T - 1 / T`` (float32) for L2-normalised rows, the shift folded into the matmul
    as one more column (no extra pass): all in ``[-2/T, 0]`` up to rounding."""
    col = a.new_ones(a.shape[0], 1)
    a = torch.cat([a / temperature, col], dim=1)
    b = torch.cat([b, col.new_full((b.shape[0], 1), -1.0 / temperature)], dim=1)
    return (a @ b.T).float()


class _GramLogSums(torch.autograd.Function):
    """:class:`_RowLogSums` of the logits ``G = (x / T) x^T`` of the rows of ``x`` (no shift),
    taking ``G`` computed beforehand (``logits``, no gradient of its own, :func:`_gram`) and
    giving the gradient of ``x``: ``dx = (dG x + dG^T x) / T``. ``dG`` then never leaves the
    backward, so it lives in a buffer of ``scratch`` like ``G``: the two largest fresh tensors
    of a call, paged in afresh every time on the CPU."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        logits: Tensor,
        temperature: float,
        blocks: list[_Block],
        scratch,
        index: Tensor,
        *weights: Tensor,
    ):  # type: ignore[override]
        ctx.temperature, ctx.scratch = temperature, scratch
        return _log_sums_forward(ctx, logits, 0.0, blocks, scratch, index, weights, (x,))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        x = ctx.saved_tensors[0]
        # the forward's exponential is a temporary: its buffer takes dG
        grad = _buffer(ctx.scratch, "exp", tuple(ctx.shape), x.dtype, x.device)
        grad = _log_sums_backward(ctx, grads, out=grad)
        dx = torch.mm(grad, x).add_(torch.mm(grad.T, x)).div_(ctx.temperature)
        return (dx, None, None, None, None, None, *([None] * len(ctx.blocks)))


def _gram(x: Tensor, temperature: float, scratch: _Scratch | None) -> Tensor:
    """``(x / T) x^T`` without gradient, in a buffer of ``scratch`` (see :class:`_GramLogSums`)."""
    rows = x.shape[0]
    out = _buffer(scratch, "logits", (rows, rows), torch.float32, x.device)
    with torch.no_grad():  # beta = 0: `out` is not read; alpha: 1/T without a pass of its own
        return torch.addmm(out, x, x.T, beta=0.0, alpha=1.0 / temperature, out=out)


def _logits(x: Tensor, temperature: float) -> Tensor:
    """``x @ x^T / T`` (float32) for L2-normalised rows ``x``, all in ``[-1/T, 1/T]`` up to
    rounding (the temperature divides ``x``, not the product: no extra pass)."""
    return ((x / temperature) @ x.T).float()


def _row_log_sums(
    logits: Tensor,
    weights: list[Tensor],
    blocks: list[_Block],
    temperature: float,
    index: Tensor,
    scratch: _Scratch | None = None,
    shift: float | None = None,
) -> tuple[tuple[Tensor, ...], Tensor]:
    """``log D_s[r] = log sum_c W_s[r, c] e^{L[r, c]}`` over the rows of each block (``-inf``
    where a row has no weight), for logits ``L = cos / T - shift``: ``shift = 1 / T`` (default,
    :func:`_shifted_logits`) or ``0`` (:func:`_logits`); the shift is added back. Also returns
    ``L.gather(1, index)`` (the positives; a separate product would round differently from the
    cells inside ``D`` under autocast). The weights may be scratch buffers.

    With ``T >= 0.03`` every ``L`` lies in ``[-2/T, 0]`` (shifted) or ``[-1/T, 1/T]`` (up to
    bf16 rounding of the cosine), so ``E = e^L`` is a normal float32 (``>= e^{-68}``, and at
    most ``e^{34}``: sums of up to ``10^{23}`` such terms stay finite) and one exponential
    serves every sum (:class:`_RowLogSums`). Below, each sum is a log-sum-exp of its own.
    """
    if shift is None:
        shift = 1.0 / temperature
    if temperature >= 0.03:
        *out, picked = _RowLogSums.apply(logits, shift, blocks, scratch, index, *weights)
        return tuple(out), picked
    out = []
    for (r0, r1, c0, c1), w in zip(blocks, weights):
        has = (w > 0).any(dim=1, keepdim=True)
        terms = logits[r0:r1, c0:c1] + w.log()
        terms = torch.where(has, terms, torch.zeros_like(terms))
        lse = torch.logsumexp(terms, dim=1) + shift
        out.append(lse.masked_fill(~has.squeeze(1), _NEG_INF))
    return tuple(out), logits.gather(1, index)


def _occurrence_rank(ids: Tensor) -> Tensor:
    """``rank[c]``: how many earlier entries of ``ids`` equal ``ids[c]``."""
    order = torch.argsort(ids, stable=True)
    ordered = ids[order]
    first = torch.searchsorted(ordered, ordered)
    rank = torch.empty_like(ids)
    rank[order] = torch.arange(ids.numel(), device=ids.device) - first
    return rank


def _sanitise(diag: NegativeDiagnostics) -> NegativeDiagnostics:
    """Zero the NaNs of anchors that kept no negative (a softmax over nothing)."""
    for f in fields(diag):
        value = getattr(diag, f.name)
        if isinstance(value, Tensor) and value.is_floating_point():
            setattr(diag, f.name, torch.where(torch.isnan(value), torch.zeros_like(value), value))
    return diag


def _cat_diagnostics(parts: list[NegativeDiagnostics]) -> NegativeDiagnostics:
    """Stack the per-anchor diagnostics of the two in-batch directions (same column count)."""
    out = parts[0]
    for f in fields(out):
        values = [getattr(p, f.name) for p in parts]
        if all(isinstance(v, Tensor) for v in values):
            setattr(out, f.name, torch.cat(values, dim=0))
        elif any(isinstance(v, Tensor) for v in values):
            setattr(out, f.name, None)
    return out


class PotentialLoss(nn.Module):
    """Potential-sample mining: mined positives plus Bernoulli-selected "potential" negatives.

    Args:
        temperature: ``T > 0`` of both losses.
        num_neighbors: ``K >= 0`` nearest neighbours mined per key (capped at the support size).
        aug_weight: ``lambda >= 0``, weight of ``L_aug`` (0 skips it).
        a: ``>= 0``, width of the SimANS kernel ``exp(-a (s - s+ - b)^2)`` (0 = keep with ``clamp``).
        b: shift of the kernel's peak relative to the positive similarity.
        clamp: upper bound of the keep probability, in (0, 1] (code: 0.999).
        weighting: ``'hard'`` (all positive weights 1; what the code runs) or ``'soft'``.
        sample: ``'bernoulli'`` (draw the selection) or ``'expected'`` (probabilities as weights).
        select_on: similarity the kernel of ``L_aug`` uses: ``'cosine'`` or ``'raw'`` (the code).
        aug_pairing: ``'matched'`` (each row's positive with its own negatives: SimCLR) or
            ``'broadcast'`` (the code's shape bug: every positive with every row's negatives).
        pool_as_negatives: also use every pool row as a (selected) negative of ``L_mined``.
        check_inputs: validate shapes and finiteness on every call (one host sync).
    """

    def __init__(
        self,
        temperature: float = 0.5,
        num_neighbors: int = 5,
        aug_weight: float = 0.5,
        a: float = 0.5,
        b: float = 0.0,
        clamp: float = 0.999,
        weighting: str = "hard",
        sample: str = "bernoulli",
        select_on: str = "cosine",
        aug_pairing: str = "matched",
        pool_as_negatives: bool = False,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = check_number("temperature", temperature, low=0.0, low_inclusive=False)
        self.num_neighbors = int(check_number("num_neighbors", num_neighbors, low=0, integer=True))
        self.aug_weight = check_number("aug_weight", aug_weight, low=0.0)
        self.a = check_number("a", a, low=0.0)
        self.b = check_number("b", b)
        self.clamp = check_number("clamp", clamp, low=0.0, low_inclusive=False, high=1.0)
        self.weighting = check_choice("weighting", weighting, ("hard", "soft"))
        self.sample = check_choice("sample", sample, ("bernoulli", "expected"))
        self.select_on = check_choice("select_on", select_on, ("cosine", "raw"))
        self.aug_pairing = check_choice("aug_pairing", aug_pairing, ("matched", "broadcast"))
        for name, flag in (
            ("pool_as_negatives", pool_as_negatives),
            ("check_inputs", check_inputs),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.pool_as_negatives = pool_as_negatives
        self.check_inputs = check_inputs
        self._scratch = _Scratch()  # CPU buffers of the in-batch temporaries

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, num_neighbors={self.num_neighbors}, "
            f"aug_weight={self.aug_weight}, a={self.a}, b={self.b}, clamp={self.clamp}, "
            f"weighting={self.weighting!r}, sample={self.sample!r}, "
            f"select_on={self.select_on!r}, aug_pairing={self.aug_pairing!r}, "
            f"pool_as_negatives={self.pool_as_negatives}"
        )

    # -- shared pieces -----------------------------------------------------------------------

    def _log_keep(
        self,
        sims: Tensor,
        centre: Tensor,
        scale: float = 1.0,
        offset: float = 0.0,
        out: Tensor | None = None,
    ) -> Tensor:
        """``offset + log pi``, ``log pi = min(log clamp, -a (s - s+ - b)^2)``, of every cell of
        ``sims`` ``[A, ..., C]`` (detached), with ``s+ = centre`` ``[A, ...]``; no exponential,
        one new tensor (or ``out``). ``sims`` may be logits ``s / scale``:
        ``-a (scale (l - l+) - b)^2 = -a scale^2 (l - l+ - b / scale)^2``.
        """
        x = torch.sub(sims, centre.unsqueeze(-1), out=out)
        if self.b != 0.0:
            x.sub_(self.b / scale)
        y = torch.addcmul(x.new_tensor(offset), x, x, value=-self.a * scale * scale, out=x)
        return y.clamp_(max=math.log(self.clamp) + offset)

    def _per_anchor(
        self, log_d: Tensor, pos_logits: Tensor, g: Tensor | None, neighbours: Tensor | None
    ) -> Tensor:
        """``l_i = sum_p w_ip (log D_i - s(q_i, p)/T)`` from ``log D`` ``[N]`` and the positive
        logits ``[N, K+1]`` (key first); soft weights from ``g`` ``[N, d]`` and ``[N, K, d]``."""
        terms = log_d.unsqueeze(1) - pos_logits
        if self.weighting == "soft" and neighbours is not None and neighbours.shape[1] > 0:
            g = _normalise(g)
            attention = torch.einsum("nd,nkd->nk", g, neighbours).float().softmax(dim=1)
            terms = torch.cat([terms[:, :1], terms[:, 1:] * attention], dim=1)
        return terms.sum(dim=1)

    def _aug_weights(self, weights: Tensor) -> Tensor:
        """Finish the weights ``[2N, 2N]`` (keep mask or keep probability) of ``L_aug`` in
        place: the row itself is never a negative, and its partner is the positive
        (``'matched'``: weight 1) or nothing (``'broadcast'``: the weights are the negatives)."""
        n = weights.shape[-1] // 2
        weights.diagonal().zero_()
        partner = float(self.aug_pairing == "matched")
        weights.diagonal(n).fill_(partner)
        weights.diagonal(-n).fill_(partner)
        return weights

    def _aug_rows(self, log_d: Tensor, pos: Tensor) -> Tensor:
        """``L_aug`` per row ``[2N]`` from ``log D`` ``[2N]`` (weights of :meth:`_aug_weights`)
        and the positive logits ``[2N]``."""
        if self.aug_pairing == "matched":
            return log_d - pos
        # the code's `pos / (pos + Ng)` with pos [2N, 1] and Ng [2N] broadcasts to [2N, 2N]: every
        # row's positive against every row's negative mass; row r's share is its mean over them
        pos = pos.unsqueeze(1)
        return (torch.logaddexp(pos, log_d.unsqueeze(0)) - pos).mean(dim=1)

    def _aug_sigma(
        self, x: Tensor, logits: Tensor, offset: float = 0.0, out: Tensor | None = None
    ) -> Tensor:
        """``log pi`` of ``L_aug`` over the rows of ``x = [q; k]``: kernel of the cosine (from the
        logits ``cos / T``) or of the raw dot product (``select_on``) around each row's partner."""
        two_n = x.shape[0]
        rows = torch.arange(two_n, device=x.device)
        partner = (rows + two_n // 2) % two_n
        if self.select_on == "raw":
            raw = x.detach().float()
            sigma = (raw @ raw.T).float()
            return self._log_keep(sigma, sigma[rows, partner], offset=offset, out=out)
        return self._log_keep(logits, logits[rows, partner], self.temperature, offset, out)

    # -- one direction with a bank (the authors' set-up) ---------------------------------------

    def _pool(
        self,
        q: Tensor,
        k: Tensor,
        support: Tensor,
        pool: Tensor | None,
        proj: Tensor | None,
        generator: torch.Generator | None,
        diagnostics: bool,
    ) -> tuple[Tensor, _Grid | None, int]:
        """``L_mined(q; k)`` per anchor with a support set (and a pool of extra negatives).

        The grid ``[N, N(K+1) (+ Q')]`` of the equations is never built: every distinct candidate
        (the ``N`` keys, the bank rows that are somebody's neighbour) is one column of the logits
        ``[N, N + C']``, weighted by how many of its grid cells are kept (drawn) or by the sum of
        their keep probabilities (expected). The draws are those of the grid, in its order.
        """
        n, t = q.shape[0], self.temperature
        qn, kn = _normalise(q), _normalise(k)
        bank = _normalise(support.detach())
        k_eff = min(self.num_neighbors, bank.shape[0])
        size = k_eff + 1
        rows = torch.arange(n, device=qn.device)
        with torch.no_grad():
            if k_eff > 0:
                idx = (kn.detach() @ bank.T).float().topk(k_eff, dim=1).indices  # [N, K]
            else:
                idx = rows.new_empty(n, 0)
        pool_is_support = pool is not None and pool is support
        if pool_is_support:  # every bank row is a candidate: all of them are columns
            nb_col, nb_rows = idx, bank
        else:  # only the bank rows that are somebody's neighbour
            uniq, nb_col = torch.unique(idx, return_inverse=True)
            nb_rows = bank[uniq]
        # [N, N + C'], cos/T - 1/T; two products, so that the backward skips the bank rows
        logits = torch.cat([_shifted_logits(qn, kn, t), _shifted_logits(qn, nb_rows, t)], dim=1)
        colmap = torch.cat([rows.unsqueeze(1), nb_col + n], dim=1)  # column of each block member
        neighbours = bank[idx]  # [N, K, d]
        extra = None
        if pool is not None and not pool_is_support:
            pool_n = _normalise(pool.detach())
            extra = _shifted_logits(qn, pool_n, t)  # [N, Q']
        with torch.no_grad():
            centre = logits.detach().diagonal()  # s+_i = s(q_i, k_i): key column i of row i
            log_pi = self._log_keep(logits.detach(), centre, t)  # [N, N + C']
            pi = log_pi.exp_()
            nb_index = nb_col.reshape(1, -1).expand(n, -1)  # [N, NK] column (- N) of every cell
            pool_pi = None
            if pool_is_support:
                pool_pi = pi[:, n:]
            elif extra is not None:
                pool_pi = self._log_keep(extra.detach(), centre, t).exp_()
            keep_grid = keep_pool = None
            if self.sample == "bernoulli":
                width = n * size + (0 if pool_pi is None else pool_pi.shape[1])
                u = torch.rand(n, width, generator=generator, device=qn.device)
                cells = u[:, : n * size].view(n, n, size)
                keep_key = cells[:, :, 0] < pi[:, :n]
                keep_nb = cells[:, :, 1:] < pi[:, n:].gather(1, nb_index).view(n, n, k_eff)
                keep_key[rows, rows] = False  # the own block holds the positives
                keep_nb[rows, rows] = False
                weight = torch.empty_like(pi)
                weight[:, :n] = _as_float(keep_key)
                weight[:, n:] = 0.0
                weight[:, n:].scatter_add_(1, nb_index, _as_float(keep_nb.reshape(n, -1)))
                if pool_pi is not None:
                    keep_pool = u[:, n * size :] < pool_pi
                    if pool_is_support:  # the anchor's own neighbours are its positives
                        keep_pool[rows.unsqueeze(1), idx] = False
                        weight[:, n:] += _as_float(keep_pool)
                if diagnostics:
                    keep_grid = torch.cat([keep_key.unsqueeze(2), keep_nb], dim=2).view(n, -1)
            else:  # expected count: keep probability times the cells in other blocks
                mult = torch.bincount(colmap.reshape(-1), minlength=pi.shape[1]).to(pi.dtype)
                if pool_is_support:
                    mult[n:] += 1.0  # every bank row is a pool column too ...
                    colmap_neg = torch.cat([colmap, colmap[:, 1:]], dim=1)  # ... but own rows
                else:
                    colmap_neg = colmap
                cells = mult.expand_as(pi).clone()
                cells.scatter_add_(1, colmap_neg, cells.new_full(colmap_neg.shape, -1.0))
                weight = cells.mul_(pi)
            weight.scatter_add_(1, colmap, weight.new_ones(colmap.shape))  # positives: once
            if extra is not None:
                pool_w = pool_pi if keep_pool is None else _as_float(keep_pool)
                weight = torch.cat([weight, pool_w], dim=1)
        if extra is not None:
            logits = torch.cat([logits, extra], dim=1)
        # D, and the own-block logits [N, K+1] (key first) read off the same matrix
        (log_d,), pos_logits = _row_log_sums(
            logits, [weight], [(0, n, 0, logits.shape[1])], t, colmap
        )
        pos_logits = pos_logits + 1.0 / t
        per_anchor = self._per_anchor(log_d, pos_logits, q if proj is None else proj, neighbours)
        grid = None
        if diagnostics:
            with torch.no_grad():
                flat = colmap.reshape(1, -1).expand(n, -1)
                candidates = [torch.cat([kn.unsqueeze(1), bank[idx]], dim=1).reshape(n * size, -1)]
                lg = logits.detach() + 1.0 / t
                grid_logits = [lg.gather(1, flat)]
                neg_mask = [
                    ~torch.eye(n, dtype=torch.bool, device=qn.device).repeat_interleave(size, 1)
                ]
                if keep_grid is None:
                    log_w = [pi.gather(1, flat).log()]
                else:
                    log_w = [torch.zeros_like(grid_logits[0]).masked_fill(~keep_grid, _NEG_INF)]
                # keys -> 0..N-1, bank rows -> N + row (the label vector is [labels; bank labels])
                ids = [torch.cat([rows.unsqueeze(1), idx + n], dim=1).reshape(-1)]
                if pool_pi is not None:
                    pool_mask = torch.ones_like(pool_pi, dtype=torch.bool)
                    if pool_is_support:
                        pool_mask[rows.unsqueeze(1), idx] = False
                        candidates.append(bank)
                        grid_logits.append(lg[:, n:])
                        offset = n
                    else:
                        candidates.append(pool_n)
                        grid_logits.append(extra.detach() + 1.0 / t)
                        offset = n + bank.shape[0]
                    neg_mask.append(pool_mask)
                    log_w.append(
                        pool_pi.log()
                        if keep_pool is None
                        else torch.zeros_like(pool_pi).masked_fill(~keep_pool, _NEG_INF)
                    )
                    ids.append(torch.arange(pool_pi.shape[1], device=qn.device) + offset)
                grid = self._make_grid(
                    qn,
                    kn,
                    *(
                        torch.cat(v, dim=dim)
                        for v, dim in (
                            (candidates, 0),
                            (grid_logits, 1),
                            (neg_mask, 1),
                            (log_w, 1),
                            (ids, 0),
                        )
                    ),
                    pos_logits[:, 0].detach(),
                    size,
                    in_batch=False,
                )
        return per_anchor, grid, k_eff

    # -- in-batch: both directions from one Gram matrix ----------------------------------------

    def _in_batch(
        self,
        z1: Tensor,
        z2: Tensor,
        proj1: Tensor | None,
        proj2: Tensor | None,
        generator: torch.Generator | None,
        diagnostics: bool,
    ) -> tuple[Tensor, Tensor | None, list[_Grid], int]:
        """``L_mined`` of both directions ``[2N]``, ``L_aug`` per sample of both ``[2N]``.

        One matmul gives the logits of every pair of ``[z1; z2]``: its off-diagonal blocks are
        ``q @ k^T`` of the two directions, its diagonal blocks the neighbour lookups, and the whole
        of it the cosines of ``L_aug`` (both directions have the same rows, in another order).
        The blocks of a direction are keys of the batch, so ``L_mined`` runs over the ``N``
        distinct keys, each weighted by its count among the other blocks (see the module doc);
        every ``D`` is then a weighted row sum of the same exponentials.
        """
        n, t = z1.shape[0], self.temperature
        x = torch.cat([z1, z2])
        xn = _normalise(x)
        # [2N, 2N], cos / T; on the CPU in float32 (the usual case) a buffer without gradient,
        # differentiated through _GramLogSums, else an ordinary product
        fused = (
            t >= 0.03
            and xn.device.type == "cpu"
            and xn.dtype == torch.float32
            and not torch.is_autocast_enabled(xn.device.type)
        )
        logits = _gram(xn, t, self._scratch) if fused else _logits(xn, t)
        k_eff = min(self.num_neighbors, n - 1)
        views = [  # rows and columns of the direction, its anchors, keys, soft-weight inputs
            (slice(0, n), slice(n, 2 * n), xn[:n], xn[n:], z1 if proj1 is None else proj1),
            (slice(n, 2 * n), slice(0, n), xn[n:], xn[:n], z2 if proj2 is None else proj2),
        ]
        with torch.no_grad():
            weights, blocks, counts, own, mined_pi = self._in_batch_weights(
                x, logits.detach(), k_eff, generator, diagnostics
            )
            size = k_eff + 1
            block_ids = [own[:, :size], own[:, size:] - n]  # [N, K+1] per direction, key first
            # own-block columns of both directions in the logits (dir 1: z2 at N + l)
            own_cols = torch.cat([own[:, :size] + n, own[:, size:] - n])
        # D of every loss, and the own-block logits of both directions (read off the same matrix)
        if fused:
            *log_d, own_logits = _GramLogSums.apply(
                xn, logits, t, blocks, self._scratch, own_cols, *weights
            )
        else:
            log_d, own_logits = _row_log_sums(
                logits, weights, blocks, t, own_cols, self._scratch, shift=0.0
            )
        pos = own_logits[:n, 0]  # s(z1_i, z2_i) / T: both directions, both losses
        mined, grids = [], []
        for h, (r, c, anchors, keys, g) in enumerate(views):
            neighbours = None  # the neighbour vectors: soft weights only
            if self.weighting == "soft":
                nbr = block_ids[h][:, 1:].reshape(-1)
                neighbours = keys.index_select(0, nbr).view(n, k_eff, keys.shape[1])
            mined.append(self._per_anchor(log_d[h], own_logits[r], g, neighbours))
            if diagnostics:
                grids.append(
                    self._in_batch_grid(
                        anchors,
                        keys,
                        logits[r, c],
                        mined_pi[:, h],
                        counts[:, h] if counts is not None else None,
                        block_ids[h],
                        own_logits[r][:, 0],
                    )
                )
        aug_part = None
        if len(log_d) > 2:  # one selection serves both directions (same rows, see the doc)
            aug_rows = self._aug_rows(log_d[2], torch.cat([pos, own_logits[n:, 0]]))
            half = (aug_rows[:n] + aug_rows[n:]) / 2  # rows i (z1_i) and N+i (z2_i): sample i
            aug_part = torch.cat([half, half])
        return torch.cat(mined), aug_part, grids, k_eff

    def _in_batch_weights(
        self,
        x: Tensor,
        lg: Tensor,
        k_eff: int,
        generator: torch.Generator | None,
        diagnostics: bool,
    ) -> tuple[list[Tensor], list[_Block], Tensor | None, Tensor, Tensor]:
        """The weights of every ``D`` (no gradient), from the logits ``lg`` ``[2N, 2N]``.

        Both ``L_mined`` directions share one ``[N, 2N]`` layout: column ``l`` is key ``z2_l``
        of anchor ``z1_i`` (the block ``lg[:N, N:]``), column ``N + l`` key ``z1_l`` of anchor
        ``z2_i`` (``lg[N:, :N]``); their counts are one :func:`_binomial` call. ``L_aug`` has one
        selection over ``[2N, 2N]``. Returns the weights with their blocks, the mined counts
        ``[N, 2, N]`` (diagnostics, drawn), the own positives ``[N, 2(K+1)]`` (columns of the
        layout: key first, direction 1 then 2) and the mined keep probabilities ``[N, 2, N]``
        (drawn: times 256).
        """
        n, t, device = lg.shape[0] // 2, self.temperature, lg.device
        drawn = self.sample == "bernoulli"
        scratch = self._scratch
        centre = torch.cat([lg.diagonal(n), lg.diagonal(-n)])  # s(r, r') / T of every row
        # drawn: 256 pi, the scale of the byte draws (one pass less than scaling pi)
        offset = math.log(256.0) if drawn else 0.0
        saturate = self.clamp >= 1.0  # pi = 1 is possible
        aug = self.aug_weight > 0
        # [N, 2, N] view of the two off-diagonal blocks of a [2N, 2N] matrix: [i, h, l] is
        # row hN + i, column (1 - h)N + l
        blocks_of = lambda m: m.as_strided(  # noqa: E731
            (n, 2, n), (2 * n, 2 * n * n - n, 1), m.storage_offset() + n
        )
        aug_pi = aug_top = top = None
        if aug and self.select_on == "cosine":  # its off-diagonal blocks serve L_mined
            aug_pi = self._log_keep(lg, centre, t, offset, out=self._buf("kernel", lg)).exp_()
            mined_pi = blocks_of(aug_pi)
            if drawn:
                aug_top = _top_byte(aug_pi, saturate, scratch, "top")
                # the mined thresholds with the keys as rows (see _binomial): [2N, N]
                top = scratch.get("mined_top", (2 * n, n), torch.uint8, device)
                torch.cat([aug_top[:n, n:].T, aug_top[n:, :n].T], out=top)
        else:
            sims = torch.cat([lg[:n, n:], lg[n:, :n]], dim=1).view(n, 2, n)
            mined_pi = self._log_keep(sims, centre.view(2, n).T, t, offset).exp_()
            if aug:
                aug_pi = self._aug_sigma(x, lg, offset, out=self._buf("kernel", lg)).exp_()
        idx = self._neighbours(lg, n, k_eff)
        rows = torch.arange(n, device=device)
        nbrs = torch.cat([idx[0], idx[1] + n], dim=1)  # [N, 2K], columns of the layout
        own = torch.cat([rows.unsqueeze(1), idx[0], rows.unsqueeze(1) + n, idx[1] + n], dim=1)
        # key l of a direction sits in 1 + (how many keys have it as a neighbour) blocks
        mult = torch.bincount(nbrs.reshape(-1), minlength=2 * n) + 1
        counts = None
        if drawn:
            if top is None:
                top = _top_byte(mined_pi.view(n, 2 * n).T, saturate, scratch, "mined_top")
            mined = _binomial(mined_pi, mult, generator, saturate, top, scratch)
            if diagnostics:
                counts = mined.clone().view(n, 2, n)
        else:
            mined = mined_pi.new_empty(n, 2, n)
            torch.mul(mined_pi, mult.view(2, n).to(mined_pi.dtype), out=mined)
            mined = mined.view(n, 2 * n)
        mined.scatter_(1, own, 1.0)  # own positives: once
        weights = [mined[:, :n], mined[:, n:]]
        blocks = [(0, n, n, 2 * n), (n, 2 * n, 0, n)]
        if aug:  # expected: the probabilities themselves (their self and partner cells unused)
            aug_w = _bernoulli(aug_pi, generator, saturate, aug_top, scratch) if drawn else aug_pi
            weights.append(self._aug_weights(aug_w))
            blocks.append((0, 2 * n, 0, 2 * n))
        return weights, blocks, counts, own, mined_pi

    def _buf(self, name: str, like: Tensor) -> Tensor:
        return self._scratch.get(name, tuple(like.shape), like.dtype, like.device)

    def _neighbours(self, lg: Tensor, n: int, k_eff: int) -> Tensor:
        """``[2, N, K]``: the ``K`` most similar other keys of every key, for direction 1 (keys
        ``z2``, the block ``lg[N:, N:]``) and direction 2 (keys ``z1``, ``lg[:N, :N]``); one
        top-``K`` over both diagonal blocks."""
        if k_eff == 0:
            return torch.empty(2, n, 0, dtype=torch.long, device=lg.device)
        # [h, i, l] = lg[hN + i, hN + l]: keys z1 (h = 0), then z2
        diag = lg.as_strided((2, n, n), (2 * n * n + n, 2 * n, 1), lg.storage_offset())
        # the CPU topk runs a partial sort for rows of at least 64 K entries and a slower
        # selection below; rows padded with -inf to that length take the fast path
        width = 64 * k_eff if lg.device.type == "cpu" and n < 64 * k_eff <= 2 * n else n
        lookup = self._scratch.get("lookup", (2, n, width), lg.dtype, lg.device)
        lookup[:, :, :n].copy_(diag)
        lookup[:, :, n:].fill_(_NEG_INF)
        lookup.diagonal(dim1=1, dim2=2).fill_(_NEG_INF)  # a key is not its own neighbour
        return lookup.topk(k_eff, dim=2).indices.flip(0)

    def _in_batch_grid(
        self,
        anchors: Tensor,
        keys: Tensor,
        block: Tensor,
        pi: Tensor,
        counts: Tensor | None,
        block_ids: Tensor,
        pos: Tensor,
    ) -> _Grid:
        """The grid of one in-batch direction: column ``j(K+1) + m`` is key ``block_ids[j, m]``;
        of the ``mult_l`` cells of key ``l``, the first ``c_il`` (in column order) are kept."""
        n, size = block_ids.shape
        with torch.no_grad():
            ids = block_ids.reshape(-1)
            own = torch.zeros_like(pi, dtype=torch.bool).scatter_(1, block_ids, True)
            neg_mask = ~torch.eye(n, dtype=torch.bool, device=ids.device).repeat_interleave(
                size, dim=1
            )
            neg_mask &= ~own[:, ids]
            if counts is None:
                log_w = pi[:, ids].log()
            else:
                kept = _occurrence_rank(ids).unsqueeze(0) < counts[:, ids]
                log_w = torch.zeros_like(kept, dtype=pi.dtype).masked_fill(~kept, _NEG_INF)
            return self._make_grid(
                anchors,
                keys,
                keys[ids],
                block.detach()[:, ids],
                neg_mask,
                log_w,
                ids,
                pos.detach(),
                size,
                in_batch=True,
            )

    def _make_grid(
        self,
        anchors: Tensor,
        positives: Tensor,
        candidates: Tensor,
        logits: Tensor,
        neg_mask: Tensor,
        log_w: Tensor,
        ids: Tensor,
        pos_logits: Tensor,
        size: int,
        in_batch: bool,
    ) -> _Grid:
        log_w = log_w.masked_fill(~neg_mask, _NEG_INF)
        kept = torch.isfinite(log_w)
        scores = ContrastiveScores(
            anchors=anchors,
            positives=positives,
            candidates=candidates,
            pos_logits=pos_logits,
            logits=logits.masked_fill(~neg_mask, _NEG_INF),
            neg_mask=neg_mask,
            num_negatives=logits.shape[1] - size,
            temperature=self.temperature,
            positive_index=None,
            in_batch=in_batch,
        )
        selection = NegativeSelection(
            logits=logits.masked_fill(~kept, _NEG_INF),
            log_weights=log_w,
            indices=ids.unsqueeze(0).expand(logits.shape[0], -1),
        )
        return _Grid(scores, selection)

    def _aug_one(self, q: Tensor, k: Tensor, generator: torch.Generator | None) -> Tensor:
        """``L_aug(q, k)`` per row of ``[q; k]`` ``[2N]``, drawn over the grid ``[2N, 2N]``."""
        n, t = q.shape[0], self.temperature
        x = torch.cat([q, k])
        xn = _normalise(x)
        logits = _shifted_logits(xn, xn, t)
        rows = torch.arange(2 * n, device=xn.device)
        partner = ((rows + n) % (2 * n)).unsqueeze(1)
        with torch.no_grad():
            pi = self._aug_sigma(x, logits.detach()).exp_()
            if self.sample == "bernoulli":
                u = torch.rand(pi.shape, generator=generator, device=pi.device)
                pi = _as_float(u < pi)
            weights = self._aug_weights(pi)
        (log_d,), pos = _row_log_sums(logits, [weights], [(0, 2 * n, 0, 2 * n)], t, partner)
        return self._aug_rows(log_d, pos.squeeze(1) + 1.0 / t)  # the positive as in D

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        z1: Tensor,
        z2: Tensor,
        negatives: Tensor | None = None,
        *,
        support: Tensor | None = None,
        proj1: Tensor | None = None,
        proj2: Tensor | None = None,
        progress: float | None = None,
        h1: Tensor | None = None,
        h2: Tensor | None = None,
        negative_h: Tensor | None = None,
        exclude_index: Tensor | None = None,
        generator: torch.Generator | None = None,
        labels: Tensor | None = None,
        negative_labels: Tensor | None = None,
        support_labels: Tensor | None = None,
        return_diagnostics: bool = False,
    ) -> Tensor | LossOutput:
        """Loss for one step.

        Args:
            z1, z2: ``[N, d]`` the two views (in-batch), or queries ``q`` (online, after the
                predictor) and their positive keys ``k`` when a pool or support set is given.
            negatives: ``[Q, d]`` pool (FIFO of momentum keys): the support set of the neighbour
                lookup, and candidate negatives too with ``pool_as_negatives``.
            support: ``[S, d]`` explicit support set (overrides ``negatives`` for the lookup).
            proj1, proj2: ``[N, d']`` online projections before the predictor of the rows of
                ``z1`` / ``z2`` (soft weighting only; default ``z1`` / ``z2`` themselves).
            progress, h1, h2, negative_h, exclude_index: accepted for API compatibility with the
                other hardneg losses and ignored (the mined blocks never contain the anchor).
            generator: random generator of the Bernoulli draws (on the embeddings' device).
            labels: ``[N]`` class ids of the samples, diagnostics only.
            negative_labels, support_labels: ``[Q]`` / ``[S]`` class ids of the pool / support
                rows, diagnostics only.
            return_diagnostics: return a :class:`~hardneg.losses.contrastive.LossOutput` whose
                diagnostics describe the negatives of ``L_mined`` (``2N`` anchors in-batch).
        """
        del progress, h1, h2, negative_h, exclude_index  # not used by this method
        one_direction = negatives is not None or support is not None
        bank = support if support is not None else negatives
        if self.check_inputs:
            self._check(z1, z2, negatives, support, proj1, proj2, one_direction)
        self._check_generator(generator, z1)
        n = z1.shape[0]
        if one_direction:
            pool = negatives if self.pool_as_negatives else None
            mined_part, grid, k_eff = self._pool(
                z1, z2, bank, pool, proj1, generator, return_diagnostics
            )
            grids = [grid]
            aug_part = None
            if self.aug_weight > 0:
                aug_rows = self._aug_one(z1, z2, generator)
                aug_part = (aug_rows[:n] + aug_rows[n:]) / 2  # rows i and N+i: sample i
        else:
            mined_part, aug_part, grids, k_eff = self._in_batch(
                z1, z2, proj1, proj2, generator, return_diagnostics
            )
        per_anchor = mined_part
        if aug_part is not None:
            per_anchor = mined_part + self.aug_weight * aug_part
        loss = per_anchor.mean()
        if not return_diagnostics:
            return loss
        label_vector = self._label_vector(
            labels, negative_labels, support_labels, n, negatives, support
        )
        anchor_labels = None if labels is None else check_labels("labels", labels, n)
        parts = [
            _sanitise(
                negative_diagnostics(
                    g.scores,
                    g.selection,
                    anchor_labels=None if label_vector is None else anchor_labels,
                    candidate_labels=label_vector,
                )
            )
            for g in grids
        ]
        diag = _cat_diagnostics(parts)
        diag.extras = {
            "num_neighbors": float(k_eff),
            "mined_loss": float(mined_part.detach().mean()),
            "aug_loss": 0.0 if aug_part is None else float(aug_part.detach().mean()),
        }
        return LossOutput(loss=loss, per_anchor=per_anchor, diagnostics=diag)

    # -- validation and labels -----------------------------------------------------------------

    def _check(
        self,
        z1: Tensor,
        z2: Tensor,
        negatives: Tensor | None,
        support: Tensor | None,
        proj1: Tensor | None,
        proj2: Tensor | None,
        one_direction: bool,
    ) -> None:
        check_views(z1, z2, ("q", "k") if one_direction else ("z1", "z2"))
        for name, pool in (("negatives", negatives), ("support", support)):
            if pool is None:
                continue
            check_embeddings(name, pool)
            if pool.shape[1] != z1.shape[1]:
                raise ValueError(
                    f"{name} must have the embedding dim of q ({z1.shape[1]}), "
                    f"got shape {tuple(pool.shape)}"
                )
        for name, proj in (("proj1", proj1), ("proj2", proj2)):
            if proj is None:
                continue
            check_embeddings(name, proj)
            if proj.shape != z1.shape:
                raise ValueError(
                    f"{name} must have the shape of the embeddings {tuple(z1.shape)} "
                    f"(one online projection per sample), got {tuple(proj.shape)}"
                )
        if proj2 is not None and one_direction:
            raise ValueError("proj2 is only used in-batch (no negatives/support); pass proj1 for q")

    @staticmethod
    def _check_generator(generator: object, z: Tensor) -> None:
        if generator is None:
            return
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if isinstance(z, Tensor) and generator.device.type != z.device.type:
            raise ValueError(
                f"generator must live on the embeddings' device ({z.device.type}), "
                f"got a generator on {generator.device.type}"
            )

    def _label_vector(
        self,
        labels: Tensor | None,
        negative_labels: Tensor | None,
        support_labels: Tensor | None,
        n: int,
        negatives: Tensor | None,
        support: Tensor | None,
    ) -> Tensor | None:
        """Labels of every candidate id of :meth:`_mined`, or None when some are unknown.

        In-batch the ids are the batch rows; with a bank they index ``[labels; bank labels]``, and
        ``[labels; support labels; pool labels]`` when a separate pool adds negatives.
        """
        if labels is None:
            return None
        labels = check_labels("labels", labels, n)
        if negatives is None and support is None:
            return labels
        if negatives is not None and negative_labels is not None:
            negative_labels = check_labels("negative_labels", negative_labels, negatives.shape[0])
        if support is not None and support_labels is not None:
            support_labels = check_labels("support_labels", support_labels, support.shape[0])
        parts = [labels, support_labels if support is not None else negative_labels]
        if support is not None and negatives is not None and self.pool_as_negatives:
            parts.append(negative_labels)
        if any(p is None for p in parts):
            return None
        return torch.cat([p.to(labels.device) for p in parts])
