"""The first implementation of potential-sample mining (every block member a column of the mined
grid ``[N, N(K+1)]``, one matmul per direction, one ``torch.rand`` per term over its grid, float32),
kept as a second oracle beside the loop-by-loop one of ``test_potential.py``; its diagnostics
were removed with the old API. It has no ``exclude_index`` and no ``ids``, and in-batch it draws
``L_aug(z1, z2)`` and ``L_aug(z2, z1)`` separately (the strategy draws one selection for both).
Draw order: the mined grid ``[N, N(K+1) (+ Q)]`` of each direction, then the ``L_aug`` grids
``[2N, 2N]``, as the strategy does with a bank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg._checks import check_choice, check_number

_NEG_INF = float("-inf")


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


class ReferencePotentialLoss(nn.Module):
    """``L_mined + aug_weight * L_aug`` (module doc); hyper-parameters as the strategy's."""

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
        self.pool_as_negatives = pool_as_negatives

    def _log_weights(
        self, sims: Tensor, pos_sims: Tensor, mask: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """``log m`` (0 or -inf) or ``log pi`` of each cell of ``sims`` ``[A, C]``, -inf off mask.

        ``log pi = min(log clamp, -a (s - s+ - b)^2)`` is computed without an exponential.
        """
        with torch.no_grad():
            x = sims.detach().float() - pos_sims.detach().float().unsqueeze(1) - self.b
            log_pi = torch.clamp(-self.a * x.square(), max=math.log(self.clamp))
            if self.sample == "bernoulli":
                u = torch.rand(log_pi.shape, generator=generator, device=log_pi.device)
                log_pi = torch.zeros_like(log_pi).masked_fill(u >= log_pi.exp(), _NEG_INF)
            return log_pi.masked_fill(~mask, _NEG_INF)

    def _mined(
        self,
        q: Tensor,
        k: Tensor,
        support: Tensor | None,
        pool: Tensor | None,
        proj: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
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
        return per_anchor

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

    def forward(
        self,
        z1: Tensor,
        z2: Tensor,
        negatives: Tensor | None = None,
        *,
        proj1: Tensor | None = None,
        proj2: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``loss(z1, z2)`` in-batch and symmetric, or ``loss(q, k, negatives=bank)``."""
        n = z1.shape[0]
        if negatives is not None:
            pool = negatives if self.pool_as_negatives else None
            mined = [self._mined(z1, z2, negatives, pool, proj1, generator)]
            pairs = [(z1, z2)]
        else:
            mined = [
                self._mined(z1, z2, None, None, proj1, generator),
                self._mined(z2, z1, None, None, proj2, generator),
            ]
            pairs = [(z1, z2), (z2, z1)]
        per_anchor = torch.cat(mined)
        if self.aug_weight > 0:
            # row i of L_aug(q, k) is q_i, row N+i is k_i: both belong to sample i
            rows = [self._aug(q, k, generator) for q, k in pairs]
            per_anchor = per_anchor + self.aug_weight * torch.cat(
                [(r[:n] + r[n:]) / 2 for r in rows]
            )
        return per_anchor.mean()
