"""Every fast path (``hardneg.fastpaths``) equals its plain twin.

Two levels:

* each registered loss (``hardneg.list_losses()``, so losses registered later are covered) with
  ``fast=True`` against the same loss with ``fast=False``: value and gradients within 1e-5
  (relative), in float32 and float64, in-batch, with a pool, with a pool and ``exclude_index``,
  with duplicate ``ids`` and with retrieval hard negatives; Ring across band sizes (``L = 0``,
  ``U = M``, tiny pools below the numpy threshold, rows of >= 1024 columns above it) and ties;
* the low-level functions against a plain expression written here: ``tilted_log_mass`` against
  ``logsumexp(c + log w)`` with HCL's normalised weights, ``top_k_indices`` / ``band_indices``
  against ``torch.topk``, ``band_logits``' sparse backward against back-propagating through the
  gather.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _laws import inclusion_probabilities
from _same import assert_same
from _threads import band_over_four_threads

import hardneg
from hardneg import fastpaths

LOSSES = hardneg.list_losses()
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]

# hyper-parameter variants per loss that reach each branch of its fast path; a loss registered
# later gets its defaults (and a seeded generator, so that draws repeat)
VARIANTS: dict[str, list[dict]] = {
    # t = 0.01: e^{1/t} overflows float32, the log-mass is shifted by the row maximum
    "infonce": [{}, {"temperature": 0.01}, {"normalize": False}],
    "debiased": [{}],
    # alpha 100 at t = 0.05: the tilt's bound 1/t + alpha = 120 is past float32's range
    "hardness": [{}, {"alpha": 100.0}, {"mode": "hard_negatives"}],
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
        {"beta": 0.0, "lambda_d": 0.0},  # U [A, C], factor used without the exponential
    ],
    # random draws: equal in expected mode; the Bernoulli law is tested below
    "potential": [
        {"sample": "expected"},
        {"sample": "expected", "pool_as_negatives": True, "weighting": "soft"},
        {"sample": "expected", "select_on": "raw", "aug_pairing": "broadcast", "a": 0.0},
        {"sample": "expected", "num_neighbors": 0, "aug_weight": 0.0, "clamp": 1.0},
    ],
    "positive_aware": [{}, {"mode": "margin", "margin": 0.3}, {"mode": "margin", "margin": -5.0}],
    "fnc": [{}, {"mode": "eliminate", "top_k": 3}, {"top_k": 2}],
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


def compare_fast_plain(name, hp, z1, z2, kwargs, *, grads=True, rtol=1e-5):
    fast = hardneg.create_loss(name, check_inputs=False, fast=True, **hp)
    plain = hardneg.create_loss(name, check_inputs=False, fast=False, **hp)
    lf, gf = loss_and_grads(fast, z1, z2, kwargs)
    lp, gp = loss_and_grads(plain, z1, z2, kwargs)
    assert lf.dtype == lp.dtype == z1.dtype
    assert torch.isfinite(lp)
    assert_close_rel(lf, lp, rtol, what=f"{name} {hp} loss")
    if grads:
        for i, (a, b) in enumerate(zip(gf, gp)):
            assert_close_rel(a, b, rtol, what=f"{name} {hp} grad z{i + 1}")
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


def supported_cases():
    """:func:`cases` in every call form its loss accepts (the pairs a loss rejects by design
    are not generated: no case is a skip)."""
    for name in LOSSES:
        for i, hp in enumerate(VARIANTS.get(name, [{}])):
            for form in FORMS:
                if (name, form) not in UNSUPPORTED:
                    yield pytest.param(name, hp, form, id=f"{name}-{i}-{form}")


@pytest.mark.parametrize("dtype", DTYPES)
# a list, not the generator: mutmut collects this module twice in one process, and a generator
# would be used up by the first collection (the second would find no test_fast_equals_plain)
@pytest.mark.parametrize(("name", "hp", "form"), list(supported_cases()))
def test_fast_equals_plain(name, hp, dtype, form):
    z1, z2, kwargs = make_inputs(form, dtype)
    compare_fast_plain(name, hp, z1, z2, kwargs)


@pytest.mark.parametrize("form", ["in_batch", "pool"])
@pytest.mark.parametrize(
    "setting",
    [{"temperature": 0.005}, {"normalize": False}],
    ids=["t=0.005", "raw"],
)
@pytest.mark.parametrize("name", LOSSES)
def test_fast_equals_plain_past_the_range_of_an_unshifted_exponential(name, setting, form):
    """float32 logits far past ``e^x``'s normal range both ways: cosines at ``t = 0.005``
    (``|c|`` up to 200) and raw dot products of rows scaled by 8. A fast path may skip the row
    maximum only under a bound ``1/t`` of cosine logits; a bound claimed for raw dot products,
    or a wrong one (``t`` for ``1/t``), leaves ``e^c`` to overflow or vanish, where the plain
    path's log-sum-exp holds."""
    z1, z2, kwargs = make_inputs(form, torch.float32)
    if "normalize" in setting:
        z1, z2 = (8 * z1).detach().requires_grad_(), (8 * z2).detach().requires_grad_()
        kwargs = {key: 8 * value for key, value in kwargs.items()}
    hp = dict(VARIANTS.get(name, [{}])[0], **setting)
    # float32 logits of a few hundred carry rounding errors of ~3e-5 on either path
    compare_fast_plain(name, hp, z1, z2, kwargs, rtol=1e-4)


@pytest.mark.parametrize("name", LOSSES)
def test_an_anchor_without_negatives_has_a_finite_gradient_on_both_paths(name):
    """Masks can leave an anchor no negative (every id equal in-batch; in the retrieval form
    the one hard negative carrying the anchor's own text, ``anchor_ids``, as the
    sentence-transformers integration masks duplicates): the fast path's gradient equals the
    plain one and is finite (the tilted mass's backward divided ``0 / 0`` on such a row)."""
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    z2 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    hard = torch.randn(3, 1, 4, generator=g, dtype=torch.float64)
    forms = [{"ids": torch.zeros(3, dtype=torch.long)}]
    if name != "potential":  # (potential rejects the retrieval form)
        # anchor 0 keeps nothing: the other positives are duplicates of its positive, every
        # hard negative has its own text; anchors 1 and 2 keep the hard negatives
        ids = torch.tensor([0, 0, 0, 1, 1, 1])
        forms.append({"hard_negatives": hard, "ids": ids, "anchor_ids": torch.tensor([1, 5, 6])})
    for kwargs in forms:
        grads = []
        for fast in (True, False):
            loss_fn = hardneg.create_loss(name, fast=fast)
            a = z1.clone().requires_grad_()
            extra = {"generator": torch.Generator().manual_seed(0)} if loss_fn.draws else {}
            value = loss_fn(a, z2, **kwargs, **extra)
            (grad,) = torch.autograd.grad(value, a)
            assert torch.isfinite(value) and torch.isfinite(grad).all(), (name, fast, kwargs)
            grads.append(grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6)])
def test_unit_rows_equal_f_normalize_in_value_and_gradient(shape):
    """The written-out backward against autograd's through ``F.normalize`` (float64), along the
    last dimension of 2-D and 3-D inputs, a zero row and a row whose norm is below ``eps``
    (clamped: ``x / eps``, linear) and one just above it included; and ``gradcheck`` of the
    function itself."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[..., 0, :] = 0.0  # clamped: linear there
    x[..., 1, :] = 1e-13 * torch.randn(shape[-1], generator=g, dtype=torch.float64)  # clamped
    x[..., 2, :] = 1e-11 * torch.randn(shape[-1], generator=g, dtype=torch.float64)  # above eps
    x.requires_grad_()
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    fast = fastpaths.unit_rows(x)
    plain = torch.nn.functional.normalize(x, dim=-1)
    assert_close_rel(fast, plain, what="values", rtol=1e-12)
    (gf,) = torch.autograd.grad(fast, x, up)
    (gp,) = torch.autograd.grad(plain, x, up)
    torch.testing.assert_close(gf, gp, rtol=1e-10, atol=1e-6)
    y = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fastpaths.unit_rows, (y,))


def test_unit_rows_of_a_row_whose_norm_is_exactly_eps_is_clamped_as_f_normalize():
    """At a norm of exactly ``eps`` ``F.normalize`` takes the clamped branch: the row is
    ``x / eps``, linear, and its gradient ``g / eps`` has no projection onto the row. (The
    earlier test's rows are clearly below or above ``eps``.)"""
    eps = 1e-12
    x = torch.tensor(
        [[eps, 0.0, 0.0], [0.6 * eps, 0.8 * eps, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    assert torch.equal(
        torch.linalg.vector_norm(x[:2], dim=-1), torch.full((2,), eps, dtype=x.dtype)
    )
    x.requires_grad_()
    up = torch.tensor([[1.0, 2.0, 3.0]] * 3, dtype=torch.float64)
    (gf,) = torch.autograd.grad(fastpaths.unit_rows(x, eps), x, up)
    (gp,) = torch.autograd.grad(torch.nn.functional.normalize(x, dim=-1, eps=eps), x, up)
    torch.testing.assert_close(gf, gp, rtol=1e-12, atol=0.0)
    # the clamped rows by hand: g / eps
    torch.testing.assert_close(gf[:2], up[:2] / eps, rtol=1e-12, atol=0.0)


def test_the_standard_in_batch_set_comes_from_pair_contrast_on_the_fast_path(monkeypatch):
    """Two views without ids on cosines: every strategy's standard set is ``pair_contrast``'s
    on the fast path (so ``test_fast_equals_plain`` compares it with ``in_batch_contrast``);
    ids, a third view, raw dot products or ``fast=False`` keep ``in_batch_contrast``."""
    calls = []
    real = fastpaths.pair_contrast

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastpaths, "pair_contrast", spy)
    g = torch.Generator().manual_seed(0)
    z1, z2, z3 = (torch.randn(6, 4, generator=g) for _ in range(3))
    cases = [
        ({}, {}, 1),
        ({}, {"ids": torch.tensor([0, 1, 2, 3, 4, 0])}, 0),
        ({}, {"extra_views": [z3]}, 0),
        ({"normalize": False}, {}, 0),
        ({"fast": False}, {}, 0),
    ]
    for settings, kwargs, expected in cases:
        for name in ("infonce", "hcl", "ring"):
            calls.clear()
            hardneg.create_loss(name, **settings)(z1, z2, **kwargs)
            assert len(calls) == expected, (name, settings, kwargs)


def test_the_objective_takes_the_one_pass_log_mass_on_the_fast_path(monkeypatch):
    """InfoNCE and debiased take :func:`fastpaths.log_mass` for the unweighted negative mass
    on the fast path (so ``test_fast_equals_plain`` compares it with ``torch.logsumexp``), with
    the ``1/t`` bound on cosines only; ``fast=False`` keeps ``torch.logsumexp``."""
    calls = []
    real = fastpaths.log_mass

    def spy(logits, bound=None):
        calls.append(bound)
        return real(logits, bound)

    monkeypatch.setattr(fastpaths, "log_mass", spy)
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(6, 4, generator=g) for _ in range(2))
    cases = [({}, [1 / 0.5]), ({"normalize": False}, [None]), ({"fast": False}, [])]
    for name in ("infonce", "debiased"):
        for settings, expected in cases:
            calls.clear()
            hardneg.create_loss(name, temperature=0.5, **settings)(z1, z2)
            assert calls == expected, (name, settings)


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
@pytest.mark.parametrize("tilt_grad", [True, False], ids=["tilt-grad", "tilt-detached"])
@pytest.mark.parametrize("shape", [(7, 13), (300, 400)], ids=["small", "blocks"])
@pytest.mark.parametrize(
    ("shifted", "with_factor"),
    [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
        ("overwrite", True),  # overwrite needs a factor (its buffer is the scratch)
    ],
    ids=[
        "own-shift-nofactor",
        "given-shift-nofactor",
        "own-shift-factor",
        "given-shift-factor",
        "overwrite-factor",
    ],
)
def test_tilted_log_mass_equals_plain(dtype, beta, with_factor, tilt_grad, shape, shifted):
    """``overwrite``: the factor and the given exponentials are scratch (UnReMix's fast path):
    ``q`` and ``q e`` are formed in their buffers; same value and gradient."""
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
    scratch = shifted == "overwrite"
    if scratch:
        e_before = given[1].clone()
    fast = fastpaths.tilted_log_mass(
        leaf_fast,
        beta,
        m,
        factor=f.clone() if scratch else f,
        tilt_grad=tilt_grad,
        shifted=given,
        overwrite=scratch,
    )
    if scratch:  # the in-place form was taken: q e is in the exponentials' buffer
        assert not torch.equal(given[1], e_before)
    plain = plain_tilted_log_mass(leaf_plain, beta, m, factor=f, tilt_grad=tilt_grad)
    assert fast.dtype == dtype
    assert_close_rel(fast, plain, what="log mass")
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(1), dtype=dtype)
    (g_fast,) = torch.autograd.grad(fast, leaf_fast, upstream)
    (g_plain,) = torch.autograd.grad(plain, leaf_plain, upstream)
    g_plain = torch.nan_to_num(g_plain, nan=0.0)  # -inf entries: no gradient either way
    assert bool((g_fast[~torch.isfinite(logits)] == 0).all())
    assert_close_rel(g_fast, g_plain, what="gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, 3.0, 0.3])
@pytest.mark.parametrize("with_factor", [False, True], ids=["nofactor", "factor"])
def test_tilted_log_mass_of_unshifted_exponentials_equals_plain(dtype, beta, with_factor):
    """``shifted=(None, e^c)`` (``row_exponentials`` with a bound: no row maximum, the shift is
    0) without ``overwrite``: every beta's route (``e^{beta c}`` from ``e`` or from ``beta c``),
    on a non-square ``[A, S]``; value and gradient (the default: through the weights too)
    against the plain expression. The caller's exponentials and factor are left as they were
    (only ``overwrite=True`` makes them scratch)."""
    logits, mask, factor = tilted_inputs(5, 11, dtype, seed=int(beta * 10) + 3)
    f = factor if with_factor else None
    m = mask.sum(dim=1)
    e = logits.exp()
    leaf_fast = logits.clone().requires_grad_()
    leaf_plain = logits.clone().requires_grad_()
    fast = fastpaths.tilted_log_mass(leaf_fast, beta, m, factor=f, shifted=(None, e))
    assert_same(e, logits.exp(), "the given exponentials")
    if with_factor:
        assert_same(factor, tilted_inputs(5, 11, dtype, seed=int(beta * 10) + 3)[2], "factor")
    plain = plain_tilted_log_mass(leaf_plain, beta, m, factor=f)
    assert fast.shape == plain.shape == (5,)
    assert_close_rel(fast, plain, what="log mass")
    upstream = torch.linspace(0.5, 1.5, 5, dtype=dtype)
    (g_fast,) = torch.autograd.grad(fast, leaf_fast, upstream)
    (g_plain,) = torch.autograd.grad(plain, leaf_plain, upstream)
    assert_close_rel(g_fast, torch.nan_to_num(g_plain, nan=0.0), what="gradient")


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_tilted_log_mass_takes_a_factor_of_another_dtype_in_the_logits_dtype(beta):
    """A float32 factor of float64 logits: the mass and its gradient in float64, against the
    plain expression with the factor cast to float64 (``beta = 0``: the factor is the weights
    alone; ``1``: formed with ``e`` a block at a time; ``0.3``: scales ``e^{beta s}``)."""
    logits, mask, factor = tilted_inputs(6, 13, torch.float64, seed=int(beta * 10) + 21)
    f32 = factor.float()
    m = mask.sum(dim=1)
    leaf_fast = logits.clone().requires_grad_()
    leaf_plain = logits.clone().requires_grad_()
    fast = fastpaths.tilted_log_mass(leaf_fast, beta, m, factor=f32)
    plain = plain_tilted_log_mass(leaf_plain, beta, m, factor=f32.double())
    assert fast.dtype == torch.float64
    assert_close_rel(fast, plain, what="log mass")
    upstream = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad(fast, leaf_fast, upstream)
    (g_plain,) = torch.autograd.grad(plain, leaf_plain, upstream)
    assert g_fast.dtype == torch.float64
    assert_close_rel(g_fast, torch.nan_to_num(g_plain, nan=0.0), what="gradient")


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_tilted_and_weighted_log_mass_of_more_than_a_block_of_entries_equal_plain(beta):
    """``[300, 1000]`` (more than ``_BLOCK = 2^18`` entries: the row sums ``sum_j q_ij e_ij``
    and ``sum_j w_ij e_ij`` are taken a block of rows at a time, every earlier case fitted one
    block): ``tilted_log_mass`` without a factor and ``weighted_log_mass`` with integer-valued
    weights, against their plain expressions in float64."""
    from hardneg.objectives import safe_logsumexp

    logits, mask, _ = tilted_inputs(300, 1000, torch.float64, seed=31 + int(beta * 10))
    assert logits.numel() > fastpaths._BLOCK
    m = mask.sum(dim=1)
    tilted = fastpaths.tilted_log_mass(logits, beta, m)
    assert_close_rel(tilted, plain_tilted_log_mass(logits, beta, m), what="tilted log mass")
    w = torch.randint(0, 3, logits.shape, generator=torch.Generator().manual_seed(2))
    w = w.to(torch.float64).masked_fill_(~mask, 0.0)
    w[:, 0] = 1.0
    weighted = fastpaths.weighted_log_mass(logits, w)
    assert_close_rel(weighted, safe_logsumexp(logits + w.log()), what="weighted log mass")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, 0.7])
@pytest.mark.parametrize("tilt_grad", [True, False], ids=["tilt-grad", "tilt-detached"])
@pytest.mark.parametrize("rows", [9, 300, 1100])  # 1100: the blocked backward, a partial block
def test_tilted_log_mass_gram_gradient_equals_the_score_matrix_backward(
    dtype, beta, tilt_grad, rows
):
    """``gram=(z, t)``: in-batch logits ``c = z z^T / t`` (masked entries ``-inf``); the gradient
    goes to ``z`` as ``(G + G^T) z / t`` by one product. Equal to back-propagating the same
    in-place tilted mass through the score matrix (value and gradient, 1e-5)."""
    g = torch.Generator().manual_seed(rows + int(10 * beta))
    z64 = torch.nn.functional.normalize(
        torch.randn(rows, 7, generator=g, dtype=torch.float64), dim=1
    )
    mask = torch.rand(rows, rows, generator=g) > 0.3
    mask.fill_diagonal_(False)
    mask[:, (torch.arange(rows) + 1) % rows] = True
    mask.fill_diagonal_(False)
    factor = (torch.rand(rows, rows, generator=g, dtype=torch.float64) + 0.05).to(dtype)
    t = 0.3
    m = mask.sum(dim=1)
    results = []
    for gram in (False, True):
        z = z64.to(dtype).requires_grad_()
        logits = ((z / t) @ z.T).masked_fill(~mask, float("-inf"))
        with torch.no_grad():
            row_max = logits.amax(dim=1)
            shifted = (row_max, (logits - row_max.unsqueeze(1)).exp())
        out = fastpaths.tilted_log_mass(
            logits,
            beta,
            m,
            factor=factor.clone(),
            tilt_grad=tilt_grad,
            shifted=shifted,
            overwrite=True,
            gram=(z, t) if gram else None,
        )
        upstream = torch.linspace(0.5, 1.5, rows, dtype=dtype)
        (grad,) = torch.autograd.grad(out, z, upstream)
        results.append((out, grad))
    (v_ref, g_ref), (v_gram, g_gram) = results
    assert g_gram.dtype == dtype
    assert_close_rel(v_gram, v_ref, what="log mass")
    assert_close_rel(g_gram, g_ref, what="gradient to z")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("tilt_grad", [True, False], ids=["tilt-grad", "tilt-detached"])
