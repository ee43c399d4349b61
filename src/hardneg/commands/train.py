"""``hardneg train``: train a model from a YAML config.

    hardneg train --config configs/mnist1d_simclr_hcl.yaml                # a file
    hardneg train --config mnist1d_simclr_hcl train.epochs=5 loss.beta=0.5 # packaged name + overrides
    hardneg train --resume runs/x                                        # continue a run
    torchrun --nproc_per_node=4 -m hardneg train --config cifar10_simclr_hcl
    hardneg train --config mutag --data-dir /path/to/TU loss.beta=2      # a graph config

A graph config (``mutag``, ``ptc_mr``, ``nci1``, ``proteins`` or a graph YAML) trains one
InfoGraph run of HCL's graph protocol and scores it (:mod:`hardneg.graph.run`).

Overrides are ``section.key=value`` with YAML values; the whole config is validated before any
data is loaded. Exit codes: 0 done, 2 bad config / arguments, 3 stopped on a NaN/Inf loss,
130 interrupted (a checkpoint was saved; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config file or the name of a packaged config (see --list-configs); "
        "may be omitted with --resume CKPT (the checkpoint's config is used)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.epochs=5 loss.beta=0.5 framework.symmetric=true "
        "(every key, its type, range and meaning: the dataclasses of hardneg/config.py; the "
        "loss's keys: hardneg losses NAME)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CKPT",
        help="continue from CKPT (a checkpoint file or a run folder), or from "
        "RUN_DIR/checkpoints/last.pt when no CKPT is given",
    )
    parser.add_argument("--run-dir", metavar="DIR", help="output folder (default runs/<name>)")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="data folder: data.data_dir of an image config; for a graph config (mutag, "
        "ptc_mr, nci1, proteins or a graph YAML) the folder holding DATASET/raw/ in TU format",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (one is drawn only when stderr is a terminal)",
    )
    parser.add_argument(
        "--list-configs", action="store_true", help="list the packaged configs and exit"
    )
    parser.add_argument(
        "--modality",
        choices=("text",),
        help="text: fine-tune a sentence model on your (anchor, positive[, negatives]) rows in "
        "sentence-transformers' Trainer; settings as key=value (data=FILE strategy=hcl "
        "hcl.beta=0.5 epochs=1 ...: hardneg.text.train.TextTrainConfig), no --config",
    )


def run(args: argparse.Namespace) -> int:
    from hardneg.config import TrainConfig, list_configs, load_config

    if args.modality == "text":
        return run_text(args)

    if args.list_configs:
        for name in list_configs():
            print(name)
        from hardneg.commands.compare import graph_config_names

        for name in graph_config_names():
            print(f"{name} (graph: needs --data-dir)")
        return 0
    if args.config is not None:
        from hardneg.commands.compare import find_graph_config

        graph_config = find_graph_config(args.config, None)
        if graph_config is not None:
            if args.resume is not None:
                # said here: the image path would report 'mutag' as no packaged config
                raise ValueError(
                    f"--resume continues image runs; a graph config's run ({args.config}) "
                    "keeps no checkpoint to resume: run it again without --resume"
                )
            return run_graph(args, graph_config)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--run-dir D --resume train.epochs=6`: argparse hands the override to --resume as its
        # optional CKPT, which then "does not exist"; it is an override, and --resume bare
        args.overrides, args.resume = [args.resume, *args.overrides], True
    if args.data_dir:
        args.overrides = [*args.overrides, f"data.data_dir={args.data_dir}"]
    if args.resume is True and not args.run_dir:
        raise ValueError("--resume without a checkpoint needs --run-dir (or give --resume CKPT)")
    if args.config is not None:
        config = load_config(args.config, args.overrides)
    elif args.resume is not None:
        config = config_from_checkpoint(args.resume, args.run_dir, args.overrides)
    else:
        raise ValueError("give --config FILE (or --resume CKPT to continue a run)")
    assert isinstance(config, TrainConfig)

    from hardneg.commands import show_progress, status_printer
    from hardneg.train import NonFiniteError, TrainingInterrupted, train

    try:
        result = train(
            config,
            run_dir=args.run_dir,
            progress_bar=show_progress(args, not args.no_progress),
            resume=args.resume,
            say=status_printer(args),
        )
    except NonFiniteError as err:
        print(f"hardneg train: {err}", file=sys.stderr)
        return 3
    except TrainingInterrupted as err:
        print(f"hardneg train: {err}", file=sys.stderr)
        return 130
    from hardneg.distributed import is_main_process

    if not is_main_process():
        return 0
    summary = ", ".join(
        f"{k}={result.metrics[k]:.4g}" for k in ("loss", "knn_top1") if k in result.metrics
    )
    report = write_report(result, config)
    print(f"done: {result.run_dir} ({summary}); checkpoint {result.checkpoint}; report {report}")
    return 0


def write_report(result, config) -> Path:
    """``RUN/report.md`` with the curves and hardness histograms of the run and the last kNN
    monitor (``hardneg eval CKPT --report`` adds the linear probe and a t-SNE)."""
    from hardneg.report import write_run_report

    metrics = {k: result.metrics[k] for k in ("knn_top1", "knn_top5") if k in result.metrics}
    if metrics:
        metrics = {
            "knn_k": config.eval.knn_k,
            "knn_t": config.eval.knn_temperature,
            **metrics,
        }
    title = (
        f"{config.loss.name}, {config.framework.name}, {config.data.dataset}, seed {config.seed}"
    )
    return write_run_report(
        result.run_dir,
        metrics,
        title=title,
        notes=[
            "kNN: the training monitor's weighted kNN on the last epoch; "
            f"`hardneg eval {result.checkpoint} --report` adds the linear probe and a t-SNE"
        ],
    )


def config_from_checkpoint(resume: str | bool, run_dir: str | None, overrides: list[str]):
    """The config stored in the checkpoint to resume, with ``overrides`` applied."""
    from hardneg.config import load_config
    from hardneg.train.checkpoint import load_checkpoint

    path = Path(run_dir) if resume is True else Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    return load_config(load_checkpoint(path)["config"], overrides)


def run_graph(args: argparse.Namespace, config: str) -> int:
    """One InfoGraph run of a graph config (:func:`hardneg.graph.run.train_graph_run`)."""
    try:
        from hardneg.graph.run import train_graph_run
    except ImportError as err:
        raise ValueError(f"training on graphs needs the graph extra: {err}") from err
    from hardneg.commands import status_printer

    try:
        train_graph_run(
            config,
            data_dir=args.data_dir,
            run_dir=args.run_dir,
            overrides=args.overrides,
            say=status_printer(args),
        )
    except FloatingPointError as err:  # as an image run's NaN / Inf: one line, status 3
        print(f"hardneg train: {err}", file=sys.stderr)
        return 3
    return 0


def run_text(args: argparse.Namespace) -> int:
    """``hardneg train --modality text key=value ...`` (:mod:`hardneg.text.train`)."""
    for flag, value in (
        ("--config", args.config),
        ("--resume", args.resume),
        ("--data-dir", args.data_dir),
        ("--list-configs", args.list_configs or None),
    ):
        if value is not None:
            raise ValueError(
                f"{flag} does not apply to --modality text: give key=value settings "
                "(data=FILE, strategy=NAME, epochs=..., STRATEGY.KEY=value)"
            )
    from hardneg.commands import show_progress, status_printer
    from hardneg.text.cli import split_overrides
    from hardneg.text.train import TextTrainConfig, train_text
    from hardneg.train.runtime import run_dir_problem

    items, per_strategy = split_overrides(list(args.overrides))
    cfg = TextTrainConfig.with_overrides(items)
    others = sorted(set(per_strategy) - {cfg.strategy})
    if others:
        raise ValueError(
            f"hyper-parameters of {', '.join(others)} given, but strategy={cfg.strategy}: "
            f"set strategy= to the one they belong to"
        )
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"text-{cfg.strategy}"
    if (run_dir / "model").exists():  # a trained model is not overwritten without a word
        raise ValueError(f"{run_dir} already holds a trained model; give another --run-dir")
    problem = run_dir_problem(run_dir)
    if problem:
        raise ValueError(problem)
    metrics = train_text(
        cfg,
        per_strategy.get(cfg.strategy, {}),
        run_dir,
        progress_bar=show_progress(args, not args.no_progress),
        log=status_printer(args),
        step_logs=not getattr(args, "quiet", False),
    )
    summary = f"{metrics['steps']} steps, final loss {metrics['final_loss']:.4g}"
    if "dev_mrr_after" in metrics:
        summary += (
            f", held-out MRR@10 {metrics['dev_mrr_before']:.3f} -> {metrics['dev_mrr_after']:.3f}"
        )
    if "beir_ndcg@10_after" in metrics:
        summary += (
            f", eval_data nDCG@10 {metrics['beir_ndcg@10_before']:.3f} -> "
            f"{metrics['beir_ndcg@10_after']:.3f}"
        )
    print(f"done: {run_dir / 'model'} ({summary})")
    return 0
