"""HCL importance weighting (Robinson, Chuang, Sra, Jegelka, ICLR 2021,
"Contrastive Learning with Hard Negative Samples").

Negatives are drawn from ``q_beta(x-) ∝ e^{beta s(x, x-)} p(x-)``; the authors' image code
(joshr17/HCL, ``image/main.py``, estimator ``'hard'``) estimates it with ``neg_ij = e^{s_ij/t}``:

    imp_ij       = neg_ij ** beta                 = e^{beta s_ij / t}
    reweight_neg = sum_j imp_ij neg_ij / mean_j(imp_ij)

i.e. weights ``w_ij = M softmax_j(beta s_ij / t)`` (mean 1 over the ``M`` negatives). The
objective adds the debiasing with ``tau_plus`` and the clamp ``M e^{-1/t}``. ``beta = 0`` gives
uniform weights. In the reference the weights are *not* detached (gradient flows through
``imp``); ``detach_weights=True`` stops it. ``beta_anneal='down'`` reproduces the reference's
annealing (:func:`hardneg.schedules.hcl_beta_down`).

Note: the paper's appendix pseudo-code divides by ``mean(neg)``; the authors confirmed that the
code (``mean(imp)``) is the intended estimator, which is what this implements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg._checks import check_choice, check_number
from hardneg.pool import ContrastiveScores
from hardneg.schedules import hcl_beta_down
from hardneg.strategies.base import NegativeSelection, NegativeStrategy, StrategyInputs


class ImportanceNegatives(NegativeStrategy):
    """Weights ``∝ e^{beta s/t}``, normalised to mean 1 (HCL).

    Args:
        beta: concentration ``beta >= 0``.
        detach_weights: stop the gradient through the weights (reference: False).
        beta_anneal: None or ``'down'`` (requires ``progress`` at call time).
        anneal_epochs: the run's number of epochs, to reproduce the reference's integer stairs
            exactly for any epoch count (None: stairs are ninths of training, which is the same
            when the count is a multiple of 9); see :func:`hardneg.schedules.hcl_beta_down`.
    """

    def __init__(
        self,
        beta: float = 1.0,
        detach_weights: bool = False,
        beta_anneal: str | None = None,
        anneal_epochs: int | None = None,
    ) -> None:
        super().__init__()
        self.beta = check_number("beta", beta, low=0.0)
        if not isinstance(detach_weights, bool):
            raise ValueError(f"detach_weights must be True or False, got {detach_weights!r}")
        self.detach_weights = detach_weights
        self.beta_anneal = (
            None if beta_anneal is None else check_choice("beta_anneal", beta_anneal, ("down",))
        )
        self.anneal_epochs = (
            None
            if anneal_epochs is None
            else int(check_number("anneal_epochs", anneal_epochs, low=1, integer=True))
        )

    def hparams(self) -> dict[str, object]:
        return {
            "beta": self.beta,
            "detach_weights": self.detach_weights,
            "beta_anneal": self.beta_anneal,
        }

    def current_beta(self, progress: float | None) -> float:
        if self.beta_anneal is None:
            return self.beta
        if progress is None:
            raise ValueError(
                "beta_anneal='down' needs the training progress: pass progress=<fraction in [0, 1]>"
            )
        return hcl_beta_down(self.beta, progress, epochs=self.anneal_epochs)

    def tilted_log_weights(self, scores: ContrastiveScores, beta: float) -> Tensor:
        """``beta * s/t`` with masked candidates at ``-inf`` (never ``0 * -inf``); for analysis,
        :meth:`select` leaves the weights implicit (the objective fuses them)."""
        logits = scores.logits.detach() if self.detach_weights else scores.logits
        log_w = logits * beta if beta != 0.0 else torch.zeros_like(logits)
        if scores.neg_mask is not None:
            log_w = log_w.masked_fill(~scores.neg_mask, float("-inf"))
        return log_w

    def select(self, scores: ContrastiveScores, inputs: StrategyInputs) -> NegativeSelection:
        beta = self.current_beta(inputs.progress)
        if beta == 0.0:
            return NegativeSelection(logits=scores.logits)  # uniform: w = 1
        # w = M softmax(beta c), evaluated by the objective in one fused pass
        return NegativeSelection(logits=scores.logits, tilt=beta, tilt_grad=not self.detach_weights)