@pytest.mark.parametrize("rows", [9, 700])  # 700 x 400: two row blocks in the backward
def test_tilted_log_mass_columns_gradient_equals_the_score_matrix_backward(
    dtype, beta, tilt_grad, rows
):
    """``columns=(q, C, t)``: logits ``c = q C^T / t`` with ``C`` taking no gradient (a pool,
    masked entries ``-inf``); the gradient goes to ``q`` as ``G C / t`` a block of rows at a
    time. Equal to back-propagating the same in-place tilted mass through the score matrix."""
    g = torch.Generator().manual_seed(rows + int(10 * beta))
    q64 = torch.nn.functional.normalize(
        torch.randn(rows, 7, generator=g, dtype=torch.float64), dim=1
    )
    cols = torch.nn.functional.normalize(
        torch.randn(400, 7, generator=g, dtype=torch.float64), dim=1
    ).to(dtype)
    mask = torch.rand(rows, 400, generator=g) > 0.2
    mask[:, 0] = True
    factor = (torch.rand(rows, 400, generator=g, dtype=torch.float64) + 0.05).to(dtype)
    t = 0.3
    m = mask.sum(dim=1)
    results = []
    for blocked in (False, True):
        q = q64.to(dtype).requires_grad_()
        logits = ((q / t) @ cols.T).masked_fill(~mask, float("-inf"))
        with torch.no_grad():
            row_max = logits.amax(dim=1)
            shifted = (row_max, (logits - row_max.unsqueeze(1)).exp())
        out = fastpaths.tilted_log_mass(
            logits,
            beta,
            m,
            factor=factor.clone(),
            tilt_grad=tilt_grad,
            shifted=shifted,
            overwrite=True,
            columns=(q, cols, t) if blocked else None,
        )
        upstream = torch.linspace(0.5, 1.5, rows, dtype=dtype)
        (grad,) = torch.autograd.grad(out, q, upstream)
        results.append((out, grad))
    (v_ref, g_ref), (v_col, g_col) = results
    assert g_col.dtype == dtype
    assert_close_rel(v_col, v_ref, what="log mass")
    assert_close_rel(g_col, g_ref, what="gradient to q")


def test_unremix_in_batch_fast_path_differentiates_z_by_one_product(monkeypatch):
    """In-batch (anchors are the columns) the tilted mass takes the gram form; with a pool, the
    score matrix's own backward (one product there)."""
    calls = []
    original = fastpaths._GramTiltedLogMass.apply
    monkeypatch.setattr(
        fastpaths._GramTiltedLogMass, "apply", lambda *a: calls.append(1) or original(*a)
    )
    pool_calls = []
    pool_original = fastpaths._ColumnsTiltedLogMass.apply
    monkeypatch.setattr(
        fastpaths._ColumnsTiltedLogMass,
        "apply",
        lambda *a: pool_calls.append(1) or pool_original(*a),
    )
    for form, expected in (("in_batch", 1), ("ids", 1), ("pool", 0), ("pool_exclude", 0)):
        calls.clear(), pool_calls.clear()
        z1, z2, kwargs = make_inputs(form, torch.float64)
        hardneg.create_loss("unremix", fast=True)(z1, z2, **kwargs).backward()
        assert len(calls) == expected, form
        assert len(pool_calls) == 1 - expected, form  # a pool: the blocked G C / t


