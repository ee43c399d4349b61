"""Frameworks: the model around a loss (SimCLR in-batch, MoCo queue, IR memory bank).

``build_framework(config, backbone, head, loss, dataset_size)`` builds the one named by
``config.framework.name``; every loss of :func:`hardneg.create_loss` works in every framework
(in-batch: ``loss(z1, z2)``; queue / bank: ``loss(q, k, negatives=pool)``). A framework never
names a loss: it asks it which features the strategy needs (read by
:class:`~hardneg.frameworks.base.Framework`, gathered by its ``features``;
``loss.feature_kind``: None, ``'hidden'`` = the input of the head's last linear layer,
``'projection'`` = the online projection before a predictor) and whether it draws random numbers
(``loss.draws``: then the step's ``generator``, owned, seeded and checkpointed by the trainer,
is passed to it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from hardneg.distributed import get_world_size
from hardneg.frameworks.base import Framework, StepOutput
from hardneg.frameworks.memory_bank import MemoryBank
from hardneg.frameworks.moco import MoCo
from hardneg.frameworks.simclr import SimCLR


def _simclr(
    config: Any, backbone: nn.Module, head: nn.Module, loss: nn.Module, dataset_size: int
) -> Framework:
    fw = config.framework
    return SimCLR(backbone, head, loss, views=fw.views, small_crops=fw.small_crops)


def _moco(
    config: Any, backbone: nn.Module, head: nn.Module, loss: nn.Module, dataset_size: int
) -> Framework:
    fw = config.framework
    predictor = None
    if fw.predictor:
        from hardneg.models import build_predictor

        predictor = build_predictor(
            dim=head.out_dim,
            hidden=config.model.predictor_hidden,
            last_bn=config.model.predictor_last_bn,
        )
    # auto: MoCo v2's shuffle-BN, unless SyncBatchNorm already gives every rank global statistics
    shuffle_bn = fw.shuffle_bn if isinstance(fw.shuffle_bn, bool) else not config.train.sync_bn
    # bn_splits counts groups of the global batch (MoCo v2: one per GPU); R processes each
    # normalise their share in bn_splits / R groups (at least one: a process is a group)
    world = get_world_size()
    if fw.bn_splits > world and fw.bn_splits % world:
        raise ValueError(
            f"framework.bn_splits={fw.bn_splits} must be a multiple of the number of processes "
            f"({world}) or at most it"
        )
    bn_splits = max(1, fw.bn_splits // world)
    return MoCo(
        backbone,
        head,
        loss,
        out_dim=head.out_dim,
        momentum=fw.momentum,
        queue_size=fw.queue_size,
        symmetric=fw.symmetric,
        predictor=predictor,
        enqueue=fw.enqueue,
        shuffle_bn=shuffle_bn,
        bn_splits=bn_splits,
    )


def _memory_bank(
    config: Any, backbone: nn.Module, head: nn.Module, loss: nn.Module, dataset_size: int
) -> Framework:
    fw = config.framework
    return MemoryBank(
        backbone,
        head,
        loss,
        dataset_size=dataset_size,
        out_dim=head.out_dim,
        momentum=fw.bank_momentum,
        negatives=fw.bank_negatives,
        draws=fw.bank_draws,
    )


FRAMEWORKS: dict[str, Callable[..., Framework]] = {
    "simclr": _simclr,
    "moco": _moco,
    "memory_bank": _memory_bank,
}


def build_framework(
    config: Any, backbone: nn.Module, head: nn.Module, loss: nn.Module, dataset_size: int
) -> Framework:
    """The framework named by ``config.framework.name`` (a :class:`hardneg.config.TrainConfig`)."""
    name = config.framework.name
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}; allowed: {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[name](config, backbone, head, loss, dataset_size)


__all__ = [
    "FRAMEWORKS",
    "Framework",
    "MemoryBank",
    "MoCo",
    "SimCLR",
    "StepOutput",
    "build_framework",
]
