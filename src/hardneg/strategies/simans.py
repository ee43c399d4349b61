"""SimANS: sampling ambiguous negatives (Zhou, Gong, Liu, Zhao, Shen, Dong, Lu, Majumder, Wen,
Duan, Chen, EMNLP 2022, "SimANS: Simple Ambiguous Negatives Sampling for Dense Text Retrieval";
code: microsoft/SimXNS, folder SimANS).

Negatives about as similar to the anchor as its positive are the informative ("ambiguous")
ones; far harder ones are likely false negatives and far easier ones carry no gradient. Each
negative is sampled with probability

    p_ij ∝ exp( -a (c_ij - c+_i - b)^2 )          c = s / t (the logits), c+ = the positive's

(the kernel potential-sample mining also uses). ``num_samples`` negatives per anchor are drawn
*without replacement*, by the Gumbel-top-k trick on ``log p`` (exact for sampling without
replacement; no normalisation, no underflow: everything stays in log space, Kool et al. 2019).
The loss sums the drawn columns' logits. ``num_samples=None`` draws nothing and uses ``p`` as
importance weights with mean 1 over the anchor's negatives (the expectation of the sampled
set's mass up to a constant).

The authors apply the kernel to a retriever's raw scores; ours are the logits ``s/t``, on the
scale the loss itself uses (``a`` and ``b`` are in those units).

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("simans", num_samples=4, a=0.5, b=0.0)
    >>> bool(loss_fn(torch.randn(8, 16), torch.randn(8, 16)) > 0)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg import fastpaths
from hardneg._checks import check_number
from hardneg.contrast import ContrastSet
from hardneg.registry import register_strategy
from hardneg.strategies.base import Selection, StepContext, Strategy, normalised_log_weights


def simans_log_kernel(contrast: ContrastSet, a: float, b: float) -> Tensor:
    """``[A, S]`` ``log p`` up to a per-anchor constant: ``-a (c - c+ - b)^2`` (``-inf`` where
    a column is not a negative); detached, no gradient flows through the sampling."""
    logits = contrast.negative_logits.detach()
    positive = contrast.positive_logits.detach()[:, :1]
    kernel = -a * (logits - positive - b).square()
    return kernel.masked_fill(~torch.isfinite(logits), float("-inf"))


@register_strategy("simans", summary="SimANS ambiguous-negative sampling (Zhou et al., EMNLP 2022)")
class SimANSNegatives(Strategy):
    """Sample negatives with ``p ∝ exp(-a (c - c+ - b)^2)``, without replacement.

    Args:
        a: sharpness of the kernel around ``c+ + b``, ``>= 0`` (0 = uniform).
        b: shift of the kernel's centre from the positive's logit.
        num_samples: negatives drawn per anchor without replacement (capped at ``M``); None
            uses the kernel as importance weights instead of drawing.
    """

    loss_defaults = {"temperature": 0.1}
    supports_debiasing = False
    draws = True

    def __init__(self, *, a: float = 0.5, b: float = 0.0, num_samples: int | None = 64) -> None:
        super().__init__()
        self.a = check_number("a", a, low=0.0)
        self.b = check_number("b", b)
        self.num_samples = (
            None
            if num_samples is None
            else int(check_number("num_samples", num_samples, low=1, integer=True))
        )
        self.draws = self.num_samples is not None

    def draw(self, contrast: ContrastSet, context: StepContext) -> Tensor:
        """``[A, k]`` the columns drawn without replacement, ``k = min(num_samples, S)`` (a row
        with fewer negatives also returns masked columns, which the loss ignores)."""
        with torch.no_grad():
            logits = contrast.negative_logits.detach()
            centre = contrast.positive_logits.detach()[:, :1] + self.b
            k = min(self.num_samples, logits.shape[1])
            if context.fast:  # same law, other draws (uniforms from random words, numpy select)
                return fastpaths.simans_draw(logits, centre, self.a, k, context.generator)
            # Gumbel-top-k on log p = -a (c - c+ - b)^2: the k smallest of
            # -(log p + Gumbel) = a (c - c+ - b)^2 + log(-log u) are drawn
            u = torch.rand(
                logits.shape, generator=context.generator, device=logits.device, dtype=torch.float32
            )  # float32 whatever the compute dtype: a seed gives the same draws in float64
            u = u.clamp_min_(torch.finfo(torch.float32).tiny).to(logits.dtype)
            minus_gumbel = u.log_().neg_().log_()
            distance = logits - centre  # -inf on a masked column: its key is +inf if a > 0
            keys = torch.addcmul(minus_gumbel, distance, distance, value=self.a)
            if self.a == 0.0:
                keys = keys.masked_fill(~torch.isfinite(logits), float("inf"))
            return keys.topk(k, dim=1, largest=False, sorted=False).indices

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        if self.num_samples is None:
            log_p = simans_log_kernel(contrast, self.a, self.b)
            return Selection(negative_log_weights=normalised_log_weights(log_p, contrast))
        drawn = self.draw(contrast, context)
        logits = contrast.negative_logits
        if context.want_log_mass and isinstance(contrast.num_negatives, int):
            if contrast.num_negatives > 0:  # every anchor draws at least one negative
                # fast: the gradient through the drawn logits only (no [A, S] gradient)
                chosen = (
                    fastpaths.column_logits(contrast, drawn)
                    if context.fast
                    else logits.gather(1, drawn)
                )
                return Selection(negative_log_mass=chosen.logsumexp(dim=1))
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, drawn, True)
        chosen &= torch.isfinite(logits)
        log_w = torch.zeros_like(logits).masked_fill(~chosen, float("-inf"))
        return Selection(negative_log_weights=log_w)
