"""Projection heads and the PSM predictor.

``ProjectionHead(in_dim, hidden_dims, out_dim)``: ``[Linear -> BN -> ReLU] * len(hidden_dims)
-> Linear (-> BN)``. Linear layers followed by a BatchNorm have no bias (the BN's shift
replaces it), as in the HCL and SNCLR/PSM code. ``forward(x, return_hidden=True)`` also returns
``h``, the input of the last linear layer (UnReMix's last-layer gradient features).

The PSM layouts follow the authors' code (class ``PSM``, ``_build_mlp(2, ...)`` with its default
``last_bn=True``): projector ``in -> 512 -> out`` and predictor ``out -> 512 -> out``, both
``Linear(bias=False) - BN - ReLU - Linear(bias=False) - BN(affine=False)``. (A three-layer
projector is present in that code but commented out.)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        hidden_dims: int | Sequence[int],
        out_dim: int,
        batch_norm: bool = True,
        last_bn: bool = False,
        last_bn_affine: bool = False,
    ) -> None:
        super().__init__()
        hidden = [hidden_dims] if isinstance(hidden_dims, int) else list(hidden_dims)
        for name, v in [("in_dim", in_dim), ("out_dim", out_dim)] + [
            ("hidden_dims", h) for h in hidden
        ]:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be positive integers, got {v!r}")
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers.append(nn.Linear(prev, h, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            prev = h
        self.hidden = nn.Sequential(*layers)
        self.last = nn.Linear(prev, out_dim, bias=not last_bn)
        self.last_bn = nn.BatchNorm1d(out_dim, affine=last_bn_affine) if last_bn else nn.Identity()
        self.in_dim = in_dim
        self.hidden_dims = tuple(hidden)
        self.out_dim = out_dim

    def forward(self, x: Tensor, return_hidden: bool = False):
        h = self.hidden(x)
        z = self.last_bn(self.last(h))
        return (z, h) if return_hidden else z


HEADS = ("simclr", "moco_v2", "psm", "linear", "none")


def build_head(
    kind: str, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None
) -> nn.Module:
    """``simclr``: in -> 512 -> out, Linear-BN-ReLU-Linear (HCL's head, ``hidden_dim``
    overrides 512); ``moco_v2``: in -> in -> out, Linear-ReLU-Linear without BN (MoCo v2);
    ``psm``: in -> 512 -> out, Linear-BN-ReLU-Linear-BN with the last BN without affine
    parameters and no linear bias (the PSM code's projector; ``hidden_dim`` overrides 512);
    ``linear``: one Linear in -> out with bias (IR, Wu et al. 2018); ``none``: identity (returns the
    features, ``h = z``)."""
    if kind == "simclr":
        return ProjectionHead(in_dim, hidden_dim or 512, out_dim, batch_norm=True)
    if kind == "moco_v2":
        return ProjectionHead(in_dim, hidden_dim or in_dim, out_dim, batch_norm=False)
    if kind == "psm":
        return ProjectionHead(
            in_dim, hidden_dim or 512, out_dim, batch_norm=True, last_bn=True, last_bn_affine=False
        )
    if kind == "linear":
        # instance discrimination (Wu et al. 2018): one linear layer to a low-dim
        # embedding, no hidden layer (h = the backbone features)
        return ProjectionHead(in_dim, (), out_dim, batch_norm=False)
    if kind == "none":
        return IdentityHead(in_dim)
    raise ValueError(f"unknown head {kind!r}; available: {', '.join(HEADS)}")


class IdentityHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_dim = self.out_dim = dim

    def forward(self, x: Tensor, return_hidden: bool = False):
        return (x, x) if return_hidden else x


def build_predictor(dim: int = 128, hidden: int = 512, last_bn: bool = True) -> ProjectionHead:
    """Online predictor ``dim -> hidden -> dim``.

    ``last_bn=True`` (default): the PSM code's layout,
    ``Linear(bias=False) - BN - ReLU - Linear(bias=False) - BN(affine=False)``;
    ``last_bn=False``: ``Linear(bias=False) - BN - ReLU - Linear`` (BYOL-style, with a bias).
    """
    if not isinstance(last_bn, bool):
        raise ValueError(f"last_bn must be true or false, got {last_bn!r}")
    return ProjectionHead(dim, hidden, dim, batch_norm=True, last_bn=last_bn, last_bn_affine=False)
