"""False-negative cancellation (Huynh, Kornblith, Walter, Maire, Khademi, WACV 2022, "Boosting
Contrastive Self-Supervised Learning with False Negative Cancellation").

Negatives that are likely views of the same class as the anchor ("false negatives") are found
with a *support set*: further views of the anchor's image. A candidate's score is its
similarity to the support views, aggregated over them::

    score_ij = agg_{v in support(i)} s(v, j)          agg = mean or max

and the candidates with the top-``k`` scores (or every score above ``threshold``) are the
anchor's false negatives (an anchor always keeps at least one negative: with ``top_k`` below
its ``M`` and no threshold that holds by itself, otherwise its least similar one to the
support views stays). They are then either

* ``mode='eliminate'``: removed from the anchor's negatives, or
* ``mode='attract'``: removed from the negatives *and* attracted as extra positives (weight 1
  each, every positive in its own partition by default, ``positive_mode`` of the loss).

The support set here is the anchor's positives (``extra_views`` of the in-batch call form are
the paper's support views; with two views it is the one other view, as in the paper's
smallest support set). Scores are detached. Defaults: ``mode='attract'``, ``top_k=1``,
``agg='max'``, no threshold. Fast path (``context.fast``, top-k without a threshold, InfoNCE
objective): :func:`hardneg.fastpaths.kept_log_mass`, tested equal to the scatter form below.

As a filter in front of another strategy (``create_loss("hcl", filter="fnc",
filter_options={"top_k": 2})``), it eliminates: the found false negatives leave the contrast
set and the strategy weights or samples the rest (``mode='eliminate'`` is then the default;
``'attract'`` adds positives, which a filter cannot).

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("fnc", mode="eliminate", top_k=2)
    >>> z1, z2, z3 = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16)
    >>> bool(loss_fn(z1, z2, extra_views=[z3]) > 0)
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


@register_strategy("fnc", summary="False-negative cancellation (Huynh et al., WACV 2022)")
class FalseNegativeCancellation(Strategy):
    """Find likely false negatives from support views; eliminate or attract them.

    Args:
        mode: ``'eliminate'`` or ``'attract'``.
        top_k: false negatives per anchor by aggregated support score (0 = use the threshold only).
        threshold: also (or instead) every negative whose aggregated score exceeds it; None = off.
        agg: aggregation over the support views, ``'max'`` or ``'mean'``.
    """

    supports_debiasing = False
    is_filter = True
    filter_defaults = {"mode": "eliminate"}

    def __init__(
        self,
        *,
        mode: str = "attract",
        top_k: int = 1,
        threshold: float | None = None,
        agg: str = "max",
    ) -> None:
        super().__init__()
        self.mode = check_choice("mode", mode, ("eliminate", "attract"))
        self.top_k = int(check_number("top_k", top_k, low=0, integer=True))
        self.threshold = None if threshold is None else check_number("threshold", threshold)
        self.agg = check_choice("agg", agg, ("max", "mean"))
        if self.top_k == 0 and self.threshold is None:
            raise ValueError("fnc needs top_k >= 1 or a threshold to find false negatives")

    @property
    def adds_positives(self) -> bool:
        return self.mode == "attract"

    def support_logits(self, contrast: ContrastSet) -> Tensor:
        """``[A, S]`` similarity ``/ t`` of every negative column with the anchor's support
        views, aggregated (``-inf`` where a column is not a negative); detached."""
        with torch.no_grad():
            logits = contrast.negative_logits.detach()
            in_batch = contrast.positive_index is not None and contrast.columns is contrast.anchors
            if in_batch:
                # every support view is itself an anchor: its similarities are its own row of
                # the logits, masked where the anchor's row is (the views of a sample, and its
                # duplicates, are masked in every row of that sample)
                sims = logits[contrast.positive_index]  # [A, P, S]
            else:
                support = contrast.positives.detach() / contrast.temperature  # [A, P, d]
                a, p, d = support.shape  # one product [A P, d] x [d, C] (einsum took a bmm)
                sims = (support.reshape(a * p, d) @ contrast.columns.detach().T).view(a, p, -1)
                if contrast.anchor_columns is not None:
                    own = torch.einsum("apd,ahd->aph", support, contrast.anchor_columns.detach())
                    sims = torch.cat([sims, own], dim=2)
            if sims.shape[1] == 1:  # one support view: nothing to aggregate
                score = sims[:, 0]
            else:
                present = (contrast.positive_weight > 0).unsqueeze(2)  # padding is not support
                if self.agg == "max":
                    score = sims.masked_fill(~present, float("-inf")).amax(dim=1)
                else:
                    score = (sims * present).sum(dim=1) / present.sum(dim=1).clamp_min(1)
            if in_batch or contrast.negative_mask is None:  # None: every column is a negative
                return score
            return score.masked_fill(~contrast.negative_mask, float("-inf"))

    def support_scores(self, contrast: ContrastSet) -> Tensor:
        """``[A, S]`` cosine of every negative column with the anchor's support views,
        aggregated (``-inf`` where a column is not a negative)."""
        return self.support_logits(contrast) * contrast.temperature

    def false_negatives(self, contrast: ContrastSet) -> Tensor:
        """``[A, S]`` bool, the detected false negatives of every anchor."""
        score = self.support_logits(contrast)
        found = torch.zeros_like(score, dtype=torch.bool)
        if self.top_k:
            k = min(self.top_k, score.shape[1])
            found.scatter_(1, score.topk(k, dim=1).indices, True)
        if self.threshold is not None:
            found |= score > self.threshold / contrast.temperature
        found &= torch.isfinite(score)
        # never every negative: keep the one least like the support views
        lowest = torch.where(torch.isfinite(score), score, float("inf")).argmin(dim=1, keepdim=True)
        return found.scatter(1, lowest, False)

    def check_filter(self) -> None:
        if self.mode != "eliminate":
            raise ValueError(
                "as a filter, fnc can only eliminate its false negatives (mode='eliminate'); "
                f"got mode={self.mode!r}: to attract them as positives, use the fnc loss itself"
            )

    def keep(self, contrast: ContrastSet, context: StepContext) -> Tensor:
        """``[A, S]`` the anchor's negatives that are not found false negatives."""
        return contrast.mask() & ~self.false_negatives(contrast)

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        m = contrast.num_negatives
        if (
            context.want_log_mass
            and self.threshold is None
            and isinstance(m, int)
            and m > self.top_k
        ):
            # exactly the top-k columns are found, and at least one negative stays: no dense mask
            score = self.support_logits(contrast)
            if self.top_k == 1:
                top = score.argmax(dim=1, keepdim=True)
            else:
                top = score.topk(self.top_k, dim=1, sorted=False).indices
            logits = contrast.negative_logits
            if context.fast:  # one exponential, the read logits' gradient in the same buffer
                out = fastpaths.kept_log_mass(
                    logits,
                    drop=top,
                    negative_mask=contrast.negative_mask,
                    read=self.mode == "attract",
                    bound=1.0 / contrast.temperature if contrast.normalized else None,
                )
                if self.mode == "eliminate":
                    return Selection(negative_log_mass=out)
                return Selection(negative_log_mass=out[0], extra_positive_logits=out[1])
            log_mass = torch.logsumexp(logits.scatter(1, top, float("-inf")), dim=1)
            if self.mode == "eliminate":
                return Selection(negative_log_mass=log_mass)
            return Selection(
                negative_log_mass=log_mass, extra_positive_logits=logits.gather(1, top)
            )
        found = self.false_negatives(contrast)
        log_w = torch.zeros_like(contrast.negative_logits).masked_fill(found, float("-inf"))
        if self.mode == "eliminate":
            return Selection(negative_log_weights=log_w)
        # attract: every found column becomes an extra positive (weight 1; 0 elsewhere), laid
        # out over all S columns so that no data-dependent size is needed
        extra = torch.where(found, contrast.negative_logits, 0.0)
        return Selection(
            negative_log_weights=log_w,
            extra_positive_logits=extra,
            extra_positive_weight=found.to(extra.dtype),
        )
