"""Potential-sample mining (Dong, Long, Li 2023) as a strategy: the loss against a loop-by-loop
float64 reading of the paper's equations (values and gradients), its oracles, the law of its
draws, the memory bank's own entry, precision, torch.compile and input validation."""

from __future__ import annotations

import math

import pytest
import torch

import hardneg
from hardneg.losses.contrastive import ContrastInputs
from hardneg.strategies import PotentialMining, StepContext

HP = dict(num_neighbors=3, aug_weight=0.7, a=2.0, b=0.1, clamp=0.95)


# -- the equations, one anchor and one cell at a time, in float64 (no library code) ---------------


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def keep_prob(s, s_plus, hp):
    return min(hp["clamp"], math.exp(-hp["a"] * (s - s_plus - hp["b"]) ** 2))


def weight(u, row, col, pi):
    """A cell's weight in D: its keep probability (expected), or the draw ``u < pi``."""
    return pi if u is None else float(float(u[row, col]) < pi)


def ref_mined(q, k, hp, bank=None, proj=None, exclude=None, u=None):
    """L_mined(q; k): blocks {k_j, K nearest neighbours of k_j}; the own block holds the positives,
    the other blocks the candidate negatives, each kept with the kernel's probability."""
    n, t, kk = q.shape[0], hp["temperature"], hp["num_neighbors"]
    qn, kn = unit(q), unit(k)
    in_batch = bank is None
    sup = kn if in_batch else unit(bank.detach())
    vec = {("k", j): kn[j] for j in range(n)} | {("b", r): sup[r] for r in range(sup.shape[0])}
    blocks = []
    for j in range(n):
        cands = [
            r
            for r in range(sup.shape[0])
            if not (in_batch and r == j) and not (exclude is not None and r == int(exclude[j]))
        ]
        near = sorted(cands, key=lambda r: -float(kn[j] @ sup[r]))[:kk]
        blocks.append([("k", j)] + [("k" if in_batch else "b", r) for r in near])
    size = len(blocks[0])
    losses = []
    for i in range(n):
        pos = [qn[i] @ vec[c] for c in blocks[i]]
        s_plus = float(pos[0])
        d = sum(torch.exp(s / t) for s in pos)
        for j in range(n):
            for m, c in enumerate(blocks[j]):
                if j == i or (in_batch and c in blocks[i]):
                    continue  # the own block; in-batch also any of i's own positives
                if exclude is not None and c == ("b", int(exclude[i])):
                    continue  # the anchor's own bank entry
                s = qn[i] @ vec[c]
                d = d + weight(u, i, j * size + m, keep_prob(float(s), s_plus, hp)) * torch.exp(
                    s / t
                )
        if hp.get("pool_as_negatives") and not in_batch:
            for r in range(sup.shape[0]):
                if ("b", r) in blocks[i][1:] or (exclude is not None and r == int(exclude[i])):
                    continue
                s = qn[i] @ sup[r]
                d = d + weight(u, i, n * size + r, keep_prob(float(s), s_plus, hp)) * torch.exp(
                    s / t
                )
        w = [1.0] * size
        if hp["weighting"] == "soft" and size > 1:
            g = unit(q if proj is None else proj)[i]
            att = torch.softmax(torch.stack([g @ vec[c] for c in blocks[i][1:]]), dim=0)
            w = [1.0] + list(att)
        losses.append(sum(wp * (torch.log(d) - s / t) for wp, s in zip(w, pos)))
    return sum(losses) / n


def ref_aug(q, k, hp, u=None):
    """L_aug(q, k): SimCLR over the rows of [q; k], negatives kept by the same kernel."""
    n, t = q.shape[0], hp["temperature"]
    x = torch.cat([q, k])
    xn = unit(x)
    sigma = (x if hp["select_on"] == "raw" else xn).detach()
    pos, neg = [], []
    for r in range(2 * n):
        p = (r + n) % (2 * n)
        s_plus = float(sigma[r] @ sigma[p])
        mass = 0.0
        for c in range(2 * n):
            if c not in (r, p):
                pi = keep_prob(float(sigma[r] @ sigma[c]), s_plus, hp)
                mass = mass + weight(u, r, c, pi) * torch.exp(xn[r] @ xn[c] / t)
        pos.append(xn[r] @ xn[p] / t)
        neg.append(mass)
    if hp["aug_pairing"] == "broadcast":  # the code: every positive with every row's Ng
        terms = [torch.log(torch.exp(a) + g) - a for a in pos for g in neg]
    else:
        terms = [torch.log(torch.exp(a) + g) - a for a, g in zip(pos, neg)]
    return sum(terms) / len(terms)


