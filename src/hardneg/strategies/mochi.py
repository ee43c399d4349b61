"""MoCHi: hard negative mixing (Kalantidis, Sariyildiz, Pion, Weinzaepfel, Larlus, NeurIPS 2020,
"Hard Negative Mixing for Contrastive Learning").

For each anchor ``q`` (L2-normalised), its negatives are ordered by similarity and the ``N``
hardest kept, ``Q~ = {n_1..n_N}``. Synthetic negatives are feature-level mixes of them::

    h_k  = normalise( a_k n_i + (1 - a_k) n_j ),     n_i, n_j ∈ Q~,  a_k ~ U(0, 1),   k = 1..s
    h'_k = normalise( b_k q + (1 - b_k) n_j ),        n_j ∈ Q~,       b_k ~ U(0, 0.5), k = 1..s'

(the second kind, mixing the query itself in with a coefficient below 0.5, gives even harder
negatives). With raw dot products (``normalize=False``, e.g. the Jensen-Shannon objective) the
mixes are left unnormalised. They are appended to the anchor's negatives with logits ``q · h / t``; no gradient
flows through the synthesis (the mixes are detached, only ``q`` in ``q · h`` carries one). The
pairs ``(i, j)`` are drawn uniformly from ``Q~`` (``i != j`` is not enforced: a pair with
``i = j`` gives ``n_i`` itself, as in the paper's sampling). Defaults ``N = 1024``, ``s = 1024``,
``s' = 128`` (one of the paper's reported configurations), capped at the anchor's ``M``.

Every other negative keeps weight 1 (MoCHi is InfoNCE with more negatives); the debiased
estimator applies on top if ``tau_plus > 0`` with ``M`` counting the synthetic ones.

The mixes are never built: their logits follow from dot products the loss already has. For
unit vectors, with ``g_ij = n_i · n_j`` (an entry of the columns' Gram matrix)::

    q · h_k  = (a_k q·n_i + (1 - a_k) q·n_j) / sqrt(a_k^2 + (1 - a_k)^2 + 2 a_k (1 - a_k) g_ij)
    q · h'_k = (b_k q·q + (1 - b_k) q·n_j)   / sqrt(b_k^2 + (1 - b_k)^2 + 2 b_k (1 - b_k) q·n_j)

with the mixing coefficients and the norms detached, so the gradient is ``h / t`` as with the
detached mixes (:meth:`HardNegativeMixing.synthetic_negatives` builds them explicitly, for
analysis and tests). This costs ``O(A (s + s'))`` instead of ``O(A (s + s') d)``.

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("mochi", num_hardest=8, num_mixed=8, num_query_mixed=4)
    >>> bool(loss_fn(torch.randn(16, 8), torch.randn(16, 8)) > 0)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg import fastpaths
from hardneg._checks import check_number
from hardneg.contrast import ContrastSet
from hardneg.registry import register_strategy
from hardneg.strategies.base import Selection, StepContext, Strategy

if TYPE_CHECKING:
    from hardneg.losses.contrastive import ContrastInputs

# elements of the gathered column vectors per block of anchors in the row-wise dot products
_BLOCK = 1 << 22


def _rows(contrast: ContrastSet, part: slice) -> ContrastSet:
    """The anchors ``part`` of ``contrast`` as far as :meth:`HardNegativeMixing._column_vectors`
    reads it (the shared columns, and the anchors' own columns)."""
    own = None if contrast.anchor_columns is None else contrast.anchor_columns[part]
    return replace(contrast, anchors=contrast.anchors[part], anchor_columns=own)


@dataclass
class MixDraws:
    """The random part of one step: which columns are mixed, and with which coefficients.

    ``columns`` ``[A, 2 s + s']``: the column indices ``i`` (first ``s``) and ``j`` (next ``s``)
    of the pair mixes, then the column ``j`` of the query mixes; ``alpha`` ``[A, s]`` the pair
    mixes' ``a_k`` and ``beta`` ``[A, s']`` the query mixes' ``b_k``.
    """

    columns: Tensor
    alpha: Tensor
    beta: Tensor

    @property
    def first(self) -> Tensor:
        return self.columns[:, : self.alpha.shape[1]]

    @property
    def second(self) -> Tensor:
        s = self.alpha.shape[1]
        return self.columns[:, s : 2 * s]

    @property
    def other(self) -> Tensor:
        return self.columns[:, 2 * self.alpha.shape[1] :]


def anchor_column_logits(contrast: ContrastSet) -> Tensor:
    """``[A, S]`` ``q · n / t`` for every column, with a gradient to the anchors only (the
    columns are detached, as the synthesis is)."""
    q = contrast.anchors / contrast.temperature
    logits = q @ contrast.columns.detach().T
    if contrast.anchor_columns is not None:
        own = torch.einsum("ad,ahd->ah", q, contrast.anchor_columns.detach())
        logits = torch.cat([logits, own], dim=1)
    return logits.to(contrast.negative_logits.dtype)


@register_strategy("mochi", summary="MoCHi hard negative mixing (Kalantidis et al., NeurIPS 2020)")
class HardNegativeMixing(Strategy):
    """Append synthetic negatives mixed from each anchor's hardest negatives.

    Args:
        num_hardest: ``N``, the hardest negatives mixed from (capped at ``M``).
        num_mixed: ``s``, mixes of two hard negatives per anchor.
        num_query_mixed: ``s'``, mixes of the anchor with one hard negative (coefficient < 0.5).
    """

    loss_defaults = {"temperature": 0.2}
    draws = True
    # a batch holds far fewer negatives than the paper's queue (16k-65k): compare / demo on
    # in-batch negatives mix fewer (the full defaults would mix 2x the batch per anchor)
    in_batch_defaults = {"num_hardest": 128, "num_mixed": 128, "num_query_mixed": 32}

    def __init__(
        self, *, num_hardest: int = 1024, num_mixed: int = 1024, num_query_mixed: int = 128
    ) -> None:
        super().__init__()
        self.num_hardest = int(check_number("num_hardest", num_hardest, low=1, integer=True))
        self.num_mixed = int(check_number("num_mixed", num_mixed, low=0, integer=True))
        self.num_query_mixed = int(
            check_number("num_query_mixed", num_query_mixed, low=0, integer=True)
        )

    def terms(
        self, inputs: ContrastInputs, context: StepContext
    ) -> list[tuple[float, ContrastSet, str]]:
        """The standard contrast set; in-batch on the fast path with InfoNCE, the same set from
        :func:`fastpaths.pair_contrast` (its backward without the masking passes). That set
        carries no features or labels: MoCHi reads neither, and the fast path is off when
        diagnostics (the labels' only reader) are asked for."""
        if context.fast and fastpaths.mochi_in_batch_fits(self, inputs, context):
            contrast = fastpaths.pair_contrast(inputs.z1, inputs.z2, temperature=inputs.temperature)
            return [(1.0, contrast, "main")]
        return super().terms(inputs, context)

    def hardest(self, contrast: ContrastSet, fast: bool = False) -> tuple[Tensor, Tensor]:
        """``(index [A, k'], count [A, 1])``: the first ``count_a = min(N, M_a)`` entries of row
        ``a`` are the columns of its hardest negatives ``Q~``, in increasing column order (the
        pairs are drawn uniformly from the set; a fixed order gives a seed the same draws
        however the set is found). ``Q~`` holds the negatives above the ``N``-th largest logit
        and as many of those equal to it as fit, the first in column order. ``k' = min(N, S)``,
        or ``min(N, M)`` on the fast path when every anchor has ``M``. ``fast``: the ``N``-th
        largest logit by :func:`fastpaths.kth_largest` (numpy's partition) instead of
        ``torch.topk`` and the compaction by :func:`fastpaths.row_members`; the same result."""
        logits = contrast.negative_logits.detach()
        rows, cols = logits.shape
        k = min(self.num_hardest, cols)
        m = contrast.num_negatives
        count = torch.as_tensor(m, device=logits.device).clamp(max=k).expand(rows).unsqueeze(1)
        if k < cols:
            if fast and isinstance(m, int) and m >= k:  # k members per row: one numpy pass
                index = fastpaths.hardest_columns(logits, k)
                if index is not None:
                    return index, count
            if fast:
                kth = fastpaths.kth_largest(logits, k)
            else:
                kth = logits.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
            member = logits >= kth  # kth = -inf on a row with fewer than k negatives
            if not (isinstance(m, int) and m >= k):
                member &= torch.isfinite(logits)
            # a tie at the k-th logit (the plain form never branches on data: torch.compile)
            if not fast:
                member = _first_members(logits, kth, count)
            else:  # only the rows holding a tie: no [A, S] integer buffers for the others
                tie_rows = (torch.count_nonzero(member, dim=1) != count.squeeze(1)).nonzero()
                if tie_rows.numel() > 0:
                    tie_rows = tie_rows.squeeze(1)
                    member[tie_rows] = _first_members(
                        logits[tie_rows], kth[tie_rows], count[tie_rows]
                    )
        elif contrast.negative_mask is None:  # every column is a negative
            return torch.arange(cols, device=logits.device).expand(rows, cols), count
        else:
            member = contrast.negative_mask
        if fast:  # the members row by row in column order (an output of data-dependent size)
            return fastpaths.row_members(member, count, k, isinstance(m, int)), count
        # each member moved to its rank within its row (slot k collects the rest, dropped)
        slot = member.cumsum(dim=1).sub_(1).masked_fill_(~member, k)
        index = torch.arange(cols, device=logits.device).expand(rows, cols)
        return slot.new_zeros(rows, k + 1).scatter_(1, slot, index)[:, :k], count

    def draw(self, contrast: ContrastSet, context: StepContext) -> MixDraws:
        """Draw the pairs ``(i, j)`` uniformly from ``Q~``, ``a ~ U(0, 1)``, ``b ~ U(0, 0.5)``."""
        s, s_query = self.num_mixed, self.num_query_mixed
        with torch.no_grad():
            index, count = self.hardest(contrast, fast=context.fast)
            rows = index.shape[0]
            # float32 draws whatever the compute dtype: a seed gives the same mixes in float64;
            # u * count < count for u < 1 and count < 2^24 (no clamp)
            uniforms = fastpaths.mochi_uniforms if context.fast else _unit_uniforms
            u = uniforms((rows, 3 * s + 2 * s_query), context.generator, index.device)
            columns = index.gather(1, u[:, : 2 * s + s_query].mul(count).long())
            coefficient = u[:, 2 * s + s_query :].to(contrast.negative_logits.dtype)
            return MixDraws(columns, alpha=coefficient[:, :s], beta=coefficient[:, s:] * 0.5)

    def synthetic_negatives(
        self, contrast: ContrastSet, context: StepContext, draws: MixDraws | None = None
    ) -> Tensor:
        """``[A, s + s', d]`` the synthetic negatives of every anchor, built explicitly and
        detached (analysis and tests; the loss uses their dot products only)."""
        with torch.no_grad():
            draws = self.draw(contrast, context) if draws is None else draws
            first = self._column_vectors(contrast, draws.first)
            second = self._column_vectors(contrast, draws.second)
            pairs = draws.alpha.unsqueeze(2) * first + (1 - draws.alpha.unsqueeze(2)) * second
            other = self._column_vectors(contrast, draws.other)
            query = contrast.anchors.detach().unsqueeze(1)
            b = draws.beta.unsqueeze(2)
            mixes = torch.cat([pairs, b * query + (1 - b) * other], dim=1)
            return F.normalize(mixes, dim=2) if contrast.normalized else mixes

    @staticmethod
    def _column_vectors(contrast: ContrastSet, index: Tensor) -> Tensor:
        """Embeddings ``[A, n, d]`` of the columns ``index`` ``[A, n]`` of each anchor."""
        c = contrast.num_shared
        d = contrast.anchors.shape[1]
        own = None
        if contrast.anchor_columns is not None:
            own_index = (index - c).clamp(min=0).unsqueeze(2).expand(-1, -1, d)
            own = contrast.anchor_columns.detach().gather(1, own_index)
            if c == 0:  # a pool per anchor: every column is the anchor's own
                return own
        shared = contrast.columns.detach()[index.clamp(max=c - 1)]
        if own is None:
            return shared
        return torch.where((index < c).unsqueeze(2), shared, own)

    def pair_similarity(
        self, contrast: ContrastSet, first: Tensor, second: Tensor, fast: bool = False
    ) -> Tensor:
        """``[A, s]`` ``n_i · n_j`` of the drawn pairs: entries of the columns' Gram matrix (one
        matrix product, far faster than row-wise dot products) when it is at most 16 times the
        size of the logits, else row-wise dot products in blocks of anchors of bounded size."""
        with torch.no_grad():
            columns = contrast.columns.detach()
            c = columns.shape[0]
            if contrast.anchor_columns is None and c * c <= 16 * contrast.negative_logits.numel():
                if fast:  # in-batch: read from the logits; else the Gram's upper triangle only
                    cosine = fastpaths.mochi_in_batch_cosine(contrast, first, second)
                    if cosine is None:
                        cosine = fastpaths.pair_gram(columns, first, second)
                    return cosine
                flat = torch.add(second, first, alpha=c).view(-1)  # a flat look-up: index_select
                return (columns @ columns.T).view(-1).index_select(0, flat).view(first.shape)
            rows = max(1, _BLOCK // max(1, first.shape[1] * columns.shape[1]))
            blocks = []
            for start in range(0, first.shape[0], rows):
                part = slice(start, start + rows)
                x = self._column_vectors(_rows(contrast, part), first[part])
                y = self._column_vectors(_rows(contrast, part), second[part])
                blocks.append(torch.linalg.vecdot(x, y))
            return torch.cat(blocks)

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        s = self.num_mixed
        if s + self.num_query_mixed == 0:
            return Selection()
        if context.fast and context.want_log_mass:  # by blocks of rows, a one-product backward
            mass = fastpaths.mochi_mix_log_mass(self, contrast, context)
            real = fastpaths.contrast_log_mass(contrast)
            return Selection(
                negative_log_mass=torch.logaddexp(real, mass),
                num_negatives=contrast.num_negatives + s + self.num_query_mixed,
            )
        draws = self.draw(contrast, context)
        t = contrast.temperature
        # q · n / t of every mixed column (n_i, n_j of the pairs, n_j of the query mixes), with
        # a gradient to q only; the coefficients (a, 1 - a, b, 1 - b over the norm) are detached
        if context.fast:
            dots = fastpaths.mixed_column_logits(contrast, draws.columns)
        else:
            dots = anchor_column_logits(contrast).gather(1, draws.columns)
        with torch.no_grad():
            a, b = draws.alpha, draws.beta
            if contrast.normalized:
                g = self.pair_similarity(contrast, draws.first, draws.second, context.fast)
                pair_scale = _inverse_mix_norm(a, g)
                query_scale = _inverse_mix_norm(b, dots[:, 2 * s :] * t)
            else:  # raw dot products: the mixes are not normalised
                pair_scale = query_scale = torch.ones_like(a[:, :1])
            first = a * pair_scale
            coefficient = torch.cat([first, pair_scale - first, query_scale - b * query_scale], 1)
        weighted = dots * coefficient
        pairs = weighted[:, :s] + weighted[:, s : 2 * s]
        q = contrast.anchors
        q_dot_q = (q * q.detach()).sum(dim=1, keepdim=True) / t  # gradient q.detach() / t
        queries = torch.addcmul(weighted[:, 2 * s :], b * query_scale, q_dot_q)
        extra = torch.cat([pairs, queries], dim=1)
        if isinstance(contrast.num_negatives, Tensor):  # a row without negatives mixes nothing
            extra = extra.masked_fill((contrast.num_negatives == 0).unsqueeze(1), float("-inf"))
        return Selection(extra_negative_logits=extra.to(contrast.negative_logits.dtype))


def _first_members(logits: Tensor, kth: Tensor, count: Tensor) -> Tensor:
    """``[A, S]`` the hardest set of each row: the logits above its ``k``-th largest ``kth``
    ``[A, 1]`` and, of those equal to it, the first in column order up to ``count`` ``[A, 1]``
    members in all (``kth = -inf``: a row with fewer negatives than ``N``, its finite ones)."""
    member = logits > kth
    tied = (logits == kth) & torch.isfinite(kth)
    tied &= tied.cumsum(dim=1) <= count - member.sum(dim=1, keepdim=True)
    return member | tied


def _unit_uniforms(shape: tuple[int, int], generator, device) -> Tensor:
    """``shape`` float32 uniforms on ``(0, 1)``, two per random int64 word (one generator call,
    half the calls of ``torch.rand``): 23 random bits ``j`` each, as the mantissa of
    ``1 + j 2^-23``, shifted to ``(2 j + 1) 2^-24`` (the midpoints of ``2^23`` equal cells)."""
    n = shape[0] * shape[1]
    # out of place (torch.compile traces it); 2^64 - 1 values, one fewer than 64 random bits
    words = torch.randint(-(2**63), 2**63 - 1, (-(-n // 2),), generator=generator, device=device)
    bits = words.view(torch.int32)[:n] & 0x7FFFFF | 0x3F800000  # the bits of 1 + j 2^-23
    return bits.view(torch.float32).sub(1.0 - 2.0**-24).view(shape)


def _inverse_mix_norm(a: Tensor, cosine: Tensor) -> Tensor:
    """``1 / ||a x + (1 - a) y||`` of unit vectors with ``x · y = cosine``: the squared norm is
    ``a^2 + (1 - a)^2 + 2 a (1 - a) cosine = 1 - 2 a (1 - a) (1 - cosine)`` (the norm at least
    ``1e-12``, as :func:`torch.nn.functional.normalize` divides)."""
    square = (cosine - 1).mul_(a * (1 - a)).mul_(2).add_(1)
    return square.clamp_(min=1e-24).rsqrt_()
