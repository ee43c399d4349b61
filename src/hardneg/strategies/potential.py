"""Potential-sample mining, PSM (Dong, Long, Li, arXiv 2311.00358, 2023, "Rethinking Samples
Selection for Contrastive Learning: Mining of Potential Samples"), following the authors' code
(class ``PSM`` on SNCLR: ``soft_constrastive``, ``hard_contrastive``).

``q_i`` online outputs (after the predictor), ``k_i`` positive keys, ``s`` the cosine, ``T`` the
temperature. ``B_j = {k_j, n_j1..n_jK}`` is key ``j`` with its ``K`` nearest neighbours (cosine)
in the support set: the pool given as ``negatives=`` (a FIFO of momentum keys), else the other
keys of the batch. Mined loss, one direction::

    l_i  = sum_{p in B_i} w_ip (log D_i - s(q_i, p)/T)
    D_i  = sum_{p in B_i} e^{s(q_i, p)/T} + sum_{j != i} sum_{n in B_j} m_in e^{s(q_i, n)/T}
    m_in ~ Bernoulli(pi_in),  pi_in = min(clamp, exp(-a (s(q_i, n) - s(q_i, k_i) - b)^2))

(the SimANS kernel, no gradient through ``m`` or ``pi``). ``weighting='hard'`` (the code):
``w = 1``; ``'soft'``: ``w_{i,k_i} = 1``, ``w_{i,n_im} = softmax_m s(g_i, n_im)`` with ``g`` the
online projection before the predictor (``h1``/``h2``, ``feature_kind='projection'``; without it
``q`` itself; the weights are not detached, as in the code). ``D`` sums the positives
unweighted, as the code does. Augmentation loss: SimCLR over the ``2N`` rows ``r`` of ``[q; k]``,
partner ``r'``, negatives selected by the same kernel around ``sigma(r, r')``, ``sigma`` the
cosine or (``select_on='raw'``, the code) the raw dot product of the unnormalised inputs::

    l_r = log(e^{s(r,r')/T} + Ng_r) - s(r,r')/T,   Ng_r = sum_{u != r, r'} m_ru e^{s(r,u)/T}

``aug_pairing='broadcast'`` keeps the code's shape bug: ``mean_{r,c} [log(e^{s(r,r')/T} + Ng_c)
- s(r,r')/T]`` over all pairs of rows. ``L = L_mined + lambda L_aug``.

On the common path: ``L_mined`` is a contrast set with anchors ``q``, columns ``[k; pool]``, the
key as positive, the neighbours as extra positives (joint positives, summed), and as negative
weight of each column the number of its kept grid cells ``(j, m)``, ``j != i`` (``'expected'``:
the sum of their ``pi``). Call forms: ``loss(z1, z2)`` gives ``1/2 [L_mined(z1; z2) +
L_mined(z2; z1)] + lambda L_aug(z1, z2)`` (``L_aug(z2, z1)`` has the same rows in another order:
one selection serves both); ``loss(q, k, negatives=bank)`` gives ``L_mined(q; k) + lambda
L_aug(q, k)``, and two MoCo calls averaged are the paper's symmetric ``L``. ``exclude_index[i]``
(a memory bank's own entry of sample ``i``) is never a neighbour of ``k_i`` nor a negative of
``q_i``. In-batch a key that is one of ``i``'s positives is not its negative (our rule); with a
bank, a neighbour of ``k_i`` that also sits in another block is both, as in the code.

Draws (``sample='bernoulli'``, ``generator``) of the plain form (``fast=False``), per term in
order (in-batch: direction 1, direction 2, then ``L_aug``): one float32 ``torch.rand`` over the
term's cells, row-major. ``L_mined``:
``[N, N(K+1)]`` (column ``j(K+1) + m`` is member ``m`` of block ``j``), then ``Q`` pool cells
with ``pool_as_negatives``; ``L_aug``: ``[2N, 2N]``; masked cells are drawn too. The authors' code
masks its grid and draws in another order, so the same seed does not give their selections;
the law (independent Bernoulli cells) is the same. The fast path (``fast=True``, the default
outside ``torch.compile``) draws each column's count of kept cells instead,
``Binomial(m_ij, pi_ij)`` for the ``m_ij`` cells of row ``i`` that read column ``j``
(:func:`hardneg.fastpaths.kept_counts`): the same law, other draws for the same seed.
``'expected'`` uses ``pi`` without a draw (``m pi`` per column, equal on both paths).
In-batch (two views, no ``ids``, cosine logits, InfoNCE) the fast path builds all three terms
from the one Gram matrix of ``[z1; z2]`` (:func:`hardneg.fastpaths.potential_in_batch_terms`):
the neighbours, logits and keep probabilities are read from it, and the draws are random bytes
against ``floor(256 pi)`` with a uniform on a tie (same law, other draws; one byte stream per
call, on CPU numpy's ``PCG64`` seeded by the generator: docs/deviations.md, D-X9). With a bank
(cosine logits, InfoNCE, no ``pool_as_negatives``) the fast path
(:func:`hardneg.fastpaths.potential_pool_terms`) touches only the keys, read from ``L_aug``'s
Gram matrix, and the bank rows that sit in some block (the others are no candidates), with
the same byte draws, layer by layer.

Differences from the code, besides the options above: the in-batch form, its own-positive rule
and its single ``L_aug`` selection are ours; ``exclude_index`` is ours; one temperature serves
both losses (the code: ``self.T`` and ``args.temperature``); batch size and ``K`` are not
hard-coded; a kept negative with ``s = 0`` exactly counts (the code's ``exp(0 * s/T)`` trick drops
it). Cost: the neighbour look-up ``[N, d] x [d, N or Q]`` (no gradient), the mined logits
``[N, N (+ Q)]`` per direction, the ``L_aug`` Gram ``[2N, 2N]`` and ``N^2 (K + 1)`` uniforms per
mined direction (the fast path: a Bernoulli draw per column and layer of cells, no grid, and
the negative mass from the counts, :func:`hardneg.fastpaths.weighted_log_mass`). Diagnostics describe the first term, ``L_mined(z1; z2)``, per
column; ``LossOutput.terms`` holds the ``'mined'`` and ``'aug'`` parts of the loss.

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("potential", num_neighbors=5)
    >>> q, k, queue = torch.randn(32, 64), torch.randn(32, 64), torch.randn(512, 64)
    >>> g = torch.Generator().manual_seed(0)
    >>> bool(loss_fn(q, k, negatives=queue, generator=g) > 0), bool(loss_fn(q, k) > 0)
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg import fastpaths
from hardneg._checks import check_choice, check_flag, check_number
from hardneg.contrast import ContrastSet, build_contrast, in_batch_contrast
from hardneg.registry import register_strategy
from hardneg.strategies.base import Selection, StepContext, Strategy

if TYPE_CHECKING:
    from hardneg.losses.contrastive import ContrastInputs


@dataclass
class CellContrast(ContrastSet):
    """A contrast set whose negatives are cells kept by a draw.

    Attributes (besides :class:`~hardneg.contrast.ContrastSet`'s):
        cell_log_keep: ``[A, G]`` ``log pi`` of every cell, ``-inf`` where it is no negative.
        cells: ``[G]`` column of each cell (None: cell ``c`` is column ``c``).
        multiplicity: fast path (``cells`` None, ``cell_log_keep`` per column ``[A, C]``): the
            number of row ``i``'s cells that read column ``j`` ``[A, C]``.
        neighbours: ``[A, K]`` columns of each anchor's mined positives, or None.
        fast_log_mass: ``[A]`` the negative log-mass when the fast path already drew and summed
            the kept cells (:func:`hardneg.fastpaths.potential_in_batch_terms`), else None.
        fast_extra_positive_logits: ``[A, K]`` the mined positives' logits read by the fast
            path (hard weighting), else None.
        column_index: ``[C]`` when the fast path with a bank keeps only the columns that hold a
            cell (:func:`hardneg.fastpaths.potential_pool_terms`): each column's place in the
            plain form's columns ``[k; bank]``; else None (the columns are the plain form's).
    """

    cell_log_keep: Tensor | None = None
    cells: Tensor | None = None
    multiplicity: Tensor | None = None
    neighbours: Tensor | None = None
    fast_log_mass: Tensor | None = None
    fast_extra_positive_logits: Tensor | None = None
    column_index: Tensor | None = None


_FIELDS = tuple(f.name for f in fields(ContrastSet))  # read once: torch.compile traces getattr


def _with_cells(contrast: ContrastSet, **extra) -> CellContrast:
    """``contrast`` as a :class:`CellContrast`, with the fields in ``extra`` set or replaced."""
    return CellContrast(**{**{name: getattr(contrast, name) for name in _FIELDS}, **extra})


@register_strategy("potential", summary="Potential-sample mining, PSM (Dong, Long, Li 2023)")
class PotentialMining(Strategy):
    """Mined positives plus kernel-selected "potential" negatives (see the module docstring).

    Args:
        num_neighbors: ``K >= 0`` neighbours mined per key (capped at the support size).
        aug_weight: ``lambda >= 0``, weight of ``L_aug`` (0 skips it).
        a: ``>= 0``, width of the kernel ``exp(-a (s - s+ - b)^2)`` (0: keep with ``clamp``).
        b: shift of the kernel's peak from the positive similarity.
        clamp: upper bound of the keep probability, in (0, 1] (code: 0.999).
        weighting: ``'hard'`` (positive weights 1, what the code runs) or ``'soft'``.
        sample: ``'bernoulli'`` (draw the cells) or ``'expected'`` (``pi`` as the weight).
        select_on: similarity the kernel of ``L_aug`` reads: ``'cosine'`` or ``'raw'`` (the code).
        aug_pairing: ``'matched'`` (SimCLR) or ``'broadcast'`` (the code's shape bug).
        pool_as_negatives: every pool row is also a candidate negative of ``L_mined``.
    """

    loss_defaults = {"temperature": 0.5}
    supports_debiasing = False
    feature_kind = "projection"
    draws = True
    fixed_positive_mode = True  # mined: 'joint' with 'sum'; aug: 'separate' (objective_options)
    per_anchor_columns = False  # the support set is one shared bank

    def __init__(
        self,
        *,
        num_neighbors: int = 5,
        aug_weight: float = 0.5,
        a: float = 0.5,
        b: float = 0.0,
        clamp: float = 0.999,
        weighting: str = "hard",
        sample: str = "bernoulli",
        select_on: str = "cosine",
        aug_pairing: str = "matched",
        pool_as_negatives: bool = False,
    ) -> None:
        super().__init__()
        self.num_neighbors = int(check_number("num_neighbors", num_neighbors, low=0, integer=True))
        self.aug_weight = check_number("aug_weight", aug_weight, low=0.0)
        self.a = check_number("a", a, low=0.0)
        self.b = check_number("b", b)
        self.clamp = check_number("clamp", clamp, low=0.0, low_inclusive=False, high=1.0)
        self.weighting = check_choice("weighting", weighting, ("hard", "soft"))
        self.sample = check_choice("sample", sample, ("bernoulli", "expected"))
        self.select_on = check_choice("select_on", select_on, ("cosine", "raw"))
        self.aug_pairing = check_choice("aug_pairing", aug_pairing, ("matched", "broadcast"))
        self.pool_as_negatives = check_flag("pool_as_negatives", pool_as_negatives)

    @property
    def adds_positives(self) -> bool:  # the mined neighbours
        return True

    def log_keep(self, sims: Tensor, centre: Tensor, mask: Tensor) -> Tensor:
        """``log pi = min(log clamp, -a (s - s+ - b)^2)`` ``[A, S]``, ``-inf`` off ``mask``."""
        x = torch.where(mask, sims, 0.0) - centre.unsqueeze(1) - self.b
        return (-self.a * x * x).clamp(max=math.log(self.clamp)).masked_fill(~mask, float("-inf"))

    def terms(
        self, inputs: ContrastInputs, context: StepContext
    ) -> list[tuple[float, ContrastSet, str]]:
        if inputs.hard_negatives is not None or inputs.extra_views:
            raise ValueError(
                "potential takes two views, or (q, k, negatives=pool); "
                "not hard_negatives or extra_views"
            )
        if inputs.negatives is not None and inputs.negatives.dim() != 2:
            raise ValueError(
                "potential mines neighbours in one shared support set: negatives must be "
                f"[K, d], got shape {tuple(inputs.negatives.shape)} (a pool per anchor)"
            )
        z1, z2 = inputs.z1, inputs.z2
        for name, h in (("h1", inputs.h1), ("h2", inputs.h2)):
            if self.weighting == "soft" and h is not None and h.shape[-1] != z1.shape[-1]:
                raise ValueError(
                    f"potential's soft weights compare {name} (the projection before the "
                    f"predictor) with the mined keys: it needs their dim {z1.shape[-1]}, "
                    f"got {tuple(h.shape)}"
                )
        if context.fast and fastpaths.potential_in_batch_fits(self, inputs, context):
            return fastpaths.potential_in_batch_terms(self, inputs, context)
        if context.fast and fastpaths.potential_pool_fits(self, inputs, context):
            return fastpaths.potential_pool_terms(self, inputs, context)
        if inputs.negatives is None:
            out = [
                (0.5, self.mined(inputs, z1, z2, inputs.h1, fast=context.fast), "mined"),
                (0.5, self.mined(inputs, z2, z1, inputs.h2, fast=context.fast), "mined"),
            ]
        else:
            out = [(1.0, self.mined(inputs, z1, z2, inputs.h1, fast=context.fast), "mined")]
        if self.aug_weight > 0:
            out.append((self.aug_weight, self.augmentation(inputs), "aug"))
        return out

    def mined(
        self, inputs: ContrastInputs, q: Tensor, k: Tensor, g: Tensor | None, *, fast: bool = False
    ) -> CellContrast:
        """The contrast set of ``L_mined(q; k)`` with its grid cells and their ``log pi``
        (``fast``: ``log pi`` per column and each column's number of cells per anchor instead,
        for :func:`hardneg.fastpaths.kept_counts`)."""
        n, pool, exclude = q.shape[0], inputs.negatives, inputs.exclude_index
        rows = torch.arange(n, device=q.device)
        with torch.no_grad():  # neighbour look-up and the grid's structure
            key = F.normalize(k.detach().to(torch.promote_types(k.dtype, torch.float32)), dim=1)
            support = key if pool is None else F.normalize(pool.detach().to(key.dtype), dim=1)
            lookup = key @ support.T
            if pool is None:
                lookup[rows, rows] = float("-inf")  # a key is not its own neighbour
            elif exclude is not None:
                lookup[rows, exclude] = float("-inf")  # nor its sample's own bank entry
            masked = pool is None or exclude is not None
            num = min(self.num_neighbors, support.shape[0] - int(masked))
            offset = 0 if pool is None else n  # the pool's rows follow the n keys
            blocks = torch.cat([rows.unsqueeze(1), lookup.topk(num, dim=1).indices + offset], dim=1)
            del lookup  # [N, Q] with a bank: not kept alive next to the mined logits
            cells = blocks.reshape(-1)  # [N(K+1)], block j's members at j(K+1)..j(K+1)+K
            columns = n + (0 if pool is None else pool.shape[0])
            own = torch.zeros(n, columns, dtype=torch.bool, device=q.device).scatter_(
                1, blocks, True
            )
            if pool is None:  # (our rule) a key among i's positives is no negative of i
                negative = ~own
                if inputs.ids is not None:  # nor is a duplicate of the anchor
                    # ids may live on the host, as the contrast builders accept them
                    ids = inputs.ids.to(q.device)
                    negative &= ids.unsqueeze(0) != ids.unsqueeze(1)
            else:  # a column with a cell outside i's own block (or a pool cell) is a negative
                in_blocks = torch.zeros(columns, dtype=torch.long, device=q.device)
                negative = in_blocks.scatter_add_(0, cells, torch.ones_like(cells)) > own.long()
                if self.pool_as_negatives:
                    negative[:, n:] |= ~own[:, n:]
                if exclude is not None:
                    negative[rows, exclude + n] = False
        contrast = build_contrast(
            q,
            k if pool is None else torch.cat([k, pool.detach()]),
            temperature=inputs.temperature,
            positive_index=rows.unsqueeze(1),
            negative_mask=negative,
            normalize=inputs.normalize,
        )
        with torch.no_grad():  # log pi per column, then per cell; the own block holds positives
            t = inputs.temperature
            sims = contrast.negative_logits * t
            log_pi = self.log_keep(sims, contrast.positive_logits[:, 0] * t, contrast.mask())
            if fast:  # cells per column: all of the column's cells but those of i's own block
                total = torch.bincount(cells, minlength=columns).to(log_pi.dtype)
                others = total.clone()  # the column's cells when i's block holds none of them
                if pool is not None and self.pool_as_negatives:  # one more cell per pool row,
                    others[n:] += 1  # kept only for the anchors whose block does not hold it
                multiplicity = torch.where(own, total - 1, others)
        if fast:
            cell_log_keep, cells = log_pi, None
        else:
            multiplicity = None
            with torch.no_grad():
                cell_log_keep, cells = self.cell_grid(
                    log_pi, cells, own, n, columns, pool is not None
                )
        contrast.anchor_features = g
        if inputs.labels is not None:
            contrast.anchor_labels = inputs.labels
            if pool is None:
                contrast.column_labels = inputs.labels
            elif inputs.negative_labels is not None:
                contrast.column_labels = torch.cat(
                    [inputs.labels, inputs.negative_labels.to(inputs.labels.device)]
                )
        return _with_cells(
            contrast,
            cell_log_keep=cell_log_keep,
            cells=cells,
            multiplicity=multiplicity,
            neighbours=blocks[:, 1:],
        )

    def cell_grid(
        self, log_pi: Tensor, cells: Tensor, own: Tensor, n: int, columns: int, pooled: bool
    ) -> tuple[Tensor, Tensor]:
        """``log pi`` of every grid cell ``[A, G]`` (the anchor's own block ``-inf``) and the cells'
        columns ``[G]``."""
        cell_log_keep = log_pi[:, cells]
        rows = torch.arange(n, device=log_pi.device)
        cell_log_keep.view(n, n, -1)[rows, rows] = float("-inf")
        if pooled and self.pool_as_negatives:  # one more cell per pool row
            cells = torch.cat([cells, torch.arange(n, columns, device=log_pi.device)])
            pool_cells = log_pi[:, n:].masked_fill(own[:, n:], float("-inf"))
            cell_log_keep = torch.cat([cell_log_keep, pool_cells], dim=1)
        return cell_log_keep, cells

    def augmentation(self, inputs: ContrastInputs) -> CellContrast:
        """The contrast set of ``L_aug(z1, z2)``: SimCLR over ``[z1; z2]``, one cell per column."""
        ids = inputs.ids if inputs.negatives is None else None
        contrast = in_batch_contrast(
            (inputs.z1, inputs.z2),
            temperature=inputs.temperature,
            ids=ids,
            normalize=inputs.normalize,
        )
        with torch.no_grad():
            if self.select_on == "raw":  # the code's kernel on unnormalised dot products
                x = torch.cat([inputs.z1, inputs.z2]).detach().to(contrast.anchors.dtype)
                sims, centre = (
                    (x @ x.T).to(x.dtype),
                    (x * x.roll(inputs.z1.shape[0], dims=0)).sum(dim=1),
                )
            else:
                t = inputs.temperature
                sims, centre = contrast.negative_logits * t, contrast.positive_logits[:, 0] * t
            log_pi = self.log_keep(sims, centre, contrast.mask())
        if inputs.labels is not None and inputs.negatives is None:
            contrast.anchor_labels = contrast.column_labels = inputs.labels.repeat(2)
        return _with_cells(contrast, cell_log_keep=log_pi)

    def select_term(self, contrast: ContrastSet, context: StepContext, role: str) -> Selection:
        assert isinstance(contrast, CellContrast)
        if contrast.fast_log_mass is not None:  # drawn and summed by the fast path
            selection = Selection(negative_log_mass=contrast.fast_log_mass)
            if contrast.fast_extra_positive_logits is not None:  # hard weighting: weights 1
                selection.extra_positive_logits = contrast.fast_extra_positive_logits
                selection.unit_positive_weights = True
                return selection
            return self.positives(selection, contrast, role)
        assert contrast.cell_log_keep is not None
        logits = contrast.negative_logits
        with torch.no_grad():
            if context.fast and contrast.cells is None:  # per column, no grid
                counts = fastpaths.kept_counts(
                    contrast.cell_log_keep,
                    contrast.multiplicity,
                    sample=self.sample,
                    generator=context.generator,
                )
            else:
                counts = self.grid_counts(contrast, context)
        if context.fast and context.want_log_mass:  # the mass from the counts, no log w
            mass = fastpaths.weighted_log_mass(logits, counts)
            return self.positives(Selection(negative_log_mass=mass), contrast, role)
        with torch.no_grad():
            log_w = counts.log()
        # log sum_j w_ij e^{c_ij}, -inf (with a zero gradient, not NaN) where nothing is kept
        terms = logits + log_w
        kept = torch.isfinite(terms).any(dim=1, keepdim=True)
        log_mass = torch.logsumexp(torch.where(kept, terms, 0.0), dim=1).masked_fill(
            ~kept.squeeze(1), float("-inf")
        )
        selection = Selection(negative_log_weights=log_w, negative_log_mass=log_mass)
        return self.positives(selection, contrast, role)

    def positives(self, selection: Selection, contrast: CellContrast, role: str) -> Selection:
        """The term's positives: the mined ones (``L_mined``) or the broadcast pairing (``L_aug``)."""
        logits = contrast.negative_logits
        if role == "aug" and self.aug_pairing == "broadcast":  # every row's positive, each row's Ng
            selection.positive_weight = torch.zeros_like(contrast.positive_logits)
            selection.extra_positive_logits = contrast.positive_logits.T.expand(logits.shape[0], -1)
        elif contrast.neighbours is not None and contrast.neighbours.shape[1] > 0:
            mined = contrast.columns[contrast.neighbours]  # [A, K, d]
            selection.extra_positive_logits = (
                torch.einsum("ad,akd->ak", contrast.anchors, mined) / contrast.temperature
            ).to(logits.dtype)
            if self.weighting == "soft":
                g = (
                    contrast.anchors
                    if contrast.anchor_features is None
                    else contrast.anchor_features
                )
                g = F.normalize(g.to(mined.dtype), dim=1)
                selection.extra_positive_weight = (
                    torch.einsum("ad,akd->ak", g, F.normalize(mined, dim=-1))
                    .to(logits.dtype)
                    .softmax(dim=1)
                )
        return selection

    def grid_counts(self, contrast: CellContrast, context: StepContext) -> Tensor:
        """Plain form: kept cells per column ``[A, C]``, one uniform per grid cell (or ``pi``)."""
        assert contrast.cell_log_keep is not None
        pi = contrast.cell_log_keep.exp()
        if self.sample == "bernoulli":
            u = torch.rand(pi.shape, generator=context.generator, device=pi.device)
            pi = (u < pi).to(pi.dtype)
        counts = pi
        if contrast.cells is not None:  # kept cells per column
            index = contrast.cells.expand(pi.shape[0], -1)
            counts = torch.zeros_like(contrast.negative_logits).scatter_add_(1, index, pi)
        return counts

    def objective_options(self, role: str) -> dict[str, str]:
        if role == "mined":  # l_i = sum_p w_ip (log D_i - a_ip), every positive inside D_i
            return {"positive_mode": "joint", "positive_reduction": "sum"}
        return {"positive_mode": "separate", "positive_reduction": "mean"}
