"""``hardneg compare``: train every strategy x seed on one data set, evaluate, report.

Each run is a normal training run (:func:`hardneg.train.train`) from one base config; only the loss
section changes between strategies. The strategies are those of the registry
(:func:`hardneg.registry.list_losses`, ``hardneg losses``; by default all of them, a strategy
registered by a plug-in included). The loss hyper-parameters are the registry defaults with two
adaptations, so that the strategies differ in how they pick and weight negatives and not in their
scale:

* ``temperature`` is the base config's loss temperature for every strategy (the registry's Ring
  default 0.07 is the MoCo / IR value; SimCLR-style runs use 0.5);
* on in-batch negatives (``framework: simclr``) a strategy's ``in_batch_defaults`` (a class
  attribute, e.g. Ring's ``rho_out = 0.5``, the authors' SimCLR-Ring value for a small pool; their
  0.1 is for a 65536-key queue) replace the registry defaults.

Overrides ``section.key=value`` apply to every run; ``loss.KEY=value`` goes to each strategy that
has ``KEY``; ``STRATEGY.KEY=value`` (e.g. ``hcl.beta=2``) to that strategy only. After training, each
run's frozen backbone is evaluated (weighted kNN + linear probe), ``metrics.json`` and ``report.md``
are written in its folder, and one comparison report (table + side-by-side figures) in ``--out``.
Runs found in ``--out`` with the same config are reused when finished and resumed from
``checkpoints/last.pt`` when interrupted, so an interrupted comparison continues where it stopped.

**Graphs.** A graph config (``--config mutag``, ``ptc_mr``, ``nci1``, ``proteins`` or a graph YAML;
or ``--dataset MUTAG`` etc. without ``--config``) runs HCL's graph protocol instead
(:mod:`hardneg.graph.compare`): InfoGraph for every requested strategy, the ``beta`` sweep for
strategies that have a ``beta``, ``--seeds`` repeats (default: the config's), the RBF-SVM
protocol, and a table with the published figure beside it; ``--data-dir`` names the TU folder.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)


def default_strategies() -> list[str]:
    """Every registered loss, in registration order (``hardneg losses``)."""
    from hardneg.registry import list_losses

    return list_losses()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modality",
        choices=("image", "text"),
        default="image",
        help="image: train from a YAML config (default); text: fine-tune a sentence model on "
        "gensim's Lee corpus and score it against human judgments (needs hardneg[text]; "
        "key=value overrides: see hardneg.text.benchmark.TextBenchmarkConfig)",
    )
    parser.add_argument("--dataset", default="mnist1d", help="data set (default mnist1d)")
    parser.add_argument(
        "--strategies",
        help="comma-separated loss names, or all (default: every registered loss, see hardneg "
        "losses; graph configs: the config's loss, hcl)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        help="seeds 0..N-1 per strategy (default 3; graph configs: repeats, default the config's)",
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default: the base config's)")
    parser.add_argument("--framework", help="simclr | moco | memory_bank (default: base config's)")
    parser.add_argument(
        "--config",
        help="base YAML config, path or packaged name (default: the packaged config of the "
        "data set, e.g. mnist1d_simclr_hcl; its loss section only lends its temperature); "
        "a graph config (mutag, ptc_mr, nci1, proteins or a graph YAML) runs HCL's graph "
        "protocol",
    )
    parser.add_argument("--out", help="output folder (default runs/compare-DATASET-TIME)")
    parser.add_argument(
        "--data-dir",
        help="data folder (graph configs: the folder holding DATASET/raw/ in TU format; "
        "image configs: data.data_dir)",
    )
    parser.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    parser.add_argument(
        "--tsne-points", type=int, default=1000, help="t-SNE subsample size (0 = no t-SNE)"
    )
    parser.add_argument(
        "--progress", action="store_true", help="show a progress bar per run (on a terminal)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides: section.key=value for every run (train.batch_size=128), "
        "loss.KEY=value for each strategy that has KEY (loss.tau_plus=0.05), "
        "STRATEGY.KEY=value for one strategy (hcl.beta=2); graph configs also take the "
        "config's keys (epochs=50, betas=0,2, degree=none)",
    )
    parser.epilog = (
        "Loss hyper-parameters are the registry defaults (hardneg losses), with the base "
        "config's temperature for every strategy and each strategy's in-batch defaults "
        "(e.g. Ring's rho_out=0.5) on in-batch negatives."
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "modality", "image") == "text":
        from hardneg.text.cli import run_compare

        return run_compare(args)
    graph_config = find_graph_config(args.config, args.dataset)
    if graph_config is not None:
        return run_graph(args, graph_config)
    strategies = parse_strategies(args.strategies)
    out = Path(args.out) if args.out else default_out(f"compare-{args.dataset}")
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    from hardneg.commands import show_progress, status_printer

    with resumable(out):
        outcome = compare(
            dataset=args.dataset,
            strategies=strategies,
            seeds=range(3 if args.seeds is None else args.seeds),
            base_config=args.config,
            overrides=overrides,
            epochs=args.epochs,
            framework=args.framework,
            out=out,
            linear=not args.no_linear,
            tsne_points=args.tsne_points,
            progress_bar=show_progress(args, args.progress),
            command="hardneg " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            say=status_printer(args),
        )
    print()
    print(outcome.table)
    print_verdict(outcome.verdict)
    print(f"\n{closing_line(outcome)}")
    return 0 if not outcome.failed else 1


def graph_config_names() -> list[str]:
    """The packaged graph configs (``hardneg/graph/configs/*.yaml``), found without importing
    :mod:`hardneg.graph` (which needs the graph extra)."""
    import hardneg

    folder = Path(hardneg.__file__).parent / "graph" / "configs"
    return sorted(p.stem for p in folder.glob("*.yaml"))


def find_graph_config(config: str | None, dataset: str | None) -> str | None:
    """The graph config that ``--config`` / ``--dataset`` names, or None (an image comparison).

    A graph config is a packaged one (``mutag``...) or a YAML file whose top level has
    ``framework: infograph`` or ``betas``; without ``--config``, ``--dataset`` that names a
    packaged graph config (``MUTAG``, ``PTC_MR``...) selects it.
    """
    names = graph_config_names()
    if config is not None:
        path = Path(config)
        if path.is_file():
            import yaml

            try:
                raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                return None  # the image loader reports the syntax error or the encoding
            if isinstance(raw, dict) and (raw.get("framework") == "infograph" or "betas" in raw):
                return str(path)
            return None
        return config.lower() if config.lower() in names else None
    if dataset is not None and dataset.lower().replace("-", "_") in names:
        return dataset.lower().replace("-", "_")
    return None


def run_graph(args: argparse.Namespace, config: str) -> int:
    """``hardneg compare`` on a graph config (:func:`hardneg.graph.compare.compare_graphs`)."""
    try:
        from hardneg.graph.compare import compare_graphs
    except ImportError as err:
        raise ValueError(f"a graph comparison needs the graph extra: {err}") from err

    if args.framework not in (None, "infograph"):
        raise ValueError(f"graph configs run framework 'infograph', not {args.framework!r}")
    # the graph protocol scores with its SVM only: these options would be ignored without a word
    image_only = [
        flag
        for flag, given in (
            ("--no-linear", args.no_linear),
            ("--tsne-points", args.tsne_points != 1000),
            ("--progress", args.progress),
        )
        if given
    ]
    if image_only:
        raise ValueError(
            f"{', '.join(image_only)}: image comparisons only; a graph comparison scores every "
            "run with HCL's SVM protocol (no linear probe, t-SNE or progress bar)"
        )
    strategies = None
    if args.strategies is not None:
        strategies = parse_strategies(args.strategies)
        if not strategies:
            raise ValueError("--strategies is empty")
    from hardneg.commands import status_printer

    stem = Path(config).stem
    out = Path(args.out) if args.out else default_out(f"compare-{stem}")
    outcome = compare_graphs(
        config,
        strategies=strategies,
        data_dir=args.data_dir,
        out=out,
        repeats=args.seeds,
        epochs=args.epochs,
        overrides=args.overrides,
        command="hardneg " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        say=status_printer(args),
    )
    print()
    print(outcome.table)
    print(f"\n{outcome.seconds:.0f} s; report: {outcome.report}")
    return 0 if not outcome.failed else 1


def print_verdict(lines: Sequence[str]) -> None:
    """The verdict's Markdown bullets for a terminal (bold marks and backticks removed)."""
    if lines:
        print("\nVerdict:")
        for line in lines:
            print(line.replace("**", "").replace("`", ""))


@dataclass
class Outcome:
    records: list  # hardneg.report.RunRecord, one per finished run
    failed: list[str]  # "strategy seed N: why"
    table: str
    report: Path
    seconds: float
    verdict: list[str] = field(default_factory=list)  # Markdown bullets, also printed
    reseeded: list = field(default_factory=list)  # RunRecords of the re-seed runs (noise only)
    reused: int = 0  # runs found finished in --out (not trained, their metrics re-read)


def closing_line(outcome: Outcome) -> str:
    """``N runs in S s; report: PATH``, with how many were reused (found finished in --out) and
    trained when some were: the seconds then time only part of the work."""
    from hardneg.report import counted

    runs = len(outcome.records) + len(outcome.reseeded)
    done = counted(runs, "run")
    if outcome.reused:
        done += f" ({outcome.reused} reused, {runs - outcome.reused} trained)"
    return f"{done} in {outcome.seconds:.0f} s; report: {outcome.report}"


def parse_strategies(text: str | None) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; None or ``"all"`` -> every registered loss."""
    if text is None or text.strip() == "all":
        return default_strategies()
    return [s.strip() for s in text.split(",") if s.strip()]


def default_out(name: str) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS``."""
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def compare(
    *,
    dataset: str,
    strategies: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    base_config: str | Path | None = None,
    overrides: Sequence[str] = (),
    epochs: int | None = None,
    framework: str | None = None,
    linear: bool = True,
    tsne_points: int = 1000,
    progress_bar: bool = False,
    command: str | None = None,
    notes: Sequence[str] = (),
    reseed: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> Outcome:
    """Train, evaluate and report every ``strategy x seed``; returns the records and report path.

    All configs are built and validated before the first run starts, so a typo fails at once.
    A run that stops on a non-finite loss is reported as failed and the others go on.
    ``reseed``: strategies trained once more with the next seed, for the verdict's measure of
    the seed noise only (not in the table or the figures). An ``out`` folder holding runs that
    this comparison does not plan is refused: its report and figures would lose them.
    ``say`` prints the progress lines (the runs' epoch lines too); a failed run is a warning of
    the logger ``hardneg.commands.compare``.
    """
    from hardneg.report import (
        RunRecord,
        counted,
        format_table,
        load_history,
        load_metrics,
        save_metrics,
        summarize,
        verdict_lines,
        write_comparison_report,
        write_run_report,
    )
    from hardneg.train import NonFiniteError, train

    if not strategies:
        raise ValueError("--strategies is empty")
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"--strategies lists a strategy twice: {','.join(strategies)}")
    if not seeds:
        raise ValueError("--seeds must be >= 1")
    if isinstance(tsne_points, bool) or not isinstance(tsne_points, int) or tsne_points < 0:
        # a negative count quietly meant no t-SNE, as 0 does
        raise ValueError(f"--tsne-points must be >= 0 (0 = no t-SNE), got {tsne_points!r}")
    out = Path(out)
    parsed = Overrides.parse(overrides)
    if base_config is None:
        base_config = default_base_config(dataset, framework)
    check_loss_overrides(parsed, strategies)
    configs = {}  # seed-major: an interrupted comparison still has whole seeds to show
    refused: dict[str, ValueError] = {}  # a setting some strategies cannot take
    for seed in seeds:
        for s in strategies:
            if s in refused:
                continue
            try:
                configs[s, seed] = build_run_config(
                    dataset, s, seed, base_config, parsed, epochs, framework
                )
            except ValueError as err:
                refused[s] = err
    if refused and len(refused) < len(strategies):  # (framework.views=3 for unremix): all of
        # them named at once, with the --strategies that would run
        others = ",".join(s for s in strategies if s not in refused)
        reasons = "; ".join(f"{s}: {why}" for s, why in refused.items())
        raise ValueError(
            f"{len(refused)} of the strategies cannot run with these settings ({reasons}); "
            f"compare the others with --strategies {others}"
        )
    if refused:  # every strategy refused: the first one's own error
        raise refused[strategies[0]]
    unknown = [s for s in reseed if s not in strategies]
    if unknown:
        raise ValueError(f"re-seed strategy {', '.join(unknown)} is not among --strategies")
    extra_seed = max(seeds) + 1
    reseed_configs = {
        (s, extra_seed): build_run_config(
            dataset, s, extra_seed, base_config, parsed, epochs, framework
        )
        for s in reseed
    }
    check_out_folder(out, [*configs, *reseed_configs])
    start = time.perf_counter()
    records, failed, embeddings, reseeded = [], [], {}, []
    reused_runs = 0
    planned = [(key, cfg, False) for key, cfg in configs.items()]
    planned += [(key, cfg, True) for key, cfg in reseed_configs.items()]
    for i, ((strategy, seed), cfg, is_reseed) in enumerate(planned, 1):
        run_dir = out / strategy / f"seed{seed}"
        tag = f"[{i}/{len(planned)}] {strategy} seed {seed}" + (
            " (re-seed, for the noise estimate)" if is_reseed else ""
        )
        t0 = time.perf_counter()
        state = run_state(run_dir, cfg)
        reused = state == "finished"
        reused_runs += reused
        if not reused:
            resume = state == "interrupted"
            say(
                f"{tag}: {'resuming' if resume else 'training'} {counted(cfg.train.epochs, 'epoch')} -> {run_dir}"
            )
            try:
                train(cfg, run_dir=run_dir, progress_bar=progress_bar, resume=resume, say=say)
            except NonFiniteError as err:
                failed.append(f"{strategy} seed {seed}: {err}")
                log.warning(f"{tag}: FAILED ({err})")  # shown with --quiet too
                continue
        want_tsne = tsne_points > 0 and strategy not in embeddings and not is_reseed
        metrics = load_metrics(run_dir) if reused and not want_tsne else {}
        if metrics and not metrics_fit(metrics, cfg, linear):
            metrics = {}  # `hardneg eval RUN --report` rewrote them with other settings
        if not metrics:
            metrics = evaluate_run(run_dir, cfg, linear, want_tsne)
            if want_tsne:
                embeddings[strategy] = (
                    metrics.pop("test_features").numpy(),
                    metrics.pop("test_labels").numpy(),
                )
            save_metrics(run_dir, metrics)
            write_run_report(run_dir, metrics, title=f"{strategy}, seed {seed}")
        record = RunRecord(strategy, seed, run_dir, metrics, load_history(run_dir))
        (reseeded if is_reseed else records).append(record)
        linear_txt = f"  linear {metrics['linear_top1']:.2f}" if "linear_top1" in metrics else ""
        say(
            f"{tag}: kNN {metrics['knn_top1']:.2f}{linear_txt}"
            f"  ({'reused' if reused else f'{time.perf_counter() - t0:.0f} s'})"
        )
    if not records:
        raise ValueError("every run failed: " + "; ".join(failed))
    table = format_table(summarize(records))
    first = next(iter(configs.values()))
    in_batch = []  # the strategies' in-batch defaults that were used
    for strategy in strategies:
        values = in_batch_defaults(strategy, first)
        if values:
            in_batch.append(f"{strategy} " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
    available = available_negatives(first)
    described = {s: described_negatives(first, s) for s in strategies}
    verdict = verdict_lines(
        records,
        reseeded=reseeded,
        available_negatives=described,
        epochs=first.train.epochs,
        dataset=first.data.dataset,
    )
    notes = [
        f"base config: {base_config or 'defaults'}; {counted(first.train.epochs, 'epoch')}, batch "
        f"{first.train.batch_size}, framework {first.framework.name}, backbone "
        f"{first.model.backbone}",
        "loss hyper-parameters: registry defaults, temperature from the base config"
        + (f"; in-batch defaults: {'; '.join(in_batch)}" if in_batch else "")
        + " (each run's config.yaml lists every one)",
        *(
            [
                f"eff. negatives: Kish effective number (sum w)^2 / sum w^2 of the sampling "
                f"weights; each anchor has {available} negatives"
                + (
                    "; potential describes its mined term: its negatives are the other keys of "
                    "the batch (with a queue or bank, also the rows of the mined blocks), each "
                    "weighted by its count of kept cells"
                    + (
                        f", {described['potential']} per anchor here"
                        if described.get("potential")
                        else ""
                    )
                    if "potential" in strategies
                    else ""
                )
            ]
            if available
            else []
        ),
        *notes,
        *(f"FAILED: {f}" for f in failed),
    ]
    report = write_comparison_report(
        out,
        records,
        embeddings=embeddings,
        command=command,
        device=machine_description(first.train.device),
        notes=notes,
        tsne_points=tsne_points,
        verdict=verdict,
        reseeded=reseeded,
    )
    seconds = time.perf_counter() - start
    return Outcome(records, failed, table, report, seconds, verdict, reseeded, reused_runs)


@contextlib.contextmanager
def resumable(out: Path) -> Iterator[None]:
    """Ctrl-C during a comparison, in one line saying how to continue: the trainer's own hint
    (``hardneg train --resume CKPT``) finishes one run only, and outside a training loop
    (evaluating, drawing the report) there was none; the same command with the same ``--out``
    reuses the finished runs and resumes the interrupted one."""
    from hardneg.train import TrainingInterrupted

    again = f"run the same command again with --out {out} to continue (finished runs are reused)"
    try:
        yield
    except TrainingInterrupted as err:
        raise TrainingInterrupted(
            f"interrupted; saved {err.checkpoint}; {again}", err.checkpoint
        ) from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; {again}") from None


def check_loss_overrides(overrides: Overrides, strategies: Sequence[str]) -> None:
    """Refuse a ``loss.KEY`` that none of the compared strategies has, or a ``STRATEGY.KEY``
    of a strategy not compared: either went to no run, so a typo (``loss.temprature=0.2``) or a
    key of an absent strategy trained every run with the default, without a word."""
    from hardneg._checks import closest_hint
    from hardneg.registry import list_losses, loss_hparams

    for strategy, values in overrides.per_strategy.items():
        if strategy not in strategies:
            first = next(iter(values))
            raise ValueError(
                f"{strategy}.{first}: {strategy} is not among the compared strategies "
                f"({', '.join(strategies)}); add it to --strategies or drop the override"
            )
        hparams = list(loss_hparams(strategy))
        for key in values:  # the config's message spoke of a section left by another loss
            if key not in hparams:
                raise ValueError(
                    f"{strategy}.{key}: {strategy} has no hyper-parameter {key!r}"
                    f"{closest_hint(key, hparams)}; it has {', '.join(hparams)}"
                )
    known = sorted({k for s in strategies for k in loss_hparams(s)})
    for key in overrides.loss:
        if key in known:
            continue
        owners = [n for n in list_losses() if key in loss_hparams(n)]
        where = (
            f"only {', '.join(owners)} {'has' if len(owners) == 1 else 'have'} it"
            if owners
            else f"no loss has it{closest_hint(key, known)}"
        )
        raise ValueError(
            f"loss.{key}: none of the compared strategies ({', '.join(strategies)}) has a "
            f"hyper-parameter {key!r}; {where}"
        )


def available_negatives(cfg) -> int | None:
    """How many negatives each anchor has: ``2B - 2`` in-batch (SimCLR), the queue (MoCo),
    the bank draws (memory bank); ``None`` when not a fixed number."""
    framework = cfg.framework
    if framework.name == "simclr":
        return 2 * cfg.train.batch_size - 2
    if framework.name == "moco":
        return framework.queue_size
    if isinstance(framework.bank_negatives, int):
        return framework.bank_negatives
    return None


def described_negatives(cfg, strategy: str) -> int | None:
    """The negatives per anchor of the term a strategy's diagnostics describe: those of
    :func:`available_negatives`, except potential's, whose diagnostics describe its mined term
    (anchors one view, columns the other view's keys): ``B - 1`` in-batch, not a fixed number
    with a queue or bank (the bank rows count only inside mined blocks)."""
    if strategy == "potential":
        return cfg.train.batch_size - 1 if cfg.framework.name == "simclr" else None
    return available_negatives(cfg)


def check_out_folder(out: Path, planned: Sequence[tuple[str, int]]) -> None:
    """Refuse an ``out`` folder that holds runs this comparison does not plan (another set of
    strategies or seeds): its ``report.md`` and figures would be rewritten without them."""
    planned_dirs = {out / strategy / f"seed{seed}" for strategy, seed in planned}
    existing = sorted(
        run.parent
        for run in out.glob("*/seed*/config.yaml")
        if run.parent.name[4:].isdigit() and run.parent not in planned_dirs
    )
    if existing:
        held = ", ".join(f"{d.parent.name} {d.name}" for d in existing)
        strategies = sorted({s for s, _ in planned})
        raise ValueError(
            f"--out {out} already holds runs that this comparison does not include ({held}); "
            f"its report.md and figures would be overwritten with {', '.join(strategies)} only. "
            "Choose a new --out (or leave --out out for a fresh folder), or run the same "
            "strategies and seeds again to reuse the finished runs"
        )


