"""``hardneg train`` on a graph config: one InfoGraph training run, its weights and its score.

``hardneg train --config mutag --data-dir /path/to/TU loss.beta=2`` trains the model that one run
of HCL's protocol (:mod:`hardneg.graph.protocol`) trains: the config's strategy, objective,
GIN width and depth, epochs, batch size and learning rate, the graphs shuffled once with the
run's seed. It then scores the frozen sum-pooled embeddings with the protocol's SVM and writes,
in the run folder:

* ``model.pt``: the whole InfoGraph's and the encoder's ``state_dict``, the config and the
  setting (strategy, ``beta``, objective, hyper-parameters, seed), saved atomically;
* ``results.json``: the SVM accuracy (mean and std over the folds), the last epoch's loss,
  the training time and everything that decided the run.

Which run: ``seed=R`` is the protocol's repeat ``R`` (default 0), whose seed is
``1000 R + int(10 beta)`` (:func:`~hardneg.graph.protocol.run_seed`), so the score equals that
repeat's row of ``hardneg compare`` / the protocol. ``loss.name=STRATEGY`` trains another
registered strategy; ``loss.KEY=value`` sets its hyper-parameters. A strategy with a ``beta``
trains ``loss.beta`` when given, else the registry default (a config's ``betas`` list is the
protocol's sweep, not one run). The config's keys (``epochs=50``, ``degree=none``...) are
overrides too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hardneg.graph.compare import apply_overrides, plan_settings
from hardneg.graph.protocol import (
    build_model,
    degree_option,
    fit_and_score,
    load_graph_config,
    run_seed,
)


def split_run_overrides(overrides: Sequence[str]) -> tuple[list[str], str | None, int]:
    """``(the other overrides, loss.name or None, seed=R or 0)``."""
    rest, name, repeat = [], None, 0
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "loss.name":
            name = value.strip()
        elif sep and key.strip() == "seed":
            try:
                repeat = int(value)
            except ValueError:
                raise ValueError(f"seed must be a whole number >= 0, got {value!r}") from None
            if repeat < 0:
                raise ValueError(f"seed must be a whole number >= 0, got {repeat}")
        else:
            rest.append(item)
    return rest, name, repeat


def train_graph_run(
    config: str | Path,
    *,
    data_dir: str | Path | None,
    run_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and score one run of a graph config; returns what ``results.json`` holds.

    Everything (config, overrides, strategy, data folder, the model against the data) is
    checked before training starts."""
    from hardneg.graph.data import load_tu
    from hardneg.graph.evaluate import check_scorable
    from hardneg.graph.train import check_model_data
    from hardneg.registry import loss_hparams
    from hardneg.train.checkpoint import save_checkpoint

    cfg = load_graph_config(str(config))
    rest, name, repeat = split_run_overrides(overrides)
    if any(item.partition("=")[0].strip() == "betas" for item in rest):
        # the sweep belongs to hardneg compare / the protocol; silently training one beta of
        # it (the registry default) is not what betas=0,2 asks for
        raise ValueError(
            "betas is the sweep of hardneg compare; one run trains one beta: loss.beta=X"
        )
    strategy = name or cfg.get("loss", "hcl")
    defaults = loss_hparams(strategy)  # an unknown strategy fails here, with the known ones
    cfg, loss_wide, per_strategy, override_dir = apply_overrides(cfg, rest, [strategy])
    if (
        "beta" in defaults
        and "beta" not in loss_wide
        and "beta" not in per_strategy.get(strategy, {})
    ):
        loss_wide["beta"] = defaults["beta"]  # one run: the registry default, not the sweep
    (setting,) = plan_settings(cfg, [strategy], loss_wide, per_strategy)
    data_dir = data_dir or override_dir
    if not data_dir:
        raise ValueError(
            f"a graph config needs the TU data folder: --data-dir DIR (DIR/{cfg['dataset']}"
            f"/raw/ holds {cfg['dataset']}_A.txt etc.)"
        )
    out = Path(run_dir) if run_dir else Path("runs") / f"{Path(str(config)).stem}-{setting.folder}"
    taken = [f for f in ("model.pt", "results.json") if (out / f).exists()]
    if taken:
        # as hardneg train on images: another repeat (seed=R) or epoch count of this setting
        # goes to the same default folder, and would replace the run there without a word
        raise ValueError(
            f"{out} already holds a graph run ({taken[0]}): choose another --run-dir (or delete it)"
        )
    data = load_tu(data_dir, cfg["dataset"], degree=degree_option(cfg))
    # a throw-away model checks the config against the data before any training; the trained
    # one is built again inside fit_and_score after its seed, so this run is exactly the
    # protocol's run (a GIN of this size builds in milliseconds)
    probe = build_model(
        cfg, data, loss=setting.strategy, loss_hparams=setting.loss_hparams(),
        objective=setting.objective,
    )  # fmt: skip
    check_model_data(probe, data, int(cfg.get("batch_size", 128)))
    check_scorable(data.labels.numpy(), repr(cfg["dataset"]))  # else it fails after training
    seed = run_seed(repeat, setting.beta)
    out.mkdir(parents=True, exist_ok=True)
    say(
        f"training {setting.label} on {cfg['dataset']} ({len(data)} graphs, objective "
        f"{setting.objective}, {cfg['epochs']} epoch{'' if cfg['epochs'] == 1 else 's'}, "
        f"repeat {repeat}, seed {seed})"
    )
    start = time.perf_counter()
    try:
        model, scores = fit_and_score(
            cfg,
            data,
            loss=setting.strategy,
            loss_hparams=setting.loss_hparams(),
            objective=setting.objective,
            seed=seed,
        )
    except FloatingPointError as err:
        raise FloatingPointError(
            f"training {setting.label} on {cfg['dataset']} stopped: {err} (lr {cfg.get('lr')}); "
            f"nothing was saved in {out}"
        ) from None
    described = {
        "strategy": setting.strategy,
        "beta": setting.beta,
        "objective": setting.objective,
        "hparams": setting.loss_hparams(),
        "repeat": repeat,
        "seed": seed,
    }
    save_checkpoint(
        out / "model.pt",
        {
            "model": model.state_dict(),
            "encoder": model.encoder.state_dict(),
            "in_features": data.num_features,
            "config": {k: v for k, v in cfg.items() if k != "published"},
            "setting": described,
        },
    )
    results = {
        **scores,
        "dataset": cfg["dataset"],
        "data_dir": str(data_dir),
        "data_sha256": data.info.get("files_sha256"),
        # what the encoder read: the files' node labels, or degrees made up for unlabelled nodes
        "node_features": data.info.get(
            "node_features", f"the data set's node labels ({data.num_features} columns)"
        ),
        "graphs": len(data),
        "epochs": int(cfg["epochs"]),
        **described,
        "seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(  # the run's result: printed with `hardneg train --quiet` too
        f"SVM accuracy {scores['svm']:.2f} % (± {scores['svm_std']:.2f} over the folds); "
        f"weights: {out / 'model.pt'}"
    )
    return results
