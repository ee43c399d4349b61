"""Forward + backward time of every registered loss relative to ``infonce``, measured in one run.

For each set-up (in-batch, or a pool of K negatives) and batch size N the losses are timed in
interleaved rounds (infonce, debiased, hcl, ..., then the reverse order), so that a change of
machine load hits all of them alike; the table reports, per loss, the median over rounds of
its time divided by the time of ``infonce`` in the same round, and infonce's median time.
Inputs are not validated (``check_inputs=False``), so the ratios are those of the losses.

Examples:
    python benchmarks/loss_overhead.py                  # full table (several minutes on 2 cores)
    python benchmarks/loss_overhead.py --quick          # N = 256 only, in-batch and K = 4096
    python benchmarks/loss_overhead.py --sizes 512,1024 --pools 0,65536 --repeats 15

With ``--floor`` (default) a second table gives each loss's *product floor*: the time of the
matrix products (``mm``, ``addmm``, ``bmm``) that one forward + backward of the loss performs,
recorded from the loss itself in the same cell and replayed alone on operands of the same shapes
and layouts, divided by infonce's full step, in the same interleaved rounds. No implementation of
the same products can run below it, so a target under the floor is out of reach by arithmetic
(the loss docstrings say why each product is needed). A loss that weights every candidate
(debiased, hcl, unremix, potential) also does at least infonce's own non-product work (the
log-sum-exp over the logits and its backward); the list of misses adds that share,
``1 - floor(infonce)``, to the loss's product floor (ring's band can skip part of it).

Targets (README): <= 1.15x for debiased, hcl, ring; <= 1.5x for unremix and potential.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hardneg

TARGETS = {"debiased": 1.15, "hcl": 1.15, "ring": 1.15, "unremix": 1.5, "potential": 1.5}


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def make_step(loss_fn, z1, z2, pool):
    """One forward + backward, gradients cleared so every call does the same work."""

    def step() -> None:
        z1.grad = None
        z2.grad = None
        if pool is None:
            loss = loss_fn(z1, z2)
        else:
            loss = loss_fn(z1, z2, negatives=pool)
        loss.backward()

    return step


_PRODUCTS = {
    torch.ops.aten.mm.default: (0, 1),
    torch.ops.aten.mm.out: (0, 1),
    torch.ops.aten.addmm.default: (1, 2),
    torch.ops.aten.addmm.out: (1, 2),
    torch.ops.aten.bmm.default: (0, 1),
    torch.ops.aten.baddbmm.default: (1, 2),
}


class RecordProducts(TorchDispatchMode):
    """Records the operands' shape, strides and dtype of every matrix product dispatched while
    active (forward and backward run on this thread on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.products: list[tuple[tuple, tuple, tuple, tuple, torch.dtype, torch.device]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = _PRODUCTS.get(func)
        if where is not None:
            a, b = args[where[0]], args[where[1]]
            self.products.append(
                (tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), a.dtype, a.device)
            )
        return func(*args, **(kwargs or {}))


def _operand(shape: tuple, stride: tuple, dtype: torch.dtype, device, gen) -> torch.Tensor:
    """A random tensor of ``shape`` laid out like the recorded operand (row-major, or a
    transposed view of a row-major one), so that the BLAS call sees the same layout."""
    transposed = len(shape) >= 2 and stride[-2] == 1 and shape[-2] > 1 and stride[-1] != 1
    if transposed:
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return torch.randn(swapped, generator=gen).to(dtype=dtype, device=device).transpose(-1, -2)
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)


def products_step(step, seed: int = 0):
    """A step that runs, alone, the matrix products one call of ``step`` performs."""
    recorder = RecordProducts()
    with recorder:
        step()
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for a_shape, a_stride, b_shape, b_stride, dtype, device in recorder.products:
        a = _operand(a_shape, a_stride, dtype, device, gen)
        b = _operand(b_shape, b_stride, dtype, device, gen)
        calls.append((torch.bmm if a.dim() == 3 else torch.mm, a, b))

    def replay() -> None:
        for product, a, b in calls:
            product(a, b)

    replay.flops = sum(2 * a.numel() * b.shape[-1] for _, a, b in calls)  # type: ignore[attr-defined]
    return replay