@pytest.mark.parametrize("tau", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("per_anchor_m", [False, True])
def test_debiased_infonce_equals_the_plain_objective(tau, per_anchor_m):
    """``debiased_infonce`` against ``logaddexp(a, debias_log_mass(log R, a)) - a`` in float64:
    rows above the floor, on it (``gap >= 0``: a tiny ``log R``; a large positive logit) and
    without negatives (``log R = -inf``), an int and a per-anchor ``M``; values and gradients."""
    from hardneg.objectives import debias_log_mass

    g = torch.Generator().manual_seed(int(100 * tau) + per_anchor_m)
    a = 40
    log_mass = 3.0 + torch.randn(a, generator=g, dtype=torch.float64)
    pos = torch.randn(a, generator=g, dtype=torch.float64)
    log_mass[:5] = -4.0  # far below tau M e^a: on the floor
    pos[5:8] = 6.0
    log_mass[8] = -math.inf
    m = torch.randint(5, 30, (a,), generator=g) if per_anchor_m else 20
    t = 0.5
    results = []
    for fast in (True, False):
        lm, p = log_mass.clone().requires_grad_(), pos.clone().requires_grad_()
        if fast:
            out = fastpaths.debiased_infonce(lm, p, tau_plus=tau, num_negatives=m, temperature=t)
        else:
            mm = m.unsqueeze(1) if isinstance(m, torch.Tensor) else float(m)
            ng = debias_log_mass(
                lm.unsqueeze(1), p.unsqueeze(1), tau_plus=tau, num_negatives=mm, temperature=t
            )
            out = (torch.logaddexp(p.unsqueeze(1), ng) - p.unsqueeze(1)).squeeze(1)
        up = torch.linspace(0.5, 1.5, a, dtype=torch.float64)
        results.append((out, *torch.autograd.grad(out, (lm, p), up)))
    floor = results[1][1] == 0  # d/dlog R = 0 on the floor
    assert bool(floor[:9].all()) and not bool(floor[9:].all())  # both branches are taken
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_objective_takes_the_fused_debiased_terms_only_when_fast(monkeypatch):
    """``fast=True`` (a loss outside ``torch.compile``) with one positive and ``tau_plus > 0``:
    the fused terms; the plain expression otherwise (``fast=False``, ``tau_plus = 0``)."""
    calls = []
    original = fastpaths.debiased_infonce
    monkeypatch.setattr(
        fastpaths, "debiased_infonce", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    z1, z2, kwargs = make_inputs("in_batch", torch.float64)
    for name, fast, expected in (
        ("debiased", True, 1),
        ("debiased", False, 0),
        ("unremix", True, 1),
        ("infonce", True, 0),
    ):
        calls.clear()
        hardneg.create_loss(name, fast=fast)(z1, z2, **kwargs)
        assert len(calls) == expected, (name, fast)


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
# low level: top_k_indices and band_indices


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


BAND_SHAPES = [
    pytest.param(5, 9, id="5x9"),  # below numpy's minimum: torch top-k
    pytest.param(300, 256, id="300x256"),  # numpy threshold exactly, several row blocks
    pytest.param(70, 1500, id="70x1500"),  # numpy, several blocks per thread
]


@pytest.mark.parametrize(("rows", "cols"), BAND_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "ulp", "inf", "ties", "signed_zero"])
def test_band_indices_hold_the_values_of_the_sorted_ranks(rows, cols, dtype, kind):
    """Ranks ``[lower, upper)`` of each row against ``topk(upper, sorted=True)``: distinct
    columns, the same multiset of values (ties: which equal entry is taken may differ), the
    very same columns where no two values are equal (threads: the test below)."""
    x = topk_inputs(rows, cols, dtype, seed=5 * rows + cols, kind=kind)
    for lower, upper in sorted(
        {
            (0, 1),
            (0, cols),
            (1, 2),
            (cols // 10, cols // 2 + 1),
            (cols - 2, cols),
            (3, cols - 1),
        }
    ):
        got = fastpaths.band_indices(x, lower, upper)
        want = x.topk(upper, dim=1, sorted=True).indices[:, lower:]
        assert got.shape == (rows, upper - lower) and got.dtype == torch.long
        assert bool((got.sort(dim=1).values.diff(dim=1) > 0).all())  # distinct columns
        a = x.gather(1, got).sort(dim=1).values
        b = x.gather(1, want).sort(dim=1).values
        assert torch.equal(a, b), (lower, upper)
        if kind in ("plain", "ulp"):
            assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_band_indices_read_distinct_values_by_their_edge_values(monkeypatch, dtype):
    """Distinct values take the edge-value path (no argpartition): the very columns of the
    sorted ranks. A NaN (highest, as in ``torch.topk``) or a repeated edge value sends its row
    block to ``argpartition`` over the keys."""
    import numpy as np

    x = topk_inputs(70, 700, dtype, seed=3, kind="plain")

    def no_keys(*args, **kwargs):
        raise AssertionError("argpartition taken for distinct values")

    with monkeypatch.context() as patch:
        patch.setattr(np, "argpartition", no_keys)
        for data in (x, x - 10.0):  # the edges negative: their keys mapped back to values
            for lower, upper in ((0, 1), (0, 70), (7, 70), (69, 70), (1, 700)):
                got = fastpaths.band_indices(data, lower, upper).sort(dim=1).values
                want = data.topk(upper, dim=1).indices[:, lower:].sort(dim=1).values
                assert_same(got, want, (lower, upper))
    # row 5: a NaN (rank 0, in a band from 0); row 9: its rank-69 value repeated once (one
    # entry too many): the block's count is right, but not its rows'
    x[5, 3] = float("nan")
    x[9, x[9].argmin()] = x[9].topk(70).values[-1]
    y = x.clone()
    y[40, :] = y[40, 11]  # one value over a whole row
    for data, bands in ((x, ((0, 70),)), (y, ((0, 1), (7, 70), (1, 700)))):
        for lower, upper in bands:
            got = fastpaths.band_indices(data, lower, upper)
            want = data.topk(upper, dim=1).indices[:, lower:]
            assert bool((got.sort(dim=1).values.diff(dim=1) > 0).all())
            a = data.gather(1, got).sort(dim=1).values.nan_to_num(nan=7.0)
            b = data.gather(1, want).sort(dim=1).values.nan_to_num(nan=7.0)
            assert torch.equal(a, b), (lower, upper)


def _count_sampled(monkeypatch) -> list[bool]:
    """Records what each call of ``_band_from_sample`` returned (True: it wrote the band)."""
    calls: list[bool] = []
    sampled = fastpaths._band_from_sample

    def counted(*args, **kwargs):
        calls.append(sampled(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(fastpaths, "_band_from_sample", counted)
    return calls


def _rows_whose_sample_overstates_them(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows whose sampled columns (``c % _BAND_STRIDE == 0``) hold their largest values: the
    sample's threshold then lies among those, far above the row's ``upper``-th value, and
    the row has fewer candidates than ``upper``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x[:, :: fastpaths._BAND_STRIDE] += 10.0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "ulp", "inf", "ascending", "descending"])
def test_band_indices_from_a_sample_of_each_row_equal_the_topk_band(monkeypatch, dtype, kind):
    """Rows of at least ``_BAND_SAMPLE_MIN_COLUMNS`` whose band ends in their top quarter take
    the sampled pre-selection (checked: it wrote every block), and its band is the very columns
    of ``topk(upper, sorted=True)[:, lower:]``; rows sorted along the columns give the strided
    sample a structure (every value's neighbours are its neighbours in rank)."""
    calls = _count_sampled(monkeypatch)
    rows, cols = 300, 1024
    x = topk_inputs(
        rows, cols, dtype, seed=17, kind="plain" if kind in ("ascending", "descending") else kind
    )
    if kind in ("ascending", "descending"):
        x = x.sort(dim=1, descending=kind == "descending").values
    for lower, upper in ((0, 1), (0, 5), (10, 102), (60, 100), (99, 100)):
        calls.clear()
        got = fastpaths.band_indices(x, lower, upper).sort(dim=1).values
        want = x.topk(upper, dim=1, sorted=True).indices[:, lower:].sort(dim=1).values
        assert_same(got, want, (lower, upper))
        if kind != "inf":  # (30 % -inf: a sample's threshold may be -inf, too many candidates)
            assert calls and all(calls), (lower, upper, calls)


def test_rows_from_the_wide_threshold_take_every_eighth_column_as_their_sample(monkeypatch):
    """From ``_BAND_WIDE_COLUMNS`` columns the sample is every ``_BAND_WIDE_STRIDE``-th entry.
    Rows whose largest values sit at the columns ``c % 8 == 4``: a sample of every 4th column
    sees them and sets its threshold among them (too few candidates: the whole-row fallback);
    every 8th column misses them, so the sampled path serves each block. Either way the band
    is the topk band."""
    assert fastpaths._BAND_WIDE_STRIDE == 8 and fastpaths._BAND_STRIDE == 4
    calls = _count_sampled(monkeypatch)
    g = torch.Generator().manual_seed(8)
    for cols, sampled in ((fastpaths._BAND_WIDE_COLUMNS + 52, True), (1600, False)):
        x = torch.randn(120, cols, generator=g)
        x[:, 4::8] += 10.0
        calls.clear()
        got = fastpaths.band_indices(x, 10, 100).sort(dim=1).values
        assert torch.equal(got, x.topk(100, dim=1).indices[:, 10:].sort(dim=1).values)
        assert calls and all(c == sampled for c in calls), (cols, calls)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1024, 2100])
def test_mochi_hardest_columns_of_wide_rows_come_from_the_sample_and_equal_topk(
    monkeypatch, dtype, cols
):
    """``hardest_columns`` on rows of at least ``_BAND_SAMPLE_MIN_COLUMNS`` whose ``k`` is at
    most a quarter of the row selects among the sample's candidates (checked taken on every
    block, for ``k`` below a quarter) and gives topk's members in column order, masked (``-inf``) columns included; a
    NaN of either sign, or a tie at the ``k``-th value, still gives None (the general path)."""
    calls = _count_sampled(monkeypatch)
    rows = 150
    x = topk_inputs(rows, cols, dtype, seed=cols, kind="plain")
    x[torch.arange(rows), torch.arange(rows)] = float("-inf")
    for k in (1, 40, 128, cols // 4):
        calls.clear()
        got = fastpaths.hardest_columns(x, k)
        assert got is not None and got.shape == (rows, k)
        assert torch.equal(got, x.topk(k, dim=1).indices.sort(dim=1).values), k
        if k < cols // 4:  # (a quarter of the row: too many candidates expected, not tried)
            assert calls and all(calls), (k, calls)
    for sign in (1.0, -1.0):
        nan = x.clone()
        nan[70, 9] = sign * float("nan")
        assert fastpaths.hardest_columns(nan, 128) is None, sign
    tied = x.clone()
    top = tied[30].topk(41)
    tied[30, top.indices[40]] = top.values[39]  # the 40th value twice: a tie at k = 40's edge
    assert fastpaths.hardest_columns(tied, 40) is None
    assert fastpaths.hardest_columns(tied, 41) is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_band_indices_fall_back_to_whole_rows_when_the_sample_misses_or_ties(monkeypatch, dtype):
    """The sampled pre-selection gives up, writing nothing, on a block with a row whose top
    values the sample does not see (too few candidates), a repeated value at a band edge, or
    too many candidates; the whole-row partition then gives the topk band."""
    calls = _count_sampled(monkeypatch)
    upper = 102
    x = _rows_whose_sample_overstates_them(200, 1024, seed=3).to(dtype)
    got = fastpaths.band_indices(x, 10, upper).sort(dim=1).values
    want = x.topk(upper, dim=1).indices[:, 10:].sort(dim=1).values
    assert_same(got, want)
    assert calls and not any(calls)
    ties = topk_inputs(200, 1024, dtype, seed=5, kind="plain")
    ties[7, :] = ties[7, 3]  # one value over a whole row: a tie at both edges
    calls.clear()
    got = fastpaths.band_indices(ties, 10, upper)
    want = ties.topk(upper, dim=1).indices[:, 10:]
    assert bool((got.sort(dim=1).values.diff(dim=1) > 0).all())
    assert torch.equal(
        ties.gather(1, got).sort(dim=1).values, ties.gather(1, want).sort(dim=1).values
    )
    assert False in calls
    # the sample's edge far below the band's: more candidates than the gain allows
    wide = topk_inputs(128, 1024, dtype, seed=6, kind="plain")
    monkeypatch.setattr(fastpaths, "_BAND_SIGMAS", 40.0)
    calls.clear()
    got = fastpaths.band_indices(wide, 0, 60).sort(dim=1).values
    assert_same(got, wide.topk(60, dim=1).indices.sort(dim=1).values)
    assert calls == [False]


@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_selections_rank_a_nan_of_either_sign_highest_as_torch_topk(sign):
    """``torch.topk`` ranks every NaN highest. The order keys rank a NaN whose sign bit is set
    (x86's default NaN, what ``0 * inf`` gives) below ``-inf``: the numpy paths must see it
    and rank it highest too, or a NaN logit could drop out of the band silently."""
    nan = torch.tensor(0.0) * torch.tensor(float("inf"))
    nan = -nan.abs() if sign == "negative" else nan.abs()
    assert bool(torch.isnan(nan)) and (nan.view(torch.int32) < 0) == (sign == "negative")
    for rows, cols, lower, upper in ((300, 1024, 10, 102), (300, 400, 3, 40), (40, 3000, 0, 7)):
        x = topk_inputs(rows, cols, torch.float32, seed=cols, kind="plain")
        x[1, 5] = nan
        x[rows - 1, cols - 1] = nan
        want = x.topk(upper, dim=1).indices
        got = fastpaths.band_indices(x, lower, upper).sort(dim=1).values
        assert_same(got, want[:, lower:].sort(dim=1).values, (rows, cols))
        if lower == 0:  # a NaN is rank 0: in the band
            assert bool((got[1] == 5).any())
        got = fastpaths.top_k_indices(x, upper).sort(dim=1).values
        assert_same(got, want.sort(dim=1).values, (rows, cols))
        assert bool((got[1] == 5).any())


def test_band_indices_split_rows_over_threads_like_one_thread(monkeypatch):
    """Small row blocks and chunks over 4 threads: every row's band, none skipped or shifted."""
    x = topk_inputs(37, 512, torch.float32, seed=2, kind="plain")
    got = band_over_four_threads(monkeypatch, x, 7, 60, thread_min_entries=1)
    want = x.topk(60, dim=1).indices[:, 7:].sort(dim=1).values
    assert_same(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_accelerator_branch_of_every_selection_equals_its_plain_twin(monkeypatch, dtype):
    """On an accelerator the selections take ``torch.topk`` instead of numpy's partition (the
    branch a CUDA machine runs); forced here on the CPU through ``numpy_partitions``. Each
    result is checked against a full sort of the row, not against the numpy branch."""
    x = topk_inputs(30, 1500, dtype, seed=11, kind="plain")
    order = x.argsort(dim=1, descending=True)
    monkeypatch.setattr(fastpaths, "numpy_partitions", lambda t: False)
    for k in (1, 17, 1500):
        want = x.gather(1, order[:, k - 1 : k])
        assert_same(fastpaths.kth_largest(x, k), want, k)
        got = fastpaths.top_k_indices(x, k).sort(dim=1).values
        assert_same(got, order[:, :k].sort(dim=1).values, k)
    for lower, upper in ((0, 1), (7, 60), (300, 1500)):
        got = fastpaths.band_indices(x, lower, upper).sort(dim=1).values
        assert_same(got, order[:, lower:upper].sort(dim=1).values, (lower, upper))


def test_on_threads_hands_every_block_to_one_thread_and_reraises():
    """``_on_threads`` cuts the rows into blocks of ``step`` rows and its threads take them
    from one shared iterator: every block is worked on exactly once, on at most as many threads
    as torch's setting and the rows allow (``rows // min_rows``); a thread that stalls leaves its
    blocks to the others; a worker's error is re-raised in the caller."""
    import threading
    import time

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for rows, min_rows, step, most in ((10, 2, 3, 3), (10, 4, 1, 2), (10, 20, 4, 1)):
            seen, idents = [], set()

            def work(blocks, seen=seen, idents=idents):
                for block in blocks:
                    idents.add(threading.get_ident())
                    seen.append(block)
                    time.sleep(0.002)  # (so that the other threads start and take some)

            fastpaths._on_threads(work, rows, min_rows, step)
            firsts = list(range(0, rows, step))
            assert sorted(seen) == [(f, min(f + step, rows)) for f in firsts], (rows, step)
            assert 1 <= len(idents) <= most, (rows, min_rows, idents)
        # the calling thread stalls on its first block: the others take every other block
        caller, taken = threading.get_ident(), []

        def stalling(blocks):
            for block in blocks:
                taken.append((threading.get_ident() == caller, block))
                if threading.get_ident() == caller:
                    time.sleep(0.2)

        torch.set_num_threads(2)
        fastpaths._on_threads(stalling, 40, 2, 4)
        assert sorted(b for _, b in taken) == [(f, f + 4) for f in range(0, 40, 4)]
        assert sum(by_caller for by_caller, _ in taken) <= 2, taken

        def fail(blocks):
            for first, _ in blocks:
                if first > 0:
                    raise RuntimeError("worker")

        torch.set_num_threads(3)
        with pytest.raises(RuntimeError, match="worker"):
            fastpaths._on_threads(fail, 10, 2, 2)

        def fail_once(blocks):  # one failing block: the one error is the one raised
            for first, _ in blocks:
                if first == 4:
                    raise RuntimeError("block 4")

        with pytest.raises(RuntimeError, match="block 4"):
            fastpaths._on_threads(fail_once, 10, 2, 2)
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# low level: band_logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["columns", "bank", "in-batch"])
@pytest.mark.parametrize("lower", [0, 3])
@pytest.mark.parametrize("upper", [8, 30], ids=["narrow", "wide"])  # bag / dense product
def test_band_logits_backward_equals_the_gather(dtype, form, lower, upper):
    """The anchors' gradient by the bag (narrow band) or a dense product (wide band), the
    columns' when they have one (retrieval-like columns; a detached bank has none), and the
    in-batch ``(G + G^T) z``, against back-propagating through the gather of the logits."""
    g = torch.Generator().manual_seed(11 + lower)
    shared = form == "in-batch"
    a0 = torch.randn(20, 6, generator=g, dtype=torch.float64).to(dtype)
    x0 = a0 if shared else torch.randn(50, 6, generator=g, dtype=torch.float64).to(dtype)
    t, upper = 0.3, min(upper, 18 if shared else 50)

    def run(fast):
        a = a0.clone().requires_grad_()
        x = a if shared else x0.clone().requires_grad_(form == "columns")
        logits = (a / t) @ x.T
        with torch.no_grad():
            indices = logits.topk(upper, dim=1).indices[:, lower:]
            band = logits.gather(1, indices)
        if fast:
            out = fastpaths.band_logits(a, x, band, indices, t)
        else:
            out = logits.gather(1, indices)
        value = torch.logsumexp(out, dim=1) @ torch.linspace(0.5, 1.5, a.shape[0], dtype=dtype)
        leaves = (a, x) if form == "columns" else (a,)
        return value, torch.autograd.grad(value, leaves)

    vf, gf = run(True)
    vp, gp = run(False)
    assert_close_rel(vf, vp)
    for a, b in zip(gf, gp):
        assert a.dtype == dtype
        assert_close_rel(a, b, what="band gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", [*FORMS, "three_views", "own_pools"])
@pytest.mark.parametrize("k", [5, 15], ids=["bag", "dense"])  # below / above a quarter of S
def test_simans_mass_over_its_draws_by_column_logits_equals_the_gather(dtype, form, k, monkeypatch):
    """SimANS's fast mass reads the drawn logits by ``column_logits`` (``band_logits``' sparse
    backward: in-batch one product, a detached pool an ``embedding_bag`` or a dense product, no
    ``[A, S]`` gradient through the score matrix), against the plain gather of the same draws
    (same seed): value and gradients (retrieval: the columns' too); the sparse form is taken
    wherever the mass is (the same ``M`` for every anchor) but with a pool per anchor."""
    z1, z2, kwargs = make_inputs(form if form != "three_views" else "in_batch", dtype)
    if form == "three_views":
        kwargs["extra_views"] = [z1.detach() * 0.5 + 0.3]
    elif form == "own_pools":  # a pool per anchor: per-anchor columns, the gather
        kwargs["negatives"] = torch.randn(z1.shape[0], 20, z1.shape[1], dtype=dtype)
    loss = hardneg.create_loss("simans", check_inputs=False, num_samples=k)
    calls = []
    real = fastpaths.band_logits
    monkeypatch.setattr(fastpaths, "band_logits", lambda *a: calls.append(1) or real(*a))
    lf, gf = loss_and_grads(loss, z1, z2, kwargs)
    assert len(calls) == (form not in ("ids", "own_pools")), form  # ids: a per-anchor M
    monkeypatch.setattr(fastpaths, "column_logits", lambda c, i: c.negative_logits.gather(1, i))
    lp, gp = loss_and_grads(loss, z1, z2, kwargs)
    assert_close_rel(lf, lp, what="simans loss")
    for a, b in zip(gf, gp):
        assert a.dtype == dtype
        assert_close_rel(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-10, what="grad")


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_unremix_in_batch_computes_the_softmax_expectation_once(monkeypatch, fast):
    """In-batch the columns are the anchors: one pass of ``sum_k p_ik z_k`` (an [A, C] exp and
    a product) serves both the anchors' and the columns' deltas; on the fast path (the anchors'
    deltas, as directions, by ``anchor_deltas``) the row exponentials are computed once for
    that and for the objective's tilted mass, and the pool's columns have their own deltas."""
    from hardneg.strategies import unremix

    module = fastpaths if fast else unremix
    name = "anchor_deltas" if fast else "anchor_gradient_directions"
    calls, exps, columns = [], [], []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    row_exp = fastpaths.row_exponentials
    monkeypatch.setattr(fastpaths, "row_exponentials", lambda *a: exps.append(1) or row_exp(*a))
    col = fastpaths.unremix_column_deltas
    monkeypatch.setattr(
        fastpaths, "unremix_column_deltas", lambda *a, **k: columns.append(1) or col(*a, **k)
    )
    for form in ("in_batch", "pool"):  # the pool's deltas have their own form (column_gradients)
        calls.clear(), exps.clear(), columns.clear()
        z1, z2, kwargs = make_inputs(form, torch.float32)
        hardneg.create_loss("unremix", fast=fast)(z1, z2, **kwargs)
        assert len(calls) == 1, form
        assert len(exps) == int(fast), form
        assert len(columns) == int(fast and form == "pool"), form


# unremix: the fast factor, row ranges and column deltas against the plain forms


def unremix_contrast(form, dtype=torch.float64, *, n=9, d=5, k=30, seed=40, hidden=False):
    """A contrast set of each layout unremix scores: in-batch (with and without duplicate ids),
    a pool (with and without excluded entries), and a general one whose row 0 has a single
    negative (a constant U row) and whose column 3 is nobody's negative."""
    from hardneg.contrast import build_contrast, in_batch_contrast, pool_contrast

    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    z2 = (z1 + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    pool = torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype)
    h = torch.randn(2 * n + k, 7, generator=g, dtype=torch.float64).to(dtype)
    t = 0.3
    if form == "in_batch":
        c = in_batch_contrast([z1, z2], temperature=t)
    elif form == "ids":
        c = in_batch_contrast([z1, z2], temperature=t, ids=torch.arange(n) % (n - 3))
    elif form in ("pool", "pool_exclude"):
        own = torch.randperm(k, generator=g)[:n] if form == "pool_exclude" else None
        c = pool_contrast(z1, z2, pool, temperature=t, exclude_index=own)
    else:  # "masked": per-anchor negatives from a mask
        keep = torch.rand(n, k, generator=g) > 0.3
        keep[0] = False
        keep[0, 5] = True
        keep[:, 3] = False
        c = build_contrast(z1, pool, temperature=t, positives=z2, negative_mask=keep)
    if hidden:
        c.anchor_features = h[: c.anchors.shape[0]]
        c.column_features = (
            c.anchor_features if c.columns is c.anchors else h[2 * n : 2 * n + c.columns.shape[0]]
        )
    return c


UNREMIX_FORMS = ["in_batch", "ids", "pool", "pool_exclude", "masked"]


def assert_same_row_weights(fast, plain, mask):
    """Equal up to a positive constant per row on the negatives: the tilted mass's weights
    ``f_ij / sum_k f_ik`` agree (float64, 1e-10)."""
    wf = fast.masked_fill(~mask, 0.0)
    wp = plain.masked_fill(~mask, 0.0)
    sf, sp = wf.sum(dim=1, keepdim=True), wp.sum(dim=1, keepdim=True)
    assert bool(torch.isfinite(fast).all())
    assert bool((wf[mask] > 0).all())
    torch.testing.assert_close(wf / sf, wp / sp, rtol=1e-10, atol=1e-12)


def strategy_factor(c, strategy):
    """``fastpaths.unremix_factor`` with ``strategy``'s hyper-parameters, as UnReMix calls it."""
    return strategy.fast_mix(c, fastpaths.row_exponentials(c.negative_logits))


@pytest.mark.parametrize("form", UNREMIX_FORMS)
@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"influence": "gradient_norm", "representativeness": "density"},
        {"lambda_u": 0.0},
        {"lambda_d": 0.0, "eps": 0.01},
        {"lambda_u": 2.0, "lambda_d": 0.3, "representativeness": "density"},
        {"hidden": True},
        {"hidden": True, "influence": "gradient_norm"},
        {"unnormalised": True},
        {"beta": 0.0},  # zero_absent: exactly 0 off the negatives
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_unremix_factor_equals_the_plain_mix_up_to_a_row_constant(form, hp):
    from hardneg.strategies import unremix

    hp = dict(hp)
    c = unremix_contrast(form, hidden=hp.pop("hidden", False))
    if hp.pop("unnormalised", False):
        c.normalized = False  # the logits are then not read as cosines: own product
    strategy = unremix.UnReMixNegatives(**hp)
    mask = c.mask()
    plain = strategy.mix(c)
    fast = strategy_factor(c, strategy)
    assert fast.dtype == plain.dtype and fast.shape == plain.shape
    assert_same_row_weights(fast, plain, mask)
    if strategy.beta == 0:
        assert bool((fast[~mask] == 0).all())


@pytest.mark.parametrize("form", UNREMIX_FORMS)
def test_unremix_anchor_deltas_equal_the_plain_gradients(form):
    from hardneg.strategies.unremix import anchor_gradients

    c = unremix_contrast(form)
    got = fastpaths.anchor_deltas(c, fastpaths.row_exponentials(c.negative_logits))
    torch.testing.assert_close(got, anchor_gradients(c), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["pool", "pool_exclude", "masked"])
def test_unremix_column_deltas_equal_the_column_softmax_form(form):
    from hardneg.strategies.unremix import column_gradients

    c = unremix_contrast(form)
    got = fastpaths.unremix_column_deltas(c, fastpaths.row_exponentials(c.negative_logits))
    assert got is not None
    # column 3 of "masked" is nobody's negative: p~ = 0, delta = -z / t as in the plain form
    torch.testing.assert_close(got, column_gradients(c), rtol=1e-10, atol=1e-12)


def test_unremix_column_deltas_hand_back_when_a_column_mass_would_underflow():
    """A column whose best anchor is far below the best row maximum: e^{c - M} underflows in
    float32 while the column softmax resolves it; the fast form declines (the caller then takes
    the plain one) and the loss still equals the plain loss."""
    from hardneg.strategies.unremix import column_gradients

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = q.clone()
    pool = torch.tensor([[1.0, 0.0], [-1.0, -1.0], [0.5, 0.5]])
    from hardneg.contrast import pool_contrast

    # column 1: its best logit is -70.7 against M = 100, e^{-170.7} underflows in float32
    c = pool_contrast(q, k, pool, temperature=0.01)
    assert fastpaths.unremix_column_deltas(c, fastpaths.row_exponentials(c.negative_logits)) is None
    c64 = pool_contrast(q.double(), k.double(), pool.double(), temperature=0.01)
    got = fastpaths.unremix_column_deltas(c64, fastpaths.row_exponentials(c64.negative_logits))
    torch.testing.assert_close(got, column_gradients(c64), rtol=1e-10, atol=1e-12)
    hp = {"temperature": 0.01}
    compare_fast_plain("unremix", hp, q.requires_grad_(), k.requires_grad_(), {"negatives": pool})


@pytest.mark.parametrize("form", [*UNREMIX_FORMS, "ids_large"])
@pytest.mark.parametrize("ties", [False, True])
def test_unremix_vector_row_range_equals_the_masked_min_and_max(form, ties):
    # ids_large: per-anchor counts (36 or 38 of 40) take the look-up, not the masked reduction
    c = unremix_contrast("ids", n=20) if form == "ids_large" else unremix_contrast(form)
    g = torch.Generator().manual_seed(41)
    v = torch.randn(c.columns.shape[0], generator=g, dtype=torch.float64)
    if ties:
        v = v.round()  # a handful of distinct values, each on many columns
    mask = c.mask()
    lo, hi = fastpaths._vector_row_range(v, c)
    row = v.expand_as(mask)
    has = mask.any(dim=1)
    assert torch.equal(lo[has], torch.where(mask, row, math.inf).amin(dim=1)[has])
    assert torch.equal(hi[has], torch.where(mask, row, -math.inf).amax(dim=1)[has])


def test_unremix_vector_row_range_takes_the_first_negative_in_order():
    """Every row has M = 2 of C = 4 columns: the 3 smallest (largest) values hold a negative of
    each row, and the row's minimum (maximum) is the first negative among them in order."""
    from hardneg.contrast import build_contrast

    keep = torch.tensor([[True, True, False, False], [False, False, True, True]])
    x = torch.eye(4, dtype=torch.float64)[:2]
    c = build_contrast(x, torch.eye(4, dtype=torch.float64), temperature=1.0, positives=x)
    c.negative_mask, c.num_negatives = keep, 2
    v = torch.tensor([3.0, 1.0, 4.0, 2.0], dtype=torch.float64)
    lo, hi = fastpaths._vector_row_range(v, c)
    assert lo.tolist() == [1.0, 2.0] and hi.tolist() == [3.0, 4.0]


def test_unremix_vector_row_range_checks_the_look_up_against_a_row_short_of_the_count():
    """C = 8 columns, a stated count of M = 7 negatives per row: the look-up reads the k = 2
    smallest and largest entries. Row 1's mask has fewer negatives than stated, none among
    those ends: that row (not only the set as a whole) must fall back to the masked reduction,
    not take the ends of columns it does not have. No anchors: empty ranges."""
    from types import SimpleNamespace

    v = torch.arange(8, dtype=torch.float64)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 0] = False  # row 0: 7 negatives, its ends among the look-up's
    keep[1] = False
    keep[1, 3:5] = True  # row 1: columns 3 and 4 only
    c = SimpleNamespace(negative_mask=keep, num_negatives=7)
    lo, hi = fastpaths._vector_row_range(v, c)
    row = v.expand_as(keep)
    assert lo.tolist() == torch.where(keep, row, math.inf).amin(dim=1).tolist() == [1.0, 3.0]
    assert hi.tolist() == torch.where(keep, row, -math.inf).amax(dim=1).tolist() == [7.0, 4.0]
    empty = SimpleNamespace(
        negative_mask=torch.zeros(0, 8, dtype=torch.bool),
        num_negatives=torch.zeros(0, dtype=torch.long),
    )
    lo, hi = fastpaths._vector_row_range(v, empty)
    assert lo.shape == hi.shape == (0,)


def test_row_exponentials_shift_by_the_row_maximum_unless_the_bound_keeps_exp_in_range():
    """``(m, e^{c - m})`` with ``m`` each row's maximum, or ``(None, e^c)`` when the bound is at
    most half the dtype's exponent range (float32 64, float64 640; none listed for the half
    precisions: always shifted). Rows 50 apart: a shared shift would underflow the low row."""
    g = torch.Generator().manual_seed(45)
    base = torch.randn(3, 6, generator=g, dtype=torch.float64)
    far = base + torch.tensor([[50.0], [0.0], [-50.0]], dtype=torch.float64)
    for dtype, half_range in ((torch.float32, 32.0), (torch.float64, 320.0)):
        x = far.to(dtype)
        for bound in (None, half_range * 1.01):
            m, e = fastpaths.row_exponentials(x, bound)
            expected_m = [max(float(v) for v in row) for row in x.double()]
            assert m is not None and m.shape == (3,) and m.tolist() == expected_m
            ref = (x.double() - torch.tensor(expected_m, dtype=torch.float64)[:, None]).exp()
            torch.testing.assert_close(e.double(), ref, rtol=1e-6, atol=0.0)
        m, e = fastpaths.row_exponentials(base.to(dtype), half_range)  # on the bound: no shift
        assert m is None
        torch.testing.assert_close(e.double(), base.to(dtype).double().exp(), rtol=1e-6, atol=0.0)
    for dtype in (torch.float16, torch.bfloat16):
        x = base.to(dtype)
        m, e = fastpaths.row_exponentials(x, 0.25)
        assert m is not None and m.tolist() == [max(float(v) for v in row) for row in x.double()]
        assert e.dtype == dtype and float(e.amax()) == 1.0
    m, _ = fastpaths.row_exponentials(far[:1].float())  # one anchor: still a [1] maximum
    assert m.shape == (1,)


def test_unremix_factor_with_a_row_whose_influence_is_positive_on_every_negative():
    """U is 0 off the negatives: a row whose U is positive on each of its negatives reads 0 as
    its minimum from the plain reduction; the factor must reduce that row again under the mask
    (not take the straight-line mix, which assumes lo < 0 < hi on masked rows). Hidden features
    make row 1's U = |cos(delta_1, delta_j)|."""
    from hardneg.contrast import build_contrast
    from hardneg.strategies import unremix

    g = torch.Generator().manual_seed(44)
    n, k, d = 6, 12, 5
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    keep = torch.rand(n, k, generator=g) > 0.3
    keep[:, :3] = True  # at least three negatives per row, so no row is constant
    keep[1, 7:] = False  # row 1: some columns are not its negatives
    c = build_contrast(
        q,
        torch.randn(k, d, generator=g, dtype=torch.float64),
        temperature=0.3,
        positives=q + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64),
        negative_mask=keep,
    )
    cos_d = torch.nn.functional.normalize(unremix.anchor_gradients(c), dim=1) @ (
        torch.nn.functional.normalize(unremix.column_gradients(c), dim=1).T
    )
    v = torch.randn(7, generator=g, dtype=torch.float64)
    c.anchor_features = torch.randn(n, 7, generator=g, dtype=torch.float64)
    c.anchor_features[1] = v
    c.column_features = cos_d[1].sign().unsqueeze(1) * v  # cos(h_1, h_j) = sign(cos_delta_1j)
    strategy = unremix.UnReMixNegatives()
    fast = fastpaths.unremix_factor(
        c,
        fastpaths.row_exponentials(c.negative_logits),
        lambda_u=1.0,
        lambda_d=1.0,
        eps=0.1,
        gradient_norm=False,
        density=False,
        zero_absent=False,
        plain_column_deltas=unremix.column_gradients,
    )
    assert_same_row_weights(fast, strategy.mix(c), c.mask())


