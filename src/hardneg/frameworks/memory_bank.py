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
queries' features for ``feature_kind`` and, for a loss that draws, the step's ``generator``
(which also draws the noise indices). A bank of labels (-1 until an entry is first written)
serves the diagnostics only.

Hidden features (``feature_kind == 'hidden'``, UnReMix): a second bank ``bank_hidden [N, h]``
holds the head's hidden features of every entry, written with the same momentum as the bank,
``bank_hidden[idx] <- m * bank_hidden[idx] + (1 - m) * h`` (zeros until first written: such an
entry gets a zero feature similarity), and the drawn rows' features reach the loss as
``negative_h`` (shared draws and ``'all'``: the only pools UnReMix scores). Without it the
strategy would score the bank's entries with ``h = z`` while the queries use ``h``. Cost: ``N x h``
floats, e.g. 50,000 x 512 x 4 B = 102 MB for CIFAR-10 with the linear head on a ResNet-18 (the
128-d bank itself is 26 MB); only a loss that asks for hidden features gets it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg.distributed import gather_no_grad, gather_with_grad
from hardneg.frameworks.base import Framework, StepOutput, gather_labels, hidden_dim

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
        # the entries' hidden features, for negative_h (None: not kept, not in state_dict)
        keep_hidden = self.feature_kind == "hidden"
        hidden = torch.zeros(dataset_size, hidden_dim(head, backbone)) if keep_hidden else None
        self.register_buffer("bank_hidden", hidden)

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
        exclude = negative_h = None
        if self.negatives == "all":
            negatives, negative_labels, exclude = self.bank, self.bank_labels, index
            negative_h = self.bank_hidden
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
            if self.bank_hidden is not None and self.draws == "shared":
                # a per-anchor pool takes no negative_h (the loss scores shared columns only)
                negative_h = self.bank_hidden[draw]
        loss, diag = self.contrast(
            q,
            positives,
            negatives,
            diagnostics=diagnostics,
            labels=labels,
            negative_labels=negative_labels,
            progress=progress,
            h1=features,
            negative_h=negative_h,
            exclude_index=exclude,
            generator=generator,
        )
        pending = {"index": index, "q": q.detach()}
        if labels is not None:
            pending["labels"] = labels
        if self.bank_hidden is not None:
            pending["hidden"] = features  # global rows, detached (features() gathers no grad)
        return StepOutput(loss=loss, embeddings=q.detach(), diagnostics=diag, pending=pending)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a checkpoint written before the bank kept hidden features has no bank_hidden: start
        # it from zeros (as a new bank) instead of refusing the resume
        key = prefix + "bank_hidden"
        if self.bank_hidden is not None and key not in state_dict:
            warnings.warn(
                "the checkpoint has no hidden features of the memory bank's entries (written "
                "before the bank kept them); they start from zeros and fill in as the entries "
                "are rewritten",
                stacklevel=2,
            )
            state_dict[key] = torch.zeros_like(self.bank_hidden)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def commit(self, out: StepOutput) -> None:
        """``bank[idx] = normalize(m bank[idx] + (1 - m) normalize(q))``; the hidden features'
        bank with the same ``m`` (unnormalised: the loss uses their directions only), so that
        the two describe the same mixture of past steps (with ``m = 0``, IR-Ring's setting,
        both hold the entry's latest step)."""
        index, q = out.pending["index"], F.normalize(out.pending["q"].float(), dim=1)
        mixed = self.momentum * self.bank[index] + (1.0 - self.momentum) * q
        self.bank[index] = F.normalize(mixed, dim=1)
        if self.bank_hidden is not None:
            h = out.pending["hidden"].float()
            self.bank_hidden[index] = self.momentum * self.bank_hidden[index] + (
                1.0 - self.momentum
            ) * h.to(self.bank_hidden.device)
        if "labels" in out.pending:
            self.bank_labels[index] = out.pending["labels"].to(self.bank_labels.device)
