"""Every fast path (``hardneg.fastpaths``) equals its plain twin.

Two levels:

* each registered loss (``hardneg.list_losses()``, so losses registered later are covered) with
  ``fast=True`` against the same loss with ``fast=False``: value and gradients within 1e-5
  (relative), in float32 and float64, in-batch, with a pool, with a pool and ``exclude_index``,
  with duplicate ``ids`` and with retrieval hard negatives; Ring across band sizes (``L = 0``,
  ``U = M``, tiny pools below the numpy threshold, rows of >= 1024 columns above it) and ties;
* the low-level functions against a plain expression written here: ``tilted_log_mass`` against
  ``logsumexp(c + log w)`` with HCL's normalised weights, ``top_k_indices`` / ``drop_top``
  against ``torch.topk``, ``band_logits``' sparse backward against back-propagating through the
  gather.
"""

from __future__ import annotations

import math

import pytest
import torch

import hardneg
from hardneg import fastpaths

LOSSES = hardneg.list_losses()
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]

# hyper-parameter variants per loss that reach each branch of its fast path; a loss registered
# later gets its defaults (and a seeded generator, so that draws repeat)
VARIANTS: dict[str, list[dict]] = {
    "infonce": [{}],
    "debiased": [{}],
    "hcl": [
        {},
        {"beta": 0.5},
        {"beta": 2.0},
        {"beta": 3.7, "tau_plus": 0.0},
        {"beta": 1.0, "detach_weights": True},
    ],
    "ring": [
        {},
        {"rho_out": 0.5, "rho_in": 0.0},  # L = 0
        {"rho_out": 1.0, "rho_in": 0.3},  # U = M, L > 0
        {"rho_out": 0.3, "rho_in": 0.5},
    ],
    "unremix": [
        {},
        {"beta": 0.0},
        {"beta": 2.0, "lambda_d": 0.0},
        {"beta": 0.7, "influence": "gradient_norm", "representativeness": "density"},
        {"beta": 1.0, "detach_weights": True},
        {"lambda_u": 0.0, "representativeness": "density"},  # the mix without U
        {"lambda_d": 0.0, "influence": "gradient_norm", "eps": 0.01},  # U [1, C] alone
        {"lambda_u": 3.0, "lambda_d": 0.5, "beta": 1.0},
    ],
    # random draws: equal in expected mode; the Bernoulli law is tested below
    "potential": [
        {"sample": "expected"},
        {"sample": "expected", "pool_as_negatives": True, "weighting": "soft"},
        {"sample": "expected", "select_on": "raw", "aug_pairing": "broadcast", "a": 0.0},
        {"sample": "expected", "num_neighbors": 0, "aug_weight": 0.0, "clamp": 1.0},
    ],
    "mochi": [
        {},  # N >= every anchor's M: the hardest set is every negative
        {"num_hardest": 5, "num_mixed": 16, "num_query_mixed": 4},
        {"num_hardest": 3, "num_mixed": 0, "num_query_mixed": 6},
        {"num_hardest": 4, "num_mixed": 7, "num_query_mixed": 0, "normalize": False},
    ],
}

# call forms a loss rejects by design
# (loss, form) pairs a loss rejects by design, with a clear error (tested in test_potential.py):
# potential needs two views or a shared bank, not retrieval columns
UNSUPPORTED: set[tuple[str, str]] = {("potential", "retrieval")}

FORMS = ["in_batch", "pool", "pool_exclude", "ids", "retrieval"]


def cases():
    for name in LOSSES:
        for i, hp in enumerate(VARIANTS.get(name, [{}])):
            yield pytest.param(name, hp, id=f"{name}-{i}")


def make_inputs(form: str, dtype: torch.dtype, *, n=12, d=6, k=40, h=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    z2 = (z1 + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)).detach()
    kwargs: dict = {}
    if form in ("pool", "pool_exclude"):
        kwargs["negatives"] = torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype)
        if form == "pool_exclude":
            kwargs["exclude_index"] = torch.randperm(k, generator=g)[:n]
    elif form == "ids":
        kwargs["ids"] = torch.tensor([0, 1, 2, 0, 3, 4, 5, 1, 6, 7, 8, 9][:n])
    elif form == "retrieval":
        kwargs["hard_negatives"] = torch.randn(n, h, d, generator=g, dtype=torch.float64).to(dtype)
    return z1.requires_grad_(), z2.requires_grad_(), kwargs


def loss_and_grads(loss_fn, z1, z2, kwargs, seed=7):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(kwargs)
    if loss_fn.draws:
        kw["generator"] = gen
    loss = loss_fn(z1, z2, **kw)
    return loss, torch.autograd.grad(loss, (z1, z2))


