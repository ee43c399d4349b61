"""The loss-overhead benchmark: its product floor replays exactly the products a loss performs;
its tables (time per thread setting, peak memory, graph breaks) come out of one tiny run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from _bench import load_benchmark
from _same import assert_same
from torch.utils.flop_counter import FlopCounterMode

import hardneg

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_overhead.py"


@pytest.fixture(scope="module")
def bench():
    module = load_benchmark("loss_overhead")
    # main() pins glibc's malloc thresholds by default (--heap steady): not in the test process,
    # where it would outlive the test; the calls are counted instead (the real function:
    # real_steady_heap, tested below in a subprocess)
    module.real_steady_heap = module.steady_heap
    module.heap_calls = []
    module.steady_heap = lambda: module.heap_calls.append(1) or True
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


@pytest.mark.parametrize("pool_size", [0, 24])
def test_the_cross_entropy_reference_is_infonce(bench, pool_size):
    """The reference column computes the same loss as hardneg's infonce (in-batch: SimCLR's
    masked cross-entropy; with a pool: MoCo's ``[l_pos | l_neg]`` with label 0), with the same
    gradients, in float64."""
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pool = torch.randn(pool_size, 5, generator=g, dtype=torch.float64) if pool_size else None
    ours = hardneg.create_loss("infonce", temperature=0.3)(z1, z2, negatives=pool)
    ref = bench.make_loss(bench.REFERENCE, temperature=0.3)(z1, z2, negatives=pool)
    torch.testing.assert_close(ref, ours, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(x, (z1, z2)) for x in (ref, ours)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


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


# ------------------------------------------------------------------------------------------------
# --device: the CPU tables keep their form; CUDA runs where there is one (tools/device_check.sh)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _spy_inputs(bench, monkeypatch) -> list:
    """The (z1, z2, pool) every step of ``time_cell`` is built on."""
    seen = []
    real = bench.make_step

    def spy(loss_fn, z1, z2, pool):
        seen.append((z1, z2, pool))
        return real(loss_fn, z1, z2, pool)

    monkeypatch.setattr(bench, "make_step", spy)
    return seen


def test_cpu_inputs_are_the_draws_of_a_cpu_generator(bench, monkeypatch):
    """The default device keeps the inputs of earlier tables: z1, z2 and the pool are torch's
    first three draws of a CPU generator seeded with ``seed``."""
    seen = _spy_inputs(bench, monkeypatch)
    bench.time_cell(["infonce"], 8, 4, 16, 1, 0, 5, threads=[1], min_seconds=0)
    g = torch.Generator().manual_seed(5)
    want = [torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)]
    want.append(torch.randn(16, 4, generator=g))
    for got, expected in zip(seen[0], want):
        assert_same(got.detach(), expected)  # float32 on the CPU, as in earlier tables


def test_cpu_tables_keep_their_form(bench, capsys):
    """The CPU output people compare with earlier tables: the header line, the column names and
    one row per thread setting, as before ``--device`` timed on a GPU."""
    args = "--sizes 8 --pools 0 --repeats 1 --warmup 0 --threads 1 --losses hcl --no-memory"
    assert bench.main(args.split()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        r"torch \S+, \d+ CPU\(s\), threads \[1\] \(torch's default: \d+\), d = 128, >= 1 "
        r"interleaved rounds per cell, estimator median; heap steady \(glibc thresholds "
        r"pinned\); load average at start [\d.]+",
        lines[0],
    ), lines[0]
    row = r"\| 1 \| in-batch \| 8 \| \d+\.\d \| \d+\.\d\d( \(!\))? \| \d+\.\d\d \|"
    assert re.fullmatch(row, lines[1]), lines[1]
    at = lines.index(
        "| threads | set-up | N | infonce (median, ms) | hcl (x) | cross-entropy (x) |"
    )
    assert lines[at + 1] == "|---|---|---|---|---|---|" and re.fullmatch(row, lines[at + 2])
    at = lines.index(  # the product floor
        "| threads | set-up | N | infonce (x) | hcl (x) | cross-entropy (x) |"
    )
    assert re.fullmatch(
        r"\| 1 \| in-batch \| 8 \| \d+\.\d\d \| \d+\.\d\d( \(!\))? \| \d+\.\d\d \|",
        lines[at + 2],
    )
    assert lines.index("| loss | in-batch | pool | pool+exclude_index | hard_negatives |") > at
    assert not any("cuda" in line for line in lines)


def test_cuda_without_a_gpu_is_a_one_line_error(bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda", "--sizes", "8", "--pools", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing measured, not even the header
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0]
    assert "torch.cuda.is_available() is False" in lines[0]


@pytest.mark.parametrize("workers", [1, 3])
def test_memory_rows_map_each_peak_to_its_loss(bench, monkeypatch, capsys, workers):
    """One measuring process per loss, one at a time or ``workers`` at a time (as on CUDA): each
    loss's ratio is its own peak over infonce's. With 3 workers the three measurements of a
    cell must be in flight together (a barrier of 3 would break if they ran one by one)."""
    peaks = {"infonce": 4 * 2**20, "hcl": 2 * 2**20, "ring": 10 * 2**20}
    barrier = threading.Barrier(workers, timeout=30)

    def fake_peak(name, n, dim, pool_size, threads, device):
        assert (dim, threads, device) == (16, 1, "cpu")
        barrier.wait()
        return peaks[name] * (2 if pool_size else 1)

    monkeypatch.setattr(bench, "peak_in_subprocess", fake_peak)
    rows, misses = bench.memory_table(
        ["infonce", "hcl", "ring"], [(8, 0), (8, 32)], 16, 1, "cpu", workers
    )
    assert rows == [
        "| in-batch | 8 | 4 | 0.50 | 2.50 (!) |",
        "| pool K=32 | 8 | 8 | 0.50 | 2.50 (!) |",
    ]
    assert misses == [
        "ring in-batch N=8: peak 2.50x infonce (10 MiB)",
        "ring pool K=32 N=8: peak 2.50x infonce (20 MiB)",
    ]
    assert capsys.readouterr().out.splitlines() == rows


def test_cpu_memory_is_measured_one_process_at_a_time(bench, monkeypatch):
    """Resident-set peaks of the earlier CPU tables were taken with nothing else measuring."""
    seen = []
    monkeypatch.setattr(bench, "memory_table", lambda *args: (seen.append(args), ([], []))[1])
    assert bench.main(["--sizes", "", "--no-graph-breaks", "--memory-cells", "16:0"]) == 0
    assert len(seen) == 1 and seen[0][1:] == ([(16, 0)], 128, bench.DEFAULT_THREADS, "cpu", 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_has_no_traceback_from_the_command_line():
    env = {**os.environ, "PYTHONPATH": str(_PATH.parents[1] / "src")}
    run = subprocess.run(
        [sys.executable, str(_PATH), "--device", "cuda"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("loss_overhead.py: error: --device cuda, but ")
    assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr


@needs_cuda
def test_time_cell_on_cuda_synchronises_around_every_timed_step(bench, monkeypatch):
    """Inputs drawn on the GPU by a CUDA generator, and a synchronisation before and after each
    timed step (plus one after the warm-up): without them the clock would stop at the launch."""
    seen = _spy_inputs(bench, monkeypatch)
    calls = []
    real_sync = torch.cuda.synchronize

    def counting_sync(*args, **kwargs):
        calls.append(1)
        return real_sync(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "synchronize", counting_sync)
    out = bench.time_cell(
        ["infonce", "hcl"], 8, 4, 16, 3, 1, 5, threads=[1], min_seconds=0, device="cuda"
    )
    assert len(calls) == 2 * 3 * 2 + 1  # 3 rounds x 2 losses x (before, after) + warm-up
    g = torch.Generator(device="cuda").manual_seed(5)
    want = [torch.randn(8, 4, generator=g, device="cuda") for _ in range(2)]
    want.append(torch.randn(16, 4, generator=g, device="cuda"))
    for got, expected in zip(seen[0], want):
        assert got.device.type == "cuda"
        assert_same(got.detach(), expected)
    medians, ratios = out[1]
    assert ratios["infonce"] == 1.0 and ratios["hcl"] > 0 and medians["hcl"] > 0


@needs_cuda
def test_replayed_products_on_cuda_include_the_backward(bench):
    """On CUDA the backward runs on autograd's device thread: the recorder must still see its
    products (more flops than the forward alone), and the replay has the loss's flops."""
    for name in [x for x in hardneg.list_losses() if x != "debiased"]:
        for pool_size in (0, 96):
            gen = torch.Generator().manual_seed(0)
            z1 = torch.randn(16, 8, generator=gen).cuda().requires_grad_()
            z2 = torch.randn(16, 8, generator=gen).cuda().requires_grad_()
            pool = torch.randn(pool_size, 8, generator=gen).cuda() if pool_size else None
            loss_fn = hardneg.create_loss(name)
            with FlopCounterMode(display=False) as forward:
                kwargs = {"generator": torch.Generator(device="cuda")} if loss_fn.draws else {}
                loss_fn(z1, z2, negatives=pool, **kwargs)
            step = bench.make_step(loss_fn, z1, z2, pool)
            with FlopCounterMode(display=False) as counter:
                step()
            replay = bench.products_step(step)
            assert replay.flops == counter.get_total_flops(), (name, pool_size)
            assert replay.flops > forward.get_total_flops() > 0, (name, pool_size)