def time_cell(
    names: list[str],
    n: int,
    dim: int,
    pool_size: int,
    repeats: int,
    warmup: int,
    seed: int,
    min_seconds: float = 3.0,
    max_repeats: int = 60,
    estimator: str = "median",
    floors: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per forward+backward of each loss in one (N, K) cell, and the median over
    rounds of each loss's time divided by infonce's time in the same round (robust to load that
    drifts between rounds). Runs at least ``repeats`` rounds and, for fast cells, more until
    ``min_seconds`` have passed (at most ``max_repeats``). ``estimator='min'`` uses the fastest
    round of each loss instead (times and ratios). ``floors`` adds, for every loss ``x``, an
    entry ``floor:x``: its matrix products replayed alone (:func:`products_step`)."""
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, dim, generator=gen).requires_grad_()
    z2 = torch.randn(n, dim, generator=gen).requires_grad_()
    pool = None if pool_size == 0 else torch.randn(pool_size, dim, generator=gen)
    steps = {}
    for name in names:
        loss_fn = hardneg.create_loss(name, check_inputs=False)
        steps[name] = make_step(loss_fn, z1, z2, pool)
    if floors:
        for name in names:
            steps[f"floor:{name}"] = products_step(steps[name], seed)
        names = [*names, *(f"floor:{name}" for name in names)]
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in names}
    start_cell = time.perf_counter()
    r = 0
    while r < repeats or (time.perf_counter() - start_cell < min_seconds and r < max_repeats):
        # alternate the order so that no loss always runs right after the same neighbour
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
        r += 1
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = times[names[0]]
    ratios = {name: statistics.median(a / b for a, b in zip(t, base)) for name, t in times.items()}
    return medians, ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512,1024", help="batch sizes N (comma-separated)")
    parser.add_argument(
        "--pools", default="0,4096,65536", help="pool sizes K, 0 = in-batch (comma-separated)"
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--estimator",
        choices=("median", "min"),
        default="median",
        help="median of per-round ratios (default) or ratio of the fastest rounds",
    )
    parser.add_argument(
        "--repeats", type=int, default=11, help="timed rounds per cell (fast cells run more)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--losses", default=None, help="losses besides infonce (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="N = 256, in-batch and K = 4096, 5 rounds"
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time each loss's matrix products alone (the product floor table)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.pools, args.repeats = "256", "0,4096", 5
    torch.set_num_threads(args.threads)
    others = (
        [x for x in hardneg.list_losses() if x != "infonce"]
        if args.losses is None
        else [x.strip() for x in args.losses.split(",") if x.strip() and x.strip() != "infonce"]
    )
    names = ["infonce", *others]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), d = {args.dim}, "
        f">= {args.repeats} interleaved rounds per cell, estimator {args.estimator}; "
        f"load average at start {load:.2f}"
    )
    print()
    header = ["set-up", "N", f"infonce ({args.estimator}, ms)", *(f"{x} (x)" for x in others)]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * len(header)) + "|")
    misses = []
    floor_rows = []
    for pool_size in parse_ints(args.pools):
        for n in parse_ints(args.sizes):
            med, ratios = time_cell(
                names,
                n,
                args.dim,
                pool_size,
                args.repeats,
                args.warmup,
                args.seed,
                estimator=args.estimator,
                floors=args.floor,
            )
            base = med["infonce"]
            setup = "in-batch" if pool_size == 0 else f"pool K={pool_size}"
            cells = []
            for name in others:
                ratio = ratios[name]
                target = TARGETS.get(name)
                flag = ""
                if target is not None and ratio > target:
                    flag = " (!)"
                    floor = ratios.get(f"floor:{name}")
                    why = ""
                    if floor is not None:
                        # infonce's own non-product work: the log-sum-exp over the logits and
                        # its backward, which every loss that weights all candidates also does
                        rest = max(0.0, 1.0 - ratios["floor:infonce"])
                        why = (
                            f" (product floor {floor:.2f}x; with infonce's non-product work "
                            f"{floor + rest:.2f}x)"
                        )
                    misses.append(f"{name} N={n} K={pool_size or 'in-batch'}: {ratio:.2f}x{why}")
                cells.append(f"{ratio:.2f}{flag}")
            print(f"| {setup} | {n} | {base * 1e3:.1f} | " + " | ".join(cells) + " |", flush=True)
            if args.floor:
                floor_rows.append(
                    f"| {setup} | {n} | "
                    + " | ".join(
                        f"{ratios[f'floor:{name}']:.2f}"
                        + (
                            " (!)"
                            if ratios[f"floor:{name}"] > TARGETS.get(name, float("inf"))
                            else ""
                        )
                        for name in names
                    )
                    + " |"
                )
    if floor_rows:
        print()
        print("Product floor: the loss's matrix products alone, relative to infonce's full step")
        print("((!) = the products alone exceed the target)")
        print()
        header = ["set-up", "N", *(f"{x} (x)" for x in names)]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * len(header)) + "|")
        print("\n".join(floor_rows))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(f"load average at end {load:.2f}; (!) = above target {TARGETS}")
    for miss in misses:
        print(f"  miss: {miss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
