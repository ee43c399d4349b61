"""``hardneg demo --modality graph``: every registered strategy on the embedded motif graphs.

All strategies train the same GIN encoder with GraphCL-style graph-graph contrast (two augmented
views, in-batch negatives); InfoGraph's local-global contrast adds three rows: its
Jensen-Shannon loss (uniform weights), HCL's ``JSD_hard`` as the authors' code computes it, and
the same with the weights' sign flipped (``direction='hard'``). Frozen graph embeddings are scored
by an RBF SVM with ``C`` chosen by an inner grid search, a weighted kNN and a linear probe, in
stratified cross-validation (a reduced grid and 5 folds, to fit the time budget: the full
InfoGraph protocol is :mod:`hardneg.graph.protocol`). Two reference rows show what needs no
contrastive training: a logistic regression on degree histograms and the untrained encoder.

The default schedule (400 graphs, 30 epochs) runs in about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from hardneg._checks import check_number
from hardneg.graph.data import degree_histograms, motif_graphs
from hardneg.graph.evaluate import knn_accuracy, linear_accuracy, svm_accuracy
from hardneg.graph.graphcl import GraphCL
from hardneg.graph.infograph import InfoGraph
from hardneg.graph.train import embed, train_graphs
from hardneg.registry import list_losses

DEMO_SVM = {"folds": 5, "inner_folds": 3, "c_grid": (0.1, 1.0, 10.0, 100.0)}


def evaluate_quick(emb, labels, seed: int) -> dict[str, float]:
    out = svm_accuracy(emb, labels, seed=seed, **DEMO_SVM)
    out["knn"] = knn_accuracy(emb, labels, folds=DEMO_SVM["folds"], seed=seed)
    out["linear"] = linear_accuracy(emb, labels, folds=DEMO_SVM["folds"], seed=seed, max_iter=200)
    return out


def degree_baseline(data, seed: int) -> float:
    """Logistic regression on per-graph degree histograms (standardised), stratified CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = degree_histograms(data.graphs)
    x = np.c_[x, x.sum(1)]  # and the node count
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(n_splits=DEMO_SVM["folds"], shuffle=True, random_state=seed)
    return 100.0 * float(cross_val_score(model, x, data.labels.numpy(), cv=folds).mean())


def demo_models(in_features: int, strategies: Sequence[str]) -> list[tuple[str, str, Callable]]:
    """``(framework, strategy label, factory)`` of every row that trains."""
    rows: list[tuple[str, str, Callable]] = []
    for name in strategies:
        rows.append(("graphcl", name, lambda n=name: GraphCL(in_features, loss=n)))
    rows.append(("infograph", "infonce (JSD)", lambda: InfoGraph(in_features, loss="infonce")))
    rows.append(
        (
            "infograph",
            "hcl (JSD_hard, authors, beta=1)",
            lambda: InfoGraph(in_features, loss="hcl", loss_hparams={"beta": 1.0}),
        )
    )
    rows.append(
        (
            "infograph",
            "hcl (JSD_hard, hard, beta=1)",
            lambda: InfoGraph(
                in_features, loss="hcl", loss_hparams={"beta": 1.0}, direction="hard"
            ),
        )
    )
    return rows