def ref_loss(z1, z2, hp, bank=None, h1=None, h2=None, exclude=None, draws=None):
    """The loss of one call; ``draws`` are the uniforms of the documented draw order."""
    u = draws or [None, None, None]
    if bank is None:
        mined = (
            ref_mined(z1, z2, hp, proj=h1, u=u[0]) + ref_mined(z2, z1, hp, proj=h2, u=u[1])
        ) / 2
        aug_u = u[2]
    else:
        mined = ref_mined(z1, z2, hp, bank=bank, proj=h1, exclude=exclude, u=u[0])
        aug_u = u[1]
    return mined + hp["aug_weight"] * ref_aug(z1, z2, hp, aug_u) if hp["aug_weight"] > 0 else mined


def full_hp(**over):
    hp = dict(HP, temperature=0.5, weighting="hard", sample="expected", select_on="cosine")
    hp.update(aug_pairing="matched", pool_as_negatives=False)
    hp.update(over)
    return hp


def make(hp):
    # the plain form: its draws are the documented grid's (the fast path draws per column, same
    # law; fast = plain in expected mode and the law are tested in tests/test_fastpaths.py)
    return hardneg.create_loss("potential", fast=False, **hp)


def data(n=6, d=8, seed=0, scale=1.0, dtype=torch.float64, bank=20):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype) * scale
    z2 = z1 + 0.8 * torch.randn(n, d, generator=g, dtype=dtype) * scale
    h1, h2 = torch.randn(2, n, d, generator=g, dtype=dtype)
    return z1, z2, h1, h2, torch.randn(bank, d, generator=g, dtype=dtype) * scale


def value_and_grads(fn, *tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def assert_same(a, b, tol=1e-9):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, rtol=tol, atol=tol)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


PAIRINGS = [
    ("cosine", "matched"),
    ("raw", "broadcast"),
    ("cosine", "broadcast"),
    ("raw", "matched"),
]


# -- (a) the loss equals the equations: values and gradients ------------------------------------


@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("select_on, aug_pairing", PAIRINGS)
def test_in_batch_equals_the_loop_oracle(weighting, select_on, aug_pairing):
    hp = full_hp(weighting=weighting, select_on=select_on, aug_pairing=aug_pairing)
    z1, z2, h1, h2, _ = data(seed=1, scale=0.5)  # raw dot products of order 1: the kernel bites
    loss = make(hp)
    got = value_and_grads(lambda a, b, g1, g2: loss(a, b, h1=g1, h2=g2), z1, z2, h1, h2)
    want = value_and_grads(lambda a, b, g1, g2: ref_loss(a, b, hp, h1=g1, h2=g2), z1, z2, h1, h2)
    assert_same(got, want)


@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("select_on, aug_pairing", PAIRINGS[:2])
@pytest.mark.parametrize("pool_as_negatives", [False, True])
def test_with_a_bank_equals_the_loop_oracle(weighting, select_on, aug_pairing, pool_as_negatives):
    hp = full_hp(weighting=weighting, select_on=select_on, aug_pairing=aug_pairing)
    hp.update(pool_as_negatives=pool_as_negatives)
    q, k, h1, _, bank = data(seed=2, scale=0.5)
    loss = make(hp)
    got = value_and_grads(lambda a, b, g: loss(a, b, negatives=bank, h1=g), q, k, h1)
    want = value_and_grads(lambda a, b, g: ref_loss(a, b, hp, bank=bank, h1=g), q, k, h1)
    assert_same(got, want)


