"""PNG figures of runs: curves over epochs, hardness histograms, t-SNE of test embeddings.

Every function takes a mapping ``label -> data`` (one entry per strategy; one entry for a single
run), so the same figure serves a run report and a side-by-side comparison. Figures are drawn
with :class:`matplotlib.figure.Figure` (Agg canvas), never pyplot, so no global backend or window
state is touched and the functions are safe in headless jobs and threads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from hardneg.report.runs import History, history_column

DPI = 100


def strategy_colors(labels: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per label (tab10 order), shared by every figure of a report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def strategy_styles(labels: Sequence[str]) -> dict[str, dict]:
    """Colour, marker and line style per label. Markers are hollow and shrink with the label's
    index, and the line styles alternate, so two labels whose curves coincide (InfoNCE and the
    debiased loss sample negatives the same way) both stay visible."""
    colors = strategy_colors(labels)
    return {
        label: {
            "color": colors[label],
            "marker": MARKERS[i % len(MARKERS)],
            "ms": max(3.0, 8.0 - 0.9 * i),
            "mfc": "none",
            "mew": 1.2,
            "ls": "-" if i % 2 == 0 else "--",
            "lw": 1.4,
        }
        for i, label in enumerate(labels)
    }


@dataclass
class Curve:
    """One line of a curve figure: epochs, mean and std over the runs, legend name."""

    name: str
    epochs: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    runs: int


def metric_curves(
    histories: Mapping[str, Sequence[History]], key: str, *, relative: bool = False
) -> dict[str, Curve]:
    """The lines :func:`plot_metric_curves` draws, per label (labels without ``key`` left out).

    ``relative``: each curve divided by its own first value, which the legend name states.
    """
    curves = {}
    for label, runs in histories.items():
        by_epoch: dict[float, list[float]] = {}
        for history in runs:
            for epoch, value in zip(*history_column(history, key)):
                by_epoch.setdefault(float(epoch), []).append(float(value))
        if not by_epoch:
            continue
        epochs = np.array(sorted(by_epoch))
        mean = np.array([np.mean(by_epoch[e]) for e in epochs])
        std = np.array([np.std(by_epoch[e]) for e in epochs])
        name = label
        if relative and mean[0] != 0:
            name = f"{label} (epoch {epochs[0]:g}: {mean[0]:.3g})"
            mean, std = mean / mean[0], std / abs(mean[0])
        runs_n = max(len(v) for v in by_epoch.values())
        curves[label] = Curve(name, epochs, mean, std, runs_n)
    return curves


def plot_metric_curves(
    histories: Mapping[str, Sequence[History]],
    key: str,
    path: str | Path,
    *,
    ylabel: str | None = None,
    title: str | None = None,
    relative: bool = False,
) -> Path | None:
    """Column ``key`` of ``history.csv`` over epochs, one line per label (mean over its runs,
    shaded +- std when there are several). Returns ``None`` when no run logged ``key``.

    ``relative=True`` divides each label's curve by its own first value (the legend gives that
    value), so curves on different scales share one axis: the potential loss sums ``K + 1``
    positive terms and starts near 40 where the others start near 5.
    """
    styles = strategy_styles(list(histories))
    curves = metric_curves(histories, key, relative=relative)
    if not curves:
        return None
    fig = Figure(figsize=(6.4, 3.4), dpi=DPI)
    ax = fig.add_subplot()
    for label, curve in curves.items():
        style = dict(styles[label])
        if len(curve.epochs) >= 15:
            style.pop("marker")
        ax.plot(curve.epochs, curve.mean, label=curve.name, **style)
        if curve.runs > 1:
            low, high = curve.mean - curve.std, curve.mean + curve.std
            ax.fill_between(curve.epochs, low, high, color=style["color"], alpha=0.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel or key)
    ax.set_title(title or key, fontsize=10)
    ax.grid(alpha=0.3)
    # outside the axes, so it never hides a curve
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def plot_hardness(
    hardness: Mapping[str, Mapping[str, np.ndarray]],
    path: str | Path,
    *,
    max_epochs_shown: int = 3,
) -> Path | None:
    """Histograms of the kept negatives' cosine similarity to their anchor, per label.

    Top row: weighted by the strategy's sampling weights (which negatives it picks); bottom row:
    by gradient weights (how hard the loss pushes each away). Each panel shows up to
    ``max_epochs_shown`` recorded epochs (first ... last, light to dark) as densities.
    """
    hardness = {k: v for k, v in hardness.items() if v is not None}
    if not hardness:
        return None
    from matplotlib import colormaps

    n = len(hardness)
    fig = Figure(figsize=(2.6 * n + 0.6, 4.6), dpi=DPI)
    axes = fig.subplots(2, n, squeeze=False, sharex=True)
    cmap = colormaps["viridis"]
    for col, (label, data) in enumerate(hardness.items()):
        edges = data["edges"]
        centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        epochs = np.asarray(data["epochs"])
        picks = _spread(len(epochs), max_epochs_shown)
        for row, kind in enumerate(("sampling", "gradient")):
            ax = axes[row, col]
            for j, idx in enumerate(picks):
                hist = np.asarray(data[kind][idx], dtype=float)
                total = hist.sum()
                density = hist / (total * widths) if total > 0 else hist
                shade = cmap(0.85 * (j + 1) / len(picks))
                ax.plot(centres, density, color=shade, lw=1.3, label=f"epoch {int(epochs[idx])}")
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(label, fontsize=10)
            else:
                ax.set_xlabel("cos(anchor, negative)", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{kind}-weighted density", fontsize=8)
        axes[0, col].legend(fontsize=6)
    fig.suptitle("Hardness of the negatives", fontsize=10)
    return _save(fig, path)


def plot_tsne(
    embeddings: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    max_points: int = 1000,
    seed: int = 0,
    threads: int | None = 1,
) -> Path | None:
    """t-SNE (scikit-learn) of a seeded subsample of test embeddings, coloured by class.

    ``embeddings`` maps a label to ``(features [N, D], labels [N])``; one panel per label, the same
    subsample indices for every label when their test sets have the same size. ``threads`` caps
    the OpenMP threads of the t-SNE (``None``: library default). One thread is the default because
    Barnes-Hut t-SNE gains little from threads at these sizes, while busy-waiting OpenMP threads
    crawl when the cores are shared: 1000 points took 55 s with 2 threads and 9 s with 1 on two
    busy cores.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if not embeddings:
        return None
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    n = len(embeddings)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    classes = sorted({int(c) for _, labels in embeddings.values() for c in np.asarray(labels)})
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    class_colors = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}
    legend_width = 0.8 if len(classes) <= 12 else 1.3  # inches, right of the panels
    fig = Figure(figsize=(max(3.3 * cols, 4.4) + legend_width, 3.2 * rows), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (label, (features, labels)) in zip(axes.flat, embeddings.items()):
        features = np.asarray(features, dtype=np.float32)
        labels = np.asarray(labels)
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.permutation(len(features))[:max_points])
        x, y = features[idx], labels[idx]
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed)
        with threadpool_limits(limits=threads):
            xy = tsne.fit_transform(x)
        ax.scatter(xy[:, 0], xy[:, 1], c=[class_colors[c] for c in y], s=4, linewidths=0)
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"t-SNE of {len(x)} test embeddings (colour = class)", fontsize=10)
    handles = [
        Line2D([], [], ls="", marker="o", ms=5, color=class_colors[c], label=str(c))
        for c in classes
    ]
    fig.legend(
        handles=handles,
        title="class",
        fontsize=7,
        title_fontsize=8,
        loc="center right",
        ncols=1 if len(classes) <= 12 else 2,
    )
    fig.tight_layout(rect=(0, 0, 1 - legend_width / fig.get_figwidth(), 1))
    return _save(fig, path, layout=False)


def _spread(count: int, k: int) -> list[int]:
    """Up to ``k`` evenly spread indices of ``range(count)``, first and last included."""
    if count <= k:
        return list(range(count))
    return sorted({round(i * (count - 1) / (k - 1)) for i in range(k)}) if k > 1 else [count - 1]


def _save(fig: Figure, path: str | Path, layout: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, format="png")
    return path
