"""The fast potential loss against its original implementation (``_potential_reference``): the
same values, gradients and diagnostics in every mode, the same draws with a bank, and in-batch
draws (laid out per anchor and key, one L_aug selection for both directions; see the module doc)
with the law of independent Bernoulli cells."""

from __future__ import annotations

import math

import pytest
import torch
from _potential_reference import ReferencePotentialLoss
from _spy import record_returns

from hardneg.losses import potential as fast
from hardneg.losses.potential import PotentialLoss

DIAGNOSTICS = (
    "sampling_weights",
    "gradient_weights",
    "effective_negatives",
    "kept_negatives",
    "similarities",
    "false_negative_mass",
    "false_negative_gradient_mass",
    "top_k_precision",
)


def inputs(n, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=g)
    proj = torch.randn(2, n, d, generator=g)
    bank = torch.randn(30, d, generator=g)
    support = torch.randn(11, d, generator=g)
    return z1, z2, proj, bank, support


def run(cls, hp, mode, z1, z2, proj, bank, support, seed=5):
    """Loss output and gradients (z1, z2, proj1, proj2) of one call."""
    leaves = [t.clone().requires_grad_(True) for t in (z1, z2, proj[0], proj[1])]
    a, b, p1, p2 = leaves
    kwargs = dict(generator=torch.Generator().manual_seed(seed), return_diagnostics=True)
    kwargs.update(labels=torch.arange(z1.shape[0]) % 3)
    if mode == "in-batch":
        kwargs.update(proj1=p1, proj2=p2)
    else:
        kwargs.update(negatives=bank, proj1=p1, negative_labels=torch.arange(30) % 3)
        if mode == "support":
            kwargs.update(support=support, support_labels=torch.arange(11) % 3)
    out = cls(**hp)(a, b, **kwargs)
    out.loss.backward()
    return out, [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def assert_close(x, y, rtol=1e-5):
    scale = float(y.abs().max().clamp_min(1.0))
    assert float((x - y).abs().max()) <= rtol * scale


def assert_same(fast_out, ref_out):
    (o1, g1), (o2, g2) = fast_out, ref_out
    assert_close(o1.loss.detach(), o2.loss.detach())
    assert_close(o1.per_anchor.detach(), o2.per_anchor.detach())
    for x, y in zip(g1, g2):
        assert_close(x, y)
    for name in DIAGNOSTICS:
        x, y = getattr(o1.diagnostics, name), getattr(o2.diagnostics, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        assert torch.equal(torch.isfinite(x), torch.isfinite(y)), name
        finite = torch.isfinite(y)
        assert_close(x[finite].float(), y[finite].float())
    for key, value in o2.diagnostics.extras.items():
        assert o1.diagnostics.extras[key] == pytest.approx(value, rel=1e-5, abs=1e-5)


MODES = ["in-batch", "pool", "support"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("select_on, aug_pairing", [("cosine", "matched"), ("raw", "broadcast")])
@pytest.mark.parametrize("temperature", [0.3, 0.02])  # 0.02: the per-sum log-sum-exp path
def test_expected_mode_equals_the_original(mode, weighting, select_on, aug_pairing, temperature):
    hp = dict(
        temperature=temperature,
        num_neighbors=4,
        aug_weight=0.7,
        a=2.0,
        b=0.1,
        clamp=0.95,
        weighting=weighting,
        sample="expected",
        select_on=select_on,
        aug_pairing=aug_pairing,
    )
    data = inputs(9, seed=1)
    assert_same(run(PotentialLoss, hp, mode, *data), run(ReferencePotentialLoss, hp, mode, *data))


@pytest.mark.parametrize("mode", ["pool", "support"])
@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("pool_as_negatives", [False, True])
@pytest.mark.parametrize("select_on, aug_pairing", [("cosine", "matched"), ("raw", "broadcast")])
def test_drawn_with_a_bank_equals_the_original_with_the_same_draws(
    mode, weighting, pool_as_negatives, select_on, aug_pairing
):
    hp = dict(
        temperature=0.2,
        num_neighbors=3,
        aug_weight=0.5,
        a=1.5,
        b=0.0,
        clamp=0.9,
        weighting=weighting,
        sample="bernoulli",
        select_on=select_on,
        aug_pairing=aug_pairing,
        pool_as_negatives=pool_as_negatives,
    )
    data = inputs(10, seed=2)
    assert_same(run(PotentialLoss, hp, mode, *data), run(ReferencePotentialLoss, hp, mode, *data))


def test_no_neighbours_and_a_zero_kernel_width_match_the_original_in_batch_when_drawn():
    # a = 0, clamp = 1 keeps everything: the draws cannot differ
    hp = dict(num_neighbors=0, a=0.0, clamp=1.0, sample="bernoulli")
    data = inputs(8, seed=3)
    assert_same(
        run(PotentialLoss, hp, "in-batch", *data),
        run(ReferencePotentialLoss, hp, "in-batch", *data),
    )


def test_in_batch_counts_have_the_binomial_mean_and_variance():
    # per anchor i and key l, the kept cells are Binomial(mult_l, pi_il); the diagnostics lay
    # them out on the grid, so the kept count per anchor has mean sum_l mult_l pi_il
    n, kk, draws = 8, 3, 400
    z1, z2, *_ = inputs(n, seed=4)
    drawn = PotentialLoss(num_neighbors=kk, a=3.0, aug_weight=0.5)
    g = torch.Generator().manual_seed(0)
    kept = torch.stack(
        [
            drawn(z1, z2, generator=g, return_diagnostics=True).diagnostics.kept_negatives
            for _ in range(draws)
        ]
    ).double()
    # expected count: sum of the keep probabilities over the anchor's negative cells
    probs = _grid_keep_probabilities(z1, z2, kk, a=3.0)
    mean, var = probs.sum(1), (probs * (1 - probs)).sum(1)  # independent cells
    sem = (var / draws).sqrt()
    assert ((kept.mean(0) - mean).abs() <= 5 * sem + 1e-9).all()
    assert torch.allclose(kept.var(0), var, rtol=0.35)


def _grid_keep_probabilities(z1, z2, kk, a):
    """Keep probability of every negative cell of both in-batch grids ``[2N, N(K+1)]``."""
    rows = []
    for q, k in ((z1, z2), (z2, z1)):
        qn = torch.nn.functional.normalize(q.double(), dim=1)
        kn = torch.nn.functional.normalize(k.double(), dim=1)
        n = q.shape[0]
        look = kn @ kn.T
        look.fill_diagonal_(-math.inf)
        idx = look.topk(kk, dim=1).indices
        block_ids = torch.cat([torch.arange(n).unsqueeze(1), idx], dim=1)
        sims = qn @ kn.T
        s_plus = sims.diagonal()
        pi = torch.clamp(torch.exp(-a * (sims - s_plus[:, None]) ** 2), max=0.999)
        ids = block_ids.reshape(-1)
        own = torch.zeros(n, n, dtype=torch.bool)
        own[torch.arange(n).unsqueeze(1), block_ids] = True
        neg = ~torch.eye(n, dtype=torch.bool).repeat_interleave(kk + 1, 1) & ~own[:, ids]
        rows.append(torch.where(neg, pi[:, ids], torch.zeros_like(pi[:, ids])))
    return torch.cat(rows)


def test_bernoulli_draws_are_exact_and_independent():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.0, 1 / 256, 0.3, 0.5, 253.5 / 256, 0.999, 1.0]).repeat(40000, 1)
    first, second = fast._bernoulli(256 * p, g), fast._bernoulli(256 * p, g)  # they take 256 p
    for keep in (first, second):
        freq = keep.double().mean(0)
        sem = (p[0].double() * (1 - p[0].double()) / p.shape[0]).sqrt()
        assert ((freq - p[0].double()).abs() <= 5 * sem + 1e-12).all(), freq
        assert set(keep.unique().tolist()) <= {0.0, 1.0}
    joint = (first * second).double().mean(0)  # independent: p^2
    sem = (p[0].double() ** 2 * (1 - p[0].double() ** 2) / p.shape[0]).sqrt()
    assert ((joint - p[0].double() ** 2).abs() <= 5 * sem + 1e-12).all()


def test_bernoulli_with_scratch_buffers_and_a_given_top_byte_draws_the_same():
    p = torch.rand(300, 70, generator=torch.Generator().manual_seed(4))
    scaled = 256 * p
    plain = fast._bernoulli(scaled, torch.Generator().manual_seed(5))
    top = fast._top_byte(scaled, True)
    scratch = fast._Scratch()
    again = fast._bernoulli(scaled, torch.Generator().manual_seed(5), True, top, scratch)
    assert torch.equal(plain, again)
    assert torch.equal(top, (256 * p).floor().to(torch.uint8))


def test_binomial_counts_have_the_binomial_law():
    g = torch.Generator().manual_seed(2)
    p = torch.tensor([0.0, 0.2, 0.7, 0.999, 1.0, 0.5, 0.03]).repeat(20000, 1)
    trials = torch.tensor([3, 1, 6, 12, 2, 300, 7])  # 300: more than a uint8 sum holds
    counts = fast._binomial(256 * p, trials, g).double()
    p0, m = p[0].double(), trials.double()
    mean, var = m * p0, m * p0 * (1 - p0)
    sem = (var / p.shape[0]).sqrt()
    assert ((counts.mean(0) - mean).abs() <= 5 * sem + 1e-12).all()
    assert torch.allclose(counts.var(0), var, rtol=0.1, atol=1e-9)
    assert (counts == counts.round()).all() and (counts <= m).all() and (counts >= 0).all()
    # the full law for one cell: frequencies against the binomial pmf
    col = 2
    freq = torch.bincount(counts[:, col].long(), minlength=7).double() / p.shape[0]
    pmf = torch.tensor([math.comb(6, k) * 0.7**k * 0.3 ** (6 - k) for k in range(7)])
    assert (freq - pmf).abs().max() < 0.01


def test_find_returns_every_true_entry():
    g = torch.Generator().manual_seed(3)
    for size in (1, 7, 8, 1001):
        mask = torch.rand(size, generator=g) < 0.05
        mask[-1] = True
        assert torch.equal(fast._find(mask), mask.nonzero().squeeze(1))
        counts = mask.to(torch.uint8) * 3  # counts: the nonzero entries
        for dtype in (torch.uint8, torch.int32):
            assert torch.equal(fast._find(counts.to(dtype)), mask.nonzero().squeeze(1))


def _aug_keep_probabilities(z1, z2, a, clamp):
    """Keep probability of every cell of the in-batch ``L_aug`` grid over the rows
    ``[z1; z2]`` (cosine kernel around each row's partner)."""
    xn = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    sims = xn @ xn.T
    partner = (torch.arange(2 * n) + n) % (2 * n)
    s_plus = sims[torch.arange(2 * n), partner]
    return torch.clamp(torch.exp(-a * (sims - s_plus[:, None]) ** 2), max=clamp)


def test_the_in_batch_aug_selection_has_independent_cells_with_the_kernel_law(monkeypatch):
    # in-batch one selection over the rows [z1; z2] serves both L_aug directions (module doc);
    # each of its cells is kept with probability pi, independently of the other cells
    n, draws = 6, 1500
    z1, z2, *_ = inputs(n, seed=7)
    kept = record_returns(monkeypatch, fast, "_bernoulli")
    loss = PotentialLoss(num_neighbors=2, a=3.0, clamp=0.9, aug_weight=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(draws):
        loss(z1, z2, generator=g)
    assert len(kept) == draws  # one selection per call
    kept = torch.stack(kept).double()  # [draws, 2N, 2N]
    pi = _aug_keep_probabilities(z1, z2, a=3.0, clamp=0.9)
    cells = ~torch.eye(2 * n, dtype=torch.bool)
    cells[torch.arange(2 * n), (torch.arange(2 * n) + n) % (2 * n)] = False
    freq, p = kept.mean(0)[cells], pi[cells]
    sem = (p * (1 - p) / draws).sqrt()
    assert ((freq - p).abs() <= 5 * sem + 1e-9).all()
    # independent cells: two cells of a row and the transposed cell are kept jointly with p p'
    first, second = kept[:, 0, 1], kept[:, 0, 2]
    transposed = kept[:, 1, 0]
    for other, q in ((second, pi[0, 2]), (transposed, pi[1, 0])):
        joint, expect = (first * other).mean(), pi[0, 1] * q
        assert abs(float(joint - expect)) <= 5 * float((expect * (1 - expect) / draws).sqrt())


def test_the_two_in_batch_aug_directions_share_one_selection():
    # the mined counts are drawn before L_aug, so aug_weight 0 and 1 share them: the difference
    # is L_aug per sample, once per direction; one selection makes the two halves equal (both
    # directions are the same rows in another order), and it changes from draw to draw
    n = 12
    z1, z2, *_ = inputs(n, seed=6)
    hp = dict(num_neighbors=2, a=0.0, clamp=0.5)
    diffs, augs = [], []
    for seed in range(10):
        with_aug = PotentialLoss(**hp, aug_weight=1.0)(
            z1, z2, generator=torch.Generator().manual_seed(seed), return_diagnostics=True
        )
        without = PotentialLoss(**hp, aug_weight=0.0)(
            z1, z2, generator=torch.Generator().manual_seed(seed), return_diagnostics=True
        )
        aug = with_aug.per_anchor - without.per_anchor
        diffs.append(aug[:n] - aug[n:])
        augs.append(aug[:n])
    assert torch.stack(diffs).abs().max() < 1e-5
    augs = torch.stack(augs)
    assert (augs.std(0) > 1e-3).all()  # drawn: the selection varies with the seed


def test_expected_mode_equals_the_original_with_padded_neighbour_rows():
    # N = 180, K = 5: the CPU lookup pads its rows to 64 K = 320 entries (topk's partial sort)
    hp = dict(temperature=0.3, num_neighbors=5, a=2.0, clamp=0.95, weighting="soft")
    hp.update(sample="expected")
    data = inputs(180, seed=8)
    assert_same(
        run(PotentialLoss, hp, "in-batch", *data),
        run(ReferencePotentialLoss, hp, "in-batch", *data),
    )


def test_two_in_batch_calls_before_one_backward_give_the_sum_of_their_gradients():
    # the Gram matrix and its gradient live in the module's CPU buffers; neither is saved for
    # the backward, so a second call before the backward changes nothing
    loss = PotentialLoss(sample="expected", num_neighbors=2)
    views = [t.clone().requires_grad_(True) for t in inputs(10, seed=9)[:2]]
    others = [t.clone().requires_grad_(True) for t in inputs(10, seed=10)[:2]]
    (loss(*views) + 2 * loss(*others)).backward()
    together = [t.grad.clone() for t in views + others]
    for t in views + others:
        t.grad = None
    loss(*views).backward()
    (2 * loss(*others)).backward()
    for x, y in zip(together, [t.grad for t in views + others]):
        assert torch.allclose(x, y, atol=1e-6)


def test_binomial_of_a_strided_grid_with_a_given_top_byte_draws_the_same():
    g = torch.Generator().manual_seed(6)
    pi = torch.rand(40, 2, 30, generator=g)
    scaled = (256 * pi).transpose(0, 1).contiguous().transpose(0, 1)  # strided [R, H, W]
    trials = torch.randint(1, 9, (60,), generator=g)
    plain = fast._binomial(scaled, trials, torch.Generator().manual_seed(3)).clone()
    top = fast._top_byte(scaled.reshape(40, 60).T, True)  # the columns as rows
    again = fast._binomial(
        scaled, trials, torch.Generator().manual_seed(3), True, top, fast._Scratch()
    )
    assert torch.equal(plain, again)
    assert (plain <= trials).all() and (plain >= 0).all() and (plain == plain.round()).all()
