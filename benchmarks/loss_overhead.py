"""Forward + backward time and peak memory of every registered loss relative to ``infonce``,
and each loss's graph breaks under ``torch.compile``, measured in one run.

**Time.** For each set-up (in-batch, or a pool of K negatives) and batch size N the losses are
timed in interleaved rounds: each round runs every thread setting of ``--threads`` (e.g.
torch's default and 1) and, within it, every loss (infonce, debiased, hcl, ..., the order
reversed every other round), so that a change of machine load hits all of them alike; the table
reports, per thread setting and loss, the median over rounds of its time divided by the time of
``infonce`` in the same round and thread setting, and infonce's median time. Inputs are not
validated (``check_inputs=False``), so the ratios are those of the losses.

**On a GPU** (``--device cuda``): the inputs, the losses' generators and the replayed products
of the floor live on the GPU, and every timed step runs between two ``torch.cuda.synchronize()``
calls, so that it counts the host's dispatch and the kernels up to their end, and nothing queued
by the step before. Thread settings do not apply (the host keeps torch's default): the tables
have one setting, labelled ``cuda``. The memory and graph-break tables run on the GPU too.

**Reference** (``--reference``, default): a last column ``cross-entropy`` times InfoNCE as most
SimCLR / MoCo code bases write it (``F.cross_entropy`` over the masked ``[2N, 2N]`` logits, or
over ``[q . k | q . pool]``; :class:`CrossEntropyReference`, the same value), relative to
hardneg's ``infonce`` like every other column: what the targets' baseline costs against the
usual alternative, measured in the same rounds. A loss's ratio to the reference is its ratio
divided by the reference's.

**Heap** (``--heap``, default ``steady``): the timing process pins glibc's malloc thresholds
(:func:`steady_heap`), so that a step's buffers reuse the pages of the step before whatever
ran before it; ``--heap adaptive`` keeps glibc's adaptive thresholds (the tables of sessions
before 11). The peak-memory subprocesses keep glibc's defaults.

**Product floor** (``--floor``, default): the time of the matrix products (``mm``, ``addmm``,
``bmm``) that one forward + backward of the loss performs, recorded from the loss itself in the
same cell and replayed alone on operands of the same shapes and layouts, divided by infonce's
full step, in the same interleaved rounds. No implementation of the same products can run below
it. A loss that weights every candidate also does at least infonce's own non-product work (the
log-sum-exp over the logits and its backward); the list of misses adds that share,
``1 - floor(infonce)``, to the loss's product floor.

**Peak memory** (``--memory``): one forward + backward per loss, each in a fresh subprocess (on
CUDA up to 8 at a time), on the CPU: the process's resident-set high-water mark (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` just before the step) minus its resident set just before the step
(inputs already allocated, torch warmed up on a tiny call). This counts the pages the step
actually touches, torch's allocations included (``tracemalloc`` does not see them); on CUDA the
same is read from ``torch.cuda.max_memory_allocated``.

**Graph breaks** (``--graph-breaks``): ``torch._dynamo.explain`` of each loss and call form at
``check_inputs=False`` (the plain path: fast paths are off under ``torch.compile``), with no
``generator=`` argument: the losses that draw take torch's global RNG when compiled (dynamo
cannot trace a ``torch.Generator`` input; given one, they break the graph at each draw).

Examples:
    python benchmarks/loss_overhead.py --threads default,1      # full run (~10 min on 2 cores)
    python benchmarks/loss_overhead.py --quick                  # N = 256, in-batch and K = 4096
    python benchmarks/loss_overhead.py --sizes 512 --pools 0 --no-memory --no-graph-breaks
    python benchmarks/loss_overhead.py --device cuda --repeats 5   # on a GPU (tools/device_check.sh)

**In-batch defaults** (``--in-batch-defaults``, default ``mochi``): for each loss named there
that is measured and whose strategy has ``in_batch_defaults`` (the hyper-parameters ``hardneg
compare`` / ``demo`` use on in-batch negatives), an extra column ``NAME (in-batch defaults)``
times it with those settings, next to the registry defaults' column (MoCHi: ``N = 128, s = 128,
s' = 32`` against the paper's ``1024 / 1024 / 128``), in every set-up.

Targets (issue 15): <= 1.15x for debiased, hcl, ring; <= 1.5x for unremix and potential;
peak memory <= 2x infonce's; 0 graph breaks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hardneg

TARGETS = {"debiased": 1.15, "hcl": 1.15, "ring": 1.15, "unremix": 1.5, "potential": 1.5}
MEMORY_TARGET = 2.0


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (4 * 1024 * 1024 * sizeof(long))


def steady_heap() -> bool:
    """Pin glibc's allocator: blocks up to 32 MiB come from the heap (``M_MMAP_THRESHOLD``) and
    freed memory is not handed back to the system (``M_TRIM_THRESHOLD`` 1 GiB), so that every
    step reuses the pages of the one before, as with tcmalloc or jemalloc. By default glibc
    adapts both thresholds to the blocks freed so far: whether a loss's ``[2N, 2N]`` buffers
    cost fresh pages (page faults, ~2 us a page here) then depends on which losses ran before
    it in the process: measured 2026-12-02, ring's in-batch N = 512 ratio at 2 threads was
    1.36 in a run of six losses and 0.78-0.99 in runs of infonce and ring alone. False (nothing
    changed) off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    )


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_threads(text: str) -> list[int]:
    """``'default,1'`` -> ``[torch's default thread count, 1]`` (duplicates kept once)."""
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        value = DEFAULT_THREADS if item == "default" else int(item)
        if value not in out:
            out.append(value)
    return out


DEFAULT_THREADS = torch.get_num_threads()


IN_BATCH_SUFFIX = " (in-batch defaults)"

# the usual hand-written form, timed beside infonce (``--reference``): hardneg's own InfoNCE is
# the baseline of the targets; this column says what that baseline costs against the two-line
# form most SimCLR / MoCo code bases use
REFERENCE = "cross-entropy"


class CrossEntropyReference(torch.nn.Module):
    """InfoNCE as SimCLR and MoCo code bases usually write it, with ``F.cross_entropy``.

    In-batch (SimCLR's ``info_nce_loss``): the ``[2N, 2N]`` cosine logits of ``[z1; z2]`` over
    ``t``, the diagonal at ``-inf``, the partner ``(i + N) mod 2N`` as the label. With a pool
    (MoCo): the logits ``[q . k | q . pool] / t`` of the normalised rows, label 0. The same
    value as ``hardneg.create_loss("infonce")``."""

    draws = False

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z1, z2, negatives=None, **_):
        t = self.temperature
        if negatives is None:
            z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
            logits = z @ z.T / t
            logits.fill_diagonal_(float("-inf"))
            n = z1.shape[0]
            labels = torch.arange(2 * n, device=z.device).roll(n)
            return torch.nn.functional.cross_entropy(logits, labels)
        q = torch.nn.functional.normalize(z1, dim=1)
        k = torch.nn.functional.normalize(z2, dim=1)
        queue = torch.nn.functional.normalize(negatives.detach(), dim=1)
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / t
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return torch.nn.functional.cross_entropy(logits, labels)


def make_loss(label: str, **settings):
    """The loss of a table column: a registered name, or ``NAME (in-batch defaults)`` for the
    strategy's ``in_batch_defaults`` (what ``compare`` / ``demo`` use on in-batch negatives)."""
    if label == REFERENCE:
        return CrossEntropyReference(settings.get("temperature", 0.5))
    if label.endswith(IN_BATCH_SUFFIX):
        name = label[: -len(IN_BATCH_SUFFIX)]
        defaults = hardneg.registry.strategy_class(name).in_batch_defaults
        return hardneg.create_loss(name, **{**defaults, **settings})
    return hardneg.create_loss(label, **settings)


