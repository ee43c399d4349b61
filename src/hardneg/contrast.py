"""The contrast set: who each anchor is compared with, and how much each comparison counts.

One description serves every method, modality and framework (the "pool" of the data flow
data -> views -> encoder -> **contrast set** -> strategy -> objective):

* ``A`` anchors, each with ``P >= 1`` positives (``positive_logits [A, P]``, weights
  ``positive_weight [A, P]``; a weight of 0 marks padding when anchors have different numbers
  of positives);
* ``S`` negative columns (``negative_logits [A, S]``, ``-inf`` where a column is *not* a negative
  of that anchor: itself, one of its positives, a duplicate, a known false negative, an excluded
  bank entry). The first ``C`` columns are shared by all anchors (``columns [C, d]``: in-batch
  views, a queue, a memory bank, every positive and hard negative of a retrieval batch); the
  last ``h`` are each anchor's own explicit columns (``anchor_columns [A, h, d]``, the
  ``(anchor, positive, negative_1..h)`` layout of retrieval data), so ``S = C + h``.

Logits are ``s / t`` with ``s`` the cosine similarity (``normalize=True``) or the raw dot product
(``normalize=False``, what InfoGraph's Jensen-Shannon objective uses). They are computed in the
inputs' precision: float64 inputs give float64 logits; float16 / bfloat16 inputs are promoted to
float32 before any exponential.

Builders:

* :func:`in_batch_contrast` — SimCLR: ``V >= 2`` views of ``N`` samples give ``A = VN`` anchors,
  each with ``V - 1`` positives (the sample's other views) and ``VN - V`` negatives; optional
  ``ids`` mask duplicates (rows of other samples with the same id are neither positive nor
  negative).
* :func:`pool_contrast` — MoCo queue / memory bank: queries ``q [N, d]``, positive keys
  ``k [N, d]``, an external pool ``[K, d]`` (never back-propagated); ``exclude_index`` masks each
  query's own bank entry.
* :func:`retrieval_contrast` — text retrieval: anchors, positives and ``k`` hard-negative
  columns; every positive and hard negative of the batch is a candidate of every anchor
  (sentence-transformers' ``MultipleNegativesRankingLoss`` layout), ids mask duplicates.
* :func:`build_contrast` — the general form the others reduce to.

Example (the ``M`` column of the call-form table in ``docs/methods.md``):
    >>> import torch
    >>> from hardneg.contrast import in_batch_contrast, pool_contrast, retrieval_contrast
    >>> z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    >>> c = in_batch_contrast([z1, z2], temperature=0.5)  # 2N anchors; M = 2N - 2
    >>> tuple(c.negative_logits.shape), c.num_negatives, c.positive_index[:, 0].tolist()
    ((8, 8), 6, [4, 5, 6, 7, 0, 1, 2, 3])
    >>> bank = torch.randn(16, 8)  # M = K - 1: each query's own bank row is masked
    >>> c = pool_contrast(z1, z2, bank, temperature=0.5, exclude_index=torch.arange(4))
    >>> tuple(c.negative_logits.shape), c.num_negatives
    ((4, 16), 15)
    >>> c = retrieval_contrast(z1, z2, torch.randn(4, 3, 8), temperature=0.5)  # M = N + N h - 1
    >>> tuple(c.negative_logits.shape), c.num_negatives
    ((4, 16), 15)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._checks import check_choice, check_number


@dataclass
class ContrastSet:
    """Per-anchor positives and negative columns of one step.

    Attributes:
        anchors: ``[A, d]`` anchor embeddings (L2-normalised when ``normalized``).
        columns: ``[C, d]`` shared column embeddings.
        anchor_columns: ``[A, h, d]`` each anchor's own explicit columns, or None (``h = 0``).
        positives: ``[A, P, d]`` embeddings of each anchor's positives.
        positive_logits: ``[A, P]`` ``s(i, p) / t``.
        positive_weight: ``[A, P]`` weight of each positive (0 = padding).
        positive_index: ``[A, P]`` column index of each positive when it is also a shared
            column (in-batch, retrieval), else -1; None when no positive is a column.
        negative_logits: ``[A, S]`` ``s(i, j) / t``, ``-inf`` where ``j`` is not a negative of ``i``.
        negative_mask: ``[A, S]`` bool, True where ``j`` is a negative of ``i``; None = all are.
        num_negatives: ``M``: an int when every anchor has as many negatives, else ``[A]``.
        temperature: ``t``.
        normalized: whether embeddings were L2-normalised (``s`` is a cosine).
        anchor_features: ``[A, h']`` pre-projection features of the anchors, or None.
        column_features: ``[C, h']`` pre-projection features of the shared columns, or None.
        column_labels: ``[C]`` class ids of the shared columns (diagnostics only), or None.
        anchor_labels: ``[A]`` class ids of the anchors (diagnostics only), or None.
        own_columns: ``[A, S]`` bool, the shared columns that belong to the anchor's own tuple
            (retrieval: its positive and its hard negatives), or None (see
            :meth:`own_column_mask`).
    """

    anchors: Tensor
    columns: Tensor
    anchor_columns: Tensor | None
    positives: Tensor
    positive_logits: Tensor
    positive_weight: Tensor
    positive_index: Tensor | None
    negative_logits: Tensor
    negative_mask: Tensor | None
    num_negatives: int | Tensor
    temperature: float
    normalized: bool = True
    anchor_features: Tensor | None = None
    column_features: Tensor | None = None
    column_labels: Tensor | None = None
    anchor_labels: Tensor | None = None
    own_columns: Tensor | None = None

    def own_column_mask(self) -> Tensor:
        """``[A, S]`` bool: the columns of the anchor's own tuple (its positives and its own
        explicit hard negatives, in the retrieval layout, and its per-anchor columns)."""
        if self.own_columns is not None:
            return self.own_columns
        own = torch.zeros_like(self.negative_logits, dtype=torch.bool)
        if self.anchor_columns is not None:
            own[:, self.num_shared :] = True
        return own

    @property
    def num_anchors(self) -> int:
        return self.negative_logits.shape[0]

    @property
    def num_shared(self) -> int:
        """``C``, the number of shared columns."""
        return self.columns.shape[0]

    @property
    def single_positive(self) -> bool:
        return self.positive_logits.shape[1] == 1

    def mask(self) -> Tensor:
        """``[A, S]`` bool negative mask (materialised when ``negative_mask`` is None)."""
        if self.negative_mask is not None:
            return self.negative_mask
        return torch.ones_like(self.negative_logits, dtype=torch.bool)

    def log_num_negatives(self) -> float | Tensor:
        """``log M`` (a float, or ``[A]``)."""
        if isinstance(self.num_negatives, int):
            return math.log(self.num_negatives)
        return self.num_negatives.to(self.negative_logits.dtype).log()

    def restricted(self, keep: Tensor) -> ContrastSet:
        """The same contrast set with only the negatives where ``keep`` ``[A, S]`` is True (a
        filter in front of a strategy); ``num_negatives`` becomes the per-anchor count."""
        mask = self.mask() & keep
        return replace(
            self,
            negative_logits=self.negative_logits.masked_fill(~keep, float("-inf")),
            negative_mask=mask,
            num_negatives=mask.sum(dim=1),
        )


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (half precisions are promoted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare(x: Tensor, dtype: torch.dtype, normalize: bool, fast: bool = False) -> Tensor:
    x = x.to(dtype)
    if not normalize:
        return x
    if fast:  # the same rows with a written-out backward (hardneg.fastpaths.unit_rows)
        from hardneg.fastpaths import unit_rows

        return unit_rows(x)
    return F.normalize(x, dim=-1)


def build_contrast(
    anchors: Tensor,
    columns: Tensor,
    *,
    temperature: float,
    positive_index: Tensor | None = None,
    positives: Tensor | None = None,
    positive_weight: Tensor | None = None,
    anchor_columns: Tensor | None = None,
    negative_mask: Tensor | None = None,
    normalize: bool = True,
    detach_columns: bool = False,
    fast: bool = False,
) -> ContrastSet:
    """The general contrast set.

    Args:
        anchors: ``[A, d]``.
        columns: ``[C, d]`` shared columns.
        temperature: ``t > 0``.
        positive_index: ``[A, P]`` column index of each anchor's positives among the shared
            columns; those columns are never negatives of that anchor.
        positives: ``[A, P, d]`` (or ``[A, d]``) explicit positives that are not columns
            (a MoCo key); give exactly one of ``positive_index`` and ``positives``.
        positive_weight: ``[A, P]`` (default: all 1; 0 marks padding).
        anchor_columns: ``[A, h, d]`` per-anchor explicit negatives, appended after the ``C``.
        negative_mask: ``[A, C]`` bool, False where a shared column must not be a negative
            (besides the anchor's positives, which are always excluded).
        normalize: L2-normalise every embedding (cosine similarity).
        detach_columns: no gradient through the shared columns (a queue, a bank).
        fast: normalise with :func:`hardneg.fastpaths.unit_rows` (same values, a cheaper
            backward) instead of ``F.normalize``.
    """
    given = (anchors, columns, positives, anchor_columns)
    dtype = compute_dtype(*[x for x in given if x is not None])
    a = _prepare(anchors, dtype, normalize, fast)
    c = _prepare(columns.detach() if detach_columns else columns, dtype, normalize, fast)
    if (positive_index is None) == (positives is None):
        raise ValueError("give exactly one of positive_index and positives")
    # 1/t folded into the [A, d] operand: one pass less over the [A, C] logits
    # under autocast the product may run in half precision: promote before any exponential
    logits = ((a / temperature) @ c.T).to(dtype)
    if positives is not None:
        p = _prepare(
            positives if positives.dim() == 3 else positives.unsqueeze(1), dtype, normalize, fast
        )
        pos_logits = torch.einsum("ad,apd->ap", a, p).to(dtype) / temperature
        pos_index = None
    else:
        assert positive_index is not None
        pos_index = positive_index.to(device=logits.device, dtype=torch.long)
        if pos_index.dim() == 1:
            pos_index = pos_index.unsqueeze(1)
        p = c[pos_index]
        pos_logits = logits.gather(1, pos_index)
    mask = None
    if pos_index is not None or negative_mask is not None:
        mask = (
            torch.ones_like(logits, dtype=torch.bool)
            if negative_mask is None
            else negative_mask.to(logits.device).clone()
        )
        if pos_index is not None:
            mask.scatter_(1, pos_index, False)
        logits = logits.masked_fill(~mask, float("-inf"))
    ac = None
    if anchor_columns is not None:
        ac = _prepare(anchor_columns, dtype, normalize, fast)
        own = torch.einsum("ad,ahd->ah", a, ac).to(dtype) / temperature
        logits = torch.cat([logits, own], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(own, dtype=torch.bool)], dim=1)
    if negative_mask is not None:
        num: int | Tensor = mask.sum(dim=1)  # per anchor; no host sync
    else:  # the positives (distinct columns of each row) are the only excluded columns
        num = logits.shape[1] - (0 if pos_index is None else pos_index.shape[1])
    weight = (
        torch.ones_like(pos_logits)
        if positive_weight is None
        else positive_weight.to(device=pos_logits.device, dtype=pos_logits.dtype).reshape(
            pos_logits.shape
        )
    )
    return ContrastSet(
        anchors=a,
        columns=c,
        anchor_columns=ac,
        positives=p,
        positive_logits=pos_logits,
        positive_weight=weight,
        positive_index=pos_index,
        negative_logits=logits,
        negative_mask=mask,
        num_negatives=num,
        temperature=float(temperature),
        normalized=normalize,
    )


def in_batch_contrast(
    views: list[Tensor] | tuple[Tensor, ...],
    *,
    temperature: float,
    ids: Tensor | None = None,
    normalize: bool = True,
    fast: bool = False,
) -> ContrastSet:
    """SimCLR: every view of every sample is an anchor and a column.

    ``views``: ``V >= 2`` tensors ``[N, d]`` (row ``i`` of each is sample ``i``). Anchor ``v N + i``
    has the positives ``v' N + i`` (``v' != v``, in increasing order of ``v'``) and every view of
    every other sample as negatives; itself is neither. ``ids`` ``[N]`` (optional): samples with
    equal ids are duplicates, neither positives nor negatives of each other. ``fast``: normalise
    with :func:`hardneg.fastpaths.unit_rows` (same values, a cheaper backward).
    """
    v = len(views)
    n = views[0].shape[0]
    dtype = compute_dtype(*views)
    z = _prepare(torch.cat(list(views), dim=0), dtype, normalize, fast)
    device = z.device
    logits = ((z / temperature) @ z.T).to(dtype)  # autocast: promote
    index = torch.arange(v * n, device=device)
    sample = index % n
    view = index // n
    # positives: the same sample in the other views, in increasing view order
    others = torch.arange(1, v, device=device)
    other_view = (view.unsqueeze(1) + others.unsqueeze(0)) % v  # [A, V-1]
    other_view = other_view.sort(dim=1).values
    pos_index = other_view * n + sample.unsqueeze(1)
    positives = z[pos_index]
    # a row-wise product, not a gather from the logits: those are masked in place below
    pos_logits = torch.einsum("ad,apd->ap", z, positives).to(dtype) / temperature
    if ids is None:
        # in place on the matmul output (its backward does not need it): no mask pass
        rows = index.repeat_interleave(v)
        cols = (torch.arange(v, device=device).repeat(v * n) * n) + sample.repeat_interleave(v)
        logits.index_put_((rows, cols), torch.tensor(float("-inf"), device=device, dtype=dtype))
        mask = torch.ones_like(logits, dtype=torch.bool)
        mask[rows, cols] = False
        num: int | Tensor = v * n - v
    else:
        ids = ids.to(device)
        col_ids = ids.repeat(v)
        mask = col_ids.unsqueeze(0) != col_ids.unsqueeze(1)
        logits = logits.masked_fill(~mask, float("-inf"))
        num = mask.sum(dim=1)
    return ContrastSet(
        anchors=z,
        columns=z,
        anchor_columns=None,
        positives=positives,
        positive_logits=pos_logits,
        positive_weight=torch.ones_like(pos_logits),
        positive_index=pos_index,
        negative_logits=logits,
        negative_mask=mask,
        num_negatives=num,
        temperature=float(temperature),
        normalized=normalize,
    )


def pool_contrast(
    q: Tensor,
    k: Tensor,
    pool: Tensor,
    *,
    temperature: float,
    exclude_index: Tensor | None = None,
    normalize: bool = True,
    fast: bool = False,
) -> ContrastSet:
    """MoCo / memory bank: queries ``q [N, d]``, their positive keys ``k [N, d]`` and an external
    pool ``[K, d]`` (detached) whose rows are all negatives, except ``exclude_index[i]`` (each
    query's own bank entry), which is masked, leaving ``K - 1``. ``fast``: normalise with
    :func:`hardneg.fastpaths.unit_rows` (same values, a cheaper backward)."""
    dtype = compute_dtype(q, k, pool)
    qn = _prepare(q, dtype, normalize, fast)
    kn = _prepare(k, dtype, normalize, fast)
    bank = _prepare(pool.detach(), dtype, normalize)  # detached: no backward to save
    pos_logits = (qn * kn).sum(dim=1, keepdim=True).to(dtype) / temperature
    logits = ((qn / temperature) @ bank.T).to(dtype)  # autocast: promote
    mask = None
    num: int | Tensor = bank.shape[0]
    if exclude_index is not None:
        rows = torch.arange(q.shape[0], device=logits.device)
        cols = exclude_index.to(device=logits.device, dtype=torch.long)
        mask = torch.ones_like(logits, dtype=torch.bool)
        mask[rows, cols] = False
        logits.index_put_(
            (rows, cols), torch.tensor(float("-inf"), device=logits.device, dtype=dtype)
        )
        num = bank.shape[0] - 1
    return ContrastSet(
        anchors=qn,
        columns=bank,
        anchor_columns=None,
        positives=kn.unsqueeze(1),
        positive_logits=pos_logits,
        positive_weight=torch.ones_like(pos_logits),
        positive_index=None,
        negative_logits=logits,
        negative_mask=mask,
        num_negatives=num,
        temperature=float(temperature),
        normalized=normalize,
    )


def retrieval_contrast(
    anchors: Tensor,
    positives: Tensor,
    hard_negatives: Tensor | None = None,
    *,
    temperature: float,
    ids: Tensor | None = None,
    candidate_ids: Tensor | None = None,
    anchor_ids: Tensor | None = None,
    normalize: bool = True,
    fast: bool = False,
) -> ContrastSet:
    """Text retrieval: anchor ``i``'s positive is ``positives[i]``; its negatives are every other
    positive and every hard negative of the batch (``hard_negatives [B, h, d]``, flattened
    row-major after the ``B`` positives: column ``B + i h + m`` is anchor ``i``'s ``m``-th hard
    negative), as in sentence-transformers' ``MultipleNegativesRankingLoss``.

    ``ids [B]`` and ``candidate_ids [B (1 + h)]`` (optional, e.g. hashes of the texts): a column
    with the same id as the anchor's positive is a duplicate of it and is masked (neither).
    ``anchor_ids [B]`` (with ``candidate_ids``): the anchors' own ids; a column with the
    anchor's own id is masked too (a text is not its own negative: chained pairs ``(s1, s2),
    (s2, s3)`` put the second anchor's text among its candidates, at cosine 1), and so is the
    positive of another row with the same anchor id (a query listed with several relevant
    documents: each is a positive of it, not a negative).
    ``fast``: normalise with :func:`hardneg.fastpaths.unit_rows` (same values, a cheaper
    backward).
    """
    b = anchors.shape[0]
    cols = [positives]
    if hard_negatives is not None:
        cols.append(hard_negatives.reshape(-1, hard_negatives.shape[-1]))
    columns = torch.cat(cols, dim=0)
    mask = None
    if candidate_ids is not None:
        if ids is None:
            ids = candidate_ids[:b]
        candidates = candidate_ids.to(anchors.device).unsqueeze(0)
        mask = candidates != ids.to(anchors.device).unsqueeze(1)
        if anchor_ids is not None:
            own = anchor_ids.to(anchors.device)
            mask = mask & (candidates != own.unsqueeze(1))
            # rows with the same anchor text (a query listed with several relevant documents):
            # each row's positive is another positive of that query, not its negative
            mask[:, :b] &= own.unsqueeze(0) != own.unsqueeze(1)
    contrast = build_contrast(
        anchors,
        columns,
        temperature=temperature,
        positive_index=torch.arange(b, device=anchors.device).unsqueeze(1),
        negative_mask=mask,
        normalize=normalize,
        fast=fast,
    )
    # column c belongs to anchor (c mod B) for the positives, (c - B) // h for hard negatives
    owner = torch.arange(columns.shape[0], device=anchors.device)
    if hard_negatives is not None and hard_negatives.shape[1] > 0:
        h = hard_negatives.shape[1]
        owner = torch.where(owner < b, owner, (owner - b) // h)
    contrast.own_columns = owner.unsqueeze(0) == torch.arange(b, device=anchors.device).unsqueeze(1)
    return contrast


GUIDE_MARGIN_MODES = ("absolute", "relative")


def guided_false_negatives(
    anchors: Tensor,
    candidates: Tensor,
    *,
    margin: float = 0.0,
    mode: str = "absolute",
) -> Tensor:
    """Candidates that a guide model scores as close to the anchor as its positive is
    (GISTEmbed, Solatorio 2024, arXiv 2402.16829: guided in-sample selection of negatives).

    ``anchors [A, d']`` and ``candidates [C, d']`` are the guide's embeddings; candidate ``i``
    (``i < A``) is anchor ``i``'s positive (the retrieval layout: the positives, then the hard
    negatives). With ``g_ij`` the guide's cosine, candidate ``j`` is a false negative of anchor
    ``i`` when::

        absolute:  g_ij > g_ii - margin
        relative:  g_ij > g_ii - |g_ii| margin

    Returns ``[A, C]`` bool (True = masked, for ``false_negatives=``); the positive itself is
    never marked. ``margin = 0`` drops the candidates the guide ranks above the positive.
    """
    check_choice("mode", mode, GUIDE_MARGIN_MODES)
    # Python checks only (no host sync): a string or NaN margin failed in a subtraction or
    # masked nothing, a list or complex guide failed inside torch
    margin = check_number("margin", margin)
    for name, x in (("anchors", anchors), ("candidates", candidates)):
        if not isinstance(x, Tensor) or x.is_complex():
            got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"the guide's {name} must be a real-valued torch.Tensor, got {got}")
    if anchors.dim() != 2 or candidates.dim() != 2 or anchors.shape[1] != candidates.shape[1]:
        raise ValueError(
            "the guide's embeddings must be [A, d] anchors and [C, d] candidates of one dim, "
            f"got {tuple(anchors.shape)} and {tuple(candidates.shape)}"
        )
    a = anchors.shape[0]
    if candidates.shape[0] < a:
        raise ValueError(
            f"the candidates start with the {a} anchors' positives, got only {candidates.shape[0]}"
        )
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    sims = F.normalize(anchors.to(dtype), dim=1) @ F.normalize(candidates.to(dtype), dim=1).T
    rows = torch.arange(a, device=sims.device)
    positive = sims[rows, rows].unsqueeze(1)
    slack = margin if mode == "absolute" else positive.abs() * margin
    mask = sims > positive - slack
    mask[rows, rows] = False  # the positive stays the anchor's positive
    return mask
