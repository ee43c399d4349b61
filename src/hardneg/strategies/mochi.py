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

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("mochi", num_hardest=8, num_mixed=8, num_query_mixed=4)
    >>> bool(loss_fn(torch.randn(16, 8), torch.randn(16, 8)) > 0)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._checks import check_number
from hardneg.contrast import ContrastSet
from hardneg.registry import register_strategy
from hardneg.strategies.base import Selection, StepContext, Strategy


def _uniform(shape, generator, like: Tensor, high: float = 1.0) -> Tensor:
    # drawn in float32 whatever the compute dtype: a seed gives the same mixes in float64
    u = torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)
    return u.to(like.dtype) * high


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

    def synthetic_negatives(self, contrast: ContrastSet, context: StepContext) -> Tensor:
        """``[A, s + s', d]`` the normalised, detached synthetic negatives of every anchor."""
        with torch.no_grad():
            logits = contrast.negative_logits.detach()
            n = min(self.num_hardest, logits.shape[1])
            hardest = logits.topk(n, dim=1).indices  # masked columns (-inf) come last
            # a row with fewer than n negatives must not mix a masked column: clamp to its M
            m = torch.as_tensor(contrast.num_negatives, device=logits.device).expand(
                logits.shape[0]
            )
            available = m.clamp(max=n).unsqueeze(1)
            embeddings = self._column_vectors(contrast, hardest)  # [A, n, d]
            g = context.generator
            a_rows = logits.shape[0]
            mixes = []
            if self.num_mixed:
                pick = (
                    _uniform((a_rows, self.num_mixed, 2), g, logits) * available.unsqueeze(2)
                ).long()
                alpha = _uniform((a_rows, self.num_mixed, 1), g, logits)
                first = embeddings.gather(1, pick[..., :1].expand(-1, -1, embeddings.shape[2]))
                second = embeddings.gather(1, pick[..., 1:].expand(-1, -1, embeddings.shape[2]))
                mixes.append(self._unit(alpha * first + (1 - alpha) * second, contrast))
            if self.num_query_mixed:
                pick = (_uniform((a_rows, self.num_query_mixed), g, logits) * available).long()
                beta = _uniform((a_rows, self.num_query_mixed, 1), g, logits, high=0.5)
                other = embeddings.gather(1, pick.unsqueeze(2).expand(-1, -1, embeddings.shape[2]))
                query = contrast.anchors.detach().unsqueeze(1)
                mixes.append(self._unit(beta * query + (1 - beta) * other, contrast))
            if not mixes:
                return embeddings[:, :0]
            return torch.cat(mixes, dim=1)

    @staticmethod
    def _unit(x: Tensor, contrast: ContrastSet) -> Tensor:
        """Normalised as in the paper; raw dot products (``normalize=False``) keep raw mixes."""
        return F.normalize(x, dim=2) if contrast.normalized else x

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

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        synthetic = self.synthetic_negatives(contrast, context)
        if synthetic.shape[1] == 0:
            return Selection()
        logits = torch.einsum("ad,akd->ak", contrast.anchors, synthetic) / contrast.temperature
        return Selection(extra_negative_logits=logits.to(contrast.negative_logits.dtype))