def assert_close_rel(actual, expected, rtol=1e-5, what=""):
    """``|a - e| <= rtol * max(|e|)`` (element-wise, against the tensor's largest entry)."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.dtype == expected.dtype, what
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-12), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def compare_fast_plain(name, hp, z1, z2, kwargs, *, grads=True):
    fast = hardneg.create_loss(name, check_inputs=False, fast=True, **hp)
    plain = hardneg.create_loss(name, check_inputs=False, fast=False, **hp)
    lf, gf = loss_and_grads(fast, z1, z2, kwargs)
    lp, gp = loss_and_grads(plain, z1, z2, kwargs)
    assert lf.dtype == lp.dtype == z1.dtype
    assert torch.isfinite(lp)
    assert_close_rel(lf, lp, what=f"{name} {hp} loss")
    if grads:
        for i, (a, b) in enumerate(zip(gf, gp)):
            assert_close_rel(a, b, what=f"{name} {hp} grad z{i + 1}")
    return gf, gp


def assert_binomial_law(draws, trials, p):
    """``draws [R, ...]`` follow Binomial(trials, p) cell by cell: mean within 5 standard errors,
    variance within 12 %, and cell ``[0, 3]`` (Binomial(5, 0.9) in both callers) takes every value
    in proportion to its probability."""
    mean, var = trials * p, trials * p * (1 - p)
    se = (var / len(draws)).sqrt().clamp(min=1e-9)
    assert bool(((draws.mean(0) - mean).abs() <= 5 * se).all()), (draws.mean(0), mean)
    loose = var > 0
    assert bool(((draws.var(0)[loose] / var[loose]) - 1).abs().max() < 0.12)
    assert float(trials[0, 3]) == 5 and abs(float(p[0, 3]) - 0.9) < 1e-6
    col = draws[:, 0, 3]
    for x in range(6):
        q = math.comb(5, x) * 0.9**x * 0.1 ** (5 - x)
        freq = float((col == x).double().mean())
        assert abs(freq - q) <= 5 * math.sqrt(q * (1 - q) / len(col)) + 1e-3, (x, freq, q)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "hp"), cases())
def test_fast_equals_plain(name, hp, dtype, form):
    if (name, form) in UNSUPPORTED:
        pytest.skip(f"{name} does not support the {form} call form")
    z1, z2, kwargs = make_inputs(form, dtype)
    compare_fast_plain(name, hp, z1, z2, kwargs)


# Ring: band sizes against the numpy / torch selection thresholds of the fast path
RING_BANDS = [
    pytest.param(0.5, 0.0, id="L0"),
    pytest.param(1.0, 0.2, id="U=M"),
    pytest.param(0.1, 0.1, id="default"),
    pytest.param(0.02, 0.5, id="narrow"),
    pytest.param(0.9, 0.9, id="deep"),
]


@pytest.mark.parametrize(("rho_out", "rho_in"), RING_BANDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("form", "n", "k"),
    [
        pytest.param("pool", 6, 20, id="tiny-pool"),  # A * S < numpy's minimum: scatter
        pytest.param("pool_exclude", 8, 300, id="pool-300"),  # torch top-k, numpy partition
        pytest.param("pool", 8, 1100, id="pool-1100"),  # rows >= 1024 columns: numpy select
        pytest.param("pool_exclude", 6, 1500, id="pool-1500-exclude"),
        pytest.param("in_batch", 300, 0, id="in-batch-600"),  # several row blocks
        pytest.param("in_batch", 520, 0, id="in-batch-1040"),  # numpy select, in-batch
    ],
)
def test_ring_fast_equals_plain_across_bands_and_sizes(rho_out, rho_in, dtype, form, n, k):
    z1, z2, kwargs = make_inputs(form, dtype, n=n, d=8, k=k, seed=3)
    lower, upper = hardneg.strategies.ring_band(
        (2 * n - 2) if form == "in_batch" else (k - (form == "pool_exclude")), rho_out, rho_in
    )
    assert upper > lower >= 0
    compare_fast_plain("ring", {"rho_out": rho_out, "rho_in": rho_in}, z1, z2, kwargs)


def tied(x: torch.Tensor, levels: int = 2) -> torch.Tensor:
    """Coarsely rounded embeddings: many exactly equal similarities."""
    return (x * levels).round() / levels


@pytest.mark.parametrize("k", [40, 1200])
@pytest.mark.parametrize("rho", [(0.5, 0.2), (0.25, 0.5), (1.0, 0.1)])
def test_ring_ties_in_a_pool_of_duplicates(k, rho):
    """Duplicated pool rows tie exactly; which copy is taken leaves value and gradients alike
    (the pool is detached, and equal rows give the anchors the same gradient)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(k // 4, 8, generator=g)
    pool = base.repeat(4, 1)[torch.randperm(k, generator=g)]
    z1 = torch.randn(10, 8, generator=g).requires_grad_()
    z2 = torch.randn(10, 8, generator=g).requires_grad_()
    kwargs = {"negatives": pool}
    compare_fast_plain("ring", {"rho_out": rho[0], "rho_in": rho[1]}, z1, z2, kwargs)
    kwargs["exclude_index"] = torch.arange(10)
    compare_fast_plain("ring", {"rho_out": rho[0], "rho_in": rho[1]}, z1, z2, kwargs)


@pytest.mark.parametrize("n", [8, 520])
def test_ring_ties_in_batch_of_duplicates(n):
    """In-batch duplicates: a tie may send a column's gradient to another copy of the same
    sample; the value and each duplicate group's summed gradient are the same."""
    g = torch.Generator().manual_seed(6)
    groups = n // 2
    base1, base2 = torch.randn(groups, 8, generator=g), torch.randn(groups, 8, generator=g)
    z1 = base1.repeat(2, 1).requires_grad_()
    z2 = base2.repeat(2, 1).requires_grad_()
    gf, gp = compare_fast_plain("ring", {"rho_out": 0.5, "rho_in": 0.3}, z1, z2, {}, grads=False)
    for a, b in zip(gf, gp):
        assert_close_rel(a.view(2, groups, -1).sum(0), b.view(2, groups, -1).sum(0))


@pytest.mark.parametrize("k", [40, 1200])
def test_ring_value_with_many_ties_between_different_columns(k):
    """Rounded embeddings: distinct columns with equal logits; the loss depends on the band's
    values only, so fast and plain agree on the value."""
    g = torch.Generator().manual_seed(8)
    z1 = tied(torch.randn(10, 4, generator=g)).requires_grad_()
    z2 = tied(torch.randn(10, 4, generator=g)).requires_grad_()
    pool = tied(torch.randn(k, 4, generator=g))
    for rho in [(0.5, 0.2), (0.1, 0.1)]:
        hp = {"rho_out": rho[0], "rho_in": rho[1]}
        compare_fast_plain("ring", hp, z1, z2, {"negatives": pool}, grads=False)


@pytest.mark.parametrize("name", [x for x in ("hcl", "unremix") if x in LOSSES])
@pytest.mark.parametrize("n", [8, 200])
def test_tilted_losses_at_extreme_temperature(name, n):
    """t = 0.05, beta = 10: the fused pass's shift keeps it equal to the plain log-space form in
    float64. In float32 the gradient is ill-conditioned there (``(1 + beta) p - beta q`` cancels
    about 10x), so both forms are compared to the float64 value instead: the fast path must be
    no less accurate than the plain one (measured: 3e-5 vs 1.4e-4 relative at N = 200)."""
    hp = {"temperature": 0.05, "beta": 10.0}
    z1, z2, kwargs = make_inputs("in_batch", torch.float64, n=n, d=16, seed=9)
    compare_fast_plain(name, hp, z1, z2, kwargs)
    ref_loss, ref_grads = loss_and_grads(
        hardneg.create_loss(name, check_inputs=False, fast=False, **hp), z1, z2, kwargs
    )
    a, b = (z.detach().float().requires_grad_() for z in (z1, z2))
    errors = {}
    for fast in (True, False):
        loss_fn = hardneg.create_loss(name, check_inputs=False, fast=fast, **hp)
        loss, grads = loss_and_grads(loss_fn, a, b, kwargs)
        errors[fast] = max(
            float((g.double() - r).abs().max() / r.abs().max()) for g, r in zip(grads, ref_grads)
        )
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert errors[True] <= max(1e-5, 2 * errors[False]), errors


# ---------------------------------------------------------------------------------------------
# low level: tilted_log_mass


def plain_tilted_log_mass(logits, beta, m, factor=None, tilt_grad=True):
    """``logsumexp_j(c_ij + log w_ij)``, ``w_ij = M e^{beta c_ij} f_ij / sum_k e^{beta c_ik} f_ik``."""
    tilt = logits if tilt_grad else logits.detach()
    log_w = tilt * beta if beta != 0 else torch.zeros_like(tilt)
    if factor is not None:
        log_w = log_w + factor.log()
    log_w = log_w.masked_fill(~torch.isfinite(logits), float("-inf"))
    log_m = m.to(logits.dtype).log().unsqueeze(1) if isinstance(m, torch.Tensor) else math.log(m)
    log_w = log_w - torch.logsumexp(log_w, dim=1, keepdim=True) + log_m
    return torch.logsumexp(logits + log_w, dim=1)


def tilted_inputs(rows, cols, dtype, seed, *, masked=True):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
    mask = (
        torch.rand(rows, cols, generator=g) > 0.2
        if masked
        else torch.ones(rows, cols, dtype=torch.bool)
    )
    mask[:, 0] = True
    logits = logits.masked_fill(~mask, float("-inf"))
    factor = (torch.rand(rows, cols, generator=g, dtype=torch.float64) + 0.05).to(dtype)
    factor = factor.masked_fill(~mask, 0.0)
    return logits, mask, factor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, 0.3, 5.0])
