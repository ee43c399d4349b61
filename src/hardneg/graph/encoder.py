"""The GIN encoder of InfoGraph and HCL's graph code, and degree features for unlabelled nodes.

Layer ``l`` (``l = 1..L``) maps node states with a GIN convolution whose update network is
``Linear - ReLU - Linear``, then a ReLU and a batch norm:

    h_l = BN( ReLU( GINConv_l(h_{l-1}) ) )

Node encodings are every layer's state side by side, ``M = [h_1 | ... | h_L]`` (``[nodes, L d]``);
the graph embedding is the sum-pool of each layer, concatenated (``[graphs, L d]``). Defaults:
``L = 3``, ``d = 32`` (HCL's ``launch.sh``).

Nodes without features get a one-hot encoding of their degree (``0..max_degree``), or, when the
largest degree is 1000 or more, the degree standardised by its mean and standard deviation over
the data set (:func:`degree_feature_transform`), as in HCL's ``deepinfomax.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GINConv, global_add_pool
from torch_geometric.utils import degree

from hardneg._checks import check_number

#: above this largest degree, one-hot degrees give way to a standardised scalar degree
ONE_HOT_MAX_DEGREE = 1000


class GINEncoder(nn.Module):
    """GIN layers with ``Linear-ReLU-Linear`` updates, ReLU and batch norm; sum-pool of every layer.

    Args:
        in_features: node feature dimension of the data (checked on every call).
        hidden: width ``d`` of every layer.
        num_layers: number of GIN layers ``L``; embeddings have ``L d`` dimensions.
    """

    def __init__(self, in_features: int, *, hidden: int = 32, num_layers: int = 3) -> None:
        super().__init__()
        self.in_features = int(check_number("in_features", in_features, low=1, integer=True))
        self.hidden = int(check_number("hidden", hidden, low=1, integer=True))
        self.num_layers = int(check_number("num_layers", num_layers, low=1, integer=True))
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        width = self.in_features
        for _ in range(self.num_layers):
            update = nn.Sequential(
                nn.Linear(width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden)
            )
            self.convs.append(GINConv(update))
            self.norms.append(nn.BatchNorm1d(self.hidden))
            width = self.hidden

    @property
    def embedding_dim(self) -> int:
        return self.hidden * self.num_layers

    def forward(
        self, x: Tensor, edge_index: Tensor, batch: Tensor, num_graphs: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(graph embeddings [G, L d], node encodings [nodes, L d])``."""
        if x is None:
            raise ValueError(
                "the graphs have no node features: load them with degree features "
                "(hardneg.graph.data, degree='auto') or set data.x"
            )
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"the encoder expects node features of dimension {self.in_features}, got shape "
                f"{tuple(x.shape)}: build GINEncoder(in_features=dataset.num_features)"
            )
        x = x.float() if not x.is_floating_point() else x
        states = []
        h = x
        for conv, norm in zip(self.convs, self.norms):
            h = norm(F.relu(conv(h, edge_index)))
            states.append(h)
        size = int(batch.max()) + 1 if num_graphs is None else num_graphs
        pooled = [global_add_pool(s, batch, size=size) for s in states]
        return torch.cat(pooled, dim=1), torch.cat(states, dim=1)


class OneHotDegree:
    """Sets ``data.x`` to the one-hot degree ``[nodes, max_degree + 1]`` (a PyG transform)."""

    def __init__(self, max_degree: int) -> None:
        self.max_degree = int(max_degree)

    def __call__(self, data):
        deg = degree(data.edge_index[0], num_nodes=data.num_nodes, dtype=torch.long)
        data.x = F.one_hot(deg.clamp(max=self.max_degree), self.max_degree + 1).float()
        return data

    def __repr__(self) -> str:
        return f"OneHotDegree(max_degree={self.max_degree})"


class StandardisedDegree:
    """Sets ``data.x`` to ``(degree - mean) / std`` ``[nodes, 1]`` (a PyG transform)."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std) if std > 0 else 1.0

    def __call__(self, data):
        deg = degree(data.edge_index[0], num_nodes=data.num_nodes, dtype=torch.float)
        data.x = ((deg - self.mean) / self.std).view(-1, 1)
        return data

    def __repr__(self) -> str:
        return f"StandardisedDegree(mean={self.mean:.3g}, std={self.std:.3g})"


def degree_feature_transform(graphs: Iterable) -> OneHotDegree | StandardisedDegree:
    """The degree features HCL's graph code gives unlabelled nodes, fitted on ``graphs``.

    One-hot degree up to the largest degree of the data set when that is below
    :data:`ONE_HOT_MAX_DEGREE`, else the standardised degree.
    """
    degrees = []
    for data in graphs:
        degrees.append(degree(data.edge_index[0], num_nodes=data.num_nodes, dtype=torch.long))
    if not degrees:
        raise ValueError("cannot fit degree features on an empty data set")
    deg = torch.cat(degrees)
    max_degree = int(deg.max()) if deg.numel() else 0
    if max_degree < ONE_HOT_MAX_DEGREE:
        return OneHotDegree(max_degree)
    deg = deg.float()
    return StandardisedDegree(deg.mean().item(), deg.std().item())
