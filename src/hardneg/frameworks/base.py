"""What a framework is: the model around a loss (encoders, heads, queue or bank) and one step.

A framework turns the views of a batch into the contrastive loss. It owns the encoders and any
state the candidates come from (a MoCo queue, a memory bank) in *buffers*, so that
``state_dict()`` captures everything a resumed run needs. One step is split in two so that the
trainer decides in between whether the step is kept (a NaN/Inf step must not reach the queue):

* ``forward(views, index=..., ...) -> StepOutput``: loss (and diagnostics) for the batch;
* ``commit(out)``: after an accepted optimizer step, write the batch into the queue / bank.

In a ``torchrun`` run every framework computes its loss on the *global* batch: projections are
gathered with :func:`hardneg.distributed.gather_with_grad`, keys, labels and indices with
:func:`~hardneg.distributed.gather_no_grad`; the queue / bank is fed with the global batch, so
it stays identical on every rank.

A framework never names a loss; it asks it what it needs (class attributes of the strategy,
read through the loss):

* ``loss.feature_kind``: None (nothing), ``'hidden'`` (the input of the head's last linear
  layer, detached: UnReMix's influence score) or ``'projection'`` (the online projection before
  the predictor, with gradient: potential's soft positive weights; without a predictor it is the
  query itself). They reach the loss as ``h1`` / ``h2``, and as ``negative_h`` for a pool whose
  entries' features the framework keeps (MoCo keeps a queue of hidden features when asked);
* ``loss.draws``: the loss draws random numbers, so the step's ``generator`` (owned, seeded and
  checkpointed by the trainer) is passed to it; other losses get none.

A loss module without these attributes gets neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hardneg.diagnostics import NegativeDiagnostics
from hardneg.distributed import gather_no_grad, gather_with_grad
from hardneg.losses import LossOutput


@dataclass
class StepOutput:
    """What one training step produced.

    Attributes:
        loss: scalar loss (differentiable).
        embeddings: ``[B, d]`` detached projections of the step (for the non-finite guard).
        diagnostics: negative diagnostics of the step (only when asked for), else None.
        pending: state updates that :meth:`Framework.commit` applies after an accepted step.
    """

    loss: Tensor
    embeddings: Tensor
    diagnostics: NegativeDiagnostics | None = None
    pending: dict[str, Tensor] = field(default_factory=dict)


class Framework(nn.Module):
    """Base class: encoder ``backbone`` + projection ``head`` + ``loss``.

    Subclasses set ``num_views`` (views per image the trainer provides, the last
    ``num_small_crops`` of them low-resolution crops) and implement
    :meth:`forward`; :meth:`commit` is a no-op for stateless frameworks.
    """

    num_views: int = 2
    num_small_crops: int = 0  # the last views the trainer makes are low-resolution crops

    def __init__(self, backbone: nn.Module, head: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.loss = loss
        kind = getattr(loss, "feature_kind", None)
        if kind not in FEATURE_KINDS:
            raise ValueError(
                f"loss.feature_kind must be one of {', '.join(map(repr, FEATURE_KINDS))}, "
                f"got {kind!r}"
            )
        self.feature_kind: str | None = kind

    @property
    def loss_draws(self) -> bool:
        """Whether the loss draws random numbers (it then gets the step's generator)."""
        return bool(getattr(self.loss, "draws", False))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, h)``: projection and the input of the head's last linear layer."""
        return self.head(self.backbone(x), return_hidden=True)

    def features(self, projection: Tensor, hidden: Tensor) -> Tensor | None:
        """The global-batch features the loss asked for (``feature_kind``), or None.

        ``projection``: the online projection before any predictor (local rows, with
        gradient); ``hidden``: the head's hidden features of the same rows.
        """
        if self.feature_kind == "hidden":
            return gather_no_grad(hidden)
        if self.feature_kind == "projection":
            return gather_with_grad(projection)
        return None

    def commit(self, out: StepOutput) -> None:
        """Apply ``out.pending`` after an accepted optimizer step (queue / bank writes)."""

    def contrast(
        self,
        q: Tensor,
        k: Tensor,
        negatives: Tensor | None = None,
        *,
        diagnostics: bool = False,
        labels: Tensor | None = None,
        negative_labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        **kwargs: object,
    ) -> tuple[Tensor, NegativeDiagnostics | None]:
        """Call the loss; the generator goes to it only when it draws, labels only on
        diagnostics steps (analysis only), other keywords (``h1``, ``exclude_index``, ...) only
        when not None."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self.loss_draws:
            kwargs["generator"] = generator
        if not diagnostics:
            return self.loss(q, k, negatives=negatives, **kwargs), None
        out: LossOutput = self.loss(
            q,
            k,
            negatives=negatives,
            labels=labels,
            negative_labels=negative_labels,
            return_diagnostics=True,
            **kwargs,
        )
        return out.loss, out.diagnostics


FEATURE_KINDS = (None, "hidden", "projection")


def gather_labels(labels: Tensor | None) -> Tensor | None:
    """Global-batch labels (diagnostics only), or None."""
    return None if labels is None else gather_no_grad(labels)


def freeze_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters take no gradient (momentum encoders)."""
    import copy

    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


@torch.no_grad()
def ema_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = m * target + (1 - m) * source`` for every parameter.

    As in MoCo's code, buffers (batch-norm running statistics) are not averaged: the key encoder
    keeps its own, updated by its forward passes in train mode.
    """
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


@torch.no_grad()
def hidden_dim(head: nn.Module, backbone: nn.Module) -> int:
    """Width of the head's hidden features (one tiny forward in eval mode, on the head's
    device: a head already on a GPU got a CPU probe and failed)."""
    tensors = [*head.parameters(), *head.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    was_training = head.training
    head.eval()
    try:
        _, h = head(torch.zeros(2, backbone.out_dim, device=device), return_hidden=True)
    finally:
        head.train(was_training)
    return int(h.shape[1])
