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

from hardneg.pool import ContrastiveScores
from hardneg.strategies.base import NegativeSelection


@dataclass
class NegativeDiagnostics:
    """Per-anchor summaries of one step (all tensors detached, on the loss's device).

    Attributes:
        sampling_weights: ``[A, S]`` strategy weights normalised to sum 1 (0 = not kept).
        gradient_weights: ``[A, S]`` share of each negative in the negative mass.
        effective_negatives: ``[A]`` Kish effective sample size of ``sampling_weights``.
        kept_negatives: ``[A]`` number of negatives with non-zero weight.
        similarities: ``[A, S]`` cosine similarity of each column (``-inf`` = not kept).
        false_negative_mass: ``[A]`` sampling mass on same-class negatives (labels given).
        false_negative_gradient_mass: ``[A]`` gradient mass on same-class negatives.
        top_k_precision: ``[A]`` fraction of the ``top_k`` negatives with the largest gradient
            weight that belong to another class (true negatives).
    """

    sampling_weights: Tensor
    gradient_weights: Tensor
    effective_negatives: Tensor
    kept_negatives: Tensor
    similarities: Tensor
    false_negative_mass: Tensor | None = None
    false_negative_gradient_mass: Tensor | None = None
    top_k_precision: Tensor | None = None
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
        if self.false_negative_mass is not None:
            out["false_negative_mass"] = float(self.false_negative_mass.mean())
        if self.false_negative_gradient_mass is not None:
            out["false_negative_gradient_mass"] = float(self.false_negative_gradient_mass.mean())
        if self.top_k_precision is not None:
            out["top_k_precision"] = float(self.top_k_precision.mean())
        out.update(self.extras)
        return out


def negative_diagnostics(
    scores: ContrastiveScores,
    selection: NegativeSelection,
    *,
    anchor_labels: Tensor | None = None,
    candidate_labels: Tensor | None = None,
    top_k: int = 10,
) -> NegativeDiagnostics:
    """Summarise a selection; labels (``[A]`` and ``[C]``) are used for analysis only."""
    with torch.no_grad():
        logits = selection.logits.detach().float()
        kept = torch.isfinite(logits)
        dense = selection.dense_log_weights()
        log_w = torch.zeros_like(logits) if dense is None else dense.detach().float()
        log_w = log_w.masked_fill(~kept, float("-inf"))
        sampling = torch.softmax(log_w, dim=1)
        gradient = torch.softmax(log_w + logits, dim=1)
        ess = 1.0 / (sampling**2).sum(dim=1)
        diag = NegativeDiagnostics(
            sampling_weights=sampling,
            gradient_weights=gradient,
            effective_negatives=ess,
            kept_negatives=(sampling > 0).sum(dim=1),
            similarities=logits * scores.temperature,
        )
        if anchor_labels is not None and candidate_labels is not None:
            cand = candidate_labels.to(logits.device)
            if selection.indices is None:
                col_labels = cand.unsqueeze(0).expand(logits.shape[0], -1)
            else:
                col_labels = cand[selection.indices]
            same = (col_labels == anchor_labels.to(logits.device).unsqueeze(1)) & kept
            diag.false_negative_mass = (sampling * same).sum(dim=1)
            diag.false_negative_gradient_mass = (gradient * same).sum(dim=1)
            k = min(top_k, logits.shape[1])
            top = gradient.topk(k, dim=1).indices
            top_kept = kept.gather(1, top)
            true_neg = (~same.gather(1, top)) & top_kept
            diag.top_k_precision = true_neg.sum(dim=1) / top_kept.sum(dim=1).clamp_min(1)
        return diag