def test_the_authors_variant_hard_raw_broadcast_is_reachable_and_matches_its_equations():
    hp = full_hp(weighting="hard", select_on="raw", aug_pairing="broadcast", sample="bernoulli")
    q, k, _, _, bank = data(seed=3, scale=0.4, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    draws = [torch.rand(6, 6 * 4, generator=g), torch.rand(12, 12, generator=g)]
    want = ref_loss(q.double(), k.double(), hp, bank=bank.double(), draws=draws)
    got = make(hp)(q, k, negatives=bank, generator=torch.Generator().manual_seed(3))
    assert float(got) == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize(
    "with_bank, pool_as_negatives", [(False, False), (True, False), (True, True)]
)
def test_bernoulli_draws_follow_the_documented_order(with_bank, pool_as_negatives):
    # one float32 torch.rand per term over its cells: [N, N(K+1) (+ Q)] per mined direction,
    # then [2N, 2N] for L_aug; the loop oracle on those uniforms is the loss
    n, kk, q_rows = 6, 3, 20
    hp = full_hp(sample="bernoulli", a=1.0, clamp=0.9, pool_as_negatives=pool_as_negatives)
    z1, z2, h1, h2, bank = data(seed=4, scale=0.5)
    g = torch.Generator().manual_seed(11)
    width = n * (kk + 1) + (q_rows if pool_as_negatives else 0)
    mined = [torch.rand(n, width, generator=g) for _ in range(1 if with_bank else 2)]
    draws = [*mined, torch.rand(2 * n, 2 * n, generator=g)]
    kwargs = {"negatives": bank} if with_bank else {}
    got = make(hp)(z1, z2, generator=torch.Generator().manual_seed(11), **kwargs)
    want = ref_loss(z1, z2, hp, bank=kwargs.get("negatives"), draws=draws)
    assert float(got) == pytest.approx(float(want), abs=1e-9)
    kept = torch.cat([d.flatten() for d in draws]) < 0.9
    assert 0 < int(kept.sum()) < kept.numel()


def test_two_moco_calls_average_to_the_symmetric_objective():
    hp = full_hp()
    q1, k1, _, _, queue = data(seed=5)
    q2, k2, *_ = data(seed=6)
    loss = make(hp)
    got = (loss(q1, k2, negatives=queue) + loss(q2, k1, negatives=queue)) / 2
    want = (ref_loss(q1, k2, hp, bank=queue) + ref_loss(q2, k1, hp, bank=queue)) / 2
    assert float(got) == pytest.approx(float(want), abs=1e-9)


# -- (b) the memory bank's own entry (exclude_index) ----------------------------------------------


def memory_bank_batch(seed=7, n=6, rows=20):
    """The memory-bank framework's call: k = bank[idx], every bank row a candidate."""
    z1, _, h1, _, bank = data(n=n, seed=seed, bank=rows)
    idx = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:n]
    return z1, bank[idx], h1, bank, idx


@pytest.mark.parametrize("pool_as_negatives", [False, True])
@pytest.mark.parametrize("weighting", ["hard", "soft"])
def test_the_own_bank_entry_is_neither_a_neighbour_nor_a_negative(pool_as_negatives, weighting):
    hp = full_hp(pool_as_negatives=pool_as_negatives, weighting=weighting)
    q, k, h1, bank, idx = memory_bank_batch()
    loss = make(hp)
    got = value_and_grads(lambda a, g: loss(a, k, negatives=bank, h1=g, exclude_index=idx), q, h1)
    want = value_and_grads(lambda a, g: ref_loss(a, k, hp, bank=bank, h1=g, exclude=idx), q, h1)
    assert_same(got, want)
    # without the exclusion the own entry (cosine 1 with the key) is every key's first neighbour
    mined = ref_loss(q, k, hp, bank=bank, h1=h1)
    assert abs(float(mined) - float(got[0])) > 1e-3


def test_the_own_bank_entry_is_never_mined_as_a_positive():
    hp = full_hp(num_neighbors=2)
    q, k, _, bank, idx = memory_bank_batch(seed=8)
    strategy = hardneg.create_loss("potential", **hp).strategy
    inputs = ContrastInputs(q, k, temperature=0.5, negatives=bank, exclude_index=idx)
    mined = strategy.terms(inputs, StepContext(fast=False))[0][1]
    own_column = (idx + q.shape[0]).unsqueeze(1)  # bank row r is column N + r
    assert not (mined.neighbours == own_column).any()
    assert not torch.isfinite(mined.negative_logits.gather(1, own_column)).any()
    unmasked = strategy.terms(
        ContrastInputs(q, k, temperature=0.5, negatives=bank), StepContext(fast=False)
    )
    assert (unmasked[0][1].neighbours[:, 0:1] == own_column).all()  # what the exclusion prevents


# -- (c) oracles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bank", [False, True])
def test_a_zero_with_clamp_one_keeps_every_negative(with_bank):
    hp = full_hp(a=0.0, clamp=1.0)
    z1, z2, _, _, bank = data(seed=9, dtype=torch.float32)
    kwargs = {"negatives": bank} if with_bank else {}
    drawn = make(dict(hp, sample="bernoulli"))
    expected = make(hp)(z1, z2, **kwargs)
    torch.testing.assert_close(drawn(z1, z2, generator=torch.Generator(), **kwargs), expected)
    # every candidate cell is kept: with a bank, the 5 other blocks of 4 cells each
    if with_bank:
        strategy = drawn.strategy
        inputs = ContrastInputs(z1, z2, temperature=0.5, negatives=bank)
        contrast = strategy.terms(inputs, StepContext(fast=False))[0][1]
        selection = strategy.select_term(
            contrast, StepContext(generator=torch.Generator(), fast=False), "mined"
        )
        assert torch.equal(selection.negative_log_weights.exp().sum(1), torch.full((6,), 20.0))


def test_no_neighbours_and_no_aug_loss_is_infonce_over_q_and_k():
    hp = dict(num_neighbors=0, aug_weight=0.0, a=0.0, clamp=1.0, temperature=0.2)
    z1, z2, _, _, queue = data(n=8, seed=10, dtype=torch.float32)
    potential = hardneg.create_loss("potential", **hp)
    infonce = hardneg.create_loss("infonce", temperature=0.2)
    own = torch.arange(8)
    # with a bank: the other keys of the batch are the negatives, the bank only the support
    torch.testing.assert_close(
        potential(z1, z2, negatives=queue), infonce(z1, z2, negatives=z2, exclude_index=own)
    )
    # in-batch: both directions
    both = (
        infonce(z1, z2, negatives=z2, exclude_index=own)
        + infonce(z2, z1, negatives=z1, exclude_index=own)
    ) / 2
    torch.testing.assert_close(potential(z1, z2), both)
    qn, kn = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    logits = qn @ kn.T / 0.2
    explicit = (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
    torch.testing.assert_close(potential(z1, z2, negatives=queue), explicit)


def test_neighbours_are_capped_at_the_support_size():
    strategy = PotentialMining(num_neighbors=5)
    z1, z2, _, _, bank = data(n=3, seed=11, bank=4)
    terms = strategy.terms(ContrastInputs(z1, z2, temperature=0.5), StepContext(fast=False))
    assert terms[0][1].neighbours.shape == (3, 2)
    terms = strategy.terms(
        ContrastInputs(z1, z2, temperature=0.5, negatives=bank), StepContext(fast=False)
    )
    assert terms[0][1].neighbours.shape == (3, 4)
    exclude = torch.tensor([0, 1, 2])
    inputs = ContrastInputs(z1, z2, temperature=0.5, negatives=bank, exclude_index=exclude)
    assert strategy.terms(inputs, StepContext(fast=False))[0][1].neighbours.shape == (3, 3)


# -- (d) the law of the draws -------------------------------------------------------------------


@pytest.mark.parametrize("role_index", [0, 2])  # a mined direction (counts per key), L_aug
def test_drawn_weights_have_the_mean_and_variance_of_the_expected_mode(role_index):
    # a column's weight is the number of its kept cells: a sum of independent Bernoulli(pi)
    hp = dict(HP, a=3.0, clamp=0.9)
    z1, z2, *_ = data(n=6, seed=12, dtype=torch.float32)
    inputs = ContrastInputs(z1, z2, temperature=0.5)
    drawn, expected = PotentialMining(**hp), PotentialMining(**hp, sample="expected")
    _, contrast, role = drawn.terms(inputs, StepContext(fast=False))[role_index]
    mean = (
        expected.select_term(contrast, StepContext(fast=False), role)
        .negative_log_weights.exp()
        .double()
    )
    g = torch.Generator().manual_seed(0)
    draws = 1500
    counts = torch.stack(
        [
            drawn.select_term(
                contrast, StepContext(generator=g, fast=False), role
            ).negative_log_weights.exp()
            for _ in range(draws)
        ]
    ).double()
    assert torch.equal(counts, counts.round()) and (counts >= 0).all()
    pi = contrast.cell_log_keep.exp().double()
    var = pi * (1 - pi)
    if contrast.cells is not None:  # sum the variance of the cells of each column
        var = torch.zeros_like(mean).scatter_add_(1, contrast.cells.expand(6, -1), var)
    sem = (var / draws).sqrt()
    assert ((counts.mean(0) - mean).abs() <= 5 * sem + 1e-9).all()
    informative = var > 0.15  # a Bernoulli far from 0 and 1: its sample variance is +-4%
    ratio = counts.var(0)[informative] / var[informative]
    assert informative.sum() > 5 and ((ratio > 0.8) & (ratio < 1.2)).all()


def test_a_fixed_generator_repeats_the_draws_and_another_seed_does_not():
    z1, z2, _, _, bank = data(n=12, seed=13, dtype=torch.float32, bank=40)
    loss = hardneg.create_loss("potential")

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return float(loss(z1, z2, generator=g)), float(loss(z1, z2, negatives=bank, generator=g))

    assert run(0) == run(0)
    first, other = run(0), run(1)
    assert first[0] != other[0] and first[1] != other[1]


# -- (e) precision, torch.compile, robustness -----------------------------------------------------


@pytest.mark.parametrize("with_bank", [False, True])
def test_float64_inputs_compute_in_float64(with_bank):
    z1, z2, _, _, bank = data(seed=14)
    kwargs = {"negatives": bank} if with_bank else {}
    loss = make(full_hp())(z1, z2, **kwargs)
    assert loss.dtype == torch.float64
    single = make(full_hp())(z1.float(), z2.float(), **{k: v.float() for k, v in kwargs.items()})
    assert single.dtype == torch.float32
    assert abs(float(loss) - float(single)) < 1e-4 and float(loss) != float(single)


def test_eager_and_compiled_agree_in_values_and_gradients():
    # aot_eager traces the whole loss (dynamo + AOT autograd, no graph break at check_inputs=False)
    # without inductor's C++ build, minutes on this machine; inductor gave the same values
    hp = full_hp(weighting="soft", num_neighbors=2)
    loss = make(dict(hp, check_inputs=False))
    torch.compiler.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    z1, z2, h1, h2, bank = data(seed=15, dtype=torch.float32)
    for fn in (
        lambda m: lambda a, b: m(a, b, h1=h1, h2=h2),
        lambda m: lambda a, b: m(a, b, negatives=bank, h1=h1),
    ):
        assert_same(
            value_and_grads(fn(compiled), z1, z2), value_and_grads(fn(loss), z1, z2), tol=1e-5
        )


def assert_finite_with_grads(loss_fn, z1, z2, **kwargs):
    out, grads = value_and_grads(lambda a, b: loss_fn(a, b, **kwargs), z1, z2)
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)
    return out


