"""The original, unoptimised implementation of :class:`hardneg.losses.potential.PotentialLoss`
(every block member a column of the mined grid ``[N, N(K+1)]``, one matmul per direction, one
draw per grid cell), kept as an oracle: the fast implementation must give the same values and
gradients in every mode, and the same draws wherever the draw layout is unchanged (with a pool).
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


class ReferencePotentialLoss(nn.Module):
    """The straightforward implementation: every block member is a column of an ``[N, N(K+1)]`` grid.

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
