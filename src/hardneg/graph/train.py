"""Training loop and embedding extraction shared by the graph frameworks.

``train_graphs(model, graph_set, epochs=..., batch_size=..., lr=..., seed=...)`` trains an
:class:`~hardneg.graph.infograph.InfoGraph` or :class:`~hardneg.graph.graphcl.GraphCL` with Adam;
``embed(model.encoder, graph_set)`` returns the frozen graph embeddings (the encoder's sum-pools,
as InfoGraph evaluates) and the labels. The inputs are checked before the first step: the encoder
must match the data's node feature width and every batch must hold at least 2 graphs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from hardneg._checks import check_number
from hardneg.graph.data import GraphSet


def _loader(graphs: list, batch_size: int, shuffle: bool, generator: torch.Generator | None):
    from torch_geometric.loader import DataLoader

    return DataLoader(graphs, batch_size=batch_size, shuffle=shuffle, generator=generator)


def check_model_data(model, data: GraphSet, batch_size: int) -> None:
    """Errors before any training step: encoder/data mismatch, too few graphs per batch."""
    expected = model.encoder.in_features
    if data.num_features != expected:
        raise ValueError(
            f"the encoder expects {expected} node features but {data.name!r} has "
            f"{data.num_features}: build the model with in_features=data.num_features"
        )
    if len(data) < 2:
        raise ValueError(f"{data.name!r} has {len(data)} graph(s): contrast needs at least 2")
    if len(data) % batch_size == 1:
        raise ValueError(
            f"{len(data)} graphs in batches of {batch_size} leave a last batch of one graph "
            "(no negatives): change batch_size"
        )


def train_graphs(
    model,
    data: GraphSet,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    shuffle: bool = True,
    log: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` on ``data``; returns ``{"loss": last epoch's mean, "seconds": ...}``."""
    epochs = int(check_number("epochs", epochs, low=0, integer=True))
    batch_size = int(check_number("batch_size", batch_size, low=2, integer=True))
    check_model_data(model, data, batch_size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = _loader(data.graphs, batch_size, shuffle, generator)
    steps = max(1, epochs * math.ceil(len(data) / batch_size))
    step, last, start = 0, float("nan"), time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            optimizer.zero_grad()
            loss = model(batch, progress=min(step / steps, 1.0), generator=generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch + 1}")
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * int(batch.num_graphs)
            count += int(batch.num_graphs)
            step += 1
        last = total / max(count, 1)
        if log is not None:
            log(epoch + 1, last)
    return {"loss": last, "seconds": time.perf_counter() - start}


@torch.no_grad()
def embed(encoder, data: GraphSet, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(embeddings [graphs, L d], labels [graphs])`` of the frozen encoder (eval mode)."""
    was_training = encoder.training
    encoder.eval()
    out, labels = [], []
    for batch in _loader(data.graphs, batch_size, False, None):
        y, _ = encoder(batch.x, batch.edge_index, batch.batch, int(batch.num_graphs))
        out.append(y)
        labels.append(batch.y.view(-1))
    encoder.train(was_training)
    return torch.cat(out), torch.cat(labels)
