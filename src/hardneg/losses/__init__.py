"""Loss modules: a strategy plugged into the contrastive objective."""

from hardneg.losses.contrastive import ContrastiveLoss, LossOutput

__all__ = ["ContrastiveLoss", "LossOutput"]
