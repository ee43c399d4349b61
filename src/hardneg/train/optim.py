"""Optimizer and learning-rate schedule (linear warm-up, then cosine, constant or step)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def build_optimizer(optim: Any, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over the trainable parameters (momentum encoders are excluded).

    ``optim`` is a :class:`hardneg.config.OptimConfig`; weight decay applies to every parameter,
    as in the HCL and PSM reference code.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=optim.lr,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
            nesterov=optim.nesterov,
        )
    raise ValueError(f"optim.name must be adam, adamw or sgd, got {optim.name!r}")


#: the Ring authors' step schedule (mhw32/contrastive-ring-public, ``scripts/run.py``): the
#: learning rate is multiplied by 0.1 from epoch ``int(f E)`` on, for each fraction ``f``
STEP_MILESTONES = (0.68, 0.83)
STEP_GAMMA = 0.1


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_ratio: float,
    steps_per_epoch: int = 1,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then ``1``
    (``constant``), ``min_ratio + (1 - min_ratio) (1 + cos(pi p)) / 2`` (``cosine``) with
    ``p`` the fraction of the post-warm-up steps done, or (``step``) ``0.1^n`` with ``n`` the
    number of milestones ``int(0.68 E)``, ``int(0.83 E)`` that the step's epoch has reached
    (``E = total_steps / steps_per_epoch`` epochs; the rate changes at epoch starts, as the Ring
    authors' ``MoCoLRScheduler`` sets it in ``on_epoch_start``; ``min_ratio`` is not used).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        epochs = total_steps // max(steps_per_epoch, 1)
        epoch = step // max(steps_per_epoch, 1)
        reached = sum(epoch >= int(f * epochs) for f in STEP_MILESTONES)
        return STEP_GAMMA**reached
    span = max(total_steps - warmup_steps, 1)
    done = min((step - warmup_steps) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    optim: Any,
    steps_per_epoch: int,
    total_steps: int,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` for :func:`lr_factor`, set to the
    rate of step ``start_step`` (a resumed run's step).

    The schedule is a function of the step and of ``optim`` / ``total_steps`` only, so a resumed
    run does not restore the checkpoint's scheduler: with a larger ``train.epochs`` (or other
    ``optim.*`` values) the curve is re-planned for the new total and the next step takes the
    rate the new curve gives it. A finished cosine run extended from E to 2E epochs thus goes on
    from the middle of the longer curve: no second warm-up, no jump back to the peak. Build it
    after loading the checkpoint's optimizer state, whose learning rates it replaces.
    """
    warmup_steps = round(optim.warmup_epochs * steps_per_epoch)
    min_ratio = optim.min_lr / optim.lr

    def factor(step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            schedule=optim.schedule,
            min_ratio=min_ratio,
            steps_per_epoch=steps_per_epoch,
        )

    for group in optimizer.param_groups:
        # the config's peak rate, also on resume (a checkpoint's optimizer state brings its own)
        group["initial_lr"] = optim.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)
