"""What a strategy is: a map from a contrast set to a selection of negatives (and positives).

A strategy never computes a loss. It receives a :class:`~hardneg.contrast.ContrastSet` and a
:class:`StepContext` (training progress, a random generator) and returns a :class:`Selection`:
log-weights over the negative columns (``-inf`` = dropped), optionally synthetic negatives, extra
positives or changed positive weights. An objective (:mod:`hardneg.objectives`) turns the
selection into the loss.

Writing a strategy (one file, registered where it is defined)::

    @register_strategy("my_strategy")
    class MyNegatives(Strategy):
        '''Paper, equation, reference code.'''

        def __init__(self, *, alpha: float = 1.0) -> None:
            super().__init__()
            self.alpha = check_number("alpha", alpha, low=0.0)   # stored under its own name

        def select(self, contrast, context):
            return Selection(negative_log_weights=...)

The keyword-only ``__init__`` is the single source of the hyper-parameters and their defaults:
the registry, ``hardneg losses``, configs, ``compare`` and the docs read its signature, and
:meth:`Strategy.hparams` reads the attributes of the same names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from hardneg.contrast import ContrastSet

if TYPE_CHECKING:
    from hardneg.losses.contrastive import ContrastInputs


@dataclass
class StepContext:
    """Explicit per-step inputs of a strategy; none of them is hidden state.

    Attributes:
        progress: fraction of training done, in [0, 1] (None = no schedule).
        generator: random generator for strategies that draw (None = torch's global RNG).
        fast: allow the strategy's fast path (:mod:`hardneg.fastpaths`), tested equal to the
            plain one; False under ``torch.compile`` and for diagnostics.
        want_log_mass: the objective only needs each anchor's weighted negative log-mass
            (InfoNCE), so a strategy may return ``negative_log_mass`` instead of dense weights.
    """

    progress: float | None = None
    generator: torch.Generator | None = None
    fast: bool = True
    want_log_mass: bool = True


@dataclass
class Selection:
    """The negatives (and positives) a strategy keeps for each anchor and how much each counts.

    Attributes:
        negative_log_weights: ``[A, S]`` ``log w_ij`` over the contrast set's negative columns
            (``-inf`` = dropped); None = weight 1 on every negative. Importance strategies
            normalise ``w`` to mean 1 over the anchor's ``M`` negatives, as HCL's estimator does.
        negative_log_mass: ``[A]`` ``log sum_j w_ij e^{c_ij}`` when the strategy computed it
            directly (a fast path); the InfoNCE objective then skips its own sum.
        extra_negative_logits: ``[A, E]`` synthetic negatives (e.g. MoCHi's mixes), weight 1.
        extra_positive_logits: ``[A, Q]`` further positives of each anchor (mined neighbours,
            cancelled false negatives); their columns should be dropped from the negatives.
        extra_positive_weight: ``[A, Q]`` their weights (default 1; 0 = padding).
        positive_weight: ``[A, P]`` replaces the contrast set's positive weights.
        num_negatives: ``M`` of the debiased estimator if the strategy changes it.
        unit_positive_weights: the strategy guarantees that every positive weight (the contrast
            set's and ``extra_positive_weight``'s) is 1, so that the fast objective may skip
            them (:func:`hardneg.fastpaths.joint_positive_infonce`).
        extras: scalar facts for diagnostics (e.g. the band used), never used by the loss.
    """

    negative_log_weights: Tensor | None = None
    negative_log_mass: Tensor | None = None
    extra_negative_logits: Tensor | None = None
    extra_positive_logits: Tensor | None = None
    extra_positive_weight: Tensor | None = None
    positive_weight: Tensor | None = None
    num_negatives: int | Tensor | None = None
    extras: dict[str, float] = field(default_factory=dict)
    unit_positive_weights: bool = False


def normalised_log_weights(log_w: Tensor, contrast: ContrastSet) -> Tensor:
    """Shift ``log w`` so that the weights average 1 over each anchor's ``M`` negatives.

    This is the ``imp / imp.mean()`` of the HCL reference code, in log space:
    ``log w - logsumexp_j(log w) + log M``. Masked columns stay at ``-inf``.
    """
    if contrast.negative_mask is not None:
        log_w = log_w.masked_fill(~contrast.negative_mask, float("-inf"))
    log_m = contrast.log_num_negatives()
    if isinstance(log_m, Tensor):
        log_m = log_m.unsqueeze(1)
    return log_w - torch.logsumexp(log_w, dim=1, keepdim=True) + log_m


class Strategy(nn.Module):
    """Base class: decides the weights (or the selection) of negatives, and maybe positives.

    Class attributes a strategy may set (what a framework or the loss asks it):

    * ``loss_defaults``: defaults of the loss-level settings for this strategy
      (``temperature``, ``tau_plus``, ``objective``), e.g. Ring's ``t = 0.07``;
    * ``supports_debiasing``: False when ``tau_plus > 0`` is meaningless (pure selection);
    * ``feature_kind``: None, ``'hidden'`` (the input of the head's last linear layer) or
      ``'projection'`` (the projection before a predictor): what ``h1``/``h2`` it uses;
    * ``draws``: True when it draws random numbers (a ``generator`` makes runs repeatable);
    * ``is_filter``: True when it can drop negatives in front of any other strategy
      (:meth:`keep`; ``create_loss("hcl", filter="positive_aware")``);
    * ``filter_defaults``: hyper-parameters it takes as a filter unless ``filter_options``
      say otherwise (false-negative cancellation: ``mode='eliminate'``);
    * ``per_anchor_columns``: False when it scores the shared columns only (UnReMix), so it
      cannot take per-anchor explicit columns (a memory bank then draws one shared pool);
    * ``adds_positives``: True when its selection attracts positives of its own besides the
      anchor's (mined neighbours, attracted false negatives), so a per-anchor loss is not
      ``log Z - a`` of one positive (a property: it may depend on the settings);
    * ``fixed_positive_mode``: True when :meth:`objective_options` sets every term's
      ``positive_mode`` itself (potential-sample mining), so the loss's setting is refused
      rather than ignored;
    * ``in_batch_defaults``: hyper-parameters (loss-level or the strategy's) that ``hardneg
      compare`` / ``demo`` use on in-batch negatives (SimCLR) instead of the registry defaults,
      e.g. Ring's wider band for a small pool.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    loss_defaults: ClassVar[dict[str, Any]] = {}
    supports_debiasing: ClassVar[bool] = True
    feature_kind: ClassVar[str | None] = None
    draws: ClassVar[bool] = False
    is_filter: ClassVar[bool] = False
    filter_defaults: ClassVar[dict[str, Any]] = {}
    per_anchor_columns: ClassVar[bool] = True
    fixed_positive_mode: ClassVar[bool] = False
    in_batch_defaults: ClassVar[dict[str, Any]] = {}

    @property
    def adds_positives(self) -> bool:
        """Whether the selection adds positives of its own (see the class docstring)."""
        return False

    def keep(self, contrast: ContrastSet, context: StepContext) -> Tensor:
        """Filters only: ``[A, S]`` bool, the negatives that pass (see ``is_filter``)."""
        raise NotImplementedError(f"{type(self).__name__} is not a filter")

    def check_filter(self) -> None:
        """Filters only: raise ``ValueError`` when these settings cannot stand in front of
        another strategy (default: any settings can)."""

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        """Return the selection for every anchor of ``contrast`` (default: every negative)."""
        return Selection()

    def terms(
        self, inputs: ContrastInputs, context: StepContext
    ) -> list[tuple[float, ContrastSet, str]]:
        """The weighted contrast sets of one step, ``[(weight, contrast, role), ...]``.

        The default is the one standard set of the call form (in-batch, pool or retrieval,
        see :class:`~hardneg.losses.contrastive.ContrastInputs`). A strategy with several terms
        (potential-sample mining: mined and augmentation losses) overrides it; ``role`` is
        handed back to :meth:`select_term`.
        """
        return [(1.0, inputs.standard_contrast(fast=context.fast), "main")]

    def select_term(self, contrast: ContrastSet, context: StepContext, role: str) -> Selection:
        """Selection of one term (default: :meth:`select`)."""
        return self.select(contrast, context)

    def objective_options(self, role: str) -> dict[str, Any]:
        """Options of the objective for term ``role`` (e.g. joint positives); default none."""
        return {}

    @classmethod
    def hparam_names(cls) -> list[str]:
        """Keyword-only parameters of ``__init__``: the strategy's hyper-parameters."""
        return [
            p.name
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]

    @classmethod
    def hparam_defaults(cls) -> dict[str, Any]:
        return {
            p.name: p.default
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def hparams(self) -> dict[str, Any]:
        """The strategy's hyper-parameters, read from the attributes named as in ``__init__``."""
        return {name: getattr(self, name) for name in self.hparam_names()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
