"""``hardneg compare`` end to end on a tiny setting, its config building, and ``hardneg demo``."""

from __future__ import annotations

import json
import re

import pytest
import torch

from hardneg.cli import main
from hardneg.commands import compare as compare_cmd
from hardneg.commands import demo as demo_cmd
from hardneg.commands.compare import Overrides, build_run_config


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors gain nothing from a second intra-op thread, and on shared CI cores the
    spinning OpenMP workers made these tests 5x slower (145 s vs 27 s measured on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ["data.subset=256", "train.batch_size=128", "train.device=cpu", "model.out_dim=32",
        "train.diagnostics_every=1", "train.knn_every=1"]  # fmt: skip


def test_compare_trains_evaluates_and_reports_two_strategies(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--strategies", "infonce,hcl", "--seeds", "1", "--epochs", "1",
            "--out", str(out), "--tsne-points", "60", *TINY]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    table = text[text.index("strategy  seeds") :]
    rows = [line for line in table.splitlines() if re.match(r"(infonce|hcl)\s+1\s", line)]
    assert len(rows) == 2 and "n/a" not in "".join(rows)
    assert re.search(rf"\n2 runs in \d+ s; report: {re.escape(str(out / 'report.md'))}", text)
    report = (out / "report.md").read_text()
    assert "| infonce | 1 |" in report and "| hcl | 1 |" in report
    # the label-free diagnostics the runs logged, one row per strategy, each a number
    label_free = report.split("## Label-free diagnostics", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"^\| (infonce|hcl) \| 1 \| \d", label_free, re.MULTILINE)) == 2
    assert "n/a" not in label_free
    for name in ("loss.png", "knn.png", "false_negative_mass.png", "hardness.png", "tsne.png"):
        assert (out / name).exists() and f"]({name})" in report
    for strategy in ("infonce", "hcl"):
        run = out / strategy / "seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        assert 0 <= metrics["knn_top1"] <= 100 and 0 <= metrics["linear_top1"] <= 100
        assert (run / "report.md").exists() and (run / "checkpoints" / "final.pt").exists()
        assert f"name: {strategy}" in (run / "config.yaml").read_text()

    # a second call finds the finished runs and reuses them instead of training again
    assert main([*args, "--tsne-points", "0"]) == 0
    again = capsys.readouterr().out
    assert again.count("(reused)") == 2 and "2 runs (2 reused, 0 trained) in " in again


def config(strategy, *overrides, framework=None):
    return build_run_config("mnist1d", strategy, 3, None, Overrides.parse(overrides), 2, framework)


def test_every_strategy_gets_the_base_temperature_and_its_registry_defaults():
    from hardneg.registry import loss_hparams

    for strategy in compare_cmd.default_strategies():
        cfg = config(strategy, "loss.temperature=0.2")
        assert cfg.loss.name == strategy and cfg.seed == 3 and cfg.train.epochs == 2
        assert cfg.loss.params["temperature"] == 0.2
        assert cfg.model.backbone == "cnn1d"  # the packaged mnist1d base config
    assert config("infonce").loss.params["temperature"] == config("hcl").loss.params["temperature"]
    # every hyper-parameter is written out: the registry defaults, updated where set
    assert config("hcl").loss.params["beta"] == loss_hparams("hcl")["beta"]
    assert set(config("potential").loss.params) == set(loss_hparams("potential")) - {"check_inputs"}


def test_ring_keeps_a_wide_band_on_in_batch_negatives_only():
    from hardneg.registry import loss_hparams
    from hardneg.strategies import RingNegatives

    assert RingNegatives.in_batch_defaults == {"rho_out": 0.5}  # data, not a name in compare
    assert config("ring").loss.params["rho_out"] == 0.5
    assert (
        config("ring", framework="moco").loss.params["rho_out"] == loss_hparams("ring")["rho_out"]
    )
    assert config("ring", "ring.rho_out=0.3").loss.params["rho_out"] == 0.3
    assert "rho_out" not in config("hcl").loss.params