@needs_cuda
def test_peak_memory_on_cuda_grows_with_the_problem(bench):
    small = bench.peak_in_subprocess("infonce", 64, 16, 0, 1, "cuda")
    large = bench.peak_in_subprocess("infonce", 1024, 16, 0, 1, "cuda")
    # CUDA's allocator counts tensors only: at least the [N, 2N] float32 logits (8 MiB)
    assert large > 8 * 2**20 > small >= 0


@needs_cuda
def test_main_on_cuda_prints_every_table(bench, capsys):
    args = (
        "--device cuda --sizes 8 --pools 0,32 --repeats 1 --warmup 0 --threads default,1 "
        "--losses hcl --memory-cells 16:0"
    )
    assert bench.main(args.split()) == 0
    out = capsys.readouterr().out
    assert "threads: not applicable on cuda, one column" in out.splitlines()[0]
    # one setting whatever --threads says: rows as measured, in the table and in the floor's
    assert out.count("| cuda | in-batch | 8 |") == 3 and out.count("| cuda | pool K=32 | 8 |") == 3
    assert "| device | set-up | N | infonce (median, ms) | hcl (x) |" in out
    assert "| 1 | in-batch" not in out and "| threads |" not in out
    assert "(CUDA max_memory_allocated above the inputs)" in out and "| in-batch | 16 |" in out
    assert "on cuda inputs" in out and "| hcl | 0 | 0 | 0 | 0 |" in out


