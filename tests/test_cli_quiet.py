"""``--quiet``: a command prints its result lines, warnings and errors, and no progress lines or
bars. Each quiet run is checked against the same command without ``--quiet``: its output less
the progress lines."""

from __future__ import annotations

import io
import json
import logging
import re
import sys

import pytest
import torch
from _crash import NonFiniteAt

from hardneg.cli import build_parser, main
from hardneg.commands import STATUS, status_printer

# a run that is over in about a second (digits, 64 images, one epoch), as in test_cli_errors.py
TINY = ["data.dataset=digits", "data.subset=64", "model.backbone=digits_cnn",
        "model.head_hidden=32", "model.out_dim=16", "train.batch_size=16", "train.epochs=1",
        "train.device=cpu", "train.threads=1", "eval.knn=false"]  # fmt: skip


@pytest.fixture(autouse=True)
def keep_thread_count_and_status_level():
    threads, level = torch.get_num_threads(), STATUS.level
    yield
    torch.set_num_threads(threads)
    STATUS.setLevel(level)


class _Terminal(io.StringIO):
    """stderr as a terminal: where the training progress bar is drawn."""

    def isatty(self) -> bool:
        return True


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_every_command_that_prints_progress_takes_quiet():
    parser = build_parser()
    for command in ("train", "eval", "compare", "demo", "mine"):
        sub = parser._subparsers._group_actions[0].choices[command]
        assert "--quiet" in sub.format_help() and "-q" in sub.format_help()
    assert "--quiet" not in parser._subparsers._group_actions[0].choices["losses"].format_help()


def test_the_status_logger_prints_progress_unless_quiet_and_warnings_always(capsys):
    import argparse

    say = status_printer(argparse.Namespace(quiet=False))
    say("epoch=1")
    STATUS.warning("careful")
    assert capsys.readouterr().out == "epoch=1\ncareful\n"
    say = status_printer(argparse.Namespace(quiet=True))
    say("epoch=2")
    STATUS.warning("still careful")
    assert capsys.readouterr().out == "still careful\n"
    status_printer(argparse.Namespace())  # a command without the option: not quiet
    STATUS.info("epoch=3")
    assert capsys.readouterr().out == "epoch=3\n"


def test_quiet_train_prints_the_done_line_only(tmp_path, monkeypatch, capsys):
    stderr = _Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    base = ["train", "--config", "mnist1d_simclr_hcl", *TINY]
    assert main([*base, "--run-dir", str(tmp_path / "loud")]) == 0
    loud = lines(capsys.readouterr().out)
    assert "4/4 [" in stderr.getvalue()  # the bar, on a terminal
    assert [line.split(" ")[0] for line in loud] == ["epoch=1", "done:"]
    stderr.seek(0), stderr.truncate()

    assert main([*base, "--run-dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = lines(capsys.readouterr().out)
    # the same run (same seed, same data): the loud output's result line, in the other folder
    assert quiet == [loud[1].replace(str(tmp_path / "loud"), str(tmp_path / "quiet"))]
    assert stderr.getvalue() == ""  # no bar


def test_quiet_train_still_shows_a_skipped_step(tmp_path, monkeypatch, capsys, caplog):

    NonFiniteAt(monkeypatch, at=2)
    args = ["train", "--config", "mnist1d_simclr_hcl", *TINY, "train.nonfinite=skip"]
    assert main([*args, "--run-dir", str(tmp_path / "run"), "-q"]) == 0
    warned = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert warned == [(logging.WARNING, "step 2: non-finite loss or embeddings, step skipped")]
    assert [line.split(" ")[0] for line in lines(capsys.readouterr().out)] == ["done:"]


def test_quiet_compare_prints_the_table_and_the_report_only(tmp_path, capsys):
    args = ["compare", "--dataset", "digits", "--strategies", "hcl", "--seeds", "1",
            "--tsne-points", "0", "--no-linear", "data.subset=64", "train.batch_size=16",
            "train.epochs=1", "train.device=cpu", "train.threads=1", "model.out_dim=16",
            "model.head_hidden=32", "model.backbone=digits_cnn"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "loud")]) == 0
    loud = lines(capsys.readouterr().out)
    progress = [line for line in loud if line.startswith(("[1/1] hcl seed 0", "epoch="))]
    assert len(progress) == 3  # training ..., the epoch line, kNN ...
    assert main([*args, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = lines(capsys.readouterr().out)
    expected = [line for line in loud if line not in progress]
    expected[-1] = expected[-1].replace(str(tmp_path / "loud"), str(tmp_path / "quiet"))

    def untimed(lines: list[str]) -> list[str]:  # the table's last column is s / epoch
        lines = [line.rsplit(" ", 1)[0] if line.startswith("hcl ") else line for line in lines]
        return [re.sub(r" in \d+ s;", " in N s;", line) for line in lines]  # the closing line

    assert untimed(quiet) == untimed(expected) and quiet[-1].startswith("1 run in ")
    assert quiet[-1].endswith(f"; report: {tmp_path / 'quiet' / 'report.md'}")
    assert sum(line.startswith("hcl ") for line in quiet) == 1  # the table's row


def test_quiet_mine_prints_the_mined_line_only(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    from _text_models import saved_model_and_pairs

    model_dir, pairs, texts = saved_model_and_pairs(tmp_path)
    args = ["mine", "--data", str(pairs), "--model", str(model_dir), "--num-negatives", "2"]
    assert main([*args, "--output", str(tmp_path / "loud.jsonl")]) == 0
    loud = lines(capsys.readouterr().out)
    assert [line.split(" ")[0] for line in loud] == ["mined", "seconds:"]
    assert main([*args, "--output", str(tmp_path / "quiet.jsonl"), "--quiet"]) == 0
    quiet = lines(capsys.readouterr().out)
    assert quiet == [loud[0].replace("loud.jsonl", "quiet.jsonl")]


def test_quiet_text_training_prints_no_step_logs(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    from _text_models import sentences, tiny_model

    model_dir = tmp_path / "model"
    tiny_model(tmp_path / "bert", seed=0).save(str(model_dir))
    texts = list(dict.fromkeys(sentences(400, seed=5)))[:80]
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"anchor": texts[i], "positive": texts[40 + i]}) + "\n" for i in range(40)
        )
    )
    args = ["train", "--modality", "text", "--no-progress", f"data={data}", f"model={model_dir}",
            "max_steps=2", "batch_size=8", "dev_fraction=0.25", "threads=1"]  # fmt: skip
    assert main([*args, "--run-dir", str(tmp_path / "loud")]) == 0
    loud = lines(capsys.readouterr().out)
    # the Trainer's per-step logs (printed in the bar's place) and the held-out scores
    assert sum(line.startswith("{'loss'") for line in loud) == 2
    assert sum(line.startswith("held-out retrieval") for line in loud) == 2
    assert main([*args, "--run-dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = lines(capsys.readouterr().out)
    assert [line.split(" ")[0] for line in quiet] == ["done:"]
    assert quiet == [loud[-1].replace(str(tmp_path / "loud"), str(tmp_path / "quiet"))]
