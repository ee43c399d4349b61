"""The training loop, plain PyTorch, top to bottom.

``train(config)`` does, in order:

1. **set-up**: validate the config, join the ``torchrun`` process group if there is one, pick
   the device, seed every generator;
2. **data**: load the pre-training split once as in-memory tensors (moved to the device when
   they fit), build the batched on-device augmentation;
3. **model**: backbone + head + loss inside a framework (SimCLR, MoCo, memory bank), the
   optimizer and a per-step warm-up + cosine schedule; resume from a checkpoint if asked;
4. **loop**: per epoch a permutation of the images from a generator seeded by ``(seed, epoch)``,
   ``drop_last`` batches; per step: views on the device -> ``framework(...)`` -> non-finite guard
   -> backward -> optimizer and schedule -> ``framework.commit`` (queue / bank writes);
   negative diagnostics with labels (analysis only) every ``diagnostics_every`` steps;
5. **per epoch**: kNN monitor, ``history.csv``, ``hardness.npz``, TensorBoard, and an atomic
   ``checkpoints/last.pt``; ``checkpoints/final.pt`` at the end.

Only rank 0 evaluates and writes files. A checkpoint holds everything needed to continue
*exactly* where the run stopped (model with queue / bank, optimizer, step, RNG states, the
epoch's running statistics); the data order and the learning rate need no state because each
epoch's permutation is a function of ``(seed, epoch)`` and each step's rate one of the step and
the config (so a larger ``train.epochs`` on resume re-plans the curve). On CPU an interrupted
and resumed run ends with the same weights, bit for bit, as an uninterrupted one (tested).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hardneg.config import TrainConfig
from hardneg.distributed import (
    DistContext,
    barrier,
    check_sync_bn,
    convert_sync_batchnorm,
    gather_no_grad,
    init_distributed,
    wrap_ddp,
)
from hardneg.frameworks import Framework, StepOutput, build_framework
from hardneg.train.checkpoint import checkpoint_meta, load_checkpoint, save_checkpoint
from hardneg.train.logs import EpochStats, HardnessLog, TensorBoard, write_history
from hardneg.train.optim import build_optimizer, build_scheduler
from hardneg.train.rng import capture_rng_state, restore_rng_state, seed_everything
from hardneg.train.runtime import (
    StopSignal,
    autocast_dtype,
    place_inputs,
    run_dir_problem,
    select_device,
    use_channels_last,
)

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or the embeddings became NaN/Inf and ``train.nonfinite`` is ``stop``."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the run after saving ``checkpoint`` (resume from it)."""

    def __init__(self, message: str, checkpoint: Path) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def train(
    config: TrainConfig | dict[str, Any],
    *,
    run_dir: str | Path | None = None,
    progress_bar: bool = True,
    resume: bool | str | Path | None = None,
    say: Callable[[str], None] = print,
) -> TrainResult:
    """Train a model as ``config`` says and write the run's files into ``run_dir``.

    Args:
        config: a :class:`~hardneg.config.TrainConfig` or a dict in the YAML shape.
        run_dir: output folder (default ``runs/<dataset>-<framework>-<loss>-<time>``).
        progress_bar: show a tqdm bar with the loss, images/s and the ETA when stderr is a
            terminal (or in a notebook).
        resume: ``True`` for ``run_dir/checkpoints/last.pt``, a run folder (its
            ``checkpoints/last.pt``; the run continues in that folder) or a checkpoint path; the
            checkpoint must come from the same set-up (a mismatch lists what differs). A larger
            ``train.epochs`` extends the run: the learning-rate curve is re-planned for the new
            total and each further step takes that curve's rate (no second warm-up).
        say: prints the line of each epoch (``hardneg train --quiet`` passes one that drops
            them); a skipped non-finite step is a warning of the logger
            ``hardneg.train.trainer``.

    Raises:
        NonFiniteError: NaN/Inf loss or embeddings with ``train.nonfinite: stop``.
        TrainingInterrupted: SIGINT / SIGTERM (a checkpoint was saved first).
    """
    # ---- set-up -------------------------------------------------------------------------
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if cfg.train.threads is not None:
        # small models gain little from intra-op threads and lose much on shared CPUs
        torch.set_num_threads(cfg.train.threads)
    ctx = init_distributed()
    device = select_device(cfg.train.device, ctx.device if ctx.enabled else None)
    seed_everything(cfg.seed)
    if cfg.train.batch_size % ctx.world_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by the number of "
            f"processes ({ctx.world_size}); it is the global batch"
        )
    if cfg.train.sync_bn:
        check_sync_bn(device)  # fail before the data are loaded
    run_dir, resume_path = resolve_run_dir(cfg, run_dir, resume)
    check_run_dir(run_dir, ctx, device)  # before the data are loaded
    local_batch = cfg.train.batch_size // ctx.world_size

    # ---- data ---------------------------------------------------------------------------
    from hardneg.augment import build_augmentation
    from hardneg.data import dataset_info

    info = dataset_info(cfg.data.dataset)
    data = load_pretrain_split(cfg, info)
    steps_per_epoch = len(data) // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is larger than the {len(data)} training "
            f"images of {cfg.data.dataset}; lower it"
        )
    total_steps = steps_per_epoch * cfg.train.epochs
    inputs = place_inputs(data.inputs, device)
    labels = data.labels.to(inputs.device)  # diagnostics only, never seen by the loss
    augment = build_augmentation(
        cfg.data.dataset, cfg.data.image_size, cfg.augment.recipe, **cfg.augment.params
    ).to(device)
    train_size = augmented_size(augment, inputs, device)
    small_augment = None
    if cfg.framework.small_crops > 0:  # multi-crop: low-resolution crops besides the views
        small_augment = build_augmentation(
            cfg.data.dataset,
            small_crop_size(cfg, train_size),
            cfg.augment.recipe,
            **{
                **cfg.augment.params,
                "scale": (cfg.augment.small_scale_min, cfg.augment.small_scale_max),
            },
        ).to(device)

    # ---- model, optimizer, schedule -----------------------------------------------------
    backbone_args = {
        "name": cfg.model.backbone,
        "in_channels": info.in_channels,
        "image_size": train_size,
    }
    framework = build_model(cfg, backbone_args, len(data)).to(device)
    if cfg.train.sync_bn:  # same parameters and buffer names: checkpoints load either way
        framework = convert_sync_batchnorm(framework, device)
    channels_last = use_channels_last(cfg.train.channels_last, device, info.kind)
    if channels_last:
        framework.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    optimizer = build_optimizer(cfg.optim, framework)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    loss_generator = torch.Generator(device).manual_seed(cfg.seed + 1)  # same on every rank
    augment_generator = torch.Generator(device).manual_seed(cfg.seed + 2 + ctx.rank)

    meta = run_meta(cfg)
    step, history = 0, []
    stats, hardness = EpochStats(), HardnessLog()
    if resume_path is not None:
        payload = load_checkpoint(resume_path, expected_meta=meta)
        framework.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
        step, history = int(payload["step"]), list(payload["history"])
        stats.load_state_dict(payload["epoch_state"])
        hardness.load_state_dict(payload["hardness"])
        restore_rng_state(payload["rng"], {"loss": loss_generator})
        restore_rank_generator(payload["augment_rng"], augment_generator, ctx)
    # built after the resume: the rate of every step follows this config's curve (a larger
    # train.epochs re-plans it), not the scheduler state saved with the checkpoint
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, total_steps, step)
    model: nn.Module = framework
    if ctx.enabled:
        model = wrap_ddp(framework, device)  # queue / bank: fed the global batch on every rank

    # ---- outputs (rank 0) ---------------------------------------------------------------
    eval_sets = load_eval_splits(cfg, info, data) if ctx.is_main and cfg.eval.knn else None
    tb = None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        tb = TensorBoard(run_dir / "tb", purge_step=step if resume_path else None)
    last_ckpt = run_dir / "checkpoints" / "last.pt"

    def save(path: Path) -> None:
        """Checkpoint of the current state (a collective: every rank calls it)."""
        augment_states = gather_no_grad(augment_generator.get_state().to(device)[None])
        if ctx.is_main:
            save_checkpoint(
                path,
                {
                    "meta": meta,
                    "config": cfg.to_dict(),
                    "model": framework.state_dict(),
                    "backbone": framework.backbone.state_dict(),
                    "backbone_args": backbone_args,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": step // steps_per_epoch,
                    "step": step,
                    "rng": capture_rng_state({"loss": loss_generator}),
                    "augment_rng": augment_states.cpu(),
                    "history": history,
                    "epoch_state": stats.state_dict(),
                    "hardness": hardness.state_dict(),
                },
            )

    # ---- loop ---------------------------------------------------------------------------
    last_finite: tuple[float, int] | None = None  # (loss, step), for the non-finite message
    if not ctx.is_main:
        say = say_nothing  # rank 0 speaks for the run
    bar = tqdm(
        total=total_steps,
        initial=step,
        unit="step",
        dynamic_ncols=True,
        # None: tqdm's "only on a terminal"; redrawn into a log file (nohup, CI, `2> log`) the
        # bar left one carriage-return line per step; the epoch lines carry the same figures
        disable=None if progress_bar and ctx.is_main else True,
    )
    with bar, StopSignal() as stop, tb or contextlib.nullcontext():
        for epoch in range(step // steps_per_epoch, cfg.train.epochs):
            order = epoch_order(len(data), cfg.seed, epoch)
            tick = time.perf_counter()
            for i in range(step - epoch * steps_per_epoch, steps_per_epoch):
                start = i * cfg.train.batch_size + ctx.rank * local_batch
                index = order[start : start + local_batch].to(inputs.device)
                x = inputs[index].to(device, non_blocking=True)
                full = framework.num_views - framework.num_small_crops
                views = [augment(x, generator=augment_generator) for _ in range(full)]
                if small_augment is not None:
                    views += [
                        small_augment(x, generator=augment_generator)
                        for _ in range(framework.num_small_crops)
                    ]
                if channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                every = cfg.train.diagnostics_every
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out: StepOutput = model(
                        views,
                        index=index.to(device),
                        labels=labels[index].to(device),
                        progress=step / total_steps,
                        generator=loss_generator,
                        diagnostics=every > 0 and step % every == 0,
                    )
                loss_value, finite = step_health(out)  # the one host sync of a step

                if finite:
                    scaler.scale(out.loss).backward()
                    if cfg.optim.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(framework.parameters(), cfg.optim.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    framework.commit(out)  # queue / bank writes, only for accepted steps
                    stats.add_step(loss_value, cfg.train.batch_size)
                    last_finite = (loss_value, step)
                    if out.diagnostics is not None and tb is not None:
                        tb.scalars("diagnostics", stats.add_diagnostics(out.diagnostics), step)
                elif cfg.train.nonfinite == "stop":
                    raise NonFiniteError(nonfinite_message(cfg, out, step, last_finite, last_ckpt))
                else:  # skip the step: no update, no queue / bank write
                    stats.add_step(None, cfg.train.batch_size)
                    if ctx.is_main:  # a warning: shown with --quiet too
                        log.warning(f"step {step}: non-finite loss or embeddings, step skipped")
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1

                now = time.perf_counter()
                stats.elapsed, tick = stats.elapsed + now - tick, now
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    img_s=f"{stats.images / max(stats.elapsed, 1e-9):.0f}",
                    refresh=False,
                )
                if tb is not None and step % cfg.train.log_every == 0:
                    tb.scalars("train", {"loss": loss_value, "lr": current_lr(optimizer)}, step)
                every = cfg.train.checkpoint_every_steps
                if every and step % every == 0 and step % steps_per_epoch:
                    save(last_ckpt)
                if stop_requested(stop, ctx, device):
                    save(last_ckpt)
                    raise TrainingInterrupted(
                        f"interrupted at step {step}/{total_steps}; saved {last_ckpt}; continue "
                        f"with: hardneg train --resume {last_ckpt}",
                        last_ckpt,
                    )

            # ---- end of epoch: evaluate, log, checkpoint --------------------------------
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": current_lr(optimizer)}
            row.update(stats.row())
            last_epoch = epoch + 1 == cfg.train.epochs
            knn_now = cfg.train.knn_every > 0 and (epoch + 1) % cfg.train.knn_every == 0
            if eval_sets is not None and (knn_now or last_epoch):
                row.update(knn_monitor(framework.backbone, eval_sets, cfg, device))
            barrier()
            history.append(row)
            hardness.add(epoch + 1, stats.histograms())
            if tb is not None:
                tb.scalars("epoch", row, step)
                tb.histograms(stats.histograms(), step)
                write_history(run_dir / "history.csv", history)
                hardness.save(run_dir / "hardness.npz")
            stats = EpochStats()
            every = cfg.train.checkpoint_every
            if last_epoch or (every and (epoch + 1) % every == 0):
                save(last_ckpt)
            bar.clear()
            say(format_row(row))

    final = run_dir / "checkpoints" / "final.pt"
    save(final)
    metrics = dict(history[-1]) if history else {}
    return TrainResult(run_dir=run_dir, checkpoint=final, history=history, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# building blocks (each used once above, named so the loop reads as a list of steps)


def resolve_run_dir(
    cfg: TrainConfig, run_dir: str | Path | None, resume: bool | str | Path | None
) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None for a fresh run)."""
    resume_path: Path | None = None
    if resume is True:
        if run_dir is None:
            raise ValueError("resume=True needs the run_dir to resume (or give a checkpoint path)")
        resume_path = Path(run_dir) / "checkpoints" / "last.pt"
    elif resume:
        resume_path = Path(resume)
        if resume_path.is_dir():  # a run folder: continue from its last checkpoint
            run_dir = resume_path if run_dir is None else run_dir
            resume_path = resume_path / "checkpoints" / "last.pt"
        elif run_dir is None and resume_path.parent.name == "checkpoints":
            run_dir = resume_path.parent.parent
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{cfg.data.dataset}-{cfg.framework.name}-{cfg.loss.name}-{stamp}"
        run_dir = Path("runs") / name
    run_dir = Path(run_dir)
    if resume_path is None and (run_dir / "checkpoints" / "last.pt").exists():
        raise ValueError(
            f"{run_dir} already holds a run (checkpoints/last.pt); continue it with --resume "
            "or choose another --run-dir"
        )
    if resume_path is not None and not resume_path.exists():
        raise FileNotFoundError(f"cannot resume: checkpoint {resume_path} does not exist")
    return run_dir, resume_path


def check_run_dir(run_dir: Path, ctx: DistContext, device: torch.device) -> None:
    """Fail in one line, on every rank, when rank 0 cannot write the run folder."""
    problem = run_dir_problem(run_dir) if ctx.is_main else None
    if ctx.enabled:  # the other ranks must stop too, not wait for rank 0 in a collective
        flag = torch.tensor([float(problem is not None)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and problem is None:
            problem = f"rank 0 cannot write the run folder {run_dir}"
    if problem is not None:
        raise ValueError(problem)


def load_pretrain_split(cfg: TrainConfig, info: Any) -> Any:
    """The pre-training split as an in-memory :class:`~hardneg.data.ArrayDataset`."""
    from hardneg.data import decode_size, load_dataset

    split = cfg.data.split or info.pretrain_split
    data = load_dataset(
        cfg.data.dataset,
        split,
        data_dir=cfg.data.data_dir,
        download=cfg.data.download,
        image_size=decode_size(cfg.data.dataset, cfg.data.image_size),
    )
    if cfg.data.subset is not None:
        data = data.subset(slice(0, cfg.data.subset))
    return data


@torch.no_grad()
def augmented_size(augment: nn.Module, inputs: Tensor, device: torch.device) -> int:
    """Side (or length) of the views the augmentation makes; the backbone is built for it
    (e.g. HCL's recipe trains STL-10 at 32 px, so ResNet gets its CIFAR stem)."""
    probe = torch.Generator(device).manual_seed(0)  # leaves every other generator untouched
    return int(augment(inputs[:2].to(device), generator=probe).shape[-1])


def small_crop_size(cfg: TrainConfig, train_size: int) -> int:
    """Side of the small crops: ``augment.small_size``, else SwAV's 96 of 224 of the views'
    side (14 px for 32 px views), at least 4."""
    if cfg.augment.small_size is not None:
        return int(cfg.augment.small_size)
    return max(4, round(train_size * 96 / 224))


def build_model(cfg: TrainConfig, backbone_args: dict[str, Any], dataset_size: int) -> Framework:
    """Backbone (``build_backbone(**backbone_args)``) + projection head + loss inside the
    configured framework."""
    from hardneg.models import build_backbone, build_head
    from hardneg.registry import create_loss, loss_settings

    backbone = build_backbone(**backbone_args)
    head = build_head(cfg.model.head, backbone.out_dim, cfg.model.out_dim, cfg.model.head_hidden)
    params = dict(cfg.loss.params)
    if "check_inputs" in loss_settings(cfg.loss.name):  # a loss-level setting of every loss
        # the trainer checks the loss and the embeddings itself (one host sync per step)
        params.setdefault("check_inputs", False)
    loss = create_loss(cfg.loss.name, **params)
    return build_framework(cfg, backbone, head, loss, dataset_size)


def run_meta(cfg: TrainConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by this config."""
    meta = checkpoint_meta(cfg)
    meta.update(
        loss_params=dict(cfg.loss.params),
        # shuffle_bn and bn_splits change no state (a run may resume with another number of
        # processes; a checkpoint from before bn_splits existed has no such key)
        framework_params={
            k: v
            for k, v in cfg.to_dict()["framework"].items()
            if k not in ("name", "shuffle_bn", "bn_splits")
        },
        split=cfg.data.split,
        subset=cfg.data.subset,
        image_size=cfg.data.image_size,
        batch_size=cfg.train.batch_size,
    )
    return meta


def restore_rank_generator(states: Tensor, generator: torch.Generator, ctx: DistContext) -> None:
    """Give each rank its own augmentation generator state back (reseed if the number of
    processes changed since the checkpoint)."""
    if states.shape[0] == ctx.world_size:
        generator.set_state(states[ctx.rank].to(torch.uint8).cpu().clone())
    else:
        generator.manual_seed(int(torch.randint(0, 2**62, ())) + ctx.rank)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation of epoch ``epoch``: a function of ``(seed, epoch)`` only, the same on
    every rank, so a resumed run needs no data-loader state."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def step_health(out: StepOutput) -> tuple[float, bool]:
    """``(loss value, loss and embeddings finite)`` with a single device-to-host copy."""
    flags = torch.stack(
        [out.loss.detach().float(), torch.isfinite(out.embeddings).all().float()]
    ).tolist()
    return flags[0], math.isfinite(flags[0]) and flags[1] == 1.0


def nonfinite_message(
    cfg: TrainConfig,
    out: StepOutput,
    step: int,
    last_finite: tuple[float, int] | None,
    checkpoint: Path,
) -> str:
    what = "the loss" if torch.isfinite(out.embeddings).all() else "the embeddings"
    params = ", ".join(f"{k}={v}" for k, v in cfg.loss.params.items())
    last = (
        f"the last finite loss was {last_finite[0]:.6g} at step {last_finite[1]}"
        if last_finite
        else "no step had a finite loss"
    )
    kept = (
        f"the last good checkpoint {checkpoint} is intact (resume with --resume)"
        if checkpoint.exists()
        else "no checkpoint was written yet"
    )
    return (
        f"training stopped at step {step}: {what} became NaN/Inf with loss {cfg.loss.name!r}"
        f"{' (' + params + ')' if params else ''} in framework {cfg.framework.name!r}; {last}; "
        f"{kept}. Try a lower optim.lr, precision=fp32, or train.nonfinite=skip to skip such steps"
    )


def say_nothing(line: str) -> None:
    """The ``say`` of the ranks other than 0."""


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def stop_requested(stop: StopSignal, ctx: DistContext, device: torch.device) -> bool:
    """Whether any rank got SIGINT / SIGTERM (all ranks must agree to stop at the same step)."""
    if not ctx.enabled:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def load_eval_splits(cfg: TrainConfig, info: Any, pretrain: Any) -> tuple[Any, Any]:
    """The labelled splits of the kNN monitor (reusing the pre-training split when it is one)."""
    from hardneg.data import decode_size, load_dataset

    def split(name: str) -> Any:
        if name == (cfg.data.split or info.pretrain_split) and cfg.data.subset is None:
            data = pretrain
        else:
            data = load_dataset(
                cfg.data.dataset,
                name,
                data_dir=cfg.data.data_dir,
                download=cfg.data.download,
                image_size=decode_size(cfg.data.dataset, cfg.data.image_size),
            )
        keep = data.labels >= 0  # STL-10's unlabeled images have label -1
        return data if bool(keep.all()) else data.subset(keep)

    return split(info.eval_train_split), split(info.eval_test_split)


def knn_monitor(
    backbone: nn.Module, eval_sets: tuple[Any, Any], cfg: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Weighted kNN (Wu et al. 2018) top-1 / top-5 on the backbone's features."""
    from hardneg.augment import build_eval_transform
    from hardneg.evaluation import extract_features, weighted_knn

    transform = build_eval_transform(cfg.data.dataset, cfg.data.image_size, cfg.augment.recipe)
    transform = transform.to(device)
    train_set, test_set = eval_sets
    train_f, train_y = extract_features(backbone, train_set, transform, cfg.eval.batch_size, device)
    test_f, test_y = extract_features(backbone, test_set, transform, cfg.eval.batch_size, device)
    result = weighted_knn(
        train_f.to(device),
        train_y.to(device),
        test_f.to(device),
        test_y.to(device),
        k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature,
        num_classes=train_set.num_classes,
    )
    return {"knn_top1": result["top1"], "knn_top5": result["top5"]}


def format_row(row: dict[str, Any]) -> str:
    keys = (
        "epoch",
        "loss",
        "knn_top1",
        "effective_negatives",
        "false_negative_mass",
        "images_per_s",
    )
    return "  ".join(
        f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
        for k in keys
        if k in row
    )


def load_backbone(checkpoint_path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone of a training checkpoint (eval mode, CPU) and return it with the
    run's config (a plain dict)."""
    from hardneg.models import build_backbone

    payload = load_checkpoint(checkpoint_path)
    if not isinstance(payload.get("config"), dict) or "backbone_args" not in payload:
        if "encoder" in payload and "setting" in payload:  # hardneg.graph.run's model.pt
            raise ValueError(
                f"{checkpoint_path} is a graph run's InfoGraph weights: its SVM score is in "
                "results.json beside it (hardneg eval reads image and 1-D signal runs)"
            )
        raise ValueError(f"{checkpoint_path} is not a hardneg training checkpoint")
    backbone = build_backbone(**payload["backbone_args"])
    backbone.load_state_dict(payload["backbone"])
    return backbone.eval(), payload["config"]