@dataclass
class Overrides:
    """``key=value`` overrides sorted by where they go (see the module docstring)."""

    common: list[str]  # config overrides for every run
    loss: dict[str, str]  # loss.KEY=value: every strategy that has KEY
    per_strategy: dict[str, dict[str, str]]  # STRATEGY.KEY=value

    @classmethod
    def parse(cls, items: Sequence[str]) -> Overrides:
        from hardneg.config import SECTIONS

        sections = ["seed", *SECTIONS]
        strategies = default_strategies()
        parsed = cls([], {}, {})
        for item in items:
            key, sep, value = item.partition("=")
            head, _, rest = key.strip().partition(".")
            if not sep:
                raise ValueError(f"override {item!r} must look like section.key=value")
            if head == "loss":
                if rest in ("", "name"):
                    raise ValueError("choose the losses with --strategies, not loss.name / loss=")
                parsed.loss[rest] = value
            elif head in sections:
                parsed.common.append(item)
            elif head in strategies and rest:
                parsed.per_strategy.setdefault(head, {})[rest] = value
            else:
                from hardneg.config import where_is

                homes = where_is(head) if not rest else []
                if homes:  # temperature=0.5 -> loss.temperature=0.5
                    raise ValueError(
                        f"override {item!r}: {head!r} is not a section; did you mean "
                        f"{' or '.join(h + '=' + value for h in homes)}?"
                    )
                raise ValueError(
                    f"override {item!r}: {head!r} is neither a config section "
                    f"({', '.join(sections)}) nor a strategy ({', '.join(strategies)})"
                )
        return parsed