@pytest.mark.parametrize(
    "hp",
    [{}, {"influence": "gradient_norm"}, {"lambda_u": 0.0}, {"beta": 0.0}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_unremix_factor_is_finite_on_a_row_without_negatives(hp):
    """A direct caller may pass a contrast set with a row that has no negatives (the loss never
    builds one). Its range is empty (``lo = +inf``, ``hi = -inf``): the factor must stay finite
    on that row (0 with ``zero_absent``), not ``(u - inf) * 0 = NaN``, and the other rows keep
    the plain mix's weights."""
    from hardneg.strategies import unremix

    c = unremix_contrast("masked")
    mask = c.mask().clone()
    mask[2] = False
    c.negative_mask = mask
    c.negative_logits = c.negative_logits.masked_fill(~mask, float("-inf"))
    c.num_negatives = mask.sum(dim=1)
    strategy = unremix.UnReMixNegatives(**hp)
    fast = strategy_factor(c, strategy)
    assert bool(torch.isfinite(fast).all())
    if strategy.beta == 0:
        assert bool((fast[2] == 0).all())
    others = torch.ones(fast.shape[0], dtype=torch.bool)
    others[2] = False
    assert_same_row_weights(fast[others], strategy.mix(c)[others], mask[others])


def test_unremix_zeroed_row_range_reduces_again_the_rows_a_zero_could_end():
    """U is 0 off the negatives: a row whose negatives are all positive (negative) would read 0
    as its minimum (maximum) from the plain reductions."""
    u = torch.tensor([[0.0, 0.5, 0.9, 0.0], [-0.2, 0.0, -0.7, 0.3], [0.0, -0.4, -0.6, 0.0]])
    mask = torch.tensor(
        [[False, True, True, False], [True, False, True, True], [False] + [True] * 3]
    )
    lo, hi = fastpaths._zeroed_row_range(u.clone(), mask)
    assert lo.tolist() == pytest.approx([0.5, -0.7, -0.6])
    assert hi.tolist() == pytest.approx([0.9, 0.3, 0.0])


@pytest.mark.parametrize("form", ["in_batch", "ids", "pool_exclude"])
def test_unremix_unnormalised_fast_equals_plain(form):
    """normalize=False: the logits are not cosines, so cos(h) is a product of its own. Equal in
    float64; in float32 the anchors' deltas are nearly 0 (p_i+ near 1 with raw dot products)
    and their directions ill-conditioned (measured: both forms about 1e-3 off float64), so the
    fast form must only be no less accurate than the plain one there."""
    hp = {"normalize": False}
    z1, z2, kwargs = make_inputs(form, torch.float64)
    compare_fast_plain("unremix", hp, z1, z2, kwargs)
    ref = hardneg.create_loss("unremix", check_inputs=False, fast=False, **hp)
    ref_loss, _ = loss_and_grads(ref, z1, z2, kwargs)
    a, b = (z.detach().float().requires_grad_() for z in (z1, z2))
    kw32 = {k: v.float() if v.is_floating_point() else v for k, v in kwargs.items()}
    errors = {}
    for fast in (True, False):
        loss_fn = hardneg.create_loss("unremix", check_inputs=False, fast=fast, **hp)
        loss, _ = loss_and_grads(loss_fn, a, b, kw32)
        errors[fast] = abs(float(loss.detach()) - float(ref_loss.detach()))
    assert errors[True] <= max(1e-5, 2 * errors[False]), errors


def test_unremix_fast_path_with_hidden_features_equals_plain():
    """h1 / h2 / negative_h given: cos(h) is a product of its own on the fast path too."""
    g = torch.Generator().manual_seed(42)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    h1, h2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    pool, pool_h = torch.randn(20, 5, generator=g), torch.randn(20, 6, generator=g)
    for dtype in (torch.float32, torch.float64):
        a = z1.to(dtype).requires_grad_()
        b = z2.to(dtype).requires_grad_()
        kw = {"h1": h1.to(dtype), "h2": h2.to(dtype)}
        compare_fast_plain("unremix", {}, a, b, kw)
        kw.update(negatives=pool.to(dtype), negative_h=pool_h.to(dtype))
        compare_fast_plain("unremix", {"influence": "gradient_norm"}, a, b, kw)
        compare_fast_plain("unremix", {}, a, b, kw)


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
            assert_same(f.negative_mask, fast_count > 0)
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
    # 6000 independent copies of the [2, 6] matrix in one call (every entry is drawn on its own)
    draws = fastpaths.kept_counts(
        log_keep.repeat(6000, 1), m.repeat(6000, 1), sample="bernoulli", generator=g
    ).view(6000, *m.shape)
    assert draws.dtype == dtype
    assert torch.equal(draws, draws.round()) and bool((draws >= 0).all() and (draws <= m).all())
    assert bool((draws[:, m == 0] == 0).all() and (draws[:, pi == 0] == 0).all())
    sure = pi == 1
    assert torch.equal(draws[:, sure], m[sure].to(dtype).expand(len(draws), -1))
    assert_binomial_law(draws, m, pi)
    # no multiplicity: one cell per column
    one = fastpaths.kept_counts(
        log_keep.repeat(4000, 1), None, sample="bernoulli", generator=g
    ).view(4000, *m.shape)
    assert one.dtype == dtype  # drawn from float32 probabilities, handed back in pi's dtype
    assert torch.equal(one, one.round()) and bool((one <= 1).all())
    se1 = (pi * (1 - pi) / len(one)).sqrt().clamp(min=1e-9)
    assert bool(((one.mean(0) - pi).abs() <= 5 * se1).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 6), (3, 0)], ids=["no-anchors", "no-columns"])
def test_kept_counts_of_an_empty_grid_are_empty_in_every_mode(dtype, shape):
    """No anchors or no columns: ``[A, C]`` counts in ``pi``'s dtype (nothing to draw), with and
    without a multiplicity, in both modes (a multiplicity's layer count reads its largest
    entry, which an empty matrix does not have)."""
    log_keep = torch.full(shape, -0.5, dtype=dtype)
    for multiplicity in (None, torch.full(shape, 3)):
        for sample in ("expected", "bernoulli"):
            counts = fastpaths.kept_counts(
                log_keep, multiplicity, sample=sample, generator=torch.Generator().manual_seed(0)
            )
            assert_same(counts, torch.zeros(shape, dtype=dtype), (sample, multiplicity))


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
def test_weighted_log_mass_of_rows_far_apart_shifts_each_row_by_its_own_maximum(dtype):
    """Raw logits need not share a range: rows kept around 0, around 1000 and around -1000 (one
    shift for every row would underflow the others' exponentials to a ``-inf`` mass). Against
    ``logsumexp(c + log w)``, values and gradients."""
    from hardneg.objectives import safe_logsumexp

    g = torch.Generator().manual_seed(6)
    c = torch.randn(3, 8, generator=g, dtype=torch.float64).to(dtype)
    c[1] += 1000.0
    c[2] -= 1000.0
    w = torch.randint(1, 4, (3, 8), generator=g).to(dtype)
    w[:, ::3] = 0.0
    leaf = c.clone().requires_grad_()
    fast = fastpaths.weighted_log_mass(leaf, w)
    plain_leaf = c.clone().requires_grad_()
    plain = safe_logsumexp(plain_leaf + w.log())
    assert bool(torch.isfinite(plain).all())
    assert_close_rel(fast, plain, what="value")
    up = torch.tensor([0.5, 1.0, 2.0], dtype=dtype)
    (gf,) = torch.autograd.grad(fast, leaf, up)
    (gp,) = torch.autograd.grad(plain, plain_leaf, up)
    # float32 logits of size ~1000 carry an ulp of 6e-5: both forms round e^{c - m} so
    assert_close_rel(gf, gp, rtol=1e-4 if dtype == torch.float32 else 1e-5, what="gradient")


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_log_mass_takes_weights_of_another_dtype_in_the_logits_dtype(dtype):
    """Integer cell counts (``int64``) or float32 weights of float64 logits: the mass and its
    gradient in the logits' dtype, equal to ``logsumexp(c + log w)`` of the weights cast to it."""
    from hardneg.objectives import safe_logsumexp

    g = torch.Generator().manual_seed(7)
    c = torch.randn(4, 9, generator=g, dtype=torch.float64).to(dtype)
    counts = torch.randint(0, 4, (4, 9), generator=g)
    counts[:, 0] = 1
    up = torch.linspace(0.5, 2.0, 4, dtype=dtype)
    for w in (counts, counts.float()):
        got_leaf, want_leaf = c.clone().requires_grad_(), c.clone().requires_grad_()
        got = fastpaths.weighted_log_mass(got_leaf, w)
        want = safe_logsumexp(want_leaf + w.to(dtype).log())
        assert got.dtype == dtype, w.dtype
        assert_close_rel(got, want, what=f"value, {w.dtype} weights")
        (g_got,) = torch.autograd.grad(got, got_leaf, up)
        (g_want,) = torch.autograd.grad(want, want_leaf, up)
        assert_close_rel(g_got, g_want, what=f"gradient, {w.dtype} weights")


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


def _mochi_contrast(form, dtype, normalize=True, *, seed=3):
    """A contrast set of each layout MoCHi's fast path reads: in-batch (the cosines from the
    logits), ids, a shared pool small enough for the Gram matrix, a large one (row-wise dots),
    retrieval and a pool per anchor (the anchors' own columns), one with empty rows."""
    from hardneg.losses.contrastive import ContrastInputs

    g = torch.Generator().manual_seed(seed)
    if form == "per_anchor_pool":
        z1, z2, _ = make_inputs("in_batch", dtype)
        kwargs = {"negatives": torch.randn(12, 9, 6, generator=g, dtype=dtype)}
    elif form == "big_pool":  # C^2 > 16 A S: row-wise dots
        z1, z2, kwargs = make_inputs("pool_exclude", dtype, k=300)
    else:
        z1, z2, kwargs = make_inputs("in_batch" if form == "empty_rows" else form, dtype)
    inputs = ContrastInputs(z1=z1, z2=z2, temperature=0.3, normalize=normalize, **kwargs)
    contrast = inputs.standard_contrast()
    if form == "empty_rows":  # anchors 0 and 5 keep no negative
        keep = torch.ones_like(contrast.negative_logits, dtype=torch.bool)
        keep[[0, 5]] = False
        contrast = contrast.restricted(keep)
    return z1, z2, contrast


@pytest.mark.parametrize("numpy", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("mixed", [7, 40], ids=["bag", "dense"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "raw"])
@pytest.mark.parametrize("block", [1, 1 << 18], ids=["rows-of-2", "one-block"])
@pytest.mark.parametrize("form", [*FORMS, "big_pool", "per_anchor_pool", "empty_rows"])
def test_mochi_mix_log_mass_equals_the_plain_logsumexp_of_the_mixes(
    form, block, normalize, mixed, numpy, monkeypatch
):
    """``mochi_mix_log_mass`` (by blocks of rows: here 2 rows a block, or one block) equals the
    plain path in float64: ``logsumexp`` over the mixes' logits of ``select`` with
    ``fast=False`` for the same seed (so the blocks' uniforms are the plain draw's), value and
    gradients to both views for per-anchor weights of the log-mass; ``-inf`` and a zero
    gradient on a row without negatives. 7 pair mixes (17 drawn columns a row: the backward's
    ``embedding_bag`` over shared columns) and 40 (83: more than a row's columns but the big
    pool's, the product ``W C``). ``torch``: the accelerators' branches on the CPU (the hardest
    set by ``torch.topk``, the masked in-batch pair cosines by torch's ``nonzero``)."""
    from hardneg.strategies.base import StepContext

    monkeypatch.setattr(fastpaths, "_MIX_BLOCK", block)
    if not numpy:
        monkeypatch.setattr(fastpaths, "numpy_partitions", lambda x: False)
    strategy = hardneg.registry.strategy_class("mochi")(
        num_hardest=5, num_mixed=mixed, num_query_mixed=3
    )
    z1, z2, contrast = _mochi_contrast(form, torch.float64, normalize)
    fast = fastpaths.mochi_mix_log_mass(
        strategy, contrast, StepContext(generator=torch.Generator().manual_seed(9))
    )
    plain_context = StepContext(generator=torch.Generator().manual_seed(9), fast=False)
    extra = strategy.select(contrast, plain_context).extra_negative_logits
    plain = torch.logsumexp(extra, dim=1)
    finite = torch.isfinite(plain)
    assert torch.equal(finite, torch.isfinite(fast))
    assert bool(finite.all()) == (form != "empty_rows")
    assert_close_rel(fast[finite], plain[finite], rtol=1e-12, what="value")
    up = torch.linspace(0.5, 2.0, fast.shape[0], dtype=torch.float64)
    gf = torch.autograd.grad(
        torch.where(finite, fast, 0.0).mul(up).sum(), (z1, z2), allow_unused=True, retain_graph=True
    )
    gp = torch.autograd.grad(
        torch.where(finite, plain, 0.0).mul(up).sum(), (z1, z2), allow_unused=True
    )
    assert gf[0] is not None
    for a, b in zip(gf, gp):
        assert (a is None) == (b is None)  # a pool's keys are no columns: no gradient
        if a is not None:
            assert bool(torch.isfinite(a).all())
            assert_close_rel(a, b, rtol=1e-12, what="gradient")


def test_mochi_loss_takes_the_block_path_with_infonce_only(monkeypatch):
    """The fast InfoNCE loss sums the mixes by :func:`fastpaths.mochi_mix_log_mass` (and counts
    them in ``M``: the debiased estimator agrees with the plain path); the Jensen-Shannon
    objective and diagnostics keep the dense logits."""
    calls = []
    original = fastpaths.mochi_mix_log_mass

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fastpaths, "mochi_mix_log_mass", spy)
    z1, z2, kwargs = make_inputs("pool", torch.float64)
    hp = {"num_hardest": 6, "num_mixed": 5, "num_query_mixed": 2, "tau_plus": 0.1}
    compare_fast_plain("mochi", hp, z1, z2, kwargs)
    assert len(calls) == 1
    jsd = hardneg.create_loss("mochi", objective="jsd", **hp)
    jsd(z1, z2, generator=torch.Generator().manual_seed(1), **kwargs)
    hardneg.create_loss("mochi", **hp)(z1, z2, return_diagnostics=True, **kwargs)
    assert len(calls) == 1


def test_scratch_views_are_disjoint_and_fresh_each_call():
    """``_scratch`` (MoCHi's block temporaries): views of the asked shapes and dtypes that share
    no byte, on the asked device; nothing is kept between calls (a later call's views do not
    overwrite an earlier call's tensors)."""
    specs = [((3, 5), torch.int64), ((7,), torch.float32), ((2, 2), torch.float64)]
    first = fastpaths._scratch(specs, "cpu")
    assert [(tuple(x.shape), x.dtype) for x in first] == [(s, d) for s, d in specs]
    for i, x in enumerate(first):
        x.fill_(i + 1)
    for i, x in enumerate(first):
        assert bool((x == i + 1).all())  # no other view wrote over it
    again = fastpaths._scratch(specs, "cpu")
    for x in again:
        x.fill_(-7)
    for i, x in enumerate(first):
        assert bool((x == i + 1).all())  # the second call's views are other memory
    assert fastpaths._scratch(specs, "meta")[0].device.type == "meta"


def test_mochi_uniforms_are_the_plain_uniforms_and_blocks_continue_the_stream():
    """``mochi_uniforms`` gives the plain ``_unit_uniforms`` bit for bit, and two calls for two
    blocks of rows (an even count each) give the numbers of one call for all rows."""
    from hardneg.strategies.mochi import _unit_uniforms

    one = _unit_uniforms((7, 10), torch.Generator().manual_seed(4), "cpu")
    assert torch.equal(
        fastpaths.mochi_uniforms((7, 10), torch.Generator().manual_seed(4), "cpu"), one
    )
    g = torch.Generator().manual_seed(4)
    parts = [fastpaths.mochi_uniforms((m, 10), g, "cpu") for m in (2, 4, 1)]
    assert torch.equal(torch.cat(parts), one)


@pytest.mark.parametrize("same", [True, False])
def test_mochi_row_members_list_each_rows_true_columns_in_order(same):
    g = torch.Generator().manual_seed(6)
    member = torch.rand(9, 40, generator=g) < 0.3
    if same:
        member = torch.zeros(9, 40, dtype=torch.bool)
        member[torch.arange(9).unsqueeze(1), torch.rand(9, 40, generator=g).argsort(1)[:, :7]] = (
            True
        )
    count = member.sum(dim=1, keepdim=True)
    got = fastpaths.row_members(member, count, 40, same)
    assert got.shape == ((9, 7) if same else (9, 40))
    assert got.dtype == torch.long  # indices that gather and index_put read
    for row in range(9):
        want = member[row].nonzero().flatten().tolist()
        assert got[row, : len(want)].tolist() == want
        assert bool((got[row, len(want) :] == 0).all())


# SimANS: uniforms from random words, the Gumbel-top-k draw by blocks


