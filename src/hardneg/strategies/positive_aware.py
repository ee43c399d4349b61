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

Our addition: an anchor whose every negative would be dropped keeps its least similar one (all
of them on an exact tie), so the loss is never an empty sum (a ``logsumexp`` over nothing has a
NaN gradient). The rule is applied to the logits ``c = s / t`` themselves (the same inequality,
no ``[A, S]`` pass to undo the temperature). Fast path (``context.fast``, InfoNCE objective):
:func:`hardneg.fastpaths.kept_log_mass`, tested equal to the masked ``logsumexp`` below.

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("positive_aware", mode="percent", percent=0.95)
    >>> bool(loss_fn(torch.randn(8, 16), torch.randn(8, 16)) > 0)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg import fastpaths
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
        if not 0.0 <= self.percent <= 1.0:  # percent=95, read as a percentage, kept everything
            raise ValueError(
                f"percent must be a fraction in [0, 1] (0.95 keeps negatives up to 95% of the "
                f"positive's score), got {percent!r}"
            )

    def _rule_limit(self, contrast: ContrastSet) -> Tensor:
        """``[A, 1]`` the highest negative logit the rule keeps, in logit units ``c = s / t``:
        ``s <= s+ - margin`` is ``c <= c+ - margin / t``; ``s <= percent s+`` is
        ``c <= percent c+``."""
        positive = contrast.positive_logits.detach()[:, :1]
        if self.mode == "margin":
            return positive - self.margin / contrast.temperature
        return positive * self.percent

    def _limit(self, contrast: ContrastSet) -> Tensor:
        """``[A, 1]`` the rule's limit raised to the anchor's lowest negative logit, so that the
        least similar negative always stays (the loss is never an empty sum)."""
        logits = contrast.negative_logits.detach()  # -inf where not a negative
        limit = self._rule_limit(contrast)
        masked = (
            logits
            if contrast.negative_mask is None
            else logits.masked_fill(~contrast.negative_mask, float("inf"))
        )
        return torch.maximum(limit, masked.amin(dim=1, keepdim=True))

    def keep(self, contrast: ContrastSet, context: StepContext) -> Tensor:
        keep = contrast.negative_logits.detach() <= self._limit(contrast)
        return keep if contrast.negative_mask is None else keep & contrast.negative_mask

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        logits = contrast.negative_logits
        if context.fast and context.want_log_mass and _every_anchor_has_negatives(contrast):
            # the same sum from one exponential, no -inf pass (tested equal to the form below)
            mass = fastpaths.kept_log_mass(
                logits,
                limit=self._rule_limit(contrast),
                negative_mask=contrast.negative_mask,
                bound=1.0 / contrast.temperature if contrast.normalized else None,
            )
            return Selection(negative_log_mass=mass)
        dropped = logits.detach() > self._limit(contrast)  # never a masked column (-inf)
        if context.want_log_mass and _every_anchor_has_negatives(contrast):
            # every anchor keeps at least one negative: a plain log-sum-exp over the kept ones
            kept = logits.masked_fill(dropped, float("-inf"))
            return Selection(negative_log_mass=torch.logsumexp(kept, dim=1))
        log_w = torch.zeros_like(logits).masked_fill(dropped, float("-inf"))
        return Selection(negative_log_weights=log_w)


def _every_anchor_has_negatives(contrast: ContrastSet) -> bool:
    """True when every anchor has the same, positive, number of negatives (known on the host)."""
    return isinstance(contrast.num_negatives, int) and contrast.num_negatives > 0
