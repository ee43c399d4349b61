"""Markdown reports: ``report.md`` per run and one comparison report over strategies x seeds.

Figures are written next to the report (``plots/`` for a run, the report's own folder for a
comparison) and referenced by relative paths, so a report folder can be moved or committed whole.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from hardneg.report import plots
from hardneg.report.runs import load_hardness, load_history
from hardneg.report.table import LABEL_FREE_COLUMNS, RunRecord, format_table, summarize

# history.csv columns drawn over epochs: (column, file stem, y label, title, relative); a
# relative curve is divided by its own first value (the losses have different scales)
CURVES = [
    ("loss", "loss", "loss / first-epoch loss", "Training loss (relative to its start)", True),
    ("knn_top1", "knn", "kNN top-1 (%)", "kNN monitor accuracy", False),
    (
        "false_negative_mass",
        "false_negative_mass",
        "mass on same-class negatives",
        "False-negative mass (sampling weights)",
        False,
    ),
]
FINAL_HISTORY_KEYS = [
    "loss",
    "effective_negatives",
    "false_negative_mass",
    "false_negative_gradient_mass",
    "top_k_precision",
    "mean_negative_similarity",
    "mass_above_positive",
    "positive_rank",
    "near_duplicate_rate",
    "margin_removal_share",
    "epoch_time_s",
    "images_per_s",
]

Embedding = tuple[np.ndarray, np.ndarray]


def write_run_report(
    run_dir: str | Path,
    metrics: Mapping | None = None,
    *,
    embeddings: Embedding | None = None,
    title: str | None = None,
    tsne_points: int = 1000,
    seed: int = 0,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``run_dir/report.md`` and its figures under ``run_dir/plots/``.

    Args:
        run_dir: a training run folder (``config.yaml``, ``history.csv``, ``hardness.npz``).
        metrics: the evaluation result (``evaluate_checkpoint``); its scalar entries are listed.
        embeddings: ``(test features, test labels)`` for the t-SNE panel; skipped when ``None``.
        tsne_points: subsample size for t-SNE.
        notes: extra bullet points under the title (e.g. where the metrics come from).
    """
    run_dir = Path(run_dir)
    label = title or run_dir.name
    history = load_history(run_dir)
    hardness = load_hardness(run_dir)
    figures = _draw_figures(
        run_dir / "plots",
        {label: [history]},
        {label: hardness},
        {label: embeddings} if embeddings is not None else {},
        tsne_points,
        seed,
    )
    lines = [f"# Run report: {label}", ""]
    if notes:
        lines += [*(f"- {note}" for note in notes), ""]
    config = run_dir / "config.yaml"
    if config.exists():
        lines += ["## Configuration", "", "```yaml", config.read_text().rstrip(), "```", ""]
    lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float, str)):
            lines.append(f"| {key} | {_fmt(value)} |")
    if history:
        last = history[-1]
        lines.append(f"| epochs trained | {_fmt(last.get('epoch', len(history)))} |")
        for key in FINAL_HISTORY_KEYS:
            if key in last and not math.isnan(last[key]):
                lines.append(f"| {key} (last epoch) | {_fmt(last[key])} |")
    lines.append("")
    lines += _figure_section(figures, run_dir)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_comparison_report(
    out_dir: str | Path,
    records: Sequence[RunRecord],
    *,
    embeddings: Mapping[str, Embedding] | None = None,
    command: str | None = None,
    device: str | None = None,
    notes: Sequence[str] = (),
    tsne_points: int = 1000,
    seed: int = 0,
    verdict: Sequence[str] = (),
    reseeded: Sequence[RunRecord] = (),
) -> Path:
    """Write ``out_dir/report.md``: the table, the verdict, side-by-side figures, links to each
    run's report.

    Args:
        records: every evaluated run (several seeds per strategy allowed).
        embeddings: per strategy, ``(test features, test labels)`` of one run for t-SNE.
        command: the command line that produced the runs (printed in the report).
        device: where they ran, e.g. ``"cpu (2 cores)"``.
        notes: extra bullet points (e.g. how hyper-parameters were chosen).
        verdict: Markdown bullet lines (:func:`hardneg.report.verdict_lines`), after the table.
        reseeded: runs trained only to measure the seed noise (listed, not in the table).
    """
    out_dir = Path(out_dir)
    histories: dict[str, list] = {}
    hardness: dict[str, dict | None] = {}
    for record in records:
        histories.setdefault(record.strategy, []).append(record.history)
        if hardness.get(record.strategy) is None:  # one run per strategy (the first seed)
            hardness[record.strategy] = load_hardness(record.run_dir)
    figures = _draw_figures(out_dir, histories, hardness, embeddings or {}, tsne_points, seed)
    seeds = sorted({r.seed for r in records})
    knn = records[0].metrics if records else {}
    lines = ["# Strategy comparison", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [
        f"- seeds: {', '.join(map(str, seeds))} (table: mean ± sample std over seeds)",
        f"- machine: {device or _machine()}; torch {torch.__version__}",
        f"- kNN: weighted kNN (k = {knn.get('knn_k', 200)}, t = {knn.get('knn_t', 0.1)}) on frozen "
        "backbone features; linear: linear probe (L-BFGS, standardised features) on the same "
        "features",
        "- false-neg. mass / eff. negatives: batch means of the training diagnostics of the last "
        "epoch that logged them (train.diagnostics_every; labels used for analysis only); "
        "s / epoch: median epoch time",
    ]
    lines += [f"- {note}" for note in notes]
    rows = summarize(records)
    lines += ["", "## Results", "", format_table(rows, markdown=True), ""]
    if verdict:
        lines += ["## Verdict", "", *verdict, ""]
    lines += _label_free_section(rows)
    lines += _loss_table(records)
    lines += _figure_section(figures, out_dir)
    lines += ["## Runs", ""]
    for record in [*records, *reseeded]:
        report = record.run_dir / "report.md"
        target = (
            _relative(report, out_dir) if report.exists() else _relative(record.run_dir, out_dir)
        )
        extra = (
            " (re-seed: measures the seed noise, not in the table)"
            if any(record is r for r in reseeded)
            else ""
        )
        lines.append(f"- {record.strategy}, seed {record.seed}{extra}: [{target}]({target})")
    path = out_dir / "report.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _draw_figures(folder, histories, hardness, embeddings, tsne_points, seed) -> dict[str, Path]:
    figures: dict[str, Path] = {}
    for key, stem, ylabel, title, relative in CURVES:
        path = plots.plot_metric_curves(
            histories, key, folder / f"{stem}.png", ylabel=ylabel, title=title, relative=relative
        )
        if path is not None:
            figures[stem] = path
    path = plots.plot_hardness(hardness, folder / "hardness.png")
    if path is not None:
        figures["hardness"] = path
    if embeddings:
        path = plots.plot_tsne(embeddings, folder / "tsne.png", max_points=tsne_points, seed=seed)
        if path is not None:
            figures["tsne"] = path
    return figures


def _label_free_section(rows: Sequence[dict]) -> list[str]:
    """The label-free diagnostics of every strategy (none when no run logged them, e.g. runs
    trained before they existed)."""
    keys = [key for key, _, _ in LABEL_FREE_COLUMNS]
    if not any(not math.isnan(row[key][0]) for row in rows for key in keys):
        return []
    return [
        "## Label-free diagnostics",
        "",
        "What a run without labels can watch; batch means of the last epoch that logged "
        "diagnostics, relative to each anchor's (first) positive: *mass above positive* = share of "
        "the negatives' gradient mass on negatives scoring above the positive; *positive rank* = "
        "number of kept negatives scoring above it (0 = ranked first); *near-duplicate rate* = "
        "share of kept negatives with cosine >= 0.99 to the anchor; *margin 0.05 removes* = share "
        "of kept negatives that the positive-aware filter in margin mode (`positive_aware`, "
        "`mode=margin`, margin 0.05) would drop.",
        "",
        format_table(rows, markdown=True, columns=LABEL_FREE_COLUMNS),
        "",
    ]


def _loss_table(records: Sequence[RunRecord]) -> list[str]:
    """Each strategy's loss hyper-parameters as trained (from its first run's ``config.yaml``,
    which lists them all): temperature and those that differ from the registry defaults."""
    from hardneg.registry import loss_hparams

    rows = {}
    for record in records:
        config = record.run_dir / "config.yaml"
        if record.strategy in rows or not config.exists():
            continue
        loss = dict((yaml.safe_load(config.read_text()) or {}).get("loss") or {})
        name = loss.pop("name", None)
        try:
            defaults = loss_hparams(name)
        except ValueError:  # a loss this version does not know: show everything
            defaults = {}
        shown = {
            k: v
            for k, v in loss.items()
            if k == "temperature" or k not in defaults or defaults[k] != v
        }
        rows[record.strategy] = ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"
    if not rows:
        return []
    lines = [
        "Loss hyper-parameters: the temperature and those that differ from the registry defaults "
        "(`hardneg losses`); each run's `config.yaml` lists every one.",
        "",
    ]
    lines += ["| strategy | loss hyper-parameters |", "|---|---|"]
    lines += [f"| {name} | {params} |" for name, params in rows.items()]
    return [*lines, ""]


def _figure_section(figures: dict[str, Path], base: Path) -> list[str]:
    if not figures:
        return ["No figures: the run logged no history.", ""]
    lines = ["## Figures", ""]
    curves = [figures[stem] for _, stem, *_ in CURVES if stem in figures]
    if curves:  # side by side: one Markdown table row of images
        lines += [
            "| " + " | ".join(p.stem.replace("_", " ") for p in curves) + " |",
            "|" + "---|" * len(curves),
            "| " + " | ".join(f"![{p.stem}]({_relative(p, base)})" for p in curves) + " |",
            "",
        ]
    for stem, caption in (("hardness", "Hardness of the negatives"), ("tsne", "t-SNE")):
        if stem in figures:
            lines += [f"### {caption}", "", f"![{stem}]({_relative(figures[stem], base)})", ""]
    return lines


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
