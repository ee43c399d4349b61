"""Ring (conditional) negatives (Wu, Mosse, Zhuang, Yamins, Goodman, ICLR 2021,
"Conditional Negative Sampling for Contrastive Learning of Visual Representations").

Per anchor, the ``M`` negatives are ranked by similarity and only a band of ranks is kept: the
closest ones (likely false negatives) and the easy bulk are dropped. As in the authors' code
(mhw32/contrastive-ring-public, ``src/objectives/moco.py`` and ``instdisc.py``)::

    sorted = sort(c_i, descending)                     c_ij = s(i, j) / t
    U = int(rho_out * M);  L = int(rho_in * U)         # the inner cut is a fraction of the outer set
    ring_i = sorted[L:U]
    l_i = logsumexp({a_i} ∪ ring_i) - a_i               # the positive stays in the partition

Band sizes use Python's ``int`` (truncation) as the authors' code does; our only addition is
that the band keeps at least one member (``U >= 1``, ``L <= U - 1``). The band can also be given
as rank percentiles from the top, ``(lower, upper) = (100 rho_in rho_out, 100 rho_out)``;
``(0, 100)`` keeps every negative and is InfoNCE exactly. With ``num_samples`` a fixed number of
ring members is drawn uniformly *with replacement* (IR-Ring: 4095), as uniform ranks of the sorted
ring like the reference's draw (each anchor from its own band when anchors have different
``M``); a member drawn ``n`` times counts ``n`` times. With ``anneal``
only ``rho_out`` is scheduled, from 1 to its final value over the first ``anneal_until`` of
training (:func:`hardneg.schedules.ring_rho_out`). Ties: the loss depends on the *values* of
ranks ``[L, U)`` only, so which of several equal logits at a band edge is taken does not change it.

Plain form: ranks from one ``argsort`` per row (works when anchors have different ``M``, e.g.
with duplicate masks). Fast path (``context.fast``, one ``M`` for all anchors, InfoNCE
objective): the members of ranks ``[L, U)`` by selection (:func:`hardneg.fastpaths.band_indices`:
``topk`` on an accelerator, on CPU numpy's partition over order-preserving integer keys, row
blocks on torch's threads), and a sparse backward through the ring's members only
(:func:`hardneg.fastpaths.column_logits`), tested equal to the plain form.

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("ring", rho_out=0.5, rho_in=0.1, temperature=0.2)
    >>> bool(loss_fn(torch.randn(16, 8), torch.randn(16, 8)) > 0)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg import fastpaths
from hardneg._checks import check_choice, check_number
from hardneg.contrast import ContrastSet
from hardneg.registry import register_strategy
from hardneg.schedules import ring_rho_out
from hardneg.strategies.base import Selection, StepContext, Strategy


def ring_band(num_negatives: int, rho_out: float, rho_in: float) -> tuple[int, int]:
    """Ranks ``[L, U)`` of the ring among ``num_negatives`` sorted by decreasing similarity."""
    upper = max(1, min(num_negatives, int(rho_out * num_negatives)))
    lower = min(int(rho_in * upper), upper - 1)
    return lower, upper


def descending_ranks(logits: Tensor) -> Tensor:
    """``[A, S]`` rank of each entry in its row, 0 = largest (``-inf`` entries rank last)."""
    order = logits.detach().argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(logits.shape[1], device=logits.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


@register_strategy("ring", summary="Ring / conditional negatives (Wu et al., ICLR 2021)")
class RingNegatives(Strategy):
    """Keep negatives whose similarity rank lies in a band ("ring").

    Args:
        rho_out: fraction of the negatives in the outer set, in (0, 1].
        rho_in: fraction of the outer set cut from the top, in [0, 1).
        lower, upper: alternatively, the band as rank percentiles from the top,
            ``0 <= lower < upper <= 100`` (overrides ``rho_out`` / ``rho_in``).
        num_samples: None to use every ring member, or draw this many with replacement (IR-Ring).
        anneal: None, ``'linear'`` or ``'staircase'`` schedule of ``rho_out`` from 1.
        anneal_until: fraction of training over which the schedule runs (paper: 100 of 200 epochs).
        anneal_steps: number of stairs of the staircase schedule.
    """

    loss_defaults = {"temperature": 0.07}
    supports_debiasing = False
    # the authors' SimCLR-Ring band for a small in-batch pool (their 0.1 is for a 65536 queue)
    in_batch_defaults = {"rho_out": 0.5}

    def __init__(
        self,
        *,
        rho_out: float = 0.1,
        rho_in: float = 0.1,
        lower: float | None = None,
        upper: float | None = None,
        num_samples: int | None = None,
        anneal: str | None = None,
        anneal_until: float = 0.5,
        anneal_steps: int = 10,
    ) -> None:
        super().__init__()
        self.lower = self.upper = None
        if lower is not None or upper is not None:
            if lower is None or upper is None:
                raise ValueError(
                    f"give both lower and upper percentiles of the ring, got lower={lower!r}, upper={upper!r}"
                )
            self.lower = check_number("lower", lower, low=0.0, high=100.0)
            self.upper = check_number("upper", upper, low=0.0, high=100.0)
            if not self.lower < self.upper:
                raise ValueError(
                    f"ring percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower:g}, upper={upper:g}"
                )
            rho_out, rho_in = self.upper / 100.0, self.lower / self.upper
        self.rho_out = check_number("rho_out", rho_out, low=0.0, high=1.0, low_inclusive=False)
        self.rho_in = check_number("rho_in", rho_in, low=0.0, high=1.0, high_inclusive=False)
        self.num_samples = (
            None
            if num_samples is None
            else int(check_number("num_samples", num_samples, low=1, integer=True))
        )
        self.anneal = (
            None if anneal is None else check_choice("anneal", anneal, ("linear", "staircase"))
        )
        self.anneal_until = check_number("anneal_until", anneal_until, low=0.0, high=1.0)
        self.anneal_steps = int(check_number("anneal_steps", anneal_steps, low=1, integer=True))
        self.draws = self.num_samples is not None

    def current_rho_out(self, progress: float | None) -> float:
        if self.anneal is None:
            return self.rho_out
        if progress is None:
            raise ValueError(
                f"anneal={self.anneal!r} needs the training progress: pass progress=<fraction in [0, 1]>"
            )
        return ring_rho_out(
            self.rho_out,
            progress,
            until=self.anneal_until,
            kind=self.anneal,
            steps=self.anneal_steps,
        )

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        rho_out = self.current_rho_out(context.progress)
        logits = contrast.negative_logits
        m = contrast.num_negatives
        extras: dict[str, float] = {}  # the band's ranks, when every anchor has the same
        if isinstance(m, int):
            lower, upper = ring_band(m, rho_out, self.rho_in)
            extras = {"ring_lower": float(lower), "ring_upper": float(upper)}
            if lower == 0 and upper == m and self.num_samples is None:
                return Selection(extras=extras)  # the whole pool: plain InfoNCE
            if self.num_samples is not None:
                return Selection(
                    negative_log_weights=self._draw(logits, lower, upper, context), extras=extras
                )
            if context.fast and context.want_log_mass:
                return Selection(
                    negative_log_mass=self._fast_log_mass(contrast, lower, upper), extras=extras
                )
        # plain form: the band of ranks [L_i, U_i) of each row
        m_row = torch.as_tensor(m, device=logits.device).expand(logits.shape[0])
        upper_row = (m_row.double() * rho_out).long().clamp(min=1).minimum(m_row)
        lower_row = (upper_row.double() * self.rho_in).long().minimum(upper_row - 1)
        if self.num_samples is not None:  # a count per anchor: each row's own band
            log_w = self._draw_per_row(logits, lower_row, upper_row, context)
            return Selection(negative_log_weights=log_w, extras=extras)
        ranks = descending_ranks(logits)
        band = (ranks >= lower_row.unsqueeze(1)) & (ranks < upper_row.unsqueeze(1))
        log_w = torch.zeros_like(logits).masked_fill(~band, float("-inf"))
        return Selection(negative_log_weights=log_w, extras=extras)

    def _draw(self, logits: Tensor, lower: int, upper: int, context: StepContext) -> Tensor:
        """IR-Ring: ``num_samples`` uniform ranks of the sorted ring per anchor, with
        replacement; the log of each column's draw count (``-inf`` = never drawn)."""
        assert self.num_samples is not None
        members = logits.detach().topk(upper, dim=1, sorted=True).indices[:, lower:]
        draw = torch.randint(
            0,
            upper - lower,
            (members.shape[0], self.num_samples),
            generator=context.generator,
            device=members.device,
        )
        counts = torch.zeros_like(logits)
        counts.scatter_add_(1, members.gather(1, draw), torch.ones_like(draw, dtype=logits.dtype))
        return counts.log()

    def _draw_per_row(
        self, logits: Tensor, lower: Tensor, upper: Tensor, context: StepContext
    ) -> Tensor:
        """IR-Ring with a number of negatives per anchor (masked duplicates, the blocks of a
        joint partition): ``num_samples`` uniform ranks of row ``i``'s ring ``[L_i, U_i)``, with
        replacement; the log of each column's draw count. A row without negatives draws none.
        (Masks once made every text batch refuse ``num_samples``, with or without duplicates.)"""
        assert self.num_samples is not None
        # a stable order: equal logits rank by column, so a seed gives the same columns
        order = logits.detach().sort(dim=1, descending=True, stable=True).indices
        width = (upper - lower).clamp(min=1)
        u = torch.rand(
            (logits.shape[0], self.num_samples),
            generator=context.generator,
            device=logits.device,
            dtype=torch.float32,  # every backend has it; the minimum below keeps it in the band
        )
        rank = lower.clamp(min=0).unsqueeze(1) + (u * width.unsqueeze(1)).long().minimum(
            width.unsqueeze(1) - 1
        )
        has_band = (upper > 0).to(logits.dtype).unsqueeze(1).expand_as(rank)
        counts = torch.zeros_like(logits)
        counts.scatter_add_(1, order.gather(1, rank), has_band.contiguous())
        return counts.log()

    @staticmethod
    def _fast_log_mass(contrast: ContrastSet, lower: int, upper: int) -> Tensor:
        indices = fastpaths.band_indices(contrast.negative_logits.detach(), lower, upper)
        band = fastpaths.column_logits(contrast, indices)  # ranks [L, U)
        return fastpaths.log_mass(band, fastpaths.logit_bound(contrast))
