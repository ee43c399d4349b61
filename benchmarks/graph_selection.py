"""How much choosing the evaluation epoch on test accuracy adds to an InfoGraph figure.

Our graph protocol (:mod:`hardneg.graph.protocol`, HCL's ``graph/deepinfomax.py``) reports the
SVM accuracy of the *final* epoch. InfoGraph's own result script (``unsupervised/test.py`` in
fanyun-sun/InfoGraph, commit 7430c40) evaluates after every epoch and reports, per classifier,
the largest mean over runs across every evaluation epoch (and every configuration of its sweep:
layers, learning rate, epochs), chosen on the same test folds. This script trains the
protocol's runs once, scores the frozen embeddings every ``--every`` epochs (epoch 0 too), and
prints per epoch the mean over runs, then the final-epoch figure next to the best epoch's (the
selection of one configuration; a sweep selects among more). ``--gamma auto`` adds the RBF
kernel width of scikit-learn before 0.22 (``1 / n_features``; the protocol uses ``'scale'``).

Scoring does not change training: the embeddings are read in eval mode, without randomness, so
the final epoch's score is the protocol's run (tested).

Examples:
    python benchmarks/graph_selection.py --data-dir ../shared/data/TU --repeats 5
    python benchmarks/graph_selection.py --data-dir DIR --config mutag --every 10 --gamma scale,auto
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from hardneg.graph.data import GraphSet, load_tu
from hardneg.graph.evaluate import svm_accuracy
from hardneg.graph.protocol import (
    build_model,
    degree_option,
    load_graph_config,
    run_seed,
    shuffled,
)
from hardneg.graph.train import embed, train_graphs


def scores_over_training(
    cfg: dict,
    data: GraphSet,
    *,
    repeat: int,
    every: int,
    gammas: tuple[str, ...] = ("scale",),
    loss: str = "infonce",
    objective: str = "jsd",
) -> dict[str, dict[int, float]]:
    """One protocol run (seed ``run_seed(repeat, None)``, the config's model and training) with
    the SVM score of the frozen embeddings at epoch 0 and every ``every`` epochs up to the
    last: ``{gamma: {epoch: accuracy (percent)}}``."""
    seed = run_seed(repeat, None)
    torch.manual_seed(seed)
    model = build_model(cfg, data, loss=loss, loss_hparams={}, objective=objective)
    run_data = shuffled(data, seed)
    epochs = int(cfg["epochs"])
    out: dict[str, dict[int, float]] = {g: {} for g in gammas}
    folds = int(cfg.get("svm_folds", 10))

    def score(epoch: int, _loss: float = 0.0) -> None:
        if epoch % every and epoch != epochs:
            return
        emb, labels = embed(model.encoder, run_data)
        for g in gammas:
            out[g][epoch] = svm_accuracy(emb, labels, folds=folds, seed=seed, gamma=g)["svm"]

    score(0)
    train_graphs(
        model,
        run_data,
        epochs=epochs,
        batch_size=int(cfg.get("batch_size", 128)),
        lr=float(cfg.get("lr", 1e-3)),
        seed=seed,
        shuffle=False,
        log=score,
    )
    return out


def summarise(runs: list[dict[int, float]]) -> dict[str, float]:
    """Final epoch (mean ± sample std over runs) against the epoch whose mean over runs is the
    largest (InfoGraph's ``test.py``: ``argmax`` of the per-epoch mean, population std), and
    the mean of each run's own best epoch."""
    epochs = sorted(runs[0])
    table = np.array([[run[e] for e in epochs] for run in runs])
    means = table.mean(axis=0)
    best = int(means.argmax())
    last = table[:, -1]
    return {
        "final": float(last.mean()),
        "final_std": float(last.std(ddof=1)) if len(runs) > 1 else 0.0,
        "best_epoch": float(epochs[best]),
        "best": float(means[best]),
        "best_std": float(table[:, best].std()),
        "per_run_best": float(table.max(axis=1).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding <DATASET>/raw (TU)")
    parser.add_argument("--config", default="mutag", help="graph config name or YAML path")
    parser.add_argument("--repeats", type=int, default=5, help="runs (repeats 0..R-1)")
    parser.add_argument("--every", type=int, default=20, help="score every this many epochs")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--gamma", default="scale", help="SVC gammas, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (protocol: 1)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.every < 1:
        parser.error("--repeats and --every must be at least 1")
    torch.set_num_threads(args.threads)
    cfg = load_graph_config(args.config)
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    gammas = tuple(g.strip() for g in args.gamma.split(",") if g.strip())
    data = load_tu(args.data_dir, cfg["dataset"], degree=degree_option(cfg))
    start = time.perf_counter()
    per_gamma: dict[str, list[dict[int, float]]] = {g: [] for g in gammas}
    for r in range(args.repeats):
        run = scores_over_training(cfg, data, repeat=r, every=args.every, gammas=gammas)
        for g in gammas:
            per_gamma[g].append(run[g])
        print(f"repeat {r}: " + "; ".join(f"{g} {run[g]}" for g in gammas), file=sys.stderr)
    print(
        f"{cfg['dataset']}, InfoGraph (`infonce`, objective jsd), {cfg['epochs']} epochs, "
        f"{args.repeats} runs, SVM every {args.every} epochs, {time.perf_counter() - start:.0f} s\n"
    )
    for g in gammas:
        runs = per_gamma[g]
        epochs = sorted(runs[0])
        print(f"gamma = {g!r}: mean over runs per epoch\n")
        print("| epoch | " + " | ".join(str(e) for e in epochs) + " |")
        print("|---|" + "---|" * len(epochs))
        print(
            "| accuracy (%) | "
            + " | ".join(f"{statistics.mean(run[e] for run in runs):.2f}" for e in epochs)
            + " |\n"
        )
        s = summarise(runs)
        print(
            f"final epoch {s['final']:.2f} ± {s['final_std']:.2f}; best epoch by the test mean "
            f"(epoch {s['best_epoch']:.0f}) {s['best']:.2f} ± {s['best_std']:.2f} (population "
            f"std); each run's own best epoch, averaged: {s['per_run_best']:.2f}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