def build_run_config(
    dataset: str,
    strategy: str,
    seed: int,
    base_config: str | Path | None,
    overrides: Overrides,
    epochs: int | None,
    framework: str | None,
):
    """The validated :class:`~hardneg.config.TrainConfig` of one run (see the module docstring)."""
    from hardneg.config import TrainConfig, apply_override, load_config
    from hardneg.registry import loss_hparams

    if base_config is None:
        base_config = default_base_config(dataset, framework)
    common = [*overrides.common, f"data.dataset={dataset}", f"seed={seed}"]
    if epochs is not None:
        common.append(f"train.epochs={epochs}")
    if framework is not None:
        common.append(f"framework.name={framework}")
    base = load_config(base_config, common)

    hparams = loss_hparams(strategy)  # raises on an unknown strategy, with a suggestion
    temperature = base.loss.params.get(
        "temperature", loss_hparams(base.loss.name).get("temperature")
    )
    loss: dict[str, object] = {"name": strategy}
    if "temperature" in hparams and temperature is not None:
        loss["temperature"] = temperature
    loss.update(in_batch_defaults(strategy, base))
    for key, value in overrides.loss.items():
        if key in hparams:
            apply_override(loss, f"{key}={value}")
    for key, value in overrides.per_strategy.get(strategy, {}).items():
        apply_override(loss, f"{key}={value}")  # an unknown key fails in from_dict
    raw = base.to_dict()
    raw["loss"] = loss
    return TrainConfig.from_dict(raw)


