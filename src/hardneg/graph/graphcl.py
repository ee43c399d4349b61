"""GraphCL-style graph-graph contrast (You et al., NeurIPS 2020) with any registered strategy.

Each graph of a batch is augmented twice (:mod:`hardneg.graph.augment`, seeded by a
``torch.Generator``); the GIN encoder embeds both views (``y1, y2``, sum-pool of every layer) and
a projection head (``Linear-ReLU-Linear``) maps them to ``z1, z2``. The loss is the registered
strategy's ``hardneg.create_loss(name)(z1, z2)``: the two views of a graph are positives, the
other graphs' views in the batch are negatives (SimCLR's in-batch contrast set). The encoder
outputs ``y1, y2`` go in as ``h1, h2`` for strategies that score pre-projection features
(``feature_kind = 'hidden'``), and the generator for those that draw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hardneg.graph.augment import AUGMENTATIONS, augment
from hardneg.graph.encoder import GINEncoder
from hardneg.registry import create_loss


class GraphCL(nn.Module):
    """Two augmented views per graph, in-batch negatives, a registered strategy.

    Args:
        in_features: node feature dimension of the data.
        loss: registered strategy name.
        loss_hparams: its hyper-parameters and loss-level settings.
        augmentations: the pair of augmentations of the two views (each a name of
            :data:`hardneg.graph.augment.AUGMENTATIONS`); GraphCL's default pairs node dropping
            with subgraph sampling.
        ratio: the augmentations' strength (GraphCL: 0.2).
        hidden, num_layers: the GIN encoder's width and depth.
        projection_dim: output width of the projection head (default: the embedding width).
    """

    def __init__(
        self,
        in_features: int,
        *,
        loss: str = "infonce",
        loss_hparams: dict[str, Any] | None = None,
        augmentations: tuple[str, str] = ("drop_nodes", "subgraph"),
        ratio: float = 0.2,
        hidden: int = 32,
        num_layers: int = 3,
        projection_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(augmentations) != 2 or any(a not in AUGMENTATIONS for a in augmentations):
            raise ValueError(
                f"augmentations must be two of {', '.join(AUGMENTATIONS)}, got {augmentations!r}"
            )
        self.loss_name = loss
        self.augmentations = tuple(augmentations)
        self.ratio = float(ratio)
        self.loss = create_loss(loss, **dict(loss_hparams or {}))
        self.encoder = GINEncoder(in_features, hidden=hidden, num_layers=num_layers)
        dim = self.encoder.embedding_dim
        out = projection_dim or dim
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))

    def view(self, data, name: str, generator: torch.Generator | None) -> Tensor:
        x, edge_index, batch = augment(
            data.x.float(), data.edge_index, data.batch, name, ratio=self.ratio, generator=generator
        )
        y, _ = self.encoder(x, edge_index, batch, int(data.num_graphs))
        return y

    def forward(
        self,
        data,
        *,
        progress: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if int(data.num_graphs) < 2:
            raise ValueError("GraphCL needs at least 2 graphs per batch (in-batch negatives)")
        y1 = self.view(data, self.augmentations[0], generator)
        y2 = self.view(data, self.augmentations[1], generator)
        z1, z2 = self.projection(y1), self.projection(y2)
        hidden = self.loss.feature_kind == "hidden"
        return self.loss(
            z1,
            z2,
            h1=y1 if hidden else None,
            h2=y2 if hidden else None,
            progress=progress,
            generator=generator if self.loss.draws else None,
        )