@pytest.mark.parametrize("with_factor", [False, True], ids=["nofactor", "factor"])
@pytest.mark.parametrize("tilt_grad", [True, False], ids=["tilt-grad", "tilt-detached"])
@pytest.mark.parametrize("shape", [(7, 13), (300, 400)], ids=["small", "blocks"])
@pytest.mark.parametrize("shifted", [False, True], ids=["own-shift", "given-shift"])
def test_tilted_log_mass_equals_plain(dtype, beta, with_factor, tilt_grad, shape, shifted):
    logits, mask, factor = tilted_inputs(*shape, dtype, seed=int(beta * 10) + shape[0])
    f = factor if with_factor else None
    m = mask.sum(dim=1) if with_factor else int(shape[1])  # a tensor M and an int M
    leaf_fast = logits.clone().requires_grad_()
    leaf_plain = logits.clone().requires_grad_()
    given = None
    if shifted:
        with torch.no_grad():
            row_max = logits.amax(dim=1)
            given = (row_max, (logits - row_max.unsqueeze(1)).exp())
    fast = fastpaths.tilted_log_mass(
        leaf_fast, beta, m, factor=f, tilt_grad=tilt_grad, shifted=given
    )
    plain = plain_tilted_log_mass(leaf_plain, beta, m, factor=f, tilt_grad=tilt_grad)
    assert fast.dtype == dtype
    assert_close_rel(fast, plain, what="log mass")
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(1), dtype=dtype)
    (g_fast,) = torch.autograd.grad(fast, leaf_fast, upstream)
    (g_plain,) = torch.autograd.grad(plain, leaf_plain, upstream)
    g_plain = torch.nan_to_num(g_plain, nan=0.0)  # -inf entries: no gradient either way
    assert bool((g_fast[~torch.isfinite(logits)] == 0).all())
    assert_close_rel(g_fast, g_plain, what="gradient")


def test_tilted_log_mass_extreme_logits_stay_finite():
    logits = torch.tensor([[200.0, -200.0, 150.0, float("-inf")], [-300.0, -301.0, -299.0, -302.0]])
    leaf = logits.clone().requires_grad_()
    out = fastpaths.tilted_log_mass(leaf, 10.0, 3)
    expected = plain_tilted_log_mass(logits, 10.0, 3)
    assert bool(torch.isfinite(out).all())
    assert_close_rel(out, expected)
    (g,) = torch.autograd.grad(out.sum(), leaf)
    assert bool(torch.isfinite(g).all())


# ---------------------------------------------------------------------------------------------
# low level: top_k_indices and drop_top


