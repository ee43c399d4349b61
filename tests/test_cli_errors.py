"""A newcomer's mistakes end in one line naming the problem and what is allowed, before any data
is loaded or any folder is written: encoder / data set mismatches, run folders that cannot be
written, full disks, loss sections left over from another loss, keys at the wrong level, and
options placed between overrides."""

from __future__ import annotations

import builtins
import errno
import io
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hardneg.cli import build_parser, main, parse_args
from hardneg.config import load_config
from hardneg.registry import loss_hparams
from hardneg.train import checkpoint as checkpoint_module
from hardneg.train import runtime
from hardneg.train.checkpoint import save_checkpoint

# a run that is over in about a second (digits, 64 images, one epoch)
TINY = ["data.dataset=digits", "data.subset=64", "model.backbone=digits_cnn",
        "model.head_hidden=32", "model.out_dim=16", "train.batch_size=16", "train.epochs=1",
        "train.device=cpu", "train.threads=1", "eval.knn=false"]  # fmt: skip


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train_cli(tmp_path: Path, *args: str, run_dir: str | Path | None = None) -> list[str]:
    run = str(run_dir if run_dir is not None else tmp_path / "run")
    return ["train", "--config", "mnist1d_simclr_hcl", *args, "--run-dir", run, "--no-progress"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hardneg train: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.backbone=resnet18"], "model.backbone='resnet18' does not fit data set 'mnist1d'"),
        (["data.dataset=digits"], "model.backbone='cnn1d' does not fit data set 'digits'"),
    ],
)
def test_an_encoder_that_does_not_fit_the_data_set_is_refused_before_any_work(
    overrides, expected, tmp_path, capsys
):
    assert main(train_cli(tmp_path, *overrides)) == 2
    line = one_line_error(capsys)
    assert expected in line and "allowed for" in line
    assert not (tmp_path / "run").exists()


def test_the_default_encoder_is_the_data_sets_so_an_empty_config_is_valid(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).model.backbone == "cnn1d"  # mnist1d, the default data set
    assert load_config(empty, ["data.dataset=digits"]).model.backbone == "digits_cnn"
    assert load_config(None, ["data.dataset=cifar10"]).model.backbone == "resnet18"


def test_a_run_folder_under_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(train_cli(tmp_path, *TINY, run_dir=tmp_path / "a_file" / "run")) == 2
    line = one_line_error(capsys)
    assert "a_file is a file, not a folder" in line


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_a_run_folder_under_sys_is_refused_in_one_line(tmp_path, capsys):
    assert main(train_cli(tmp_path, *TINY, run_dir="/sys/hardneg-test-run")) == 2
    assert "cannot write the run folder /sys/hardneg-test-run" in one_line_error(capsys)


def test_a_read_only_or_full_file_system_is_named_before_the_data_are_loaded(
    tmp_path, capsys, monkeypatch
):
    def refuse(path, mode="r", *args, **kwargs):
        if "w" in mode and ".hardneg-write-test" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runtime, "open", refuse, raising=False)
    monkeypatch.setattr("hardneg.train.trainer.load_pretrain_split", pytest.fail)
    assert main(train_cli(tmp_path, *TINY, run_dir=tmp_path / "new" / "run")) == 2
    line = one_line_error(capsys)
    assert f"cannot write the run folder {tmp_path / 'new' / 'run'}: Read-only file system" in line
    assert not (tmp_path / "new").exists()  # the folders made for the probe are removed


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_while_saving_a_checkpoint_names_the_file_and_the_cause(tmp_path, monkeypatch):
    """torch's own message for this is 'enforce fail ... unexpected pos N vs M'."""
    real_fdopen = os.fdopen

    def full_disk(fd, mode="r", *args, **kwargs):
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.os, "fdopen", full_disk)
    target = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(OSError) as info:
        save_checkpoint(target, {"model": {"w": torch.zeros(300_000)}})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list(target.parent.iterdir()) == []  # the temporary file is removed


def test_a_full_disk_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "x.pt"))

    monkeypatch.setattr("hardneg.train.trainer.save_checkpoint", full)
    assert main(train_cli(tmp_path, *TINY)) == 2
    assert "x.pt: No space left on device" in one_line_error(capsys)


def test_switching_the_loss_by_name_says_how_to_replace_the_whole_section(tmp_path, capsys):
    assert main(train_cli(tmp_path, "loss.name=ring")) == 2
    line = one_line_error(capsys)
    assert "'tau_plus'" in line and "replace the whole section" in line
    assert "'loss={name: ring, temperature: 0.5}'" in line
    # and the suggested form works
    config = load_config("mnist1d_simclr_hcl", ["loss={name: ring, temperature: 0.5}"])
    assert config.loss.name == "ring" and "tau_plus" not in config.loss.params


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("temperature=0.5", "did you mean loss.temperature?"),
        ("epochs=3", "did you mean train.epochs?"),
        ("lr=0.1", "did you mean optim.lr?"),
    ],
)
def test_a_section_key_given_at_the_top_level_points_to_its_section(
    override, hint, tmp_path, capsys
):
    assert main(train_cli(tmp_path, override)) == 2
    assert hint in one_line_error(capsys)


def test_compare_points_a_top_level_key_to_its_section(tmp_path, capsys):
    assert main(["compare", "--strategies", "hcl", "--out", str(tmp_path), "temperature=1"]) == 2
    assert "did you mean loss.temperature=1?" in capsys.readouterr().err


