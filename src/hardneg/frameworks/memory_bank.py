"""Instance discrimination with a memory bank (IR; Wu, Xiong, Yu, Lin, CVPR 2018).

One stored, L2-normalised vector per training image (``bank [N, d]``, initialised with random
unit vectors). One view per image, as in IR. For a batch with dataset indices ``idx``::

    q    = g(f(x))                                  # [B, d]
    pos  = bank[idx]                                # the image's own entry, no gradient
    negs = bank[draw]  (draw ~ U{0..N-1}, bank_negatives rows, shared by the batch)
         | bank        (bank_negatives='all', the image's own entry masked: exclude_index=idx)
    loss = L(q, pos, negatives=negs)
    bank[idx] <- normalize(m * bank[idx] + (1 - m) * normalize(q))      # after the step

``m = 0.5`` in IR (the Ring authors' IR code uses ``m = 0``). IR-Ring (Wu et al. 2021) scores
each query against the whole bank: ``bank_negatives='all'`` with the ``ring`` loss and
``num_samples=4095``. Uniform draws may include the image's own entry (probability
``bank_negatives / N`` per anchor), as in IR's noise draws. A bank of labels (-1 until an
entry is first written) serves the diagnostics only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg.distributed import gather_no_grad, gather_with_grad
from hardneg.frameworks.base import Framework, StepOutput, gather_labels


class MemoryBank(Framework):
    """IR-style memory bank of one vector per training image.

    Args:
        backbone, head, loss: the encoder and the loss.
        dataset_size: number of training images ``N``.
        out_dim: projection dimension ``d``.
        momentum: bank momentum ``m`` (IR: 0.5).
        negatives: rows drawn uniformly per step, or ``'all'`` for the whole bank.
    """

    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        loss: nn.Module,
        *,
        dataset_size: int,
        out_dim: int,
        momentum: float = 0.5,
        negatives: int | str = 4096,
    ) -> None:
        super().__init__(backbone, head, loss)
        if negatives != "all" and not (isinstance(negatives, int) and negatives >= 1):
            raise ValueError(f"negatives must be a positive integer or 'all', got {negatives!r}")
        if negatives == "all" and dataset_size < 2:
            raise ValueError("a memory bank with negatives='all' needs at least 2 images")
        self.momentum = momentum
        self.negatives = negatives
        self.register_buffer("bank", F.normalize(torch.randn(dataset_size, out_dim), dim=1))
        self.register_buffer("bank_labels", torch.full((dataset_size,), -1, dtype=torch.long))

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
        (x,) = views
        q, h = self.project(x)
        q, h = gather_with_grad(q), gather_no_grad(h)
        index = gather_no_grad(index).to(self.bank.device)
        labels = gather_labels(labels)
        positives = self.bank[index]
        if self.negatives == "all":
            negatives, negative_labels, exclude = self.bank, self.bank_labels, index
        else:
            draw = torch.randint(
                0,
                self.bank.shape[0],
                (self.negatives,),
                generator=generator,
                device=self.bank.device,
            )
            negatives, negative_labels, exclude = self.bank[draw], self.bank_labels[draw], None
        loss, diag = self.contrast(
            q,
            positives,
            negatives,
            diagnostics=diagnostics,
            labels=labels,
            negative_labels=negative_labels,
            progress=progress,
            h1=h,
            exclude_index=exclude,
            generator=generator,
        )
        pending = {"index": index, "q": q.detach()}
        if labels is not None:
            pending["labels"] = labels
        return StepOutput(loss=loss, embeddings=q.detach(), diagnostics=diag, pending=pending)

    @torch.no_grad()
    def commit(self, out: StepOutput) -> None:
        """``bank[idx] = normalize(m bank[idx] + (1 - m) normalize(q))``."""
        index, q = out.pending["index"], F.normalize(out.pending["q"].float(), dim=1)
        mixed = self.momentum * self.bank[index] + (1.0 - self.momentum) * q
        self.bank[index] = F.normalize(mixed, dim=1)
        if "labels" in out.pending:
            self.bank_labels[index] = out.pending["labels"].to(self.bank_labels.device)
