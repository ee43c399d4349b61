"""The trainer does what its config says, checked against values rather than against a re-run of
itself: the learning rate follows the configured warm-up + cosine schedule step by step, gradient
clipping bounds the norm the optimizer sees, every epoch has its own data order (restored on
resume), every rank draws its own augmentations, and MoCo / the memory bank update their state
by their formulas inside a training run.

Tiny embedded data (digits, 64 images, batch 16: 4 steps per epoch), as in ``test_train.py``.
The spies (optimizer step hooks, forward pre-hooks, a wrapped augmentation) observe the run and
never change it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _crash import CrashAt, boom

import hardneg.augment as augment_module
import hardneg.train.trainer as trainer
from hardneg.config import load_config
from hardneg.distributed import DistContext
from hardneg.frameworks import MemoryBank, MoCo
from hardneg.train import train
from hardneg.train.checkpoint import load_checkpoint
from hardneg.train.logs import TensorBoard

TINY = [
    "data.dataset=digits",
    "data.subset=64",
    "model.backbone=digits_cnn",
    "model.head_hidden=32",
    "model.out_dim=16",
    "train.batch_size=16",
    "train.epochs=1",
    "train.diagnostics_every=0",
    "train.device=cpu",
    "train.threads=1",
    "framework.queue_size=48",
    "framework.bank_negatives=32",
    "eval.knn=false",
]
STEPS_PER_EPOCH = 4


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny(*overrides: str):
    return load_config(None, [*TINY, *overrides])


class Spy:
    """Observes a run: the optimizer's learning rate and gradient norm at every ``step()``, the
    dataset indices of every step, and the framework itself."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lrs: list[float] = []
        self.grad_norms: list[float] = []
        self.indices: list[torch.Tensor] = []
        self.model = None
        self.logged: list[tuple[int, float]] = []  # (step, lr) of the TensorBoard 'train' rows
        build_optimizer, build_model = trainer.build_optimizer, trainer.build_model

        def spy_optimizer(*args, **kwargs):
            optimizer = build_optimizer(*args, **kwargs)
            optimizer.register_step_pre_hook(self._before_step)
            return optimizer

        def spy_model(*args, **kwargs):
            self.model = build_model(*args, **kwargs)
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            return self.model

        scalars = TensorBoard.scalars

        def spy_scalars(board, prefix, values, step):
            if prefix == "train":
                self.logged.append((step, values["lr"]))
            return scalars(board, prefix, values, step)

        monkeypatch.setattr(trainer, "build_optimizer", spy_optimizer)
        monkeypatch.setattr(trainer, "build_model", spy_model)
        monkeypatch.setattr(TensorBoard, "scalars", spy_scalars)

    def _before_step(self, optimizer, args, kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norms = [g.detach().double().norm() for g in grads if g is not None]
        self.grad_norms.append(float(torch.stack(norms).norm()))

    def _before_forward(self, module, args, kwargs):
        self.indices.append(kwargs["index"].clone())

    def epoch_orders(self) -> list[list[int]]:
        """The dataset indices seen, epoch by epoch (64 images per epoch)."""
        flat = torch.cat(self.indices).tolist()
        return [flat[i : i + 64] for i in range(0, len(flat), 64)]


# ------------------------------------------------------------------- learning-rate schedule


def warmup_cosine(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine from ``peak`` to ``floor``
    over the remaining ``total - warmup`` steps (the schedule of methods.md's PSM protocol)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return floor + (peak - floor) * (1 + math.cos(math.pi * progress)) / 2


def test_the_optimizer_steps_with_the_configured_warmup_then_cosine_learning_rate(
    tmp_path, monkeypatch
):
    spy = Spy(monkeypatch)
    config = tiny(
        "optim.name=sgd",
        "optim.lr=0.2",
        "optim.min_lr=0.02",
        "optim.warmup_epochs=1",
        "optim.schedule=cosine",
        "train.epochs=3",
        "train.log_every=1",
    )
    result = train(config, run_dir=tmp_path, progress_bar=False)
    total = 3 * STEPS_PER_EPOCH
    expected = [warmup_cosine(s, 0.2, 0.02, STEPS_PER_EPOCH, total) for s in range(total)]
    assert spy.lrs == pytest.approx(expected, rel=1e-12)
    # the warm-up rises, the cosine falls, and it ends near the floor: not a constant
    assert spy.lrs[0] == pytest.approx(0.05) and spy.lrs[3] == pytest.approx(0.2)
    assert spy.lrs[-1] < 0.03
    # what TensorBoard logs after step s is the rate of the next step, s (0-based)
    after = [warmup_cosine(s, 0.2, 0.02, STEPS_PER_EPOCH, total) for s in range(1, total + 1)]
    assert [step for step, _ in spy.logged] == list(range(1, total + 1))
    assert [lr for _, lr in spy.logged] == pytest.approx(after, rel=1e-12)
    # and so does history.csv, at the end of every epoch
    ends = [after[STEPS_PER_EPOCH * (e + 1) - 1] for e in range(3)]
    assert [row["lr"] for row in result.history] == pytest.approx(ends, rel=1e-12)


def test_the_constant_schedule_holds_the_peak_after_warmup(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    config = tiny(
        "optim.lr=0.004",
        "optim.warmup_epochs=0.5",
        "optim.schedule=constant",
        "train.epochs=2",
    )
    train(config, run_dir=tmp_path, progress_bar=False)
    assert spy.lrs == pytest.approx([0.002, 0.004] + [0.004] * 6, rel=1e-12)


def test_a_resumed_run_continues_the_schedule_where_it_stopped(tmp_path, monkeypatch):
    overrides = ("optim.lr=0.1", "optim.warmup_epochs=1", "train.epochs=3")
    with monkeypatch.context() as patch:
        first = Spy(patch)
        train(tiny(*overrides[:-1], "train.epochs=1"), run_dir=tmp_path, progress_bar=False)
    assert len(first.lrs) == STEPS_PER_EPOCH
    spy = Spy(monkeypatch)
    train(tiny(*overrides), run_dir=tmp_path, progress_bar=False, resume=True)
    total = 3 * STEPS_PER_EPOCH
    expected = [warmup_cosine(s, 0.1, 0.0, STEPS_PER_EPOCH, total) for s in range(total)]
    # the first run planned 4 steps; the resumed one re-plans 12 and continues at step 4
    assert spy.lrs == pytest.approx(expected[STEPS_PER_EPOCH:], rel=1e-12)


@pytest.mark.parametrize("peak", [0.1, 0.3])
def test_extending_a_finished_run_goes_on_along_the_longer_curve(tmp_path, monkeypatch, peak):
    # `--resume RUN train.epochs=4` after a finished 2-epoch run: its rate had reached the floor;
    # the first resumed step ran at that floor (the optimizer's saved rate) before the curve
    # jumped, and a new optim.lr was half applied (the checkpoint's peak, the new floor ratio)
    warmup = ("optim.min_lr=0.01", "optim.warmup_epochs=1")
    with monkeypatch.context() as patch:
        first = Spy(patch)
        train(tiny("optim.lr=0.1", *warmup, "train.epochs=2"), run_dir=tmp_path, progress_bar=False)
    assert first.lrs[-1] == pytest.approx(warmup_cosine(7, 0.1, 0.01, STEPS_PER_EPOCH, 8))
    spy = Spy(monkeypatch)
    extended = tiny(f"optim.lr={peak}", *warmup, "train.epochs=4")
    result = train(extended, run_dir=tmp_path, progress_bar=False, resume=True)
    total = 4 * STEPS_PER_EPOCH
    expected = [warmup_cosine(s, peak, 0.01, STEPS_PER_EPOCH, total) for s in range(8, total)]
    assert spy.lrs == pytest.approx(expected, rel=1e-12)
    # half-way down the longer curve: neither a new warm-up nor the peak again
    assert 0.01 < spy.lrs[0] < peak and spy.lrs[0] > spy.lrs[1]
    ends = [warmup_cosine(s, peak, 0.01, STEPS_PER_EPOCH, total) for s in (12, 16)]
    assert [row["lr"] for row in result.history[2:]] == pytest.approx(ends, rel=1e-12)


def ring_authors_step_lr(epoch: int, epochs: int, initial: float) -> float:
    """The Ring authors' ``MoCoLRScheduler`` as their ``scripts/run.py`` configures it: at the
    start of (0-based) epoch ``e`` the rate is ``initial`` times 0.1 for each milestone
    ``int(0.68 E)``, ``int(0.83 E)`` that ``e`` has reached."""
    lr = initial
    for milestone in (int(0.68 * epochs), int(0.83 * epochs)):
        lr *= 0.1 if epoch >= milestone else 1.0
    return lr


@pytest.mark.parametrize("epochs", [200, 100, 7, 3])
def test_the_step_schedule_is_the_ring_authors_epoch_schedule(epochs):
    from hardneg.train.optim import lr_factor

    per_epoch = 5
    got = [
        lr_factor(
            s,
            warmup_steps=0,
            total_steps=epochs * per_epoch,
            schedule="step",
            min_ratio=0.3,  # not used by the step schedule
            steps_per_epoch=per_epoch,
        )
        for s in range(epochs * per_epoch)
    ]
    want = [ring_authors_step_lr(s // per_epoch, epochs, 1.0) for s in range(epochs * per_epoch)]
    assert got == pytest.approx(want, rel=1e-12)
    if epochs == 200:  # 0.1 from epoch 136, 0.01 from epoch 166 (0-based)
        assert got[136 * per_epoch - 1] == 1.0 and got[136 * per_epoch] == pytest.approx(0.1)
        assert got[166 * per_epoch - 1] == pytest.approx(0.1)
        assert got[166 * per_epoch] == pytest.approx(0.01)


def test_the_trainer_follows_the_step_schedule_epoch_by_epoch(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    config = tiny("optim.name=sgd", "optim.lr=0.03", "optim.schedule=step", "train.epochs=7")
    train(config, run_dir=tmp_path, progress_bar=False)
    # 7 epochs: milestones int(4.76) = 4 and int(5.81) = 5
    expected = [
        ring_authors_step_lr(s // STEPS_PER_EPOCH, 7, 0.03) for s in range(7 * STEPS_PER_EPOCH)
    ]
    assert spy.lrs == pytest.approx(expected, rel=1e-12)
    assert spy.lrs[0] == pytest.approx(0.03) and spy.lrs[-1] == pytest.approx(0.0003)


def test_the_schedule_ends_at_its_floor_and_stays_there_even_with_one_post_warmup_step():
    """``lr_factor`` at given steps against the formula: past the planned steps the cosine stays
    at ``min_ratio`` (it does not rise again), and a cosine of a single step (or of none, when the
    warm-up takes every step) goes from the peak to the floor in that step."""
    from hardneg.train.optim import lr_factor

    def factor(step, warmup, total):
        return lr_factor(
            step, warmup_steps=warmup, total_steps=total, schedule="cosine", min_ratio=0.1
        )

    mid = 0.1 + 0.9 * (1 + math.cos(math.pi * 2 / 8)) / 2
    assert factor(6, 4, 12) == pytest.approx(mid, rel=1e-12)
    assert [factor(s, 4, 12) for s in (12, 13, 16, 20, 100)] == pytest.approx([0.1] * 5)
    assert [factor(s, 4, 5) for s in (3, 4, 5, 6)] == pytest.approx([1.0, 1.0, 0.1, 0.1])
    assert [factor(s, 4, 4) for s in (3, 4, 5)] == pytest.approx([1.0, 1.0, 0.1])


# --------------------------------------------------------------------------- gradient clipping


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(tmp_path, monkeypatch, precision):
    overrides = ("framework.name=moco", "loss.name=hcl", f"train.precision={precision}")
    with monkeypatch.context() as patch:
        free = Spy(patch)
        train(tiny(*overrides), run_dir=tmp_path / "free", progress_bar=False)
    clip = 0.5 * min(free.grad_norms)
    assert min(free.grad_norms) > clip  # unclipped, every step is above the bound
    spy = Spy(monkeypatch)
    train(
        tiny(*overrides, f"optim.grad_clip={clip}"), run_dir=tmp_path / "clip", progress_bar=False
    )
    assert len(spy.grad_norms) == STEPS_PER_EPOCH
    # every raw norm was above the bound, so each clipped norm is the bound itself
    assert spy.grad_norms == pytest.approx([clip] * STEPS_PER_EPOCH, rel=1e-4)


def test_a_clip_above_the_gradient_norm_changes_nothing(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        free = Spy(patch)
        train(tiny(), run_dir=tmp_path / "free", progress_bar=False)
    spy = Spy(monkeypatch)
    loose = 10 * max(free.grad_norms)
    train(tiny(f"optim.grad_clip={loose}"), run_dir=tmp_path / "loose", progress_bar=False)
    assert spy.grad_norms == pytest.approx(free.grad_norms, rel=1e-5)


# ------------------------------------------------------------------------------- data order


def test_every_epoch_visits_every_image_once_in_a_new_order(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    train(tiny("train.epochs=3"), run_dir=tmp_path, progress_bar=False)
    orders = spy.epoch_orders()
    assert len(orders) == 3
    for order in orders:
        assert sorted(order) == list(range(64))  # a permutation: each image once per epoch
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert orders[0] != list(range(64))  # shuffled, not the file order
    # the order depends on the seed too
    with monkeypatch.context() as patch:
        other = Spy(patch)
        train(tiny("train.epochs=1", "seed=7"), run_dir=tmp_path / "seed7", progress_bar=False)
    assert other.epoch_orders()[0] != orders[0]


@pytest.mark.parametrize("crash_at", [4, 6])  # at an epoch boundary, and mid-epoch
def test_a_resumed_run_sees_the_data_in_the_order_of_an_uninterrupted_run(
    tmp_path, monkeypatch, crash_at
):
    overrides = ("train.epochs=3", "train.checkpoint_every_steps=2")
    with monkeypatch.context() as patch:
        full = Spy(patch)
        train(tiny(*overrides), run_dir=tmp_path / "full", progress_bar=False)
    with monkeypatch.context() as patch:
        CrashAt(patch, at=crash_at, action=boom)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tiny(*overrides), run_dir=tmp_path / "cut", progress_bar=False)
    assert load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["step"] == crash_at
    resumed = Spy(monkeypatch)
    train(tiny(*overrides), run_dir=tmp_path / "cut", progress_bar=False, resume=True)
    seen = [index.tolist() for index in resumed.indices]
    assert seen == [index.tolist() for index in full.indices[crash_at:]]
    assert len(seen) == 3 * STEPS_PER_EPOCH - crash_at


# ------------------------------------------------------------------- augmentation per rank


def run_as_rank(tmp_path, monkeypatch, rank: int) -> list[torch.Tensor]:
    """Train as process ``rank`` of 2 (without a process group: no collective is needed) and
    return the views the augmentation makes of one fixed probe batch, replayed from the
    generator state of each call of the training loop."""
    ctx = DistContext(rank=rank, world_size=2, is_main=rank == 0, enabled=False)
    monkeypatch.setattr(trainer, "init_distributed", lambda: ctx)
    probe = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    states: list[torch.Tensor] = []
    build = augment_module.build_augmentation

    def spy_build(*args, **kwargs):
        augment = build(*args, **kwargs)

        def record(module, args, kwargs):
            generator = kwargs.get("generator")
            if generator is not None:
                states.append(generator.get_state().clone())

        augment.register_forward_pre_hook(record, with_kwargs=True)
        spy_build.module = augment
        return augment

    monkeypatch.setattr(augment_module, "build_augmentation", spy_build)
    train(tiny("framework.name=simclr"), run_dir=tmp_path / f"rank{rank}", progress_bar=False)
    loop_states = states[1:]  # the first call is the trainer's size probe (its own seed)
    assert len(loop_states) == 2 * STEPS_PER_EPOCH  # two views per step
    views = []
    for state in loop_states:  # (a copy: the replays below are recorded too)
        generator = torch.Generator()
        generator.set_state(state)
        views.append(spy_build.module(probe, generator=generator))
    return views


def test_each_rank_draws_its_own_augmentations(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        rank0 = run_as_rank(tmp_path, patch, 0)
    rank1 = run_as_rank(tmp_path, monkeypatch, 1)
    for a, b in zip(rank0, rank1, strict=True):
        assert not torch.allclose(a, b)  # same probe images, different random parameters
    assert not torch.allclose(rank0[0], rank0[1])  # and the two views of a step differ


# --------------------------------------------------------------- framework state in a run


def test_moco_key_encoder_and_queue_follow_their_formulas_in_a_training_run(tmp_path, monkeypatch):
    """Inside the trainer, at every step: the key encoder becomes ``m * key + (1 - m) * query``
    (all of its parameters) *before* the keys are computed, the keys are those of the second
    view, and the queue receives them normalised at its pointer, oldest slots first, wrapping."""
    spy = Spy(monkeypatch)
    steps: list[dict[str, object]] = []

    def params(module):
        return {k: v.detach().clone() for k, v in module.named_parameters()}

    def before_forward(module, args, kwargs):
        steps.append(
            {
                "query": params(module.backbone) | params(module.head),
                "key": params(module.key_backbone) | params(module.key_head),
                "x2": args[0][1].clone(),
            }
        )

    def after_forward(module, args, kwargs, out):
        step = steps[-1]
        step["key_after"] = params(module.key_backbone) | params(module.key_head)
        with torch.no_grad():  # the keys again, from a copy (BN statistics stay untouched)
            backbone, head = copy.deepcopy(module.key_backbone), copy.deepcopy(module.key_head)
            step["keys"] = F.normalize(head(backbone(step["x2"])), dim=1)
        step["pending"] = out.pending["keys"].clone()

    commit = MoCo.commit

    def spy_commit(self, out):
        queue, ptr = self.queue.clone(), int(self.queue_ptr)
        commit(self, out)
        steps[-1]["queue"] = (queue, ptr, self.queue.clone(), int(self.queue_ptr))

    build_model = trainer.build_model

    def spy_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_pre_hook(before_forward, with_kwargs=True)
        model.register_forward_hook(after_forward, with_kwargs=True)
        return model

    monkeypatch.setattr(trainer, "build_model", spy_model)
    monkeypatch.setattr(MoCo, "commit", spy_commit)
    config = tiny("framework.name=moco", "framework.momentum=0.9", "framework.queue_size=40")
    train(config, run_dir=tmp_path, progress_bar=False)
    assert isinstance(spy.model, MoCo) and len(steps) == STEPS_PER_EPOCH
    names = [n for n, _ in spy.model.key_backbone.named_parameters()]
    names += [n for n, _ in spy.model.key_head.named_parameters()]
    slots = []
    for step in steps:
        assert sorted(step["key_after"]) == sorted(names)
        for name in names:
            ema = 0.9 * step["key"][name] + 0.1 * step["query"][name]
            torch.testing.assert_close(step["key_after"][name], ema, rtol=0, atol=1e-6)
        torch.testing.assert_close(F.normalize(step["pending"], dim=1), step["keys"])
        before, ptr, after, new_ptr = step["queue"]
        written = [(ptr + r) % 40 for r in range(16)]
        slots.append(written)
        torch.testing.assert_close(after[written], step["keys"])
        untouched = [r for r in range(40) if r not in written]
        assert torch.equal(after[untouched], before[untouched])
        assert new_ptr == (ptr + 16) % 40
    assert slots[0][0] == 0 and slots[2] == list(range(32, 40)) + list(range(8))
    assert int(load_checkpoint(tmp_path / "checkpoints/final.pt")["model"]["queue_ptr"]) == 24


def test_memory_bank_entries_follow_the_momentum_update_in_a_training_run(tmp_path, monkeypatch):
    """At every step the batch's bank entries become ``normalize(m * entry + (1 - m) *
    normalize(q))`` and every other entry is left alone; after an epoch each image's entry was
    written exactly once."""
    updates = []
    commit = MemoryBank.commit

    def spy_commit(self, out):
        bank = self.bank.clone()
        commit(self, out)
        index, q = out.pending["index"].clone(), out.pending["q"].clone()
        updates.append((bank, index, q, self.bank.clone()))

    monkeypatch.setattr(MemoryBank, "commit", spy_commit)
    config = tiny("framework.name=memory_bank", "framework.bank_momentum=0.3")
    train(config, run_dir=tmp_path, progress_bar=False)
    assert len(updates) == STEPS_PER_EPOCH
    for before, index, q, after in updates:
        mixed = 0.3 * before[index] + 0.7 * q / q.norm(dim=1, keepdim=True)
        torch.testing.assert_close(after[index], mixed / mixed.norm(dim=1, keepdim=True))
        others = torch.ones(64, dtype=torch.bool)
        others[index] = False
        assert torch.equal(after[others], before[others])
        assert not torch.allclose(after[index], before[index])
    written = torch.cat([index for _, index, _, _ in updates])
    assert sorted(written.tolist()) == list(range(64))
    final = load_checkpoint(tmp_path / "checkpoints/final.pt")["model"]["bank"]
    assert torch.equal(final, updates[-1][3])


# --------------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_the_optimizer_is_the_configured_one_over_the_trainable_parameters(name, cls):
    from torch import nn

    from hardneg.train.optim import build_optimizer

    config = tiny(
        f"optim.name={name}",
        "optim.lr=0.03",
        "optim.weight_decay=0.002",
        "optim.momentum=0.8",
        "optim.nesterov=true",
    )
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)  # e.g. a momentum encoder's: not optimised
    optimizer = build_optimizer(config.optim, model)
    assert type(optimizer) is cls
    (group,) = optimizer.param_groups
    assert group["lr"] == 0.03 and group["weight_decay"] == 0.002
    assert [id(p) for p in group["params"]] == [
        id(model[0].weight),
        id(model[0].bias),
        id(model[1].bias),
    ]
    if name == "sgd":
        assert group["momentum"] == 0.8 and group["nesterov"] is True


def test_an_unknown_optimizer_is_refused_by_name():
    from types import SimpleNamespace

    from hardneg.train.optim import build_optimizer

    with pytest.raises(ValueError, match="optim.name must be adam, adamw or sgd, got 'lamb'"):
        build_optimizer(SimpleNamespace(name="lamb"), torch.nn.Linear(2, 2))