@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("sample", ["bernoulli", "expected"])
@pytest.mark.parametrize("with_bank", [False, True])
def test_finite_at_low_temperature(weighting, sample, with_bank):
    z1, z2, _, _, bank = data(n=16, d=32, seed=16, scale=30.0, dtype=torch.float32, bank=64)
    loss_fn = make(dict(temperature=0.05, weighting=weighting, sample=sample, select_on="raw"))
    kwargs = {"negatives": bank} if with_bank else {}
    assert_finite_with_grads(loss_fn, z1, z2, generator=torch.Generator(), **kwargs)


@pytest.mark.parametrize("with_bank", [False, True])
def test_finite_under_bf16_autocast(with_bank):
    z1, z2, _, _, bank = data(n=16, d=32, seed=17, dtype=torch.float32, bank=64)
    loss_fn = make(dict(temperature=0.05, weighting="soft", pool_as_negatives=True))
    kwargs = {"negatives": bank} if with_bank else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = assert_finite_with_grads(loss_fn, z1.bfloat16(), z2.bfloat16(), **kwargs)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("seed", range(4))
def test_finite_when_an_anchor_keeps_no_negative(seed):
    # two samples: in-batch each key's neighbour is the other key, so L_mined has no negative at
    # all; a = 50 drops most L_aug negatives. No NaN value or gradient
    z1, z2, *_ = data(n=2, seed=seed, dtype=torch.float32)
    loss_fn = make(dict(a=50.0, num_neighbors=1))
    assert_finite_with_grads(loss_fn, z1, z2, generator=torch.Generator().manual_seed(seed))


