"""Ring (conditional) negatives (Wu, Mosse, Zhuang, Yamins, Goodman, ICLR 2021,
"Conditional Negative Sampling for Contrastive Learning of Visual Representations").

Per anchor, the ``M`` candidates are ranked by similarity and only a band of ranks is kept: the
closest ones (likely false negatives) and the easy bulk are dropped. As in the authors' code
(mhw32/contrastive-ring-public, ``src/objectives/moco.py`` and ``instdisc.py``):

    sorted = sort(c_i, descending)                 c_ij = s(i, j) / t
    U = floor(rho_out * M);  L = floor(rho_in * U)  # the inner cut is a fraction of the outer set
    ring_i = sorted[L:U]
    l_i = logsumexp({a_i} ∪ ring_i) - a_i           # the positive stays in the partition

``topk(U)`` replaces the full sort (same members, less work); as the loss only needs the
members, not their order, the selection is unsorted (linear-time selection; on CPU over int32
keys that order like the floats, with ``numpy.argpartition`` on long rows, see
:func:`top_k_indices`) and the top ``L`` of the ``U`` kept values are set to ``-inf`` in place
(no mass, no gradient) rather than compacted away: on CPU, every value at or above the ``L``-th
largest (``numpy.partition``, values only), or a second small ``topk`` where equal values sit
at that edge (:func:`_drop_top`). The ring's logits are read from the score matrix, and
their gradient is sent straight to the embeddings (``dL/da_i = sum_j g_ij x_{k_ij} / t``, an
``embedding_bag``; in-batch also ``dL/dx``), instead of through a dense ``[A, C]`` gradient of
the score matrix and its two products (:class:`_BandLogits`). Only ``num_samples`` sorts the
ring, so that a draw picks the same members as the reference's draw.

Ties: the loss depends on the *values* of ranks ``[L, U)`` only, so which of several equal logits
at a band edge is taken does not change it (the reference's sort picks one, ``topk`` another);
the gradient then goes to the member taken. NaN logits (only from non-finite embeddings) rank as
in ``torch.topk`` when their sign bit is clear and last otherwise. A wide ring
(``U > M / 2``, e.g. ``rho_out = 1`` at the start of annealing) is kept as a mask: the top ``L``
and the bottom ``M - U`` are dropped. The band can also be given as rank
percentiles from the top, ``(lower, upper) = (100 rho_in rho_out, 100 rho_out)``; ``(0, 100)``
keeps every candidate and is InfoNCE exactly. With ``num_samples`` a fixed number of ring members
is drawn uniformly *with replacement* (IR-Ring: 4095). With ``anneal`` only ``rho_out`` is
scheduled, from 1 to its final value over the first ``anneal_until`` of training
(:func:`hardneg.schedules.ring_rho_out`).

Edge cases (our choice; the reference never meets them): the band keeps at least one member,
``U >= 1`` and ``L <= U - 1``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._checks import check_choice, check_number
from hardneg.objective import _row_blocks
from hardneg.pool import ContrastiveScores
from hardneg.schedules import ring_rho_out
from hardneg.strategies.base import NegativeSelection, NegativeStrategy, StrategyInputs


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
    blocks = _row_blocks(x)  # ~1 MiB of keys per block
    if len(blocks) == 1:
        return _order_keys(x).topk(k, dim=1, sorted=False).indices
    out = torch.empty(rows, k, dtype=torch.long)
    for block in blocks:
        out[block] = _order_keys(x[block]).topk(k, dim=1, sorted=False).indices
    return out


def _drop_top(values: Tensor, k: int) -> None:
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
    for rows in _row_blocks(values):
        keys = _order_keys_np(array[rows])
        top = keys >= np.partition(keys, kth, axis=1)[:, kth : kth + 1]
        block = values[rows]
        if bool((np.count_nonzero(top, axis=1) == k).all()):
            block.masked_fill_(torch.from_numpy(top), float("-inf"))
        else:
            block.scatter_(1, top_k_indices(block, k), float("-inf"))


def ring_band(num_candidates: int, rho_out: float, rho_in: float) -> tuple[int, int]:
    """Ranks ``[L, U)`` of the ring among ``num_candidates`` sorted by decreasing similarity."""
    upper = max(1, min(num_candidates, math.floor(rho_out * num_candidates + 1e-9)))
    lower = min(math.floor(rho_in * upper + 1e-9), upper - 1)
    return lower, upper


class RingNegatives(NegativeStrategy):
    """Keep negatives whose similarity rank lies in a band ("ring").

    Args:
        rho_out: fraction of candidates in the outer set, in (0, 1].
        rho_in: fraction of the outer set cut from the top, in [0, 1).
        lower, upper: alternatively, the band as rank percentiles from the top,
            ``0 <= lower < upper <= 100`` (overrides ``rho_out`` / ``rho_in``).
        num_samples: None to use every ring member, or draw this many with replacement.
        anneal: None, ``'linear'`` or ``'staircase'`` schedule of ``rho_out`` from 1.
        anneal_until: fraction of training over which the schedule runs (paper: 100 of 200 epochs).
        anneal_steps: number of stairs of the staircase schedule.
    """

    supports_debiasing = False

    def __init__(
        self,
        rho_out: float = 0.1,
        rho_in: float = 0.1,
        *,
        lower: float | None = None,
        upper: float | None = None,
        num_samples: int | None = None,
        anneal: str | None = None,
        anneal_until: float = 0.5,
        anneal_steps: int = 10,
    ) -> None:
        super().__init__()
        if lower is not None or upper is not None:
            if lower is None or upper is None:
                raise ValueError(
                    f"give both lower and upper percentiles of the ring, got lower={lower!r}, upper={upper!r}"
                )
            lower = check_number("lower", lower, low=0.0, high=100.0)
            upper = check_number("upper", upper, low=0.0, high=100.0)
            if not lower < upper:
                raise ValueError(
                    f"ring percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower:g}, upper={upper:g}"
                )
            rho_out, rho_in = upper / 100.0, lower / upper
        self.rho_out = check_number("rho_out", rho_out, low=0.0, high=1.0, low_inclusive=False)
        self.rho_in = check_number("rho_in", rho_in, low=0.0, high=1.0, high_inclusive=False)
        self.num_samples = (
            None
            if num_samples is None
            else int(check_number("num_samples", num_samples, low=1, integer=True))
        )
        self.anneal = (
            None if anneal is None else check_choice("anneal", anneal, ("linear", "staircase"))
        )
        self.anneal_until = check_number("anneal_until", anneal_until, low=0.0, high=1.0)
        self.anneal_steps = int(check_number("anneal_steps", anneal_steps, low=1, integer=True))

    def hparams(self) -> dict[str, object]:
        return {
            "rho_out": self.rho_out,
            "rho_in": self.rho_in,
            "num_samples": self.num_samples,
            "anneal": self.anneal,
            "anneal_until": self.anneal_until,
        }

    def current_rho_out(self, progress: float | None) -> float:
        if self.anneal is None:
            return self.rho_out
        if progress is None:
            raise ValueError(
                f"anneal={self.anneal!r} needs the training progress: pass progress=<fraction in [0, 1]>"
            )
        return ring_rho_out(
            self.rho_out,
            progress,
            until=self.anneal_until,
            kind=self.anneal,
            steps=self.anneal_steps,
        )

    def select(self, scores: ContrastiveScores, inputs: StrategyInputs) -> NegativeSelection:
        m = scores.num_negatives
        lower, upper = ring_band(m, self.current_rho_out(inputs.progress), self.rho_in)
        if lower == 0 and upper == m and self.num_samples is None:
            return NegativeSelection(logits=scores.logits)  # the whole pool: plain InfoNCE
        logits = scores.logits
        if self.num_samples is None and 2 * upper > m:
            return NegativeSelection(logits=self._wide_ring(scores, lower, upper))
        # masked candidates are -inf and rank last, so the top-U are all true negatives
        if self.num_samples is not None:
            # the reference draws uniform ranks of the sorted ring: sort to draw the same members
            indices = logits.detach().topk(upper, dim=1, sorted=True).indices[:, lower:]
            draw = torch.randint(
                0,
                upper - lower,
                (indices.shape[0], self.num_samples),
                generator=inputs.generator,
                device=indices.device,
            )
            indices = indices.gather(1, draw)
            return NegativeSelection(logits=logits.gather(1, indices), indices=indices)
        if not scores.bilinear:
            indices = self._ring_members(logits.detach(), lower, upper)
            return NegativeSelection(logits=logits.gather(1, indices), indices=indices)
        indices, band = self._outer_set(logits.detach(), lower, upper)
        band_logits = _BandLogits.apply(
            scores.anchors, scores.candidates, band, indices, scores.temperature
        )
        return NegativeSelection(logits=band_logits, indices=indices)

    @staticmethod
    def _outer_set(logits: Tensor, lower: int, upper: int) -> tuple[Tensor, Tensor]:
        """``[A, U]`` indices of the top ``U`` candidates (in no particular order) and their
        logits with the top ``L`` set to ``-inf``: the ring, kept in place instead of compacted
        (the objective gives ``-inf`` entries no mass and no gradient)."""
        indices = top_k_indices(logits, upper)
        values = logits.gather(1, indices)
        if lower > 0:
            _drop_top(values, lower)
        return indices, values

    @staticmethod
    def _ring_members(logits: Tensor, lower: int, upper: int) -> Tensor:
        """``[A, U - L]`` candidate indices of ranks ``[L, U)``, in no particular order."""
        values, indices = logits.topk(upper, dim=1, sorted=False)
        if lower == 0:
            return indices
        inner = values.topk(lower, dim=1, sorted=False).indices  # the top L among the U
        keep = torch.ones_like(values, dtype=torch.bool).scatter_(1, inner, False)
        return indices[keep].view(indices.shape[0], upper - lower)

    @staticmethod
    def _wide_ring(scores: ContrastiveScores, lower: int, upper: int) -> Tensor:
        """The logits with everything outside ranks ``[L, U)`` set to ``-inf``: drop the top
        ``L`` and the bottom ``M - U`` negatives (fewer than half of them each)."""
        logits = scores.logits
        with torch.no_grad():
            detached = logits.detach()
            drop = []
            if lower > 0:
                drop.append(detached.topk(lower, dim=1, sorted=False).indices)
            if upper < scores.num_negatives:
                # the smallest finite entries: negate, keeping absent (-inf) entries last and
                # the dropped top out of reach, so that exactly U - L stay even with ties
                flipped = torch.where(torch.isfinite(detached), -detached, float("-inf"))
                if drop:
                    flipped.scatter_(1, drop[0], float("-inf"))
                bottom = scores.num_negatives - upper
                drop.append(flipped.topk(bottom, dim=1, sorted=False).indices)
        if not drop:
            return logits
        return logits.scatter(1, torch.cat(drop, dim=1), float("-inf"))


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
