"""The loss-overhead benchmark's product floor replays exactly the products a loss performs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import hardneg

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("loss_overhead", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["infonce", "unremix", "potential", "ring"])
@pytest.mark.parametrize("pool_size", [0, 96])
def test_replayed_products_have_the_flops_the_loss_performs(bench, name, pool_size):
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(16, 8, generator=gen).requires_grad_()
    z2 = torch.randn(16, 8, generator=gen).requires_grad_()
    pool = torch.randn(pool_size, 8, generator=gen) if pool_size else None
    step = bench.make_step(hardneg.create_loss(name), z1, z2, pool)
    with FlopCounterMode(display=False) as counter:
        step()
    replay = bench.products_step(step)
    assert replay.flops == counter.get_total_flops() > 0
    with FlopCounterMode(display=False) as counter:
        replay()
    assert counter.get_total_flops() == replay.flops


def test_transposed_operands_keep_their_layout(bench):
    a = torch.randn(5, 3).T
    copy = bench._operand(tuple(a.shape), a.stride(), a.dtype, a.device, torch.Generator())
    assert copy.shape == a.shape and copy.stride() == a.stride()


def test_main_prints_ratio_and_floor_tables(bench, capsys):
    args = "--sizes 8 --pools 0,32 --repeats 1 --warmup 0 --threads 1 --losses unremix"
    assert bench.main(args.split()) == 0
    out = capsys.readouterr().out
    assert out.count("| in-batch | 8 |") == 2 and out.count("| pool K=32 | 8 |") == 2
    assert "Product floor" in out
