"""``hardneg eval`` on a checkpoint from a tiny real training run."""

from __future__ import annotations

import json

import pytest
import torch

from hardneg.cli import main


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors gain nothing from a second intra-op thread, and on shared CI cores the
    spinning OpenMP workers made these tests 5x slower (145 s vs 27 s measured on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = {
    "seed": 0,
    "data": {"dataset": "mnist1d", "subset": 256},
    "model": {"backbone": "cnn1d", "head": "simclr", "out_dim": 32},
    "loss": {"name": "hcl"},
    "train": {
        "epochs": 1,
        "batch_size": 128,
        "device": "cpu",
        "diagnostics_every": 1,
        "knn_every": 1,
    },  # fmt: skip
    "eval": {"knn_k": 200, "knn_temperature": 0.1},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from hardneg.train import train

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    return train(TINY, run_dir=run_dir, progress_bar=False)


def test_eval_prints_knn_and_linear_top1_top5(tiny_run, capsys):
    assert main(["eval", str(tiny_run.checkpoint), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "data: mnist1d" in out
    assert "kNN (k=200, t=0.1)" in out and "linear probe" in out
    assert out.count("top-1") == 2 and out.count("top-5") == 2


def test_eval_knn_equals_the_trainers_final_knn_monitor(tiny_run, capsys):
    # same backbone, same splits, same k and t: the monitor and `hardneg eval` must agree
    code = main(["eval", str(tiny_run.checkpoint), "--device", "cpu", "--no-linear", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert "linear_top1" not in result
    assert result["knn_top1"] == pytest.approx(tiny_run.history[-1]["knn_top1"])
    assert result["train_size"] == 4000 and result["test_size"] == 1000  # full eval splits


def test_eval_takes_the_runs_own_knn_settings_unless_told_otherwise(tiny_run, tmp_path, capsys):
    # the HCL configs monitor kNN at t = 0.5: `hardneg eval` without flags must score what the
    # run's monitor and `hardneg compare` score, not Wu et al.'s t = 0.1
    from hardneg.evaluation import evaluate_checkpoint
    from hardneg.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(tiny_run.checkpoint)
    state["config"]["eval"].update(knn_k=20, knn_temperature=0.5)
    ckpt = tmp_path / "final.pt"
    save_checkpoint(ckpt, state)
    base = ["eval", str(ckpt), "--device", "cpu", "--no-linear"]
    assert main(base) == 0
    assert "kNN (k=20, t=0.5)" in capsys.readouterr().out
    assert main([*base, "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert (own["knn_k"], own["knn_t"]) == (20, 0.5)
    assert main([*base, "--json", "--knn-k", "200", "--knn-t", "0.1"]) == 0
    wu = json.loads(capsys.readouterr().out)
    assert (wu["knn_k"], wu["knn_t"]) == (200, 0.1)
    expected = evaluate_checkpoint(ckpt, knn_k=20, knn_t=0.5, linear=False, device="cpu")
    assert own["knn_top1"] == pytest.approx(expected["knn_top1"])
    # the settings do change the score here, so the first assertion can tell them apart
    assert (own["knn_top1"], own["knn_top5"]) != (wu["knn_top1"], wu["knn_top5"])


def test_eval_report_writes_metrics_and_report_into_the_run_folder(tiny_run, capsys):
    args = ["eval", str(tiny_run.checkpoint), "--device", "cpu", "--no-linear", "--report"]
    args += ["--tsne-points", "100"]
    assert main(args) == 0
    run_dir = tiny_run.run_dir
    assert f"report: {(run_dir / 'report.md').resolve()}" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "knn_top1" in metrics
    text = (run_dir / "report.md").read_text()
    for name in ("loss.png", "knn.png", "hardness.png", "tsne.png"):
        assert f"plots/{name}" in text and (run_dir / "plots" / name).exists()


def test_eval_of_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_eval_on_a_data_set_the_backbone_cannot_read_is_a_one_line_error(tiny_run, capsys):
    # a 1-D signal encoder on 8x8 digits stopped in a convolution with a shape error
    args = ["eval", str(tiny_run.checkpoint), "--device", "cpu", "--no-linear"]
    assert main([*args, "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "trained on 'mnist1d', 1-D signals: it cannot read 'digits', 1-channel images" in err


def test_eval_of_a_graph_runs_weights_points_to_its_results(tmp_path, capsys):
    from hardneg.train.checkpoint import save_checkpoint

    model = tmp_path / "model.pt"  # what hardneg train writes for a graph config
    save_checkpoint(model, {"model": {}, "encoder": {}, "config": {}, "setting": {}})
    assert main(["eval", str(model)]) == 2
    assert "is a graph run's InfoGraph weights: its SVM score is in results.json" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_eval_of_a_device_torch_cannot_parse_is_a_one_line_error(tiny_run, capsys, device):
    # torch.device('gpu') raised a RuntimeError, printed as a stack trace (status 1)
    assert main(["eval", str(tiny_run.checkpoint), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"hardneg eval: error: --device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)\n"
    )


def test_eval_of_a_missing_cuda_names_its_own_option(tiny_run, capsys, monkeypatch):
    # it said "train.device='cuda' but ...": a key this command does not have
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", str(tiny_run.checkpoint), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "hardneg eval: error: --device cuda: CUDA is not available here; use --device cpu\n"
    )


def test_eval_of_a_run_folder_evaluates_its_final_checkpoint(tiny_run, tmp_path, capsys):
    # `hardneg train --resume RUN` takes the folder; eval said "checkpoint RUN does not exist"
    args = ["--device", "cpu", "--no-linear", "--json"]
    assert main(["eval", str(tiny_run.checkpoint), *args]) == 0
    by_file = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_run.run_dir), *args]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert by_folder == by_file and by_file["checkpoint"] == str(tiny_run.checkpoint)
    empty = tmp_path / "unfinished"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 2
    assert "is a folder without checkpoints/final.pt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--knn-t", "0"], "--knn-t must be > 0, got 0"),  # it said "temperature must be > 0"
        (["--knn-k", "0"], "--knn-k must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--tsne-points", "-5", "--report"], "--tsne-points must be >= 0, got -5"),  # accepted
    ],
)
def test_eval_options_out_of_range_are_named_by_their_flag(tiny_run, capsys, option, message):
    assert main(["eval", str(tiny_run.checkpoint), "--device", "cpu", *option]) == 2
    assert capsys.readouterr().err == f"hardneg eval: error: {message}\n"
