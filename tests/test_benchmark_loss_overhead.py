"""The loss-overhead benchmark: its product floor replays exactly the products a loss performs;
its tables (time per thread setting, peak memory, graph breaks) come out of one tiny run."""

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


@pytest.mark.parametrize("name", [x for x in hardneg.list_losses() if x != "debiased"])
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


def test_threads_default_means_torchs_default(bench):
    assert bench.parse_threads("default,1") == [torch.get_num_threads(), 1] or (
        torch.get_num_threads() == 1 and bench.parse_threads("default,1") == [1]
    )
    assert bench.parse_threads("3, 1,3") == [3, 1]


def test_time_cell_reports_ratios_per_thread_setting(bench):
    out = bench.time_cell(["infonce", "hcl"], 8, 4, 0, 2, 0, 0, threads=[1, 2], min_seconds=0)
    assert sorted(out) == [1, 2]
    for medians, ratios in out.values():
        assert ratios["infonce"] == 1.0 and ratios["hcl"] > 0 and medians["hcl"] > 0
    assert torch.get_num_threads() == bench.DEFAULT_THREADS


def test_peak_memory_grows_with_the_problem(bench):
    small = bench.peak_in_subprocess("infonce", 64, 16, 0, 1)
    large = bench.peak_in_subprocess("infonce", 1024, 16, 0, 1)
    # [2N, 2N] float32 logits: 16 MiB at N = 1024, several copies alive in the backward
    assert large > 16 * 2**20 > small >= 0


def test_graph_breaks_are_counted(bench, monkeypatch):
    assert bench.graph_breaks("hcl", "pool+exclude_index") == "0"
    assert bench.graph_breaks("unremix", "hard_negatives") == "0"
    # a loss that draws is counted as it compiles: on torch's global RNG (a generator= argument
    # cannot be traced and broke potential's graph 22 times)
    assert bench.graph_breaks("potential", "pool+exclude_index") == "0"
    # a host sync on a tensor value inside the loss is a graph break
    from hardneg.strategies import importance

    original = importance.ImportanceNegatives.select

    def select(self, contrast, context):
        if bool(contrast.negative_logits.max() > 100):
            return original(self, contrast, context)
        return original(self, contrast, context)

    monkeypatch.setattr(importance.ImportanceNegatives, "select", select)
    assert bench.graph_breaks("hcl", "in-batch") not in ("0", "-")


def test_main_prints_time_floor_memory_and_graph_break_tables(bench, capsys):
    args = (
        "--sizes 8 --pools 0,32 --repeats 1 --warmup 0 --threads default,1 --losses hcl "
        "--memory-cells 16:0"
    )
    assert bench.main(args.split()) == 0
    out = capsys.readouterr().out
    threads = bench.parse_threads("default,1")
    for t in threads:
        # printed as measured, then in the table: time and floor rows per thread setting
        assert (
            out.count(f"| {t} | in-batch | 8 |") == 3 and out.count(f"| {t} | pool K=32 | 8 |") == 3
        )
    assert "Product floor" in out and "Peak memory" in out and "| in-batch | 16 |" in out
    assert "Graph breaks" in out and "| hcl | 0 | 0 | 0 | 0 |" in out


def test_in_batch_defaults_get_their_own_column(bench, capsys):
    """``mochi`` is timed with the registry defaults and, in a column of its own, with the
    ``in_batch_defaults`` that compare / demo use; ``--in-batch-defaults ''`` drops it."""
    loss = bench.make_loss("mochi (in-batch defaults)")
    assert loss.strategy.hparams() == {"num_hardest": 128, "num_mixed": 128, "num_query_mixed": 32}
    assert bench.make_loss("mochi").strategy.num_hardest == 1024
    args = "--sizes 8 --pools 0 --repeats 1 --warmup 0 --threads 1 --losses mochi --no-floor"
    args += " --no-memory --no-graph-breaks"
    assert bench.main(args.split()) == 0
    assert "| mochi (x) | mochi (in-batch defaults) (x) |" in capsys.readouterr().out
    assert bench.main([*args.split(), "--in-batch-defaults", ""]) == 0
    assert "in-batch defaults" not in capsys.readouterr().out
