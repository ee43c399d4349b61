"""Read what a training run left on disk: ``history.csv``, ``hardness.npz``, ``metrics.json``.

The trainer writes one ``history.csv`` row per epoch (``epoch``, ``loss``, ``knn_top1`` when the
monitor ran, the negative-selection diagnostics...) and ``hardness.npz`` with per-epoch histograms
of the kept negatives' cosine similarities (arrays ``bins``, ``epochs``, ``sampling``,
``gradient``). ``hardneg eval --report`` and ``hardneg compare`` add ``metrics.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

HISTORY_FILE = "history.csv"
HARDNESS_FILE = "hardness.npz"
METRICS_FILE = "metrics.json"

History = list[dict[str, float]]  # rows of history.csv


def load_history(run_dir: str | Path) -> History:
    """Rows of ``history.csv`` as floats (empty cells -> NaN); ``[]`` when the file is missing."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [{k: _to_float(v) for k, v in row.items() if k} for row in csv.DictReader(fh)]


def history_column(history: History, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(epochs, values)`` of one column, rows where it is missing or NaN dropped."""
    pairs = [
        (row.get("epoch", i + 1), row[key])
        for i, row in enumerate(history)
        if key in row and not math.isnan(row[key])
    ]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    epochs, values = zip(*pairs)
    return np.asarray(epochs, dtype=float), np.asarray(values, dtype=float)


def load_hardness(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of ``hardness.npz`` with ``edges`` (bin edges) added; ``None`` if absent/empty."""
    path = Path(run_dir) / HARDNESS_FILE
    if not path.exists():
        return None
    with np.load(path) as data:
        arrays = {key: np.asarray(data[key]) for key in data.files}
    for key in ("bins", "sampling", "gradient"):
        if key not in arrays:
            raise ValueError(f"{path}: missing array {key!r} (has {sorted(arrays)})")
    if arrays["sampling"].ndim != 2 or arrays["sampling"].shape[0] == 0:
        return None
    arrays["edges"] = bin_edges(arrays["bins"], arrays["sampling"].shape[1])
    if "epochs" not in arrays:
        arrays["epochs"] = np.arange(1, arrays["sampling"].shape[0] + 1)
    return arrays


def bin_edges(bins: np.ndarray, num_bins: int) -> np.ndarray:
    """Histogram edges from ``bins`` given either as ``num_bins + 1`` edges or as centres."""
    bins = np.asarray(bins, dtype=float)
    if bins.shape[0] == num_bins + 1:
        return bins
    if bins.shape[0] == num_bins and num_bins > 1:
        half = (bins[1] - bins[0]) / 2
        return np.concatenate([bins - half, bins[-1:] + half])
    raise ValueError(f"bins has {bins.shape[0]} entries for {num_bins} histogram bins")


def load_metrics(run_dir: str | Path) -> dict:
    """``metrics.json`` of a run (``{}`` when it has not been evaluated, or when the file is
    not a JSON object: a cache of the evaluation, so the caller evaluates again rather than
    stopping every later ``hardneg compare`` on "Expecting value: line 1 column 1")."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def save_metrics(run_dir: str | Path, metrics: dict) -> Path:
    """Write ``metrics.json`` (plain JSON values only) through a temporary file and a rename,
    so that a full disk or a kill while writing leaves the previous file, not half of one."""
    path = Path(run_dir) / METRICS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _to_float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan
