"""GraphCL's four graph augmentations (You et al., NeurIPS 2020), batched on tensors and seeded.

Each function takes a batch of graphs as plain tensors — node features ``x [n, f]``,
``edge_index [2, e]`` (both directions of every undirected edge, as PyG stores them) and
``batch [n]`` (the graph of each node, sorted, as PyG's ``Batch`` has it) — and a
``torch.Generator``, and returns the augmented ``(x, edge_index, batch)``. Every graph of the
batch is transformed at once, without a Python loop over graphs, and keeps at least one node.

* :func:`drop_nodes` — each node is dropped with probability ``ratio`` (with its edges);
* :func:`perturb_edges` — each undirected edge is removed with probability ``ratio`` and as many
  random edges are added inside the same graphs;
* :func:`mask_attributes` — each node's features are set to 0 with probability ``ratio``
  (GraphCL draws Gaussian noise instead; 0 keeps one-hot features in their range);
* :func:`sample_subgraph` — a connected region of ``ceil((1 - ratio) n_g)`` nodes grown from a
  random node of each graph by adding random frontier nodes (a random jump when a component
  is exhausted), and the subgraph it induces.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hardneg._checks import check_number

GraphTensors = tuple[Tensor, Tensor, Tensor]


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device)


def _graph_sizes(batch: Tensor, num_graphs: int) -> Tensor:
    return torch.bincount(batch, minlength=num_graphs)


def induced_subgraph(x: Tensor, edge_index: Tensor, batch: Tensor, keep: Tensor) -> GraphTensors:
    """Keep the nodes where ``keep`` is True and the edges between them (renumbered)."""
    new_id = torch.cumsum(keep.long(), 0) - 1
    both = keep[edge_index[0]] & keep[edge_index[1]]
    return x[keep], new_id[edge_index[:, both]], batch[keep]


def _keep_one_per_graph(keep: Tensor, score: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Force the highest-scoring node of every graph to stay."""
    best = torch.full((num_graphs,), -1.0, device=score.device).scatter_reduce(
        0, batch, score, reduce="amax"
    )
    return keep | (score == best[batch])


def drop_nodes(
    x: Tensor,
    edge_index: Tensor,
    batch: Tensor,
    *,
    ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> GraphTensors:
    """Drop each node with probability ``ratio`` (every graph keeps at least one node)."""
    check_number("ratio", ratio, low=0.0, high=1.0, high_inclusive=False)
    num_graphs = int(batch.max()) + 1 if batch.numel() else 0
    u = _uniform(x.shape[0], generator, x.device)
    keep = _keep_one_per_graph(u >= ratio, u, batch, num_graphs)
    return induced_subgraph(x, edge_index, batch, keep)


def perturb_edges(
    x: Tensor,
    edge_index: Tensor,
    batch: Tensor,
    *,
    ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> GraphTensors:
    """Remove each undirected edge with probability ``ratio``; add as many random edges inside
    the graphs the removed ones came from (no self-loops)."""
    check_number("ratio", ratio, low=0.0, high=1.0, high_inclusive=False)
    device = x.device
    num_graphs = int(batch.max()) + 1 if batch.numel() else 0
    und = edge_index[:, edge_index[0] < edge_index[1]]
    removed = _uniform(und.shape[1], generator, device) < ratio
    kept = und[:, ~removed]
    graphs = batch[und[0, removed]]  # one new edge in the graph of each removed one
    sizes = _graph_sizes(batch, num_graphs)
    start = torch.cumsum(sizes, 0) - sizes
    u = start[graphs] + (_uniform(graphs.numel(), generator, device) * sizes[graphs]).long()
    v = start[graphs] + (_uniform(graphs.numel(), generator, device) * sizes[graphs]).long()
    added = torch.stack([torch.minimum(u, v), torch.maximum(u, v)])
    added = added[:, added[0] != added[1]]
    new = torch.cat([kept, added], dim=1)
    new = torch.unique(new, dim=1) if new.numel() else new
    return x, torch.cat([new, new.flip(0)], dim=1), batch


def mask_attributes(
    x: Tensor,
    edge_index: Tensor,
    batch: Tensor,
    *,
    ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> GraphTensors:
    """Set each node's features to 0 with probability ``ratio``."""
    check_number("ratio", ratio, low=0.0, high=1.0, high_inclusive=False)
    masked = _uniform(x.shape[0], generator, x.device) < ratio
    return x.masked_fill(masked.unsqueeze(1), 0.0), edge_index, batch


def sample_subgraph(
    x: Tensor,
    edge_index: Tensor,
    batch: Tensor,
    *,
    ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> GraphTensors:
    """Grow a region of ``ceil((1 - ratio) n_g)`` nodes from a random node of each graph."""
    check_number("ratio", ratio, low=0.0, high=1.0, high_inclusive=False)
    device = x.device
    n = x.shape[0]
    num_graphs = int(batch.max()) + 1 if n else 0
    sizes = _graph_sizes(batch, num_graphs)
    target = torch.clamp(torch.ceil((1.0 - ratio) * sizes.double()).long(), min=1)
    inside = _keep_one_per_graph(
        torch.zeros(n, dtype=torch.bool, device=device),
        _uniform(n, generator, device),
        batch,
        num_graphs,
    )
    src, dst = edge_index
    for _ in range(int(sizes.max()) if n else 0):
        count = _graph_sizes(batch[inside], num_graphs)
        need = target - count
        if not bool((need > 0).any()):
            break
        frontier = torch.zeros(n, dtype=torch.bool, device=device)
        frontier[dst[inside[src] & ~inside[dst]]] = True
        # a graph whose region has no frontier left jumps to any node outside it
        stuck = _graph_sizes(batch[frontier], num_graphs) == 0
        candidates = frontier | (~inside & stuck[batch])
        candidates &= need[batch] > 0
        # random rank of each candidate within its graph; take the first `need`
        # sorted by graph first, candidates before the other nodes of their graph
        priority = 2.0 * batch.double() + _uniform(n, generator, device).double()
        priority = priority + (~candidates).double()
        order = torch.argsort(priority)
        ordered_graph = batch[order]
        first = torch.searchsorted(ordered_graph, torch.arange(num_graphs, device=device))
        rank = torch.arange(n, device=device) - first[ordered_graph]
        take = torch.zeros(n, dtype=torch.bool, device=device)
        take[order] = candidates[order] & (rank < need[ordered_graph])
        inside |= take
    return induced_subgraph(x, edge_index, batch, inside)


AUGMENTATIONS: dict[str, Callable[..., GraphTensors]] = {
    "drop_nodes": drop_nodes,
    "perturb_edges": perturb_edges,
    "mask_attributes": mask_attributes,
    "subgraph": sample_subgraph,
}


def augment(
    x: Tensor,
    edge_index: Tensor,
    batch: Tensor,
    name: str,
    *,
    ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> GraphTensors:
    """Apply the augmentation called ``name`` (:data:`AUGMENTATIONS`)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    return AUGMENTATIONS[name](x, edge_index, batch, ratio=ratio, generator=generator)


def expected_kept(size: int, ratio: float) -> int:
    """Nodes :func:`sample_subgraph` keeps of a graph of ``size`` nodes."""
    return max(1, math.ceil((1.0 - ratio) * size))
