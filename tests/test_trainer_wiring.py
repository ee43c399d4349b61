"""The trainer's building blocks, each against what it must hand on or return: the run folder and
checkpoint a ``resume`` argument names, the one-line refusal of an unwritable folder on every rank,
the per-rank augmentation generator restored from a checkpoint, the host-side health check of a
step, the stop vote of the ranks, the identity a checkpoint must match, the pre-training split,
the non-finite message and the epoch line.

No training run here: the helpers are called directly (the collectives through a stand-in
``all_reduce`` that plays the other ranks), so each test takes milliseconds.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from _crash import CrashAt, NonFiniteAt, boom
from _same import assert_same

import hardneg.train.trainer as trainer
from hardneg.config import load_config
from hardneg.distributed import DistContext
from hardneg.frameworks import StepOutput
from hardneg.train import train
from hardneg.train.checkpoint import load_checkpoint, save_checkpoint
from hardneg.train.logs import TensorBoard

TINY = [
    "data.dataset=digits",
    "data.subset=64",
    "model.backbone=digits_cnn",
    "train.batch_size=16",
    "train.device=cpu",
    "eval.knn=false",
]


def tiny(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def touch_checkpoint(folder: Path) -> Path:
    path = folder / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    return path


class FakeAllReduce:
    """Plays the other ranks of ``torch.distributed.all_reduce``: records each call's operation,
    tensor and device, and combines the local tensor with ``others`` as a MAX would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, others: float) -> None:
        self.others, self.calls = others, []
        monkeypatch.setattr(torch.distributed, "all_reduce", self)

    def __call__(self, tensor, op=torch.distributed.ReduceOp.SUM):
        self.calls.append((op, tensor.clone()))
        tensor.clamp_(min=self.others)


# --------------------------------------------------------------------------- resolve_run_dir


def test_a_fresh_run_gets_a_stamped_folder_under_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    before = datetime.now().replace(microsecond=0)
    run_dir, resume_path = trainer.resolve_run_dir(tiny("loss.name=hcl"), None, None)
    after = datetime.now()
    assert resume_path is None
    assert run_dir.parent == Path("runs")
    found = re.fullmatch(r"digits-simclr-hcl-(\d{8}-\d{6})", run_dir.name)
    assert found, run_dir.name
    stamp = datetime.strptime(found.group(1), "%Y%m%d-%H%M%S")
    assert before <= stamp <= after + timedelta(seconds=1)
    # a given folder is taken as it is, as a Path
    assert trainer.resolve_run_dir(tiny(), str(tmp_path / "mine"), False) == (
        tmp_path / "mine",
        None,
    )


def test_resume_true_reads_the_last_checkpoint_of_the_given_folder(tmp_path):
    with pytest.raises(ValueError) as err:
        trainer.resolve_run_dir(tiny(), None, True)
    assert str(err.value) == "resume=True needs the run_dir to resume (or give a checkpoint path)"
    last = touch_checkpoint(tmp_path / "run")
    assert trainer.resolve_run_dir(tiny(), tmp_path / "run", True) == (tmp_path / "run", last)


def test_resume_from_a_run_folder_continues_in_that_folder_unless_another_is_given(tmp_path):
    last = touch_checkpoint(tmp_path / "run")
    assert trainer.resolve_run_dir(tiny(), None, tmp_path / "run") == (tmp_path / "run", last)
    assert trainer.resolve_run_dir(tiny(), tmp_path / "new", str(tmp_path / "run")) == (
        tmp_path / "new",
        last,
    )


def test_resume_from_a_checkpoint_path_continues_in_its_run_folder(monkeypatch, tmp_path):
    last = touch_checkpoint(tmp_path / "run")
    assert trainer.resolve_run_dir(tiny(), None, last) == (tmp_path / "run", last)
    assert trainer.resolve_run_dir(tiny(), tmp_path / "new", last) == (tmp_path / "new", last)
    # a checkpoint outside a checkpoints/ folder belongs to no run folder: a fresh stamped one
    loose = tmp_path / "elsewhere" / "weights.pt"
    loose.parent.mkdir()
    loose.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    run_dir, resume_path = trainer.resolve_run_dir(tiny(), None, loose)
    assert resume_path == loose and run_dir.parent == Path("runs")


def test_a_used_folder_or_a_missing_checkpoint_is_refused(tmp_path):
    touch_checkpoint(tmp_path / "used")
    with pytest.raises(ValueError) as err:
        trainer.resolve_run_dir(tiny(), tmp_path / "used", None)
    assert str(err.value) == (
        f"{tmp_path / 'used'} already holds a run (checkpoints/last.pt); continue it with "
        "--resume or choose another --run-dir"
    )
    # a folder with other files (but no checkpoints/last.pt) is fine
    (tmp_path / "other" / "checkpoints").mkdir(parents=True)
    (tmp_path / "other" / "checkpoints" / "final.pt").write_bytes(b"")
    assert trainer.resolve_run_dir(tiny(), tmp_path / "other", None) == (tmp_path / "other", None)
    missing = tmp_path / "gone" / "checkpoints" / "last.pt"
    with pytest.raises(FileNotFoundError) as err:
        trainer.resolve_run_dir(tiny(), None, missing)
    assert str(err.value) == f"cannot resume: checkpoint {missing} does not exist"


# ----------------------------------------------------------------------------- check_run_dir


def test_an_unwritable_run_folder_is_refused_by_rank_0_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "run"
    with pytest.raises(ValueError) as err:
        trainer.check_run_dir(bad, DistContext(), torch.device("cpu"))
    assert (
        str(err.value)
        == f"cannot use the run folder {bad}: {tmp_path / 'file'} is a file, not a folder"
    )
    trainer.check_run_dir(tmp_path / "fine", DistContext(), torch.device("cpu"))  # no error
    # another rank of a run without a process group does not look at the folder
    trainer.check_run_dir(bad, DistContext(rank=1, is_main=False), torch.device("cpu"))


