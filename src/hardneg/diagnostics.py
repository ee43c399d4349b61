"""What a strategy did with the negatives of one step, for analysis only.

Labels enter here and nowhere else: the loss never sees them.

Two distributions over each anchor's kept negatives are reported:

* ``sampling``: the strategy's own weights, normalised (``q(x-)`` in the papers): uniform for
  InfoNCE, ``∝ e^{beta s/t}`` for HCL, uniform over the band for Ring.
* ``gradient``: each negative's share of the negative mass ``w_ij e^{c_ij} / R_i``, which is how
  strongly the loss pushes it away (the softmax every InfoNCE gradient carries).

From these: the effective number of negatives (Kish, ``(sum w)^2 / sum w^2``), the mass on
same-class (false) negatives, the true-negative precision of the top-k negatives by gradient weight, and the
similarities of the kept negatives (for hardness histograms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hardneg.contrast import ContrastSet
from hardneg.strategies.base import Selection


@dataclass
class NegativeDiagnostics:
    """Per-anchor summaries of one step (all tensors detached, on the loss's device).

    Attributes:
        sampling_weights: ``[A, S]`` strategy weights normalised to sum 1 (0 = not kept).
        gradient_weights: ``[A, S]`` share of each negative in the negative mass.
        effective_negatives: ``[A]`` Kish effective sample size of ``sampling_weights``.
        kept_negatives: ``[A]`` number of negatives with non-zero weight.
        similarities: ``[A, S]`` cosine similarity of each column (``-inf`` = not kept).
        false_negative_mass: ``[A]`` sampling mass on same-class negatives (labels given;
            NaN for an anchor without a label, ``< 0``, e.g. STL-10's unlabeled images).
        false_negative_gradient_mass: ``[A]`` gradient mass on same-class negatives (NaN
            likewise).
        top_k_precision: ``[A]`` fraction of the ``top_k`` negatives with the largest gradient
            weight that belong to another class (true negatives; NaN likewise).
        mass_above_positive: ``[A]`` label-free: gradient mass on kept negatives that score
            above the anchor's (first) positive.
        positive_rank: ``[A]`` label-free: number of kept negatives scoring above the positive
            (0 = the positive ranks first).
        near_duplicate_rate: ``[A]`` label-free: share of kept negatives with cosine
            ``>= duplicate_threshold`` to the anchor (likely duplicates).
        margin_removal_share: ``[A]`` label-free: share of kept negatives that a positive-aware
            margin filter (``s >= s+ - margin``) would remove.
    """

    sampling_weights: Tensor
    gradient_weights: Tensor
    effective_negatives: Tensor
    kept_negatives: Tensor
    similarities: Tensor
    false_negative_mass: Tensor | None = None
    false_negative_gradient_mass: Tensor | None = None
    top_k_precision: Tensor | None = None
    mass_above_positive: Tensor | None = None
    positive_rank: Tensor | None = None
    near_duplicate_rate: Tensor | None = None
    margin_removal_share: Tensor | None = None
    extras: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Batch means as plain floats, for logs and tables."""
        out = {
            "effective_negatives": float(self.effective_negatives.mean()),
            "kept_negatives": float(self.kept_negatives.float().mean()),
        }
        kept = torch.isfinite(self.similarities)
        sims = self.similarities[kept]
        w = self.sampling_weights[kept]
        out["mean_negative_similarity"] = float((sims * w).sum() / w.sum().clamp_min(1e-12))
        # label-based measures: over the labelled anchors (NaN rows are unlabelled); a batch
        # without one has none
        for name in ("false_negative_mass", "false_negative_gradient_mass", "top_k_precision"):
            value = getattr(self, name)
            if value is not None and not bool(value.isnan().all()):
                out[name] = float(value.nanmean())
        for name in (
            "mass_above_positive",
            "positive_rank",
            "near_duplicate_rate",
            "margin_removal_share",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value.float().mean())
        out.update(self.extras)
        return out


def negative_diagnostics(
    contrast: ContrastSet,
    selection: Selection,
    *,
    anchor_labels: Tensor | None = None,
    column_labels: Tensor | None = None,
    top_k: int = 10,
    margin: float = 0.05,
    duplicate_threshold: float = 0.99,
) -> NegativeDiagnostics:
    """Summarise a selection over a contrast set. Labels (``[A]`` and ``[C]``, by default the
    contrast set's own; ``[A, S]`` column labels label every column of every anchor) are used for
    analysis only; unlabelled columns count as other-class, and an unlabelled anchor (label
    ``< 0``) has no false-negative measures (NaN): two unlabelled images are not of one class."""
    if anchor_labels is None:
        anchor_labels = contrast.anchor_labels
    if column_labels is None:
        column_labels = contrast.column_labels
    with torch.no_grad():
        logits = contrast.negative_logits.detach().float()
        log_w = torch.zeros_like(logits)
        if selection.negative_log_weights is not None:
            log_w = selection.negative_log_weights.detach().float()
        kept = torch.isfinite(logits) & torch.isfinite(log_w)
        if selection.extra_negative_logits is not None:
            extra = selection.extra_negative_logits.detach().float()
            logits = torch.cat([logits, extra], dim=1)
            log_w = torch.cat([log_w, torch.zeros_like(extra)], dim=1)
            kept = torch.cat([kept, torch.ones_like(extra, dtype=torch.bool)], dim=1)
        log_w = log_w.masked_fill(~kept, float("-inf"))
        sampling = torch.softmax(log_w, dim=1)
        gradient = torch.softmax(log_w + logits.masked_fill(~kept, 0.0), dim=1)
        ess = 1.0 / (sampling**2).sum(dim=1)
        diag = NegativeDiagnostics(
            sampling_weights=sampling,
            gradient_weights=gradient,
            effective_negatives=ess,
            kept_negatives=(sampling > 0).sum(dim=1),
            similarities=(logits * contrast.temperature).masked_fill(~kept, float("-inf")),
        )
        # label-free facts about the negatives, relative to the (first) positive
        pos = contrast.positive_logits.detach().float()[:, :1]
        above = (logits > pos) & kept
        count = kept.sum(dim=1).clamp_min(1)
        sims = diag.similarities
        diag.mass_above_positive = (gradient * above).sum(dim=1)
        diag.positive_rank = above.sum(dim=1)
        diag.near_duplicate_rate = ((sims >= duplicate_threshold) & kept).sum(dim=1) / count
        would_remove = (sims >= pos * contrast.temperature - margin) & kept
        diag.margin_removal_share = would_remove.sum(dim=1) / count
        if anchor_labels is not None and column_labels is not None:
            a = logits.shape[0]
            col = column_labels.to(logits.device)
            col = col if col.dim() == 2 else col.unsqueeze(0).expand(a, -1)  # [A, h]: per anchor
            anchor = anchor_labels.to(logits.device)
            same = col == anchor.unsqueeze(1)
            if same.shape[1] < logits.shape[1]:  # per-anchor and synthetic columns
                pad = torch.zeros(
                    a, logits.shape[1] - same.shape[1], dtype=torch.bool, device=logits.device
                )
                same = torch.cat([same, pad], dim=1)
            same = same & kept
            k = min(top_k, logits.shape[1])
            top = gradient.topk(k, dim=1).indices
            top_kept = kept.gather(1, top)
            true_neg = (~same.gather(1, top)) & top_kept
            # -1 = no label (STL-10's unlabeled split): -1 == -1 is no class match, so such an
            # anchor's measures are undefined rather than "every unlabelled negative is a
            # false negative"
            unknown = anchor < 0
            nan = torch.full((), float("nan"), device=logits.device)
            diag.false_negative_mass = torch.where(unknown, nan, (sampling * same).sum(dim=1))
            diag.false_negative_gradient_mass = torch.where(
                unknown, nan, (gradient * same).sum(dim=1)
            )
            precision = true_neg.sum(dim=1) / top_kept.sum(dim=1).clamp_min(1)
            diag.top_k_precision = torch.where(unknown, nan, precision)
        diag.extras.update(selection.extras)
        return diag
