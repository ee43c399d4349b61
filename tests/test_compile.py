"""Every loss under ``torch.compile`` and in float64.

* One test per registered loss (``hardneg.list_losses()``, so later ones are covered) and call
  form (in-batch, pool, pool + ``exclude_index``, retrieval ``hard_negatives`` with and without
  ``false_negatives``): the compiled
  loss (``fullgraph=True``, so a graph break fails the test) gives the value and gradients of
  eager within 1e-5. Backend ``aot_eager``: dynamo's capture and AOTAutograd's functionalised
  forward/backward graphs, run by eager kernels. Inductor's C++ code generation took 49-172 s to
  compile the smallest in-batch InfoNCE on the 2-core CPU machine (warm / cold cache), too slow
  for the suite; ``HARDNEG_TEST_INDUCTOR=1`` adds that case with inductor.
* Graph breaks counted with ``torch._dynamo.explain`` at ``check_inputs=False``: 0 per loss.
* float64 inputs compute in float64 (a 1e-6 finite difference of the loss matches its autograd
  derivative, which float32 anywhere in the chain would not), under compile too; float16 and
  bfloat16 inputs compute in float32.

Shapes are tiny and each loss's compiled module is shared by its call forms (one recompile per
form), to keep the file at a couple of minutes on 2 cores.
"""

from __future__ import annotations

import os

import pytest
import torch

import hardneg

LOSSES = hardneg.list_losses()
FORMS = ["in_batch", "pool", "pool_exclude", "retrieval", "retrieval_masked"]
# (loss, form) pairs a loss rejects by design, with a clear error (tested in test_potential.py):
# potential needs two views or a shared bank, not retrieval columns
UNSUPPORTED: set[tuple[str, str]] = {
    ("potential", "retrieval"),
    ("potential", "retrieval_masked"),
}  # (loss, form) pairs a loss rejects by design
BACKEND = "aot_eager"


def inputs(form: str, dtype=torch.float32, *, n=8, d=6, k=24, h=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64)
    kwargs: dict = {}
    if form in ("pool", "pool_exclude"):
        kwargs["negatives"] = torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype)
        if form == "pool_exclude":
            kwargs["exclude_index"] = torch.randperm(k, generator=g)[:n]
    elif form in ("retrieval", "retrieval_masked"):
        kwargs["hard_negatives"] = torch.randn(n, h, d, generator=g, dtype=torch.float64).to(dtype)
        if form == "retrieval_masked":  # known false negatives (a guide model's, say)
            kwargs["false_negatives"] = torch.rand(n, n * (1 + h), generator=g) < 0.25
    return z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_(), kwargs


def value_and_grads(fn, z1, z2, kwargs, draws: bool):
    kw = dict(kwargs)
    if draws:
        # dynamo cannot trace a torch.Generator argument: a compiled loss that draws uses
        # torch's global RNG, seeded the same way for the eager and the compiled call
        torch.manual_seed(3)
    loss = fn(z1, z2, **kw)
    return loss, torch.autograd.grad(loss, (z1, z2))


def assert_close(actual, expected, rtol=1e-5, what=""):
    assert actual.dtype == expected.dtype, what
    err = float((actual.detach() - expected.detach()).abs().max())
    scale = max(float(expected.detach().abs().max()), 1e-12)
    assert err <= rtol * scale, f"{what}: max error {err:.3g}, scale {scale:.3g}"