def topk_inputs(rows, cols, dtype, seed, kind):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    if kind == "inf":
        x = x.masked_fill(torch.rand(rows, cols, generator=g) < 0.3, float("-inf"))
    elif kind == "ties":
        x = (x * 2).round() / 2  # few distinct values
    elif kind == "ulp" and dtype == torch.float32:
        # neighbouring floats (negative and positive): order keys must keep every last bit
        start = torch.tensor([-1.5, 0.75]).view(torch.int32)
        offsets = torch.stack([torch.randperm(cols, generator=g) for _ in range(rows)]).int()
        sign = torch.rand(rows, 1, generator=g) < 0.5
        x = (torch.where(sign, start[0], start[1]) + offsets).view(torch.float32)
    elif kind == "signed_zero":
        x = torch.where(torch.rand(rows, cols, generator=g) < 0.5, x, torch.zeros_like(x))
        x = torch.where(torch.rand(rows, cols, generator=g) < 0.5, x, -torch.zeros_like(x))
    return x


SELECT_SHAPES = [
    pytest.param(5, 9, id="5x9"),  # tiny: one block, torch top-k
    pytest.param(600, 500, id="600x500"),  # several row blocks, torch top-k
    pytest.param(9, 1024, id="9x1024"),  # numpy threshold exactly
    pytest.param(40, 3000, id="40x3000"),  # numpy, several blocks
]