def test_steady_heap_pins_glibcs_two_thresholds(bench, monkeypatch):
    """``--heap steady`` sets glibc's mmap threshold to its 64-bit ceiling (32 MiB: the
    ``[2N, 2N]`` buffers of N = 1024 and the N x 4096 pool logits come from the heap) and its
    trim threshold to 1 GiB (freed pages stay), through ``mallopt``; False off glibc."""
    import ctypes

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert bench.real_steady_heap() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    def no_libc(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert bench.real_steady_heap() is False


def test_main_pins_the_heap_unless_told_adaptive(bench, capsys):
    """``--heap steady`` (the default) calls :func:`steady_heap` once before timing and says so
    in the header; ``--heap adaptive`` leaves glibc as it is and says that."""
    args = "--sizes 8 --pools 0 --repeats 1 --warmup 0 --threads 1 --losses hcl --no-memory"
    args += " --no-graph-breaks --no-floor"
    bench.heap_calls.clear()
    assert bench.main(args.split()) == 0
    assert bench.heap_calls == [1]
    assert "; heap steady (glibc thresholds pinned);" in capsys.readouterr().out
    assert bench.main([*args.split(), "--heap", "adaptive"]) == 0
    assert bench.heap_calls == [1]
    assert "; heap adaptive (glibc's defaults);" in capsys.readouterr().out


def test_steady_heap_keeps_freed_pages_for_the_next_step():
    """In a fresh process after :func:`steady_heap`, a step's 4 MiB and 16 MiB buffers, freed
    and allocated again, cost no new page faults (counted by ``getrusage``): the pages stay
    with the process. Linux glibc only."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt and ru_minflt: Linux only")
    code = f"""
import importlib.util, resource, numpy as np
spec = importlib.util.spec_from_file_location("b", {str(_PATH)!r})
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
assert b.steady_heap()
faults = []
for size in [16 << 20, 4 << 20, 16 << 20, 4 << 20, 16 << 20]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(size // 4, dtype=np.float32)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    faults = [int(x) for x in run.stdout.strip().strip("[]").split(",")]
    assert faults[0] > 0  # the first 16 MiB: fresh pages (fewer with transparent huge pages)
    assert max(faults[1:]) * 10 < faults[0], faults
