"""What a negative strategy is: a map from per-anchor scores to weights or a selection.

A strategy never computes a loss. It receives :class:`~hardneg.pool.ContrastiveScores` (and,
through :class:`StrategyInputs`, whatever else it declares it needs: training progress, the
head's pre-projection features, a random generator) and returns a :class:`NegativeSelection`:
the negative logits it keeps, optionally their log-weights, and which candidate each column is.
The objective (:mod:`hardneg.objective`) turns that into the loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hardneg.pool import ContrastiveScores


@dataclass
class StrategyInputs:
    """Optional inputs a strategy may use; all are explicit, none is hidden state.

    Attributes:
        progress: fraction of training done, in [0, 1]; drives schedules (None = no schedule).
        anchor_features: ``[A, h]`` pre-projection features of the anchors (UnReMix influence).
        candidate_features: ``[C, h]`` pre-projection features of the candidates.
        generator: random generator for strategies that draw (None = torch's global RNG).
    """

    progress: float | None = None
    anchor_features: Tensor | None = None
    candidate_features: Tensor | None = None
    generator: torch.Generator | None = None


@dataclass
class NegativeSelection:
    """The negatives a strategy keeps for each anchor and how much each one counts.

    The weights are given either explicitly (``log_weights``) or, for importance strategies, as a
    *tilt* that the objective evaluates in one fused pass without materialising them:
    ``w_ij ∝ e^{tilt c_ij} f_ij`` with mean 1 over the ``M`` negatives (``f`` = ``tilt_factor``,
    1 when not given; the ``imp / imp.mean()`` of the HCL reference code).

    Attributes:
        logits: ``[A, S]`` negative logits ``s/t`` (``-inf`` = not kept).
        log_weights: ``[A, S]`` ``log w`` or None for unit weights. Importance strategies
            normalise the weights to mean 1 over the ``M`` negatives, as the HCL estimator does.
        indices: ``[A, S]`` candidate index of each column, or None when the columns are the
            candidates themselves (``S = C``).
        tilt: ``beta >= 0`` of the tilted weights (0 and no ``tilt_factor`` = no tilt).
        tilt_factor: ``[A, S]`` constant positive factor of the tilted weights (no gradient
            flows through it); 0 wherever ``logits`` is ``-inf``.
        tilt_grad: let the gradient flow through the tilt (the HCL reference does).
        tilt_shifted: optional ``(max_j c_ij [A], e^{c_ij - max_j c_ij} [A, S])`` of the
            detached ``logits`` in float32, when the strategy computed them anyway; the
            objective then reuses them (they must be exactly what it would compute).
    """

    logits: Tensor
    log_weights: Tensor | None = None
    indices: Tensor | None = None
    tilt: float = 0.0
    tilt_factor: Tensor | None = None
    tilt_grad: bool = True
    tilt_shifted: tuple[Tensor, Tensor] | None = None

    @property
    def tilted(self) -> bool:
        return self.tilt != 0.0 or self.tilt_factor is not None

    def dense_log_weights(self) -> Tensor | None:
        """``log w`` as an ``[A, S]`` tensor (up to a per-row constant for tilted weights), or
        None for unit weights; for analysis, the objective never materialises it."""
        if not self.tilted:
            return self.log_weights
        logits = self.logits if self.tilt_grad else self.logits.detach()
        log_w = logits * self.tilt if self.tilt != 0.0 else torch.zeros_like(logits)
        if self.tilt_factor is not None:
            log_w = log_w + self.tilt_factor.log()
        return log_w.masked_fill(~torch.isfinite(self.logits), float("-inf"))


class NegativeStrategy(nn.Module, ABC):
    """Base class: decides the weights (or the selection) of negatives over a pool."""

    #: True when the debiased estimator (class prior ``tau_plus``) is meaningful on top.
    supports_debiasing: bool = True

    @abstractmethod
    def select(self, scores: ContrastiveScores, inputs: StrategyInputs) -> NegativeSelection:
        """Return the selection for every anchor of ``scores``."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    def hparams(self) -> dict[str, object]:
        """The strategy's hyper-parameters (for logs and checkpoints)."""
        return {}


def normalised_log_weights(log_w: Tensor, scores: ContrastiveScores) -> Tensor:
    """Shift ``log w`` so that the weights average 1 over each anchor's ``M`` negatives.

    This is the ``imp / imp.mean()`` of the HCL reference code, in log space:
    ``log w - logsumexp(log w) + log M``. Masked candidates stay at ``-inf``.
    """
    if scores.neg_mask is not None:
        log_w = log_w.masked_fill(~scores.neg_mask, float("-inf"))
    return log_w - torch.logsumexp(log_w, dim=1, keepdim=True) + scores.log_num_negatives
