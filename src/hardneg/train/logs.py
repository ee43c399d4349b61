"""What a run records: per-epoch statistics, hardness histograms, and the files in the run dir.

* ``history.csv``: one row per epoch (:data:`HISTORY_FIELDS` first, then any extra diagnostics);
* ``hardness.npz``: per epoch, histograms over :data:`NUM_BINS` fixed bins in ``[-1, 1]`` of the
  cosine similarity of the negatives the strategy kept, weighted by the strategy's sampling
  weights and by each negative's share of the gradient (arrays ``bins``, ``epochs``,
  ``sampling``, ``gradient``; each row sums to 1);
* ``tb/``: TensorBoard scalars (per step and per epoch).

Labels enter only through the diagnostics (analysis only, see :mod:`hardneg.diagnostics`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hardneg.diagnostics import NegativeDiagnostics

NUM_BINS = 50
HISTORY_FIELDS = (
    "epoch",
    "step",
    "loss",
    "lr",
    "images_per_s",
    "epoch_time_s",
    "skipped_steps",
    "knn_top1",
    "knn_top5",
    "effective_negatives",
    "kept_negatives",
    "false_negative_mass",
    "false_negative_gradient_mass",
    "top_k_precision",
    "mean_negative_similarity",
    "mass_above_positive",
    "positive_rank",
    "near_duplicate_rate",
    "margin_removal_share",
)


def hardness_histograms(diag: NegativeDiagnostics, bins: int = NUM_BINS) -> tuple[Tensor, Tensor]:
    """Histograms ``[bins]`` of kept-negative similarities weighted by the sampling and by the
    gradient weights, averaged over anchors (each sums to 1)."""
    sims = diag.similarities
    kept = torch.isfinite(sims)
    index = ((sims[kept].clamp(-1.0, 1.0) + 1.0) * (bins / 2)).long().clamp_(0, bins - 1)
    anchors = max(sims.shape[0], 1)
    out = []
    for weights in (diag.sampling_weights, diag.gradient_weights):
        hist = torch.zeros(bins, dtype=torch.float64, device=sims.device)
        hist.index_add_(0, index, weights[kept].double())
        out.append(hist.cpu() / anchors)
    return out[0], out[1]


class EpochStats:
    """Running sums of one epoch (saved in mid-epoch checkpoints so a resumed epoch's row is
    the same as an uninterrupted one's)."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.steps = 0
        self.skipped = 0
        self.images = 0
        self.elapsed = 0.0
        self.diag_sums: dict[str, float] = {}
        self.diag_steps = 0
        self.sampling = torch.zeros(NUM_BINS, dtype=torch.float64)
        self.gradient = torch.zeros(NUM_BINS, dtype=torch.float64)

    def add_step(self, loss: float | None, images: int) -> None:
        """A finished step (``loss=None``: a skipped non-finite step)."""
        self.images += images
        if loss is None:
            self.skipped += 1
        else:
            self.loss_sum += loss
            self.steps += 1

    def add_diagnostics(self, diag: NegativeDiagnostics) -> dict[str, float]:
        summary = diag.summary()
        for key, value in summary.items():
            self.diag_sums[key] = self.diag_sums.get(key, 0.0) + float(value)
        sampling, gradient = hardness_histograms(diag)
        self.sampling += sampling
        self.gradient += gradient
        self.diag_steps += 1
        return summary

    def row(self) -> dict[str, float]:
        """Epoch means: loss, skipped steps, images/s and the diagnostics."""
        out: dict[str, float] = {
            "loss": self.loss_sum / self.steps if self.steps else float("nan"),
            "images_per_s": self.images / self.elapsed if self.elapsed > 0 else float("nan"),
            "epoch_time_s": self.elapsed,
            "skipped_steps": self.skipped,
        }
        for key, value in self.diag_sums.items():
            out[key] = value / self.diag_steps
        return out

    def histograms(self) -> tuple[Tensor, Tensor] | None:
        if self.diag_steps == 0:
            return None
        return self.sampling / self.diag_steps, self.gradient / self.diag_steps

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, dict(value) if isinstance(value, dict) else value)


class HardnessLog:
    """Per-epoch hardness histograms, written to ``hardness.npz``."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.sampling: list[Tensor] = []
        self.gradient: list[Tensor] = []

    def add(self, epoch: int, histograms: tuple[Tensor, Tensor] | None) -> None:
        if histograms is not None:
            self.epochs.append(epoch)
            self.sampling.append(histograms[0])
            self.gradient.append(histograms[1])

    def save(self, path: Path) -> None:
        empty = np.zeros((0, NUM_BINS))
        arrays = {
            "bins": np.linspace(-1.0, 1.0, NUM_BINS + 1),
            "epochs": np.asarray(self.epochs, dtype=np.int64),
            "sampling": torch.stack(self.sampling).numpy() if self.sampling else empty,
            "gradient": torch.stack(self.gradient).numpy() if self.gradient else empty,
        }
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "sampling": self.sampling, "gradient": self.gradient}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = list(state["epochs"])
        self.sampling = list(state["sampling"])
        self.gradient = list(state["gradient"])


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``history.csv`` (standard columns first, then extras in order of appearance)."""
    columns = [c for c in HISTORY_FIELDS if any(c in row for row in history)]
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


class TensorBoard:
    """Thin wrapper over ``SummaryWriter`` (imported lazily; rank 0 only)."""

    def __init__(self, directory: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory), purge_step=purge_step)

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def histograms(self, histograms: tuple[Tensor, Tensor] | None, step: int) -> None:
        if histograms is None:
            return
        edges = np.linspace(-1.0, 1.0, NUM_BINS + 1)
        for name, hist in zip(("sampling", "gradient"), histograms):
            self.writer.add_histogram_raw(
                f"hardness/{name}",
                min=-1.0,
                max=1.0,
                num=float(hist.sum()),
                sum=float((hist.numpy() * (edges[:-1] + edges[1:]) / 2).sum()),
                sum_squares=float((hist.numpy() * ((edges[:-1] + edges[1:]) / 2) ** 2).sum()),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=hist.tolist(),
                global_step=step,
            )

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