def make_step(loss_fn, z1, z2, pool):
    """One forward + backward, gradients cleared so every call does the same work."""
    gen = torch.Generator(device=z1.device).manual_seed(0) if loss_fn.draws else None

    def step() -> None:
        z1.grad = None
        z2.grad = None
        kwargs = {} if gen is None else {"generator": gen}
        loss = loss_fn(z1, z2, negatives=pool, **kwargs)
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
    active (on the CPU the backward runs on this thread; on CUDA on autograd's device thread,
    which inherits the active dispatch modes with the rest of the thread-local state)."""

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
    threads: list[int] | None = None,
    min_seconds: float = 3.0,
    max_repeats: int = 60,
    estimator: str = "median",
    floors: bool = False,
    device: str = "cpu",
) -> dict[int, tuple[dict[str, float], dict[str, float]]]:
    """Per thread setting: median seconds per forward+backward of each loss in one (N, K) cell,
    and the median over rounds of each loss's time divided by infonce's time in the same round
    and thread setting (robust to load that drifts between rounds). Each round runs every thread
    setting, and within it every loss, in alternating orders. Runs at least ``repeats`` rounds
    and, for fast cells, more until ``min_seconds`` have passed (at most ``max_repeats``).
    ``estimator='min'`` uses the fastest round of each loss instead. ``floors`` adds, for every
    loss ``x``, an entry ``floor:x``: its matrix products replayed alone (:func:`products_step`).
    ``device='cuda'``: inputs on the GPU, each timed step between two synchronisations."""
    threads = threads or [torch.get_num_threads()]
    on_cuda = torch.device(device).type == "cuda"
    # drawn on the device by its own generator (on the CPU: the same draws as before the option)
    gen = torch.Generator(device=device).manual_seed(seed)
    z1 = torch.randn(n, dim, generator=gen, device=device).requires_grad_()
    z2 = torch.randn(n, dim, generator=gen, device=device).requires_grad_()
    pool = None if pool_size == 0 else torch.randn(pool_size, dim, generator=gen, device=device)
    steps = {}
    for name in names:
        loss_fn = make_loss(name, check_inputs=False)
        steps[name] = make_step(loss_fn, z1, z2, pool)
    if floors:
        for name in names:
            steps[f"floor:{name}"] = products_step(steps[name], seed)
        names = [*names, *(f"floor:{name}" for name in names)]
    for t in threads:
        torch.set_num_threads(t)
        for _ in range(warmup):
            for step in steps.values():
                step()
    if on_cuda:
        torch.cuda.synchronize()
    times = {t: {name: [] for name in names} for t in threads}
    start_cell = time.perf_counter()
    r = 0
    while r < repeats or (time.perf_counter() - start_cell < min_seconds and r < max_repeats):
        # alternate the orders so that no loss always runs right after the same neighbour
        for t in threads if r % 2 == 0 else threads[::-1]:
            torch.set_num_threads(t)
            for name in names if r % 2 == 0 else names[::-1]:
                if on_cuda:
                    # kernels are asynchronous: wait for the queue before the clock starts and
                    # for the step's own kernels before it stops (host time + device time)
                    torch.cuda.synchronize()
                start = time.perf_counter()
                steps[name]()
                if on_cuda:
                    torch.cuda.synchronize()
                times[t][name].append(time.perf_counter() - start)
        r += 1
    torch.set_num_threads(DEFAULT_THREADS)
    pick = statistics.median if estimator == "median" else min
    out = {}
    for t in threads:
        per = times[t]
        base = per[names[0]]
        medians = {name: pick(v) for name, v in per.items()}
        if estimator == "median":
            ratios = {
                name: statistics.median(a / b for a, b in zip(v, base)) for name, v in per.items()
            }
        else:
            ratios = {name: min(v) / min(base) for name, v in per.items()}
        out[t] = (medians, ratios)
    return out


# ------------------------------------------------------------------------------------------------
# peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(
    name: str, n: int, dim: int, pool_size: int, device: str = "cpu", seed: int = 0
) -> dict:
    """Peak memory (bytes) of one forward + backward of loss ``name`` in this process, above
    what the inputs already hold: CUDA's ``max_memory_allocated``, or on the CPU the resident-set
    high-water mark reset just before the step (Linux). Meant to run in a fresh subprocess."""
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, dim, generator=gen).to(device).requires_grad_()
    z2 = torch.randn(n, dim, generator=gen).to(device).requires_grad_()
    pool = None if pool_size == 0 else torch.randn(pool_size, dim, generator=gen).to(device)
    loss_fn = make_loss(name, check_inputs=False)
    # warm-up on tiny inputs: kernels, thread pools and lazy imports are not the loss's memory
    tiny = [torch.randn(8, dim, device=device).requires_grad_() for _ in range(2)]
    make_step(loss_fn, tiny[0], tiny[1], None if pool is None else pool[:16])()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        make_step(loss_fn, z1, z2, pool)()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated() - before, "method": "cuda"}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    make_step(loss_fn, z1, z2, pool)()
    return {"peak": (_status_kib("VmHWM") - before) * 1024, "method": "rss"}


def peak_in_subprocess(
    name: str, n: int, dim: int, pool_size: int, threads: int, device: str = "cpu"
) -> int:
    """:func:`measure_peak` in a fresh Python process (nothing freed earlier is reused)."""
    code = (
        f"import json, sys, torch; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import loss_overhead as b; "
        f"torch.set_num_threads({threads}); "
        f"print(json.dumps(b.measure_peak({name!r}, {n}, {dim}, {pool_size}, {device!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


def memory_table(
    names: list[str],
    cells: list[tuple[int, int]],
    dim: int,
    threads: int,
    device: str = "cpu",
    workers: int = 1,
) -> tuple[list[str], list[str]]:
    """Markdown rows of peak memory per loss (MiB for infonce, then ratios) and the misses.
    ``workers`` > 1 runs that many measuring subprocesses at a time (each reads its own peak)."""
    rows, misses = [], []
    for n, pool_size in cells:

        def peak(name: str, n: int = n, pool_size: int = pool_size) -> int:
            return peak_in_subprocess(name, n, dim, pool_size, threads, device)

        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                peaks = dict(zip(names, pool.map(peak, names)))
        else:
            peaks = {name: peak(name) for name in names}
        base = peaks[names[0]]
        setup = "in-batch" if pool_size == 0 else f"pool K={pool_size}"
        cells_txt = []
        for name in names[1:]:
            ratio = peaks[name] / base if base > 0 else float("nan")
            flag = " (!)" if ratio > MEMORY_TARGET else ""
            if flag:
                misses.append(
                    f"{name} {setup} N={n}: peak {ratio:.2f}x infonce ({peaks[name] / 2**20:.0f} MiB)"
                )
            cells_txt.append(f"{ratio:.2f}{flag}")
        rows.append(f"| {setup} | {n} | {base / 2**20:.0f} | " + " | ".join(cells_txt) + " |")
        print(rows[-1], flush=True)
    return rows, misses


# ------------------------------------------------------------------------------------------------
# graph breaks


GRAPH_FORMS = ("in-batch", "pool", "pool+exclude_index", "hard_negatives")


def graph_breaks(name: str, form: str, *, check_inputs: bool = False, device: str = "cpu") -> str:
    """Graph breaks of ``torch._dynamo.explain`` for one loss and call form, on inputs of
    ``device`` (``'-'``: the loss rejects that form; ``'error'``: capture failed)."""
    import torch._dynamo

    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 6, generator=gen).to(device).requires_grad_()
    z2 = torch.randn(8, 6, generator=gen).to(device).requires_grad_()
    kwargs: dict = {}
    if form.startswith("pool"):
        kwargs["negatives"] = torch.randn(24, 6, generator=gen).to(device)
        if form == "pool+exclude_index":
            kwargs["exclude_index"] = torch.arange(8, device=device)
    elif form == "hard_negatives":
        kwargs["hard_negatives"] = torch.randn(8, 2, 6, generator=gen).to(device)
    loss_fn = make_loss(name, check_inputs=check_inputs)
    # no generator= argument: dynamo cannot trace a torch.Generator input (a loss given one
    # breaks the graph and runs its draws eagerly), so a compiled loss that draws takes torch's
    # global RNG, as in tests/test_compile.py
    torch.manual_seed(1)
    try:
        loss_fn(z1, z2, **kwargs)
    except ValueError:
        return "-"
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(loss_fn)(z1, z2, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"error ({type(exc).__name__})"
    finally:
        torch._dynamo.reset()
    return str(explanation.graph_break_count)


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512,1024", help="batch sizes N (comma-separated)")
    parser.add_argument(
        "--pools", default="0,4096", help="pool sizes K, 0 = in-batch (comma-separated)"
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
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"time the hand-written F.cross_entropy InfoNCE too (column {REFERENCE!r})",
    )
    parser.add_argument(
        "--threads",
        default="default",
        help="thread counts, comma-separated, 'default' = torch's default (e.g. default,1)",
    )
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
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="peak-memory table (one forward+backward per loss, a subprocess each)",
    )
    parser.add_argument(
        "--memory-cells",
        default="4096:0,1024:65536",
        help="N:K cells of the memory table (K = 0: in-batch)",
    )
    parser.add_argument(
        "--graph-breaks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="graph breaks per loss and call form under torch.compile",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the losses run: time, memory and graph-break tables (cuda: one thread setting)",
    )
    parser.add_argument(
        "--in-batch-defaults",
        default="mochi",
        help="losses that also get a column with their strategy's in_batch_defaults "
        "(comma-separated, '' = none)",
    )
    parser.add_argument(
        "--heap",
        choices=("steady", "adaptive"),
        default="steady",
        help="steady: pin glibc's malloc thresholds (no page faults from one step to the next, "
        "whatever ran before); adaptive: glibc's defaults",
    )
    args = parser.parse_args(argv)
    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        # one line, no traceback: the device check script stops on it
        print(
            f"loss_overhead.py: error: --device cuda, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        args.sizes, args.pools, args.repeats = "256", "0,4096", 5
    # on a GPU the host's thread count is not what is measured: one setting, torch's default
    threads = [DEFAULT_THREADS] if on_cuda else parse_threads(args.threads)
    # the first column of the time tables, and how a miss names its setting
    column = "device" if on_cuda else "threads"
    label = {t: "cuda" if on_cuda else str(t) for t in threads}
    setting = {t: "cuda" if on_cuda else f"{t} thread(s)" for t in threads}
    others = (
        [x for x in hardneg.list_losses() if x != "infonce"]
        if args.losses is None
        else [x.strip() for x in args.losses.split(",") if x.strip() and x.strip() != "infonce"]
    )
    for name in [x.strip() for x in args.in_batch_defaults.split(",") if x.strip()]:
        if name in others and hardneg.registry.strategy_class(name).in_batch_defaults:
            others.insert(others.index(name) + 1, name + IN_BATCH_SUFFIX)
    names = ["infonce", *others]
    # the time tables' columns: the losses, then the hand-written reference
    timed = [*others, REFERENCE] if args.reference else others
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    heap = "adaptive (glibc's defaults)"
    if args.heap == "steady":
        heap = "steady (glibc thresholds pinned)" if steady_heap() else "adaptive (not glibc)"
    if on_cuda:
        print(
            f"torch {torch.__version__}, device cuda ({torch.cuda.get_device_name()}, CUDA "
            f"{torch.version.cuda}), each timed step between torch.cuda.synchronize() calls; "
            f"threads: not applicable on cuda, one column (host: {os.cpu_count()} CPU(s), torch's "
            f"default {DEFAULT_THREADS} threads), d = {args.dim}, >= {args.repeats} interleaved "
            f"rounds per cell, estimator {args.estimator}; heap {heap}; load average at start "
            f"{load:.2f}"
        )
    else:
        print(
            f"torch {torch.__version__}, {os.cpu_count()} CPU(s), threads {threads} "
            f"(torch's default: {DEFAULT_THREADS}), d = {args.dim}, >= {args.repeats} interleaved rounds "
            f"per cell, estimator {args.estimator}; heap {heap}; load average at start {load:.2f}"
        )
    misses: list[str] = []
    pools, sizes = parse_ints(args.pools), parse_ints(args.sizes)
    if pools and sizes:
        tables: dict[int, list[str]] = {t: [] for t in threads}
        floor_rows: dict[int, list[str]] = {t: [] for t in threads}
        for pool_size in pools:
            for n in sizes:
                cell = time_cell(
                    ["infonce", *timed],
                    n,
                    args.dim,
                    pool_size,
                    args.repeats,
                    args.warmup,
                    args.seed,
                    threads=threads,
                    estimator=args.estimator,
                    floors=args.floor,
                    device=args.device,
                )
                setup = "in-batch" if pool_size == 0 else f"pool K={pool_size}"
                for t, (med, ratios) in cell.items():
                    cells = []
                    for name in timed:
                        ratio = ratios[name]
                        target = TARGETS.get(name)
                        flag = ""
                        if target is not None and ratio > target:
                            flag = " (!)"
                            why = ""
                            floor = ratios.get(f"floor:{name}")
                            if floor is not None:
                                rest = max(0.0, 1.0 - ratios["floor:infonce"])
                                why = (
                                    f" (product floor {floor:.2f}x; with infonce's non-product work "
                                    f"{floor + rest:.2f}x)"
                                )
                            misses.append(f"{name} {setting[t]} N={n} {setup}: {ratio:.2f}x{why}")
                        cells.append(f"{ratio:.2f}{flag}")
                    row = (
                        f"| {label[t]} | {setup} | {n} | {med['infonce'] * 1e3:.1f} | "
                        + " | ".join(cells)
                        + " |"
                    )
                    tables[t].append(row)
                    print(row, flush=True)
                    if args.floor:
                        floor_rows[t].append(
                            f"| {label[t]} | {setup} | {n} | "
                            + " | ".join(
                                f"{ratios[f'floor:{x}']:.2f}"
                                + (
                                    " (!)"
                                    if ratios[f"floor:{x}"] > TARGETS.get(x, float("inf"))
                                    else ""
                                )
                                for x in ["infonce", *timed]
                            )
                            + " |"
                        )
        print()
        print(
            f"Time of one forward+backward relative to infonce in the same round ({args.estimator} over rounds)"
            + (" on cuda, synchronised before and after each step" if on_cuda else "")
        )
        print()
        header = [
            column,
            "set-up",
            "N",
            f"infonce ({args.estimator}, ms)",
            *(f"{x} (x)" for x in timed),
        ]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * len(header)) + "|")
        for t in threads:
            print("\n".join(tables[t]))
        if args.floor:
            print()
            print(
                "Product floor: the loss's matrix products alone, relative to infonce's full step"
            )
            print("((!) = the products alone exceed the target)")
            print()
            header = [column, "set-up", "N", *(f"{x} (x)" for x in ["infonce", *timed])]
            print("| " + " | ".join(header) + " |")
            print("|" + "|".join(["---"] * len(header)) + "|")
            for t in threads:
                print("\n".join(floor_rows[t]))
    if args.memory:
        cells = []
        for item in args.memory_cells.split(","):
            n_text, _, k_text = item.partition(":")
            cells.append((int(n_text), int(k_text or 0)))
        print()
        print(
            "Peak memory of one forward+backward, relative to infonce "
            + (
                "(CUDA max_memory_allocated above the inputs)"
                if args.device == "cuda"
                else "(CPU: resident-set high-water mark above the resident set just before the "
                "step, a fresh process per measurement; Linux VmHWM reset through /proc/self/clear_refs)"
            )
        )
        print()
        header = ["set-up", "N", "infonce (MiB)", *(f"{x} (x)" for x in others)]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * len(header)) + "|")
        # on a GPU each process reads its own allocator's peak, so the start-up of a process per
        # loss (import, CUDA context) overlaps; on the CPU one at a time, as in earlier tables
        workers = min(8, os.cpu_count() or 1) if on_cuda else 1
        _, mem_misses = memory_table(names, cells, args.dim, threads[0], args.device, workers)
        misses.extend(mem_misses)
    if args.graph_breaks:
        print()
        print(
            "Graph breaks under torch.compile (torch._dynamo.explain, check_inputs=False; '-' = form not supported)"
            + (" on cuda inputs" if on_cuda else "")
        )
        print()
        print("| loss | " + " | ".join(GRAPH_FORMS) + " |")
        print("|" + "|".join(["---"] * (len(GRAPH_FORMS) + 1)) + "|")
        for name in names:
            counts = [graph_breaks(name, form, device=args.device) for form in GRAPH_FORMS]
            print(f"| {name} | " + " | ".join(counts) + " |", flush=True)
            misses.extend(
                f"{name} {form}: {c} graph breaks"
                for form, c in zip(GRAPH_FORMS, counts)
                if c not in ("0", "-")
            )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(
        f"load average at end {load:.2f}; (!) = above target {TARGETS}, memory <= {MEMORY_TARGET}x"
    )
    for miss in misses:
        print(f"  miss: {miss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
