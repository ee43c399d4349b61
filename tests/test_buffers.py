"""Reused CPU buffers of tensors saved for the backward (``hardneg._buffers.FreeBuffers``):
a buffer is handed out again only once nothing holds it, so losses that use them give the same
results when called twice before one backward, or backpropagated twice."""

from __future__ import annotations

import pytest
import torch

import hardneg
from hardneg._buffers import FreeBuffers


def test_a_buffer_is_reused_only_once_released():
    pool = FreeBuffers()
    first = pool.get("x", (4, 3), torch.float32, "cpu")
    assert pool.get("x", (4, 3), torch.float32, "cpu") is first  # held by the pool alone
    view = first[1:]
    assert pool.get("x", (4, 3), torch.float32, "cpu") is not first  # a view holds it
    del view
    second = pool.get("x", (4, 3), torch.float32, "cpu")
    alias = second.detach()
    assert pool.get("x", (4, 3), torch.float32, "cpu") is not second  # an alias holds it
    del alias
    assert pool.get("x", (5, 3), torch.float32, "cpu").shape == (5, 3)


def _step(loss_fn, z1, z2, twice: bool):
    gen = torch.Generator().manual_seed(3)
    a = loss_fn(z1, z2, generator=gen)
    b = loss_fn(z2, z1, generator=gen) if twice else None
    return a, b


@pytest.mark.parametrize("name", ["unremix", "potential"])
def test_two_calls_before_one_backward_match_separate_steps(name):
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 8, generator=gen, requires_grad=True)
    z2 = torch.randn(12, 8, generator=gen, requires_grad=True)
    # reference: each call on a fresh module, back-propagated at once
    draws = torch.Generator().manual_seed(3)
    ref_a = hardneg.create_loss(name)(z1, z2, generator=draws)
    (grad_a,) = torch.autograd.grad(ref_a, z1)
    ref_b = hardneg.create_loss(name)(z2, z1, generator=draws)
    (grad_b,) = torch.autograd.grad(ref_b, z1)
    loss_fn = hardneg.create_loss(name)
    for _ in range(2):  # the second round runs on the buffers of the first
        a, b = _step(loss_fn, z1, z2, twice=True)
        for _ in range(2):  # retain_graph: the saved buffers must survive the first backward
            (got_a,) = torch.autograd.grad(a, z1, retain_graph=True)
            (got_b,) = torch.autograd.grad(b, z1, retain_graph=True)
            torch.testing.assert_close(a, ref_a, rtol=0, atol=0)
            torch.testing.assert_close(b, ref_b, rtol=0, atol=0)
            torch.testing.assert_close(got_a, grad_a, rtol=0, atol=0)
            torch.testing.assert_close(got_b, grad_b, rtol=0, atol=0)
