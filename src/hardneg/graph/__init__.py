"""Graph contrastive learning with every hardneg strategy (needs the ``graph`` extra).

* :mod:`hardneg.graph.encoder` — the GIN encoder of InfoGraph / HCL's graph code and the
  degree features of unlabelled nodes;
* :mod:`hardneg.graph.infograph` — InfoGraph's local-global framework (node-graph pairs), with the
  Jensen-Shannon objective, HCL's ``JSD_hard`` weighting (:mod:`hardneg.graph.jsd_hard`) or any
  InfoNCE-family strategy;
* :mod:`hardneg.graph.graphcl` — graph-graph contrast of two augmented views
  (:mod:`hardneg.graph.augment`) with in-batch negatives: every registered strategy;
* :mod:`hardneg.graph.data` — TU data sets from a folder and the embedded motif graphs;
* :mod:`hardneg.graph.evaluate` — frozen embeddings scored by an RBF SVM in 10-fold CV (the
  InfoGraph / HCL protocol), kNN and a linear probe.

Install with ``pip install "hardneg[graph]"`` (PyTorch Geometric, no compiled extras needed).
"""

from __future__ import annotations

import warnings

try:
    with warnings.catch_warnings():
        # PyG scripts a helper with torch.jit.script at import: torch >= 2.10 deprecates it,
        # a warning on every graph command that the user can do nothing about
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        import torch_geometric  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        "hardneg.graph needs PyTorch Geometric: install the graph extra with "
        '`pip install "hardneg[graph]"` (or `pip install torch_geometric`)'
    ) from err

from hardneg.graph.encoder import GINEncoder, degree_feature_transform  # noqa: E402

__all__ = ["GINEncoder", "degree_feature_transform"]