def run_graph_demo(
    out: Path,
    *,
    strategies: Sequence[str] | None = None,
    num_graphs: int = 400,
    epochs: int = 30,
    batch_size: int = 128,
    seed: int = 0,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train and evaluate every row; write ``results.json`` and ``report.md`` to ``out``.

    ``threads``: torch's intra-op threads while the demo runs (restored afterwards).
    """
    # checked before the baselines run: train_graphs checked them too, but only after the
    # baselines, and each strategy's row then failed with the same error (epochs=-1, seed=-1)
    check_number("num_graphs", num_graphs, low=2, integer=True)
    check_number("epochs", epochs, low=0, integer=True)
    check_number("batch_size", batch_size, low=2, integer=True)
    check_number("seed", seed, low=0, integer=True)
    check_number("threads", threads, low=1, integer=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # small graph models: one thread is faster, and shares well
    try:
        return _run_graph_demo(out, strategies, num_graphs, epochs, batch_size, seed, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run_graph_demo(out, strategies, num_graphs, epochs, batch_size, seed, log) -> list[dict]:
    strategies = list(list_losses() if strategies is None else strategies)
    unknown = [s for s in strategies if s not in list_losses()]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; registered: {', '.join(list_losses())}")
    torch.manual_seed(seed)
    data = motif_graphs(num_graphs, seed=seed)
    rows: list[dict] = []
    start = time.perf_counter()
    rows.append(
        {
            "framework": "baseline",
            "strategy": "degree histogram + logistic regression",
            "svm": degree_baseline(data, seed),
        }
    )
    encoder = GraphCL(data.num_features).encoder
    emb, labels = embed(encoder, data)
    rows.append(
        {
            "framework": "baseline",
            "strategy": "untrained GIN encoder",
            **evaluate_quick(emb, labels, seed),
        }
    )
    log(f"baselines done ({time.perf_counter() - start:.0f} s)")
    for framework, label, factory in demo_models(data.num_features, strategies):
        torch.manual_seed(seed)
        model = factory()
        row: dict = {"framework": framework, "strategy": label}
        try:
            fit = train_graphs(model, data, epochs=epochs, batch_size=batch_size, seed=seed)
            emb, labels = embed(model.encoder, data)
            row.update(evaluate_quick(emb, labels, seed))
            row["train_s"] = fit["seconds"]
        except Exception as err:  # one failing strategy must not hide the others
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
        log(f"{framework:9s} {label:34s} " + _row_text(row))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = format_table(rows)
    seconds = time.perf_counter() - start
    (out / "report.md").write_text(
        "# hardneg graph demo\n\n"
        f"{num_graphs} motif graphs (4 classes, same degree sequence), {epochs} epochs, "
        f"batch {batch_size}, seed {seed}; SVM: {DEMO_SVM['folds']}-fold stratified CV with C "
        f"in {list(DEMO_SVM['c_grid'])} chosen by {DEMO_SVM['inner_folds']}-fold grid search. "
        f"{seconds:.0f} s in all.\n\n{table}\n"
    )
    _plot(rows, out / "accuracy.png")
    return rows


def _row_text(row: dict) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    return " ".join(f"{k}={row[k]:.1f}" for k in ("svm", "knn", "linear", "train_s") if k in row)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the demo's rows."""
    lines = [
        "| framework | strategy | SVM (%) | kNN (%) | linear (%) | train (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['framework']} | {r['strategy']} | failed: {r['error']} | | | |")
            continue
        cells = []
        for key in ("svm", "knn", "linear", "train_s"):
            value = r.get(key)
            if value is None:
                cells.append("")
            elif key == "svm" and "svm_std" in r:
                cells.append(f"{value:.1f} ± {r['svm_std']:.1f}")
            else:
                cells.append(f"{value:.1f}")
        lines.append(f"| {r['framework']} | {r['strategy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "svm" in r]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ok) + 1))
    ax.barh([f"{r['framework']}: {r['strategy']}" for r in ok], [r["svm"] for r in ok])
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)  [SVM; baseline: logistic regression]")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_cli(args) -> int:
    """Entry from ``hardneg demo --modality graph``."""
    if not args.strategies:  # default: every registered strategy
        strategies = None
    else:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    options: dict = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in ("num_graphs", "epochs", "batch_size", "seed", "threads"):
            raise ValueError(
                f"graph demo overrides are num_graphs, epochs, batch_size, seed, threads; got {item!r}"
            )
        try:
            options[key] = int(value)
        except ValueError:
            raise ValueError(
                f"graph demo override {key} must be a whole number, got {value!r}"
            ) from None
    out = Path(args.out) if args.out else Path("runs") / time.strftime("graph-demo-%Y%m%d-%H%M%S")
    from hardneg.commands import status_printer

    rows = run_graph_demo(out, strategies=strategies, log=status_printer(args), **options)
    print()
    print(format_table(rows))
    print(f"\nreport: {out / 'report.md'}")
    return 1 if any("error" in r for r in rows) else 0