@pytest.mark.parametrize(("rows", "cols"), SELECT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "ulp", "inf", "ties", "signed_zero"])
def test_top_k_indices_has_the_members_of_torch_topk(rows, cols, dtype, kind):
    x = topk_inputs(rows, cols, dtype, seed=rows + cols, kind=kind)
    for k in sorted({1, 2, cols // 10 or 1, cols // 2, cols - 1, cols}):
        got = fastpaths.top_k_indices(x, k)
        want = x.topk(k, dim=1).indices
        assert got.shape == (rows, k) and got.dtype == torch.long
        # distinct columns per row
        assert bool((got.sort(dim=1).values.diff(dim=1) > 0).all()) if k > 1 else True
        if kind in ("plain", "ulp"):  # no ties: exactly the same members
            assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values), k
        else:  # ties: the same values (which equal entry is taken may differ)
            a = x.gather(1, got).sort(dim=1).values
            b = x.gather(1, want).sort(dim=1).values
            assert torch.equal(a, b), k


@pytest.mark.parametrize(("rows", "cols"), [*SELECT_SHAPES, pytest.param(100, 300, id="100x300")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "ulp", "inf", "ties"])
def test_drop_top_sets_the_topk_members_to_minus_inf(rows, cols, dtype, kind):
    x = topk_inputs(rows, cols, dtype, seed=3 * rows + cols, kind=kind)
    for k in sorted({1, cols // 10 or 1, cols // 2, cols - 1}):
        got = x.clone()
        fastpaths.drop_top(got, k)
        want = x.clone().scatter_(1, x.topk(k, dim=1).indices, float("-inf"))
        if kind == "ties":  # the same multiset of surviving values per row
            assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values), k
        else:
            dropped = torch.isneginf(got) & ~torch.isneginf(x)
            assert bool((dropped.sum(dim=1) <= k).all())
            assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values), k
            if kind in ("plain", "ulp"):
                assert torch.equal(got, want), k


# ---------------------------------------------------------------------------------------------
# low level: band_logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True], ids=["pool", "in-batch"])
@pytest.mark.parametrize("lower", [0, 3])
def test_band_logits_backward_equals_the_gather(dtype, shared, lower):
    g = torch.Generator().manual_seed(11 + lower)
    a0 = torch.randn(20, 6, generator=g, dtype=torch.float64).to(dtype)
    x0 = a0 if shared else torch.randn(50, 6, generator=g, dtype=torch.float64).to(dtype)
    t, upper = 0.3, 12

    def run(fast):
        a = a0.clone().requires_grad_()
        x = a if shared else x0.clone().requires_grad_()
        logits = (a / t) @ x.T
        with torch.no_grad():
            indices = logits.topk(upper, dim=1).indices
            band = logits.gather(1, indices)
            if lower:
                band.scatter_(1, band.topk(lower, dim=1).indices, float("-inf"))
        if fast:
            out = fastpaths.band_logits(a, x, band, indices, t)
        else:
            out = logits.gather(1, indices).masked_fill(~torch.isfinite(band), float("-inf"))
        value = torch.logsumexp(out, dim=1) @ torch.linspace(0.5, 1.5, a.shape[0], dtype=dtype)
        leaves = (a,) if shared else (a, x)
        return value, torch.autograd.grad(value, leaves)

    vf, gf = run(True)
    vp, gp = run(False)
    assert_close_rel(vf, vp)
    for a, b in zip(gf, gp):
        assert a.dtype == dtype
        assert_close_rel(a, b, what="band gradient")


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_unremix_in_batch_computes_the_softmax_expectation_once(monkeypatch, fast):
    """In-batch the columns are the anchors: one pass of ``sum_k p_ik z_k`` (an [A, C] exp and
    a product) serves both the anchors' and the columns' deltas; on the fast path the row
    exponentials are computed once for that and for the objective's tilted mass."""
    from hardneg.strategies import unremix

    module = fastpaths if fast else unremix
    calls, exps = [], []
    original = module.softmax_expectation
    monkeypatch.setattr(module, "softmax_expectation", lambda *a: calls.append(1) or original(*a))
    row_exp = fastpaths.row_exponentials
    monkeypatch.setattr(fastpaths, "row_exponentials", lambda x: exps.append(1) or row_exp(x))
    for form in ("in_batch", "pool"):  # the pool's deltas have their own form (column_gradients)
        calls.clear(), exps.clear()
        z1, z2, kwargs = make_inputs(form, torch.float32)
        hardneg.create_loss("unremix", fast=fast)(z1, z2, **kwargs)
        assert len(calls) == 1, form
        assert len(exps) == int(fast), form


# potential: per-column counts (fastpaths.kept_counts) against the per-cell grid


def potential_terms(hp, z1, z2, kwargs, fast):
    from hardneg.losses.contrastive import ContrastInputs
    from hardneg.strategies.base import StepContext

    loss_fn = hardneg.create_loss("potential", **hp)
    inputs = ContrastInputs(z1=z1, z2=z2, temperature=loss_fn.temperature, **kwargs)
    return loss_fn.strategy.terms(inputs, StepContext(fast=fast))


@pytest.mark.parametrize("form", ["in_batch", "pool", "pool_exclude", "ids"])
@pytest.mark.parametrize("pool_as_negatives", [False, True])
@pytest.mark.parametrize("k", [0, 3, 7])
def test_potential_multiplicity_counts_the_grid_cells(form, pool_as_negatives, k):
    """Each column's cells that can be kept (finite ``log pi``) per anchor: the fast path's
    multiplicity equals the plain grid's count, so both draw ``Binomial(m, pi)`` per column."""
    z1, z2, kwargs = make_inputs(form, torch.float64, n=12)
    hp = {"num_neighbors": k, "pool_as_negatives": pool_as_negatives}
    fast = potential_terms(hp, z1, z2, kwargs, True)
    plain = potential_terms(hp, z1, z2, kwargs, False)
    assert [role for _, _, role in fast] == [role for _, _, role in plain]
    for (_, f, role), (_, p, _) in zip(fast, plain):
        if role != "mined":
            assert f.multiplicity is None and p.multiplicity is None
            continue
        assert f.cells is None and f.multiplicity is not None and p.cells is not None
        finite = torch.isfinite(p.cell_log_keep).double()
        grid = torch.zeros_like(p.negative_logits, dtype=torch.float64).scatter_add_(
            1, p.cells.expand(finite.shape[0], -1), finite
        )
        if f.cell_log_keep is None:  # fused fast paths: 0 off the negatives already
            fast_count = f.multiplicity.double()
        else:
            fast_count = f.multiplicity.double() * torch.isfinite(f.cell_log_keep)
        if f.column_index is not None:  # the bank path keeps only the columns with a cell
            assert f.column_index.unique().numel() == f.column_index.numel()  # distinct
            # its logits are the plain form's on those columns, -inf off the negatives
            assert torch.equal(f.negative_mask, fast_count > 0)
            full = torch.zeros_like(grid)
            full[:, f.column_index] = fast_count
            fast_count = full
            kept = p.negative_logits[:, f.column_index]
            assert_close_rel(
                f.negative_logits.masked_fill(~f.negative_mask, 0),
                kept.masked_fill(~f.negative_mask, 0),
            )
            assert bool(torch.isinf(f.negative_logits[~f.negative_mask]).all())
        assert torch.equal(fast_count, grid)
        assert int(grid.max()) >= (2 if k > 0 else 1)  # columns with several cells are met


@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_counts_draws_binomial_counts(dtype):
    """Bernoulli mode: mean ``m pi`` and variance ``m pi (1 - pi)`` per entry, ``0 <= x <= m``,
    exactly 0 where ``m = 0`` or ``pi = 0`` and ``m`` where ``pi = 1``; expected mode is ``m pi``."""
    g = torch.Generator().manual_seed(3)
    m = torch.tensor([[0, 1, 2, 5, 9, 3], [4, 0, 1, 7, 2, 3]])
    pi = torch.tensor(
        [[0.3, 0.5, 0.2, 0.9, 0.4, 0.0], [0.6, 0.7, 1.0, 0.05, 1.0, 0.5]], dtype=dtype
    )
    log_keep = pi.log()
    expected = fastpaths.kept_counts(log_keep, m, sample="expected")
    assert expected.dtype == dtype and torch.allclose(expected, m * pi)
    draws = torch.stack(
        [fastpaths.kept_counts(log_keep, m, sample="bernoulli", generator=g) for _ in range(6000)]
    )
    assert draws.dtype == dtype
    assert torch.equal(draws, draws.round()) and bool((draws >= 0).all() and (draws <= m).all())
    assert bool((draws[:, m == 0] == 0).all() and (draws[:, pi == 0] == 0).all())
    sure = pi == 1
    assert torch.equal(draws[:, sure], m[sure].to(dtype).expand(len(draws), -1))
    assert_binomial_law(draws, m, pi)
    # no multiplicity: one cell per column
    one = torch.stack(
        [
            fastpaths.kept_counts(log_keep, None, sample="bernoulli", generator=g)
            for _ in range(4000)
        ]
    )
    assert torch.equal(one, one.round()) and bool((one <= 1).all())
    se1 = (pi * (1 - pi) / len(one)).sqrt().clamp(min=1e-9)
    assert bool(((one.mean(0) - pi).abs() <= 5 * se1).all())


@pytest.mark.parametrize("form", ["in_batch", "pool_exclude"])
def test_potential_bernoulli_fast_path_has_the_plain_law(form):
    """The loss under fresh draws: fast and plain have the same mean and spread over seeds."""
    z1, z2, kwargs = make_inputs(form, torch.float64, n=10)

    def losses(fast):
        loss_fn = hardneg.create_loss("potential", fast=fast, aug_weight=0.0)
        g = torch.Generator().manual_seed(11 if fast else 12)
        return torch.stack([loss_fn(z1, z2, generator=g, **kwargs) for _ in range(1500)]).detach()

    lf, lp = losses(True), losses(False)
    se = math.sqrt(float(lf.var() + lp.var()) / len(lf))
    assert abs(float(lf.mean() - lp.mean())) <= 5 * se
    assert abs(float(lf.std() / lp.std()) - 1) < 0.15


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_log_mass_equals_logsumexp_of_the_log_weights(dtype):
    """Against ``logsumexp(c + log w)``: random counts, a row with nothing kept (``-inf``, zero
    gradient), kept logits far below an unkept maximum (no underflow to ``-inf``), ``-inf``
    logits where ``w = 0``."""
    from hardneg.objectives import safe_logsumexp

    g = torch.Generator().manual_seed(5)
    c = torch.randn(6, 9, generator=g, dtype=torch.float64).to(dtype) * 3
    w = torch.randint(0, 4, (6, 9), generator=g).to(dtype)
    w[1] = 0.0  # nothing kept
    c[2, :4], w[2, :4], w[2, 4:] = 1000.0, 0.0, 1.0  # the kept ones 1000 below the row's max
    c[3, ::2], w[3, ::2] = float("-inf"), 0.0
    c.requires_grad_(True)
    fast = fastpaths.weighted_log_mass(c, w)
    plain = safe_logsumexp(c + w.log())
    assert fast[1] == float("-inf") and bool(torch.isfinite(fast[[0, 2, 3, 4, 5]]).all())
    finite = torch.isfinite(plain)
    assert torch.equal(finite, torch.isfinite(fast))
    assert_close_rel(fast[finite], plain[finite], what="value")
    up = torch.linspace(0.5, 2.0, 6, dtype=dtype)
    (gf,) = torch.autograd.grad(torch.where(finite, fast, 0.0).mul(up).sum(), c)
    (gp,) = torch.autograd.grad(torch.where(finite, plain, 0.0).mul(up).sum(), c)
    assert bool(torch.isfinite(gf).all()) and bool((gf[1] == 0).all())
    assert_close_rel(gf, gp, what="gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", [*FORMS, "per_anchor_pool"])
def test_mochi_mixed_column_logits_equal_the_plain_product(dtype, form):
    """``mixed_column_logits`` reads the logits of the negative columns from the contrast set
    and sends the gradient to the anchors only: equal to ``q @ C.detach().T / t`` gathered."""
    from hardneg.losses.contrastive import ContrastInputs
    from hardneg.strategies.mochi import anchor_column_logits

    g = torch.Generator().manual_seed(8)
    if form == "per_anchor_pool":
        z1, z2, _ = make_inputs("in_batch", dtype)
        kwargs = {"negatives": torch.randn(12, 9, 6, generator=g, dtype=dtype)}
    else:
        z1, z2, kwargs = make_inputs(form, dtype)
    contrast = ContrastInputs(z1=z1, z2=z2, temperature=0.3, **kwargs).standard_contrast()
    negatives = torch.isfinite(contrast.negative_logits)
    # random negative columns of each anchor, with repeats
    keys = torch.rand(negatives.shape, generator=g, dtype=torch.float64).masked_fill(~negatives, -1)
    index = torch.cat([keys.topk(3, dim=1).indices] * 2, dim=1)
    weight = torch.randn(index.shape, generator=g, dtype=dtype)
    fast = fastpaths.mixed_column_logits(contrast, index)
    plain = anchor_column_logits(contrast).gather(1, index)
    assert_close_rel(fast, plain, what="values")
    gf = torch.autograd.grad((fast * weight).sum(), (z1, z2), allow_unused=True, retain_graph=True)
    gp = torch.autograd.grad((plain * weight).sum(), (z1, z2), allow_unused=True)
    for a, b in zip(gf, gp):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close_rel(a, b, what="gradient")


# potential in-batch: byte draws, block masses, the fused terms


@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_and_binomial_bytes_have_the_binomial_law(dtype):
    """Random-byte draws (with their ties settled by a uniform): mean ``m p``, variance
    ``m p (1 - p)``, 0 where ``p = 0`` or ``m = 0``, ``m`` where ``p = 1``, every value of a
    ``Binomial(5, 0.9)`` in proportion; ``p`` just above a multiple of 1/256 (ties matter)."""
    g = torch.Generator().manual_seed(4)
    p = torch.tensor(
        [[0.3, 0.5, 0.2, 0.9, 0.4, 0.0], [0.6, 0.7, 1.0, 3 / 256 + 1e-3, 1.0, 0.5]], dtype=dtype
    )
    trials = torch.tensor([0, 1, 2, 5, 9, 300])  # past 255: the int32 sums
    draws = torch.stack([fastpaths.binomial_bytes(p, trials, g) for _ in range(5000)])
    assert draws.dtype == dtype and torch.equal(draws, draws.round())
    m = trials.to(dtype).expand_as(p)
    assert bool((draws >= 0).all() and (draws <= m).all())
    assert bool((draws[:, :, 0] == 0).all() and (draws[:, 0, 5] == 0).all())
    assert torch.equal(draws[:, 1, 2], torch.full_like(draws[:, 1, 2], 2.0))
    assert_binomial_law(draws, m, p)
    one = torch.stack([fastpaths.bernoulli_bytes(p, g) for _ in range(5000)])
    assert one.dtype == dtype and bool(((one == 0) | (one == 1)).all())
    se1 = (p * (1 - p) / len(one)).sqrt().clamp(min=1e-9)
    assert bool(((one.mean(0) - p).abs() <= 5 * se1).all())
    # a probability 1/256 above a byte edge is kept only through ties: p = 3/256 + 1e-3
    edge = torch.full((200_000,), 3 / 256 + 1e-3, dtype=dtype)
    freq = float(fastpaths.bernoulli_bytes(edge, g).double().mean())
    assert abs(freq - float(edge[0])) <= 5 * math.sqrt(float(edge[0]) / len(edge))


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_log_masses_equal_the_plain_sums_and_gathers(dtype):
    """Against ``weighted_log_mass``'s plain twin ``logsumexp(c + log w)`` per block and a
    gather: values and gradients, a whole-matrix block, off-diagonal blocks, a row with nothing
    kept (``-inf``, zero gradient), ``-inf`` logits where ``w = 0``, reads of single entries."""
    from hardneg.objectives import safe_logsumexp

    g = torch.Generator().manual_seed(6)
    n = 5
    c = torch.randn(2 * n, 2 * n, generator=g, dtype=torch.float64).to(dtype) * 2
    c[torch.arange(2 * n), torch.arange(2 * n)] = float("-inf")
    w_all = torch.randint(0, 3, (2 * n, 2 * n), generator=g).to(dtype)
    w_all[torch.arange(2 * n), torch.arange(2 * n)] = 0.0
    w1 = torch.rand(n, n, generator=g, dtype=torch.float64).to(dtype)
    w2 = torch.randint(0, 4, (n, n), generator=g).to(dtype)
    w2[2] = 0.0  # nothing kept
    index = torch.stack([torch.randperm(n, generator=g)[:2] for _ in range(n)])
    c.requires_grad_(True)
    blocks = [(0, 2 * n, 0, 2 * n), (0, n, n, 2 * n), (n, 2 * n, 0, n)]
    fast = fastpaths.block_log_masses(c, blocks, [w_all, w1, w2], [(0, n, index), (n, 0, index)])
    plain = [
        safe_logsumexp(c + w_all.log()),
        safe_logsumexp(c[:n, n:] + w1.log()),
        safe_logsumexp(c[n:, :n] + w2.log()),
        c[:n, n:].gather(1, index),
        c[n:, :n].gather(1, index),
    ]
    assert fast[2][2] == float("-inf")
    ups = [torch.linspace(0.5, 2.0, x.numel(), dtype=dtype).view_as(x) for x in plain]
    for f, p in zip(fast, plain):
        finite = torch.isfinite(p)
        assert torch.equal(finite, torch.isfinite(f))
        assert_close_rel(f[finite], p[finite], what="value")

    def total(outs):
        return sum(torch.where(torch.isfinite(o), o, 0.0).mul(u).sum() for o, u in zip(outs, ups))

    (gf,) = torch.autograd.grad(total(fast), c)
    (gp,) = torch.autograd.grad(total(plain), c)
    assert bool(torch.isfinite(gf).all())
    assert_close_rel(gf, gp, what="gradient")
    # without the whole-matrix block (the buffer is zero-filled) and with an unused output
    two = fastpaths.block_log_masses(c, blocks[1:], [w1, w2])
    (gf,) = torch.autograd.grad(torch.where(torch.isfinite(two[1]), two[1], 0.0).sum(), c)
    again = safe_logsumexp(c[n:, :n] + w2.log())
    (gp,) = torch.autograd.grad(torch.where(torch.isfinite(again), again, 0.0).sum(), c)
    assert_close_rel(gf, gp, what="gradient, one block")


@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"select_on": "raw", "aug_pairing": "broadcast", "weighting": "soft"},
        {"a": 0.0, "num_neighbors": 2, "clamp": 1.0},
    ],
)
def test_potential_in_batch_fused_terms_have_the_plain_law(hp):
    """The fused in-batch terms (one Gram, byte draws, block masses) under fresh draws: the
    loss has the plain grid's mean and spread, with ``L_aug`` and every kernel option."""
    z1, z2, kwargs = make_inputs("in_batch", torch.float64, n=8)

    def losses(fast):
        loss_fn = hardneg.create_loss("potential", fast=fast, **hp)
        g = torch.Generator().manual_seed(21 if fast else 22)
        return torch.stack([loss_fn(z1, z2, generator=g) for _ in range(1200)]).detach()

    lf, lp = losses(True), losses(False)
    se = math.sqrt(float(lf.var() + lp.var()) / len(lf))
    assert abs(float(lf.mean() - lp.mean())) <= 5 * se + 1e-12
    if float(lp.std()) > 0:
        assert abs(float(lf.std() / lp.std()) - 1) < 0.15