def test_every_rank_stops_when_rank_0_cannot_write_the_run_folder(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "run"
    other = DistContext(rank=1, world_size=2, is_main=False, enabled=True)
    reduce = FakeAllReduce(monkeypatch, others=1.0)  # rank 0 reports a problem
    with pytest.raises(ValueError) as err:
        trainer.check_run_dir(tmp_path / "fine", other, torch.device("cpu"))
    assert str(err.value) == f"rank 0 cannot write the run folder {tmp_path / 'fine'}"
    ((op, flag),) = reduce.calls
    assert op == torch.distributed.ReduceOp.MAX and flag.tolist() == [0.0]  # this rank: none
    # rank 0 raises its own reason, having told the others (flag 1)
    main = DistContext(rank=0, world_size=2, is_main=True, enabled=True)
    reduce = FakeAllReduce(monkeypatch, others=0.0)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        trainer.check_run_dir(bad, main, torch.device("cpu"))
    ((op, flag),) = reduce.calls
    assert op == torch.distributed.ReduceOp.MAX and flag.tolist() == [1.0]
    # nobody has a problem: nobody raises
    FakeAllReduce(monkeypatch, others=0.0)
    trainer.check_run_dir(tmp_path / "fine", main, torch.device("cpu"))
    trainer.check_run_dir(tmp_path / "fine", other, torch.device("cpu"))


# -------------------------------------------------------------------- restore_rank_generator


def test_each_rank_gets_its_own_augmentation_state_back():
    """Every rank, not only rank 0: the row of a stacked checkpoint tensor is a view at an offset,
    and ``Generator.set_state`` of such a view crashed the process (segmentation fault, torch
    2.14) before the trainer copied the row."""
    states = torch.stack([torch.Generator().manual_seed(s).get_state() for s in (11, 12, 13)])
    for rank in range(3):
        generator = torch.Generator().manual_seed(99)
        ctx = DistContext(rank=rank, world_size=3, is_main=rank == 0)
        trainer.restore_rank_generator(states, generator, ctx)
        assert torch.equal(generator.get_state(), states[rank])


def test_another_number_of_ranks_reseeds_each_rank_from_the_global_generator():
    states = torch.stack([torch.Generator().manual_seed(s).get_state() for s in (11, 12)])
    seeds = []
    for rank in range(3):
        torch.manual_seed(5)  # the global generator, restored from the checkpoint before this
        expected = int(torch.randint(0, 2**62, ())) + rank
        torch.manual_seed(5)
        generator = torch.Generator().manual_seed(99)
        trainer.restore_rank_generator(states, generator, DistContext(rank=rank, world_size=3))
        assert generator.initial_seed() == expected
        seeds.append(generator.initial_seed())
    assert seeds[1] == seeds[0] + 1 and seeds[2] == seeds[0] + 2  # one stream per rank


# ------------------------------------------------------------------------------ step_health


@pytest.mark.parametrize(
    ("loss", "embedding", "finite"),
    [
        (2.5, 0.0, True),
        (float("nan"), 0.0, False),
        (float("inf"), 0.0, False),
        (2.5, float("nan"), False),
        (2.5, float("-inf"), False),
    ],
)
def test_a_step_is_healthy_when_its_loss_and_embeddings_are_finite(loss, embedding, finite):
    embeddings = torch.ones(4, 3)
    embeddings[2, 1] = embedding
    out = StepOutput(loss=torch.tensor(loss, requires_grad=True), embeddings=embeddings)
    value, ok = trainer.step_health(out)
    assert ok is finite
    assert value == loss or (value != value and loss != loss)  # the loss itself (NaN too)


# --------------------------------------------------------------------------- stop_requested


def test_one_process_stops_when_it_got_the_signal(monkeypatch):
    stop = trainer.StopSignal()
    assert trainer.stop_requested(stop, DistContext(), torch.device("cpu")) is False
    stop.requested = True
    assert trainer.stop_requested(stop, DistContext(), torch.device("cpu")) is True


def test_every_rank_stops_when_any_rank_got_the_signal(monkeypatch):
    ctx = DistContext(rank=1, world_size=2, is_main=False, enabled=True)
    stop = trainer.StopSignal()
    for mine, others, expected in [(False, 1.0, True), (True, 0.0, True), (False, 0.0, False)]:
        stop.requested = mine
        reduce = FakeAllReduce(monkeypatch, others=others)
        assert trainer.stop_requested(stop, ctx, torch.device("cpu")) is expected
        ((op, flag),) = reduce.calls
        assert op == torch.distributed.ReduceOp.MAX and flag.tolist() == [float(mine)]


# ---------------------------------------------------------------------------------- run_meta


def test_a_checkpoint_must_match_the_identity_and_the_state_shaping_settings():
    config = tiny(
        "framework.name=moco",
        "framework.momentum=0.9",
        "loss.name=hcl",
        "loss.beta=0.7",
        "data.split=train",
        "data.image_size=8",
    )
    meta = trainer.run_meta(config)
    assert meta["framework"] == "moco" and meta["loss"] == "hcl" and meta["dataset"] == "digits"
    assert meta["loss_params"] == dict(config.loss.params) and meta["loss_params"]["beta"] == 0.7
    assert meta["framework_params"]["momentum"] == 0.9
    assert meta["framework_params"]["queue_size"] == config.framework.queue_size
    assert "name" not in meta["framework_params"] and "shuffle_bn" not in meta["framework_params"]
    # bn_splits shapes no state, and checkpoints from before it existed must still resume
    assert "bn_splits" not in meta["framework_params"]
    assert meta["split"] == "train" and meta["subset"] == 64 and meta["image_size"] == 8
    assert meta["batch_size"] == 16


# ----------------------------------------------------------------------- load_pretrain_split


def test_the_pretraining_split_is_the_configured_one_cut_to_the_first_subset_images():
    from hardneg.data import dataset_info, load_dataset

    info = dataset_info("digits")
    full = load_dataset("digits", "train")
    data = trainer.load_pretrain_split(tiny("data.subset=40"), info)
    assert len(data) == 40 and torch.equal(data.inputs, full.inputs[:40])
    assert torch.equal(data.labels, full.labels[:40])
    everything = trainer.load_pretrain_split(tiny("data.subset=null"), info)
    assert len(everything) == len(full)
    test = load_dataset("digits", "test")
    chosen = trainer.load_pretrain_split(tiny("data.split=test", "data.subset=null"), info)
    assert torch.equal(chosen.inputs, test.inputs)


def test_the_pretraining_split_is_loaded_with_the_data_settings(monkeypatch, tmp_path):
    import hardneg.data as data_module

    calls = []
    load = data_module.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return load(*args, **kwargs)

    monkeypatch.setattr(data_module, "load_dataset", spy)
    info = data_module.dataset_info("digits")
    config = tiny(f"data.data_dir={tmp_path}", "data.download=true", "data.image_size=6")
    trainer.load_pretrain_split(config, info)
    # digits have a native size: they are loaded at it (the augmentation makes 6 px views)
    assert calls == [
        (("digits", "train"), {"data_dir": str(tmp_path), "download": True, "image_size": None})
    ]
    # the load size is decode_size's answer for the configured view size (a data set without a
    # native size, as imagefolder, is resized at load)
    monkeypatch.setattr(data_module, "decode_size", lambda name, size: ("decoded", name, size))
    loaded = load("digits", "train")
    monkeypatch.setattr(data_module, "load_dataset", lambda *a, **kw: calls.append(kw) or loaded)
    calls.clear()
    assert len(trainer.load_pretrain_split(config, info)) == 64
    assert calls == [
        {"data_dir": str(tmp_path), "download": True, "image_size": ("decoded", "digits", 6)}
    ]


# ----------------------------------------------------------------------- messages and lines


def step_output(loss: float, embedding: float = 0.0) -> StepOutput:
    embeddings = torch.zeros(2, 2)
    embeddings[0, 0] = embedding
    return StepOutput(loss=torch.tensor(loss), embeddings=embeddings)


def test_the_non_finite_message_names_the_step_the_culprit_and_the_way_out(tmp_path):
    from types import SimpleNamespace

    def config(loss: str, params: dict, framework: str):
        return SimpleNamespace(
            loss=SimpleNamespace(name=loss, params=params),
            framework=SimpleNamespace(name=framework),
        )

    last = touch_checkpoint(tmp_path)
    hcl = config("hcl", {"beta": 0.5, "tau_plus": 0.1}, "moco")
    message = trainer.nonfinite_message(hcl, step_output(float("nan")), 7, (1.25, 6), last)
    assert message == (
        "training stopped at step 7: the loss became NaN/Inf with loss 'hcl' (beta=0.5, "
        "tau_plus=0.1) in framework 'moco'; the last finite loss was 1.25 at step 6; the last "
        f"good checkpoint {last} is intact (resume with --resume). Try a lower optim.lr, "
        "precision=fp32, or train.nonfinite=skip to skip such steps"
    )
    plain = config("infonce", {}, "simclr")
    missing = tmp_path / "none.pt"
    message = trainer.nonfinite_message(plain, step_output(1.0, float("inf")), 0, None, missing)
    assert message == (
        "training stopped at step 0: the embeddings became NaN/Inf with loss 'infonce' in "
        "framework 'simclr'; no step had a finite loss; no checkpoint was written yet. Try a "
        "lower optim.lr, precision=fp32, or train.nonfinite=skip to skip such steps"
    )


def test_the_interruption_carries_its_message_and_checkpoint(tmp_path):
    err = trainer.TrainingInterrupted("stopped here", tmp_path / "last.pt")
    assert str(err) == "stopped here" and err.checkpoint == tmp_path / "last.pt"
    assert isinstance(err, KeyboardInterrupt)


def test_the_epoch_line_shows_the_main_columns_in_order():
    row = {
        "images_per_s": 1234.5678,
        "epoch": 12345,
        "lr": 0.1,
        "false_negative_mass": 0.012345,
        "loss": 2.345678,
        "effective_negatives": 17.0,
        "knn_top1": 55.55555,
    }
    assert trainer.format_row(row) == (
        "epoch=12345  loss=2.346  knn_top1=55.56  effective_negatives=17  "
        "false_negative_mass=0.01235  images_per_s=1235"
    )
    assert trainer.format_row({"epoch": 3}) == "epoch=3"


def test_a_file_that_is_not_a_training_checkpoint_is_refused_by_load_backbone(tmp_path):
    for payload in ({"model": {}}, {"config": "text", "backbone_args": {}}, {"config": {}}):
        path = tmp_path / "other.pt"
        save_checkpoint(path, payload)
        with pytest.raises(ValueError) as err:
            trainer.load_backbone(path)
        assert str(err.value) == f"{path} is not a hardneg training checkpoint"
        path.unlink()


# ------------------------------------------------------------------ the loop, in tiny runs
# (digits, 64 images, batch 16: 4 steps per epoch; under a second per run)

RUN = ["model.head_hidden=32", "model.out_dim=16", "train.epochs=1", "train.threads=1"]
RUN += ["train.diagnostics_every=0", "framework.bank_negatives=32"]


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(*overrides: str):
    return tiny(*RUN, *overrides)


class Generators:
    """Records, before each step, the state of the loss generator the framework is handed and of
    the augmentation generator (its first draw of the step), and the dataset indices."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import hardneg.augment as augment_module

        self.loss: list[torch.Tensor] = []
        self.augment: list[torch.Tensor] = []
        self.indices: list[list[int]] = []
        build_model, build_augmentation = trainer.build_model, augment_module.build_augmentation

        def before_forward(module, args, kwargs):
            self.loss.append(kwargs["generator"].get_state().clone())
            self.indices.append(kwargs["index"].tolist())
            self.augment.append(self._first)
            self._first = None

        def spy_model(*args, **kwargs):
            model = build_model(*args, **kwargs)
            model.register_forward_pre_hook(before_forward, with_kwargs=True)
            return model

        def record(module, args, kwargs):
            self._calls += 1
            if self._calls > 1 and self._first is None:  # call 1 is the size probe
                self._first = kwargs["generator"].get_state().clone()

        def spy_augmentation(*args, **kwargs):
            augment = build_augmentation(*args, **kwargs)
            augment.register_forward_pre_hook(record, with_kwargs=True)
            self._calls, self._first = 0, None
            return augment

        monkeypatch.setattr(trainer, "build_model", spy_model)
        monkeypatch.setattr(augment_module, "build_augmentation", spy_augmentation)


def test_a_resumed_run_draws_from_the_generators_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """Mid-epoch resume of a memory bank (its negatives are drawn with the loss generator): at
    every resumed step the loss and augmentation generators are where the uninterrupted run had
    them, and the checkpoint says 1 epoch and 3 steps done (32 images: 2 steps per epoch)."""
    overrides = (
        "framework.name=memory_bank",
        "data.subset=32",
        "train.epochs=2",
        "train.checkpoint_every_steps=1",
    )
    with monkeypatch.context() as patch:
        full = Generators(patch)
        train(run(*overrides), run_dir=tmp_path / "full", progress_bar=False)
    assert len(full.loss) == 4
    assert not torch.equal(full.loss[0], full.loss[3])  # the bank drew from it
    assert not torch.equal(full.augment[0], full.augment[3])
    with monkeypatch.context() as patch:
        CrashAt(patch, at=3, action=boom)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(run(*overrides), run_dir=tmp_path / "cut", progress_bar=False)
    payload = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert payload["step"] == 3 and payload["epoch"] == 1 and isinstance(payload["epoch"], int)
    resumed = Generators(monkeypatch)
    train(run(*overrides), run_dir=tmp_path / "cut", progress_bar=False, resume=True)
    assert len(resumed.loss) == 1
    assert torch.equal(resumed.loss[0], full.loss[3])
    assert torch.equal(resumed.augment[0], full.augment[3])


def test_an_fp16_run_keeps_and_resumes_its_loss_scale(tmp_path, monkeypatch):
    """With ``precision=fp16`` the gradient scaler is on (and off in fp32), its state is saved,
    and a resumed run continues with the saved scale (here set to 1024 in the checkpoint)."""
    dtypes = []
    build_model = trainer.build_model

    def spy_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.backbone.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        return model

    monkeypatch.setattr(trainer, "build_model", spy_model)
    fp16 = ("train.precision=fp16", "optim.lr=0.01", "data.subset=32")
    train(run(*fp16), run_dir=tmp_path, progress_bar=False)
    assert dtypes and set(dtypes) == {torch.float16}  # the forward ran under fp16 autocast
    last = tmp_path / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    assert payload["scaler"]["scale"] == 2.0**16  # the default initial scale: no overflow
    payload["scaler"]["scale"] = 1024.0
    torch.save(payload, last)
    train(run(*fp16, "train.epochs=2"), run_dir=tmp_path, progress_bar=False, resume=True)
    assert load_checkpoint(tmp_path / "checkpoints" / "final.pt")["scaler"]["scale"] == 1024.0
    dtypes.clear()
    fp32 = train(run("data.subset=32"), run_dir=tmp_path / "fp32", progress_bar=False)
    assert dtypes and set(dtypes) == {torch.float32}  # no autocast
    fp32 = load_checkpoint(fp32.checkpoint)
    assert fp32["scaler"] == {}  # a disabled scaler has no state


def test_the_ranks_split_each_global_batch_and_only_rank_0_writes_or_prints(
    tmp_path, monkeypatch, capsys
):
    """Two ranks (played one after the other, no process group): at every step rank 0 takes the
    first half and rank 1 the second half of the single-process batch; rank 1 writes no file,
    prints nothing, logs nothing and runs no kNN monitor."""
    with monkeypatch.context() as patch:
        single = Generators(patch)
        train(run(), run_dir=tmp_path / "single", progress_bar=False)
    capsys.readouterr()
    halves = []
    knn = ("eval.knn=true", "train.knn_every=1", "train.log_every=1")  # rank 0 logs each step
    for rank in (0, 1):
        ctx = DistContext(rank=rank, world_size=2, is_main=rank == 0, enabled=False)
        with monkeypatch.context() as patch:
            patch.setattr(trainer, "init_distributed", lambda ctx=ctx: ctx)
            spy = Generators(patch)
            result = train(run(*knn), run_dir=tmp_path / f"rank{rank}", progress_bar=False)
        halves.append(spy.indices)
        assert ("knn_top1" in result.history[0]) is (rank == 0)  # only rank 0 evaluates
        printed = capsys.readouterr().out
        if rank == 0:
            assert printed.startswith("epoch=1  loss=")
            assert (tmp_path / "rank0" / "checkpoints" / "final.pt").is_file()
        else:
            assert printed == ""
            assert not (tmp_path / "rank1").exists()
    assert len(single.indices) == 4
    for batch, first, second in zip(single.indices, *halves, strict=True):
        assert first == batch[:8] and second == batch[8:]


def test_the_progress_bar_counts_the_steps_of_the_run(tmp_path, monkeypatch, capsys):
    """On rank 0 with ``progress_bar=True`` and stderr a terminal: a bar over all steps (in
    ``step`` units, starting at the checkpoint's step after a resume) with the loss and
    images/s, then the epoch line."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stream, as a terminal
    bars = []
    bar = trainer.tqdm

    def spy_bar(*args, **kwargs):
        bars.append(kwargs)
        return bar(*args, **kwargs)

    monkeypatch.setattr(trainer, "tqdm", spy_bar)
    start = time.perf_counter()
    result = train(run(), run_dir=tmp_path, progress_bar=True)
    wall = time.perf_counter() - start
    captured = capsys.readouterr()
    assert bars[0]["dynamic_ncols"] is True  # the bar follows a resized terminal
    counts = [int(n) for n in re.findall(r"\| *(\d+)/4 \[", captured.err)]
    assert counts[0] == 0 and max(counts) == 4 and counts[-1] == 4
    assert "step/s" in captured.err or "s/step" in captured.err
    # the last postfix: the last step's loss, and the epoch's images/s so far
    (row,) = result.history
    postfix = re.findall(r"img_s=(\d+), loss=(\d+\.\d{4})\]", captured.err)
    assert postfix and postfix[-1][0] == f"{row['images_per_s']:.0f}"
    assert 0 < row["epoch_time_s"] <= wall
    assert row["images_per_s"] == pytest.approx(64 / row["epoch_time_s"])
    assert captured.out.startswith("epoch=1  loss=")
    train(run("train.epochs=2"), run_dir=tmp_path, progress_bar=True, resume=True)
    captured = capsys.readouterr()
    assert "4/8" in captured.err and "8/8" in captured.err and "0/8" not in captured.err
    assert captured.out.startswith("epoch=2  loss=")
    # a bar only when asked for
    train(run(), run_dir=tmp_path / "quiet", progress_bar=False)
    assert capsys.readouterr().err == ""


class FirstStep(Exception):
    """Raised by the spy at the first forward: the set-up is all these tests need."""


def first_step_generators(monkeypatch: pytest.MonkeyPatch, ctx: DistContext, tmp_path: Path):
    """(loss generator state, augmentation generator state) at the first step of rank ``ctx``,
    neither drawn from yet; the run stops there."""
    spy = Generators(monkeypatch)
    monkeypatch.setattr(trainer, "init_distributed", lambda: ctx)
    build_model = trainer.build_model  # the spy's

    def stop_at_first_step(*args, **kwargs):
        model = build_model(*args, **kwargs)

        def stop(module, args, kwargs):
            raise FirstStep

        model.register_forward_pre_hook(stop, with_kwargs=True)  # after the spy's hook
        return model

    monkeypatch.setattr(trainer, "build_model", stop_at_first_step)
    with pytest.raises(FirstStep):
        train(run(), run_dir=tmp_path / f"rank{ctx.rank}", progress_bar=False)
    return spy.loss[0], spy.augment[0]


def test_every_rank_shares_the_loss_stream_and_draws_its_own_augmentations(tmp_path, monkeypatch):
    """Four ranks: the loss generator starts in the same state on every rank (the ranks draw the
    same negatives of the global batch); each augmentation generator starts in its own state,
    different from every other rank's and from the loss generator's (no two streams repeat each
    other's draws)."""
    starts = []
    for rank in range(4):
        ctx = DistContext(rank=rank, world_size=4, is_main=rank == 0, enabled=False)
        with monkeypatch.context() as patch:
            starts.append(first_step_generators(patch, ctx, tmp_path))
    loss_states = [loss for loss, _ in starts]
    augment_states = [augment for _, augment in starts]
    assert all(torch.equal(state, loss_states[0]) for state in loss_states)
    streams = [loss_states[0], *augment_states]
    for i, a in enumerate(streams):
        for b in streams[i + 1 :]:
            assert not torch.equal(a, b)


class Board(TensorBoard):
    """TensorBoard that records what the trainer writes (and still writes it)."""

    opened: list[tuple[Path, int | None]] = []
    scalar_rows: list[tuple[str, dict, int]] = []
    histogram_rows: list[tuple[object, int]] = []

    def __init__(self, directory, purge_step=None):
        Board.opened.append((directory, purge_step))
        super().__init__(directory, purge_step=purge_step)

    def scalars(self, prefix, values, step):
        Board.scalar_rows.append((prefix, dict(values), step))
        super().scalars(prefix, values, step)

    def histograms(self, histograms, step):
        Board.histogram_rows.append((histograms, step))
        super().histograms(histograms, step)


@pytest.fixture
def board(monkeypatch):
    monkeypatch.setattr(Board, "opened", [])
    monkeypatch.setattr(Board, "scalar_rows", [])
    monkeypatch.setattr(Board, "histogram_rows", [])
    monkeypatch.setattr(trainer, "TensorBoard", Board)
    return Board


def test_checkpoints_logs_and_knn_follow_their_schedules(tmp_path, monkeypatch, board):
    """4 epochs of 2 steps, ``checkpoint_every=3`` epochs, ``checkpoint_every_steps=3``,
    ``knn_every=3``, scalars every step, diagnostics every step: ``last.pt`` after step 3
    (mid-epoch), after epochs 3 and 4 (the end), then ``final.pt``; kNN after epochs 3 and 4;
    TensorBoard gets the step's loss and rate after every step, the epoch's row and hardness
    histograms after every epoch; a resumed run's writer drops what followed its checkpoint."""
    saved = []
    save = trainer.save_checkpoint

    def spy_save(path, payload):
        saved.append((path.name, payload["step"], payload["epoch"]))
        return save(path, payload)

    monkeypatch.setattr(trainer, "save_checkpoint", spy_save)
    overrides = [
        "data.subset=32",
        "train.checkpoint_every=3",
        "train.checkpoint_every_steps=3",
        "train.log_every=1",
        "train.diagnostics_every=1",
        "eval.knn=true",
        "train.knn_every=3",
    ]
    folder = tmp_path / "runs" / "nested"  # its parent does not exist yet
    result = train(run(*overrides, "train.epochs=4"), run_dir=folder, progress_bar=False)
    assert saved == [("last.pt", 3, 1), ("last.pt", 6, 3), ("last.pt", 8, 4), ("final.pt", 8, 4)]
    assert result.run_dir == folder and result.checkpoint == folder / "checkpoints" / "final.pt"
    history = result.history
    assert [(row["epoch"], row["step"]) for row in history] == [(1, 2), (2, 4), (3, 6), (4, 8)]
    assert ["knn_top1" in row for row in history] == [False, False, True, True]
    assert result.metrics == history[-1] and result.metrics is not history[-1]
    assert board.opened == [(folder / "tb", None)]
    rows = {}
    for prefix in ("train", "epoch", "diagnostics"):
        rows[prefix] = [(values, step) for p, values, step in board.scalar_rows if p == prefix]
    assert [step for _, step in rows["train"]] == list(range(1, 9))
    assert all(sorted(values) == ["loss", "lr"] for values, _ in rows["train"])
    step_losses = [values["loss"] for values, _ in rows["train"]]
    for epoch, row in enumerate(history):  # the epoch's loss is the mean of its steps'
        assert row["loss"] == pytest.approx(sum(step_losses[2 * epoch : 2 * epoch + 2]) / 2)
    assert [step for _, step in rows["epoch"]] == [2, 4, 6, 8]
    for (values, _), row in zip(rows["epoch"], history, strict=True):
        assert sorted(values) == sorted(row) and values["epoch"] == row["epoch"]
    assert [step for _, step in rows["diagnostics"]] == list(range(8))
    assert [step for _, step in board.histogram_rows] == [2, 4, 6, 8]
    assert all(histograms is not None for histograms, _ in board.histogram_rows)
    train(run(*overrides, "train.epochs=5"), run_dir=folder, progress_bar=False, resume=True)
    assert board.opened[-1] == (folder / "tb", 8)


def test_the_knn_monitor_runs_every_knn_every_epochs_and_at_the_end(tmp_path):
    overrides = ("data.subset=32", "train.epochs=2", "eval.knn=true")
    every = train(run(*overrides, "train.knn_every=1"), run_dir=tmp_path / "a", progress_bar=False)
    assert ["knn_top1" in row for row in every.history] == [True, True]
    end = train(run(*overrides, "train.knn_every=0"), run_dir=tmp_path / "b", progress_bar=False)
    assert ["knn_top1" in row for row in end.history] == [False, True]
    off = train(
        run("data.subset=32", "train.knn_every=1"), run_dir=tmp_path / "c", progress_bar=False
    )
    assert "knn_top1" not in off.history[0]


def test_a_stop_request_saves_the_step_and_names_the_resume_command(tmp_path, monkeypatch):
    votes = iter([False, False, True])
    monkeypatch.setattr(trainer, "stop_requested", lambda stop, ctx, device: next(votes))
    with pytest.raises(trainer.TrainingInterrupted) as err:
        train(run("train.epochs=2"), run_dir=tmp_path, progress_bar=False)
    last = tmp_path / "checkpoints" / "last.pt"
    assert str(err.value) == (
        f"interrupted at step 3/8; saved {last}; continue with: hardneg train --resume {last}"
    )
    assert err.value.checkpoint == last and load_checkpoint(last)["step"] == 3


def test_each_step_hands_the_framework_its_progress_labels_and_diagnostics_flag(
    tmp_path, monkeypatch
):
    from hardneg.data import load_dataset

    seen = []
    build_model = trainer.build_model

    def spy_model(*args, **kwargs):
        model = build_model(*args, **kwargs)

        def record(module, args, kwargs):
            seen.append(
                (kwargs["index"], kwargs["labels"], kwargs["progress"], kwargs["diagnostics"])
            )

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    monkeypatch.setattr(trainer, "build_model", spy_model)
    train(run("train.diagnostics_every=2"), run_dir=tmp_path, progress_bar=False)
    labels = load_dataset("digits", "train").labels[:64]
    assert [progress for _, _, progress, _ in seen] == [0.0, 0.25, 0.5, 0.75]
    assert [flag for _, _, _, flag in seen] == [True, False, True, False]
    for index, step_labels, _, _ in seen:
        assert_same(step_labels, labels[index])


def test_a_non_finite_step_is_skipped_reported_and_still_advances_the_schedule(
    tmp_path, monkeypatch, capsys, caplog
):
    """``nonfinite=skip``: the optimizer does not step at the bad step (2 of 4), the schedule
    does (step 3 gets step 3's warm-up rate), the epoch counts one skipped step."""
    lrs = []
    build_optimizer = trainer.build_optimizer

    def spy_optimizer(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"])
        )
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", spy_optimizer)
    NonFiniteAt(monkeypatch, at=2)  # the third call, which the warning names step 2
    config = run("train.nonfinite=skip", "optim.lr=0.1", "optim.warmup_epochs=1")
    result = train(config, run_dir=tmp_path, progress_bar=False)
    assert lrs == pytest.approx([0.025, 0.05, 0.1])
    assert result.history[0]["skipped_steps"] == 1
    # a warning (shown by `hardneg train --quiet` too), not an epoch line on stdout
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("hardneg.train.trainer", "WARNING", "step 2: non-finite loss or embeddings, step skipped")
    ]
    assert capsys.readouterr().out.startswith("epoch=1  loss=")


def test_with_a_process_group_the_loop_calls_the_ddp_wrapper_of_the_framework(
    tmp_path, monkeypatch
):
    """One rank of an enabled group (collectives played by stand-ins): the framework is wrapped
    once for the run's device and every step goes through the wrapper; the folder check and one
    stop vote per step go through the MAX all-reduce."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    wrapped = []

    def wrap_ddp(module, device):
        wrapped.append((module, device, Wrapper(module)))
        return wrapped[-1][2]

    built = []
    build_model = trainer.build_model

    def spy_model(*args, **kwargs):
        built.append(build_model(*args, **kwargs))
        return built[-1]

    selected = []
    select_device = trainer.select_device

    def spy_select(*args):
        selected.append(args)
        return select_device(*args)

    monkeypatch.setattr(trainer, "build_model", spy_model)
    monkeypatch.setattr(trainer, "wrap_ddp", wrap_ddp)
    monkeypatch.setattr(trainer, "select_device", spy_select)
    ctx = DistContext(rank=0, world_size=1, is_main=True, enabled=True)
    monkeypatch.setattr(trainer, "init_distributed", lambda: ctx)
    reduce = FakeAllReduce(monkeypatch, others=0.0)
    train(run(), run_dir=tmp_path, progress_bar=False)
    assert selected == [("cpu", ctx.device)]  # with a group, "auto" would take the group's device
    ((module, device, wrapper),) = wrapped
    assert module is built[0] and device == torch.device("cpu") and wrapper.calls == 4
    assert [op for op, _ in reduce.calls] == [torch.distributed.ReduceOp.MAX] * 5


# ------------------------------------------------------- model, evaluation splits, kNN monitor


def test_the_model_is_the_configured_backbone_head_and_loss_without_per_call_checks():
    config = tiny(
        "framework.name=memory_bank",
        "model.head_hidden=24",
        "model.out_dim=12",
        "loss.name=hcl",
        "loss.beta=0.7",
    )
    args = {"name": "digits_cnn", "in_channels": 1, "image_size": 8}
    model = trainer.build_model(config, args, 40)
    linears = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[0].in_features == model.backbone.out_dim
    assert linears[0].out_features == 24 and linears[-1].out_features == 12
    assert model.bank.shape == (40, 12)  # one entry per training image
    assert model.loss.strategy.beta == 0.7
    assert model.loss.check_inputs is False  # the loop checks loss and embeddings itself
    checked = trainer.build_model(tiny("loss.check_inputs=true"), args, 40)
    assert checked.loss.check_inputs is True  # unless the config asks for them


def test_the_eval_splits_reuse_the_pretraining_split_only_when_it_is_whole():
    from hardneg.data import ArrayDataset, dataset_info, load_dataset

    info = dataset_info("digits")
    full, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    train_split, test_split = trainer.load_eval_splits(tiny("data.subset=null"), info, full)
    assert train_split is full  # not loaded twice
    assert torch.equal(test_split.inputs, test.inputs) and torch.equal(
        test_split.labels, test.labels
    )
    cut = full.subset(slice(0, 64))
    train_split, _ = trainer.load_eval_splits(tiny("data.subset=64"), info, cut)
    assert len(train_split) == len(full)  # the whole labelled split, not the subset
    _, test_split = trainer.load_eval_splits(
        tiny("data.split=test", "data.subset=null"), info, test
    )
    assert test_split is test
    # unlabeled images (label -1, as STL-10's) are left out; class 0 is kept
    labels = full.labels.clone()
    labels[:5] = -1
    mixed = ArrayDataset(full.inputs, labels, 10, "image", "digits", "train")
    train_split, _ = trainer.load_eval_splits(tiny("data.subset=null"), info, mixed)
    assert torch.equal(train_split.labels, labels[5:]) and 0 in train_split.labels.tolist()


def test_the_knn_monitor_finds_each_test_image_among_the_train_images():
    """Test split = train split, k = 1: each image's nearest neighbour is itself (100 %); with
    every train image a neighbour and near-equal weights (temperature 100) the vote is the
    majority class of the set, wrong for most images."""
    from hardneg.data import load_dataset

    data = load_dataset("digits", "train").subset(slice(0, 30))
    flat, cpu = torch.nn.Flatten(), torch.device("cpu")
    nearest = tiny("eval.knn_k=1", "eval.knn_temperature=100", "eval.batch_size=7")
    result = trainer.knn_monitor(flat, (data, data), nearest, cpu)
    assert result == {"knn_top1": 100.0, "knn_top5": 100.0}
    everyone = tiny("eval.knn_k=30", "eval.knn_temperature=100")
    assert trainer.knn_monitor(flat, (data, data), everyone, cpu)["knn_top1"] < 50.0


# ------------------------------------------------------------------------------- set-up


def test_a_dict_config_trains_with_its_threads_and_the_default_bar(tmp_path, monkeypatch, capsys):
    # a stand-in records the thread count: a real second intra-op thread would stay in this
    # process (OpenMP), and a process forked from it (mutmut's workers) could hang in OpenMP
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    config = run("data.subset=16", "train.threads=3").to_dict()  # one step per epoch
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is drawn on terminals
    result = train(config, run_dir=tmp_path)
    # the trainer's call comes first; the augmentations then switch to one thread and back
    # around each call (augment.image.intra_op_threads) unless the process already has one
    assert threads[:1] == [3] and set(threads[1:]) <= {1, torch.get_num_threads()}
    assert result.history[0]["step"] == 1 and "1/1" in capsys.readouterr().err


def test_the_global_batch_must_split_over_the_ranks_and_fit_in_the_data(tmp_path, monkeypatch):
    ctx = DistContext(rank=0, world_size=3, is_main=True, enabled=False)
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "init_distributed", lambda: ctx)
        with pytest.raises(ValueError) as err:
            train(run(), run_dir=tmp_path / "a", progress_bar=False)
    assert str(err.value) == (
        "train.batch_size=16 must be divisible by the number of processes (3); it is the global "
        "batch"
    )
    with pytest.raises(ValueError) as err:
        train(run("data.subset=8"), run_dir=tmp_path / "b", progress_bar=False)
    assert str(err.value) == (
        "train.batch_size=16 is larger than the 8 training images of digits; lower it"
    )


def test_sync_bn_and_channels_last_are_applied_to_the_framework_before_training(
    tmp_path, monkeypatch
):
    """Stand-ins for the process-group helpers: with ``sync_bn`` the device is checked before
    the data are loaded and the framework is converted for the run's device; with
    ``channels_last`` the views and the convolution weights are channels-last."""
    calls = []
    monkeypatch.setattr(trainer, "check_sync_bn", lambda device: calls.append(("check", device)))

    def convert(framework, device):
        calls.append(("convert", framework, device))
        return framework

    monkeypatch.setattr(trainer, "convert_sync_batchnorm", convert)
    layouts = []
    build_model = trainer.build_model

    def spy_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        calls.append(("built", model))

        def record(module, args, kwargs):
            channels_last = torch.channels_last
            weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
            layouts.append(
                all(v.is_contiguous(memory_format=channels_last) for v in args[0])
                and all(w.is_contiguous(memory_format=channels_last) for w in weights)
            )

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    monkeypatch.setattr(trainer, "build_model", spy_model)
    cpu = torch.device("cpu")
    config = run("train.sync_bn=true", "train.channels_last=true", "data.subset=32")
    train(config, run_dir=tmp_path, progress_bar=False)
    assert calls[0] == ("check", cpu)
    assert calls[2] == ("convert", calls[1][1], cpu)
    assert layouts == [True, True]
    calls.clear()
    layouts.clear()
    train(run("data.subset=32"), run_dir=tmp_path / "plain", progress_bar=False)
    assert [call[0] for call in calls] == ["built"] and layouts == [False, False]


def test_a_run_on_the_whole_split_evaluates_on_it_without_reloading_it(tmp_path, monkeypatch):
    """``data.subset`` unset: the kNN monitor's train split is the pre-training split itself
    (digits: 1438 images, 2 steps of 719)."""
    import hardneg.data as data_module

    loads = []
    load = data_module.load_dataset

    def spy(name, split, *args, **kwargs):
        loads.append(split)
        return load(name, split, *args, **kwargs)

    monkeypatch.setattr(data_module, "load_dataset", spy)
    config = run("data.subset=null", "train.batch_size=719", "eval.knn=true")
    result = train(config, run_dir=tmp_path, progress_bar=False)
    assert loads == ["train", "test"] and "knn_top1" in result.history[0]


def test_a_run_without_a_run_dir_gets_a_stamped_folder_named_after_its_set_up(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = run("framework.name=memory_bank", "loss.name=hcl")
    result = train(config, progress_bar=False)
    assert result.run_dir.parent == Path("runs")
    assert re.fullmatch(r"digits-memory_bank-hcl-\d{8}-\d{6}", result.run_dir.name)
    assert (tmp_path / result.checkpoint).is_file()


class Moves:
    """Wraps an object's ``to`` to record the device each call asks for."""

    def __init__(self, obj) -> None:
        self.devices, to = [], obj.to

        def record(*args, **kwargs):
            self.devices.append(args[0] if args else kwargs.get("device"))
            return to(*args, **kwargs)

        obj.to = record


def test_the_set_up_hands_each_builder_the_configured_values_and_the_run_device(
    tmp_path, monkeypatch
):
    """One process without a group: the device is chosen from ``train.device`` alone, and the
    folder check, the size probe, the augmentation and the framework get that device; the
    augmentation is the configured recipe, view size and overrides."""
    import hardneg.augment as augment_module

    calls: dict[str, list] = {"select": [], "check": [], "size": [], "augment": [], "model": []}
    select_device, check_run_dir = trainer.select_device, trainer.check_run_dir
    augmented_size, build_augmentation = trainer.augmented_size, augment_module.build_augmentation
    build_model = trainer.build_model

    def spy_select(*args):
        calls["select"].append(args)
        return select_device(*args)

    def spy_check(run_dir, ctx, device):
        calls["check"].append(device)
        return check_run_dir(run_dir, ctx, device)

    def spy_size(augment, inputs, device):
        calls["size"].append(device)
        return augmented_size(augment, inputs, device)

    def spy_augmentation(*args, **kwargs):
        augment = build_augmentation(*args, **kwargs)
        calls["augment"].append((args, kwargs, Moves(augment)))
        return augment

    def spy_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        calls["model"].append(Moves(model))
        return model

    load_pretrain_split = trainer.load_pretrain_split

    def spy_split(*args):
        data = load_pretrain_split(*args)
        calls["labels"] = Moves(data.labels)  # diagnostics: next to the images
        return data

    monkeypatch.setattr(trainer, "load_pretrain_split", spy_split)
    monkeypatch.setattr(trainer, "select_device", spy_select)
    monkeypatch.setattr(trainer, "check_run_dir", spy_check)
    monkeypatch.setattr(trainer, "augmented_size", spy_size)
    monkeypatch.setattr(augment_module, "build_augmentation", spy_augmentation)
    monkeypatch.setattr(trainer, "build_model", spy_model)
    config = run("augment.recipe=hcl", "augment.flip_p=0.25", "data.image_size=6")
    result = train(config, run_dir=tmp_path, progress_bar=False)
    cpu = torch.device("cpu")
    assert calls["select"] == [("cpu", None)]
    assert calls["check"] == [cpu] and calls["size"] == [cpu]
    args, kwargs, moves = calls["augment"][-1]  # the first may be the config's own check
    assert args == ("digits", 6, "hcl") and kwargs == {"flip_p": 0.25} and moves.devices == [cpu]
    assert calls["model"][0].devices[:1] == [cpu] and calls["labels"].devices == [cpu]
    assert result.history[0]["step"] == 4


def test_the_eval_splits_are_loaded_with_the_data_settings(monkeypatch, tmp_path):
    """A cut pre-training split: both kNN splits are loaded, each with the data settings and the
    load size that ``decode_size`` gives for the configured view size."""
    import hardneg.data as data_module

    info = data_module.dataset_info("digits")
    full = data_module.load_dataset("digits", "train")
    calls = []

    def stand_in(*args, **kwargs):
        calls.append((args, kwargs))
        return full

    monkeypatch.setattr(data_module, "load_dataset", stand_in)
    monkeypatch.setattr(data_module, "decode_size", lambda name, size: ("decoded", name, size))
    config = tiny(f"data.data_dir={tmp_path}", "data.download=true", "data.image_size=6")
    trainer.load_eval_splits(config, info, full.subset(slice(0, 64)))
    settings = {"data_dir": str(tmp_path), "download": True, "image_size": ("decoded", "digits", 6)}
    assert calls == [(("digits", "train"), settings), (("digits", "test"), settings)]


def test_the_knn_monitor_hands_its_transform_features_and_classes_on(monkeypatch):
    """Stand-ins for the evaluation helpers: the configured eval transform, moved to the device,
    extracts the features of both splits with the configured batch size on that device; the
    features and labels go to the device and the kNN vote gets k, temperature and classes."""
    import hardneg.augment as augment_module
    import hardneg.evaluation as evaluation

    class Moved:
        def __init__(self, what) -> None:
            self.what = what

        def to(self, device):
            return ("on", self.what, device)

    transforms, extracted, votes = [], [], []

    def build_eval_transform(*args):
        transforms.append(args)
        return Moved("transform")

    def extract_features(backbone, dataset, transform, batch_size, device):
        extracted.append((backbone, dataset, transform, batch_size, device))
        return Moved(f"{dataset}-features"), Moved(f"{dataset}-labels")

    def weighted_knn(*args, **kwargs):
        votes.append((args, kwargs))
        return {"top1": 1.0, "top5": 5.0}

    class Split:
        def __init__(self, name: str, num_classes: int) -> None:
            self.name, self.num_classes = name, num_classes

        def __str__(self) -> str:
            return self.name

    monkeypatch.setattr(augment_module, "build_eval_transform", build_eval_transform)
    monkeypatch.setattr(evaluation, "extract_features", extract_features)
    monkeypatch.setattr(evaluation, "weighted_knn", weighted_knn)
    device = torch.device("meta")  # any device the stand-ins can tell from the default
    backbone, train_split, test_split = torch.nn.Flatten(), Split("a", 7), Split("b", 9)
    config = tiny(
        "data.image_size=6",
        "augment.recipe=hcl",
        "eval.batch_size=5",
        "eval.knn_k=3",
        "eval.knn_temperature=0.5",
    )
    result = trainer.knn_monitor(backbone, (train_split, test_split), config, device)
    assert result == {"knn_top1": 1.0, "knn_top5": 5.0}
    assert transforms == [("digits", 6, "hcl")]
    moved = ("on", "transform", device)
    assert extracted == [
        (backbone, train_split, moved, 5, device),
        (backbone, test_split, moved, 5, device),
    ]
    features = [
        ("on", f"{name}-{kind}", device) for name in "ab" for kind in ("features", "labels")
    ]
    assert votes == [(tuple(features), {"k": 3, "temperature": 0.5, "num_classes": 7})]