def test_every_registered_strategy_is_compared_by_default():
    import hardneg

    assert compare_cmd.default_strategies() == hardneg.list_losses()
    assert compare_cmd.parse_strategies(None) == hardneg.list_losses()
    assert compare_cmd.parse_strategies(" hcl, ring,") == ["hcl", "ring"]
    assert "debiased" in Overrides.parse(["debiased.tau_plus=0.2"]).per_strategy


def test_loss_overrides_go_to_the_strategies_that_have_the_key():
    from hardneg.registry import loss_hparams

    assert config("hcl", "loss.tau_plus=0.05").loss.params["tau_plus"] == 0.05
    assert config("infonce", "loss.tau_plus=0.05").loss.params["tau_plus"] == 0.05
    assert "tau_plus" not in config("ring", "loss.tau_plus=0.05").loss.params  # no debiasing
    assert config("hcl", "hcl.beta=2").loss.params["beta"] == 2
    assert config("unremix", "hcl.beta=2").loss.params["beta"] == loss_hparams("unremix")["beta"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.name=hcl", "--strategies"),
        ("nosuch.key=1", "neither a config section"),
        ("train.epochs", "section.key=value"),
        ("hcl.nosuch=1", "nosuch"),
        ("train.nosuch=1", "nosuch"),
        # went to no run, so every run trained with the default, without a word
        (
            "loss.temprature=0.2",
            "loss.temprature: none of the compared strategies (hcl) has a hyper-parameter "
            "'temprature'; no loss has it (did you mean 'temperature'?)",
        ),
        (
            "loss.rho_out=0.3",
            "loss.rho_out: none of the compared strategies (hcl) has a hyper-parameter "
            "'rho_out'; only ring has it",
        ),
        ("ring.rho_out=0.3", "ring.rho_out: ring is not among the compared strategies (hcl)"),
        ("hcl.rho_out=0.3", "hcl.rho_out: hcl has no hyper-parameter 'rho_out'; it has "),
        ("hcl.bta=2", "hcl.bta: hcl has no hyper-parameter 'bta' (did you mean 'beta'?)"),
    ],
)
def test_bad_overrides_fail_before_any_training(override, message, tmp_path, capsys):
    args = ["compare", "--strategies", "hcl", "--seeds", "1", "--out", str(tmp_path), override]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "hcl").exists()


def test_a_setting_some_strategies_refuse_names_them_and_the_strategies_that_run(tmp_path, capsys):
    """framework.views=3 (several positives) is refused by the strategies that read two views'
    features: the comparison names each of them and the --strategies that would run, before
    any training, where it stopped at the first one's error."""
    args = ["compare", "--dataset", "digits", "--framework", "simclr", "--seeds", "1"]
    args += ["--strategies", "infonce,unremix,hcl,potential", "--out", str(tmp_path)]
    assert main([*args, "framework.views=3"]) == 2
    err = capsys.readouterr().err
    assert "2 of the strategies cannot run with these settings (unremix: " in err
    assert "potential: loss 'potential' reads" in err
    assert "compare the others with --strategies infonce,hcl" in err
    assert not any(tmp_path.iterdir())


def test_unknown_strategy_suggests_the_closest_name(tmp_path, capsys):
    assert main(["compare", "--strategies", "hcll", "--out", str(tmp_path)]) == 2
    assert "did you mean 'hcl'" in capsys.readouterr().err


def test_demo_compares_every_registered_strategy_on_mnist1d_with_one_seed(
    monkeypatch, tmp_path, capsys
):
    seen = {}

    def fake_compare(**kwargs):
        seen.update(kwargs)
        return compare_cmd.Outcome([], [], "TABLE", tmp_path / "report.md", 1.0)

    monkeypatch.setattr(demo_cmd, "compare", fake_compare)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert seen["dataset"] == "mnist1d" and list(seen["seeds"]) == [0]
    assert seen["strategies"] == compare_cmd.default_strategies()
    assert set(demo_cmd.DEMO_OVERRIDES) <= set(seen["overrides"])
    out = capsys.readouterr().out
    assert "TABLE" in out and str(tmp_path / "report.md") in out


