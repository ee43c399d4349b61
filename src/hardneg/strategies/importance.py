"""HCL importance weighting (Robinson, Chuang, Sra, Jegelka, ICLR 2021,
"Contrastive Learning with Hard Negative Samples").

Negatives are drawn from ``q_beta(x-) ∝ e^{beta s(x, x-)} p(x-)``; the authors' image code
(joshr17/HCL, ``image/main.py``, estimator ``'hard'``) estimates it with ``neg_ij = e^{s_ij/t}``::

    imp_ij       = neg_ij ** beta                 = e^{beta s_ij / t}
    reweight_neg = sum_j imp_ij neg_ij / mean_j(imp_ij)
    Ng_i         = max( (reweight_neg - tau_plus M pos_i) / (1 - tau_plus),  M e^{-1/t} )

i.e. weights ``w_ij = M softmax_j(beta s_ij / t)`` (mean 1 over the ``M`` negatives), in log space
here: ``log w_ij = beta c_ij - logsumexp_j(beta c_ij) + log M``. The objective adds the debiasing
with ``tau_plus`` (default 0.1) and the clamp. ``beta = 0`` gives uniform weights (the debiased
loss; with ``tau_plus = 0`` InfoNCE). As in the reference the weights are *not* detached
(gradient flows through ``imp``); ``detach_weights=True`` stops it. ``beta_anneal='down'``
reproduces the reference's annealing (:func:`hardneg.schedules.hcl_beta_down`).

The paper's appendix pseudo-code divides by ``mean(neg)``; the authors confirmed that the code
(``mean(imp)``) is the intended estimator, which is what this implements.

Fast path (``context.fast``, InfoNCE objective): the weighted negative mass
``log sum_j w_ij e^{c_ij}`` in one fused pass (:func:`hardneg.fastpaths.tilted_log_mass`),
tested equal to this plain form.

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("hcl", beta=1.0, tau_plus=0.1)
    >>> bool(loss_fn(torch.randn(8, 16), torch.randn(8, 16)) > 0)
    True
"""

from __future__ import annotations

from hardneg import fastpaths
from hardneg._checks import check_choice, check_flag, check_number
from hardneg.contrast import ContrastSet
from hardneg.registry import register_strategy
from hardneg.schedules import hcl_beta_down
from hardneg.strategies.base import Selection, StepContext, Strategy, normalised_log_weights


@register_strategy("hcl", summary="Hard negative sampling, HCL (Robinson et al., ICLR 2021)")
class ImportanceNegatives(Strategy):
    """Weights ``∝ e^{beta s/t}``, normalised to mean 1 (HCL).

    Args:
        beta: concentration ``beta >= 0`` (0 = uniform weights).
        detach_weights: stop the gradient through the weights (reference: False).
        beta_anneal: None or ``'down'``: beta falls to 0 in 9 stairs (needs ``progress``).
        anneal_epochs: the run's number of epochs, to reproduce the reference's integer stairs
            exactly for any epoch count (None: stairs are ninths of training).
    """

    loss_defaults = {"tau_plus": 0.1}

    def __init__(
        self,
        *,
        beta: float = 1.0,
        detach_weights: bool = False,
        beta_anneal: str | None = None,
        anneal_epochs: int | None = None,
    ) -> None:
        super().__init__()
        self.beta = check_number("beta", beta, low=0.0)
        self.detach_weights = check_flag("detach_weights", detach_weights)
        self.beta_anneal = (
            None if beta_anneal is None else check_choice("beta_anneal", beta_anneal, ("down",))
        )
        self.anneal_epochs = (
            None
            if anneal_epochs is None
            else int(check_number("anneal_epochs", anneal_epochs, low=1, integer=True))
        )

    def current_beta(self, progress: float | None) -> float:
        if self.beta_anneal is None:
            return self.beta
        if progress is None:
            raise ValueError(
                "beta_anneal='down' needs the training progress: pass progress=<fraction in [0, 1]>"
            )
        return hcl_beta_down(self.beta, progress, epochs=self.anneal_epochs)

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        return hcl_selection(
            contrast, context, self.current_beta(context.progress), self.detach_weights
        )


def hcl_selection(
    contrast: ContrastSet, context: StepContext, beta: float, detach_weights: bool
) -> Selection:
    """HCL's weights ``w ∝ e^{beta c}`` (mean 1) over the negatives of ``contrast``."""
    if beta == 0.0:
        return Selection()  # uniform: w = 1
    logits = contrast.negative_logits
    if context.fast and context.want_log_mass:
        log_mass = fastpaths.tilted_log_mass(
            logits, beta, contrast.num_negatives, tilt_grad=not detach_weights
        )
        return Selection(negative_log_mass=log_mass)
    tilted = logits.detach() if detach_weights else logits
    return Selection(negative_log_weights=normalised_log_weights(tilted * beta, contrast))
