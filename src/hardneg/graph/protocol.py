"""HCL's graph protocol: InfoGraph + ``JSD_hard`` for each ``beta``, repeats, SVM accuracy.

What ``graph/launch.sh`` and ``graph/deepinfomax.py`` of the authors' code run, per data set:
for every repeat and every ``beta`` in ``{0, 1, 2, 10}`` the graphs are shuffled once (the batches
then keep that order), a fresh InfoGraph model (GIN, 3 layers, hidden 32, two FF heads) trains
for 200 epochs with Adam (lr 1e-3, batch 128) on the ``JSD_hard`` objective, and the frozen
sum-pooled embeddings are scored by the 10-fold SVM protocol
(:func:`~hardneg.graph.evaluate.svm_accuracy`). The table gives the mean +- std over repeats for
each ``beta``.

Packaged configs (``hardneg/graph/configs/``): ``mutag``, ``ptc_mr``, ``nci1``, ``proteins``::

    python -m hardneg.graph.protocol --config mutag --data-dir /path/to/TU [--epochs 50 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from hardneg._checks import check_choice, check_number
from hardneg.graph.data import GraphSet, load_tu
from hardneg.graph.evaluate import svm_accuracy
from hardneg.graph.infograph import INFOGRAPH_OBJECTIVES, InfoGraph
from hardneg.graph.jsd_hard import DIRECTIONS
from hardneg.graph.train import embed, train_graphs

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_KEYS = {
    "dataset", "framework", "loss", "objective", "direction", "betas", "repeats", "epochs",
    "batch_size", "lr", "hidden", "num_layers", "svm_folds", "published", "degree",
}  # fmt: skip


def list_graph_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_graph_config(name_or_path: str) -> dict:
    """A packaged config by name (``mutag``...) or a YAML file; unknown keys are errors."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path.lower()}.yaml"
    if not path.is_file():
        raise ValueError(
            f"no graph config {name_or_path!r}; packaged: {', '.join(list_graph_configs())}"
        )
    cfg = yaml.safe_load(path.read_text()) or {}
    unknown = set(cfg) - CONFIG_KEYS
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}"
        )
    if cfg.get("framework", "infograph") != "infograph":
        raise ValueError(f"{path}: the protocol runs framework 'infograph'")
    missing = [k for k in ("dataset", "epochs", "betas") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    try:
        return check_graph_config(cfg)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


#: the counted keys of a graph config and their smallest values
GRAPH_COUNTS = {"epochs": 0, "repeats": 1, "batch_size": 2, "hidden": 1, "num_layers": 1,
                "svm_folds": 2}  # fmt: skip


def check_graph_config(cfg: dict) -> dict:
    """``cfg`` with every value's type and range checked (each error names the key) and the
    numbers normalised. Run on the file and again after the overrides, so that a bad value
    stops the run before any data is read or any model trained (``svm_folds=1`` failed only
    in scoring, after the training; ``epochs=1.5`` trained 1 epoch and reported 1.5)."""
    out = dict(cfg)

    def number(value: Any) -> Any:
        # YAML 1.1 reads 1e-3 as a string (the image configs accept it too)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value

    for key, low in GRAPH_COUNTS.items():
        if key in out:
            out[key] = int(check_number(key, out[key], low=low, integer=True))
    if "lr" in out:
        out["lr"] = check_number("lr", number(out["lr"]), low=0.0, low_inclusive=False)
    betas = out.get("betas")
    if not isinstance(betas, list) or not betas:
        raise ValueError(f"betas must be a non-empty list of numbers >= 0, got {betas!r}")
    out["betas"] = [check_number("betas", number(b), low=0.0) for b in betas]
    if out.get("objective") is not None:
        check_choice("objective", out["objective"], INFOGRAPH_OBJECTIVES)
    if "direction" in out:
        check_choice("direction", out["direction"], DIRECTIONS)
    degree_option(out)
    return out


def degree_option(cfg: dict) -> str | None:
    """The config's ``degree`` for :func:`~hardneg.graph.data.load_tu`: ``'auto'`` (default)
    or None (``degree: null`` / ``none``: featureless nodes are an error)."""
    value = cfg.get("degree", "auto")
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    if value != "auto":
        raise ValueError(f"degree must be 'auto' or none, got {value!r}")
    return "auto"


def shuffled(data: GraphSet, seed: int) -> GraphSet:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return GraphSet([data.graphs[i] for i in order], data.name, data.num_features,
                    data.num_classes, data.info)  # fmt: skip


def run_seed(repeat: int, beta: float | None) -> int:
    """The seed of one run: ``1000 * repeat + int(10 * beta)`` (``beta`` None counts as 0), so
    every strategy of a repeat sees the same shuffle and initialisation as HCL's ``beta = 0``."""
    return 1000 * int(repeat) + int(10 * float(beta or 0.0))


def build_model(
    cfg: dict, data: GraphSet, *, loss: str, loss_hparams: dict, objective: str | None
) -> InfoGraph:
    """The config's InfoGraph (GIN width and depth, scoring direction) for ``data``."""
    return InfoGraph(
        data.num_features,
        loss=loss,
        loss_hparams=loss_hparams,
        objective=objective,
        direction=cfg.get("direction", "authors"),
        hidden=int(cfg.get("hidden", 32)),
        num_layers=int(cfg.get("num_layers", 3)),
    )


def fit_and_score(
    cfg: dict,
    data: GraphSet,
    *,
    loss: str,
    loss_hparams: dict,
    objective: str | None,
    seed: int,
) -> tuple[InfoGraph, dict[str, float]]:
    """One protocol run: shuffle once, train a fresh InfoGraph, score the frozen embeddings.

    Returns the trained model and ``{"svm": accuracy (percent), "svm_std": std over the folds,
    "train_s", "loss"}``.
    """
    torch.manual_seed(seed)
    model = build_model(cfg, data, loss=loss, loss_hparams=loss_hparams, objective=objective)
    run_data = shuffled(data, seed)
    fit = train_graphs(
        model,
        run_data,
        epochs=int(cfg["epochs"]),
        batch_size=int(cfg.get("batch_size", 128)),
        lr=float(cfg.get("lr", 1e-3)),
        seed=seed,
        shuffle=False,
    )
    emb, labels = embed(model.encoder, run_data)
    scores = svm_accuracy(emb, labels, folds=int(cfg.get("svm_folds", 10)), seed=seed)
    return model, {**scores, "train_s": fit["seconds"], "loss": fit["loss"]}


def train_and_score(cfg: dict, data: GraphSet, **run: Any) -> dict[str, float]:
    """:func:`fit_and_score` (same keyword arguments) without the model: what the protocol
    keeps of a run."""
    return fit_and_score(cfg, data, **run)[1]


def run_protocol(
    cfg: dict,
    data: GraphSet,
    *,
    log=print,
) -> dict[float, list[float]]:
    """``{beta: [accuracy of each repeat]}`` (percent)."""
    results: dict[float, list[float]] = {float(b): [] for b in cfg["betas"]}
    for r in range(int(cfg["repeats"])):
        for beta in results:
            run = train_and_score(
                cfg,
                data,
                loss=cfg.get("loss", "hcl"),
                loss_hparams={"beta": beta},
                objective=cfg.get("objective"),
                seed=run_seed(r, beta),
            )
            results[beta].append(run["svm"])
            log(f"repeat {r + 1} beta {beta:g}: {run['svm']:.2f}% (train {run['train_s']:.1f} s)")
    return results


def published_figure(row: dict, published: dict, loss: str = "hcl") -> str:
    """The config's published figure for a row: ``published.rows[label]``, else ``beta_0``
    beside ``beta = 0`` of the config's own strategy ``loss`` (HCL's; another strategy at
    ``beta = 0``, UnReMix's, is not the method the figure was published for)."""
    by_label = published.get("rows") or {}
    if row["label"] in by_label:
        return str(by_label[row["label"]])
    if row["beta"] == 0.0 and row.get("strategy", loss) == loss and "beta_0" in published:
        return str(published["beta_0"])
    return ""


def format_results(cfg: dict, results: dict[float, list[float]]) -> str:
    published = cfg.get("published") or {}
    loss = cfg.get("loss", "hcl")
    lines = [
        f"| beta | {cfg['dataset']} SVM accuracy (%), mean ± std | repeats | published |",
        "|---:|---:|---:|---|",
    ]
    for beta, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        pub = published_figure({"label": f"{loss} beta={beta:g}", "beta": beta}, published, loss)
        lines.append(
            f"| {beta:g} | {statistics.mean(accs):.2f} ± {std:.2f} | {len(accs)} | {pub} |"
        )
    if published:
        lines.append(f"\npublished: {published.get('source', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hardneg.graph.protocol", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config", default="mutag", help=f"one of {', '.join(list_graph_configs())} or a YAML file"
    )
    parser.add_argument("--data-dir", required=True, help="folder holding <DATASET>/raw/")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--repeats", type=int, help="override the config's repeats")
    parser.add_argument("--betas", help="comma-separated override, e.g. 0,1,2,10")
    parser.add_argument("--out", help="folder for results.json and table.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        cfg = load_graph_config(args.config)
        if args.epochs is not None:
            cfg["epochs"] = args.epochs
        if args.repeats is not None:
            cfg["repeats"] = args.repeats
        if args.betas:
            # checked with the config below, so that 'a' is named as a beta
            cfg["betas"] = [yaml.safe_load(b) for b in args.betas.split(",")]
        cfg = check_graph_config(cfg)
        data = load_tu(args.data_dir, cfg["dataset"], degree=degree_option(cfg))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        results = run_protocol(cfg, data)
    except FloatingPointError as err:  # one line, as hardneg train's status 3
        print(f"error: {err}", file=sys.stderr)
        return 3
    table = format_results(cfg, results)
    command = "python -m hardneg.graph.protocol " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{table}\n\n{time.perf_counter() - start:.0f} s; command: {command}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            json.dumps(
                {"config": cfg, "results": {str(k): v for k, v in results.items()}}, indent=2
            )
        )
        (out / "table.md").write_text(f"{table}\n\ncommand: `{command}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