def test_run_state_reuses_finished_runs_resumes_interrupted_ones_and_refuses_others(tmp_path):
    cfg = config("hcl")
    run = tmp_path / "hcl" / "seed3"
    assert compare_cmd.run_state(run, cfg) == "new"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    assert compare_cmd.run_state(run, cfg) == "interrupted"
    (run / "checkpoints" / "final.pt").write_bytes(b"")
    assert compare_cmd.run_state(run, cfg) == "finished"
    with pytest.raises(ValueError, match="another config"):
        compare_cmd.run_state(run, config("hcl", "hcl.beta=3"))


def test_the_default_base_config_is_the_data_sets_packaged_config_for_the_framework():
    assert compare_cmd.default_base_config("mnist1d", None) == "mnist1d_simclr_hcl"
    assert compare_cmd.default_base_config("mnist1d", "moco").startswith("mnist1d_moco_")
    assert compare_cmd.default_base_config("tiny-imagenet", None).startswith("tiny_imagenet_")
    assert compare_cmd.default_base_config("no-such-data", None) is None


def test_demo_refuses_an_out_folder_holding_other_strategies(tmp_path, capsys):
    """Reusing ``--out`` with fewer strategies would overwrite report.md and the figures with
    the subset: refused before anything is trained."""
    held = tmp_path / "infonce" / "seed0"
    held.mkdir(parents=True)
    (held / "config.yaml").write_text("seed: 0\n")
    report = tmp_path / "report.md"
    report.write_text("the six-strategy report\n")
    code = main(["demo", "--out", str(tmp_path), "--strategies", "hcl", "--reseed", "none"])
    assert code == 2
    err = capsys.readouterr().err
    assert "already holds runs that this comparison does not include (infonce seed0)" in err
    assert "Choose a new --out" in err and "Traceback" not in err
    assert report.read_text() == "the six-strategy report\n"
    assert not (tmp_path / "hcl").exists()


def test_demo_re_seeds_one_strategy_for_the_noise_and_prints_the_verdict(
    monkeypatch, tmp_path, capsys
):
    seen = {}

    def fake_compare(**kwargs):
        seen.update(kwargs)
        verdict = ["- **Best kNN top-1: hcl (80.00%)**", "- Seed noise: `measured`"]
        return compare_cmd.Outcome([], [], "TABLE", tmp_path / "report.md", 1.0, verdict)

    monkeypatch.setattr(demo_cmd, "compare", fake_compare)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert seen["reseed"] == ["infonce"]
    out = capsys.readouterr().out
    assert "Verdict:\n- Best kNN top-1: hcl (80.00%)\n- Seed noise: measured" in out
    assert main(["demo", "--strategies", "hcl", "--out", str(tmp_path)]) == 2
    assert "--reseed infonce is not among --strategies" in capsys.readouterr().err


def test_potential_is_described_by_its_mined_term():
    assert compare_cmd.described_negatives(config("hcl"), "hcl") == 2 * 256 - 2
    assert compare_cmd.described_negatives(config("potential"), "potential") == 256 - 1
    assert (
        compare_cmd.described_negatives(config("potential", framework="moco"), "potential") is None
    )


def test_available_negatives_per_framework():
    assert compare_cmd.available_negatives(config("hcl")) == 2 * 256 - 2  # in-batch, 2B - 2
    assert compare_cmd.available_negatives(config("hcl", framework="moco")) == 4096


