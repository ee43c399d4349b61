"""Split batch norm: MoCo's per-GPU batch statistics, emulated in one process.

MoCo v2 trains on 8 GPUs with BN statistics computed per GPU, and shuffles the key batch across
the GPUs (shuffle-BN, He et al. 2020, section 3.3) so that a query and its positive key are never
normalised with statistics of the same images. In one process BN normalises the whole batch: the
queries and the positive keys then share batch statistics (of the same images, other views)
that the queue's keys, from earlier batches, do not have, a signal that lets the model find the
positive without learning good features. The MoCo authors' advice for one GPU is BN split along
the batch: :func:`split_batch_norm_` makes every BatchNorm of a module normalise ``splits``
contiguous groups of rows separately in training mode (the groups play the GPUs), and the MoCo
framework shuffles the key batch before its encoder, as shuffle-BN does across GPUs.

The layers keep their class's parameters and buffers (a checkpoint loads into a plain model);
the running statistics are updated with the mean of the groups' statistics. In eval mode they
are plain BatchNorm layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _SplitMixin:
    """forward of a BatchNorm layer whose training batches are normalised in ``splits`` groups."""

    splits: int = 1

    def forward(self, x: Tensor) -> Tensor:
        splits = self.splits
        if not self.training or splits <= 1:
            return super().forward(x)  # type: ignore[misc]
        rows, channels = x.shape[0], x.shape[1]
        if rows % splits:
            raise ValueError(
                f"split batch norm: a batch of {rows} rows does not divide into "
                f"{splits} groups (framework.bn_splits must divide train.batch_size)"
            )
        n, rest = rows // splits, x.shape[2:]
        # group g = rows [g n, (g + 1) n): lay the groups side by side as channels, so that one
        # batch_norm call computes each group's own statistics
        grouped = x.reshape(splits, n, channels, *rest).transpose(0, 1)
        grouped = grouped.reshape(n, splits * channels, *rest)
        mean, var = self.running_mean, self.running_var
        tracking = self.track_running_stats and mean is not None
        if tracking:
            self.num_batches_tracked.add_(1)
            momentum = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
            mean, var = mean.repeat(splits), var.repeat(splits)
        else:
            momentum = 0.0
        weight = None if self.weight is None else self.weight.repeat(splits)
        bias = None if self.bias is None else self.bias.repeat(splits)
        out = F.batch_norm(grouped, mean, var, weight, bias, True, momentum, self.eps)
        if tracking:
            with torch.no_grad():  # each group moved its copy; keep their mean
                self.running_mean.copy_(mean.view(splits, channels).mean(0))
                self.running_var.copy_(var.view(splits, channels).mean(0))
        out = out.reshape(n, splits, channels, *rest).transpose(0, 1)
        return out.reshape(rows, channels, *rest)


class SplitBatchNorm1d(_SplitMixin, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` normalising ``splits`` groups of rows separately."""


class SplitBatchNorm2d(_SplitMixin, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` normalising ``splits`` groups of rows separately."""


_SPLIT = {nn.BatchNorm1d: SplitBatchNorm1d, nn.BatchNorm2d: SplitBatchNorm2d}


def split_batch_norm_(module: nn.Module, splits: int) -> nn.Module:
    """Make every ``BatchNorm1d`` / ``BatchNorm2d`` of ``module`` normalise its training batches
    in ``splits`` groups of contiguous rows (in place: the layers keep their parameters and
    buffers, so an optimizer built before still holds them). ``splits=1``: plain BN."""
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    for layer in module.modules():
        cls = _SPLIT.get(type(layer)) or (type(layer) if isinstance(layer, _SplitMixin) else None)
        if cls is not None:
            layer.__class__ = cls
            layer.splits = splits
    return module
