"""hardneg: hard-negative sampling strategies for contrastive representation learning.

>>> import torch, hardneg
>>> loss_fn = hardneg.create_loss("ring", rho_out=0.5, rho_in=0.1)
>>> z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
>>> float(loss_fn(z1, z2)) > 0
True
"""

from hardneg import registry
from hardneg.diagnostics import NegativeDiagnostics
from hardneg.losses import ContrastiveLoss, LossOutput
from hardneg.registry import (
    create_loss,
    describe_loss,
    list_losses,
    loss_hparams,
    register_loss,
    register_strategy,
)
from hardneg.strategies import Selection, StepContext, Strategy

registry.refresh_docs()  # help(hardneg.create_loss) lists every loss, generated from the registry

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "LossOutput",
    "NegativeDiagnostics",
    "Selection",
    "StepContext",
    "Strategy",
    "create_loss",
    "describe_loss",
    "list_losses",
    "loss_hparams",
    "register_loss",
    "register_strategy",
    "__version__",
]