def test_one_seed_comparison_advises_more_seeds_of_its_own_data_set(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--dataset", "digits", "--strategies", "infonce,hcl", "--seeds", "1",
            "--epochs", "1", "--out", str(out), "--tsne-points", "0", "--no-linear",
            "data.subset=256", "train.batch_size=128", "train.device=cpu", "model.out_dim=32"]  # fmt: skip
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "`hardneg compare --dataset digits --seeds 3`" in report
    assert "--dataset mnist1d" not in report


def test_ctrl_c_in_a_comparison_is_one_line_and_the_same_command_resumes_it(
    tmp_path, capsys, monkeypatch
):
    """SIGINT during a demo's training printed the trainer's TrainingInterrupted as a stack
    trace (status 1), whose hint, ``hardneg train --resume``, finishes that one run only."""
    import os
    import signal
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _crash import CrashAt

    out = tmp_path / "demo"
    args = ["demo", "--strategies", "infonce,hcl", "--reseed", "none", "--out", str(out),
            "train.epochs=1", *TINY]  # fmt: skip
    with monkeypatch.context() as patch:  # step 1 of the first run asks to stop, as Ctrl-C does
        CrashAt(patch, at=1, action=lambda: os.kill(os.getpid(), signal.SIGINT))
        assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "hardneg train --resume" not in err
    lines = [line for line in err.splitlines() if line.strip() and "SIGINT received" not in line]
    assert lines == [
        f"hardneg demo: interrupted; saved {out}/infonce/seed0/checkpoints/last.pt; run the same "
        f"command again with --out {out} to continue (finished runs are reused)"
    ]
    assert main(args) == 0  # the same command resumes the run and trains the next one
    text = capsys.readouterr().out
    assert f"[1/2] infonce seed 0: resuming 1 epoch -> {out}/infonce/seed0" in text
    assert f"[2/2] hcl seed 0: training 1 epoch -> {out}/hcl/seed0" in text
    assert (out / "report.md").exists()


def test_metrics_rewritten_by_eval_with_other_settings_are_not_reused(tmp_path, capsys):
    """``hardneg eval RUN --report --knn-k 5 --no-linear`` rewrites the run's metrics.json; the
    same comparison again reused it: its table mixed a k = 5 kNN into one titled k = 200 and
    averaged the linear probe over the other seed only, still saying 2 seeds."""
    out = tmp_path / "cmp"
    args = ["compare", "--strategies", "infonce", "--seeds", "2", "--epochs", "1",
            "--out", str(out), "--tsne-points", "0", *TINY]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    before = [
        json.loads((out / "infonce" / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)
    ]
    ckpt = out / "infonce" / "seed1" / "checkpoints" / "final.pt"
    assert (
        main(["eval", str(ckpt), "--report", "--knn-k", "5", "--no-linear", "--tsne-points", "0"])
        == 0
    )
    assert json.loads((ckpt.parent.parent / "metrics.json").read_text())["knn_k"] == 5
    capsys.readouterr()
    assert main(args) == 0
    again = capsys.readouterr().out
    after = [
        json.loads((out / "infonce" / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)
    ]
    for old, new in zip(before, after, strict=True):
        assert (new["knn_k"], new["knn_top1"], new["linear_top1"]) == (
            old["knn_k"],
            old["knn_top1"],
            old["linear_top1"],
        )

    def table_row(text: str) -> str:
        return text[text.index("strategy  seeds") :].splitlines()[2]

    assert table_row(again) == table_row(first)


def test_ctrl_c_while_a_comparison_evaluates_says_how_to_continue(tmp_path, capsys, monkeypatch):
    """Outside a training loop (evaluating, drawing the report) Ctrl-C left no hint at all."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_cmd, "evaluate_run", interrupted)
    out = tmp_path / "cmp"
    args = ["compare", "--strategies", "infonce", "--seeds", "1", "--epochs", "1",
            "--out", str(out), "--tsne-points", "0", *TINY]  # fmt: skip
    assert main(args) == 130
    assert capsys.readouterr().err == (
        f"hardneg compare: interrupted; run the same command again with --out {out} to continue "
        "(finished runs are reused)\n"
    )
