"""Properties every registered loss must have (``hardneg.list_losses()``, so losses registered
later are covered too): finite values and gradients in hard regimes (t = 0.05, beta = 10, bf16
autocast, duplicated rows, N = 2), invariance to the order of the batch and to the scale of the
embeddings, in-batch and with a pool; plus hypothesis property tests over random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hardneg

LOSSES = hardneg.list_losses()
HARD = dict(temperature=0.05, beta=10.0)  # beta is dropped for losses that have none
# no random draws: potential's expected selection, SimANS's kernel weights, MoCHi without mixes
DETERMINISTIC = dict(sample="expected", num_samples=None, num_mixed=0, num_query_mixed=0)


def make(name: str, **kwargs):
    """``create_loss`` with only the keyword arguments the loss accepts."""
    allowed = hardneg.loss_hparams(name)
    return hardneg.create_loss(name, **{k: v for k, v in kwargs.items() if k in allowed})


def inputs(n=16, d=12, k=0, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z1 = scale * torch.randn(n, d, generator=g)
    z2 = z1 + 0.5 * scale * torch.randn(n, d, generator=g)
    pool = torch.randn(k, d, generator=g) if k else None
    return z1.requires_grad_(), z2.requires_grad_(), pool


def run(loss_fn, z1, z2, pool, **kw):
    gen = torch.Generator().manual_seed(123)
    return loss_fn(z1, z2, negatives=pool, generator=gen, **kw)


def assert_finite_with_grads(loss, *leaves):
    assert loss.dim() == 0 and bool(torch.isfinite(loss)), float(loss)
    grads = torch.autograd.grad(loss, leaves)
    for g in grads:
        assert bool(torch.isfinite(g).all())


POOLED = [pytest.param(0, id="in-batch"), pytest.param(48, id="pool")]


@pytest.mark.parametrize("pool_size", POOLED)
@pytest.mark.parametrize("name", LOSSES)
def test_finite_at_temperature_005_and_beta_10_in_float32(name, pool_size):
    z1, z2, pool = inputs(k=pool_size)
    assert_finite_with_grads(run(make(name, **HARD), z1, z2, pool), z1, z2)


@pytest.mark.parametrize("pool_size", POOLED)
@pytest.mark.parametrize("name", LOSSES)
def test_finite_under_bf16_autocast(name, pool_size):
    z1, z2, pool = inputs(k=pool_size, seed=1)
    loss_fn = make(name, **HARD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = run(loss_fn, z1, z2, pool)
    assert loss.dtype == torch.float32
    assert_finite_with_grads(loss, z1, z2)


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_inputs_give_a_float32_loss_close_to_float32_inputs(name):
    z1, z2, pool = inputs(seed=2)
    loss_fn = make(name, **DETERMINISTIC)
    exact = run(loss_fn, z1, z2, pool)
    low = run(loss_fn, z1.bfloat16(), z2.bfloat16(), pool)
    assert low.dtype == torch.float32
    low, exact = low.item(), exact.item()
    assert abs(low - exact) < 0.05 * max(1.0, abs(exact))


@pytest.mark.parametrize("pool_size", POOLED)
@pytest.mark.parametrize("name", LOSSES)
def test_finite_with_duplicated_rows(name, pool_size):
    z1, z2, pool = inputs(k=pool_size, seed=3)
    with torch.no_grad():
        z1[1:4] = z1[0]
        z2[1:4] = z2[0]
        z2[5] = z1[5]  # a positive pair that coincides
        if pool is not None:
            pool[:6] = z1[0]
    assert_finite_with_grads(run(make(name, **HARD), z1, z2, pool), z1, z2)


@pytest.mark.parametrize("pool_size", POOLED)
@pytest.mark.parametrize("name", LOSSES)
def test_finite_with_a_batch_of_two(name, pool_size):
    z1, z2, pool = inputs(n=2, k=pool_size, seed=4)
    assert_finite_with_grads(run(make(name, **HARD), z1, z2, pool), z1, z2)
    assert_finite_with_grads(run(make(name), z1, z2, pool), z1, z2)


@pytest.mark.parametrize("pool_size", POOLED)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_invariant_to_the_order_of_the_batch(name, pool_size):
    z1, z2, pool = inputs(n=20, k=pool_size, seed=5)
    loss_fn = make(name, **DETERMINISTIC)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    before = run(loss_fn, z1, z2, pool)
    after = run(loss_fn, z1[perm], z2[perm], pool)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_invariant_to_the_order_of_the_pool(name):
    z1, z2, pool = inputs(n=12, k=40, seed=6)
    loss_fn = make(name, **DETERMINISTIC)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    before = run(loss_fn, z1, z2, pool)
    torch.testing.assert_close(run(loss_fn, z1, z2, pool[perm]), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool_size", POOLED)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_invariant_to_the_scale_of_the_embeddings(name, pool_size):
    z1, z2, pool = inputs(k=pool_size, seed=7)
    loss_fn = make(name, **DETERMINISTIC)
    before = run(loss_fn, z1, z2, pool)
    scaled_pool = None if pool is None else pool * 9.0
    after = run(loss_fn, z1 * 3.7, z2 * 0.25, scaled_pool)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_diagnostics_are_distributions_over_the_kept_negatives(name):
    z1, z2, _ = inputs(seed=8)
    labels = torch.arange(16) % 3
    out = run(make(name, **DETERMINISTIC), z1, z2, None, labels=labels, return_diagnostics=True)
    diag = out.diagnostics
    if len(out.terms) <= 1:
        torch.testing.assert_close(out.per_anchor.mean(), out.loss)
    else:  # several terms (potential): per_anchor is the first term's; the terms add up
        torch.testing.assert_close(torch.tensor(sum(out.terms.values())), out.loss.detach())
    for w in (diag.sampling_weights, diag.gradient_weights):
        assert bool((w >= 0).all())
        torch.testing.assert_close(w.sum(dim=1), torch.ones(w.shape[0]))
    assert bool((diag.effective_negatives >= 1 - 1e-5).all())
    assert bool((diag.effective_negatives <= diag.kept_negatives + 1e-3).all())
    for key, value in diag.summary().items():
        assert isinstance(value, float), key


# ----------------------------------------------------------------------- property-based


@st.composite
def batches(draw):
    n = draw(st.sampled_from([2, 3, 5, 16, 64, 200, 512]))
    d = draw(st.sampled_from([2, 8, 32]))
    seed = draw(st.integers(0, 2**16))
    spread = draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 1.0]))  # 0: the views coincide
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if draw(st.booleans()):  # near-duplicate samples within the batch
        z1[n // 2 :] = z1[: n - n // 2] + 1e-6 * torch.randn(n - n // 2, d, generator=g)
    z2 = z1 + spread * z1.norm(dim=1, keepdim=True) * torch.randn(n, d, generator=g)
    pool_size = draw(st.sampled_from([0, 0, 1, 7, 300]))
    pool = torch.randn(pool_size, d, generator=g) if pool_size else None
    return z1, z2, pool


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(LOSSES),
    batch=batches(),
    temperature=st.sampled_from([0.02, 0.05, 0.1, 0.5, 1.0, 5.0]),
    beta=st.sampled_from([0.0, 1.0, 10.0]),
    autocast=st.booleans(),
)
def test_property_finite_loss_and_gradients_for_random_inputs(
    name, batch, temperature, beta, autocast
):
    z1, z2, pool = batch
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss_fn = make(name, temperature=temperature, beta=beta)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = run(loss_fn, z1, z2, pool)
    assert_finite_with_grads(loss, z1, z2)
    assert loss.item() >= -1e-4  # every objective is a log-partition minus a member of it


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(LOSSES), batch=batches(), seed=st.integers(0, 1000))
def test_property_permuting_the_batch_does_not_change_the_loss(name, batch, seed):
    z1, z2, pool = batch
    loss_fn = make(name, temperature=0.2, **DETERMINISTIC)
    perm = torch.randperm(z1.shape[0], generator=torch.Generator().manual_seed(seed))
    before = run(loss_fn, z1, z2, pool)
    after = run(loss_fn, z1[perm], z2[perm], pool)
    # near-duplicates make ring ranks and neighbour choices tie-dependent; the value stays close
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
