"""InfoGraph's local-global framework (Sun et al., ICLR 2020) with any hardneg strategy.

The GIN encoder gives node encodings ``M`` and graph embeddings ``y``; two feed-forward heads
(three ``Linear-ReLU`` layers plus a linear shortcut) map them to ``l = FF_local(M)`` and
``g = FF_global(y)``. Every (node, graph) pair of the batch is scored by the dot product
``l_i . g_j``: a node with its own graph is a positive pair, a node with any other graph of the
batch a negative. In hardneg terms that is one contrast set (:func:`hardneg.contrast.build_contrast`
with the nodes as anchors, the graphs as columns and ``positive_index = batch[:, None]``), so a
registered strategy weights the negatives and an objective turns it into the loss:

* ``objective='jsd'``: the Jensen-Shannon (Fenchel-dual) estimator
  (:func:`hardneg.objectives.jsd_objective`), raw dot products, ``t = 1`` — InfoGraph's loss
  with the ``infonce`` strategy (uniform weights), its debiased form with ``tau_plus > 0``, and any
  strategy's weights on the negative expectation;
* ``objective='jsd_hard'``: HCL's graph objective exactly as the authors' code computes it
  (:func:`hardneg.graph.jsd_hard.jsd_hard_loss`), with the ``hcl`` strategy's ``beta``;
  ``direction='hard'`` flips the sign of its weights. The default for ``hcl``.
* ``objective='infonce'``: the InfoNCE family on the same pairs (cosine scores and the strategy's
  temperature by default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hardneg._checks import check_choice
from hardneg.contrast import build_contrast
from hardneg.graph.encoder import GINEncoder
from hardneg.graph.jsd_hard import DIRECTIONS, jsd_hard_loss
from hardneg.objectives import objective_loss
from hardneg.registry import loss_settings, strategy_class
from hardneg.strategies.base import StepContext

INFOGRAPH_OBJECTIVES = ("jsd", "jsd_hard", "infonce")

#: loss-level settings that each objective never reads (InfoGraph picks its objective with its
#: own argument and applies no filter)
_UNUSED_SETTINGS = {
    "infonce": ("objective", "filter", "filter_options"),
    "jsd": ("objective", "filter", "filter_options", "temperature", "normalize"),
    "jsd_hard": ("objective", "filter", "filter_options", "temperature", "normalize", "tau_plus"),
}
_UNUSED_WHY = {
    "infonce": "InfoGraph takes its objective as objective=..., and applies no filter",
    "jsd": "InfoGraph's Jensen-Shannon scores raw dot products at temperature 1 (and takes "
    "its objective as objective=..., with no filter); objective='infonce' uses temperature",
    "jsd_hard": "HCL's JSD_hard scores raw dot products with the authors' tau_plus = 0.5 "
    "(jsd_tau), and takes no temperature or filter; objective='jsd' or 'infonce' use tau_plus",
}


class FF(nn.Module):
    """InfoGraph's discriminator head: three ``Linear-ReLU`` layers plus a linear shortcut."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Linear(dim, dim),
            nn.ReLU(),
            nn.Linear(dim, dim),
            nn.ReLU(),
            nn.Linear(dim, dim),
            nn.ReLU(),
        )
        self.shortcut = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) + self.shortcut(x)