def test_finite_with_duplicated_rows():
    z = torch.randn(4, 8).repeat(3, 1)
    bank = torch.randn(2, 8).repeat(5, 1)
    for kwargs in ({}, {"negatives": bank}):
        assert_finite_with_grads(make({}), z, z.clone(), generator=torch.Generator(), **kwargs)


def test_expected_loss_is_invariant_to_the_order_of_batch_and_bank():
    z1, z2, _, _, bank = data(n=10, seed=18, bank=30)
    perm, bank_perm = torch.randperm(10), torch.randperm(30)
    for weighting in ("hard", "soft"):
        loss_fn = make(full_hp(weighting=weighting))
        torch.testing.assert_close(loss_fn(z1, z2), loss_fn(z1[perm], z2[perm]))
        torch.testing.assert_close(
            loss_fn(z1, z2, negatives=bank), loss_fn(z1[perm], z2[perm], negatives=bank[bank_perm])
        )


def test_duplicate_ids_are_no_negatives():
    # sample 1 repeats sample 0 (same id): with the pair's ids equal, neither is a negative of
    # the other, in either term; the loss then equals the one where the duplicate's cells are gone
    z1, z2, *_ = data(n=6, seed=19)
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    strategy = PotentialMining(**HP, sample="expected")
    terms = strategy.terms(
        ContrastInputs(z1, z2, temperature=0.5, ids=ids), StepContext(fast=False)
    )
    for _, contrast, _ in terms:
        sel = strategy.select_term(contrast, StepContext(fast=False), "x")
        w = sel.negative_log_weights.exp()
        assert float(w[0, 1]) == 0 and float(w[1, 0]) == 0
        if contrast.cells is None:  # L_aug over [z1; z2]: the duplicate's other view too
            assert float(w[0, 7]) == 0 and float(w[6, 1]) == 0


def test_terms_and_diagnostics():
    z1, z2, _, _, bank = data(n=8, seed=20, dtype=torch.float32)
    labels = torch.arange(8) % 2
    loss_fn = make(full_hp())
    out = loss_fn(z1, z2, labels=labels, return_diagnostics=True)
    assert set(out.terms) == {"mined", "aug"}
    assert out.loss.item() == pytest.approx(out.terms["mined"] + out.terms["aug"], rel=1e-6)
    assert out.per_anchor.shape == (8,)  # L_mined(z1; z2), the first term
    assert out.diagnostics.false_negative_mass is not None
    out = loss_fn(
        z1,
        z2,
        negatives=bank,
        labels=labels,
        negative_labels=torch.arange(20) % 2,
        return_diagnostics=True,
    )
    assert out.diagnostics.false_negative_mass is not None
    assert torch.isfinite(out.diagnostics.effective_negatives).all()


# -- (f) settings and bad inputs ----------------------------------------------------------------


def test_registry_defaults_and_what_the_strategy_asks_for():
    assert hardneg.loss_hparams("potential") == {
        "temperature": 0.5,
        "objective": "infonce",
        "positive_mode": "separate",
        "normalize": True,
        "filter": None,
        "filter_options": None,
        "check_inputs": True,
        "fast": True,
        "num_neighbors": 5,
        "aug_weight": 0.5,
        "a": 0.5,
        "b": 0.0,
        "clamp": 0.999,
        "weighting": "hard",
        "sample": "bernoulli",
        "select_on": "cosine",
        "aug_pairing": "matched",
        "pool_as_negatives": False,
    }
    loss = hardneg.create_loss("potential")
    assert loss.feature_kind == "projection" and loss.draws
    with pytest.raises(ValueError, match="tau_plus"):
        hardneg.create_loss("potential", tau_plus=0.1)
    with pytest.raises(ValueError, match="several contrast terms"):
        hardneg.create_loss("potential", filter="positive_aware")