def test_potential_in_batch_fused_path_is_taken(monkeypatch):
    """In-batch InfoNCE with cosine logits goes through one Gram matrix (the fused terms); ids,
    the Jensen-Shannon objective and a pool do not."""
    calls = []
    real = fastpaths.potential_in_batch_terms
    monkeypatch.setattr(
        fastpaths, "potential_in_batch_terms", lambda *a: calls.append(1) or real(*a)
    )
    z1, z2, kwargs = make_inputs("in_batch", torch.float32)
    hardneg.create_loss("potential")(z1, z2)
    assert len(calls) == 1
    hardneg.create_loss("potential", objective="jsd")(z1, z2)
    z1, z2, kwargs = make_inputs("ids", torch.float32)
    hardneg.create_loss("potential")(z1, z2, **kwargs)
    z1, z2, kwargs = make_inputs("pool", torch.float32)
    hardneg.create_loss("potential")(z1, z2, **kwargs)
    hardneg.create_loss("potential", temperature=0.02)(z1, z2)  # e^{-2/t} would underflow
    assert len(calls) == 1


def test_potential_pool_fast_path_draws_the_exact_binomial_counts(monkeypatch):
    """The bank path's kept counts, read where its masses take them: per anchor and column,
    ``Binomial(m, pi)`` with ``m`` the plain grid's cells of that column for that anchor (the
    own block's cell and the excluded entry left out) and ``pi`` the plain form's keep
    probability: mean within 5 standard errors everywhere, the variance pooled over the
    entries within 10 %, 0 draws on the non-negatives; bank rows in several blocks are met."""
    from hardneg.losses.contrastive import ContrastInputs
    from hardneg.strategies.base import StepContext

    z1, z2, kwargs = make_inputs("pool_exclude", torch.float64, n=9, k=14, seed=3)
    loss_fn = hardneg.create_loss("potential", num_neighbors=3, a=2.0)
    inputs = ContrastInputs(z1=z1, z2=z2, temperature=loss_fn.temperature, **kwargs)
    strategy = loss_fn.strategy
    plain = strategy.mined(inputs, z1, z2, None, fast=True)  # log pi and m per column
    seen = []
    real = fastpaths.block_log_masses
    monkeypatch.setattr(
        fastpaths,
        "block_log_masses",
        lambda c, b, w, r=(): seen.append([x.clone() for x in w]) or real(c, b, w, r),
    )
    g = torch.Generator().manual_seed(5)
    context = StepContext(generator=g)
    draws = []
    for _ in range(800):
        seen.clear()
        (_, mined, _), _ = fastpaths.potential_pool_terms(strategy, inputs, context)
        keys, _, pool = seen[0][0], seen[0][1], seen[1][0]
        draws.append(torch.cat([keys, pool], dim=1))
    draws = torch.stack(draws)  # [R, N, N + U]
    index = mined.column_index
    m = plain.multiplicity[:, index] * torch.isfinite(plain.cell_log_keep[:, index])
    pi = plain.cell_log_keep[:, index].exp()
    assert torch.equal(mined.multiplicity, m)
    assert int(m.max()) >= 3  # bank rows in several blocks
    assert torch.equal(draws, draws.round()) and bool((draws >= 0).all() and (draws <= m).all())
    mean, var = m * pi, m * pi * (1 - pi)
    se = (var / len(draws)).sqrt().clamp(min=1e-9)
    assert bool(((draws.mean(0) - mean).abs() <= 5 * se).all())
    loose = var > 0
    spread = ((draws - mean) ** 2)[:, loose].mean() / var[loose].mean()
    assert abs(float(spread) - 1) < 0.1, float(spread)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_contrast_equals_in_batch_contrast(dtype):
    """``pair_contrast`` (the potential fast paths' Gram, the masked entries corrected in its backward) against
    ``in_batch_contrast`` of two views: every field, and the gradients of the logits and the
    partners' logits under arbitrary upstream gradients, the masked entries included (their
    gradient must not reach the inputs)."""
    from hardneg.contrast import in_batch_contrast

    g = torch.Generator().manual_seed(9)
    z1 = torch.randn(5, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    z2 = torch.randn(5, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    fast = fastpaths.pair_contrast(z1, z2, temperature=0.3)
    plain = in_batch_contrast((z1, z2), temperature=0.3)
    for name in ("positive_weight", "positive_index", "negative_mask"):
        assert torch.equal(getattr(fast, name), getattr(plain, name)), name
    assert fast.num_negatives == plain.num_negatives and fast.temperature == plain.temperature
    for name in ("anchors", "positives", "positive_logits"):
        assert_close_rel(getattr(fast, name), getattr(plain, name), what=name)
    finite = torch.isfinite(plain.negative_logits)
    assert torch.equal(finite, torch.isfinite(fast.negative_logits))
    assert_close_rel(fast.negative_logits[finite], plain.negative_logits[finite], what="logits")
    up = torch.randn(10, 10, generator=g, dtype=torch.float64).to(dtype)
    up_pos = torch.randn(10, 1, generator=g, dtype=torch.float64).to(dtype)

    # upstream gradients at every entry, the masked ones too: they must not reach z
    gf = torch.autograd.grad(
        (fast.negative_logits, fast.positive_logits), (z1, z2), (up, up_pos), retain_graph=True
    )
    gp = torch.autograd.grad((plain.negative_logits, plain.positive_logits), (z1, z2), (up, up_pos))
    for a, b in zip(gf, gp):
        assert_close_rel(a, b, what="gradient")
    # the Gram itself on rows that are not unit vectors (normalising hides a radial leak)
    z = torch.cat([z1, z2]).detach().mul(1.5).requires_grad_()
    logits, pos = fastpaths._PairGram.apply(z, 0.3)
    idx = torch.arange(10)
    plain_logits = (z @ z.T / 0.3).index_put((idx, idx), torch.tensor(float("-inf"), dtype=dtype))
    plain_logits = plain_logits.index_put(
        (idx, idx.roll(5)), torch.tensor(float("-inf"), dtype=dtype)
    )
    plain_pos = (z * z.roll(5, dims=0)).sum(dim=1) / 0.3
    assert_close_rel(pos, plain_pos, what="partners")
    (gf,) = torch.autograd.grad((logits, pos), z, (up, up_pos[:, 0]))
    (gp,) = torch.autograd.grad((plain_logits, plain_pos), z, (up, up_pos[:, 0]))
    assert_close_rel(gf, gp, what="Gram gradient")
    # one output only: the other's gradient is None in the backward pass
    for pick in ("negative_logits", "positive_logits"):
        f = getattr(fastpaths.pair_contrast(z1, z2, temperature=0.3), pick)
        p = getattr(in_batch_contrast((z1, z2), temperature=0.3), pick)
        w = torch.randn(f.shape, generator=g, dtype=torch.float64).to(dtype)
        gf = torch.autograd.grad(f, (z1, z2), w)
        gp = torch.autograd.grad(p, (z1, z2), w)
        for a, b in zip(gf, gp):
            assert_close_rel(a, b, what=f"gradient of {pick}")
