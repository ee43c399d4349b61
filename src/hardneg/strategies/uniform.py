"""Uniform negatives: every negative counts once.

InfoNCE / NT-Xent (Chen et al., ICML 2020, "A Simple Framework for Contrastive Learning"):

    l_i = -log( e^{s(i,i+)/t} / (e^{s(i,i+)/t} + sum_{j in neg(i)} e^{s(i,j)/t}) )

With the objective's class prior ``tau_plus > 0`` the same uniform selection gives the debiased
contrastive loss of Chuang et al. (NeurIPS 2020).
"""

from __future__ import annotations

from hardneg.pool import ContrastiveScores
from hardneg.strategies.base import NegativeSelection, NegativeStrategy, StrategyInputs


class UniformNegatives(NegativeStrategy):
    """Keep every negative with weight 1."""

    def select(self, scores: ContrastiveScores, inputs: StrategyInputs) -> NegativeSelection:
        return NegativeSelection(logits=scores.logits)
