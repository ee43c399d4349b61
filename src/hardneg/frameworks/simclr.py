"""SimCLR (Chen et al. 2020): two (or more) views, in-batch negatives.

Each view goes through the backbone and the projection head separately (as in the HCL reference
code, joshr17/HCL ``image/main.py``, so batch-norm statistics are per view); the loss gets the
projections ``z1, z2 [B, d]`` and, when its strategy asks for them (``loss.feature_kind``), the
head's hidden features ``h1, h2`` (the input of its last linear layer, ``'hidden'``) or the
projections themselves (``'projection'``: SimCLR has no predictor). With ``torchrun`` the projections of every rank
are gathered with gradients, so the negatives are those of the global batch; batch-norm
statistics stay per rank unless the trainer's ``train.sync_bn`` converts the model to
SyncBatchNorm (GPUs only), as multi-GPU SimCLR set-ups usually do.

Several positives: ``views=V`` full-size views and ``small_crops=S`` low-resolution crops
(multi-crop, Caron et al. 2020, as solo-learn offers for SimCLR) give ``V + S`` views of each
image; every view is an anchor whose positives are the image's other ``V + S - 1`` views, and
whose negatives are every view of the other images (``loss(z1, z2, extra_views=[...])``, the
loss's ``positive_mode`` deciding how the positives share a partition). A strategy that reads
features of two views (``feature_kind``) takes two views only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg.distributed import gather_with_grad
from hardneg.frameworks.base import Framework, StepOutput, gather_labels


class SimCLR(Framework):
    """In-batch contrastive learning: ``loss(z1, z2)`` over ``2B`` anchors."""

    num_views = 2

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Module,
        loss: torch.nn.Module,
        *,
        views: int = 2,
        small_crops: int = 0,
    ) -> None:
        super().__init__(backbone, head, loss)
        if isinstance(views, bool) or not isinstance(views, int) or views < 2:
            raise ValueError(f"views must be an integer >= 2, got {views!r}")
        if isinstance(small_crops, bool) or not isinstance(small_crops, int) or small_crops < 0:
            raise ValueError(f"small_crops must be an integer >= 0, got {small_crops!r}")
        if views + small_crops > 2 and self.feature_kind is not None:
            raise ValueError(
                f"the loss reads the {self.feature_kind} features of exactly two views; "
                f"views={views} and small_crops={small_crops} give {views + small_crops}"
            )
        self.num_views = views + small_crops
        self.num_small_crops = small_crops

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
        if len(views) != self.num_views:
            raise ValueError(f"SimCLR takes {self.num_views} views per image, got {len(views)}")
        if self.num_views > 2:  # several positives: no features (refused in __init__)
            # each view through the network on its own (per-view batch-norm statistics; the
            # small crops have another resolution)
            zs = [gather_with_grad(self.project(x)[0]) for x in views]
            loss, diag = self.contrast(
                zs[0],
                zs[1],
                extra_views=zs[2:],
                diagnostics=diagnostics,
                labels=gather_labels(labels),
                progress=progress,
                generator=generator,
            )
            return StepOutput(loss=loss, embeddings=torch.cat(zs).detach(), diagnostics=diag)
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
