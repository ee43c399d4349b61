"""Entries of ``hardneg demo --modality text`` and ``hardneg compare --modality text``.

Both run :func:`hardneg.text.benchmark.run_text_benchmark` on every registered strategy (or
``--strategies``); overrides are ``key=value`` for :class:`~hardneg.text.benchmark.TextBenchmarkConfig`
(``steps=20``, ``model=/path/to/model``, ``train_file=corpus.txt``, ...) and
``STRATEGY.KEY=value`` for one strategy's hyper-parameters (``hcl.beta=2``). The demo runs seeds
0, 1, 2; compare runs ``--seeds N`` (seeds 0..N-1).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from hardneg.text.benchmark import TextBenchmarkConfig, run_text_benchmark


def split_overrides(items: list[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``(config overrides, {strategy: {hparam: value}})``; ``STRATEGY.KEY=value`` items go to
    the strategy (values parsed as YAML scalars)."""
    from hardneg.config import load_yaml
    from hardneg.registry import list_losses, loss_hparams

    config, per_strategy = [], {}
    for item in items:
        key, sep, value = item.partition("=")
        head, dot, rest = key.strip().partition(".")
        if sep and dot and head in list_losses():
            known = loss_hparams(head)
            if rest not in known:
                raise ValueError(
                    f"override {item!r}: {head} has no hyper-parameter {rest!r} "
                    f"(it has {', '.join(known)})"
                )
            per_strategy.setdefault(head, {})[rest] = load_yaml(value)  # 1e-2 is a number
        else:
            config.append(item)
    return config, per_strategy


def _strategies(text: str | None) -> list[str] | None:
    if not text:
        return None  # every registered strategy (hardneg losses)
    return [s.strip() for s in text.split(",") if s.strip()]


def _run(args: argparse.Namespace, title: str, prefix: str, base: dict[str, Any]) -> int:
    config_items, per_strategy = split_overrides(list(args.overrides))
    cfg = TextBenchmarkConfig.with_overrides(config_items, **base)
    out = Path(args.out) if args.out else Path("runs") / time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    # before the model loads and the evaluation texts are embedded (about half a minute)
    from hardneg.train.runtime import run_dir_problem

    problem = run_dir_problem(out)
    if problem:
        raise ValueError(problem)
    from hardneg.commands import status_printer

    outcome = run_text_benchmark(
        out,
        strategies=_strategies(args.strategies),
        config=cfg,
        strategy_hparams=per_strategy,
        title=title,
        command="hardneg " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        log=status_printer(args),
    )
    print()
    print(outcome.table)
    print(f"\n{len(outcome.runs)} runs in {outcome.seconds:.0f} s; report: {outcome.report}")
    return 1 if outcome.failed else 0


def run_demo(args: argparse.Namespace) -> int:
    """``hardneg demo --modality text`` (``--reseed`` does not apply: every strategy has 3 seeds)."""
    return _run(args, "hardneg text demo", "text-demo", {})


def run_compare(args: argparse.Namespace) -> int:
    """``hardneg compare --modality text``; ``--epochs``, ``--framework``, ``--config`` and
    ``--dataset`` belong to the image comparison and are refused."""
    for flag, value, default in (
        ("--epochs", args.epochs, None),
        ("--framework", args.framework, None),
        ("--config", args.config, None),
        ("--dataset", args.dataset, "mnist1d"),
    ):
        if value != default:
            raise ValueError(
                f"{flag} does not apply to --modality text; use key=value overrides "
                "(steps=, model=, train_file=, ...)"
            )
    seeds = 3 if args.seeds is None else args.seeds  # --seeds has no default: graphs read theirs
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    return _run(args, "hardneg text comparison", "text-compare", {"seeds": tuple(range(seeds))})
