"""MoCo v2 (He et al. 2020; Chen et al. 2020): momentum key encoder and a queue of keys.

One step, for views ``x1, x2`` of a batch::

    q1 = g(f(x1))                     # query encoder (+ predictor p: q1 = p(g(f(x1))))
    k2 = g_m(f_m(x2))                 # momentum encoder, no gradient, updated first:
                                      #   theta_m = m theta_m + (1 - m) theta   (m = momentum)
    loss = L(q1, k2, negatives=queue)                   # symmetric=False
    loss = (L(q1, k2, queue) + L(q2, k1, queue)) / 2    # symmetric=True
    queue <- enqueue(k2)  (or k1 and k2, enqueue='both')   # after the optimizer step

The framework asks the loss what else it needs (:class:`~hardneg.frameworks.base.Framework`):
``loss.feature_kind == 'projection'`` (potential, for its soft positive weights) gets the online
projections *before* the predictor, ``L(q1, k2, queue, h1=g(f(x1)))`` and
``L(q2, k1, queue, h1=g(f(x2)))``, as the PSM code passes ``q1_pre`` / ``q2_pre`` (without a
predictor they are the queries themselves); ``'hidden'`` (UnReMix) gets the head's hidden
features of the queries as ``h1`` and those of the queued keys as ``negative_h``; a loss that
draws gets the step's ``generator``.

Keys are detached; the queue (``queue_size x d``, initialised with random unit vectors as in
MoCo) holds the last keys, a queue of their labels is kept for diagnostics only, and, when the
loss asks for hidden features, a queue of the keys' hidden features.

Potential-sample mining (Dong et al. 2023) is this framework with ``predictor=True``,
``symmetric=True``, ``enqueue='second'`` and the ``potential`` loss, which treats the queue as its
neighbour bank (looked up before the current keys are enqueued, as in the authors' code).
Under ``torchrun`` queries are gathered with gradients and keys without, so the loss sees the
global batch and the queue is fed with the global batch (identical on every rank).

Shuffle-BN (``shuffle_bn=True``, MoCo v2 under DDP): the momentum encoder computes each rank's
keys from a share of the global batch shuffled across ranks, and the keys are put back in order
when gathered (:func:`hardneg.distributed.shuffle_batch`), so that a query and its key never
share per-rank BN statistics. In one process it does nothing (BN over the whole batch is
invariant to row order); with SyncBatchNorm it is redundant (the trainer's ``auto`` turns it
off). The permutation is drawn from the step's ``generator`` (the loss generator, the same on
every rank), once per key batch, before the loss of that direction.

Split BN (``bn_splits > 1``): the one-process stand-in for shuffle-BN
(:mod:`hardneg.frameworks.split_bn`): every BatchNorm of both encoders (and of the predictor)
normalises ``bn_splits`` groups of rows separately, as ``bn_splits`` GPUs would, and with
``shuffle_bn`` the key batch is permuted (the step's ``generator``) before the key encoder and
put back in order after it, so that a query and its key fall in different groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg.distributed import gather_unshuffled, gather_with_grad, shuffle_batch
from hardneg.frameworks.base import (
    Framework,
    StepOutput,
    ema_,
    freeze_copy,
    gather_labels,
    hidden_dim,
)
from hardneg.frameworks.split_bn import split_batch_norm_


class MoCo(Framework):
    """Query encoder, momentum key encoder and a queue of keys.

    Args:
        backbone, head, loss: the query encoder and the loss.
        out_dim: projection dimension ``d``.
        momentum: EMA momentum ``m`` of the key encoder (0.99 on CIFAR, 0.999 on ImageNet).
        queue_size: number of keys ``K``.
        symmetric: average the loss over both view orders.
        predictor: optional online predictor applied to the queries (PSM).
        enqueue: with ``symmetric``, ``'both'`` enqueues ``k1`` and ``k2``, ``'second'`` only
            ``k2`` (PSM's neighbour bank holds view-2 keys); without it only ``k2`` exists.
        shuffle_bn: under ``torchrun``, compute keys on a batch shuffled across ranks
            (MoCo v2's shuffle-BN); in one process it shuffles the key batch only with
            ``bn_splits > 1``.
        bn_splits: normalise each batch norm's training batch in this many groups of rows
            (this process's share; 1 = plain BN); with ``shuffle_bn``, keys are computed on a
            shuffled batch, the single-device emulation of shuffle-BN.
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        loss: nn.Module,
        *,
        out_dim: int,
        momentum: float = 0.99,
        queue_size: int = 4096,
        symmetric: bool = False,
        predictor: nn.Module | None = None,
        enqueue: str = "both",
        shuffle_bn: bool = True,
        bn_splits: int = 1,
    ) -> None:
        super().__init__(backbone, head, loss)
        self.bn_splits = bn_splits
        for module in (backbone, head, predictor):  # before the key encoder is copied
            if module is not None:
                split_batch_norm_(module, bn_splits)
        self.key_backbone = freeze_copy(backbone)
        self.key_head = freeze_copy(head)
        self.predictor = predictor
        self.momentum = momentum
        self.symmetric = symmetric
        self.enqueue = enqueue
        self.shuffle_bn = shuffle_bn
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out_dim), dim=1))
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        keep_hidden = self.feature_kind == "hidden"  # the keys' features, for negative_h
        hidden = torch.zeros(queue_size, hidden_dim(head, backbone)) if keep_hidden else None
        self.register_buffer("queue_hidden", hidden)  # None: not kept (not in state_dict)

    def query(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(q, z, h)``: query (after the predictor, if any), projection before the
        predictor, and the head's hidden features; local rows, with gradient."""
        z, h = self.project(x)
        return (z if self.predictor is None else self.predictor(z)), z, h

    @torch.no_grad()
    def key(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(k, kh)`` of the *global* batch in rank order, detached (shuffle-BN if enabled)."""
        restore = None
        if self.shuffle_bn:
            x, restore = shuffle_batch(x, generator)
            if restore is None and self.bn_splits > 1:
                # one process: shuffle here, so that a key lands in another BN group than
                # its query (the groups are contiguous rows)
                draw_on = generator.device if generator is not None else x.device
                perm = torch.randperm(x.shape[0], generator=generator, device=draw_on)
                perm = perm.to(x.device)
                x, restore = x[perm], torch.argsort(perm)
        k, kh = self.key_head(self.key_backbone(x), return_hidden=True)
        return gather_unshuffled(k, restore), gather_unshuffled(kh, restore)

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
        with torch.no_grad():
            ema_(self.key_backbone, self.backbone, self.momentum)
            ema_(self.key_head, self.head, self.momentum)
        labels = gather_labels(labels)
        pairs = [(x1, x2), (x2, x1)] if self.symmetric else [(x1, x2)]
        negative_h = self.queue_hidden
        losses, queries, keys, key_hidden, diag = [], [], [], [], None
        for i, (xq, xk) in enumerate(pairs):
            q, z, h = self.query(xq)
            k, kh = self.key(xk, generator)
            q = gather_with_grad(q)
            # without a predictor the projection is the query itself (no second gather)
            same = self.predictor is None and self.feature_kind == "projection"
            features = q if same else self.features(z, h)
            loss, d = self.contrast(
                q,
                k,
                self.queue,
                diagnostics=diagnostics and i == 0,
                labels=labels,
                negative_labels=self.queue_labels,
                progress=progress,
                h1=features,
                negative_h=negative_h,
                generator=generator,
            )
            losses.append(loss)
            queries.append(q.detach())
            keys.append(k)
            key_hidden.append(kh)
            diag = diag if d is None else d
        loss = torch.stack(losses).mean()
        # keys of view 2 are keys[0]; with symmetric, keys[1] are those of view 1
        order = [1, 0] if self.symmetric and self.enqueue == "both" else [0]
        pending = {"keys": torch.cat([keys[i] for i in order])}
        if labels is not None:
            pending["labels"] = torch.cat([labels] * len(order))
        if self.queue_hidden is not None:
            pending["hidden"] = torch.cat([key_hidden[i] for i in order])
        return StepOutput(
            loss=loss, embeddings=torch.cat(queries), diagnostics=diag, pending=pending
        )

    @torch.no_grad()
    def commit(self, out: StepOutput) -> None:
        """Enqueue the step's keys (oldest keys are replaced first)."""
        keys = out.pending["keys"]
        size = self.queue.shape[0]
        keys = keys[-size:]
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[slots] = F.normalize(keys.float(), dim=1).to(self.queue.dtype)
        if "labels" in out.pending:
            self.queue_labels[slots] = out.pending["labels"][-size:].to(self.queue_labels.device)
        else:
            self.queue_labels[slots] = -1
        if self.queue_hidden is not None:
            self.queue_hidden[slots] = out.pending["hidden"][-size:].float()
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
