"""Loss modules: a strategy plugged into an objective over a contrast set."""

from hardneg.losses.contrastive import ContrastInputs, ContrastiveLoss, LossOutput

__all__ = ["ContrastInputs", "ContrastiveLoss", "LossOutput"]
