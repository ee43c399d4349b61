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

Targets (README): <= 1.15x for debiased, hcl, ring; <= 1.5x for unremix and potential.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

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
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per forward+backward of each loss in one (N, K) cell, and the median over
    rounds of each loss's time divided by infonce's time in the same round (robust to load that
    drifts between rounds). Runs at least ``repeats`` rounds and, for fast cells, more until
    ``min_seconds`` have passed (at most ``max_repeats``). ``estimator='min'`` uses the fastest
    round of each loss instead (times and ratios)."""
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, dim, generator=gen).requires_grad_()
    z2 = torch.randn(n, dim, generator=gen).requires_grad_()
    pool = None if pool_size == 0 else torch.randn(pool_size, dim, generator=gen)
    steps = {}
    for name in names:
        loss_fn = hardneg.create_loss(name, check_inputs=False)
        steps[name] = make_step(loss_fn, z1, z2, pool)
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
            )
            base = med["infonce"]
            cells = []
            for name in others:
                ratio = ratios[name]
                target = TARGETS.get(name)
                flag = ""
                if target is not None and ratio > target:
                    flag = " (!)"
                    misses.append(f"{name} N={n} K={pool_size or 'in-batch'}: {ratio:.2f}x")
                cells.append(f"{ratio:.2f}{flag}")
            setup = "in-batch" if pool_size == 0 else f"pool K={pool_size}"
            print(f"| {setup} | {n} | {base * 1e3:.1f} | " + " | ".join(cells) + " |", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(f"load average at end {load:.2f}; (!) = above target {TARGETS}")
    for miss in misses:
        print(f"  miss: {miss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
