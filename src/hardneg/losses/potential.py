"""Potential-sample mining (Dong, Long, Li, arXiv 2311.00358, 2023, "Rethinking Samples Selection
for Contrastive Learning: Mining of Potential Samples"), as in the authors' code (class ``PSM``,
built on SNCLR: ``soft_constrastive``, ``hard_contrastive`` and ``NNMemoryBankModuleNormMultiKeep``).

Notation: ``q_i`` are online outputs after the predictor, ``k_i`` the positive keys (momentum
outputs of the other view), both L2-normalised here; ``s(x, y)`` is the cosine; ``T`` the
temperature; ``K`` the number of mined neighbours. ``n_j1..n_jK`` are the ``K`` nearest neighbours
of ``k_j`` (by cosine) in a support set, and ``B_j = {k_j, n_j1, ..., n_jK}`` is sample ``j``'s block.

Mined loss, one direction (``soft_constrastive``)::

    l_i   = sum_{p in B_i} w_ip * (log D_i - s(q_i, p)/T)
    D_i   = sum_{p in B_i} e^{s(q_i, p)/T}  +  sum_{j != i} sum_{n in B_j} m_in * e^{s(q_i, n)/T}
    m_in  ~ Bernoulli(pi_in),   pi_in = min(clamp, exp(-a * (s(q_i, n) - s+_i - b)^2)),
    s+_i  = s(q_i, k_i)                                   (SimANS kernel; no gradient through m)
    L_mined(q; k) = mean_i l_i

The own block holds the positives, every other block (a key and its neighbours) the candidate
negatives; a negative about as similar to the anchor as the positive (``b = 0``) is kept with
probability up to ``clamp``, far easier or far harder ones are mostly dropped. Positive weights:
``weighting='hard'``: ``w_ip = 1``; ``weighting='soft'``: ``w_{i,k_i} = 1`` and
``w_{i,n_im} = softmax_m s(g_i, n_im)`` (temperature 1), with ``g_i`` the online projection *before*
the predictor (forward kwarg ``proj1``; ``q_i`` itself when not given). The weights multiply the
log-terms only; ``D_i`` always sums the positives unweighted, as in the code.

Augmentation loss (``hard_contrastive``): SimCLR over the ``2N`` rows ``r`` of ``[q; k]``, each
with its partner ``r'`` (``q_i <-> k_i``) as positive and the other ``2N - 2`` rows as candidate
negatives, selected by the same kernel around ``sigma(r, r')``::

    l_r = log( e^{s(r, r')/T} + sum_{u != r, r'} m_ru e^{s(r, u)/T} ) - s(r, r')/T
    m_ru ~ Bernoulli(min(clamp, exp(-a * (sigma(r, u) - sigma(r, r') - b)^2)))
    L_aug(q, k) = mean_r l_r

with ``sigma`` the cosine (``select_on='cosine'``, default) or the raw dot product of the
unnormalised inputs (``select_on='raw'``, what ``hard_contrastive`` does; ``select_on`` only
affects ``L_aug``: the code applies the kernel of ``L_mined`` to normalised vectors).
``aug_pairing='broadcast'`` reproduces a shape bug of ``hard_contrastive``:
``L_aug = mean_{r, c} [log(e^{s(r, r')/T} + Ng_c) - s(r, r')/T]`` over all pairs of rows, with
``Ng_c`` the selected negative mass of row ``c`` (see the list below); ``'matched'`` (default) is
the SimCLR loss above. ``select_on='raw', aug_pairing='broadcast', weighting='hard'`` is the code.

The full objective of the code (``PSM.forward``) is
``L = 1/2 [L_mined(q1; k2) + L_mined(q2; k1)] + lambda * 1/2 [L_aug(q1, k2) + L_aug(q2, k1)]``.

Call forms (shapes: ``N`` samples, ``d`` dims, a pool of ``Q`` rows):

* ``loss(q, k, negatives=pool)``: one direction, ``L_mined(q; k) + lambda * L_aug(q, k)``,
  ``q, k: [N, d]``, ``pool: [Q, d]`` (detached). The pool is the **support set** of the neighbour
  lookup (in the code a FIFO of momentum keys of view 2, looked up *before* the current batch is
  enqueued; both directions use the same, pre-enqueue bank). With ``pool_as_negatives=True`` every
  pool row except the anchor's own neighbours is also a candidate negative of every anchor (same
  kernel; not in the code). An explicit ``support=[S, d]`` overrides ``negatives`` as the support
  set. A MoCo-style framework that calls ``loss(q1, k2, negatives=queue)`` and
  ``loss(q2, k1, negatives=queue)`` (q from the online branch with predictor, k from the momentum
  branch), averages the two and then enqueues ``k2`` gets exactly ``L`` above; with
  ``select_on='raw', aug_pairing='broadcast'`` it matched a (private, uncommitted) transcription of
  the authors' code in value and gradients to 1e-6, hard and soft weighting, same draws.
* ``loss(z1, z2)``: in-batch, symmetric:
  ``1/2 [L_mined(z1; z2) + L_mined(z2; z1)] + lambda * 1/2 [L_aug(z1, z2) + L_aug(z2, z1)]``.
  With no bank the support set of ``L_mined(q; k)`` is the other keys of the batch: the
  neighbours of ``k_j`` are the ``K`` keys ``k_l, l != j`` closest to it, and a candidate that is
  one of anchor ``i``'s own positives (its key, or a key among its neighbours) is not a negative
  of ``i`` (our rule: otherwise ``k_i`` would be both the positive and a negative of ``q_i``
  whenever ``k_i`` is a neighbour of another key).

``K`` is capped at the size of the support set (``N - 1`` in-batch), so any batch size works;
``K = 0`` gives blocks ``{k_j}`` and ``L_mined`` is an InfoNCE over ``(q, k)`` with selected
negatives (with ``a = 0, clamp = 1, lambda = 0`` exactly InfoNCE). ``lambda = 0`` skips ``L_aug``.

Randomness: ``sample='bernoulli'`` keeps a candidate when ``u < pi`` with
``u = torch.rand(grid, generator=generator)`` drawn over each full grid, in this order: the mined
grid ``[N, N(K+1) + Q']`` of each direction (column ``j(K+1) + m`` is member ``m`` of block ``j``,
then the ``Q'`` pool columns when ``pool_as_negatives``), then the ``L_aug`` grid ``[2N, 2N]`` over
``[q; k]`` (in-batch: mined(z1; z2), mined(z2; z1), aug(z1, z2), aug(z2, z1)). Masked cells draw
too and are ignored. ``sample='expected'`` uses ``pi`` as a deterministic weight of each negative
(the expectation of ``D_i``), with no draw. No gradient flows through ``m`` or ``pi``; the
neighbour lookup runs under ``no_grad`` (in-batch, the neighbour vectors are keys and carry their
gradient like the keys do). Everything is a log-sum-exp over float32 logits, so ``T = 0.05`` and
bf16 autocast stay finite.

Checked line by line against the code; where it and ``docs/methods.md`` section 4 disagree, we
follow the code unless a point says otherwise:

* Neighbours: cosine between each momentum key and the bank, ``topk(K)``, bank rows returned
  (normalised before use); the bank is read before ``_dequeue_and_enqueue`` (lightly's
  ``MemoryBankModule``), and only view-2 keys are enqueued. A bank row that is a neighbour of
  both ``k_i`` and ``k_j`` is a positive and a negative of ``q_i`` in the code; kept so here
  (in-batch, our own rule above removes such overlaps).
* ``s+_i`` of the kernel is ``s(q_i, k_i)``, the predictor output against the momentum key (the
  ``pos`` argument of ``soft_constrastive`` is the key the neighbours were mined for).
* Soft weights: ``att_clc(q_pre, k)`` = softmax over the anchor's own ``K`` neighbours of the cosine
  between the online projection **before the predictor** (``q_pre``, here ``proj1``) and each
  neighbour, temperature 1 (not divided by ``T``), not detached (gradient flows into ``q_pre``, and
  here into ``proj1``); the key itself gets weight 1. methods.md says ``cos(p_i, nn)``.
* Positive weights do **not** enter ``D_i``: ``pos1`` sums ``e^{s_ip/T}`` unweighted whether or not
  the weights are soft; methods.md writes ``D_i = sum_p w_ip e^{s_ip/T} + ...``.
* The code runs ``weighting='hard'``: ``self.threshold = True`` overwrites the constructor
  argument, and ``labelsnew_1[labelsnew_1 > 0] = 1`` turns every (positive) softmax weight into 1.
  ``hard`` is the default here.
* Unselected negatives are removed by ``exp(0 * s / T) == 1 -> 0``; a *selected* negative with
  ``s == 0`` exactly is removed too (a measure-zero quirk we do not copy).
* ``L_aug`` applies the kernel to raw dot products of the unnormalised ``q`` and ``k``
  (``logits_pos``, ``logits_neg``) and uses cosines in the loss, as methods.md says.
* ``L_aug`` is not the per-row SimCLR loss: in ``(- torch.log(pos / (pos + Ng))).mean()`` ``pos``
  has shape ``[2B, 1]`` and ``Ng`` shape ``[2B]``, so the quotient broadcasts to ``[2B, 2B]`` and
  the mean runs over every (positive of row r, negative mass of row c) pair. methods.md describes
  the intended per-row loss; we default to it (``aug_pairing='matched'``) and keep the code's as
  ``aug_pairing='broadcast'``.
* Framework details in the same class (for the trainer, not this loss): projector and predictor
  are ``Linear(bias=False)-BN-ReLU-Linear(bias=False)-BN(affine=False)`` (the predictor ends with
  the affine-free BN too), the EMA update runs *before* the keys are computed, no batch shuffle.
* The code hard-codes the batch (``2 * 256 - 2``, ``self.batch = 256``) and ``topk = 5``; not here.
* Not verifiable from the code alone (the launch script was not found): ``T`` (``L_mined`` uses
  ``self.T``, default 1.0, ``L_aug`` uses ``args.temperature``; we use one ``temperature``,
  default 0.5 per methods.md), ``a``, ``b``, ``lambda`` (``args.a``, ``args.b``, ``args.aa``), the
  bank size (class default 98304; methods.md: 16384) and the EMA momentum (``args.queue_momentum``).

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("potential", temperature=0.5, num_neighbors=5)
    >>> q = torch.randn(32, 128, requires_grad=True)     # online branch, after the predictor
    >>> k, queue = torch.randn(32, 128), torch.randn(1024, 128)   # momentum keys, FIFO bank
    >>> g = torch.Generator().manual_seed(0)
    >>> loss = loss_fn(q, k, negatives=queue, generator=g)
    >>> loss.backward()
    >>> out = loss_fn(q, k, negatives=queue, labels=torch.arange(32) % 4,
    ...               negative_labels=torch.arange(1024) % 4, return_diagnostics=True)
    >>> out.per_anchor.shape, bool(torch.isfinite(out.loss))
    (torch.Size([32]), True)
    >>> bool(loss_fn(q, k) > 0)                          # in-batch, symmetric, no bank
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg._checks import check_choice, check_embeddings, check_labels, check_number
from hardneg.diagnostics import NegativeDiagnostics, negative_diagnostics
from hardneg.losses.contrastive import LossOutput, check_views
from hardneg.pool import ContrastiveScores
from hardneg.strategies.base import NegativeSelection

_NEG_INF = float("-inf")


@dataclass
class _Mined:
    """One direction of ``L_mined`` and what the diagnostics need."""

    per_anchor: Tensor  # [N]
    scores: ContrastiveScores  # logits [N, C] of the candidate negatives (-inf = not a negative)
    selection: NegativeSelection  # the selected negatives, log-weights, candidate ids [N, C]
    num_neighbors: int  # K actually mined (capped at the support size)


def _normalise(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=1)


def _multi_positive_nll(pos_logits: Tensor, neg_terms: Tensor, weights: Tensor | None) -> Tensor:
    """``sum_p w_p (log D - a_p)`` with ``D = sum_p e^{a_p} + sum_n e^{c_n}``, per row ``[A]``.

    ``pos_logits`` ``[A, P]``, ``neg_terms`` ``[A, C]`` (``c + log weight``, ``-inf`` = absent).
    The positives are always in the log-sum-exp, so a row without negatives stays finite and its
    gradient is never NaN (a log-sum-exp over only ``-inf`` would back-propagate NaN).
    """
    log_d = torch.logsumexp(torch.cat([pos_logits, neg_terms], dim=1), dim=1, keepdim=True)
    terms = log_d - pos_logits
    if weights is not None:
        terms = terms * weights
    return terms.sum(dim=1)


def _sanitise(diag: NegativeDiagnostics) -> NegativeDiagnostics:
    """Zero the NaNs of anchors that kept no negative (a softmax over nothing)."""
    for f in fields(diag):
        value = getattr(diag, f.name)
        if isinstance(value, Tensor) and value.is_floating_point():
            setattr(diag, f.name, torch.where(torch.isnan(value), torch.zeros_like(value), value))
    return diag


def _cat_diagnostics(parts: list[NegativeDiagnostics]) -> NegativeDiagnostics:
    """Stack the per-anchor diagnostics of the two in-batch directions (same column count)."""
    out = parts[0]
    for f in fields(out):
        values = [getattr(p, f.name) for p in parts]
        if all(isinstance(v, Tensor) for v in values):
            setattr(out, f.name, torch.cat(values, dim=0))
        elif any(isinstance(v, Tensor) for v in values):
            setattr(out, f.name, None)
    return out


class PotentialLoss(nn.Module):
    """Potential-sample mining: mined positives plus Bernoulli-selected "potential" negatives.

    Args:
        temperature: ``T > 0`` of both losses.
        num_neighbors: ``K >= 0`` nearest neighbours mined per key (capped at the support size).
        aug_weight: ``lambda >= 0``, weight of ``L_aug`` (0 skips it).
        a: ``>= 0``, width of the SimANS kernel ``exp(-a (s - s+ - b)^2)`` (0 = keep with ``clamp``).
        b: shift of the kernel's peak relative to the positive similarity.
        clamp: upper bound of the keep probability, in (0, 1] (code: 0.999).
        weighting: ``'hard'`` (all positive weights 1; what the code runs) or ``'soft'``.
        sample: ``'bernoulli'`` (draw the selection) or ``'expected'`` (probabilities as weights).
        select_on: similarity the kernel of ``L_aug`` uses: ``'cosine'`` or ``'raw'`` (the code).
        aug_pairing: ``'matched'`` (each row's positive with its own negatives: SimCLR) or
            ``'broadcast'`` (the code's shape bug: every positive with every row's negatives).
        pool_as_negatives: also use every pool row as a (selected) negative of ``L_mined``.
        check_inputs: validate shapes and finiteness on every call (one host sync).
    """

    def __init__(
        self,
        temperature: float = 0.5,
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
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = check_number("temperature", temperature, low=0.0, low_inclusive=False)
        self.num_neighbors = int(check_number("num_neighbors", num_neighbors, low=0, integer=True))
        self.aug_weight = check_number("aug_weight", aug_weight, low=0.0)
        self.a = check_number("a", a, low=0.0)
        self.b = check_number("b", b)
        self.clamp = check_number("clamp", clamp, low=0.0, low_inclusive=False, high=1.0)
        self.weighting = check_choice("weighting", weighting, ("hard", "soft"))
        self.sample = check_choice("sample", sample, ("bernoulli", "expected"))
        self.select_on = check_choice("select_on", select_on, ("cosine", "raw"))
        self.aug_pairing = check_choice("aug_pairing", aug_pairing, ("matched", "broadcast"))
        for name, flag in (
            ("pool_as_negatives", pool_as_negatives),
            ("check_inputs", check_inputs),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.pool_as_negatives = pool_as_negatives
        self.check_inputs = check_inputs

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, num_neighbors={self.num_neighbors}, "
            f"aug_weight={self.aug_weight}, a={self.a}, b={self.b}, clamp={self.clamp}, "
            f"weighting={self.weighting!r}, sample={self.sample!r}, "
            f"select_on={self.select_on!r}, aug_pairing={self.aug_pairing!r}, "
            f"pool_as_negatives={self.pool_as_negatives}"
        )

    # -- selection ---------------------------------------------------------------------------

    def _log_weights(
        self, sims: Tensor, pos_sims: Tensor, mask: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """``log m`` (0 / -inf) or ``log pi`` of every cell of ``sims`` ``[A, C]``; -inf off ``mask``.

        ``log pi = min(log clamp, -a (s - s+ - b)^2)`` is computed without an exponential.
        """
        with torch.no_grad():
            x = sims.detach().float() - pos_sims.detach().float().unsqueeze(1) - self.b
            log_pi = torch.clamp(-self.a * x.square(), max=math.log(self.clamp))
            if self.sample == "bernoulli":
                u = torch.rand(log_pi.shape, generator=generator, device=log_pi.device)
                log_pi = torch.zeros_like(log_pi).masked_fill(u >= log_pi.exp(), _NEG_INF)
            return log_pi.masked_fill(~mask, _NEG_INF)

    # -- the two losses ----------------------------------------------------------------------

    def _mined(
        self,
        q: Tensor,
        k: Tensor,
        support: Tensor | None,
        pool: Tensor | None,
        proj: Tensor | None,
        generator: torch.Generator | None,
    ) -> _Mined:
        """``L_mined(q; k)`` per anchor; ``support=None`` mines among the other keys."""
        n = q.shape[0]
        qn, kn = _normalise(q), _normalise(k)
        bank = kn if support is None else _normalise(support.detach())
        k_eff = min(self.num_neighbors, n - 1 if support is None else bank.shape[0])
        size = k_eff + 1  # block size: the key and its neighbours
        rows = torch.arange(n, device=qn.device)
        with torch.no_grad():
            if k_eff > 0:
                lookup = kn.detach() @ bank.detach().T  # [N, S]
                if support is None:
                    lookup.fill_diagonal_(_NEG_INF)  # a key is not its own neighbour
                idx = lookup.float().topk(k_eff, dim=1).indices  # [N, K]
            else:
                idx = rows.new_empty(n, 0)
        neighbours = bank[idx]  # [N, K, d]
        blocks = torch.cat([kn.unsqueeze(1), neighbours], dim=1).reshape(n * size, -1)
        sims = (qn @ blocks.T).float()  # [N, N(K+1)], column j(K+1)+m = member m of block j
        pos_sims = sims.view(n, n, size)[rows, rows]  # [N, K+1], the own block
        neg_mask = ~torch.eye(n, dtype=torch.bool, device=qn.device).repeat_interleave(size, dim=1)
        block_ids = torch.cat([rows.unsqueeze(1), idx], dim=1)  # support row of each member
        if support is None:
            ids = block_ids.reshape(-1)  # candidates are keys of the batch: label index = row
            own = torch.zeros(n, n, dtype=torch.bool, device=qn.device)
            own[rows.unsqueeze(1), block_ids] = True  # own[i, l]: key l is a positive of i
            neg_mask &= ~own[:, ids]
        else:  # keys -> 0..N-1, bank rows -> N + row (the label vector is [labels; bank labels])
            ids = torch.cat([rows.unsqueeze(1), idx + n], dim=1).reshape(-1)
        if pool is not None:
            pool_n = bank if pool is support else _normalise(pool.detach())
            sims = torch.cat([sims, (qn @ pool_n.T).float()], dim=1)
            pool_mask = neg_mask.new_ones(n, pool_n.shape[0])
            if pool is support:  # the anchor's own neighbours are its positives, not negatives
                pool_mask[rows.unsqueeze(1), idx] = False
                offset = n
            else:
                offset = n + bank.shape[0]
            neg_mask = torch.cat([neg_mask, pool_mask], dim=1)
            ids = torch.cat([ids, torch.arange(pool_n.shape[0], device=ids.device) + offset])
            blocks = torch.cat([blocks, pool_n])
        log_w = self._log_weights(sims, pos_sims[:, 0], neg_mask, generator)

        weights = None
        if self.weighting == "soft" and k_eff > 0:
            g = _normalise(q if proj is None else proj)
            attention = torch.einsum("nd,nkd->nk", g, neighbours).float().softmax(dim=1)
            weights = torch.cat([attention.new_ones(n, 1), attention], dim=1)
        logits = sims / self.temperature
        per_anchor = _multi_positive_nll(pos_sims / self.temperature, logits + log_w, weights)

        kept = torch.isfinite(log_w)
        scores = ContrastiveScores(
            anchors=qn,
            positives=kn,
            candidates=blocks,
            pos_logits=pos_sims[:, 0] / self.temperature,
            logits=logits.masked_fill(~neg_mask, _NEG_INF),
            neg_mask=neg_mask,
            num_negatives=sims.shape[1] - size,
            temperature=self.temperature,
            positive_index=None,
            in_batch=support is None,
        )
        selection = NegativeSelection(
            logits=logits.detach().masked_fill(~kept, _NEG_INF),
            log_weights=log_w,
            indices=ids.unsqueeze(0).expand(n, -1),
        )
        return _Mined(per_anchor, scores, selection, k_eff)

    def _aug(self, q: Tensor, k: Tensor, generator: torch.Generator | None) -> Tensor:
        """``L_aug(q, k)`` per row of ``[q; k]`` ``[2N]``."""
        n = q.shape[0]
        x = torch.cat([q, k], dim=0)
        xn = _normalise(x)
        cos = (xn @ xn.T).float()
        rows = torch.arange(2 * n, device=xn.device)
        partner = (rows + n) % (2 * n)
        neg_mask = torch.ones_like(cos, dtype=torch.bool)
        neg_mask[rows, rows] = False
        neg_mask[rows, partner] = False
        if self.select_on == "raw":
            with torch.no_grad():
                sigma = (x.detach().float() @ x.detach().float().T).float()
        else:
            sigma = cos
        log_w = self._log_weights(sigma, sigma[rows, partner], neg_mask, generator)
        pos = cos[rows, partner] / self.temperature
        neg_terms = cos / self.temperature + log_w
        if self.aug_pairing == "matched":
            return _multi_positive_nll(pos.unsqueeze(1), neg_terms, None)
        # the code's `pos / (pos + Ng)` with pos [2N, 1] and Ng [2N] broadcasts to [2N, 2N]: every
        # row's positive against every row's negative mass; row r's share is its mean over them
        has = torch.isfinite(log_w).any(dim=1)
        safe = torch.where(has.unsqueeze(1), neg_terms, torch.zeros_like(neg_terms))
        log_ng = torch.logsumexp(safe, dim=1).masked_fill(~has, _NEG_INF)  # -inf: nothing kept
        pos = pos.unsqueeze(1)
        return (torch.logaddexp(pos, log_ng.unsqueeze(0)) - pos).mean(dim=1)

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        z1: Tensor,
        z2: Tensor,
        negatives: Tensor | None = None,
        *,
        support: Tensor | None = None,
        proj1: Tensor | None = None,
        proj2: Tensor | None = None,
        progress: float | None = None,
        h1: Tensor | None = None,
        h2: Tensor | None = None,
        negative_h: Tensor | None = None,
        exclude_index: Tensor | None = None,
        generator: torch.Generator | None = None,
        labels: Tensor | None = None,
        negative_labels: Tensor | None = None,
        support_labels: Tensor | None = None,
        return_diagnostics: bool = False,
    ) -> Tensor | LossOutput:
        """Loss for one step.

        Args:
            z1, z2: ``[N, d]`` the two views (in-batch), or queries ``q`` (online, after the
                predictor) and their positive keys ``k`` when a pool or support set is given.
            negatives: ``[Q, d]`` pool (FIFO of momentum keys): the support set of the neighbour
                lookup, and candidate negatives too with ``pool_as_negatives``.
            support: ``[S, d]`` explicit support set (overrides ``negatives`` for the lookup).
            proj1, proj2: ``[N, d']`` online projections before the predictor of the rows of
                ``z1`` / ``z2`` (soft weighting only; default ``z1`` / ``z2`` themselves).
            progress, h1, h2, negative_h, exclude_index: accepted for API compatibility with the
                other hardneg losses and ignored (the mined blocks never contain the anchor).
            generator: random generator of the Bernoulli draws (on the embeddings' device).
            labels: ``[N]`` class ids of the samples, diagnostics only.
            negative_labels, support_labels: ``[Q]`` / ``[S]`` class ids of the pool / support
                rows, diagnostics only.
            return_diagnostics: return a :class:`~hardneg.losses.contrastive.LossOutput` whose
                diagnostics describe the negatives of ``L_mined`` (``2N`` anchors in-batch).
        """
        del progress, h1, h2, negative_h, exclude_index  # not used by this method
        one_direction = negatives is not None or support is not None
        bank = support if support is not None else negatives
        if self.check_inputs:
            self._check(z1, z2, negatives, support, proj1, proj2, one_direction)
        self._check_generator(generator, z1)
        n = z1.shape[0]
        if one_direction:
            pool = negatives if self.pool_as_negatives else None
            mined = [self._mined(z1, z2, bank, pool, proj1, generator)]
            pairs = [(z1, z2)]
        else:
            mined = [
                self._mined(z1, z2, None, None, proj1, generator),
                self._mined(z2, z1, None, None, proj2, generator),
            ]
            pairs = [(z1, z2), (z2, z1)]
        mined_part = torch.cat([m.per_anchor for m in mined])
        per_anchor = mined_part
        aug_part = None
        if self.aug_weight > 0:
            # row i of L_aug(q, k) is q_i, row N+i is k_i: both belong to sample i
            rows = [self._aug(q, k, generator) for q, k in pairs]
            aug_part = torch.cat([(r[:n] + r[n:]) / 2 for r in rows])
            per_anchor = mined_part + self.aug_weight * aug_part
        loss = per_anchor.mean()
        if not return_diagnostics:
            return loss
        label_vector = self._label_vector(
            labels, negative_labels, support_labels, n, negatives, support
        )
        anchor_labels = None if labels is None else check_labels("labels", labels, n)
        parts = [
            _sanitise(
                negative_diagnostics(
                    m.scores,
                    m.selection,
                    anchor_labels=None if label_vector is None else anchor_labels,
                    candidate_labels=label_vector,
                )
            )
            for m in mined
        ]
        diag = _cat_diagnostics(parts)
        diag.extras = {
            "num_neighbors": float(mined[0].num_neighbors),
            "mined_loss": float(mined_part.detach().mean()),
            "aug_loss": 0.0 if aug_part is None else float(aug_part.detach().mean()),
        }
        return LossOutput(loss=loss, per_anchor=per_anchor, diagnostics=diag)

    # -- validation and labels -----------------------------------------------------------------

    def _check(
        self,
        z1: Tensor,
        z2: Tensor,
        negatives: Tensor | None,
        support: Tensor | None,
        proj1: Tensor | None,
        proj2: Tensor | None,
        one_direction: bool,
    ) -> None:
        check_views(z1, z2, ("q", "k") if one_direction else ("z1", "z2"))
        for name, pool in (("negatives", negatives), ("support", support)):
            if pool is None:
                continue
            check_embeddings(name, pool)
            if pool.shape[1] != z1.shape[1]:
                raise ValueError(
                    f"{name} must have the embedding dim of q ({z1.shape[1]}), "
                    f"got shape {tuple(pool.shape)}"
                )
        for name, proj in (("proj1", proj1), ("proj2", proj2)):
            if proj is None:
                continue
            check_embeddings(name, proj)
            if proj.shape != z1.shape:
                raise ValueError(
                    f"{name} must have the shape of the embeddings {tuple(z1.shape)} "
                    f"(one online projection per sample), got {tuple(proj.shape)}"
                )
        if proj2 is not None and one_direction:
            raise ValueError("proj2 is only used in-batch (no negatives/support); pass proj1 for q")

    @staticmethod
    def _check_generator(generator: object, z: Tensor) -> None:
        if generator is None:
            return
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if isinstance(z, Tensor) and generator.device.type != z.device.type:
            raise ValueError(
                f"generator must live on the embeddings' device ({z.device.type}), "
                f"got a generator on {generator.device.type}"
            )

    def _label_vector(
        self,
        labels: Tensor | None,
        negative_labels: Tensor | None,
        support_labels: Tensor | None,
        n: int,
        negatives: Tensor | None,
        support: Tensor | None,
    ) -> Tensor | None:
        """Labels of every candidate id of :meth:`_mined`, or None when some are unknown.

        In-batch the ids are the batch rows; with a bank they index ``[labels; bank labels]``, and
        ``[labels; support labels; pool labels]`` when a separate pool adds negatives.
        """
        if labels is None:
            return None
        labels = check_labels("labels", labels, n)
        if negatives is None and support is None:
            return labels
        if negatives is not None and negative_labels is not None:
            negative_labels = check_labels("negative_labels", negative_labels, negatives.shape[0])
        if support is not None and support_labels is not None:
            support_labels = check_labels("support_labels", support_labels, support.shape[0])
        parts = [labels, support_labels if support is not None else negative_labels]
        if support is not None and negatives is not None and self.pool_as_negatives:
            parts.append(negative_labels)
        if any(p is None for p in parts):
            return None
        return torch.cat([p.to(labels.device) for p in parts])