def test_simans_unit_uniforms_are_the_midpoints_of_2_to_the_23_cells_with_every_bit_random():
    """Each uniform is ``(2 j + 1) 2^-24`` with ``j`` an integer in ``[0, 2^23)`` (never 0 or
    1), and each of ``j``'s 23 bits is set in about half of the draws (a bit lost to the mask
    would be always 0 or always 1)."""
    g = torch.Generator().manual_seed(5)
    n = 1 << 16
    words = torch.empty(n // 2, dtype=torch.int64).random_(-(2**63), None, generator=g)
    u = fastpaths.unit_uniforms(words, n).double()
    assert u.dtype == torch.float64 and u.numel() == n
    j = (u * 2.0**24 - 1) / 2
    assert bool((j == j.round()).all()) and bool((j >= 0).all()) and bool((j < 2**23).all())
    bits = (j.long().unsqueeze(1) >> torch.arange(23)) & 1
    share = bits.double().mean(dim=0)
    assert bool(((share - 0.5).abs() < 5 * 0.5 / math.sqrt(n)).all()), share


def test_simans_draw_takes_real_columns_first_and_every_column_when_k_covers_the_row():
    """``a = 0`` (the uniform law) with masked columns: a row with at least ``k`` negatives
    draws only negatives, ``k`` distinct ones; a row with fewer draws all of them; ``k >= S``
    gives every column; float64 logits draw as float32 ones do (same generator, same keys up
    to rounding)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 9, generator=g)
    logits[:3, :4] = float("-inf")  # rows 0-2: 5 negatives
    centre = torch.zeros(6, 1)
    for a in (0.0, 0.7):
        drawn = fastpaths.simans_draw(logits, centre, a, 5, torch.Generator().manual_seed(0))
        assert drawn.shape == (6, 5)
        assert bool(torch.isfinite(logits.gather(1, drawn)).all())
        assert all(len(set(row)) == 5 for row in drawn.tolist())
        drawn = fastpaths.simans_draw(logits, centre, a, 7, torch.Generator().manual_seed(0))
        assert all(set(range(4, 9)) <= set(row) for row in drawn[:3].tolist())
    every = fastpaths.simans_draw(logits, centre, 0.7, 9, None)
    assert bool((every == torch.arange(9)).all())
    one = fastpaths.simans_draw(logits, centre, 0.7, 3, torch.Generator().manual_seed(1))
    two = fastpaths.simans_draw(
        logits.double(), centre.double(), 0.7, 3, torch.Generator().manual_seed(1)
    )
    assert one.sort(dim=1).values.tolist() == two.sort(dim=1).values.tolist()


@pytest.mark.parametrize(
    ("a", "k", "dtype"), [(0.8, 1, torch.float32), (0.8, 2, torch.float64), (0.0, 3, torch.float32)]
)
def test_simans_cpu_draw_follows_the_kernel_over_row_blocks(a, k, dtype):
    """The CPU draw (numpy stream, the ``k`` smallest keys a block of rows at a time: 12000 rows
    of 6 are two blocks): inclusion frequencies of each column against the exact probabilities
    of ``k`` sequential draws without replacement, ``p ∝ e^{-a (c - centre)^2}``; the masked
    column (``-inf``) is never drawn, every row draws ``k`` distinct columns, and rows of the two
    blocks agree only as often as independent draws do."""
    c = torch.tensor([0.3, -1.1, float("-inf"), 1.7, 0.9, -0.2], dtype=dtype)
    trials = 12000
    logits = c.expand(trials, -1).contiguous()
    centre = torch.full((trials, 1), 0.4, dtype=dtype)
    drawn = fastpaths.simans_draw(logits, centre, a, k, torch.Generator().manual_seed(3))
    assert drawn.shape == (trials, k)
    counts = torch.zeros(trials, 6, dtype=torch.float64).scatter_(1, drawn, 1.0)
    assert bool((counts.sum(dim=1) == k).all())
    negatives = [0, 1, 3, 4, 5]
    kernel = [math.exp(-a * (float(c[j]) - 0.4) ** 2) for j in negatives]
    expected = inclusion_probabilities([x / sum(kernel) for x in kernel], k)
    assert float(counts[:, 2].sum()) == 0.0
    for j, want in zip(negatives, expected):
        assert float(counts[:, j].mean()) == pytest.approx(want, abs=0.015)
    first, second = counts[:2000], counts[-2000:]  # one row block each
    same = float((first == second).all(dim=1).double().mean())
    if k == 1:  # two independent draws agree with probability sum_j p_j^2
        assert same == pytest.approx(sum(x * x for x in expected), abs=0.04)
    assert same < 0.9


def _simans_reference_keys(logits, centre, a: float, seed: int):
    """The keys of the CPU draw seeded by ``manual_seed(seed)``, by one pass of torch
    operations: the same two seed words, the whole ``PCG64`` stream at once, two uniforms per
    word, ``log(-log u) + a (c - centre)^2``."""
    import numpy as np

    rows, cols = logits.shape
    words = torch.empty(2, dtype=torch.int64).random_(
        -(2**63), None, generator=torch.Generator().manual_seed(seed)
    )
    stream = np.random.PCG64(np.random.SeedSequence([w % 2**64 for w in words.tolist()]))
    n = rows * cols
    bits = torch.from_numpy(stream.random_raw(-(-n // 2)).view(np.int64))
    keys = fastpaths.unit_uniforms(bits, n).view(rows, cols).to(logits.dtype)
    return keys.log().neg().log() + a * (logits - centre).square()


@pytest.mark.parametrize("a", [0.0, 0.6])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [21, 1 << 16], ids=["blocks-of-4-rows", "one-block"])
def test_simans_cpu_draw_by_numpy_blocks_equals_the_keys_of_one_torch_pass(
    a, dtype, block, monkeypatch
):
    """The CPU draw (numpy, a block of an even number of rows at a time) takes the columns that
    one pass of torch operations takes on the same random words (the seed's ``PCG64`` stream,
    two uniforms per word, read in order across the blocks): 13 rows of 7 columns (odd) in
    blocks of 4 rows or one block, masked columns and a row with fewer negatives than ``k``."""

    monkeypatch.setattr(fastpaths, "_SIMANS_BLOCK", block)
    g = torch.Generator().manual_seed(11)
    rows, cols, k = 13, 7, 3
    logits = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * 2).to(dtype)
    logits[:, 5] = float("-inf")
    logits[4, 1:] = float("-inf")  # one negative only
    centre = torch.randn(rows, 1, generator=g, dtype=torch.float64).to(dtype)
    got = fastpaths.simans_draw(logits, centre, a, k, torch.Generator().manual_seed(2))
    keys = _simans_reference_keys(logits, centre, a, seed=2)
    keys = keys.masked_fill(~torch.isfinite(logits), float("inf"))
    want = keys.topk(k, dim=1, largest=False).indices
    assert got.shape == (rows, k)
    full = [r for r in range(rows) if r != 4]  # row 4: which masked columns fill it is a tie
    assert got[full].sort(dim=1).values.tolist() == want[full].sort(dim=1).values.tolist()
    assert 0 in got[4].tolist() and len(set(got[4].tolist())) == k  # its one negative drawn


@pytest.mark.parametrize("dtype", DTYPES)
def test_simans_cpu_draw_of_wide_rows_takes_the_sample_and_the_keys_topk_members(
    dtype, monkeypatch
):
    """Rows of at least ``_BAND_SAMPLE_MIN_COLUMNS`` with ``k`` in their first quarter: the
    ``k`` smallest keys come from a sample's candidates of the negated keys (checked taken on
    every block), and they are the members of one torch pass's ``topk(largest=False)`` on the
    same random words: masked columns included; a block with a NaN logit takes the whole-row
    path (NaN keys last, as ``topk``)."""

    calls = _count_sampled(monkeypatch)
    g = torch.Generator().manual_seed(21)
    rows, cols = 40, 1100
    logits = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * 2).to(dtype)
    logits[:, 17] = float("-inf")
    centre = torch.randn(rows, 1, generator=g, dtype=torch.float64).to(dtype)
    for k, nan in ((1, False), (30, False), (64, False), (64, True)):
        x = logits.clone()
        if nan:
            x[3, 40] = float("nan")
        calls.clear()
        got = fastpaths.simans_draw(x, centre, 0.6, k, torch.Generator().manual_seed(4))
        keys = _simans_reference_keys(x, centre, 0.6, seed=4)
        want = keys.topk(k, dim=1, largest=False).indices.sort(dim=1).values
        assert torch.equal(got.sort(dim=1).values, want), (k, nan)
        assert got.dtype == torch.int64 and 17 not in got.flatten().tolist()
        assert calls == ([] if nan else [True] * len(calls)) and (nan or calls), (k, calls)


def test_simans_cpu_draw_is_the_same_on_any_number_of_threads():
    """A seed gives the same columns with 1 or 4 torch threads, and other columns with another
    seed."""
    g = torch.Generator().manual_seed(8)
    logits, centre = torch.randn(41, 50, generator=g), torch.randn(41, 1, generator=g)
    previous = torch.get_num_threads()
    draws = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            gen = torch.Generator().manual_seed(5)
            draws.append(fastpaths.simans_draw(logits, centre, 0.6, 7, gen).sort(dim=1).values)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(draws[0], draws[1])
    other = fastpaths.simans_draw(logits, centre, 0.6, 7, torch.Generator().manual_seed(6))
    assert not torch.equal(other.sort(dim=1).values, draws[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_simans_smallest_takes_the_k_smallest_with_ties_and_nan_like_topk(dtype):
    """``_np_smallest``: the ``k`` smallest of each row, as ``torch.topk(largest=False)``: by
    the edge value when it is unique; by ``argpartition`` when the edge value repeats, a row
    holds a NaN among its ``k`` smallest (either sign: the integer keys put a NaN with its
    sign bit set lowest), ``-0.0`` and ``+0.0`` meet at the edge or ``+inf`` is reached (rows
    with fewer finite keys); with and without a scratch buffer for the keys."""
    import numpy as np

    g = torch.Generator().manual_seed(4)
    keys = torch.randn(9, 40, generator=g, dtype=torch.float64).to(dtype)
    keys[1, :5] = keys[1, 5]  # the edge value repeated
    keys[2, 3] = float("nan")
    keys[3, 10:] = float("inf")  # 10 finite keys, k = 12
    keys[4] = torch.arange(40.0).flip(0)
    keys[5, 7] = -float("nan")  # sign bit set
    assert bool(keys[5, 7].view(torch.int32 if dtype == torch.float32 else torch.int64) < 0)
    keys[6] = keys[6].abs() + 1.0
    keys[6, :20:2], keys[6, 1:20:2] = 0.0, -0.0  # 20 zeros below the rest, of both signs
    scratch = np.empty((9, 40), dtype=np.int32 if dtype == torch.float32 else np.int64)
    for k, buffer in ((1, None), (6, scratch), (12, None), (20, scratch), (39, scratch)):
        got = torch.from_numpy(fastpaths._np_smallest(keys.numpy(), k, buffer))
        assert got.shape == (9, k)
        assert all(len(set(row)) == k for row in got.tolist())
        want = keys.topk(k, dim=1, largest=False).values.sort(dim=1).values
        values = keys.gather(1, got).sort(dim=1).values
        assert torch.equal(values.nan_to_num(nan=99.0), want.nan_to_num(nan=99.0)), k
    distinct = torch.randn(5, 40, generator=g, dtype=torch.float64).to(dtype).numpy()
    got = fastpaths._np_smallest(distinct, 6)
    assert bool((np.diff(got, axis=1) > 0).all())  # the edge-value path: column order


@pytest.mark.parametrize(("rows", "cols"), [(7, 300), (64, 512), (3, 4096), (1, 64)])
def test_flat_members_equals_flatnonzero_at_every_density(rows, cols):
    """``_flat_members``: the mask written into a buffer padded with ``True`` entries where the
    expected density is 3-10 % (numpy's branchless nonzero), those entries cut off the result:
    ``numpy.flatnonzero`` of the mask, whatever the density and whether or not the expected
    count is the actual one."""
    import numpy as np

    rng = np.random.default_rng(rows * cols)
    n = rows * cols
    for density in (0.0, 0.01, 0.029, 0.03, 0.05, 0.09, 0.1, 0.101, 0.2, 1.0):
        mask = rng.random((rows, cols)) < density
        for count in (int(density * n), int(density * n * 0.7), int(density * n * 1.4) + 3):
            shapes = []

            def write(out, mask=mask, shapes=shapes):
                shapes.append(out.shape)
                out[...] = mask

            got = fastpaths._flat_members(write, rows, cols, count)
            assert shapes == [(rows, cols)]
            assert np.array_equal(got, np.flatnonzero(mask)), (density, count)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", [*FORMS, "ties"])
@pytest.mark.parametrize("n_hardest", [1, 4, 100])
def test_mochi_hardest_set_fast_equals_plain_in_column_order(dtype, form, n_hardest):
    """``HardNegativeMixing.hardest`` with ``fast=True`` (``kth_largest`` by numpy, compaction
    by ``nonzero``) gives the plain entries: per row, the first ``count = min(N, M)`` columns,
    in increasing order, are the ``N`` hardest negatives (on a tie at the threshold, the first
    ones in column order)."""
    from hardneg.losses.contrastive import ContrastInputs

    if form == "ties":  # every pool row three times: each logit tied with two others
        z1, z2, kwargs = make_inputs("pool", dtype)
        kwargs["negatives"] = torch.cat([kwargs["negatives"]] * 3)
    else:
        z1, z2, kwargs = make_inputs(form, dtype)
    contrast = ContrastInputs(z1=z1, z2=z2, temperature=0.3, **kwargs).standard_contrast()
    strategy = hardneg.registry.strategy_class("mochi")(num_hardest=n_hardest)
    fast_index, fast_count = strategy.hardest(contrast, fast=True)
    plain_index, plain_count = strategy.hardest(contrast, fast=False)
    assert fast_count.tolist() == plain_count.tolist()
    assert fast_index.dtype == plain_index.dtype == torch.long  # (tolist ignores the dtype)
    assert fast_count.dtype == plain_count.dtype
    logits = contrast.negative_logits.detach()
    for row, m in enumerate(plain_count.flatten().tolist()):
        members = plain_index[row, :m]
        assert fast_index[row, :m].tolist() == members.tolist()
        assert members.tolist() == sorted(set(members.tolist()))
        finite = logits[row][torch.isfinite(logits[row])]
        assert m == min(n_hardest, finite.numel())
        expected = finite.sort(descending=True).values[:m]
        assert logits[row, members].sort(descending=True).values.tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("block", "threads"),
    [(600, 1), (1 << 16, 1), (600, 2)],
    ids=["blocks-of-2-rows", "one-block", "two-threads"],
)
def test_mochi_hardest_columns_are_the_plain_hardest_set_or_none_on_a_tie(
    dtype, block, threads, monkeypatch
):
    """``hardest_columns`` (numpy, a block of rows at a time, on one or two threads) gives the
    plain hardest set's columns in column order, rows with masked columns included, for ``k`` of
    1, a few and all but one; None when a row holds a tie at the ``k``-th largest logit or a NaN
    (the caller then takes the general path)."""
    monkeypatch.setattr(fastpaths, "_HARDEST_BLOCK", block)
    monkeypatch.setattr(fastpaths, "_THREAD_MIN_ENTRIES", 1200)  # 4 rows a thread
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_hardest_columns(dtype)
    finally:
        torch.set_num_threads(previous)


def _check_hardest_columns(dtype):
    from hardneg.contrast import ContrastSet

    g = torch.Generator().manual_seed(12)
    rows, cols = 9, 300
    logits = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    logits[:, 7] = float("-inf")
    logits[torch.arange(rows), torch.arange(rows)] = float("-inf")
    for k in (1, 50, cols - 2):
        got = fastpaths.hardest_columns(logits, k)
        strategy = hardneg.registry.strategy_class("mochi")(num_hardest=k)
        contrast = ContrastSet(
            anchors=torch.zeros(rows, 2, dtype=dtype),
            columns=torch.zeros(cols, 2, dtype=dtype),
            anchor_columns=None,
            positives=torch.zeros(rows, 1, 2, dtype=dtype),
            positive_logits=torch.zeros(rows, 1, dtype=dtype),
            positive_weight=torch.ones(rows, 1, dtype=dtype),
            positive_index=None,
            negative_logits=logits,
            negative_mask=torch.isfinite(logits),
            num_negatives=cols - 2,
            temperature=0.5,
        )
        want, count = strategy.hardest(contrast, fast=False)
        assert got.shape == (rows, k) and count.flatten().tolist() == [k] * rows
        assert_same(got, want)
    tied = logits.clone()
    tied[3, 10] = tied[3, 11] = tied[3].max() + 1.0  # the two largest tie: k = 1 has two
    assert fastpaths.hardest_columns(tied, 1) is None
    assert fastpaths.hardest_columns(tied, 2) is not None
    nan = logits.clone()
    nan[5, 20] = float("nan")
    assert fastpaths.hardest_columns(nan, 50) is None
    nan[5, 20] = -float("nan")  # sign bit set: the integer keys rank it last, not first
    assert torch.signbit(nan[5, 20])
    assert fastpaths.hardest_columns(nan, 50) is None
    both = tied.clone()  # row 3 one long, row 5 (a NaN) one short: r * k in all
    both[5, 20] = float("nan")
    assert fastpaths.hardest_columns(both, 1) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [7, 1100, 2100])
def test_mochi_pair_gram_equals_the_full_gram_matrix_at_the_pairs(dtype, c):
    """``pair_gram`` (the upper triangle by blocks of rows: 1, 2 and 4 blocks here) equals the
    full Gram matrix looked up at the pairs, ``i < j``, ``i > j`` and ``i = j`` alike."""
    g = torch.Generator().manual_seed(4)
    columns = torch.randn(c, 6, generator=g, dtype=torch.float64).to(dtype)
    first = torch.randint(0, c, (9, 300), generator=g)
    second = torch.randint(0, c, (9, 300), generator=g)
    second[:, :10] = first[:, :10]
    got = fastpaths.pair_gram(columns, first, second)
    want = (columns @ columns.T)[first, second]
    assert got.shape == first.shape
    assert_close_rel(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, what="gram")


def test_mochi_pair_dots_over_several_blocks_equal_a_float64_loop(monkeypatch):
    """``_pair_dots`` (the row-wise dots of the pairs a pool too large for its Gram matrix
    takes) a block of pairs at a time: with 2 pairs a block (``_PAIR_DOTS_BLOCK = 8``,
    ``d = 4``) the 15 pairs take 8 blocks, the last one short; every pair is set."""
    monkeypatch.setattr(fastpaths, "_PAIR_DOTS_BLOCK", 8)
    g = torch.Generator().manual_seed(46)
    columns = torch.randn(7, 4, generator=g, dtype=torch.float64)
    first = torch.randint(0, 7, (3, 5), generator=g)
    second = torch.randint(0, 7, (3, 5), generator=g)
    got = fastpaths._pair_dots(columns, first, second)
    rows = columns.tolist()
    want = [
        [sum(x * y for x, y in zip(rows[i], rows[j])) for i, j in zip(fi, se)]
        for fi, se in zip(first.tolist(), second.tolist())
    ]
    assert got.shape == first.shape
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


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


def test_byte_stream_pieces_are_the_bytes_of_one_call():
    """``_ByteStream.take`` in pieces of any size (aligned to the 8-byte words or not, smaller
    than the bytes a word leaves over, larger than the first buffer) gives the bytes of one
    ``random_bytes`` call over their total, and leaves the generator where that call does."""
    sizes = [5, 1, 8, 13, 0, 3, 4000, 7, 250, 16]
    one = torch.Generator().manual_seed(3)
    whole = fastpaths.random_bytes((sum(sizes),), one, "cpu")
    two = torch.Generator().manual_seed(3)
    stream = fastpaths._ByteStream(two, "cpu", 16)
    pieces = [stream.take(size).clone() for size in sizes]
    assert [x.numel() for x in pieces] == sizes
    assert torch.equal(torch.cat(pieces), whole)
    assert torch.equal(torch.rand(4, generator=one), torch.rand(4, generator=two))


def whole_array_bernoulli(need, p256_at, generator):
    """The whole-array form of ``bernoulli_draws`` (every byte at once, then a uniform per tie
    in flat order): the chunked form must give the same draws."""
    v = fastpaths.random_bytes(tuple(need.shape), generator, "cpu")
    kept = (v < need).to(torch.uint8)
    at = (v == need).reshape(-1).nonzero().squeeze(1)
    if at.numel():
        u = torch.rand(at.shape, generator=generator)
        keep = u < p256_at(at) - need.reshape(-1)[at].double()
        kept.view(-1)[at] = keep.to(torch.uint8)
    return kept


def whole_array_binomial(need_by_column, trials, p256_at, generator):
    """The whole-array form of ``binomial_draws``: the rows of bytes of the columns in the
    stable ascending order of ``trials``, compared at once, summed per column, a uniform per
    tie in flat order."""
    c, a = need_by_column.shape
    order = torch.argsort(trials, stable=True)
    key = order.repeat_interleave(trials[order])
    need = need_by_column[key]
    v = fastpaths.random_bytes(tuple(need.shape), generator, "cpu")
    counts = torch.zeros(c, a, dtype=torch.int64)
    counts.index_add_(0, key, (v < need).long())
    at = (v == need).reshape(-1).nonzero().squeeze(1)
    if at.numel():
        column, anchor = key[at // a], at % a
        u = torch.rand(at.shape, generator=generator)
        keep = u < p256_at(column, anchor) - need_by_column[column, anchor].double()
        counts.view(-1).index_add_(0, column * a + anchor, keep.long())
    return counts


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("numpy_form", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("chunk", [64, 1 << 20], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize(("c", "a"), [(40, 37), (9, 64), (1, 3)])
def test_chunked_byte_draws_equal_the_whole_array_draws(monkeypatch, chunk, c, a, numpy_form):
    """``bernoulli_draws`` and ``binomial_draws`` (bytes drawn, compared, summed and scanned for
    ties chunk by chunk; 64-byte chunks split groups and rows off the 8-byte words) give the
    draws of the whole-array form for the same seed, ties (p just above a byte edge) and 0,
    1, many and more than 255 trials included; ``out`` and ``dtype`` only change the type. The
    CPU's numpy form and the torch form (``_CPU_NUMPY`` off) alike, without warnings (no
    ``out=`` of the wrong shape, resized by torch)."""
    monkeypatch.setattr(fastpaths, "_CHUNK", chunk)
    monkeypatch.setattr(fastpaths, "_CPU_NUMPY", numpy_form)
    g = torch.Generator().manual_seed(c + a)
    p = torch.rand(c, a, generator=g, dtype=torch.float64)
    p[:, ::3] = (torch.randint(0, 256, (c, len(range(0, a, 3))), generator=g) + 0.3) / 256
    need = (p * 256).floor().clamp(max=255).to(torch.uint8)
    trials = torch.randint(0, 7, (c,), generator=g)
    trials[0] = 0
    if c > 5:
        trials[3], trials[5] = 1, 300  # past 255: int32 sums

    def p256_at(column, anchor):
        return p[column, anchor] * 256

    def flat_p256(at):
        return p.reshape(-1)[at] * 256

    got = fastpaths.binomial_draws(need, trials, p256_at, torch.Generator().manual_seed(1))
    want = whole_array_binomial(need, trials, p256_at, torch.Generator().manual_seed(1))
    assert torch.equal(got.long(), want)
    assert got.dtype == (torch.int32 if int(trials.max()) > 255 else torch.uint8)
    got = fastpaths.bernoulli_draws(need, flat_p256, torch.Generator().manual_seed(2))
    want = whole_array_bernoulli(need, flat_p256, torch.Generator().manual_seed(2))
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    out = torch.empty(c, a, dtype=torch.float64)
    got = fastpaths.bernoulli_draws(need, flat_p256, torch.Generator().manual_seed(2), out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, want.double())
    got = fastpaths.bernoulli_draws(
        need, flat_p256, torch.Generator().manual_seed(2), dtype=torch.float32
    )
    assert got.dtype == torch.float32 and torch.equal(got, want.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        {"bound": 2.5},
        {"scratch": True},
        {"exp_out": True},
        {"scratch": True, "exp_out": True},
        {"bound": 2.5, "scratch": True, "exp_out": True},
    ],
    ids=["bound", "scratch", "exp_out", "scratch-exp_out", "all"],
)
def test_block_log_masses_options_change_no_value(dtype, options):
    """``bound`` (no row maximum), ``scratch`` (the products written over the weights) and
    ``exp_out`` (the exponentials in the caller's buffer, shifted by the row maximum without a
    bound) give the default form's values and gradients; with ``scratch`` the weights hold the products ``w e^c`` (shifted by the row
    maximum without a bound) afterwards."""
    g = torch.Generator().manual_seed(8)
    n = 6
    c = (torch.rand(2 * n, 2 * n, generator=g, dtype=torch.float64) * 5 - 2.5).to(dtype)
    c[torch.arange(2 * n), torch.arange(2 * n)] = float("-inf")
    w_all = torch.randint(0, 3, (2 * n, 2 * n), generator=g).to(dtype)
    w_all[torch.arange(2 * n), torch.arange(2 * n)] = 0.0
    w1 = torch.rand(n, n, generator=g, dtype=torch.float64).to(dtype)
    w1[1] = 0.0  # nothing kept
    index = torch.stack([torch.randperm(n, generator=g)[:2] for _ in range(n)])
    blocks = [(0, n, n, 2 * n), (0, 2 * n, 0, 2 * n)]
    ups = torch.linspace(0.5, 2.0, 2 * n, dtype=dtype)

    def run(**kw):
        x = c.clone().requires_grad_(True)
        weights = [w1.clone(), w_all.clone()]
        if kw.pop("exp_out", False):
            kw["exp_out"] = torch.empty_like(c)
        outs = fastpaths.block_log_masses(x, blocks, weights, [(0, n, index)], **kw)
        total = sum(
            torch.where(torch.isfinite(o), o, 0.0)
            .mul(ups[: o.shape[0]].view(-1, *[1] * (o.dim() - 1)))
            .sum()
            for o in outs
        )
        (grad,) = torch.autograd.grad(total, x)
        return [o.detach() for o in outs], grad, weights

    plain, plain_grad, _ = run()
    fast, fast_grad, weights = run(**options)
    for f, p in zip(fast, plain):
        assert torch.equal(torch.isfinite(f), torch.isfinite(p))
        assert_close_rel(f[torch.isfinite(p)], p[torch.isfinite(p)], what="value")
    assert_close_rel(fast_grad, plain_grad, what="gradient")
    if options.get("scratch"):  # w e^c, or w e^{c - max_j c} without a bound
        shift = 0.0 if "bound" in options else c.amax(dim=1, keepdim=True)
        assert_close_rel(weights[1], w_all * (c - shift).exp(), what="products")
    else:
        assert torch.equal(weights[1], w_all)


def _record_block_weights(monkeypatch) -> list:
    """Spy on ``fastpaths.block_log_masses``: each call appends copies of the weights it is given
    (the drawn cells) to the returned list, then computes as usual."""
    seen = []
    real = fastpaths.block_log_masses
    monkeypatch.setattr(
        fastpaths,
        "block_log_masses",
        lambda c, b, w, r=(), **kw: seen.append([x.clone() for x in w]) or real(c, b, w, r, **kw),
    )
    return seen


def test_potential_in_batch_fused_draws_have_the_exact_binomial_law(monkeypatch):
    """The fused in-batch path's weights, read where its masses take them: per anchor and
    column of each mined direction ``Binomial(m, pi)``, with ``m`` the plain grid's cells of
    that column for that anchor and ``pi`` the plain keep probability, and ``L_aug``'s kept
    cells ``Bernoulli(pi)`` of its own kernel: means within 5 standard errors everywhere,
    the variance pooled over the cells within 10 %, 0 on the non-negatives."""
    from hardneg.losses.contrastive import ContrastInputs
    from hardneg.strategies.base import StepContext

    z1, z2, _ = make_inputs("in_batch", torch.float64, n=8, seed=4)
    loss_fn = hardneg.create_loss("potential", num_neighbors=3, a=3.0)
    inputs = ContrastInputs(z1=z1, z2=z2, temperature=loss_fn.temperature)
    strategy = loss_fn.strategy
    plain = [
        strategy.mined(inputs, z1, z2, None, fast=True),
        strategy.mined(inputs, z2, z1, None, fast=True),
    ]
    aug = strategy.augmentation(inputs)
    seen = _record_block_weights(monkeypatch)
    g = torch.Generator().manual_seed(5)
    context = StepContext(generator=g)
    draws = [[], [], []]
    for _ in range(500):
        seen.clear()
        fastpaths.potential_in_batch_terms(strategy, inputs, context)
        for i in range(3):  # the weights are laid out [column, anchor] (the Gram's symmetry)
            draws[i].append(seen[0][i].T.double())
    assert int(plain[0].multiplicity.max()) >= 3  # keys in several blocks
    cases = [
        (plain[0].multiplicity, plain[0].cell_log_keep.exp()),
        (plain[1].multiplicity, plain[1].cell_log_keep.exp()),
        (torch.isfinite(aug.cell_log_keep).double(), aug.cell_log_keep.exp()),
    ]
    for drawn, (m, pi) in zip(draws, cases):
        drawn = torch.stack(drawn)
        m = m * (pi > 0)
        assert torch.equal(drawn, drawn.round())
        assert bool((drawn >= 0).all() and (drawn <= m).all())
        mean, var = m * pi, m * pi * (1 - pi)
        se = (var / len(drawn)).sqrt().clamp(min=1e-9)
        assert bool(((drawn.mean(0) - mean).abs() <= 5 * se).all())
        loose = var > 0
        spread = ((drawn - mean) ** 2)[:, loose].mean() / var[loose].mean()
        assert abs(float(spread) - 1) < 0.1, float(spread)


@pytest.mark.parametrize("chunk", [64, 1 << 20], ids=["chunks", "one-chunk"])
def test_binomial_draws_read_each_columns_thresholds_from_its_row(monkeypatch, chunk):
    """``rows`` (column ``j``'s thresholds in row ``rows[j]`` of a larger, strided matrix, as
    potential's in-batch path reads both directions from one ``[4N, N]`` view) gives the draws
    of the gathered thresholds ``need[rows]`` for the same seed, ties included."""
    monkeypatch.setattr(fastpaths, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(8)
    p = torch.rand(12, 10, generator=g, dtype=torch.float64)
    p[::2] = (torch.randint(0, 256, (6, 10), generator=g) + 0.5) / 256
    need = fastpaths._to_bytes((p * 256).float())
    rows = torch.tensor([3, 0, 11, 7, 7, 2])
    trials = torch.tensor([2, 0, 5, 1, 3, 4])

    def p256_at(column, anchor):
        return p[rows[column], anchor] * 256

    def gathered_p256(column, anchor):
        return p[rows][column, anchor] * 256

    got = fastpaths.binomial_draws(
        need, trials, p256_at, torch.Generator().manual_seed(1), rows=rows
    )
    want = fastpaths.binomial_draws(
        need[rows], trials, gathered_p256, torch.Generator().manual_seed(1)
    )
    assert got.shape == (6, 10)
    assert_same(got, want)
    assert int(got[1].sum()) == 0 and bool((got <= trials.unsqueeze(1).to(got.dtype)).all())


@pytest.mark.parametrize("chunk", [64, 1 << 20], ids=["chunks", "one-chunk"])
def test_numpy_byte_draws_equal_the_torch_form(monkeypatch, chunk):
    """On the CPU ``bernoulli_draws`` and ``binomial_draws`` run in numpy (``_CPU_NUMPY``): the
    draws of the torch form for the same seed, ties (p just above a byte edge), 0, 1, many and
    more than 255 trials, ``rows``, a float ``out`` and chunks that split groups included."""
    monkeypatch.setattr(fastpaths, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(11)
    c, a = 40, 37
    p = torch.rand(c, a, generator=g, dtype=torch.float64)
    p[:, ::3] = (torch.randint(0, 256, (c, len(range(0, a, 3))), generator=g) + 0.3) / 256
    need = (p * 256).floor().clamp(max=255).to(torch.uint8)
    trials = torch.randint(0, 7, (c,), generator=g)
    trials[0], trials[3], trials[5] = 0, 1, 300
    rows = torch.randint(0, c, (c,), generator=g)

    def draws():
        out = torch.empty(c, a, dtype=torch.float32)
        return [
            fastpaths.binomial_draws(
                need,
                trials,
                lambda column, anchor: p[rows[column], anchor] * 256,
                torch.Generator().manual_seed(1),
                rows=rows,
            ),
            fastpaths.bernoulli_draws(
                need, lambda at: p.reshape(-1)[at] * 256, torch.Generator().manual_seed(2)
            ),
            fastpaths.bernoulli_draws(
                need, lambda at: p.reshape(-1)[at] * 256, torch.Generator().manual_seed(3), out=out
            ),
        ]

    fast = draws()
    monkeypatch.setattr(fastpaths, "_CPU_NUMPY", False)
    plain = draws()
    assert fast[0].dtype == torch.int32 and fast[1].dtype == torch.uint8
    for f, q in zip(fast, plain):
        assert f.dtype == q.dtype and torch.equal(f, q)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bounded_byte_cast_equals_the_int16_route(monkeypatch, dtype):
    """``_to_bytes(x, top)`` with ``top < 256`` (numpy's direct cast on the CPU) gives the bytes
    of the ``int16`` route: every integer edge, values just below and above them, 0 and the
    largest value below 256; small and blocked shapes."""
    edges = torch.arange(256, dtype=torch.float64)
    values = torch.cat([edges, (edges - 1e-4).clamp(min=0), edges + 1e-4, torch.tensor([255.999])])
    for x in (values.to(dtype), (torch.rand(300, 200, dtype=torch.float64) * 255.999).to(dtype)):
        got = fastpaths._to_bytes(x, 255.999)
        monkeypatch.setattr(fastpaths, "_CPU_NUMPY", False)
        want = fastpaths._to_bytes(x, 255.999)
        monkeypatch.setattr(fastpaths, "_CPU_NUMPY", True)
        assert got.dtype == torch.uint8 and torch.equal(got, want)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", DTYPES)
def test_bounded_byte_cast_of_a_nan_warns_nothing(dtype):
    """A NaN among the values (a NaN draw's threshold, undefined as in torch's cast) gives numpy's
    direct cast no ``RuntimeWarning``; the other bytes are the truncated values."""
    x = torch.tensor([1.5, float("nan"), 200.2, 0.0], dtype=dtype)
    got = fastpaths._to_bytes(x, 255.999)
    assert got.dtype == torch.uint8
    assert got[[0, 2, 3]].tolist() == [1, 200, 0]


@pytest.mark.parametrize("block", [None, 64], ids=["whole", "row-blocks"])
@pytest.mark.parametrize(
    "form",
    [
        {},
        {"select_on": "raw"},
        {"aug_weight": 0.0},
        {"clamp": 1.0, "a": 0.0},
        {"pool": True},
        {"pool": True, "aug_weight": 0.0},
    ],
    ids=["in-batch", "raw", "no-aug", "clamp-1", "pool", "pool-no-aug"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_potential_numpy_form_equals_the_torch_form(monkeypatch, form, block, dtype):
    """potential's fused paths with numpy on the CPU (``_CPU_NUMPY``: byte draws, tie look-ups,
    integer-weight products, byte casts) give the torch form's loss and gradients bit for bit
    for the same seed, draws included; ``_BLOCK`` small takes the row-block form (``L_aug``'s
    draws written into the kernel's buffer)."""
    if block is not None:
        monkeypatch.setattr(fastpaths, "_BLOCK", block)
    hp = {k: v for k, v in form.items() if k != "pool"}
    z1, z2, kwargs = make_inputs("pool" if form.get("pool") else "in_batch", dtype, n=24, d=5)
    loss_fn = hardneg.create_loss("potential", **{"num_neighbors": 3, "a": 3.0, **hp})

    def run():
        g = torch.Generator().manual_seed(5)
        return [
            (x, *torch.autograd.grad(x, (z1, z2)))
            for x in [loss_fn(z1, z2, generator=g, **kwargs) for _ in range(3)]
        ]

    fast = run()
    monkeypatch.setattr(fastpaths, "_CPU_NUMPY", False)
    plain = run()
    for f, q in zip(fast, plain):
        for a, b in zip(f, q):
            assert torch.equal(a, b)


@pytest.mark.parametrize("form", ["in_batch", "pool_exclude"])
def test_potential_fused_paths_make_their_dense_fields_only_when_read(form):
    """The fused paths' mined contrast sets hold ``negative_logits``, ``negative_mask`` and
    ``multiplicity`` (with a bank ``num_negatives`` too) as thunks: a loss step (forward and
    backward) reads none of them; read afterwards, they equal the eager fields of the plain
    fast form on the same columns."""
    z1, z2, kwargs = make_inputs(form, torch.float64, n=10)
    loss_fn = hardneg.create_loss("potential")
    seen, augs = [], []
    real = loss_fn.strategy.terms

    def spy(inputs, context):
        out = real(inputs, context)
        seen.extend(c for _, c, role in out if role == "mined")
        augs.extend(c for _, c, role in out if role == "aug")
        return out

    loss_fn.strategy.terms = spy
    loss_fn(z1, z2, generator=torch.Generator().manual_seed(0), **kwargs).backward()
    assert seen
    if form == "in_batch":  # L_aug's [2N, 2N] mask too, equal to in_batch_contrast's when read
        from hardneg.contrast import in_batch_contrast

        (aug,) = augs
        assert set(aug.__dict__["_lazy"]) == {"negative_mask"}
        want = in_batch_contrast((z1, z2), temperature=0.5, normalize=True).negative_mask
        assert torch.equal(aug.negative_mask, want)
    want = {"negative_logits", "negative_mask", "multiplicity"}
    if form != "in_batch":
        want.add("num_negatives")
    for mined in seen:
        assert set(mined.__dict__["_lazy"]) == want  # none was read
    from hardneg.losses.contrastive import ContrastInputs

    inputs = ContrastInputs(z1=z1, z2=z2, temperature=loss_fn.temperature, **kwargs)
    plain = loss_fn.strategy.mined(inputs, z1, z2, None, fast=True)
    # each anchor's negatives: the columns outside its own block (itself and its neighbours),
    # as the plain form counts them (the same in both in-batch directions)
    for mined in seen:
        count = torch.as_tensor(mined.num_negatives).expand(len(z1))
        assert torch.equal(count, plain.num_negatives)
    mined = seen[0]
    index = mined.column_index if mined.column_index is not None else slice(None)
    m = plain.multiplicity[:, index] * torch.isfinite(plain.cell_log_keep[:, index])
    assert_same(mined.multiplicity, m)
    assert_same(mined.negative_mask, m > 0)
    finite = m > 0
    assert_close_rel(mined.negative_logits[finite], plain.negative_logits[:, index][finite])
    assert bool(torch.isinf(mined.negative_logits[~finite]).all())


def _layer_case(seed=3):
    """Thresholds of ``[A, C]`` probabilities (ties: some just above a multiple of 1/256; one
    column of p = 1), trials in non-increasing order and a mask of first-layer skips."""
    g = torch.Generator().manual_seed(seed)
    a, c = 9, 7
    p = torch.rand(a, c, generator=g, dtype=torch.float64) * 0.8 + 0.1
    p[:, ::2] = (torch.randint(0, 256, (a, len(range(0, c, 2))), generator=g) + 0.4) / 256
    p[:, 1] = 1.0
    trials = torch.tensor([6, 5, 3, 3, 2, 1, 1])
    skip = torch.rand(a, c, generator=g) < 0.3
    p256 = (p * 256).float()  # what a kernel buffer holds (float32)
    need = fastpaths._to_bytes(p256)
    return p, p256, need, trials, skip


def test_layer_draws_have_the_binomial_law_with_the_first_layer_skipped():
    """``layer_draws``: per entry ``Binomial(trials_j - skip_ij, p_ij)`` (mean within 5 standard
    errors, variance pooled within 10 %), ``p = 1`` keeps every trial, never more than the trials;
    ``p`` 0.4/256 above a byte edge is kept through the ties."""
    p, p256, need, trials, skip = _layer_case()
    g = torch.Generator().manual_seed(11)

    def p256_at(r, c):
        return p256[r, c]

    draws = torch.stack(
        [
            fastpaths.layer_draws(need, trials, p256_at, g, skip_first=skip).double()
            for _ in range(4000)
        ]
    )
    m = (trials.unsqueeze(0) - skip.long()).double()
    assert bool((draws >= 0).all() and (draws <= m).all())
    assert torch.equal(draws[:, :, 1], m[:, 1].expand(len(draws), -1))  # p = 1
    mean, var = m * p, m * p * (1 - p)
    se = (var / len(draws)).sqrt().clamp(min=1e-9)
    assert bool(((draws.mean(0) - mean).abs() <= 5 * se).all())
    loose = var > 0
    spread = ((draws - mean) ** 2)[:, loose].mean() / var[loose].mean()
    assert abs(float(spread) - 1) < 0.1, float(spread)


def test_layer_draws_are_the_same_whatever_the_row_blocks(monkeypatch):
    """The bytes are taken layer by layer, row-major, however the rows are split into blocks
    (``_CHUNK`` bytes): a seed gives the same counts with 16-byte blocks as in one block."""
    _, p256, need, trials, skip = _layer_case(seed=5)

    def p256_at(r, c):
        return p256[r, c]

    one = fastpaths.layer_draws(
        need, trials, p256_at, torch.Generator().manual_seed(2), skip_first=skip
    )
    monkeypatch.setattr(fastpaths, "_CHUNK", 16)
    small = fastpaths.layer_draws(
        need, trials, p256_at, torch.Generator().manual_seed(2), skip_first=skip
    )
    assert torch.equal(one, small)
    assert one.dtype == torch.uint8


@pytest.mark.parametrize("chunk", [4, 16, 1 << 20], ids=["wide-rows", "blocks", "one-block"])
@pytest.mark.parametrize("many", [False, True], ids=["uint8", "int32"])
def test_numpy_layer_draws_equal_the_torch_form(monkeypatch, chunk, many):
    """On the CPU ``layer_draws`` runs in numpy (``_CPU_NUMPY``): the torch form's counts for
    the same seed, first-layer skips, ties, row blocks and more than 255 trials included;
    ``_CHUNK = 4`` under layers 5 to 7 columns wide: blocks of one row, wider than a chunk."""
    monkeypatch.setattr(fastpaths, "_CHUNK", chunk)
    _, p256, need, trials, skip = _layer_case(seed=7)
    if many:
        trials = trials.clone()
        trials[0] = 300

    def draws():
        return fastpaths.layer_draws(
            need, trials, lambda r, c: p256[r, c], torch.Generator().manual_seed(4), skip_first=skip
        )

    fast = draws()
    monkeypatch.setattr(fastpaths, "_CPU_NUMPY", False)
    plain = draws()
    assert fast.dtype == plain.dtype == (torch.int32 if many else torch.uint8)
    assert torch.equal(fast, plain)


def test_to_bytes_truncates_and_caps_at_255():
    """Thresholds ``floor(256 p)``, 255 for ``256 p`` in [255, 256] (the tie then carries the
    rest), as ``uint8``, in one call and by row blocks."""
    x = torch.tensor([[0.0, 0.99, 1.0, 254.9, 255.0, 255.7, 256.0]])
    want = torch.tensor([[0, 0, 1, 254, 255, 255, 255]], dtype=torch.uint8)
    got = fastpaths._to_bytes(x)
    assert got.dtype == torch.uint8 and torch.equal(got, want)  # (equal ignores the dtype)
    big = x.repeat(fastpaths._BLOCK // 7 + 3, 1)
    got = fastpaths._to_bytes(big)
    assert got.dtype == torch.uint8 and torch.equal(got, want.repeat(big.shape[0], 1))


@pytest.mark.parametrize("clamp", [0.999, 1.0])
def test_potential_fused_draws_keep_with_the_clamped_probability(monkeypatch, clamp):
    """``a = 0``: every negative cell has ``pi = clamp`` (above 255/256): the in-batch fused
    weights keep a fraction ``clamp`` of the cells (0.999 is 5 standard errors from 255/256:
    the bytes alone would give 255/256), every cell with ``clamp = 1``."""
    from hardneg.losses.contrastive import ContrastInputs
    from hardneg.strategies.base import StepContext

    z1, z2, _ = make_inputs("in_batch", torch.float32, n=16, seed=2)
    loss_fn = hardneg.create_loss("potential", num_neighbors=2, a=0.0, clamp=clamp)
    inputs = ContrastInputs(z1=z1, z2=z2, temperature=loss_fn.temperature)
    strategy = loss_fn.strategy
    cells = []
    for q, k in ((z1, z2), (z2, z1)):  # the plain form's negative cells of each direction
        plain = strategy.mined(inputs, q, k, None, fast=True)
        cells.append((plain.multiplicity * torch.isfinite(plain.cell_log_keep)).sum())
    cells.append(torch.tensor(float(2 * 16 * (2 * 16 - 2))))
    seen = _record_block_weights(monkeypatch)
    context = StepContext(generator=torch.Generator().manual_seed(3))
    kept = torch.zeros(3, dtype=torch.float64)
    runs = 300
    for _ in range(runs):
        seen.clear()
        fastpaths.potential_in_batch_terms(strategy, inputs, context)
        kept += torch.stack([w.double().sum() for w in seen[0]])
    total = torch.stack(cells).double() * runs
    frac = kept / total
    if clamp == 1.0:
        assert torch.equal(kept, total)
    else:
        se = math.sqrt(clamp * (1 - clamp) / float(total.sum()))
        assert abs(float(kept.sum() / total.sum()) - clamp) <= 5 * se, frac
        assert float(kept.sum() / total.sum()) - 255 / 256 > 5 * se


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("columns", [False, True], ids=["row-shifts", "column-shifts"])
@pytest.mark.parametrize("coef", [0.0, -0.7])
def test_kernel_is_the_capped_scaled_gaussian_of_the_shifted_values(dtype, columns, coef):
    """``_kernel`` (potential's keep probabilities, or ``256 pi`` for the byte draws) against a
    float64 re-statement ``min(cap, scale e^{coef (v - shift)^2})``, 0 at ``-inf`` values: row or
    column shifts, the ``coef = 0`` shortcut, in the values' dtype; the defaults are ``scale =
    cap = 1`` and row shifts."""
    g = torch.Generator().manual_seed(2)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64).to(dtype)
    values[1, 2] = float("-inf")
    shift = torch.randn(6 if columns else 4, generator=g, dtype=torch.float64).to(dtype)
    v, s = values.double(), shift.double()
    s = s.view(1, -1) if columns else s.view(-1, 1)
    rtol = 1e-13 if dtype == torch.float64 else 1e-5
    for scale, cap in ((1.0, 1.0), (1.0, 0.6), (256.0, 256.0 * 0.9), (256.0, 300.0)):
        got = fastpaths._kernel(values, shift, coef, scale=scale, cap=cap, columns=columns)
        want = (scale * torch.exp(coef * (v - s) ** 2)).clamp(max=cap)
        want = torch.where(torch.isinf(v), 0.0, want)
        assert got.dtype == dtype
        assert torch.allclose(got.double(), want, rtol=rtol, atol=0), (scale, cap)
    if not columns:
        got = fastpaths._kernel(values, shift, coef)
        want = torch.where(torch.isinf(v), 0.0, torch.exp(coef * (v - s) ** 2).clamp(max=1.0))
        assert torch.allclose(got.double(), want, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_logaddexp_of_empty_masses_is_minus_inf_with_a_zero_gradient(dtype):
    """``_safe_logaddexp`` (potential's pool term: the keys' mass and the pool's) is
    ``log(e^a + e^b)``: the finite side alone where the other is ``-inf`` (gradient 1 to it, 0 to
    the empty one), ``-inf`` with a zero gradient (not NaN) where both are."""
    inf = float("inf")
    a0 = torch.tensor([0.3, -inf, 1.2, -inf, -2.0], dtype=dtype)
    b0 = torch.tensor([-0.5, 0.7, -inf, -inf, 5.0], dtype=dtype)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    out = fastpaths._safe_logaddexp(a, b)
    ad, bd = a0.double(), b0.double()
    top = torch.maximum(ad, bd).clamp(min=-1e300)  # a finite shift where both are -inf
    want = top + torch.log(torch.exp(ad - top) + torch.exp(bd - top))
    assert out.dtype == dtype
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    assert torch.allclose(out.double()[:3], want[:3], rtol=1e-6, atol=0)
    assert torch.allclose(out.double()[4:], want[4:], rtol=1e-6, atol=0)
    ga, gb = torch.autograd.grad(out.sum(), (a, b))
    # d/da log(e^a + e^b) = e^a / (e^a + e^b): 1 where b = -inf, 0 where a = -inf or both are
    share = torch.where(torch.isinf(want), 0.0, torch.exp(ad - want))
    share_b = torch.where(torch.isinf(want), 0.0, torch.exp(bd - want))
    assert torch.allclose(ga.double(), share, rtol=1e-5, atol=1e-7)
    assert torch.allclose(gb.double(), share_b, rtol=1e-5, atol=1e-7)
    assert not bool(torch.isnan(ga).any() or torch.isnan(gb).any())


@pytest.mark.parametrize("width", [7, 300, 600])
def test_top_few_has_the_members_of_topk(width):
    """``_top_few`` (numpy's values-only partition up to ``_FEW_WIDTH`` columns, else
    ``torch.topk``): the members of ``torch.topk`` on random rows with ``-inf`` entries, and on
    rows with a tie at the edge or a NaN (where it falls back to ``torch.topk`` itself); no
    member for ``k = 0`` (``hardest_columns`` would raise)."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(40, width, generator=g)
    x[torch.arange(0, 40, 3), torch.arange(0, 40, 3) % width] = float("-inf")
    for k in (0, 1, 3, min(5, width - 1)):  # (k = 0: no neighbour, an empty [A, 0])
        got = fastpaths._top_few(x, k)
        want = x.topk(k, dim=1).indices
        assert_same(got.sort(dim=1).values, want.sort(dim=1).values)
    if width < 5:
        return
    tied = x.clone()
    tied[5, :4] = torch.tensor([9.0, 8.0, 7.0, 7.0])  # 4 entries at or above the 3rd largest
    tied[7, 0] = float("nan")  # numpy ranks NaN first: 2 entries at or above its 3rd
    got = fastpaths._top_few(tied, 3)  # (the two rows together hold 3 + 3 entries)
    assert_same(got, tied.topk(3, dim=1, sorted=False).indices)


@pytest.mark.parametrize("width", [100, 600])
def test_top_few_of_more_than_32_neighbours_has_the_members_of_topk(width):
    """``_top_few`` hands ``k > 32`` to :func:`top_k_indices`: the members of ``torch.topk``
    (distinct values: one set of members), on rows narrow and wide of ``_FEW_WIDTH``."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(20, width, generator=g, dtype=torch.float64)
    for k in (33, 40):
        got = fastpaths._top_few(x, k)
        want = x.topk(k, dim=1).indices
        assert got.shape == (20, k)
        assert_same(got.sort(dim=1).values, want.sort(dim=1).values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["bound", "shifted", "exp_out", "exp_out-shifted"])
@pytest.mark.parametrize("block", [1 << 18, 12], ids=["one-block", "row-blocks"])
def test_block_log_masses_by_columns_equal_the_rows_of_the_transposes(
    monkeypatch, dtype, mode, block
):
    """``dim = 0`` (per column of each block) against ``dim = 1`` on the transposed logits and
    weights: values and gradients, float and integer (``uint8``) weights, with the exponentials
    all at once (``exp_out``) or a block of rows at a time (12 entries a block: several), with
    or without the bound; a column with nothing kept is ``-inf``."""
    monkeypatch.setattr(fastpaths, "_BLOCK", block)
    g = torch.Generator().manual_seed(12)
    n = 5
    c = (torch.rand(2 * n, 2 * n, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    c[torch.arange(2 * n), torch.arange(2 * n)] = float("-inf")
    w_all = torch.randint(0, 2, (2 * n, 2 * n), generator=g).to(dtype)
    w_all[torch.arange(2 * n), torch.arange(2 * n)] = 0.0
    w1 = torch.randint(0, 4, (n, n), generator=g, dtype=torch.uint8)
    w1[:, 2] = 0  # nothing kept in column 2
    w2 = torch.rand(n, n, generator=g, dtype=torch.float64).to(dtype)
    index = torch.stack([torch.randperm(n, generator=g)[:2] for _ in range(n)])
    blocks = [(n, 2 * n, 0, n), (0, n, n, 2 * n), (0, 2 * n, 0, 2 * n)]
    blocks_t = [(c0, c1, r0, r1) for r0, r1, c0, c1 in blocks]
    ups = [torch.linspace(0.5, 2.0, m, dtype=dtype) for m in (n, n, 2 * n)]
    kw = {} if mode.endswith("shifted") else {"bound": 2.0}

    def run(x, bs, ws, dim, **extra):
        outs = fastpaths.block_log_masses(x, bs, ws, [(0, n, index)], dim=dim, **kw, **extra)
        total = sum(torch.where(torch.isfinite(o), o, 0.0).mul(u).sum() for o, u in zip(outs, ups))
        total = total + outs[3].sum()
        return outs, torch.autograd.grad(total, x)[0]

    x = c.clone().requires_grad_(True)
    extra = {"exp_out": torch.empty_like(c)} if mode.startswith("exp_out") else {}
    cols, grad = run(x, blocks, [w1.clone(), w2.clone(), w_all.clone()], 0, scratch=True, **extra)
    # the same masses as rows of the transposes; the read stays a row gather of c
    xt = c.T.clone().requires_grad_(True)
    ws = [w1.T.to(dtype).contiguous(), w2.T.contiguous(), w_all.T.contiguous()]
    rows = fastpaths.block_log_masses(xt, blocks_t, ws, dim=1, **kw)
    for f, p_ in zip(cols[:3], rows):
        assert torch.equal(torch.isfinite(f), torch.isfinite(p_))
        assert_close_rel(f[torch.isfinite(p_)], p_[torch.isfinite(p_)], what="value")
    assert cols[0][2] == float("-inf")
    total = sum(torch.where(torch.isfinite(o), o, 0.0).mul(u).sum() for o, u in zip(rows, ups))
    (gt,) = torch.autograd.grad(total, xt)
    want = gt.T.clone()
    want[:n, n:].scatter_add_(1, index, torch.ones(n, 2, dtype=dtype))  # the read's gradient
    assert_close_rel(grad, want, what="gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_block_log_masses_exp_out_with_integer_weights_equals_float_weights(
    monkeypatch, dtype, dim
):
    """With ``exp_out``, integer weights (``uint8`` counts on a block, a ``uint8`` 0/1 draw on
    the whole matrix, the last block, multiplied into the exponentials' buffer a block of rows
    at a time: ``_CAST_BLOCK`` set to 12 entries, several blocks, the last one short) give the
    same values and gradients as the same weights in float, bit for bit, and leave the weights
    as they were; the whole block's product is written over ``exp_out``."""
    monkeypatch.setattr(fastpaths, "_CAST_BLOCK", 12)
    g = torch.Generator().manual_seed(21)
    n = 5
    c = (torch.rand(2 * n, 2 * n, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    c[torch.arange(2 * n), torch.arange(2 * n)] = float("-inf")
    counts = torch.randint(0, 6, (n, n), generator=g, dtype=torch.uint8)
    kept = torch.randint(0, 2, (2 * n, 2 * n), generator=g, dtype=torch.uint8)
    kept[torch.arange(2 * n), torch.arange(2 * n)] = 0
    kept[2 * n - 1, :n] = 0  # the last row block drops and keeps: a skipped block shows
    kept[2 * n - 1, n : 2 * n - 1] = 1
    blocks = [(n, 2 * n, 0, n), (0, 2 * n, 0, 2 * n)]
    ups = [torch.linspace(0.5, 2.0, m, dtype=dtype) for m in (n, 2 * n)]

    def run(weights):
        x = c.clone().requires_grad_(True)
        e = torch.empty_like(c)
        outs = fastpaths.block_log_masses(
            x, blocks, weights, bound=2.0, scratch=True, exp_out=e, dim=dim
        )
        total = sum(torch.where(torch.isfinite(o), o, 0.0).mul(u).sum() for o, u in zip(outs, ups))
        return [o.detach() for o in outs], torch.autograd.grad(total, x)[0], e

    ints = [counts.clone(), kept.clone()]
    got, got_grad, e = run(ints)
    want, want_grad, _ = run([counts.to(dtype), kept.to(dtype)])
    for f, p_ in zip(got, want):
        assert_same(f, p_)
    assert_same(got_grad, want_grad)
    assert torch.equal(ints[0], counts) and torch.equal(ints[1], kept)
    assert torch.equal(e, c.exp() * kept.to(dtype))  # the whole block's product, in exp_out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scratch", [False, True], ids=["own-buffers", "scratch"])
@pytest.mark.parametrize("block", [None, 30], ids=["one-block", "row-blocks"])
def test_block_log_masses_equal_the_plain_sums_and_gathers(monkeypatch, dtype, scratch, block):
    """Against ``weighted_log_mass``'s plain twin ``logsumexp(c + log w)`` per block and a
    gather: values and gradients, a whole-matrix block, off-diagonal blocks, a row with nothing
    kept (``-inf``, zero gradient), ``-inf`` logits where ``w = 0``, reads of single entries;
    the products in buffers of their own or over the weights (``scratch``), the exponentials of
    all rows at once or by blocks of 3 rows (``_BLOCK`` 30 entries: the last block short, the
    logits' blocks starting and ending inside a row block)."""
    from hardneg.objectives import safe_logsumexp

    if block is not None:
        monkeypatch.setattr(fastpaths, "_BLOCK", block)

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
    with warnings.catch_warnings():  # (no out= buffer of the wrong shape, resized by torch)
        warnings.simplefilter("error")
        fast = fastpaths.block_log_masses(
            c,
            blocks,
            [w_all.clone(), w1.clone(), w2.clone()],
            [(0, n, index), (n, 0, index)],
            scratch=scratch,
        )
    plain = [
        safe_logsumexp(c + w_all.log()),
        safe_logsumexp(c[:n, n:] + w1.log()),
        safe_logsumexp(c[n:, :n] + w2.log()),
        c[:n, n:].gather(1, index),
        c[n:, :n].gather(1, index),
    ]
    assert fast[2][2] == float("-inf")
    ups = [torch.linspace(0.5, 2.0, x.numel(), dtype=dtype).view_as(x) for x in plain]
    rtol = 1e-12 if dtype == torch.float64 else 1e-5  # (float64: no float32 step anywhere)
    for f, p in zip(fast, plain):
        finite = torch.isfinite(p)
        assert torch.equal(finite, torch.isfinite(f))
        assert_close_rel(f[finite], p[finite], rtol=rtol, what="value")

    def total(outs):
        return sum(torch.where(torch.isfinite(o), o, 0.0).mul(u).sum() for o, u in zip(outs, ups))

    (gf,) = torch.autograd.grad(total(fast), c)
    (gp,) = torch.autograd.grad(total(plain), c)
    assert bool(torch.isfinite(gf).all())
    assert_close_rel(gf, gp, rtol=rtol, what="gradient")
    # without the whole-matrix block (the buffer is zero-filled) and with an unused output
    two = fastpaths.block_log_masses(c, blocks[1:], [w1, w2])
    (gf,) = torch.autograd.grad(torch.where(torch.isfinite(two[1]), two[1], 0.0).sum(), c)
    again = safe_logsumexp(c[n:, :n] + w2.log())
    (gp,) = torch.autograd.grad(torch.where(torch.isfinite(again), again, 0.0).sum(), c)
    assert_close_rel(gf, gp, what="gradient, one block")
    if dtype == torch.float64:  # float32 weights are cast to the logits' dtype first (with
        # scratch, their products are not rounded to float32)
        w32 = [w.float() for w in (w_all, w1, w2)]
        outs = fastpaths.block_log_masses(c, blocks, [w.clone() for w in w32], scratch=scratch)
        for (r0, r1, c0, c1), w, f in zip(blocks, w32, outs):
            p = safe_logsumexp(c[r0:r1, c0:c1] + w.double().log())
            finite = torch.isfinite(p)
            assert torch.equal(finite, torch.isfinite(f))
            assert_close_rel(f[finite], p[finite], rtol=rtol, what="value, float32 weights")
    # the same two blocks with the exponentials in a caller's buffer (shifted or not): only a
    # whole-matrix block may write its product over that buffer, these get buffers of their own
    for kw in ({}, {"bound": 20.0}):
        outs = fastpaths.block_log_masses(
            c, blocks[1:], [w1, w2], exp_out=torch.empty_like(c.detach()), **kw
        )
        for f, p in zip(outs, plain[1:3]):
            finite = torch.isfinite(p)
            assert torch.equal(finite, torch.isfinite(f))
            assert_close_rel(f[finite], p[finite], what=f"value, exp_out {kw}")


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_potential_in_batch_small_and_large_forms_give_the_same_masses(monkeypatch, dtype):
    """Up to ``_BLOCK`` entries of the Gram matrix, ``L_aug``'s draws are bytes and the masses'
    exponentials go into the spent kernel buffer (``exp_out``); above it (``_BLOCK`` set to 16
    here) the draws go into the kernel buffer and the exponentials a block of rows at a time.
    Same seed, same draws: the same three masses and the same gradient of ``z1`` and ``z2``."""
    from hardneg.losses.contrastive import ContrastInputs
    from hardneg.strategies.base import StepContext

    z1, z2, _ = make_inputs("in_batch", dtype, n=8, seed=6)
    strategy = hardneg.create_loss("potential", num_neighbors=3, a=3.0).strategy
    forms = []
    real = fastpaths.block_log_masses
    monkeypatch.setattr(
        fastpaths,
        "block_log_masses",
        lambda *a, **kw: forms.append(kw.get("exp_out") is not None) or real(*a, **kw),
    )

    def run():
        x1, x2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
        inputs = ContrastInputs(z1=x1, z2=x2, temperature=0.5)
        context = StepContext(generator=torch.Generator().manual_seed(3))
        terms = fastpaths.potential_in_batch_terms(strategy, inputs, context)
        masses = [c.fast_log_mass for _, c, _ in terms]
        total = sum(
            torch.where(torch.isfinite(m), m, 0.0).sum() * (i + 1) for i, m in enumerate(masses)
        )
        return [m.detach() for m in masses], torch.autograd.grad(total, (x1, x2))

    small, small_grad = run()
    monkeypatch.setattr(fastpaths, "_BLOCK", 16)
    large, large_grad = run()
    assert forms == [True, False]
    for a, b in zip(small, large):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        assert_close_rel(a[torch.isfinite(a)], b[torch.isfinite(a)], what="mass")
    for a, b in zip(small_grad, large_grad):
        assert_close_rel(a, b, what="gradient")


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


# ---------------------------------------------------------------------------------------------
# low level: kept_log_mass (positive_aware, fnc)


def plain_limited(logits, limit, mask):
    """positive_aware's plain form: the limit raised to the row's least negative, then a
    log-sum-exp over the entries at or below it."""
    low = (logits if mask is None else logits.masked_fill(~mask, float("inf"))).amin(1, True)
    kept = logits.masked_fill(logits > torch.maximum(limit, low), float("-inf"))
    return torch.logsumexp(kept, dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["pool", "masked"])
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["t1", "underflow"])
def test_kept_log_mass_with_a_limit_equals_the_masked_logsumexp(dtype, masked, scale):
    """Rows that keep some entries, rows whose limit is below every negative (they keep their
    least negatives, ties included), rows whose kept entries lie far below the row maximum
    (``scale`` 300: ``e^{c - max}`` underflows in float32, recomputed exactly)."""
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(9, 30, generator=g, dtype=torch.float64) * scale).to(dtype)
    logits[3, 5] = logits[3, 7] = logits[3].min() - 1  # a tie at the least negative
    mask = None
    if masked:
        mask = torch.rand(9, 30, generator=g) > 0.2
        logits = logits.masked_fill(~mask, float("-inf"))
    limit = logits.masked_fill(torch.isinf(logits), 0).median(dim=1, keepdim=True).values
    limit[2] = limit[3] = -1e9  # nothing kept under the rule
    limit[4] = logits[4].masked_fill(torch.isinf(logits[4]), float("inf")).min()  # c == limit
    for weights in (torch.ones(9, dtype=dtype), torch.linspace(0.5, 2, 9, dtype=dtype)):
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        fast = fastpaths.kept_log_mass(a, limit=limit, negative_mask=mask)
        plain = plain_limited(b, limit, mask)
        assert_close_rel(fast, plain, rtol=1e-6 if dtype == torch.float64 else 1e-5)
        (ga,) = torch.autograd.grad(fast @ weights, a)
        (gb,) = torch.autograd.grad(plain @ weights, b)
        # float32 logits of size ~700 carry an ulp of 6e-5: both forms round e^{c - m} so
        rtol = 1e-4 if scale > 1 and dtype == torch.float32 else 1e-5
        assert_close_rel(ga, gb, rtol=rtol, what="kept_log_mass gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("read", [False, True])
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["t1", "underflow"])
def test_kept_log_mass_without_dropped_columns_equals_the_scatter(dtype, read, scale):
    """fnc's form: the dropped columns out of the sum (the row maximum among them: scale 300
    underflows every other entry in float32) and, with ``read``, their logits as outputs whose
    gradient lands in the same buffer."""
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(7, 25, generator=g, dtype=torch.float64) * scale).to(dtype)
    logits[:, 0] = float("-inf")  # a masked column, as in-batch
    drop = torch.stack([torch.randperm(24, generator=g)[:2] + 1 for _ in range(7)])
    drop[:, 0] = logits.argmax(dim=1)
    weights = torch.linspace(0.5, 2, 7, dtype=dtype)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    out = fastpaths.kept_log_mass(a, drop=drop, read=read)
    fast = out[0] if read else out
    plain = torch.logsumexp(b.scatter(1, drop, float("-inf")), dim=1)
    assert_close_rel(fast, plain, rtol=1e-6 if dtype == torch.float64 else 1e-5)
    value_a, value_b = fast @ weights, plain @ weights
    if read:
        assert_same(out[1], logits.gather(1, drop))
        value_a = value_a + (out[1] * weights.unsqueeze(1)).sum()
        value_b = value_b + (b.gather(1, drop) * weights.unsqueeze(1)).sum()
    (ga,) = torch.autograd.grad(value_a, a)
    (gb,) = torch.autograd.grad(value_b, b)
    rtol = 1e-4 if scale > 1 and dtype == torch.float32 else 1e-5  # see above
    assert_close_rel(ga, gb, rtol=rtol, what="kept_log_mass gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bound", [10.0, 60.0, 100.0])
def test_kept_log_mass_with_a_bound_equals_the_scatter(dtype, bound):
    """fnc with cosine logits passes ``bound = 1/t`` (``|c| <= bound``): with ``e^{±bound}`` a
    normal float the row maximum is skipped (``e = e^c``), with the same values and gradients
    as the scatter form: rows spread over ``[-bound, bound]``, a row near ``-bound`` (at 60 in
    float32 its unshifted sum is below ``sqrt(tiny)``: recomputed exactly), a row near
    ``+bound`` and a masked column. At 100 in float32 (``e^100`` overflows) the row maximum is
    kept."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.rand(6, 30, generator=g, dtype=torch.float64) * 2 - 1) * bound
    logits[1] = -bound * (0.9 + 0.1 * torch.rand(30, generator=g, dtype=torch.float64))
    logits[2] = bound * (0.9 + 0.1 * torch.rand(30, generator=g, dtype=torch.float64))
    logits[:, 0] = float("-inf")
    logits = logits.to(dtype)
    drop = torch.stack([torch.randperm(29, generator=g)[:2] + 1 for _ in range(6)])
    weights = torch.linspace(0.5, 2, 6, dtype=dtype)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    mass, read = fastpaths.kept_log_mass(a, drop=drop, read=True, bound=bound)
    plain = torch.logsumexp(b.scatter(1, drop, float("-inf")), dim=1)
    assert_close_rel(mass, plain, rtol=1e-6 if dtype == torch.float64 else 1e-5)
    assert_same(read, logits.gather(1, drop))
    (ga,) = torch.autograd.grad(mass @ weights + (read * weights.unsqueeze(1)).sum(), a)
    (gb,) = torch.autograd.grad(
        plain @ weights + (b.gather(1, drop) * weights.unsqueeze(1)).sum(), b
    )
    assert_close_rel(ga, gb, what="kept_log_mass gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bound", [None, 10.0], ids=["row-max", "bound"])
def test_kept_log_mass_of_a_row_that_keeps_nothing_is_minus_inf_with_a_zero_gradient(dtype, bound):
    """fnc's dropped columns can be every negative of a row (``top_k`` at least its count): its
    mass is ``-inf`` and it passes a zero gradient, not ``0 / 0`` (NaN), even under a nonzero
    upstream gradient; the other rows equal the scatter form. (The scatter form's ``logsumexp``
    of an all ``-inf`` row back-propagates NaN, so its rows are compared without that one.)"""
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(4, 7, generator=g, dtype=torch.float64) * 3).to(dtype)
    logits[1, 3:] = float("-inf")  # row 1: three negatives, all of them dropped
    mask = torch.isfinite(logits)
    drop = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(4)])
    drop[1] = torch.tensor([2, 0, 1])
    a = logits.clone().requires_grad_()
    fast = fastpaths.kept_log_mass(a, drop=drop, negative_mask=mask, bound=bound)
    assert fast[1] == float("-inf")
    up = torch.linspace(0.5, 2, 4, dtype=dtype)
    (ga,) = torch.autograd.grad(fast, a, up)
    assert bool((ga[1] == 0).all())
    others = [0, 2, 3]
    b = logits[others].clone().requires_grad_()
    plain = torch.logsumexp(b.scatter(1, drop[others], float("-inf")), dim=1)
    assert_close_rel(fast[others], plain, rtol=1e-6 if dtype == torch.float64 else 1e-5)
    (gb,) = torch.autograd.grad(plain, b, up[others])
    assert_close_rel(ga[others], gb, what="kept_log_mass gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bound", [None, 2.0, 60.0, 100.0], ids=["row-max", "t0.5", "t1/60", "t0.01"]
)
def test_log_mass_equals_logsumexp_in_value_and_gradient(dtype, bound):
    """The InfoNCE objective's mass: :func:`fastpaths.log_mass` against ``torch.logsumexp``
    (float64 loops as a second reference) on logits spread over ``[-bound, bound]``, with the
    in-batch set's two masked entries per row, a row near ``-bound`` (its unshifted float32
    sum at 60 falls below ``sqrt(tiny)``: recomputed exactly) and a row near ``+bound``; an
    all-masked row is ``-inf`` with a zero gradient (``logsumexp``'s is NaN there)."""
    g = torch.Generator().manual_seed(11)
    top = 3.0 if bound is None else bound
    logits = (torch.rand(6, 20, generator=g, dtype=torch.float64) * 2 - 1) * top
    logits[1] = -top * (0.9 + 0.1 * torch.rand(20, generator=g, dtype=torch.float64))
    logits[2] = top * (0.9 + 0.1 * torch.rand(20, generator=g, dtype=torch.float64))
    rows = torch.arange(6)
    logits[rows, rows] = logits[rows, rows + 6] = float("-inf")
    logits[5] = float("-inf")
    logits = logits.to(dtype)
    up = torch.linspace(0.5, 2.0, 6, dtype=dtype)
    a = logits.clone().requires_grad_()
    b = logits[:5].clone().requires_grad_()
    fast = fastpaths.log_mass(a, bound)
    plain = torch.logsumexp(b, dim=1)
    assert fast[5] == float("-inf")
    assert_close_rel(fast[:5], plain, rtol=1e-6 if dtype == torch.float64 else 1e-5)
    by_loop = [
        math.log(sum(math.exp(float(x)) for x in row if x > -math.inf)) for row in logits[:5]
    ]
    assert_close_rel(fast[:5].double(), torch.tensor(by_loop, dtype=torch.float64), rtol=1e-5)
    (ga,) = torch.autograd.grad(fast, a, up)
    (gb,) = torch.autograd.grad(plain, b, up[:5])
    assert_close_rel(ga[:5], gb, what="log_mass gradient")
    assert torch.equal(ga[5], torch.zeros_like(ga[5]))


def test_log_mass_of_half_precision_takes_logsumexp():
    """float16 / bfloat16 logits (outside ``_EXP_RANGE``) take ``torch.logsumexp`` itself."""
    x = torch.randn(3, 5).to(torch.bfloat16)
    assert torch.equal(fastpaths.log_mass(x, 1.0), torch.logsumexp(x, dim=1))


def test_contrast_log_mass_bounds_only_cosine_logits():
    """Raw dot products (``normalized=False``) are not bounded by ``1/t``: the row maximum
    shifts them (unshifted, ``e^{150}`` overflows float32 and the mass would be ``inf``);
    cosines take the bound. Both equal ``torch.logsumexp``."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(12)
    for normalized, scale in ((False, 150.0), (True, 1.0 / 0.1)):
        logits = (torch.rand(4, 9, generator=g) * 2 - 1) * scale
        contrast = SimpleNamespace(negative_logits=logits, temperature=0.1, normalized=normalized)
        out = fastpaths.contrast_log_mass(contrast)
        assert torch.isfinite(out).all(), normalized
        assert_close_rel(out, torch.logsumexp(logits, dim=1), what=f"normalized={normalized}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_log_mass_raises_the_limit_to_the_least_negative_of_the_mask(dtype):
    """A row whose limit is below every negative keeps its least negative, the least among
    ``negative_mask``'s columns (the plain form's ``_limit``), not among the finite logits: a
    negative whose logit is ``-inf`` (an overflowed raw logit) is that least negative, so the
    row keeps only it and its mass is ``-inf``, as the plain form's. Row 0: the same rule
    without such a negative (its least negatives kept, a finite mass)."""
    logits = torch.tensor(
        [[0.5, -1.0, 2.0, float("-inf"), 1.5], [0.5, -1.0, 2.0, float("-inf"), 1.5]],
        dtype=dtype,
    )
    mask = torch.tensor([[True, True, True, False, True], [True, True, True, True, True]])
    limit = torch.full((2, 1), -3.0, dtype=dtype)  # below every finite logit
    fast = fastpaths.kept_log_mass(logits, limit=limit, negative_mask=mask)
    plain = plain_limited(logits, limit, mask)
    assert torch.isfinite(plain[0]) and plain[1] == float("-inf")
    assert fast[0] == -1.0 and fast[1] == float("-inf")  # row 0 keeps its -1.0 alone


@pytest.mark.parametrize("clamp", [0.999, 0.5], ids=["default", "clamped"])
def test_potential_pool_fast_path_draws_the_exact_binomial_counts(monkeypatch, clamp):
    """The bank path's kept counts, read where its masses take them: per anchor and column,
    ``Binomial(m, pi)`` with ``m`` the plain grid's cells of that column for that anchor (the
    own block's cell and the excluded entry left out) and ``pi`` the plain form's keep
    probability: mean within 5 standard errors everywhere, the variance pooled over the
    entries within 10 %, 0 draws on the non-negatives; bank rows in several blocks are met.
    ``clamp = 0.5``: many kernels above the clamp, whose cap then binds."""
    from hardneg.losses.contrastive import ContrastInputs
    from hardneg.strategies.base import StepContext

    z1, z2, kwargs = make_inputs("pool_exclude", torch.float64, n=9, k=14, seed=3)
    loss_fn = hardneg.create_loss("potential", num_neighbors=3, a=2.0, clamp=clamp)
    inputs = ContrastInputs(z1=z1, z2=z2, temperature=loss_fn.temperature, **kwargs)
    strategy = loss_fn.strategy
    plain = strategy.mined(inputs, z1, z2, None, fast=True)  # log pi and m per column
    seen = _record_block_weights(monkeypatch)
    g = torch.Generator().manual_seed(5)
    context = StepContext(generator=g)
    draws = []
    for _ in range(800):
        seen.clear()
        (_, mined, _), _ = fastpaths.potential_pool_terms(strategy, inputs, context)
        # the keys' weights are laid out [key, anchor] (the Gram's symmetry), the bank's
        # [anchor, column]
        keys, pool = seen[0][0].T.double(), seen[1][0].double()
        draws.append(torch.cat([keys, pool], dim=1))
    draws = torch.stack(draws)  # [R, N, N + U]
    index = mined.column_index
    m = plain.multiplicity[:, index] * torch.isfinite(plain.cell_log_keep[:, index])
    pi = plain.cell_log_keep[:, index].exp()
    assert_same(mined.multiplicity, m)
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
        assert_same(getattr(fast, name), getattr(plain, name), name)
    assert fast.num_negatives == plain.num_negatives and fast.temperature == plain.temperature
    assert fast.normalized
    # mask=False: no [2N, 2N] mask (the caller makes one if something reads it)
    assert fastpaths.pair_contrast(z1, z2, temperature=0.3, mask=False).negative_mask is None
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_log_masses_with_a_bound_beyond_float32s_exponent_range_shift_float32(dtype):
    """``bound`` 100 (cosine logits at ``t = 0.01``): float32 overflows ``e^{90}``, so there
    the exponentials are shifted by the row maximum whatever the bound (up to 60 they are
    not); float64 takes ``e^c`` up to 600. Both equal the plain ``logsumexp(c + log w)``."""
    from hardneg.objectives import safe_logsumexp

    g = torch.Generator().manual_seed(11)
    c = (torch.rand(6, 8, generator=g, dtype=torch.float64) * 190 - 95).to(dtype)
    c[:, 0] = 95.0  # a logit whose exponential overflows float32
    w = torch.rand(6, 8, generator=g, dtype=torch.float64).to(dtype) + 0.5
    (got,) = fastpaths.block_log_masses(c, [(0, 6, 0, 8)], [w], bound=100.0)
    want = safe_logsumexp(c.double() + w.double().log())
    assert bool(torch.isfinite(got).all())
    assert_close_rel(got.double(), want, rtol=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
        (torch.float16, torch.float16),
    ],
    ids=["f64-f32", "f32-f64", "f16-f16"],
)
def test_pair_contrast_of_views_of_different_precisions_computes_as_in_batch_contrast(dtypes):
    """``pair_contrast`` computes in ``in_batch_contrast``'s dtype whichever view is the wider
    (float64 if either is, else float32: half precisions promoted): the same dtype and values."""
    from hardneg.contrast import in_batch_contrast

    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(5, 4, generator=g, dtype=torch.float64).to(dtypes[0])
    z2 = torch.randn(5, 4, generator=g, dtype=torch.float64).to(dtypes[1])
    fast = fastpaths.pair_contrast(z1, z2, temperature=0.3)
    plain = in_batch_contrast((z1, z2), temperature=0.3)
    for name in ("anchors", "positive_logits"):
        assert_close_rel(getattr(fast, name), getattr(plain, name), what=name)
    finite = torch.isfinite(plain.negative_logits)
    assert torch.equal(finite, torch.isfinite(fast.negative_logits))
    assert_close_rel(fast.negative_logits[finite], plain.negative_logits[finite], what="logits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_joint_positive_infonce_equals_the_weighted_objective(dtype):
    """``joint_positive_infonce`` (every positive weight 1) gives ``infonce_objective``'s joint
    summed terms bit for bit, values and gradients: an anchor with an empty negative mass
    (``-inf``) and one with a ``-inf`` extra positive included."""
    from hardneg.contrast import ContrastSet
    from hardneg.objectives import infonce_objective
    from hardneg.strategies.base import Selection

    gen = torch.Generator().manual_seed(3)
    a, q = 9, 4
    pos = torch.randn(a, 1, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    extra = torch.randn(a, q, generator=gen, dtype=torch.float64).to(dtype)
    extra[2, 1] = float("-inf")
    extra.requires_grad_()
    mass = torch.randn(a, generator=gen, dtype=torch.float64).to(dtype)
    mass[4] = float("-inf")
    mass.requires_grad_()
    out = torch.randn(a, generator=gen, dtype=torch.float64).to(dtype)
    got = fastpaths.joint_positive_infonce(pos, extra, mass)
    got_grads = torch.autograd.grad(got, (pos, extra, mass), out)
    contrast = ContrastSet(
        anchors=torch.zeros(a, 2, dtype=dtype),
        columns=torch.zeros(a, 2, dtype=dtype),
        anchor_columns=None,
        positives=torch.zeros(a, 1, 2, dtype=dtype),
        positive_logits=pos,
        positive_weight=torch.ones_like(pos),
        positive_index=None,
        negative_logits=torch.zeros(a, a, dtype=dtype),
        negative_mask=None,
        num_negatives=a,
        temperature=0.5,
    )
    selection = Selection(negative_log_mass=mass, extra_positive_logits=extra)
    want = infonce_objective(contrast, selection, positive_mode="joint", positive_reduction="sum")
    want_grads = torch.autograd.grad(want, (pos, extra, mass), out)
    assert torch.equal(got, want)
    for x, y in zip(got_grads, want_grads):
        assert torch.equal(x, y)
    # the objective takes it only when the strategy vouches for unit weights, on the fast path
    selection.unit_positive_weights = True
    for fast in (True, False):
        again = infonce_objective(
            contrast, selection, positive_mode="joint", positive_reduction="sum", fast=fast
        )
        assert torch.equal(again, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_potential_unit_positive_weights_change_nothing(monkeypatch, dtype):
    """potential's fused in-batch path vouches for unit positive weights (hard weighting): the
    loss and gradients with the objective's shortcut equal those without it bit for bit."""
    z1, z2, kwargs = make_inputs("in_batch", dtype, n=24, d=5)
    loss_fn = hardneg.create_loss("potential", num_neighbors=3, a=3.0)

    def run():
        g = torch.Generator().manual_seed(5)
        x = loss_fn(z1, z2, generator=g, **kwargs)
        return (x, *torch.autograd.grad(x, (z1, z2)))

    flags = []
    real = type(loss_fn.strategy).select_term

    def spy(self, contrast, context, role):
        selection = real(self, contrast, context, role)
        flags.append(selection.unit_positive_weights)
        return selection

    monkeypatch.setattr(type(loss_fn.strategy), "select_term", spy)
    fast = run()
    assert flags == [True, True, False]

    def without(self, contrast, context, role):
        selection = real(self, contrast, context, role)
        selection.unit_positive_weights = False
        return selection

    monkeypatch.setattr(type(loss_fn.strategy), "select_term", without)
    plain = run()
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)