@pytest.fixture(autouse=True, scope="module")
def _dynamo_state():
    """Every loss is the same ``ContrastiveLoss.forward`` code object, so the shared compiled
    modules add up recompiles (one per loss and form): raise the limit, for this file only."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()
    _LOSS.clear()
    _COMPILED.clear()


_LOSS: dict[str, torch.nn.Module] = {}
_COMPILED: dict[str, object] = {}


def eager_and_compiled(name: str):
    """One loss module and its compiled twin per loss, shared by the tests of this file."""
    if name not in _LOSS:
        _LOSS[name] = hardneg.create_loss(name, check_inputs=False)
        # compiled code is the plain form; a loss that draws takes other (equally distributed)
        # draws on its fast path, so its eager twin is the plain form too (fast = plain:
        # tests/test_fastpaths.py)
        _LOSS[name].fast = not _LOSS[name].draws
        _COMPILED[name] = torch.compile(_LOSS[name], backend=BACKEND, fullgraph=True)
    return _LOSS[name], _COMPILED[name]


def supported_forms() -> list:
    """Every (loss, call form) pair a loss accepts: the pairs it rejects by design are not
    generated (their clear errors are tested in test_potential.py), so no case is a skip."""
    return [
        pytest.param(name, form, id=f"{name}-{form}")
        for name in LOSSES
        for form in FORMS
        if (name, form) not in UNSUPPORTED
    ]


@pytest.mark.parametrize(("name", "form"), supported_forms())
def test_compiled_equals_eager(name, form):
    eager, compiled = eager_and_compiled(name)
    z1, z2, kwargs = inputs(form)
    le, ge = value_and_grads(eager, z1, z2, kwargs, eager.draws)
    lc, gc = value_and_grads(compiled, z1, z2, kwargs, eager.draws)
    assert lc.dtype == torch.float32 and bool(torch.isfinite(le))
    assert_close(lc, le, what=f"{name} {form} loss")
    for i, (a, b) in enumerate(zip(gc, ge)):
        assert_close(a, b, what=f"{name} {form} grad z{i + 1}")


@pytest.mark.parametrize("name", ["infonce", "hcl"])
@pytest.mark.parametrize("mode", ["separate", "joint", "pooled"])
def test_several_positives_and_per_anchor_losses_compile(name, mode):
    """Four views (three positives per anchor) in each positive mode, and the per-anchor losses
    (``reduction='none'``, what the text loss's joint partition reads), compiled = eager."""
    # its recompiles (three modes, two reductions) would count against the file's shared
    # limit of the one ContrastiveLoss.forward code object: start from a clean cache
    torch._dynamo.reset()
    eager = hardneg.create_loss(name, check_inputs=False, positive_mode=mode)
    compiled = torch.compile(eager, backend=BACKEND, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(6, 5, generator=g).requires_grad_() for _ in range(4)]
    for reduction in ("mean", "none"):

        def run(fn, reduction=reduction):
            out = fn(views[0], views[1], extra_views=views[2:], reduction=reduction)
            return out, torch.autograd.grad(out.sum(), views)

        (le, ge), (lc, gc) = run(eager), run(compiled)
        assert_close(lc, le, what=f"{name} {mode} {reduction} loss")
        for i, (a, b) in enumerate(zip(gc, ge)):
            assert_close(a, b, what=f"{name} {mode} {reduction} grad {i}")
    torch._dynamo.reset()  # and leave none of them to the tests after it


def compiled_mismatches(device: str) -> list[str]:
    """Every loss and call form on ``device``: the failures of compiled (``fullgraph=True``) =
    eager within 1e-5, value and gradients, as lines (empty: all agree). Every case is tried, so
    one run lists them all."""
    torch._dynamo.reset()
    failures = []
    pairs: dict[str, tuple[torch.nn.Module, object]] = {}
    for param in supported_forms():
        name, form = param.values
        if name not in pairs:
            eager = hardneg.create_loss(name, check_inputs=False)
            eager.fast = not eager.draws  # as in eager_and_compiled
            pairs[name] = (eager, torch.compile(eager, backend=BACKEND, fullgraph=True))
        eager, compiled = pairs[name]
        z1, z2, kwargs = inputs(form)
        z1, z2 = (z.detach().to(device).requires_grad_() for z in (z1, z2))
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        try:
            le, ge = value_and_grads(eager, z1, z2, kwargs, eager.draws)
            lc, gc = value_and_grads(compiled, z1, z2, kwargs, eager.draws)
            assert lc.device == z1.device and lc.dtype == torch.float32, (lc.device, lc.dtype)
            assert_close(lc, le, what="loss")
            for i, (a, b) in enumerate(zip(gc, ge)):
                assert_close(a, b, what=f"grad z{i + 1}")
        except Exception as exc:  # noqa: BLE001 - a graph break or a mismatch, listed
            failures.append(f"{name} {form}: {type(exc).__name__}: {str(exc)[:300]}")
    torch._dynamo.reset()
    return failures


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiled_equals_eager_on_cuda():
    """The test above on CUDA tensors: the GPU's kernels and the losses' device paths (one test,
    so that a machine without a GPU skips once)."""
    failures = compiled_mismatches("cuda")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", LOSSES)
def test_compiled_float64_equals_eager(name):
    eager, compiled = eager_and_compiled(name)
    z1, z2, kwargs = inputs("pool_exclude" if name != "infonce" else "in_batch", torch.float64)
    le, ge = value_and_grads(eager, z1, z2, kwargs, eager.draws)
    lc, gc = value_and_grads(compiled, z1, z2, kwargs, eager.draws)
    assert lc.dtype == le.dtype == torch.float64
    assert_close(lc, le, rtol=1e-12, what=f"{name} loss")
    for a, b in zip(gc, ge):
        assert a.dtype == torch.float64
        assert_close(a, b, rtol=1e-12, what=f"{name} grad")


@pytest.mark.parametrize("name", LOSSES)
def test_no_graph_breaks_at_check_inputs_false(name):
    loss_fn = hardneg.create_loss(name, check_inputs=False)
    for form in ("in_batch", "pool_exclude"):
        z1, z2, kwargs = inputs(form)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(loss_fn)(z1, z2, **kwargs)
        reasons = [str(b.reason) for b in explanation.break_reasons]
        assert explanation.graph_break_count == 0, (form, reasons)
        assert explanation.graph_count == 1, form
    torch._dynamo.reset()
    _LOSS.clear()
    _COMPILED.clear()


@pytest.mark.parametrize(("name", "form"), supported_forms())
def test_float64_inputs_compute_in_float64(name, form):
    """The loss of float64 inputs is float64 and resolves a step of 1e-9 of the inputs, far
    below float32's resolution (a float32 step anywhere would round it away: difference 0 or
    rounding noise): the changes for +step and -step are equal and opposite to 1e-3. The float32
    loss of the same inputs agrees to float32 rounding."""
    loss_fn = hardneg.create_loss(name, check_inputs=False)
    z1, z2, kwargs = inputs(form, torch.float64, seed=1)
    loss, grads = value_and_grads(loss_fn, z1, z2, kwargs, loss_fn.draws)
    assert loss.dtype == torch.float64
    assert all(g.dtype == torch.float64 for g in grads)
    g = torch.Generator().manual_seed(2)
    d1 = torch.randn(z1.shape, generator=g, dtype=torch.float64)
    d2 = torch.randn(z2.shape, generator=g, dtype=torch.float64)
    eps = 1e-9
    with torch.no_grad():
        base = float(plain_value(loss_fn, z1, z2, kwargs))
        up = float(plain_value(loss_fn, z1 + eps * d1, z2 + eps * d2, kwargs)) - base
        down = float(plain_value(loss_fn, z1 - eps * d1, z2 - eps * d2, kwargs)) - base
    assert up != 0.0 and abs(up + down) <= 1e-3 * abs(up), (up, down)
    assert abs(up) <= 1e-6, up  # a first-order change, not a jump
    single = {k: (v.float() if v.is_floating_point() else v) for k, v in kwargs.items()}
    loss32 = plain_value(loss_fn, z1.detach().float(), z2.detach().float(), single)
    assert loss32.dtype == torch.float32
    assert abs(float(loss32) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))


