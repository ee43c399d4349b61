"""Positive-aware negative filtering (Moreira, Osmulski, Xu, Ak, Schifferer, Oldridge,
"NV-Retriever: Improving text embedding models with effective hard-negative mining", 2024).

A negative that scores (almost) as high as the anchor's positive is likely a false negative.
With ``s+_i`` the cosine similarity of anchor ``i`` and its (first) positive, negative ``j`` is
kept when

    mode='margin'  (TopK-MarginPos):  s_ij <= s+_i - margin
    mode='percent' (TopK-PercPos):    s_ij <= percent * s+_i

The scores are the model's own, detached (NV-Retriever applies the rule with a teacher's scores
while mining; :func:`hardneg.mining` does the same offline). Every kept negative counts once,
so on its own this is InfoNCE over the filtered set; as a ``filter`` it stands in front of any
other strategy: ``create_loss("hcl", filter="positive_aware", filter_options={"margin": 0.1})``.

Our addition: an anchor whose every negative would be dropped keeps its least similar one, so
the loss is never an empty sum (a ``logsumexp`` over nothing has a NaN gradient).

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("positive_aware", mode="percent", percent=0.95)
    >>> bool(loss_fn(torch.randn(8, 16), torch.randn(8, 16)) > 0)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg._checks import check_choice, check_number
from hardneg.contrast import ContrastSet
from hardneg.registry import register_strategy
from hardneg.strategies.base import Selection, StepContext, Strategy


@register_strategy(
    "positive_aware", summary="Positive-aware filtering, NV-Retriever (Moreira et al. 2024)"
)
class PositiveAwareFilter(Strategy):
    """Drop negatives scoring above the positive minus a margin, or above a fraction of it.

    Args:
        mode: ``'margin'`` (TopK-MarginPos) or ``'percent'`` (TopK-PercPos).
        margin: absolute cosine margin below the positive's score (mode 'margin').
        percent: fraction of the positive's score a negative may reach (mode 'percent').
    """

    is_filter = True
    supports_debiasing = False

    def __init__(
        self, *, mode: str = "percent", margin: float = 0.05, percent: float = 0.95
    ) -> None:
        super().__init__()
        self.mode = check_choice("mode", mode, ("margin", "percent"))
        self.margin = check_number("margin", margin)
        self.percent = check_number("percent", percent)

    def keep(self, contrast: ContrastSet, context: StepContext) -> Tensor:
        t = contrast.temperature
        sims = contrast.negative_logits.detach() * t  # -inf where not a negative
        positive = contrast.positive_logits.detach()[:, :1] * t
        limit = positive - self.margin if self.mode == "margin" else positive * self.percent
        keep = sims <= limit
        # never an empty set: the least similar negative of each anchor always stays
        lowest = torch.where(torch.isfinite(sims), sims, float("inf")).argmin(dim=1, keepdim=True)
        return keep.scatter(1, lowest, True) & torch.isfinite(sims)

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        keep = self.keep(contrast, context)
        log_w = torch.zeros_like(contrast.negative_logits).masked_fill(~keep, float("-inf"))
        return Selection(negative_log_weights=log_w)
