"""Potential-sample mining (Dong et al. 2023): the loss against a loop-by-loop reading of its
equations, its oracles, numerical robustness and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _spy import record_returns

import hardneg
from hardneg.losses import potential
from hardneg.losses.potential import PotentialLoss

HP = dict(temperature=0.5, num_neighbors=3, aug_weight=0.5, a=0.5, b=0.0, clamp=0.999)


# -- a straightforward re-implementation, one anchor at a time, in float64 ------------------------


def keep_prob(s, s_plus, hp):
    return min(hp["clamp"], math.exp(-hp["a"] * (s - s_plus - hp["b"]) ** 2))


def selected(u, row, col, pi, hp):
    """The weight of one candidate: its keep probability, or the draw ``u < pi``."""
    if hp["sample"] == "expected":
        return pi
    return 1.0 if float(u[row, col]) < pi else 0.0


def ref_mined(q, k, support, pool, proj, u, hp):
    """L_mined(q; k): blocks {k_j, K neighbours of k_j}, own block positive, other blocks negative."""
    n, t = q.shape[0], hp["temperature"]
    qn, kn = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    in_batch = support is None
    bank = kn if in_batch else F.normalize(support.double(), dim=1)
    kk = min(hp["num_neighbors"], n - 1 if in_batch else bank.shape[0])
    blocks, ids = [], []  # members of each block and their support rows
    for j in range(n):
        others = [r for r in range(bank.shape[0]) if not (in_batch and r == j)]
        order = sorted(others, key=lambda r: -float(kn[j] @ bank[r]))[:kk]
        blocks.append([kn[j]] + [bank[r] for r in order])
        ids.append([j] + order)
    pool_n = None if pool is None else F.normalize(pool.double(), dim=1)
    losses = []
    for i in range(n):
        s_pos = [float(qn[i] @ p) for p in blocks[i]]
        s_plus = s_pos[0]
        d = sum(math.exp(s / t) for s in s_pos)
        for j in range(n):
            for m, c in enumerate(blocks[j]):
                if j == i or (in_batch and ids[j][m] in ids[i]):
                    continue  # the own block, or (in-batch) one of i's own positives
                s = float(qn[i] @ c)
                d += selected(u, i, j * (kk + 1) + m, keep_prob(s, s_plus, hp), hp) * math.exp(
                    s / t
                )
        if pool_n is not None:
            for p in range(pool_n.shape[0]):
                if pool is support and p in ids[i][1:]:
                    continue  # the anchor's own neighbours are positives
                s = float(qn[i] @ pool_n[p])
                col = n * (kk + 1) + p
                d += selected(u, i, col, keep_prob(s, s_plus, hp), hp) * math.exp(s / t)
        weights = [1.0] * (kk + 1)
        if hp["weighting"] == "soft" and kk > 0:
            g = F.normalize((q if proj is None else proj).double(), dim=1)[i]
            att = [math.exp(float(g @ nb)) for nb in blocks[i][1:]]
            weights = [1.0] + [a / sum(att) for a in att]
        losses.append(sum(w * (math.log(d) - s / t) for w, s in zip(weights, s_pos)))
    return sum(losses) / n


def ref_aug(q, k, u, hp):
    """L_aug(q, k): SimCLR over the rows of [q; k], negatives selected by the same kernel."""
    n, t = q.shape[0], hp["temperature"]
    x = torch.cat([q, k]).double()
    xn = F.normalize(x, dim=1)
    sigma = x if hp["select_on"] == "raw" else xn
    pos, neg_mass = [], []
    for r in range(2 * n):
        partner = (r + n) % (2 * n)
        s_plus = float(sigma[r] @ sigma[partner])
        mass = 0.0
        for c in range(2 * n):
            if c in (r, partner):
                continue
            pi = keep_prob(float(sigma[r] @ sigma[c]), s_plus, hp)
            mass += selected(u, r, c, pi, hp) * math.exp(float(xn[r] @ xn[c]) / t)
        pos.append(math.exp(float(xn[r] @ xn[partner]) / t))
        neg_mass.append(mass)
    if hp["aug_pairing"] == "broadcast":  # every positive against every row's negative mass
        return sum(-math.log(p / (p + g)) for p in pos for g in neg_mass) / (2 * n) ** 2
    return sum(-math.log(p / (p + g)) for p, g in zip(pos, neg_mass)) / (2 * n)


def full_hp(**overrides):
    hp = dict(HP, weighting="hard", sample="bernoulli", select_on="cosine", aug_pairing="matched")
    hp.update(overrides)
    return hp


def make_loss(hp, **extra):
    return PotentialLoss(**hp, **extra)


def draws(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(*s, generator=g) for s in shapes]


def embeddings(n, d=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g) * scale
    return q, (q + 0.8 * torch.randn(n, d, generator=g)) * scale


# -- (a) the loss equals the equations ------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("sample", ["bernoulli", "expected"])
def test_matches_loop_reference_with_a_bank(weighting, sample):
    n, kk, q_rows = 6, 3, 20
    hp = full_hp(weighting=weighting, sample=sample)
    q, k = embeddings(n, seed=1)
    bank = torch.randn(q_rows, 8, generator=torch.Generator().manual_seed(2))
    proj = torch.randn(n, 8, generator=torch.Generator().manual_seed(3))
    u_mined, u_aug = draws(7, (n, n * (kk + 1)), (2 * n, 2 * n))
    expected = ref_mined(q, k, bank, None, proj, u_mined, hp) + hp["aug_weight"] * ref_aug(
        q, k, u_aug, hp
    )
    g = torch.Generator().manual_seed(7)
    got = make_loss(hp)(q, k, negatives=bank, proj1=proj, generator=g)
    assert float(got) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("weighting", ["hard", "soft"])
def test_matches_loop_reference_in_batch(weighting):
    n = 7
    hp = full_hp(weighting=weighting, sample="expected")
    z1, z2 = embeddings(n, seed=4)
    p1, p2 = embeddings(n, seed=5)
    mined = ref_mined(z1, z2, None, None, p1, None, hp) + ref_mined(
        z2, z1, None, None, p2, None, hp
    )
    aug = ref_aug(z1, z2, None, hp) + ref_aug(z2, z1, None, hp)
    expected = mined / 2 + hp["aug_weight"] * aug / 2
    got = make_loss(hp)(z1, z2, proj1=p1, proj2=p2)
    assert float(got) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("weighting", ["hard", "soft"])
def test_drawn_in_batch_loss_matches_the_loop_reference_on_its_selection(weighting):
    # in-batch the draws are per (anchor, key) counts (module doc); the diagnostics lay them out
    # on the grid of the equations, and the loop reference on that selection is the loss
    n, kk = 7, 3
    hp = full_hp(weighting=weighting, aug_weight=0.0)
    z1, z2 = embeddings(n, seed=4)
    p1, p2 = embeddings(n, seed=5)
    out = make_loss(hp)(
        z1,
        z2,
        proj1=p1,
        proj2=p2,
        generator=torch.Generator().manual_seed(11),
        return_diagnostics=True,
    )
    kept = out.diagnostics.sampling_weights > 0  # [2N, N(K+1)], both directions
    u = torch.where(kept, 0.0, 1.0)  # a draw that keeps exactly the reported cells
    expected = (
        ref_mined(z1, z2, None, None, p1, u[:n], hp) + ref_mined(z2, z1, None, None, p2, u[n:], hp)
    ) / 2
    assert float(out.loss) == pytest.approx(expected, abs=1e-5)
    assert kept.shape == (2 * n, n * (kk + 1)) and 0 < int(kept.sum()) < kept.numel()


@pytest.mark.parametrize("select_on, aug_pairing", [("cosine", "matched"), ("raw", "broadcast")])
def test_drawn_in_batch_aug_loss_matches_the_loop_reference_on_its_selection(
    monkeypatch, select_on, aug_pairing
):
    # in-batch one L_aug selection over the rows [z1; z2] serves both directions (module doc):
    # L_aug(z2, z1) has the same rows in another order. With that selection recorded, the loop
    # reference of both directions is the aug part of the loss
    n = 7
    hp = full_hp(aug_weight=1.0, a=2.0, clamp=0.9, select_on=select_on, aug_pairing=aug_pairing)
    z1, z2 = embeddings(n, seed=4)
    kept = record_returns(monkeypatch, potential, "_bernoulli")
    out = make_loss(hp)(
        z1, z2, generator=torch.Generator().manual_seed(13), return_diagnostics=True
    )
    assert len(kept) == 1 and 0 < int(kept[0].sum()) < kept[0].numel()
    u = torch.where(kept[0] > 0, 0.0, 1.0)  # a draw that keeps exactly the recorded cells
    swap = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])  # rows of [z2; z1]
    aug = (ref_aug(z1, z2, u, hp) + ref_aug(z2, z1, u[swap][:, swap], hp)) / 2
    assert out.diagnostics.extras["aug_loss"] == pytest.approx(aug, abs=1e-5)
    assert float(out.loss) == pytest.approx(out.diagnostics.extras["mined_loss"] + aug, abs=1e-5)


def test_the_authors_variant_raw_kernel_and_broadcast_pairing_matches_its_equations():
    n, kk, q_rows = 5, 2, 12
    hp = full_hp(num_neighbors=kk, select_on="raw", aug_pairing="broadcast")
    q, k = embeddings(n, seed=6, scale=0.4)  # raw dot products of order 1: the kernel bites
    bank = torch.randn(q_rows, 8, generator=torch.Generator().manual_seed(8))
    u_mined, u_aug = draws(3, (n, n * (kk + 1)), (2 * n, 2 * n))
    expected = ref_mined(q, k, bank, None, None, u_mined, hp) + hp["aug_weight"] * ref_aug(
        q, k, u_aug, hp
    )
    got = make_loss(hp)(q, k, negatives=bank, generator=torch.Generator().manual_seed(3))
    assert float(got) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("separate_support", [False, True])
def test_pool_as_negatives_matches_loop_reference(separate_support):
    n, kk, q_rows = 5, 2, 9
    hp = full_hp(num_neighbors=kk)
    q, k = embeddings(n, seed=9)
    pool = torch.randn(q_rows, 8, generator=torch.Generator().manual_seed(10))
    support = (
        torch.randn(7, 8, generator=torch.Generator().manual_seed(12)) if separate_support else pool
    )
    u_mined, u_aug = draws(5, (n, n * (kk + 1) + q_rows), (2 * n, 2 * n))
    expected = ref_mined(q, k, support, pool, None, u_mined, hp) + hp["aug_weight"] * ref_aug(
        q, k, u_aug, hp
    )
    loss = make_loss(hp, pool_as_negatives=True)
    kwargs = {"support": support} if separate_support else {}
    got = loss(q, k, negatives=pool, generator=torch.Generator().manual_seed(5), **kwargs)
    assert float(got) == pytest.approx(expected, abs=1e-5)


def test_two_moco_calls_average_to_the_symmetric_objective():
    n, q_rows = 6, 30
    hp = full_hp(sample="expected")
    q1, k1 = embeddings(n, seed=13)
    q2, k2 = embeddings(n, seed=14)
    queue = torch.randn(q_rows, 8, generator=torch.Generator().manual_seed(15))
    loss = make_loss(hp)
    got = (loss(q1, k2, negatives=queue) + loss(q2, k1, negatives=queue)) / 2
    expected = (
        ref_mined(q1, k2, queue, None, None, None, hp)
        + ref_mined(q2, k1, queue, None, None, None, hp)
    ) / 2 + hp["aug_weight"] * (ref_aug(q1, k2, None, hp) + ref_aug(q2, k1, None, hp)) / 2
    assert float(got) == pytest.approx(expected, abs=1e-5)


def test_explicit_support_is_the_neighbour_bank():
    q, k = embeddings(6, seed=16)
    bank = torch.randn(25, 8)
    loss = make_loss(full_hp(sample="expected"))
    assert torch.allclose(loss(q, k, negatives=bank), loss(q, k, support=bank))


# -- (b) oracles ----------------------------------------------------------------------------------


def test_a_zero_with_clamp_one_keeps_every_negative():
    n, kk = 6, 3
    q, k = embeddings(n, seed=17)
    bank = torch.randn(20, 8)
    keep_all = dict(HP, num_neighbors=kk, a=0.0, clamp=1.0)
    drawn = PotentialLoss(**keep_all, sample="bernoulli")
    out = drawn(q, k, negatives=bank, return_diagnostics=True, generator=torch.Generator())
    assert torch.equal(out.diagnostics.kept_negatives, torch.full((n,), (n - 1) * (kk + 1)))
    expected = PotentialLoss(**keep_all, sample="expected")(q, k, negatives=bank)
    assert torch.allclose(out.loss, expected, atol=1e-6)


def infonce_q_k(q, k, t, extra=None):
    """-log e^{s(q_i,k_i)/t} / sum_j e^{s(q_i,k_j)/t} (+ extra negatives), by hand."""
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    cands = kn if extra is None else torch.cat([kn, F.normalize(extra, dim=1)])
    logits = qn @ cands.T / t
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def test_no_neighbours_and_no_aug_loss_is_infonce_over_q_and_k():
    n = 8
    q, k = embeddings(n, seed=18)
    queue = torch.randn(32, 8)
    oracle = PotentialLoss(temperature=0.2, num_neighbors=0, aug_weight=0.0, a=0.0, clamp=1.0)
    infonce = hardneg.create_loss("infonce", temperature=0.2)
    own = torch.arange(n)
    # one direction: negatives are the other keys of the batch
    expected = infonce(q, k, negatives=k, exclude_index=own)
    assert torch.allclose(oracle(q, k, negatives=queue), expected, atol=1e-6)
    # ... and the pool too with pool_as_negatives
    with_pool = PotentialLoss(
        temperature=0.2, num_neighbors=0, aug_weight=0.0, a=0.0, clamp=1.0, pool_as_negatives=True
    )
    expected = infonce(q, k, negatives=torch.cat([k, queue]), exclude_index=own)
    assert torch.allclose(with_pool(q, k, negatives=queue), expected, atol=1e-6)
    assert torch.allclose(expected, infonce_q_k(q, k, 0.2, queue), atol=1e-6)
    # in-batch: the mean of both directions
    expected = (infonce_q_k(q, k, 0.2) + infonce_q_k(k, q, 0.2)) / 2
    assert torch.allclose(oracle(q, k), expected, atol=1e-6)


def test_neighbours_are_capped_at_the_support_size():
    q, k = embeddings(3, seed=19)
    out = PotentialLoss(num_neighbors=5)(q, k, return_diagnostics=True)
    assert out.diagnostics.extras["num_neighbors"] == 2.0
    out = PotentialLoss(num_neighbors=5)(q, k, negatives=torch.randn(4, 8), return_diagnostics=True)
    assert out.diagnostics.extras["num_neighbors"] == 4.0


# -- (c) finite values and gradients --------------------------------------------------------------


def assert_finite_with_grads(loss_fn, z1, z2, **kwargs):
    z1 = z1.clone().requires_grad_(True)
    z2 = z2.clone().requires_grad_(True)
    loss = loss_fn(z1, z2, **kwargs)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    return loss


@pytest.mark.parametrize("weighting", ["hard", "soft"])
@pytest.mark.parametrize("sample", ["bernoulli", "expected"])
@pytest.mark.parametrize("with_bank", [False, True])
def test_finite_at_low_temperature(weighting, sample, with_bank):
    z1, z2 = embeddings(16, d=32, seed=20, scale=30.0)
    loss_fn = PotentialLoss(temperature=0.05, weighting=weighting, sample=sample, select_on="raw")
    kwargs = {"negatives": torch.randn(64, 32) * 30} if with_bank else {}
    assert_finite_with_grads(loss_fn, z1, z2, generator=torch.Generator(), **kwargs)


@pytest.mark.parametrize("with_bank", [False, True])
def test_finite_under_bf16_autocast(with_bank):
    z1, z2 = embeddings(16, d=32, seed=21)
    loss_fn = PotentialLoss(temperature=0.05, weighting="soft", pool_as_negatives=True)
    kwargs = {"negatives": torch.randn(64, 32)} if with_bank else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = assert_finite_with_grads(loss_fn, z1.bfloat16(), z2.bfloat16(), **kwargs)
    assert loss.dtype == torch.float32


def test_finite_with_duplicated_rows():
    z = torch.randn(4, 8).repeat(3, 1)  # every sample three times
    bank = torch.randn(2, 8).repeat(5, 1)
    for kwargs in ({}, {"negatives": bank}):
        assert_finite_with_grads(PotentialLoss(), z, z.clone(), **kwargs)


@pytest.mark.parametrize("seed", range(5))
def test_finite_with_two_samples(seed):
    z1, z2 = embeddings(2, seed=seed)  # in-batch: one neighbour at most, often nothing kept
    loss_fn = PotentialLoss(a=50.0)
    out = loss_fn(z1, z2, return_diagnostics=True, generator=torch.Generator().manual_seed(seed))
    assert torch.isfinite(out.loss) and torch.isfinite(out.diagnostics.sampling_weights).all()
    assert_finite_with_grads(loss_fn, z1, z2, generator=torch.Generator().manual_seed(seed))


# -- (d) permutation invariance -------------------------------------------------------------------


def test_expected_loss_is_invariant_to_the_order_of_batch_and_bank():
    n = 10
    z1, z2 = embeddings(n, seed=22)
    bank = torch.randn(30, 8)
    perm, bank_perm = torch.randperm(n), torch.randperm(30)
    for weighting in ("hard", "soft"):
        loss_fn = PotentialLoss(num_neighbors=3, sample="expected", weighting=weighting)
        assert torch.allclose(loss_fn(z1, z2), loss_fn(z1[perm], z2[perm]), atol=1e-6)
        assert torch.allclose(
            loss_fn(z1, z2, negatives=bank),
            loss_fn(z1[perm], z2[perm], negatives=bank[bank_perm]),
            atol=1e-6,
        )


# -- (e) bad inputs -------------------------------------------------------------------------------


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
        (lambda f, z: f(z, z[:, :4]), "z1 and z2"),
        (lambda f, z: f(z[0], z[0]), "z1"),
        (lambda f, z: f(z[:1], z[:1]), "N = 2"),
        (lambda f, z: f(z.masked_fill(z > 1, float("nan")), z), "NaN"),
        (lambda f, z: f(z, z, negatives=torch.randn(5, 3)), "negatives"),
        (lambda f, z: f(z, z, support=torch.randn(5)), "support"),
        (lambda f, z: f(z, z, proj1=z[:3]), "proj1"),
        (lambda f, z: f(z, z, negatives=z, proj2=z), "proj2"),
        (lambda f, z: f(z, z, generator=0), "generator"),
        (lambda f, z: f(z, z, labels=torch.zeros(3), return_diagnostics=True), "labels"),
    ],
)
def test_bad_inputs_name_the_argument(call, name):
    z = torch.randn(6, 8)
    with pytest.raises(ValueError, match=name):
        call(PotentialLoss(), z)


def test_common_keyword_arguments_are_accepted_and_ignored():
    z1, z2 = embeddings(6, seed=23)
    loss_fn = PotentialLoss(sample="expected")
    base = loss_fn(z1, z2)
    other = loss_fn(
        z1, z2, progress=0.5, h1=z1, h2=z2, negative_h=z1, exclude_index=torch.arange(6)
    )
    assert torch.equal(base, other)


# -- (f) repeatable draws, diagnostics ------------------------------------------------------------


def test_same_generator_seed_gives_the_same_loss():
    z1, z2 = embeddings(12, seed=24)
    bank = torch.randn(40, 8)
    loss_fn = hardneg.create_loss("potential")

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return loss_fn(z1, z2, generator=g), loss_fn(z1, z2, negatives=bank, generator=g)

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_diagnostics_report_the_selected_negatives_and_false_negative_mass():
    n, kk = 8, 2
    q, k = embeddings(n, seed=25)
    bank = torch.randn(20, 8)
    labels, bank_labels = torch.arange(n) % 2, torch.arange(20) % 2
    loss_fn = PotentialLoss(num_neighbors=kk, sample="expected")
    out = loss_fn(
        q, k, negatives=bank, labels=labels, negative_labels=bank_labels, return_diagnostics=True
    )
    diag = out.diagnostics
    assert diag.sampling_weights.shape == (n, n * (kk + 1))
    assert torch.allclose(diag.sampling_weights.sum(1), torch.ones(n))
    assert torch.allclose(diag.gradient_weights.sum(1), torch.ones(n))
    assert (diag.kept_negatives == (n - 1) * (kk + 1)).all()  # expected mode: pi > 0 everywhere
    assert diag.false_negative_mass is not None and ((diag.false_negative_mass > 0).all())
    assert torch.allclose(out.per_anchor.mean(), out.loss)
    summary = diag.summary()
    assert {"false_negative_mass", "mined_loss", "aug_loss", "num_neighbors"} <= set(summary)
    # labels everywhere the same: every kept negative is a false negative
    same = loss_fn(
        q,
        k,
        negatives=bank,
        labels=torch.zeros(n, dtype=torch.long),
        negative_labels=torch.zeros(20, dtype=torch.long),
        return_diagnostics=True,
    )
    assert torch.allclose(same.diagnostics.false_negative_mass, torch.ones(n))
    # in-batch: both directions, 2N anchors
    out = loss_fn(q, k, labels=labels, return_diagnostics=True)
    assert out.per_anchor.shape == (2 * n,) and out.diagnostics.sampling_weights.shape[0] == 2 * n
    # bank labels missing: no false-negative figures rather than wrong ones
    out = loss_fn(q, k, negatives=bank, labels=labels, return_diagnostics=True)
    assert out.diagnostics.false_negative_mass is None


def test_registry_defaults():
    assert hardneg.loss_hparams("potential") == {
        "temperature": 0.5,
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
        "check_inputs": True,
    }


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
    loss equal the float64 loop re-statement of the equations to 1e-5 (the same oracle as
    test_gradient_oracles.py; a wrong device branch cannot hide behind a loose tolerance)."""
    from test_gradient_oracles import as64, potential_reference

    z1, z2 = embeddings(16, d=32, seed=26)
    bank = torch.randn(128, 32, generator=torch.Generator().manual_seed(27)) if with_bank else None
    loss_fn = PotentialLoss(temperature=0.5, num_neighbors=5, aug_weight=0.5, sample="expected")
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
    z1, z2 = (t.to(device) for t in embeddings(64, d=128, seed=26))
    bank = torch.randn(4096, 128, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = assert_finite_with_grads(PotentialLoss(), z1, z2, negatives=bank, generator=g)
    assert loss.dtype == torch.float32


def test_cpu_scratch_buffers_are_capped_and_do_not_change_the_loss(monkeypatch):
    from hardneg.losses import potential as module

    z1, z2 = torch.randn(24, 8), torch.randn(24, 8)
    kept = hardneg.create_loss("potential")
    value = kept(z1, z2, generator=torch.Generator().manual_seed(3))
    assert kept._scratch._buffers  # the temporaries stay for the next call
    monkeypatch.setattr(module._Scratch, "max_bytes", 0)
    fresh = hardneg.create_loss("potential")
    again = fresh(z1, z2, generator=torch.Generator().manual_seed(3))
    assert not fresh._scratch._buffers  # over the cap: nothing is kept
    torch.testing.assert_close(again, value, rtol=0, atol=0)
