"""The comparison table: one row per strategy, mean +- std over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hardneg.report.runs import History, history_column


@dataclass
class RunRecord:
    """One trained and evaluated run: what the table and the reports need."""

    strategy: str
    seed: int
    run_dir: Path
    metrics: dict = field(default_factory=dict)  # evaluate_checkpoint's result
    history: History = field(default_factory=list)  # rows of history.csv


# (key, header, number format); "final" columns take the last logged value of history.csv
COLUMNS = [
    ("knn_top1", "kNN top-1 (%)", "{:.2f}"),
    ("linear_top1", "linear top-1 (%)", "{:.2f}"),
    ("false_negative_mass", "false-neg. mass", "{:.3f}"),
    ("effective_negatives", "eff. negatives", "{:.1f}"),
    ("epoch_time_s", "s / epoch", "{:.2f}"),
]
# the label-free diagnostics (hardneg.diagnostics): what a run without labels can still watch
LABEL_FREE_COLUMNS = [
    ("mass_above_positive", "mass above positive", "{:.3f}"),
    ("positive_rank", "positive rank", "{:.2f}"),
    ("near_duplicate_rate", "near-duplicate rate", "{:.4f}"),
    ("margin_removal_share", "margin 0.05 removes", "{:.3f}"),
]
Column = tuple[str, str, str]


def run_values(record: RunRecord) -> dict[str, float]:
    """The table's numbers for one run.

    kNN / linear: the final evaluation (``metrics``); false-negative mass, effective negatives and
    the label-free diagnostics (:data:`LABEL_FREE_COLUMNS`): the batch means of the diagnostics of
    the last epoch that logged them (they are logged every ``train.diagnostics_every`` steps, so an
    epoch can log none; also ``mean_negative_similarity``, not a table column); time per epoch:
    the median ``epoch_time_s`` (robust to the first epoch's warm-up).
    """
    values = {k: float(record.metrics.get(k, math.nan)) for k in ("knn_top1", "linear_top1")}
    diagnostics = ("false_negative_mass", "effective_negatives", "mean_negative_similarity")
    for key in (*diagnostics, *(key for key, _, _ in LABEL_FREE_COLUMNS)):
        _, column = history_column(record.history, key)
        values[key] = float(column[-1]) if len(column) else math.nan
    _, times = history_column(record.history, "epoch_time_s")
    values["epoch_time_s"] = float(statistics.median(times)) if len(times) else math.nan
    return values


def summarize(
    records: Sequence[RunRecord], columns: Sequence[Column] = (*COLUMNS, *LABEL_FREE_COLUMNS)
) -> list[dict]:
    """Rows ``{"strategy", "runs", key: (mean, std)}`` in first-seen strategy order, one ``key``
    per column of ``columns`` (by default the table's and the label-free diagnostics').

    ``std`` is the sample standard deviation over seeds (``nan`` with one seed); NaN values (a
    metric a run did not log) are left out of the mean.
    """
    groups: dict[str, list[dict[str, float]]] = {}
    for record in records:
        groups.setdefault(record.strategy, []).append(run_values(record))
    rows = []
    for strategy, runs in groups.items():
        row: dict = {"strategy": strategy, "runs": len(runs)}
        for key, _, _ in columns:
            vals = [r[key] for r in runs if not math.isnan(r[key])]
            mean = statistics.fmean(vals) if vals else math.nan
            std = statistics.stdev(vals) if len(vals) > 1 else math.nan
            row[key] = (mean, std)
        rows.append(row)
    return rows


def format_cell(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "n/a"
    return fmt.format(mean) if math.isnan(std) else f"{fmt.format(mean)} ± {fmt.format(std)}"


def format_table(
    rows: Sequence[dict], markdown: bool = False, columns: Sequence[Column] = COLUMNS
) -> str:
    """The table as aligned plain text (console) or as a Markdown table; ``columns``: which of
    the rows' keys, in order (:data:`LABEL_FREE_COLUMNS` for the label-free diagnostics)."""
    header = ["strategy", "seeds"] + [title for _, title, _ in columns]
    body = [
        [row["strategy"], str(row["runs"])] + [format_cell(*row[k], fmt) for k, _, fmt in columns]
        for row in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt_row(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    lines = [fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in body]
    return "\n".join(lines)
