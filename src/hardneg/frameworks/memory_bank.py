"""Instance discrimination with a memory bank (IR; Wu, Xiong, Yu, Lin, CVPR 2018).

One stored, L2-normalised vector per training image (``bank [N, d]``, initialised with random
unit vectors). One view per image, as in IR. For a batch with dataset indices ``idx``::

    q    = g(f(x))                                  # [B, d]
    pos  = bank[idx]                                # the image's own entry, no gradient
    negs = bank[draw]   draw ~ U{0..N-1}, [B, K]: each anchor its own K draws (default)
         | bank[draw]   draw ~ U{0..N-1}, [K]: one draw shared by the batch (draws='shared')
         | bank         (bank_negatives='all', the image's own entry masked: exclude_index=idx)
    loss = L(q, pos, negatives=negs)
    bank[idx] <- normalize(m * bank[idx] + (1 - m) * normalize(q))      # after the step

``m = 0.5`` in IR (the Ring authors' IR code uses ``m = 0``).

Noise draws: IR's NCE draws ``K`` noise indices *per anchor*, with replacement
(``multinomial.draw(batchSize * (K + 1)).view(batchSize, -1)`` in the authors' code, uniform
weights), so that is the default here: the loss gets a per-anchor pool ``[B, K, d]`` (each anchor
compared with its own ``K`` rows, a row drawn twice counts twice). A draw may hit the image's own
entry (probability ``K / N`` per draw), as in IR's noise draws. ``draws='shared'`` draws one set
of ``K`` rows for the whole batch (cheaper, ``K x d`` instead of ``B x K x d``); ``'auto'`` (the
default) draws per anchor unless the loss says it scores shared columns only
(``loss.per_anchor_columns`` False, UnReMix), which then gets a shared draw.

IR-Ring (Wu et al. 2021) scores each query against the whole bank: ``bank_negatives='all'``
with the ``ring`` loss and ``num_samples=4095``. **Deviation from the authors' ranking**: here the
image's own entry is masked (``exclude_index``) before the ring's band is ranked, so the band is
taken among the ``N - 1`` other entries; the authors' IR-Ring ranks all ``N`` entries with the own
entry among them (usually at rank 0, so it falls in the cut top band and the band's ranks shift
by one). The loss is the same whenever the own entry ranks inside the cut top ``L``; it differs by
one rank at the band edges otherwise, and when ``rho_in = 0`` the authors' ring can contain the
own entry as a negative, ours cannot.

The framework asks the loss what it needs (:class:`~hardneg.frameworks.base.Framework`): the
queries' features for ``feature_kind`` (the bank keeps no hidden features of its entries, so a
``'hidden'`` strategy gets ``h1`` only) and, for a loss that draws, the step's ``generator``
(which also draws the noise indices). A bank of labels (-1 until an entry is first written)
serves the diagnostics only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg.distributed import gather_no_grad, gather_with_grad
from hardneg.frameworks.base import Framework, StepOutput, gather_labels

DRAWS = ("auto", "per_anchor", "shared")


class MemoryBank(Framework):
    """IR-style memory bank of one vector per training image.

    Args:
        backbone, head, loss: the encoder and the loss.
        dataset_size: number of training images ``N``.
        out_dim: projection dimension ``d``.
        momentum: bank momentum ``m`` (IR: 0.5).
        negatives: rows drawn uniformly per step (``K``), or ``'all'`` for the whole bank.
        draws: ``'per_anchor'`` (IR's NCE: each anchor its own ``K`` rows), ``'shared'``
            (one draw of ``K`` rows for the batch) or ``'auto'`` (per anchor when the loss takes
            per-anchor columns, else shared); ignored with ``negatives='all'``.
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
        draws: str = "auto",
    ) -> None:
        super().__init__(backbone, head, loss)
        if negatives != "all" and not (isinstance(negatives, int) and negatives >= 1):
            raise ValueError(f"negatives must be a positive integer or 'all', got {negatives!r}")
        if negatives == "all" and dataset_size < 2:
            raise ValueError("a memory bank with negatives='all' needs at least 2 images")
        if draws not in DRAWS:
            raise ValueError(f"draws must be one of {', '.join(DRAWS)}, got {draws!r}")
        self.momentum = momentum
        self.negatives = negatives
        if draws == "auto":
            draws = "per_anchor" if getattr(loss, "per_anchor_columns", True) else "shared"
        self.draws = draws
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
        z, h = self.project(x)
        q = gather_with_grad(z)
        features = q if self.feature_kind == "projection" else self.features(z, h)
        index = gather_no_grad(index).to(self.bank.device)
        labels = gather_labels(labels)
        positives = self.bank[index]
        exclude = None
        if self.negatives == "all":
            negatives, negative_labels, exclude = self.bank, self.bank_labels, index
        else:
            shape = (
                (index.shape[0], self.negatives)
                if self.draws == "per_anchor"
                else (self.negatives,)
            )
            draw = torch.randint(
                0, self.bank.shape[0], shape, generator=generator, device=self.bank.device
            )
            negatives, negative_labels = self.bank[draw], self.bank_labels[draw]
        loss, diag = self.contrast(
            q,
            positives,
            negatives,
            diagnostics=diagnostics,
            labels=labels,
            negative_labels=negative_labels,
            progress=progress,
            h1=features,
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
