"""Frozen-feature extraction: run a backbone over a whole data set once, in eval mode."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset,
    transform: nn.Module | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Backbone features of every example of ``dataset``.

    Args:
        model: maps a batch ``[B, ...]`` to features ``[B, D]`` (a backbone, not the head).
        dataset: an :class:`hardneg.data.ArrayDataset` (``inputs`` ``[N, ...]``, ``labels`` ``[N]``).
        transform: deterministic eval transform applied on ``device`` to each raw batch
            (e.g. ``hardneg.augment.build_eval_transform``: uint8 -> normalised float); ``None``
            feeds the inputs as float32.
        batch_size: rows per forward pass.
        device: where the forward passes run.

    Returns:
        ``(features [N, D] float32 on CPU, labels [N] int64 on CPU)``. The model runs in eval mode
        (batch-norm running statistics, no dropout) without gradients; its previous mode is restored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    inputs, labels = dataset.inputs, dataset.labels
    was_training = model.training
    model.eval()
    if transform is not None:
        transform.eval()
    chunks = []
    try:
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device, non_blocking=True)
            x = transform(x) if transform is not None else x.float()
            chunks.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("cannot extract features from an empty data set")
    return torch.cat(chunks), torch.as_tensor(labels).long().cpu()
