"""``ContrastiveLoss``: pool -> strategy -> objective, in one ``nn.Module``.

Two call forms:

* ``loss(z1, z2)``: two views' projections ``[N, d]`` (not yet normalised); in-batch negatives,
  averaged over all ``2N`` anchors (SimCLR set-up).
* ``loss(q, k, negatives=pool)``: queries, their positive keys and an external pool ``[K, d]``
  (MoCo queue, memory bank); averaged over the ``N`` queries.

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("hcl", beta=1.0, tau_plus=0.1, temperature=0.5)
    >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    >>> loss = loss_fn(z1, z2)
    >>> loss.backward()
    >>> out = loss_fn(z1, z2, labels=torch.arange(8) % 2, return_diagnostics=True)
    >>> round(out.diagnostics.summary()["effective_negatives"], 1) <= 14
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hardneg._checks import (
    check_embeddings,
    check_labels,
    check_number,
    check_same_shape,
)
from hardneg.diagnostics import NegativeDiagnostics, negative_diagnostics
from hardneg.objective import contrastive_objective
from hardneg.pool import ContrastiveScores, in_batch_scores, pool_scores
from hardneg.schedules import check_progress
from hardneg.strategies.base import NegativeStrategy, StrategyInputs


@dataclass
class LossOutput:
    """What ``forward(..., return_diagnostics=True)`` returns."""

    loss: Tensor
    per_anchor: Tensor
    diagnostics: NegativeDiagnostics


def check_views(z1: Tensor, z2: Tensor, names: tuple[str, str] = ("z1", "z2")) -> None:
    check_embeddings(names[0], z1)
    check_embeddings(names[1], z2)
    check_same_shape(names[0], z1, names[1], z2)
    if z1.shape[0] < 2:
        raise ValueError(
            f"{names[0]} and {names[1]} need a batch of at least N = 2 samples "
            f"(a contrastive loss needs negatives), got N = {z1.shape[0]}"
        )


def check_optional_features(name: str, h: Tensor | None, rows: int) -> None:
    if h is None:
        return
    check_embeddings(name, h)
    if h.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (one per sample), got {h.shape[0]}")


class ContrastiveLoss(nn.Module):
    """A negative strategy plugged into the (debiased) contrastive objective.

    Args:
        strategy: decides the weights or the selection of negatives.
        temperature: ``t > 0``.
        tau_plus: class prior of the debiased estimator, in [0, 1) (0 = none).
        check_inputs: validate shapes and finiteness on every call (one host sync).
    """

    def __init__(
        self,
        strategy: NegativeStrategy,
        temperature: float = 0.5,
        tau_plus: float = 0.0,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.temperature = check_number("temperature", temperature, low=0.0, low_inclusive=False)
        self.tau_plus = check_number("tau_plus", tau_plus, low=0.0, high=1.0, high_inclusive=False)
        if self.tau_plus > 0 and not strategy.supports_debiasing:
            raise ValueError(
                f"tau_plus must be 0 for the {type(strategy).__name__} strategy "
                f"(it selects negatives and has no debiased estimator), got {tau_plus!r}"
            )
        self.check_inputs = check_inputs

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, tau_plus={self.tau_plus}"

    def scores(
        self,
        z1: Tensor,
        z2: Tensor,
        negatives: Tensor | None = None,
        *,
        exclude_index: Tensor | None = None,
    ) -> ContrastiveScores:
        """Validate the inputs and compute the anchor-candidate scores."""
        if self.check_inputs:
            if negatives is None:
                check_views(z1, z2)
            else:
                check_views(z1, z2, ("q", "k"))
                check_embeddings("negatives", negatives)
                if negatives.shape[1] != z1.shape[1]:
                    raise ValueError(
                        f"negatives must have the embedding dim of q ({z1.shape[1]}), "
                        f"got shape {tuple(negatives.shape)}"
                    )
        if negatives is None:
            return in_batch_scores(z1, z2, self.temperature)
        return pool_scores(z1, z2, negatives, self.temperature, exclude_index=exclude_index)

    def forward(
        self,
        z1: Tensor,
        z2: Tensor,
        negatives: Tensor | None = None,
        *,
        progress: float | None = None,
        h1: Tensor | None = None,
        h2: Tensor | None = None,
        negative_h: Tensor | None = None,
        exclude_index: Tensor | None = None,
        generator: torch.Generator | None = None,
        labels: Tensor | None = None,
        negative_labels: Tensor | None = None,
        return_diagnostics: bool = False,
    ) -> Tensor | LossOutput:
        """Loss for one step.

        Args:
            z1, z2: ``[N, d]`` views (or queries ``q`` and positive keys ``k`` with a pool).
            negatives: ``[K, d]`` external pool, or None for in-batch negatives.
            progress: fraction of training done, for annealed strategies.
            h1, h2: ``[N, h]`` pre-projection features of the two views (UnReMix influence).
            negative_h: ``[K, h]`` pre-projection features of the pool entries.
            exclude_index: ``[N]`` pool row of each query's own entry (memory bank), masked out.
            generator: random generator for strategies that draw.
            labels, negative_labels: class ids for diagnostics only; never used by the loss.
            return_diagnostics: return a :class:`LossOutput` instead of the scalar.
        """
        if progress is not None:
            progress = check_progress(progress)
        n = z1.shape[0] if isinstance(z1, Tensor) else 0
        scores = self.scores(z1, z2, negatives, exclude_index=exclude_index)
        if self.check_inputs:
            check_optional_features("h1", h1, n)
            check_optional_features("h2", h2, n)
            if negatives is not None:
                check_optional_features("negative_h", negative_h, negatives.shape[0])
        if negatives is None:
            anchor_h = None if h1 is None or h2 is None else torch.cat([h1, h2], dim=0)
            candidate_h = anchor_h
        else:
            anchor_h, candidate_h = h1, negative_h
        inputs = StrategyInputs(
            progress=progress,
            anchor_features=anchor_h,
            candidate_features=candidate_h,
            generator=generator,
        )
        selection = self.strategy.select(scores, inputs)
        per_anchor = contrastive_objective(
            scores.pos_logits,
            selection.logits,
            selection.log_weights,
            tau_plus=self.tau_plus,
            num_negatives=scores.num_negatives,
            temperature=self.temperature,
            tilt=selection.tilt,
            tilt_factor=selection.tilt_factor,
            tilt_grad=selection.tilt_grad,
            tilt_shifted=selection.tilt_shifted,
        )
        loss = per_anchor.mean()
        if not return_diagnostics:
            return loss
        anchor_labels, candidate_labels = self._diagnostic_labels(
            labels, negative_labels, n, negatives
        )
        diag = negative_diagnostics(
            scores, selection, anchor_labels=anchor_labels, candidate_labels=candidate_labels
        )
        return LossOutput(loss=loss, per_anchor=per_anchor, diagnostics=diag)

    @staticmethod
    def _diagnostic_labels(
        labels: Tensor | None, negative_labels: Tensor | None, n: int, negatives: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        if labels is None:
            return None, None
        labels = check_labels("labels", labels, n)
        if negatives is None:
            both = torch.cat([labels, labels])
            return both, both
        if negative_labels is None:
            return None, None
        return labels, check_labels("negative_labels", negative_labels, negatives.shape[0])
