"""SimCLR (Chen et al. 2020): two views, in-batch negatives.

Each view goes through the backbone and the projection head separately (as in the HCL reference
code, joshr17/HCL ``image/main.py``, so batch-norm statistics are per view); the loss gets the
projections ``z1, z2 [B, d]`` and, when its strategy asks for them (``loss.feature_kind``), the
head's hidden features ``h1, h2`` (the input of its last linear layer, ``'hidden'``) or the
projections themselves (``'projection'``: SimCLR has no predictor). With ``torchrun`` the projections of every rank
are gathered with gradients, so the negatives are those of the global batch; batch-norm
statistics stay per rank unless the trainer's ``train.sync_bn`` converts the model to
SyncBatchNorm (GPUs only), as multi-GPU SimCLR set-ups usually do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg.distributed import gather_with_grad
from hardneg.frameworks.base import Framework, StepOutput, gather_labels


class SimCLR(Framework):
    """In-batch contrastive learning: ``loss(z1, z2)`` over ``2B`` anchors."""

    num_views = 2

    def forward(
        self,
        views: list[Tensor],
        *,
        index: Tensor,
        labels: Tensor | None = None,
        progress: float | None = None,
        generator: torch.Generator | None = None,
        diagnostics: bool = False,
    ) -> StepOutput:
        x1, x2 = views
        z1, h1 = self.project(x1)
        z2, h2 = self.project(x2)
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        if self.feature_kind == "projection":  # no predictor: the projections themselves
            f1, f2 = z1, z2
        else:
            f1, f2 = self.features(z1, h1), self.features(z2, h2)
        loss, diag = self.contrast(
            z1,
            z2,
            diagnostics=diagnostics,
            labels=gather_labels(labels),
            progress=progress,
            h1=f1,
            h2=f2,
            generator=generator,
        )
        return StepOutput(loss=loss, embeddings=torch.cat([z1, z2]).detach(), diagnostics=diag)