def test_options_may_sit_between_overrides():
    args = parse_args(
        build_parser(),
        ["train", "--config", "c.yaml", "a.b=1", "--run-dir", "D", "c.d=2", "--no-progress", "e=3"],
    )
    assert args.overrides == ["a.b=1", "c.d=2", "e=3"]
    assert args.run_dir == "D" and args.no_progress and args.command == "train"
    args = parse_args(build_parser(), ["demo", "train.epochs=2", "--out", "X", "data.subset=9"])
    assert args.overrides == ["train.epochs=2", "data.subset=9"] and args.out == "X"


def test_a_run_writes_every_loss_hyper_parameter_and_a_report(tmp_path, capsys):
    assert main(train_cli(tmp_path, *TINY, "loss.beta=2")) == 0
    assert "report" in capsys.readouterr().out
    run = tmp_path / "run"
    loss = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    assert loss.pop("name") == "hcl" and loss["beta"] == 2
    assert set(loss) == set(loss_hparams("hcl")) - {"check_inputs"}
    report = (run / "report.md").read_text()
    assert "# Run report: hcl" in report and "![loss](plots/loss.png)" in report
    assert (run / "plots" / "loss.png").is_file()


def test_a_device_this_machine_lacks_is_named_in_one_line_by_train_and_mine(monkeypatch):
    """``train.device`` and ``hardneg mine --device`` read one availability check
    (``runtime.device_available``), each with its own wording."""
    import torch

    from hardneg.commands.mine import _check_device
    from hardneg.train.runtime import device_available, select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not device_available(torch.device("cuda:1"))
    assert device_available(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^train.device='cuda:1' but CUDA is not available here$"):
        select_device("cuda:1")
    with pytest.raises(
        ValueError, match=r"^--device cuda:1: CUDA is not available here; use --device cpu$"
    ):
        _check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda:1") == torch.device("cuda:1")
    _check_device("cuda:1")  # no error


@pytest.mark.parametrize("count", [1, 3])
def test_a_cuda_index_past_the_machines_gpus_is_refused_by_train_and_mine(monkeypatch, count):
    """``cuda:N`` with N >= ``torch.cuda.device_count()`` passed the old check (CUDA is there)
    and failed when the first tensor moved to it; now both callers name the indices there are.
    The indices below the count, and ``cuda`` without one, pass."""
    import torch

    from hardneg.commands.mine import _check_device
    from hardneg.train.runtime import device_available, select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
    why = (
        f"this machine has {count} CUDA device{'s' if count > 1 else ''}, so the index must be "
        f"below {count}: use {have}"
    )
    for name in ("cuda", *(f"cuda:{i}" for i in range(count))):
        assert device_available(torch.device(name))
        assert select_device(name) == torch.device(name)
        _check_device(name)  # no error
    for index in (count, count + 4):
        assert not device_available(torch.device(f"cuda:{index}"))
        with pytest.raises(ValueError) as info:
            select_device(f"cuda:{index}")
        assert str(info.value) == f"train.device='cuda:{index}' but {why}"
        with pytest.raises(ValueError) as info:
            _check_device(f"cuda:{index}")
        assert str(info.value) == f"--device cuda:{index}: {why}"


def test_a_reader_that_stops_early_is_not_an_error(tmp_path):
    # `hardneg losses | head -3`: the reader closes the pipe; hardneg printed
    # "hardneg losses: error: Broken pipe"
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    proc = subprocess.run(
        [sys.executable, "-m", "hardneg", "losses"],
        stdout=write,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        timeout=120,
    )
    os.close(write)
    assert proc.returncode == 1 and proc.stderr == ""


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch, capsys):
    import hardneg.commands.losses as losses_cmd

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(losses_cmd, "run", broken)
    from hardneg.cli import main

    assert main(["losses"]) == 2
    assert "hardneg losses: error: Broken pipe" in capsys.readouterr().err


def test_ctrl_c_outside_a_training_loop_is_one_line_with_status_130(monkeypatch, capsys):
    """Ctrl-C while the data load, a report is drawn or a checkpoint is evaluated printed a stack
    trace (the training loop alone turned it into a message)."""
    import hardneg.commands.losses as losses_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(losses_cmd, "run", interrupted)
    assert main(["losses"]) == 130
    assert capsys.readouterr().err == "hardneg losses: interrupted\n"


class _Stderr(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize("terminal", [True, False])
def test_the_progress_bar_is_drawn_on_a_terminal_only(tmp_path, monkeypatch, capsys, terminal):
    """Into a log file (nohup, CI, ``2> log``) the bar wrote one carriage-return redraw per step;
    the epoch lines on stdout carry the same figures."""
    stderr = _Stderr(terminal)
    monkeypatch.setattr(sys, "stderr", stderr)
    args = ["train", "--config", "mnist1d_simclr_hcl", *TINY, "--run-dir", str(tmp_path / "run")]
    assert main(args) == 0
    drawn = stderr.getvalue()
    assert ("4/4 [" in drawn and "step/s" in drawn) is terminal, drawn
    assert "\r" not in drawn or terminal
    assert "epoch=1  loss=" in capsys.readouterr().out


def test_an_override_right_after_resume_is_an_override_not_a_checkpoint(tmp_path, capsys):
    # argparse gave `train.epochs=2` to --resume as its optional CKPT: "checkpoint
    # train.epochs=2 does not exist"
    run = tmp_path / "run"
    assert main(train_cli(tmp_path, *TINY, run_dir=run)) == 0
    args = ["train", "--run-dir", str(run), "--no-progress", "--resume", "train.epochs=2"]
    assert main(args) == 0
    assert "Traceback" not in capsys.readouterr().err
    history = (run / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history] == ["epoch", "1", "2"]
    assert "epochs: 2" in (run / "config.yaml").read_text()
