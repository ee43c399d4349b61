"""Reports from fabricated run folders: files exist, PNGs are valid, the Markdown links them."""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hardneg.report import (
    RunRecord,
    format_table,
    load_hardness,
    load_history,
    summarize,
    write_comparison_report,
    write_run_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["epoch", "step", "loss", "lr", "images_per_s", "epoch_time_s", "knn_top1",
           "effective_negatives", "false_negative_mass", "false_negative_gradient_mass",
           "top_k_precision", "mean_negative_similarity"]  # fmt: skip


def fabricate_run(run_dir: Path, epochs: int = 4, fn_mass: float = 0.1, seed: int = 0) -> Path:
    """A run folder as the trainer writes it (knn_top1 logged every other epoch)."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        "seed: 0\nloss: {name: hcl, temperature: 0.5, tau_plus: 0.1, beta: 2.0}\n"
    )
    with (run_dir / "history.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for e in range(1, epochs + 1):
            writer.writerow({
                "epoch": e, "step": 10 * e, "loss": 5.0 / e, "lr": 1e-3,
                "images_per_s": 1000.0, "epoch_time_s": 2.0 + (e == 1),
                "knn_top1": 50.0 + 5 * e if e % 2 == 0 else "",
                "effective_negatives": 100.0 - e, "false_negative_mass": fn_mass / e,
                "false_negative_gradient_mass": fn_mass / e, "top_k_precision": 0.9,
                "mean_negative_similarity": 0.1 * e,
            })  # fmt: skip
    edges = np.linspace(-1, 1, 51)
    sampling = rng.random((epochs, 50))
    np.savez(run_dir / "hardness.npz", bins=edges, epochs=np.arange(1, epochs + 1),
             sampling=sampling, gradient=sampling ** 2)  # fmt: skip
    return run_dir


def assert_png(path: Path) -> None:
    assert path.exists(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert 1_000 < len(data) < 300_000


def image_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_history_and_hardness_are_read_back(tmp_path):
    run = fabricate_run(tmp_path / "run")
    history = load_history(run)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert math.isnan(history[0]["knn_top1"]) and history[1]["knn_top1"] == 60.0
    hardness = load_hardness(run)
    assert hardness["edges"].shape == (51,) and hardness["sampling"].shape == (4, 50)


def test_bin_centres_are_accepted_as_well_as_edges(tmp_path):
    run = fabricate_run(tmp_path / "run")
    with np.load(run / "hardness.npz") as data:
        arrays = dict(data)
    edges = arrays["bins"]
    arrays["bins"] = (edges[:-1] + edges[1:]) / 2
    np.savez(run / "hardness.npz", **arrays)
    np.testing.assert_allclose(load_hardness(run)["edges"], edges, atol=1e-12)


def test_run_report_writes_valid_pngs_that_the_markdown_references(tmp_path):
    run = fabricate_run(tmp_path / "run")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 8)) + 4 * np.eye(8)[labels]
    report = write_run_report(run, {"knn_top1": 81.25, "linear_top1": 84.0},
                              embeddings=(features, labels), tsne_points=40)  # fmt: skip
    text = report.read_text()
    assert report == run / "report.md"
    links = image_links(text)
    expected = {"loss.png", "knn.png", "false_negative_mass.png", "hardness.png", "tsne.png"}
    assert {Path(link).name for link in links} == expected
    for link in links:
        assert_png(run / link)
    assert "loss: {name: hcl, temperature: 0.5, tau_plus: 0.1, beta: 2.0}" in text  # the config
    assert "| knn_top1 | 81.25 |" in text and "| linear_top1 | 84 |" in text


def test_run_report_without_hardness_or_embeddings_still_works(tmp_path):
    run = fabricate_run(tmp_path / "run")
    (run / "hardness.npz").unlink()
    text = write_run_report(run).read_text()
    assert {Path(link).name for link in image_links(text)} == {
        "loss.png",
        "knn.png",
        "false_negative_mass.png",
    }


def make_records(tmp_path: Path) -> list[RunRecord]:
    records = []
    for strategy, acc, fn in (("infonce", 80.0, 0.1), ("hcl", 84.0, 0.2)):
        for seed in (0, 1):
            run = fabricate_run(tmp_path / strategy / f"seed{seed}", fn_mass=fn, seed=seed)
            metrics = {"knn_top1": acc + 2 * seed, "linear_top1": acc + 1}
            records.append(RunRecord(strategy, seed, run, metrics, load_history(run)))
    return records


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    rows = summarize(make_records(tmp_path))
    assert [row["strategy"] for row in rows] == ["infonce", "hcl"]
    infonce = rows[0]
    assert infonce["runs"] == 2
    assert infonce["knn_top1"] == pytest.approx((81.0, math.sqrt(2)))  # 80 and 82
    assert infonce["linear_top1"][0] == 81.0 and infonce["linear_top1"][1] == 0.0
    assert infonce["false_negative_mass"][0] == pytest.approx(0.1 / 4)  # last epoch
    assert infonce["effective_negatives"][0] == 96.0
    assert infonce["epoch_time_s"][0] == 2.0  # median: the slow first epoch is ignored
    text = format_table(rows)
    assert "81.00 ± 1.41" in text and text.splitlines()[0].startswith("strategy")
    markdown = format_table(rows, markdown=True)
    assert markdown.count("\n") == 3 and "| hcl | 2 | 85.00 ± 1.41 |" in markdown


def test_single_seed_cells_have_no_std(tmp_path):
    records = [r for r in make_records(tmp_path) if r.seed == 0]
    records[0].metrics.pop("linear_top1")
    text = format_table(summarize(records))
    assert "±" not in text and "n/a" in text


def test_comparison_report_has_table_side_by_side_figures_and_run_links(tmp_path):
    records = make_records(tmp_path / "runs")
    for record in records:
        write_run_report(record.run_dir, record.metrics)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 15)
    embeddings = {s: (rng.normal(size=(30, 4)) + 3 * labels[:, None], labels)
                  for s in ("infonce", "hcl")}  # fmt: skip
    out = tmp_path / "compare"
    report = write_comparison_report(out, records, embeddings=embeddings, command="hardneg compare",
                                     tsne_points=30)  # fmt: skip
    text = report.read_text()
    assert "| infonce | 2 |" in text and "hardneg compare" in text
    # each strategy's loss section from config.yaml: temperature and what differs from defaults
    assert "| infonce | temperature=0.5, beta=2.0 |" in text
    for link in image_links(text):
        assert_png(out / link)
    assert len(image_links(text)) == 5
    # the three curves sit side by side in one table row
    assert any(line.count("![") == 3 for line in text.splitlines())
    for record in records:
        assert f"../runs/{record.strategy}/seed{record.seed}/report.md" in text


def test_loss_curves_are_drawn_relative_to_their_own_start():
    """A loss on another scale (potential starts near 40, the others near 5) must not flatten
    the others: each curve is divided by its first value, which its legend entry states."""
    from hardneg.report.plots import metric_curves

    histories = {
        "infonce": [[{"epoch": 1, "loss": 5.0}, {"epoch": 2, "loss": 4.0}]],
        "potential": [[{"epoch": 1, "loss": 40.0}, {"epoch": 2, "loss": 38.0}]],
    }
    curves = metric_curves(histories, "loss", relative=True)
    np.testing.assert_allclose(curves["infonce"].mean, [1.0, 0.8])
    np.testing.assert_allclose(curves["potential"].mean, [1.0, 0.95])
    assert curves["potential"].name == "potential (epoch 1: 40)"
    absolute = metric_curves(histories, "loss")
    np.testing.assert_allclose(absolute["potential"].mean, [40.0, 38.0])
    assert absolute["potential"].name == "potential"


def verdict_records(tmp_path: Path, knn: dict[str, float], eff: dict[str, float]):
    records = []
    for i, (strategy, acc) in enumerate(knn.items()):
        run = fabricate_run(tmp_path / strategy / "seed0", fn_mass=0.1 * (1 + i), seed=i)
        history = load_history(run)
        for row in history:
            row["effective_negatives"] = eff[strategy]
        records.append(RunRecord(strategy, 0, run, {"knn_top1": acc, "linear_top1": 85.0}, history))
    return records


def test_verdict_measures_the_seed_noise_and_separates_only_larger_gaps(tmp_path):
    from hardneg.report import verdict_lines

    knn = {"infonce": 80.0, "hcl": 81.0, "potential": 72.0}
    eff = {"infonce": 510.0, "hcl": 400.0, "potential": 600.0}
    records = verdict_records(tmp_path, knn, eff)
    reseed_run = fabricate_run(tmp_path / "infonce" / "seed1")
    reseed = RunRecord(
        "infonce", 1, reseed_run, {"knn_top1": 81.5, "linear_top1": 83.0}, load_history(reseed_run)
    )
    lines = verdict_lines(records, reseeded=[reseed], available_negatives=510, epochs=8)
    text = "\n".join(lines)
    assert lines[0].startswith("- **Best kNN top-1: hcl (81.00%)**")
    assert "moved its kNN top-1 from 80.00 to 81.50 (1.50 points from the seed alone; " in text
    assert "linear top-1 85.00 -> 83.00)" in text
    # noise std = sample std of (80, 81.5) = 1.06; a difference needs 2 * 1.06 * sqrt(2) = 3.0
    assert "under about 3.0 points" in text
    assert "- Level with hcl within the noise: infonce; these runs cannot" not in text
    assert "- Level with hcl within the noise: infonce." in text
    assert "potential is 9.0 kNN points behind hcl, more than the noise" in text
    # the monitor (fabricated: 55 -> 60 -> ... over even epochs) was still rising
    assert "still rising" in text
    assert "uniform over all 510 negatives" in text  # infonce
    assert "400 effective negatives (78% of 510)" in text  # hcl
    assert "600 effective negatives, more than the 510 that exist" in text  # potential
    assert "it counts weighted copies of some negatives" in text


def test_one_seed_verdict_counts_its_epochs_in_words(tmp_path):
    """One seed per strategy: the caveat names the schedule, '1 epoch' (not '1 epochs')."""
    from hardneg.report import counted, verdict_lines

    records = verdict_records(
        tmp_path, {"infonce": 80.0, "hcl": 81.0}, {"infonce": 510.0, "hcl": 400.0}
    )
    assert "With one seed and 1 epoch per strategy, " in "\n".join(verdict_lines(records, epochs=1))
    assert "With one seed and 20 epochs per strategy, " in "\n".join(
        verdict_lines(records, epochs=20)
    )
    assert [counted(n, "seed") for n in (0, 1, 2)] == ["0 seeds", "1 seed", "2 seeds"]


def test_verdict_names_every_strategy_tied_for_best(tmp_path):
    # infonce and hcl both at 12.00 kNN: calling the first listed 'best' misleads
    from hardneg.report import verdict_lines

    records = verdict_records(
        tmp_path,
        {"infonce": 12.0, "hcl": 12.0, "ring": 10.0},
        {"infonce": 62, "hcl": 55, "ring": 9},
    )
    first = verdict_lines(records, epochs=1)[0]
    assert first == (
        "- **Best kNN top-1: infonce, hcl (tied, 12.00%)**; "
        "best linear top-1: infonce, hcl, ring (tied, 85.00%)"
    )
    records = verdict_records(
        tmp_path / "b", {"infonce": 12.0, "hcl": 12.5}, {"infonce": 62, "hcl": 55}
    )
    assert verdict_lines(records, epochs=1)[0].startswith("- **Best kNN top-1: hcl (12.50%)**")


def test_one_seed_verdict_advises_more_seeds_on_the_data_set_compared(tmp_path):
    from hardneg.report import verdict_lines

    records = verdict_records(
        tmp_path, {"infonce": 80.0, "hcl": 81.0}, {"infonce": 510.0, "hcl": 400.0}
    )
    text = "\n".join(verdict_lines(records, epochs=1, dataset="cifar10"))
    assert "`hardneg compare --dataset cifar10 --seeds 3`" in text and "mnist1d" not in text
    text = "\n".join(verdict_lines(records, epochs=1, dataset="mnist1d"))
    assert "`hardneg compare --dataset mnist1d --seeds 3` (20 epochs)" in text


def test_each_strategy_is_measured_against_the_negatives_of_the_term_it_describes(tmp_path):
    """potential's diagnostics describe its mined term (the other B - 1 keys), not SimCLR's
    2B - 2 negatives: its share is of its own count; a strategy with no count gets none."""
    from hardneg.report import verdict_lines

    knn = {"infonce": 80.0, "potential": 79.0, "mochi": 79.5}
    eff = {"infonce": 510.0, "potential": 189.0, "mochi": 300.0}
    records = verdict_records(tmp_path, knn, eff)
    available = {"infonce": 510, "potential": 255, "mochi": None}
    text = "\n".join(verdict_lines(records, available_negatives=available))
    assert "out of the negatives each anchor has in the term they describe" in text
    assert "uniform over all 510 negatives" in text  # infonce
    assert "189 effective negatives (74% of 255)" in text  # potential: 189 / 255
    assert "300 effective negatives" in text and "300 effective negatives (" not in text


def test_verdict_uses_the_spread_over_seeds_when_there_are_several(tmp_path):
    from hardneg.report import verdict_lines

    records = make_records(tmp_path)  # two seeds each: kNN 80/82 and 84/86
    text = "\n".join(verdict_lines(records))
    assert "pooled per-seed standard deviation 1.41 points over 2 seeds of 2 strategies" in text
    # gap 4 points > 2 * 1.41 * sqrt(1/2 + 1/2) = 2.83: hcl is ahead of infonce
    assert "Best kNN top-1: hcl (85.00%)" in text and "infonce is 4.0 kNN points behind" in text


def test_comparison_report_has_the_verdict_and_lists_the_re_seed_run(tmp_path):
    records = make_records(tmp_path / "runs")
    extra = records.pop()  # hcl seed 1 plays the re-seed run
    verdict = ["- **Best kNN top-1: hcl**", "- Seed noise: 1 point"]
    report = write_comparison_report(tmp_path / "cmp", records, verdict=verdict, reseeded=[extra],
                                     tsne_points=0)  # fmt: skip
    text = report.read_text()
    assert "## Verdict\n\n- **Best kNN top-1: hcl**\n- Seed noise: 1 point\n" in text
    assert text.index("## Results") < text.index("## Verdict") < text.index("## Figures")
    assert "| hcl | 1 |" in text  # the re-seed run is not in the table
    assert "hcl, seed 1 (re-seed: measures the seed noise, not in the table)" in text


def test_metrics_json_survives_a_failed_write_and_a_corrupt_one_reads_as_not_evaluated(
    tmp_path, monkeypatch
):
    """metrics.json was written in place: a full disk left it empty, and every later
    ``hardneg compare`` on that folder stopped on "Expecting value: line 1 column 1"."""
    import errno
    import pathlib

    from hardneg.report import load_metrics, save_metrics

    save_metrics(tmp_path, {"knn_top1": 50.0})
    real_write = pathlib.Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)  # half written, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_metrics(tmp_path, {"knn_top1": 60.0, "linear_top1": 70.0})
    monkeypatch.undo()
    assert load_metrics(tmp_path) == {"knn_top1": 50.0}  # the previous file, whole
    for corrupt in ("", '{"knn_top1": 5', "[1, 2]", "\xff"):
        (tmp_path / "metrics.json").write_text(corrupt, encoding="latin-1")
        assert load_metrics(tmp_path) == {}  # evaluated again by the caller


LABEL_FREE = ["mass_above_positive", "positive_rank", "near_duplicate_rate", "margin_removal_share"]


def add_label_free_columns(run_dir: Path, scale: float, logged_last: bool = True) -> None:
    """Append the label-free diagnostics to a fabricated history: epoch e logs ``scale * e / k``
    for the k-th column, except the last epoch when ``logged_last`` is False (diagnostics are
    logged every ``train.diagnostics_every`` steps, so an epoch can log none)."""
    path = run_dir / "history.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        e = int(row["epoch"])
        for k, key in enumerate(LABEL_FREE, start=1):
            row[key] = "" if (e == len(rows) and not logged_last) else scale * e / k
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*COLUMNS, *LABEL_FREE])
        writer.writeheader()
        writer.writerows(rows)


def test_reports_show_the_label_free_diagnostics_of_the_last_epoch_that_logged_them(tmp_path):
    records = make_records(tmp_path / "runs")  # two strategies x two seeds, 4 epochs each
    scales = {("infonce", 0): 0.1, ("infonce", 1): 0.3, ("hcl", 0): 0.2, ("hcl", 1): 0.2}
    for record in records:
        # hcl's seed 1 logged no diagnostics in its last epoch: its epoch 3 counts
        logged_last = (record.strategy, record.seed) != ("hcl", 1)
        add_label_free_columns(record.run_dir, scales[record.strategy, record.seed], logged_last)
        record.history = load_history(record.run_dir)
    rows = summarize(records)
    # mass_above_positive (k = 1) of infonce: epoch 4 of 0.1 and 0.3 -> 0.4 and 1.2
    assert rows[0]["mass_above_positive"] == pytest.approx((0.8, math.sqrt(0.32)))
    # positive_rank (k = 2) of hcl: epoch 4 of seed 0 (0.4), epoch 3 of seed 1 (0.3)
    assert rows[1]["positive_rank"][0] == pytest.approx(0.35)
    report = write_comparison_report(tmp_path / "compare", records).read_text()
    section = report.split("## Label-free diagnostics", 1)[1].split("\n## ", 1)[0]
    assert "| strategy | seeds | mass above positive | positive rank |" in section
    # margin_removal_share (k = 4) of infonce: 0.1 and 0.3 (mean 0.2, std 0.141)
    assert "| infonce | 2 | 0.800 ± 0.566 | 0.40 ± 0.28 | 0.2667 ± 0.1886 | 0.200 ± 0.141 |" in (
        section
    )
    write_run_report(records[0].run_dir, records[0].metrics)
    run_report = (records[0].run_dir / "report.md").read_text()
    assert "| positive_rank (last epoch) | 0.2 |" in run_report  # infonce seed 0: 0.1 * 4 / 2


def test_reports_of_runs_without_label_free_diagnostics_have_no_empty_section(tmp_path):
    records = make_records(tmp_path / "runs")
    report = write_comparison_report(tmp_path / "compare", records).read_text()
    assert "Label-free" not in report and "## Results" in report


def test_tables_are_laid_out_exactly():
    """The plain table: the strategy left-aligned, every other column right-aligned to its widest
    cell, two spaces apart, a dashed rule under the header; the Markdown table: one row per line.
    A missing value is n/a, one seed has no std."""
    columns = [("knn_top1", "kNN", "{:.2f}"), ("linear_top1", "lin", "{:.1f}")]
    rows = [
        {"strategy": "infonce", "runs": 2, "knn_top1": (81.0, 1.414), "linear_top1": (math.nan,) * 2},
        {"strategy": "hcl", "runs": 1, "knn_top1": (84.5, math.nan), "linear_top1": (85.0, math.nan)},
    ]  # fmt: skip
    assert format_table(rows, columns=columns) == (
        "strategy  seeds           kNN   lin\n"
        "--------  -----  ------------  ----\n"
        "infonce       2  81.00 ± 1.41   n/a\n"
        "hcl           1         84.50  85.0"
    )
    assert format_table(rows, markdown=True, columns=columns) == (
        "| strategy | seeds | kNN | lin |\n"
        "|---|---|---|---|\n"
        "| infonce | 2 | 81.00 ± 1.41 | n/a |\n"
        "| hcl | 1 | 84.50 | 85.0 |"
    )


def test_a_run_without_epoch_times_has_no_time_per_epoch(tmp_path):
    run = fabricate_run(tmp_path / "run")
    history = [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in load_history(run)]
    row = summarize([RunRecord("infonce", 0, run, {"knn_top1": 80.0}, history)])[0]
    assert all(math.isnan(x) for x in row["epoch_time_s"])
    assert row["knn_top1"][0] == 80.0 and row["effective_negatives"][0] == 96.0


def test_hardness_files_of_one_epoch_without_epochs_or_empty_are_read_as_written(tmp_path):
    from hardneg.report.runs import bin_edges

    path = tmp_path / "hardness.npz"
    edges = np.linspace(-1, 1, 5)
    # one epoch, no "epochs" array: epochs are numbered from 1
    np.savez(path, bins=edges, sampling=np.ones((1, 4)), gradient=np.ones((1, 4)))
    one = load_hardness(tmp_path)
    assert one["epochs"].tolist() == [1] and one["edges"].tolist() == edges.tolist()
    np.savez(path, bins=edges, sampling=np.ones((3, 4)), gradient=np.ones((3, 4)))
    assert load_hardness(tmp_path)["epochs"].tolist() == [1, 2, 3]
    # an "epochs" array is kept (histograms logged every other epoch)
    np.savez(path, bins=edges, epochs=[2, 4, 6], sampling=np.ones((3, 4)), gradient=np.ones((3, 4)))
    assert load_hardness(tmp_path)["epochs"].tolist() == [2, 4, 6]
    # no epoch logged (0 rows) or not a per-epoch table: nothing to plot
    np.savez(path, bins=edges, sampling=np.ones((0, 4)), gradient=np.ones((0, 4)))
    assert load_hardness(tmp_path) is None
    np.savez(path, bins=edges, sampling=np.ones(4), gradient=np.ones(4))
    assert load_hardness(tmp_path) is None
    np.savez(path, bins=edges, sampling=np.ones((2, 4)))
    message = f"{path}: missing array 'gradient' (has ['bins', 'sampling'])"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        load_hardness(tmp_path)
    # two centres give two bins; one centre (no width) or a wrong count is refused
    assert bin_edges(np.array([0.25, 0.75]), 2).tolist() == [0.0, 0.5, 1.0]
    for bins, num_bins, count in (([0.5], 1, 1), ([0.1, 0.2, 0.3], 5, 3)):
        message = f"bins has {count} entries for {num_bins} histogram bins"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            bin_edges(np.array(bins), num_bins)


def test_metrics_json_is_indented_with_sorted_keys(tmp_path):
    """Stable bytes for a diff between evaluations: keys sorted, two-space indent, a newline."""
    from hardneg.report import save_metrics

    save_metrics(tmp_path, {"linear_top1": 70.5, "dataset": "cifar10", "knn_top1": 60})
    assert (tmp_path / "metrics.json").read_text() == (
        '{\n  "dataset": "cifar10",\n  "knn_top1": 60,\n  "linear_top1": 70.5\n}\n'
    )


def test_history_columns_number_rows_without_an_epoch_and_short_rows_read_as_nan(tmp_path):
    from hardneg.report.runs import history_column

    # rows without an "epoch" are numbered 1, 2, ... by position; NaN rows are dropped
    epochs, values = history_column([{"loss": 3.0}, {"loss": math.nan}, {"loss": 1.0}], "loss")
    assert epochs.tolist() == [1.0, 3.0] and values.tolist() == [3.0, 1.0]
    # an epoch column is read as written (the monitor may log every other epoch)
    epochs, values = history_column(
        [{"epoch": 2.0, "loss": 3.0}, {"epoch": 4.0, "loss": 1.0}], "loss"
    )
    assert epochs.tolist() == [2.0, 4.0]
    epochs, values = history_column([{"epoch": 5.0, "loss": 2.0}], "knn_top1")
    assert epochs.shape == (0,) and values.shape == (0,)
    # a row with fewer cells than the header (csv gives None for the missing ones): NaN
    (tmp_path / "history.csv").write_text("epoch,loss,knn_top1\n1,2.5,40\n2,2.0\n")
    rows = load_history(tmp_path)
    assert rows[0] == {"epoch": 1.0, "loss": 2.5, "knn_top1": 40.0}
    assert rows[1]["loss"] == 2.0 and math.isnan(rows[1]["knn_top1"])


def record_of(strategy: str, seed: int, knn: float, linear: float | None, history: list[dict]):
    metrics = {"knn_top1": knn} if linear is None else {"knn_top1": knn, "linear_top1": linear}
    return RunRecord(strategy, seed, Path(strategy) / f"seed{seed}", metrics, history)


def diagnostics_history(monitor: tuple[float, float], **last: float) -> list[dict]:
    """Two epochs: the kNN monitor's two values, the diagnostics ``last`` in the second."""
    return [{"epoch": 1.0, "knn_top1": monitor[0]}, {"epoch": 2.0, "knn_top1": monitor[1], **last}]


def test_the_verdict_of_several_seeds_line_by_line():
    """Two seeds of three strategies, every number worked out by hand in the comments."""
    from hardneg.report import verdict_lines

    infonce = diagnostics_history(
        (78.0, 80.0),
        effective_negatives=100.0,
        false_negative_mass=0.2,
        mean_negative_similarity=0.1,
    )
    hcl = diagnostics_history(
        (84.0, 84.0),
        effective_negatives=50.0,
        false_negative_mass=0.21,
        mean_negative_similarity=0.3,
    )
    ring = diagnostics_history((72.0, 72.0), false_negative_mass=0.1, mean_negative_similarity=-0.2)
    records = [
        record_of("infonce", 0, 80.0, 70.0, infonce),
        record_of("infonce", 1, 81.0, 70.0, infonce),
        record_of("hcl", 0, 84.0, 71.0, hcl),
        record_of("hcl", 1, 85.0, 71.0, hcl),
        record_of("ring", 0, 70.0, 75.0, ring),
        record_of("ring", 1, 71.0, 75.0, ring),
    ]
    # every strategy: kNN variance 0.5 over its two seeds, pooled std sqrt(0.5) = 0.71, floored
    # at 1 point; a gap must exceed 2 * 1 * sqrt(1/2 + 1/2) = 2.0 points: infonce (80.5) and
    # ring (70.5) are both behind hcl (84.5). Linear: hcl 71 is 1.0 ahead of infonce's 70 and
    # 4.0 behind ring's 75. infonce's monitor rose 78 -> 80 in its last interval; the others'
    # did not. False-negative mass against infonce's 0.2: hcl 1.05x (no comment), ring 0.5x.
    assert verdict_lines(records) == [
        "- **Best kNN top-1: hcl (84.50%)**; best linear top-1: ring (75.00%)",
        "- Seed noise: pooled per-seed standard deviation 0.71 points over 2 seeds of 3 "
        "strategies; taken as at least 1 point (per-seed standard deviations of 1-3 kNN points "
        "are usual at this scale). A kNN difference under about 2.0 points (two standard "
        "deviations of the difference of two means) is not evidence that one strategy is better.",
        "- infonce is 4.0 kNN points behind hcl, more than the noise (1.0 behind on the linear "
        "probe). Its kNN monitor was still rising when training stopped (+2.0 points over the "
        "last interval): it may learn more slowly rather than worse.",
        "- ring is 14.0 kNN points behind hcl, more than the noise (4.0 ahead on the linear probe).",
        "- What the diagnostics show about the negatives (the last epoch that logged them; labels "
        "used for analysis only; *effective negatives* = (sum w)^2 / sum w^2 of the sampling "
        "weights):",
        "  - infonce: 100 effective negatives; same-class (false-negative) mass 0.200; mean cosine "
        "to the anchor +0.10",
        "  - hcl: 50 effective negatives; same-class (false-negative) mass 0.210, 1.05x InfoNCE's "
        "uniform 0.200; mean cosine to the anchor +0.30",
        "  - ring: same-class (false-negative) mass 0.100, 0.50x InfoNCE's uniform 0.200: it "
        "avoids same-class negatives; mean cosine to the anchor -0.20",
    ]


def test_the_verdict_of_one_seed_and_a_re_seed_without_a_probe_line_by_line():
    from hardneg.report import verdict_lines

    records = [record_of("infonce", 0, 80.0, None, []), record_of("hcl", 0, 80.6, None, [])]
    reseed = record_of("infonce", 1, 80.5, None, [])
    # the re-seed's spread: std of (80, 80.5) = 0.35, floored at 1; one seed each: a gap must
    # exceed 2 * sqrt(2) = 2.8 points, and 0.6 does not. No probe, no diagnostics: no linear
    # part, no negatives section.
    assert verdict_lines(records, reseeded=[reseed], dataset="stl10") == [
        "- **Best kNN top-1: hcl (80.60%)**",
        "- Seed noise: re-training infonce with another seed moved its kNN top-1 from 80.00 to "
        "80.50 (0.50 points from the seed alone); taken as at least 1 point (per-seed standard "
        "deviations of 1-3 kNN points are usual at this scale). With one seed per strategy, a kNN "
        "difference under about 2.8 points (two standard deviations of the difference of two "
        "means) is not evidence that one strategy is better.",
        "- Level with hcl within the noise: infonce; these runs cannot rank them.",
        "- To rank strategies, run several seeds and the full schedule: `hardneg compare "
        "--dataset stl10 --seeds 3` (the packaged config's epochs).",
    ]


def test_the_verdict_of_one_seed_without_a_re_seed_line_by_line():
    """One seed each, the noise assumed, 100 negatives per anchor: the thresholds of the
    verdict (x 1.01 / x 0.99 of the negatives, x 1.1 / x 0.9 of InfoNCE's mass) met exactly."""
    from hardneg.report import verdict_lines

    def run(strategy, knn, linear, monitor, eff, fn, cos):
        history = diagnostics_history(
            monitor, effective_negatives=eff, false_negative_mass=fn, mean_negative_similarity=cos
        )
        return record_of(strategy, 0, knn, linear, history)

    records = [
        run("potential", 80.0, 80.0, (80.0, 80.0), 50.0, 1.0, 0.5),
        run("mochi", 78.0, 80.0, (78.0, 78.0), 101.0, 0.55, 0.25),
        run("infonce", 70.0, 80.0, (70.0, 70.0), 99.0, 0.5, 0.0),
        run("hcl", 60.0, 79.5, (59.0, 60.0), 150.0, 0.45, -0.25),
    ]
    # assumed noise 1 point: a gap must exceed 2 * sqrt(2) = 2.8; mochi's 2.0 does not.
    # 101 is not above 1.01 x 100 and 99 is 0.99 x 100: both uniform. 0.55 / 0.5 = 1.1 and
    # 0.45 / 0.5 = 0.9 exactly: no comment. hcl's monitor rose by exactly 1.0.
    assert verdict_lines(records, available_negatives=100, epochs=2) == [
        "- **Best kNN top-1: potential (80.00%)**; best linear top-1: potential, mochi, infonce "
        "(tied, 80.00%)",
        "- Seed noise: not measured (one seed per strategy, no re-seeded run); taken as at least 1 "
        "point (per-seed standard deviations of 1-3 kNN points are usual at this scale). With one "
        "seed and 2 epochs per strategy, a kNN difference under about 2.8 points (two standard "
        "deviations of the difference of two means) is not evidence that one strategy is better.",
        "- Level with potential within the noise: mochi.",
        "- infonce is 10.0 kNN points behind potential, more than the assumed noise (short runs can "
        "vary more) (0.0 behind on the linear probe); with one seed, confirm it with several seeds "
        "before concluding.",
        "- hcl is 20.0 kNN points behind potential, more than the assumed noise (short runs can "
        "vary more) (0.5 behind on the linear probe). Its kNN monitor was still rising when "
        "training stopped (+1.0 points over the last interval): it may learn more slowly rather "
        "than worse; one seed of a short schedule cannot tell which.",
        "- To rank strategies, run several seeds and the full schedule: `hardneg compare "
        "--dataset mnist1d --seeds 3` (20 epochs).",
        "- What the diagnostics show about the negatives (the last epoch that logged them; labels "
        "used for analysis only; *effective negatives* = (sum w)^2 / sum w^2 of the sampling "
        "weights, out of the 100 negatives each anchor has):",
        "  - potential: 50 effective negatives (50% of 100): its weight sits on a subset; "
        "same-class (false-negative) mass 1.000, 2.00x InfoNCE's uniform 0.500: the harder "
        "negatives it favours are more often same-class; mean cosine to the anchor +0.50",
        "  - mochi: uniform over all 100 negatives; same-class (false-negative) mass 0.550, 1.10x "
        "InfoNCE's uniform 0.500; mean cosine to the anchor +0.25",
        "  - infonce: uniform over all 100 negatives; same-class (false-negative) mass 0.500; "
        "mean cosine to the anchor +0.00",
        "  - hcl: 150 effective negatives, more than the 100 that exist: it counts weighted copies "
        "of some negatives; same-class (false-negative) mass 0.450, 0.90x InfoNCE's uniform "
        "0.500; mean cosine to the anchor -0.25",
    ]


def test_the_verdict_of_one_strategy_of_no_knn_and_of_a_tie_at_the_printed_precision():
    from hardneg.report import verdict_lines

    assert verdict_lines([record_of("hcl", 0, math.nan, None, [])]) == [
        "- no run has a kNN top-1: nothing to compare"
    ]
    # one strategy: nothing to compare it with, only what its diagnostics show (no InfoNCE
    # to measure its same-class mass against); a section for any one of the two measures
    only_eff = diagnostics_history((1.0, 2.0), effective_negatives=40.0)
    only_fn = diagnostics_history((1.0, 2.0), false_negative_mass=0.25)
    header = (
        "- What the diagnostics show about the negatives (the last epoch that logged them; labels "
        "used for analysis only; *effective negatives* = (sum w)^2 / sum w^2 of the sampling "
        "weights):"
    )
    assert verdict_lines([record_of("hcl", 0, 50.0, None, only_eff)]) == [
        "- **Best kNN top-1: hcl (50.00%)**",
        header,
        "  - hcl: 40 effective negatives",
    ]
    assert verdict_lines([record_of("hcl", 0, 50.0, None, only_fn)]) == [
        "- **Best kNN top-1: hcl (50.00%)**",
        header,
        "  - hcl: same-class (false-negative) mass 0.250",
    ]
    # 12.004 and 12.001 both print as 12.00: a tie
    records = [record_of("ring", 0, 12.004, None, []), record_of("hcl", 0, 12.001, None, [])]
    assert verdict_lines(records)[0] == "- **Best kNN top-1: ring, hcl (tied, 12.00%)**"


def test_the_run_report_is_written_out_exactly(tmp_path):
    """The whole run report: notes, the config, the scalar metrics in their order (floats to 4
    significant digits below 1e4 in magnitude, whole numbers from there), the history's last
    epoch without the columns it left empty, and the three curves side by side."""
    run = fabricate_run(tmp_path / "run")
    (run / "hardness.npz").unlink()
    add_label_free_columns(run, 0.1, logged_last=False)  # NaN in the last epoch: not listed
    metrics = {"knn_top1": 81.25, "linear_top1": 84.0, "large": 12345.6, "at_1e4": 10000.0,
               "negative": -20000.0, "tiny": 0.000123456, "count": 3, "name": "x",
               "nested": {"a": 1}}  # fmt: skip
    text = write_run_report(run, metrics, title="my run", notes=["first", "second"]).read_text()
    # fabricate_run's last epoch (4): loss 5 / 4, 100 - 4 negatives, mass 0.1 / 4, 0.1 * 4
    assert text == (
        "# Run report: my run\n\n- first\n- second\n\n"
        "## Configuration\n\n```yaml\nseed: 0\n"
        "loss: {name: hcl, temperature: 0.5, tau_plus: 0.1, beta: 2.0}\n```\n\n"
        "## Final metrics\n\n| metric | value |\n|---|---|\n"
        "| knn_top1 | 81.25 |\n| linear_top1 | 84 |\n| large | 12346 |\n| at_1e4 | 10000 |\n"
        "| negative | -20000 |\n| tiny | 0.0001235 |\n| count | 3 |\n| name | x |\n"
        "| epochs trained | 4 |\n| loss (last epoch) | 1.25 |\n"
        "| effective_negatives (last epoch) | 96 |\n| false_negative_mass (last epoch) | 0.025 |\n"
        "| false_negative_gradient_mass (last epoch) | 0.025 |\n"
        "| top_k_precision (last epoch) | 0.9 |\n| mean_negative_similarity (last epoch) | 0.4 |\n"
        "| epoch_time_s (last epoch) | 2 |\n| images_per_s (last epoch) | 1000 |\n\n"
        "## Figures\n\n| loss | knn | false negative mass |\n|---|---|---|\n"
        "| ![loss](plots/loss.png) | ![knn](plots/knn.png) "
        "| ![false_negative_mass](plots/false_negative_mass.png) |\n\n"
    )


def test_a_run_report_without_config_or_history_says_so(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    text = write_run_report(run, {"knn_top1": 50.0}).read_text()
    assert text == (
        "# Run report: bare\n\n## Final metrics\n\n| metric | value |\n|---|---|\n"
        "| knn_top1 | 50 |\n\nNo figures: the run logged no history.\n\n"
    )


def test_the_comparison_report_is_written_out_exactly(tmp_path):
    """The whole comparison report. The loss section reads each strategy's first run with a
    config: infonce's seed 0 has none (its seed 1's unknown loss shows every value), hcl's seed 0
    lists only the registry defaults but the temperature."""
    records = make_records(tmp_path / "runs")
    extra = records.pop()  # hcl seed 1: the re-seed run
    for record in [*records, extra]:
        add_label_free_columns(record.run_dir, 0.1)
        record.history = load_history(record.run_dir)
    records[0].metrics.update(knn_k=50, knn_t=0.07)
    (records[0].run_dir / "config.yaml").unlink()
    (records[1].run_dir / "config.yaml").write_text("loss: {name: mystery, temperature: 0.1, a: 3}")
    (records[2].run_dir / "config.yaml").write_text("loss: {name: hcl, tau_plus: 0.1, beta: 1.0}")
    (extra.run_dir / "config.yaml").write_text("loss: {name: hcl, beta: 9.0}")  # not the first
    write_run_report(records[1].run_dir)
    text = write_comparison_report(tmp_path / "cmp", records, command="hardneg compare x",
                                   device="test box", notes=["n1"], verdict=["- v1", "- v2"],
                                   reseeded=[extra]).read_text()  # fmt: skip
    runs = "../runs"
    assert text == (
        "# Strategy comparison\n\nCommand:\n\n```\nhardneg compare x\n```\n\n"
        "- seeds: 0, 1 (table: mean ± sample std over seeds)\n"
        f"- machine: test box; torch {torch.__version__}\n"
        "- kNN: weighted kNN (k = 50, t = 0.07) on frozen backbone features; linear: linear probe "
        "(L-BFGS, standardised features) on the same features\n"
        "- false-neg. mass / eff. negatives: batch means of the training diagnostics of the last "
        "epoch that logged them (train.diagnostics_every; labels used for analysis only); "
        "s / epoch: median epoch time\n- n1\n\n"
        "## Results\n\n"
        "| strategy | seeds | kNN top-1 (%) | linear top-1 (%) | false-neg. mass | eff. negatives "
        "| s / epoch |\n|---|---|---|---|---|---|---|\n"
        "| infonce | 2 | 81.00 ± 1.41 | 81.00 ± 0.00 | 0.025 ± 0.000 | 96.0 ± 0.0 | 2.00 ± 0.00 |\n"
        "| hcl | 1 | 84.00 | 85.00 | 0.050 | 96.0 | 2.00 |\n\n"
        "## Verdict\n\n- v1\n- v2\n\n"
        "## Label-free diagnostics\n\n"
        "What a run without labels can watch; batch means of the last epoch that logged "
        "diagnostics, relative to each anchor's (first) positive: *mass above positive* = share of "
        "the negatives' gradient mass on negatives scoring above the positive; *positive rank* = "
        "number of kept negatives scoring above it (0 = ranked first); *near-duplicate rate* = "
        "share of kept negatives with cosine >= 0.99 to the anchor; *margin 0.05 removes* = share "
        "of kept negatives that the positive-aware filter in margin mode (`positive_aware`, "
        "`mode=margin`, margin 0.05) would drop.\n\n"
        "| strategy | seeds | mass above positive | positive rank | near-duplicate rate "
        "| margin 0.05 removes |\n|---|---|---|---|---|---|\n"
        # epoch 4 of 0.1 * e / k for k = 1 to 4: 0.4, 0.2, 0.1333, 0.1 in every run
        "| infonce | 2 | 0.400 ± 0.000 | 0.20 ± 0.00 | 0.1333 ± 0.0000 | 0.100 ± 0.000 |\n"
        "| hcl | 1 | 0.400 | 0.20 | 0.1333 | 0.100 |\n\n"
        "Loss hyper-parameters: the temperature and those that differ from the registry defaults "
        "(`hardneg losses`); each run's `config.yaml` lists every one.\n\n"
        "| strategy | loss hyper-parameters |\n|---|---|\n"
        "| infonce | temperature=0.1, a=3 |\n| hcl | defaults |\n\n"
        "## Figures\n\n| loss | knn | false negative mass |\n|---|---|---|\n"
        "| ![loss](loss.png) | ![knn](knn.png) | ![false_negative_mass](false_negative_mass.png) |"
        "\n\n### Hardness of the negatives\n\n![hardness](hardness.png)\n\n"
        "## Runs\n\n"
        f"- infonce, seed 0: [{runs}/infonce/seed0]({runs}/infonce/seed0)\n"
        f"- infonce, seed 1: [{runs}/infonce/seed1/report.md]({runs}/infonce/seed1/report.md)\n"
        f"- hcl, seed 0: [{runs}/hcl/seed0]({runs}/hcl/seed0)\n"
        "- hcl, seed 1 (re-seed: measures the seed noise, not in the table): "
        f"[{runs}/hcl/seed1]({runs}/hcl/seed1)\n"
    )


def test_seed_noise_of_two_re_seeds_of_several_seed_counts_and_of_a_std_of_exactly_one():
    from hardneg.report.verdict import Noise, seed_noise

    one = [{"epoch": 1.0}]
    # two strategies re-seeded once each: one sentence per strategy, "; " between them; a
    # pooled std of sqrt((2^2 / 2 + 4^2 / 2) / 2) = sqrt(5) points
    runs = [record_of("a", 0, 80.0, 81.0, one), record_of("b", 0, 70.0, None, one)]
    again = [record_of("a", 1, 82.0, 80.5, one), record_of("b", 1, 74.0, None, one)]
    assert seed_noise(runs, again) == Noise(
        math.sqrt(5),
        "re-training a with another seed moved its kNN top-1 from 80.00 to 82.00 (2.00 points "
        "from the seed alone; linear top-1 81.00 -> 80.50); re-training b with another seed "
        "moved its kNN top-1 from 70.00 to 74.00 (4.00 points from the seed alone)",
    )
    # 2 seeds of a (variance 2), 3 of b (0, 1, 2: variance exactly 1): pooled sqrt(1.5)
    runs = [record_of("a", s, 80.0 + 2 * s, None, one) for s in (0, 1)]
    runs += [record_of("b", s, 70.0 + s, None, one) for s in (0, 1, 2)]
    assert seed_noise(runs) == Noise(
        math.sqrt(1.5),
        "pooled per-seed standard deviation 1.22 points over 2/3 seeds of 2 strategies",
    )
    # b alone: a pooled std of exactly 1 point is not below the floor, so no floor sentence
    assert seed_noise(runs[2:]) == Noise(
        1.0, "pooled per-seed standard deviation 1.00 points over 3 seeds of 1 strategies"
    )


def test_the_verdict_of_a_gap_of_exactly_the_threshold_and_of_monitors_not_rising():
    """Two seeds of five strategies, kNN spreads below the 1-point floor (pooled std
    sqrt((0.125 * 4 + 0) / 5) = 0.32): a gap counts as level up to 2 * 1 * sqrt(1/2 + 1/2) = 2
    points. b is exactly 2 behind a (level), c 1; d's monitor fell in its last interval (75, 70,
    68: no "still rising"), e logged no monitor; only a has a linear probe (no linear part)."""
    from hardneg.report.verdict import verdict_lines

    def monitor(*values: float) -> list[dict]:
        return [{"epoch": float(i + 1), "knn_top1": v} for i, v in enumerate(values)]

    runs = [
        ("a", (80.0, 80.5), 85.0, monitor(70.0, 80.0)),
        ("b", (78.25, 78.25), None, monitor(70.0, 78.0)),
        ("c", (79.0, 79.5), None, monitor(70.0, 79.0)),
        ("d", (70.0, 70.5), None, monitor(60.0, 75.0, 70.0, 68.0)),
        ("e", (60.0, 60.5), None, [{"epoch": 1.0}]),
    ]
    records = [
        record_of(strategy, seed, knn, linear, history)
        for strategy, values, linear, history in runs
        for seed, knn in enumerate(values)
    ]
    assert verdict_lines(records, epochs=3) == [
        "- **Best kNN top-1: a (80.25%)**; best linear top-1: a (85.00%)",
        "- Seed noise: pooled per-seed standard deviation 0.32 points over 2 seeds of 5 "
        "strategies; taken as at least 1 point (per-seed standard deviations of 1-3 kNN points "
        "are usual at this scale). A kNN difference under about 2.0 points (two standard "
        "deviations of the difference of two means) is not evidence that one strategy is better.",
        "- Level with a within the noise: c, b.",
        "- d is 10.0 kNN points behind a, more than the noise.",
        "- e is 20.0 kNN points behind a, more than the noise.",
    ]


def test_the_negatives_section_with_per_strategy_counts_and_an_infonce_mass_of_zero():
    """available_negatives per strategy: the header names no shared count; InfoNCE's same-class
    mass of 0 gives no ratio to compare with (no division by it)."""
    from hardneg.report.verdict import verdict_lines

    def run(strategy: str, eff: float, fn: float, cos: float):
        history = diagnostics_history((70.0, 80.0), effective_negatives=eff,
                                      false_negative_mass=fn, mean_negative_similarity=cos)  # fmt: skip
        return record_of(strategy, 0, 80.0, None, history)

    records = [run("infonce", 100.0, 0.0, 0.1), run("hcl", 25.0, 0.2, 0.3)]
    lines = verdict_lines(records, available_negatives={"infonce": 100, "hcl": 50})
    assert lines[-3:] == [
        "- What the diagnostics show about the negatives (the last epoch that logged them; labels "
        "used for analysis only; *effective negatives* = (sum w)^2 / sum w^2 of the sampling "
        "weights, out of the negatives each anchor has in the term they describe):",
        # 100 of 100 (at least 99 %): uniform; 25 of 50: 50 %
        "  - infonce: uniform over all 100 negatives; same-class (false-negative) mass 0.000; "
        "mean cosine to the anchor +0.10",
        "  - hcl: 25 effective negatives (50% of 50): its weight sits on a subset; same-class "
        "(false-negative) mass 0.200; mean cosine to the anchor +0.30",
    ]


def test_the_comparison_hands_each_figure_its_runs_and_states_the_default_knn_and_machine(
    tmp_path, monkeypatch
):
    """What the figures receive (recorded, not drawn): every run's history under its strategy,
    the first seed's hardness, the t-SNE's points and seed (1000 and 0 unless told). The kNN
    line falls back to Wu et al.'s k = 200, t = 0.1; the machine to the CPU's name."""
    from hardneg.report import markdown

    calls: list[tuple] = []
    monkeypatch.setattr(
        markdown.plots,
        "plot_metric_curves",
        lambda histories, key, path, **kw: calls.append(("curve", key, histories)),
    )
    monkeypatch.setattr(
        markdown.plots, "plot_hardness", lambda hardness, path: calls.append(("hardness", hardness))
    )
    monkeypatch.setattr(markdown.plots, "plot_tsne",
                        lambda embeddings, path, **kw: calls.append(("tsne", embeddings, kw)))  # fmt: skip
    monkeypatch.setattr(markdown.platform, "processor", lambda: "")
    monkeypatch.setattr(markdown.platform, "machine", lambda: "testarch")
    monkeypatch.setattr(markdown.torch.cuda, "is_available", lambda: False)
    records = make_records(tmp_path / "runs")  # infonce and hcl, seeds 0 and 1
    embeddings = {"hcl": (np.zeros((2, 3)), np.array([0, 1]))}
    # no figure drawn here creates the folder: the report makes it, parents included
    report = write_comparison_report(tmp_path / "deep" / "cmp", records, embeddings=embeddings)
    assert report == tmp_path / "deep" / "cmp" / "report.md"
    text = report.read_text()
    curves = [call for call in calls if call[0] == "curve"]
    assert [key for _, key, _ in curves] == ["loss", "knn_top1", "false_negative_mass"]
    for _, _, histories in curves:
        assert histories == {
            "infonce": [records[0].history, records[1].history],
            "hcl": [records[2].history, records[3].history],
        }
    (_, hardness), (_, tsne, options) = [call for call in calls if call[0] != "curve"]
    assert list(hardness) == ["infonce", "hcl"]
    for strategy, seed0 in (("infonce", records[0]), ("hcl", records[2])):
        np.testing.assert_array_equal(hardness[strategy]["sampling"],
                                      np.load(seed0.run_dir / "hardness.npz")["sampling"])  # fmt: skip
    assert tsne is embeddings and options == {"max_points": 1000, "seed": 0}
    assert "- kNN: weighted kNN (k = 200, t = 0.1) on frozen backbone features;" in text
    assert f"- machine: testarch CPU, {os.cpu_count()} cores; torch {torch.__version__}\n" in text
    calls.clear()
    write_comparison_report(tmp_path / "cmp2", records, embeddings=embeddings, tsne_points=7,
                            seed=3)  # fmt: skip
    assert calls[-1][2] == {"max_points": 7, "seed": 3}


def test_label_free_diagnostics_of_one_seed_per_strategy_are_shown(tmp_path):
    # one seed: every cell has a mean and no spread; the section is there all the same
    records = [r for r in make_records(tmp_path / "runs") if r.seed == 0]
    for record in records:
        add_label_free_columns(record.run_dir, 0.1)
        record.history = load_history(record.run_dir)
    report = write_comparison_report(tmp_path / "cmp", records).read_text()
    assert "| infonce | 1 | 0.400 | 0.20 | 0.1333 | 0.100 |" in report