def plain_value(loss_fn, z1, z2, kwargs):
    if loss_fn.draws:
        torch.manual_seed(3)  # the same draws for every call
    return loss_fn(z1, z2, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSSES)
def test_half_inputs_compute_in_float32(name, dtype):
    loss_fn = hardneg.create_loss(name, check_inputs=False)
    z1, z2, kwargs = inputs("pool_exclude", dtype, seed=4)
    loss, grads = value_and_grads(loss_fn, z1, z2, kwargs, loss_fn.draws)
    assert loss.dtype == torch.float32
    assert all(g.dtype == dtype for g in grads)
    up = {k: (v.float() if v.is_floating_point() else v) for k, v in kwargs.items()}
    a, b = (z.detach().float().requires_grad_() for z in (z1, z2))
    ref, ref_grads = value_and_grads(loss_fn, a, b, up, loss_fn.draws)
    assert_close(loss, ref, what="loss")
    for x, y in zip(grads, ref_grads):
        assert_close(x.float(), y.to(dtype).float(), rtol=1e-2, what="grad")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HARDNEG_TEST_INDUCTOR") != "1",
    reason="inductor compiles for 1-3 minutes on a 2-core CPU; set HARDNEG_TEST_INDUCTOR=1",
)
def test_inductor_infonce_in_batch_equals_eager():
    loss_fn = hardneg.create_loss("infonce", check_inputs=False)
    compiled = torch.compile(loss_fn, backend="inductor", fullgraph=True)
    z1, z2, kwargs = inputs("in_batch")
    le, ge = value_and_grads(loss_fn, z1, z2, kwargs, False)
    lc, gc = value_and_grads(compiled, z1, z2, kwargs, False)
    assert_close(lc, le)
    for a, b in zip(gc, ge):
        assert_close(a, b)