def in_batch_defaults(strategy: str, config) -> dict[str, object]:
    """The strategy's ``in_batch_defaults`` when ``config`` trains on in-batch negatives."""
    from hardneg.registry import strategy_class

    if config.framework.name != "simclr":
        return {}
    return dict(strategy_class(strategy).in_batch_defaults)


def default_base_config(dataset: str, framework: str | None) -> str | None:
    """The packaged config for ``dataset``: ``DATASET.yaml``, else ``DATASET_FRAMEWORK_*.yaml``
    (framework simclr unless given), else any ``DATASET_*.yaml``; ``None`` (library defaults)
    when none is packaged."""
    from hardneg.config import list_configs

    names = list_configs()
    stem = dataset.replace("-", "_")  # tiny-imagenet -> tiny_imagenet_*.yaml
    preferred = [
        stem,
        *(n for n in names if n.startswith(f"{stem}_{framework or 'simclr'}_")),
        *(n for n in names if n.startswith(f"{stem}_")),
    ]
    return next((n for n in preferred if n in names), None)


def run_state(run_dir: Path, cfg) -> str:
    """``"new"``, ``"finished"`` (``final.pt``: reuse it) or ``"interrupted"`` (only
    ``last.pt``: resume it) for a run folder; a folder holding another config is an error."""
    checkpoints, saved = run_dir / "checkpoints", run_dir / "config.yaml"
    if (checkpoints / "final.pt").exists():
        state = "finished"
    elif (checkpoints / "last.pt").exists():
        state = "interrupted"
    else:
        return "new"
    if not saved.exists() or saved.read_text() != cfg.to_yaml():
        raise ValueError(f"{run_dir} holds a run with another config; choose another --out")
    return state


