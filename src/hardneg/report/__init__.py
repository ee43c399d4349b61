"""Reports of training runs: PNG figures (matplotlib, Agg) and Markdown.

* :func:`write_run_report` -> ``report.md`` in a run folder (configuration, final metrics, curves,
  hardness histograms, t-SNE).
* :func:`write_comparison_report` -> one report over strategies x seeds (table + side-by-side
  figures); :func:`summarize` / :func:`format_table` build the table it shares with the console.
"""

from hardneg.report.markdown import write_comparison_report, write_run_report
from hardneg.report.runs import load_hardness, load_history, load_metrics, save_metrics
from hardneg.report.table import RunRecord, format_table, summarize
from hardneg.report.verdict import counted, verdict_lines

__all__ = [
    "RunRecord",
    "counted",
    "format_table",
    "load_hardness",
    "load_history",
    "load_metrics",
    "save_metrics",
    "summarize",
    "write_comparison_report",
    "verdict_lines",
    "write_run_report",
]