@pytest.mark.parametrize("mode", ["joint", "pooled"])
def test_a_positive_mode_it_would_ignore_is_refused(mode):
    """The mined term is 'joint' with 'sum' and the augmentation term 'separate' whatever the
    loss's positive_mode: another mode gave the very loss of the default, silently."""
    message = (
        f"^potential sets the positive mode of each of its terms itself; positive_mode must be "
        f"'separate' \\(the default\\), got '{mode}'$"
    )
    with pytest.raises(ValueError, match=message):
        hardneg.create_loss("potential", positive_mode=mode)


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", 0.0),
        ("num_neighbors", -1),
        ("num_neighbors", 1.5),
        ("aug_weight", -0.1),
        ("a", -1.0),
        ("b", float("nan")),
        ("clamp", 0.0),
        ("clamp", 1.5),
        ("weighting", "softest"),
        ("sample", "gumbel"),
        ("select_on", "euclidean"),
        ("aug_pairing", "all"),
        ("pool_as_negatives", "yes"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(name, value):
    with pytest.raises(ValueError, match=name):
        hardneg.create_loss("potential", **{name: value})


def test_unknown_hyperparameter_is_rejected_with_a_hint():
    with pytest.raises(ValueError, match="num_neighbors"):
        hardneg.create_loss("potential", num_neighbours=5)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda f, z, b: f(z, z[:, :4]), "z1 and z2"),
        (lambda f, z, b: f(z[:1], z[:1]), "N = 2"),
        (lambda f, z, b: f(z, z, negatives=b, exclude_index=torch.full((6,), 20)), "exclude_index"),
        (lambda f, z, b: f(z, z, negatives=b, exclude_index=torch.full((6,), -1)), "exclude_index"),
        (lambda f, z, b: f(z, z, negatives=b, exclude_index=torch.zeros(6)), "exclude_index"),
        (lambda f, z, b: f(z, z, progress=1.5), "progress"),
        (lambda f, z, b: f(z, z, generator=0), "generator"),
        (lambda f, z, b: f(z, z, hard_negatives=z.unsqueeze(1)), "hard_negatives"),
        (lambda f, z, b: f(z, z, extra_views=[z]), "extra_views"),
        (lambda f, z, b: f(z, z, h1=z[:, :3], h2=z[:, :3]), "h1"),
    ],
)
def test_bad_inputs_name_the_argument(call, name):
    z, bank = torch.randn(6, 8), torch.randn(20, 8)
    loss = hardneg.create_loss("potential", weighting="soft")
    with pytest.raises(ValueError, match=name):
        call(loss, z, bank)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    ),
]


@pytest.mark.parametrize("with_bank", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_expected_mode_on_each_device_equals_the_float64_equations(device, with_bank):
    """On every device, float32: the value and the gradients of the deterministic (expected)
    loss equal the float64 loop re-statement of the equations to 1e-5 (the oracle of
    test_gradient_oracles.py; a wrong device branch cannot hide behind a loose tolerance)."""
    from test_gradient_oracles import as64, potential_reference

    g = torch.Generator().manual_seed(26)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    bank = torch.randn(128, 32, generator=torch.Generator().manual_seed(27)) if with_bank else None
    loss_fn = hardneg.create_loss(
        "potential", temperature=0.5, num_neighbors=5, aug_weight=0.5, sample="expected"
    )
    x1, x2 = (z.to(device).requires_grad_() for z in (z1, z2))
    pool = None if bank is None else bank.to(device)
    loss = loss_fn(x1, x2, negatives=pool)
    g1, g2 = torch.autograd.grad(loss, (x1, x2))
    r1, r2 = as64(z1, z2)
    want = potential_reference(5, 0.5, "hard")(r1, r2, None if bank is None else bank.double())
    w1, w2 = torch.autograd.grad(want, (r1, r2))
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach().cpu().double(), want.detach(), **tol)
    torch.testing.assert_close(g1.cpu().double(), w1, **tol)
    torch.testing.assert_close(g2.cpu().double(), w2, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_drawn_mode_runs_with_a_generator_on_each_device_under_bf16_autocast(device):
    g = torch.Generator().manual_seed(28)
    z1, z2 = (torch.randn(64, 128, generator=g).to(device) for _ in range(2))
    bank = torch.randn(4096, 128, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = assert_finite_with_grads(
            hardneg.create_loss("potential"), z1, z2, negatives=bank, generator=gen
        )
    assert loss.dtype == torch.float32