def metrics_fit(metrics: dict, cfg, linear: bool) -> bool:
    """Whether a finished run's ``metrics.json`` was computed as :func:`evaluate_run` would:
    ``hardneg eval RUN --report --knn-k 5 --no-linear`` rewrites it, and reusing it put a
    k = 5 kNN and a missing linear probe into a table whose notes say k = 200."""
    knn_k = min(cfg.eval.knn_k, int(metrics.get("train_size", cfg.eval.knn_k)))  # as clamped
    return (
        metrics.get("dataset") == cfg.data.dataset
        and metrics.get("knn_k") == knn_k
        and metrics.get("knn_t") == cfg.eval.knn_temperature
        and (not linear or "linear_top1" in metrics)
    )


def evaluate_run(run_dir: Path, cfg, linear: bool, return_features: bool) -> dict:
    from hardneg.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(
        run_dir / "checkpoints" / "final.pt",
        knn_k=cfg.eval.knn_k,
        knn_t=cfg.eval.knn_temperature,
        linear=linear,
        batch_size=cfg.eval.batch_size,
        device=cfg.train.device,
        seed=cfg.seed,
        return_features=return_features,
    )


def machine_description(device: str) -> str:
    import torch

    from hardneg.train.runtime import select_device

    dev = select_device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA)"
    return f"CPU, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}"
