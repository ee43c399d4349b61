"""Uniform negatives: every negative counts once — InfoNCE / NT-Xent and the debiased loss.

InfoNCE / NT-Xent (Chen et al., ICML 2020, "A Simple Framework for Contrastive Learning of
Visual Representations")::

    l_i = -log( e^{s(i,i+)/t} / (e^{s(i,i+)/t} + sum_{j in neg(i)} e^{s(i,j)/t}) )

Debiased contrastive loss (Chuang, Robinson, Lin, Torralba, Jegelka, NeurIPS 2020): the same
uniform selection with the objective's class prior ``tau_plus`` (default 0.1)::

    Ng_i = max( (sum_j e^{s(i,j)/t} - tau_plus M e^{s(i,i+)/t}) / (1 - tau_plus),  M e^{-1/t} )
    l_i  = -log( e^{s(i,i+)/t} / (e^{s(i,i+)/t} + Ng_i) )

``tau_plus = 0`` gives InfoNCE. Both equal lightly's and pytorch-metric-learning's ``NTXentLoss``
(InfoNCE) and the authors' estimator (debiased) to 1e-5 (``tests/test_losses_reference.py``).

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("debiased", tau_plus=0.1, temperature=0.5)
    >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    >>> bool(loss_fn(z1, z2) > 0)
    True
    >>> infonce = hardneg.create_loss("infonce", temperature=0.5)
    >>> no_prior = hardneg.create_loss("debiased", tau_plus=0.0, temperature=0.5)
    >>> torch.allclose(infonce(z1, z2), no_prior(z1, z2))
    True
"""

from __future__ import annotations

from hardneg.contrast import ContrastSet
from hardneg.registry import register_strategy
from hardneg.strategies.base import Selection, StepContext, Strategy


@register_strategy("infonce", summary="InfoNCE / NT-Xent (SimCLR, Chen et al. 2020)")
class UniformNegatives(Strategy):
    """Keep every negative with weight 1 (InfoNCE / NT-Xent)."""

    def __init__(self) -> None:
        super().__init__()

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        return Selection()


@register_strategy("debiased", summary="Debiased contrastive loss (Chuang et al., NeurIPS 2020)")
class DebiasedNegatives(UniformNegatives):
    """Uniform negatives with the debiased estimator's class prior ``tau_plus = 0.1`` by default."""

    loss_defaults = {"tau_plus": 0.1}
