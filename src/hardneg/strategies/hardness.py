"""Stop-gradient hardness weighting, as sentence-transformers' ``hardness_mode`` (after Lan et
al. 2025, "LLaVE: Large Language and Vision Embedding Models with Hardness-Weighted Contrastive
Learning", Eq. 5; also used by EmbeddingGemma, Schechter Vera et al. 2025).

Every negative logit is raised by a constant (no gradient) multiple of its own similarity::

    c'_ij = c_ij + alpha * stop_grad(s_ij)      i.e.  w_ij = e^{alpha sg(s_ij)}  (not normalised)

so harder negatives count more in the partition, while the positive's logit is unchanged.
Relation to HCL (:mod:`hardneg.strategies.importance`) with ``detach_weights=True``: HCL's
weights are ``w_ij = M softmax_j(beta c_ij)``; with ``alpha = beta / t`` both give every negative
the *same relative* weight, and they differ by the per-anchor factor
``mean_j e^{beta c_ij}`` that HCL divides out (so the losses are equal exactly when that mean is
1, e.g. ``alpha = beta = 0``; ``tests/test_strategies_more.py`` shows both). sentence-transformers
uses ``alpha = 9`` (LLaVE, in-batch negatives) or 5 (EmbeddingGemma, hard negatives).

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("hardness", alpha=9.0, temperature=0.05)
    >>> bool(loss_fn(torch.randn(8, 16), torch.randn(8, 16)) > 0)
    True
"""

from __future__ import annotations

import torch

from hardneg import fastpaths
from hardneg._checks import check_choice, check_number
from hardneg.contrast import ContrastSet
from hardneg.registry import register_strategy
from hardneg.strategies.base import Selection, StepContext, Strategy

MODES = ("all_negatives", "in_batch_negatives", "hard_negatives")


@register_strategy(
    "hardness",
    summary="Stop-gradient hardness weighting (LLaVE, sentence-transformers hardness_mode)",
)
class HardnessWeighting(Strategy):
    """Add ``alpha * stop_grad(cos)`` to the negative logits.

    Args:
        alpha: hardness strength, ``>= 0`` (0 = InfoNCE).
        mode: which negatives, as sentence-transformers' ``hardness_mode``:
            ``'all_negatives'``, ``'in_batch_negatives'`` (every negative not of the anchor's
            own tuple) or ``'hard_negatives'`` (the anchor's own explicit hard negatives only).
    """

    loss_defaults = {"temperature": 0.05}
    supports_debiasing = False

    def __init__(self, *, alpha: float = 9.0, mode: str = "all_negatives") -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0.0)
        self.mode = check_choice("mode", mode, MODES)

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        if self.alpha == 0.0:
            return Selection()  # InfoNCE (and no -inf * 0)
        logits = contrast.negative_logits
        scale = self.alpha * contrast.temperature  # alpha s = alpha t c
        every = isinstance(contrast.num_negatives, int) and contrast.num_negatives > 0
        if context.want_log_mass and every:
            # log sum_j e^{c_ij + alpha sg(s_ij)}; a column that is not a negative stays -inf
            if self.mode == "all_negatives":
                tilted = torch.add(logits, logits.detach(), alpha=scale)  # one pass
            else:
                own = contrast.own_column_mask()
                bonus = (logits.detach() * scale).masked_fill(
                    ~own if self.mode == "hard_negatives" else own, 0.0
                )
                tilted = logits + bonus
            if context.fast:  # |c + alpha sg(s)| <= 1/t + alpha on cosines
                bound = fastpaths.logit_bound(contrast, shift=self.alpha)
                return Selection(negative_log_mass=fastpaths.log_mass(tilted, bound))
            return Selection(negative_log_mass=torch.logsumexp(tilted, dim=1))
        finite = torch.isfinite(logits)
        bonus = torch.where(finite, logits.detach() * scale, 0.0)
        if self.mode != "all_negatives":
            own = contrast.own_column_mask()
            bonus = bonus.masked_fill(~own if self.mode == "hard_negatives" else own, 0.0)
        return Selection(negative_log_weights=bonus.masked_fill(~finite, float("-inf")))