def split_hparams(name: str, hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(loss-level settings with the strategy's defaults, strategy hyper-parameters)``."""
    cls = strategy_class(name)
    settings = loss_settings(name)
    own = set(cls.hparam_names())
    unknown = [k for k in hparams if k not in settings and k not in own]
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for loss {name!r}; "
            f"allowed: {', '.join(sorted(settings) + sorted(own))}"
        )
    settings.update({k: v for k, v in hparams.items() if k in settings})
    return settings, {k: v for k, v in hparams.items() if k in own}


class InfoGraph(nn.Module):
    """Local-global graph contrast with a registered strategy.

    Args:
        in_features: node feature dimension of the data.
        loss: registered strategy name (``hardneg.list_losses()``).
        loss_hparams: the strategy's hyper-parameters and loss-level settings (``beta``,
            ``tau_plus``, ``temperature``...).
        objective: ``'jsd'``, ``'jsd_hard'`` or ``'infonce'``; default ``'jsd_hard'`` for
            ``hcl`` (the authors' graph code) and ``'jsd'`` otherwise.
        direction: for ``'jsd_hard'``: ``'authors'`` (the code's ``exp(-2 beta q / m)``) or
            ``'hard'`` (``exp(+2 beta q / m)``).
        jsd_tau: ``tau`` of ``'jsd_hard'`` (the code's default 0.5 is the only value it runs).
        hidden, num_layers: the GIN encoder's width and depth.
    """

    def __init__(
        self,
        in_features: int,
        *,
        loss: str = "hcl",
        loss_hparams: dict[str, Any] | None = None,
        objective: str | None = None,
        direction: str = "authors",
        jsd_tau: float = 0.5,
        hidden: int = 32,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        self.loss_name = loss
        settings, strategy_hp = split_hparams(loss, dict(loss_hparams or {}))
        self.strategy = strategy_class(loss)(**strategy_hp)
        if objective is None:
            objective = "jsd_hard" if loss == "hcl" else "jsd"
        self.objective = check_choice("objective", objective, INFOGRAPH_OBJECTIVES)
        if self.objective == "jsd_hard" and not hasattr(self.strategy, "current_beta"):
            raise ValueError(
                f"objective='jsd_hard' is HCL's graph objective: it needs the 'hcl' strategy "
                f"(for {loss!r} use objective='jsd' or 'infonce')"
            )
        unused = [k for k in loss_hparams or {} if k in _UNUSED_SETTINGS[self.objective]]
        if unused:
            # a setting the objective never reads would be recorded with the run (results.json,
            # the compare table) as if it had shaped it
            raise ValueError(
                f"objective {self.objective!r} does not use {', '.join(map(repr, unused))}: "
                f"{_UNUSED_WHY[self.objective]}"
            )
        self.direction = check_choice("direction", direction, DIRECTIONS)
        self.jsd_tau = float(jsd_tau)
        self.tau_plus = float(settings.get("tau_plus", 0.0))
        if self.objective == "infonce":
            self.temperature = float(settings["temperature"])
            self.normalize = bool(settings["normalize"])
        else:  # InfoGraph scores raw dot products
            self.temperature, self.normalize = 1.0, False
        self.encoder = GINEncoder(in_features, hidden=hidden, num_layers=num_layers)
        dim = self.encoder.embedding_dim
        self.local_head = FF(dim)
        self.global_head = FF(dim)
        for m in self.modules():  # InfoGraph's initialisation of the linear layers
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def contrast(self, data):
        """The node-graph contrast set of a PyG batch (and the graph embeddings)."""
        num_graphs = int(data.num_graphs)
        if num_graphs < 2:
            raise ValueError("InfoGraph needs at least 2 graphs per batch (negatives)")
        y, m = self.encoder(data.x, data.edge_index, data.batch, num_graphs)
        g = self.global_head(y)
        node = self.local_head(m)
        contrast = build_contrast(
            node,
            g,
            positive_index=data.batch.unsqueeze(1),
            normalize=self.normalize,
            temperature=self.temperature,
        )
        return contrast, y

    def forward(
        self,
        data,
        *,
        progress: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        contrast, _ = self.contrast(data)
        if self.objective == "jsd_hard":
            beta = self.strategy.current_beta(progress)
            return jsd_hard_loss(contrast, beta=beta, tau=self.jsd_tau, direction=self.direction)
        context = StepContext(
            progress=progress,
            generator=generator,
            fast=False,
            want_log_mass=self.objective == "infonce",
        )
        selection = self.strategy.select(contrast, context)
        per_anchor = objective_loss(self.objective, contrast, selection, tau_plus=self.tau_plus)
        return per_anchor.mean()
