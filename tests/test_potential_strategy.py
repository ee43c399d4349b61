"""Potential-sample mining (``potential``) where ``tests/test_potential.py`` does not reach: the
call forms the fast paths of ``fastpaths.py`` refuse (``ids``, ``normalize=False``,
``pool_as_negatives``, the JSD objective) on both forms, the contrast set's negatives, the exact
law of a cell's draw, half-precision look-ups and the messages. Expectations are float64 loops of
the module docstring's equations. Written for mutation testing (docs/testing.md)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import hardneg
from hardneg.losses.contrastive import ContrastInputs
from hardneg.strategies import PotentialMining, StepContext

HP = dict(num_neighbors=2, aug_weight=0.7, a=2.0, b=0.1, clamp=0.95)


def z(n, d=5, seed=0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale


# -- the equations, one anchor and one cell at a time, float64 ------------------------------------


def keep_prob(s, s_plus, hp):
    """pi = min(clamp, exp(-a (s - s+ - b)^2)), a plain float."""
    return min(hp["clamp"], math.exp(-hp["a"] * (s - s_plus - hp["b"]) ** 2))


def cosine(x, y):
    return x @ y / (x.norm() * y.norm())


def anchor_loss(pos, weights, cells, t, objective):
    """One anchor's loss from its positives' similarities and weights and its negative cells
    ``(s, pi)``: InfoNCE ``sum_p w_p (log D - s_p/t)`` with ``D = sum_p e^{s_p/t} + sum pi e^{s/t}``,
    or Jensen-Shannon ``E- - E+``: ``E+ = sum_p w_p (log 2 - sp(-s_p/t)) / sum_p w_p``,
    ``E- = sum pi sp(s/t) / sum pi - log 2`` (``sp`` the softplus)."""
    if objective == "infonce":
        d = sum(torch.exp(s / t) for s in pos) + sum(pi * torch.exp(s / t) for s, pi in cells)
        return sum(w * (torch.log(d) - s / t) for w, s in zip(weights, pos))
    sp, log2 = torch.nn.functional.softplus, math.log(2.0)
    e_pos = sum(w * (log2 - sp(-s / t)) for w, s in zip(weights, pos)) / sum(weights)
    e_neg = sum(pi * sp(s / t) for s, pi in cells) / sum(pi for _, pi in cells) - log2
    return e_neg - e_pos


def oracle(
    z1,
    z2,
    hp,
    bank=None,
    ids=None,
    exclude=None,
    normalize=True,
    h1=None,
    h2=None,
    objective="infonce",
):
    """The loss of one call in expected mode (each candidate cell weighted by its pi)."""
    t, kk = hp["temperature"], hp["num_neighbors"]

    def sim(x, y):  # the similarity of the logits: cosine, or the raw dot product
        return cosine(x, y) if normalize else x @ y

    def mined(q, k, g):
        n = q.shape[0]
        support = {("k", j): k[j] for j in range(n)}
        if bank is not None:
            support |= {("b", r): bank[r] for r in range(bank.shape[0])}
        blocks = []
        for j in range(n):
            if bank is None:
                cands = [("k", m) for m in range(n) if m != j]
            else:
                cands = [("b", r) for r in range(bank.shape[0])]
                cands = [c for c in cands if exclude is None or c[1] != int(exclude[j])]
            cands.sort(key=lambda c: -float(cosine(k[j], support[c]).detach()))
            blocks.append([("k", j), *cands[:kk]])
        total = 0.0
        for i in range(n):
            pos = [sim(q[i], support[c]) for c in blocks[i]]
            s_plus = float(pos[0].detach())
            cells = [c for j in range(n) if j != i for c in blocks[j]]
            if bank is not None and hp.get("pool_as_negatives"):
                cells += [("b", r) for r in range(bank.shape[0]) if ("b", r) not in blocks[i][1:]]
            kept = []
            for c in cells:
                if bank is None and c in blocks[i]:
                    continue  # in-batch: one of i's positives is no negative
                if bank is None and ids is not None and int(ids[c[1]]) == int(ids[i]):
                    continue  # nor a duplicate of the anchor
                if exclude is not None and c == ("b", int(exclude[i])):
                    continue  # nor the anchor's own bank entry
                s = sim(q[i], support[c])
                kept.append((s, keep_prob(float(s.detach()), s_plus, hp)))
            w = [1.0] * len(pos)
            if hp.get("weighting") == "soft" and len(pos) > 1:
                gi = q[i] if g is None else g[i]
                att = torch.stack([cosine(gi, support[c]) for c in blocks[i][1:]])
                w = [1.0, *torch.softmax(att, dim=0)]
            total = total + anchor_loss(pos, w, kept, t, objective)
        return total / n

    def aug():
        n = z1.shape[0]
        x = torch.cat([z1, z2])
        row_ids = None if ids is None or bank is not None else ids.repeat(2)

        def sigma(u, v):  # the kernel's similarity
            return x[u] @ x[v] if hp["select_on"] == "raw" else sim(x[u], x[v])

        pos, cells = [], []
        for r in range(2 * n):
            p = (r + n) % (2 * n)
            s_plus = float(sigma(r, p).detach())
            kept = []
            for c in range(2 * n):
                if c in (r, p) or (row_ids is not None and int(row_ids[c]) == int(row_ids[r])):
                    continue
                kept.append((sim(x[r], x[c]), keep_prob(float(sigma(r, c).detach()), s_plus, hp)))
            pos.append(sim(x[r], x[p]))
            cells.append(kept)
        if hp["aug_pairing"] == "broadcast":  # every row's positive with every row's negatives
            terms = [anchor_loss([a], [1.0], c, t, objective) for a in pos for c in cells]
        else:
            terms = [anchor_loss([a], [1.0], c, t, objective) for a, c in zip(pos, cells)]
        return sum(terms) / len(terms)

    if bank is None:
        loss = (mined(z1, z2, h1) + mined(z2, z1, h2)) / 2
    else:
        loss = mined(z1, z2, h1)
    return loss + hp["aug_weight"] * aug() if hp["aug_weight"] > 0 else loss


def full_hp(**over):
    hp = dict(HP, temperature=0.5, weighting="hard", select_on="cosine", aug_pairing="matched")
    hp.update(pool_as_negatives=False)
    hp.update(over)
    return hp


def make(hp, **loss_options):
    return hardneg.create_loss("potential", sample="expected", **hp, **loss_options)


def value_and_grads(fn, *tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def assert_same(got, want, tol=1e-9):
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# -- (a) the call forms the fast paths refuse, on both forms --------------------------------------


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("weighting", ["hard", "soft"])
def test_a_bank_with_pool_as_negatives_equals_the_loops(fast, weighting):
    hp = full_hp(weighting=weighting, pool_as_negatives=True, num_neighbors=3)
    q, k, h1, bank = z(5, seed=1), z(5, seed=2), z(5, seed=3), z(9, seed=4)
    loss = make(hp, fast=fast)
    got = value_and_grads(lambda a, b, g: loss(a, b, negatives=bank, h1=g), q, k, h1)
    want = value_and_grads(lambda a, b, g: oracle(a, b, hp, bank=bank, h1=g), q, k, h1)
    assert_same(got, want)


@pytest.mark.parametrize("fast", [False, True])
def test_a_bank_with_pool_as_negatives_and_exclude_index_equals_the_loops(fast):
    hp = full_hp(pool_as_negatives=True, num_neighbors=3)
    bank, idx = z(9, seed=5), torch.tensor([4, 0, 7, 2, 8])
    q, k = z(5, seed=6), bank[idx] + 0.1 * z(5, seed=7)  # the own entry: each key's nearest row
    loss = make(hp, fast=fast)
    got = value_and_grads(lambda a, b: loss(a, b, negatives=bank, exclude_index=idx), q, k)
    want = value_and_grads(lambda a, b: oracle(a, b, hp, bank=bank, exclude=idx), q, k)
    assert_same(got, want)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("weighting", ["hard", "soft", "raw"])
@pytest.mark.parametrize(
    ("num_neighbors", "exclude", "rows"),
    [
        (2, None, 9),
        (2, [4, 0, 7, 2, 8], 9),
        (1, None, 9),
        (9, None, 9),
        (9, [4, 0, 7, 2, 8], 9),
        (2, [3, 0, 2, 1, 3], 4),
        (1, None, 0),
    ],
    ids=[
        "two",
        "two-exclude",
        "one",
        "whole-bank",
        "whole-bank-exclude",
        "small-bank-exclude",
        "one-row-held",
    ],
)
def test_a_bank_by_the_fused_pool_path_equals_the_loops(
    monkeypatch, fast, weighting, num_neighbors, exclude, rows
):
    # the call fastpaths.potential_pool_terms serves (a bank, cosine logits, InfoNCE, the
    # bank's rows as candidates only), b != 0 in the kernel; one neighbour, and as many
    # neighbours as the bank has rows (with exclude_index: all but the own entry); a bank of
    # fewer rows (4) than queries (5); "raw": hard weights, L_aug's kernel on raw dot products
    from hardneg import fastpaths

    calls = []
    real = fastpaths.potential_pool_terms
    monkeypatch.setattr(fastpaths, "potential_pool_terms", lambda *a: calls.append(1) or real(*a))
    if weighting == "raw":
        hp = full_hp(select_on="raw", num_neighbors=num_neighbors)
    else:
        hp = full_hp(weighting=weighting, num_neighbors=num_neighbors)
    bank, q, k, h1 = z(rows, seed=5), z(5, seed=6), z(5, seed=7), z(5, seed=8)
    if rows == 0:  # positive keys, one positive bank row among negative ones: every key's
        # only neighbour is that row (one bank column holds cells)
        k = k.abs()
        bank = torch.cat([torch.ones(1, k.shape[1], dtype=k.dtype), -z(4, seed=5).abs()])
    idx = None if exclude is None else torch.tensor(exclude)
    loss = make(hp, fast=fast)
    got = value_and_grads(
        lambda a, b, g: loss(a, b, negatives=bank, exclude_index=idx, h1=g), q, k, h1
    )
    want = value_and_grads(lambda a, b, g: oracle(a, b, hp, bank=bank, exclude=idx, h1=g), q, k, h1)
    assert_same(got, want)
    assert bool(calls) == fast


@pytest.mark.parametrize("halves", ["key", "bank"])
def test_a_half_precision_key_or_bank_on_the_fused_pool_path_equals_the_plain_form(halves):
    # float32 queries with a float16 key or bank: one compute dtype, float32 (half precision
    # promoted), so the fused pool path serves the call; the neighbour look-up and the kernel
    # compute in float32 as the plain form's
    hp = full_hp(num_neighbors=2)
    bank, q, k = z(9, seed=5).float(), z(5, seed=6).float(), z(5, seed=7).float()
    if halves == "key":
        k = k.half()
    else:
        bank = bank.half()
    fused, plain = make(hp, fast=True), make(hp, fast=False)
    got = value_and_grads(lambda a, b: fused(a, b, negatives=bank), q, k)
    want = value_and_grads(lambda a, b: plain(a, b, negatives=bank), q, k)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(got[1], want[1]):  # a half key's gradient is float16: its own resolution
        tol = 2e-3 if x.dtype == torch.float16 else 1e-5
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 1]])
def test_in_batch_with_ids_equals_the_loops(fast, ids):
    # distinct ids: the loss without ids; equal ids: the duplicates are no negatives either
    hp = full_hp(num_neighbors=2)
    ids = torch.tensor(ids)
    z1, z2 = z(6, seed=8), z(6, seed=9)
    loss = make(hp, fast=fast)
    got = value_and_grads(lambda a, b: loss(a, b, ids=ids), z1, z2)
    want = value_and_grads(lambda a, b: oracle(a, b, hp, ids=ids), z1, z2)
    assert_same(got, want)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("with_bank", [False, True])
def test_raw_logits_equal_the_loops(fast, with_bank):
    # normalize=False: raw dot products in the logits and the kernel; the look-up stays cosine
    hp = full_hp(num_neighbors=2, temperature=2.0)
    z1, z2, bank = z(5, seed=10), z(5, seed=11), z(8, seed=12)
    pool = bank if with_bank else None
    loss = make(hp, fast=fast, normalize=False)
    got = value_and_grads(lambda a, b: loss(a, b, negatives=pool), z1, z2)
    want = value_and_grads(lambda a, b: oracle(a, b, hp, bank=pool, normalize=False), z1, z2)
    assert_same(got, want)


# -- (b) the mined term's structure: blocks, negatives, cells per column ---------------------------


def blocks_by_loop(k, bank=None, exclude=None, kk=2):
    """Support index of each block's members: key j, then its kk nearest support rows (cosine,
    float64); in-batch the other keys (support index = key index), with a bank its rows."""
    support = k if bank is None else bank
    out = []
    for j in range(k.shape[0]):
        rows = [
            r
            for r in range(support.shape[0])
            if not (bank is None and r == j) and not (exclude is not None and r == exclude[j])
        ]
        rows.sort(key=lambda r: -float(cosine(k[j].double(), support[r].double())))
        out.append(rows[:kk])
    return out


@pytest.mark.parametrize("pool_as_negatives", [False, True])
@pytest.mark.parametrize("with_bank, exclude", [(False, None), (True, None), (True, [3, 0, 6, 1])])
def test_the_mined_term_marks_the_negatives_and_counts_the_cells_of_each_column(
    with_bank, exclude, pool_as_negatives
):
    # column c of [k; bank] is a negative of anchor i iff a cell of another block reads it (or,
    # with pool_as_negatives, it is a bank row outside i's block), never the own bank entry;
    # in-batch, never one of i's positives. multiplicity: the cells of column c that anchor i
    # draws (the fast form), the grid (plain form, the default of mined) has none
    n, kk = 4, 2
    q, k, bank = z(n, seed=20), z(n, seed=21), z(7, seed=22)
    bank[6] = -k.sum(0)  # far from every key: the last column is in no block
    strategy = PotentialMining(**dict(HP, num_neighbors=kk), pool_as_negatives=pool_as_negatives)
    pool = bank if with_bank else None
    inputs = ContrastInputs(
        q, k, temperature=0.5, negatives=pool, exclude_index=exclude and torch.tensor(exclude)
    )
    near = blocks_by_loop(k, pool, exclude, kk)
    offset = n if with_bank else 0
    blocks = [[j] + [offset + r for r in near[j]] for j in range(n)]
    assert not with_bank or all(6 not in b for b in near)
    columns = n + (7 if with_bank else 0)
    negative, count = [], []
    for i in range(n):
        row, cnt = [], []
        for c in range(columns):
            cells = sum(c in blocks[j] for j in range(n) if j != i)
            if with_bank and pool_as_negatives and c >= n and c not in blocks[i]:
                cells += 1
            own_entry = exclude is not None and c == n + exclude[i]
            row.append(cells > 0 and not own_entry and (with_bank or c not in blocks[i]))
            cnt.append(float(cells))
        negative.append(row)
        count.append(cnt)

    plain = strategy.mined(inputs, q, k, None)  # the default: the grid of the plain form
    fast = strategy.mined(inputs, q, k, None, fast=True)
    for mined in (plain, fast):
        assert mined.neighbours.tolist() == [b[1:] for b in blocks]
        assert mined.negative_mask.tolist() == negative
    grid = [c for b in blocks for c in b] + (list(range(n, columns)) if pool_as_negatives else [])
    if not with_bank:
        grid = grid[: n * (kk + 1)]
    assert plain.cells.tolist() == grid and plain.multiplicity is None
    assert plain.cell_log_keep.shape == (n, len(grid))
    assert fast.cells is None and fast.multiplicity.tolist() == count
    assert fast.cell_log_keep.shape == (n, columns)


def test_neighbours_of_half_precision_keys_are_ranked_in_float32():
    # bfloat16 keys and bank whose cosines differ by ~4e-5: bfloat16 arithmetic (8 bits) ranks
    # them otherwise; the look-up computes in float32, as every half-precision input does
    g = torch.Generator().manual_seed(6)
    k = torch.randn(3, 8, generator=g)
    bank = (k.repeat_interleave(4, 0) + 0.02 * torch.randn(12, 8, generator=g)).bfloat16()
    k = k.bfloat16()
    want = blocks_by_loop(k, bank, kk=2)
    strategy = PotentialMining(**HP)
    inputs = ContrastInputs(k, k, temperature=0.5, negatives=bank)
    mined = strategy.terms(inputs, StepContext(fast=False))[0][1]
    assert (mined.neighbours - 3).tolist() == want


# -- (c) the draw of one cell ----------------------------------------------------------------------


def test_a_cell_is_kept_exactly_when_its_uniform_is_below_its_keep_probability():
    # the plain form draws one float32 uniform u per cell (torch.rand over the term's cells,
    # row-major) and keeps the cell iff u < pi: P(keep) = pi exactly on the uniforms' grid
    # (a cell with pi = u is dropped; pi = 1 always kept, pi = 0 never)
    z1, z2 = z(4, seed=30), z(4, seed=31)
    strategy = PotentialMining(**HP)  # sample='bernoulli'
    terms = strategy.terms(ContrastInputs(z1, z2, temperature=0.5), StepContext(fast=False))
    _, aug, role = terms[2]  # L_aug: one cell per column
    u = torch.rand(aug.cell_log_keep.shape, generator=torch.Generator().manual_seed(5)).double()
    kind = torch.arange(u.numel()).reshape(u.shape) % 5  # 0: pi = u, 1: above, 2: below, 3: 1, 4: 0
    log_keep = torch.stack(
        [
            u.log(),
            u.log() + 1e-9,
            u.log() - 1e-9,
            torch.zeros_like(u),
            torch.full_like(u, -math.inf),
        ]
    )
    log_keep = log_keep.gather(0, kind.unsqueeze(0))[0]
    boundary = (kind == 0) & (log_keep.exp() == u) & aug.mask()
    assert int(boundary.sum()) >= 5  # exp(log u) == u for most uniforms
    aug.cell_log_keep = log_keep.masked_fill(~aug.mask(), -math.inf)
    context = StepContext(generator=torch.Generator().manual_seed(5), fast=False)
    kept = strategy.select_term(aug, context, role).negative_log_weights.exp()
    by_kind = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0], dtype=kept.dtype)[kind]
    want = torch.where(aug.mask(), by_kind, 0.0)  # no cell off the mask (pi = 0 there)
    known = ~aug.mask() | (kind != 0) | boundary  # pi = exp(log u) may round off u elsewhere
    assert torch.equal(kept[known], want[known])
    assert float(kept[boundary].sum()) == 0 and float(kept[aug.mask() & (kind == 1)].min()) == 1


# -- (d) settings, call forms and messages ---------------------------------------------------------

BAD_SETTINGS = [
    (dict(num_neighbors=-1), "num_neighbors must be in [0, inf), got -1"),
    (dict(num_neighbors=1.5), "num_neighbors must be an integer, got 1.5"),
    (dict(aug_weight=-1.0), "aug_weight must be in [0, inf), got -1.0"),
    (dict(a=-1.0), "a must be in [0, inf), got -1.0"),
    (dict(b=math.nan), "b must be finite, got nan"),
    (dict(clamp=0.0), "clamp must be in (0, 1], got 0.0"),
    (dict(clamp=1.5), "clamp must be in (0, 1], got 1.5"),
    (dict(weighting="x"), "weighting must be one of 'hard', 'soft', got 'x'"),
    (dict(sample="x"), "sample must be one of 'bernoulli', 'expected', got 'x'"),
    (dict(select_on="x"), "select_on must be one of 'cosine', 'raw', got 'x'"),
    (dict(aug_pairing="x"), "aug_pairing must be one of 'matched', 'broadcast', got 'x'"),
    (dict(pool_as_negatives="yes"), "pool_as_negatives must be True or False, got 'yes'"),
]


@pytest.mark.parametrize("setting, message", BAD_SETTINGS)
def test_a_bad_setting_is_refused_with_its_name_range_and_value(setting, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        PotentialMining(**setting)


def test_the_edges_of_the_ranges_are_accepted():
    strategy = PotentialMining(num_neighbors=0, aug_weight=0.0, a=0.0, b=-3.0, clamp=1.0)
    assert (strategy.num_neighbors, strategy.aug_weight, strategy.a) == (0, 0.0, 0.0)
    assert (strategy.b, strategy.clamp) == (-3.0, 1.0)


FORMS = "potential takes two views, or (q, k, negatives=pool); not hard_negatives or extra_views"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f, x: f(x, x, hard_negatives=x.unsqueeze(1)), FORMS),
        (lambda f, x: f(x, x, extra_views=[x]), FORMS),
        (
            lambda f, x: f(x, x, negatives=torch.randn(6, 3, 8)),
            "potential mines neighbours in one shared support set: negatives must be [K, d], "
            "got shape (6, 3, 8) (a pool per anchor)",
        ),
        (
            lambda f, x: f(x, x, h1=x[:, :3]),
            "potential's soft weights compare h1 (the projection before the predictor) with the "
            "mined keys: it needs their dim 8, got (6, 3)",
        ),
        (
            lambda f, x: f(x, x, h2=x[:, :3]),
            "potential's soft weights compare h2 (the projection before the predictor) with the "
            "mined keys: it needs their dim 8, got (6, 3)",
        ),
    ],
)
def test_a_call_the_strategy_cannot_serve_is_refused_with_the_reason(call, message):
    loss = hardneg.create_loss("potential", weighting="soft")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        call(loss, torch.randn(6, 8))


def test_hard_weights_never_read_the_projections():
    # h1 / h2 serve only the soft weights: with hard weights any width is accepted, unused
    hp = full_hp(weighting="hard")
    z1, z2 = z(5, seed=40), z(5, seed=41)
    loss = make(hp, fast=False)
    got = loss(z1, z2, h1=z(5, d=3, seed=42), h2=z(5, d=3, seed=43))
    torch.testing.assert_close(got, oracle(z1, z2, hp), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_bank", [False, True])
def test_a_zero_aug_weight_skips_the_augmentation_term(with_bank):
    z1, z2, bank = z(5, seed=44), z(5, seed=45), z(8, seed=46)
    inputs = ContrastInputs(z1, z2, temperature=0.5, negatives=bank if with_bank else None)
    for fast in (False, True):
        terms = PotentialMining(aug_weight=0.0).terms(inputs, StepContext(fast=fast))
        assert [role for _, _, role in terms] == ["mined"] * (1 if with_bank else 2)
        terms = PotentialMining(aug_weight=0.25).terms(inputs, StepContext(fast=fast))
        assert [(w, role) for w, _, role in terms][-1] == (0.25, "aug")


def test_with_a_bank_ids_are_refused_as_in_every_pool_call():
    # the pool form has no duplicates to mask (as InfoNCE's): ids would be ignored, so they are
    # refused (a user masking by id would otherwise get the unmasked loss without a word)
    hp = full_hp()
    q, k, bank = z(6, seed=47), z(6, seed=48), z(10, seed=49)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="use exclude_index"):
        make(hp, fast=False)(q, k, negatives=bank, ids=ids)
    got = make(hp, fast=False)(q, k, negatives=bank)
    torch.testing.assert_close(got, oracle(q, k, hp, bank=bank), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_bank", [False, True])
def test_one_neighbour_is_a_mined_positive(with_bank):
    hp = full_hp(num_neighbors=1, weighting="soft", pool_as_negatives=with_bank)
    z1, z2, h1, bank = z(5, seed=50), z(5, seed=51), z(5, seed=52), z(7, seed=53)
    pool = bank if with_bank else None
    loss = make(hp, fast=False)
    got = value_and_grads(lambda a, b: loss(a, b, negatives=pool, h1=h1), z1, z2)
    want = value_and_grads(lambda a, b: oracle(a, b, hp, bank=pool, h1=h1), z1, z2)
    assert_same(got, want)


# -- (e) the objectives that need dense weights ------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("with_bank", [False, True])
def test_the_jsd_objective_equals_the_loops(fast, weighting, with_bank):
    # Jensen-Shannon needs each negative's weight (m pi per column): no log-mass shortcut
    hp = full_hp(weighting=weighting, num_neighbors=2)
    z1, z2, h1, bank = z(6, seed=60), z(6, seed=61), z(6, seed=62), z(9, seed=63)
    pool = bank if with_bank else None
    loss = make(hp, fast=fast, objective="jsd")
    got = value_and_grads(lambda a, b: loss(a, b, negatives=pool, h1=h1), z1, z2)
    want = value_and_grads(lambda a, b: oracle(a, b, hp, bank=pool, h1=h1, objective="jsd"), z1, z2)
    assert_same(got, want)


def test_the_log_mass_of_a_term_is_minus_infinity_with_a_zero_gradient_where_nothing_is_kept():
    # select_term's log sum_j w_ij e^{c_ij} over the L_aug term (square: [2N, 2N]): row 0 keeps
    # no cell, the others their pi; row 0 is -inf with a zero gradient (no NaN)
    z1, z2 = z(3, seed=64).requires_grad_(), z(3, seed=65)
    strategy = PotentialMining(**HP, sample="expected")
    terms = strategy.terms(ContrastInputs(z1, z2, temperature=0.5), StepContext(fast=False))
    _, aug, role = terms[2]
    aug.cell_log_keep[0] = -math.inf
    selection = strategy.select_term(aug, StepContext(fast=False), role)
    mass = selection.negative_log_mass
    logits, log_keep = aug.negative_logits.detach(), aug.cell_log_keep
    for r in range(6):
        values = [
            float(logits[r, c] + log_keep[r, c]) for c in range(6) if math.isfinite(log_keep[r, c])
        ]
        want = (
            max(values) + math.log(sum(math.exp(v - max(values)) for v in values))
            if values
            else -math.inf
        )
        assert float(mass[r].detach()) == pytest.approx(want, rel=1e-12, abs=1e-12)
    (grad,) = torch.autograd.grad(torch.where(torch.isfinite(mass), mass, 0.0).sum(), z1)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("with_bank", [False, True])
def test_the_diagnostics_weigh_each_column_by_its_expected_kept_cells(with_bank):
    # diagnostics describe L_mined(z1; z2): column c's weight for anchor i is the sum of pi over
    # i's cells of c, normalised; the false-negative mass is the share of same-label columns
    n, kk = 5, 2
    z1, z2, bank = z(n, seed=66), z(n, seed=67), z(7, seed=68)
    pool = bank if with_bank else None
    labels, bank_labels = torch.tensor([0, 1, 0, 1, 2]), torch.tensor([1, 0, 2, 2, 0, 1, 1])
    column_labels = torch.cat([labels, bank_labels]) if with_bank else labels
    hp = full_hp(num_neighbors=kk)
    loss = make(hp)
    out = loss(
        z1,
        z2,
        negatives=pool,
        labels=labels,
        negative_labels=bank_labels if with_bank else None,
        return_diagnostics=True,
    )
    near = blocks_by_loop(z2, pool, kk=kk)
    offset = n if with_bank else 0
    blocks = [[j] + [offset + r for r in near[j]] for j in range(n)]
    support = torch.cat([z2, bank]) if with_bank else z2
    for i in range(n):
        s_plus = float(cosine(z1[i], z2[i]))
        weight = [0.0] * support.shape[0]
        for j in range(n):
            for c in blocks[j]:
                if j != i and (with_bank or c not in blocks[i]):
                    weight[c] += keep_prob(float(cosine(z1[i], support[c])), s_plus, hp)
        share = [w / sum(weight) for w in weight]
        got = out.diagnostics.sampling_weights[i].double()
        torch.testing.assert_close(
            got, torch.tensor(share, dtype=torch.float64), rtol=1e-6, atol=1e-7
        )
        same = sum(w for w, c in zip(share, column_labels) if int(c) == int(labels[i]))
        assert float(out.diagnostics.false_negative_mass[i]) == pytest.approx(same, abs=1e-6)


def test_the_cells_drawn_per_column_repeat_with_the_generator_not_the_global_seed():
    # the fast form's draws per column (pool_as_negatives: no fast path for the terms) read the
    # call's generator only
    q, k, bank = z(6, seed=69), z(6, seed=70), z(12, seed=71)
    loss = hardneg.create_loss("potential", pool_as_negatives=True, a=1.0, clamp=0.9)

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        return float(loss(q, k, negatives=bank, generator=torch.Generator().manual_seed(seed)))

    first = run(0, 1)
    assert run(0, 2) == first and run(1, 1) != first


# -- (f) half precision ----------------------------------------------------------------------------


def test_the_raw_kernel_of_half_precision_inputs_is_computed_in_float32():
    # bfloat16 inputs compute in float32: the raw dot products of the L_aug kernel too
    hp = full_hp(select_on="raw", a=4.0, num_neighbors=2)
    z1, z2 = (z(6, d=16, seed=s, scale=1.0).bfloat16() for s in (72, 73))
    got = make(hp, fast=False)(z1, z2)
    want = oracle(z1.double(), z2.double(), hp)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), abs=2e-5)


def test_soft_weights_read_a_half_precision_projection_in_float32():
    hp = full_hp(weighting="soft", num_neighbors=3)
    z1, z2 = z(6, seed=74).float(), z(6, seed=75).float()
    h1, h2 = (z(6, seed=s).bfloat16() for s in (76, 77))
    got = make(hp, fast=False)(z1, z2, h1=h1, h2=h2)
    want = oracle(z1.double(), z2.double(), hp, h1=h1.double(), h2=h2.double())
    assert float(got) == pytest.approx(float(want), abs=2e-5)


def test_under_bfloat16_autocast_the_mined_positives_logits_and_weights_stay_float32():
    # autocast runs the products in bfloat16; the mined positives' logits and their softmax
    # weights are then kept in the logits' float32 (weights summing to 1 to float32 precision)
    z1, z2 = z(6, seed=78).float(), z(6, seed=79).float()
    strategy = PotentialMining(weighting="soft", num_neighbors=4, sample="expected")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = strategy.terms(ContrastInputs(z1, z2, temperature=0.5), StepContext(fast=False))
        _, mined, role = terms[0]
        selection = strategy.select_term(mined, StepContext(fast=False), role)
    assert mined.negative_logits.dtype == torch.float32
    assert selection.extra_positive_logits.dtype == torch.float32
    weights = selection.extra_positive_weight
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(1), torch.ones(6), rtol=0, atol=1e-6)


def test_the_augmentation_term_labels_its_rows_for_the_diagnostics():
    # L_aug's rows are [z1; z2]: labels repeated twice; its diagnostics give the same-label
    # share of each row's expected weights (pi over the 2N - 2 candidates)
    from hardneg.diagnostics import negative_diagnostics

    n = 4
    z1, z2, labels = z(n, seed=80), z(n, seed=81), torch.tensor([0, 1, 0, 1])
    strategy = PotentialMining(**HP, sample="expected")
    inputs = ContrastInputs(z1, z2, temperature=0.5, labels=labels)
    _, aug, role = strategy.terms(inputs, StepContext(fast=False))[2]
    selection = strategy.select_term(aug, StepContext(fast=False, want_log_mass=False), role)
    diag = negative_diagnostics(aug, selection)
    x, rows = torch.cat([z1, z2]), labels.repeat(2)
    for r in range(2 * n):
        p = (r + n) % (2 * n)
        s_plus = float(cosine(x[r], x[p]))
        pi = {c: keep_prob(float(cosine(x[r], x[c])), s_plus, full_hp()) for c in range(2 * n)}
        pi = {c: w for c, w in pi.items() if c not in (r, p)}
        same = sum(w for c, w in pi.items() if rows[c] == rows[r]) / sum(pi.values())
        assert float(diag.false_negative_mass[r]) == pytest.approx(same, abs=1e-6)


@pytest.mark.parametrize("with_bank", [False, True])
def test_where_no_fast_path_serves_the_call_the_fast_form_draws_per_column(with_bank):
    # fast=True for an objective that needs dense weights (JSD: no log mass wanted, so no fast
    # path of fastpaths.py serves the call): the strategy's mined terms are the per-column form
    # (Binomial(m, pi) per column, the documented draws of the fast form); fast=False the grid
    # of one uniform per cell
    z1, z2, bank = z(5, seed=82), z(5, seed=83), z(8, seed=84)
    strategy = PotentialMining(num_neighbors=2, pool_as_negatives=with_bank)
    inputs = ContrastInputs(
        z1,
        z2,
        temperature=0.5,
        negatives=bank if with_bank else None,
        ids=None if with_bank else torch.arange(5),
    )
    columns = 13 if with_bank else 5
    dense = dict(want_log_mass=False)
    fast = [
        c for _, c, r in strategy.terms(inputs, StepContext(fast=True, **dense)) if r == "mined"
    ]
    plain = [
        c for _, c, r in strategy.terms(inputs, StepContext(fast=False, **dense)) if r == "mined"
    ]
    assert len(fast) == len(plain) == (1 if with_bank else 2)
    for mined in fast:
        assert mined.cells is None and mined.multiplicity.shape == (5, columns)
    for mined in plain:
        assert mined.cells is not None and mined.multiplicity is None


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("with_bank", [False, True])
def test_the_broadcast_pairing_where_no_fast_path_serves_the_call_equals_the_loops(fast, with_bank):
    # the code's shape bug (every row's positive with every row's negative mass) also on the
    # strategy's own per-column form: pool_as_negatives (a bank) or ids (in-batch)
    hp = full_hp(aug_pairing="broadcast", pool_as_negatives=with_bank)
    z1, z2, bank = z(5, seed=85), z(5, seed=86), z(8, seed=87)
    pool, ids = (bank, None) if with_bank else (None, torch.arange(5))
    loss = make(hp, fast=fast)
    got = value_and_grads(lambda a, b: loss(a, b, negatives=pool, ids=ids), z1, z2)
    want = value_and_grads(lambda a, b: oracle(a, b, hp, bank=pool, ids=ids), z1, z2)
    assert_same(got, want)
