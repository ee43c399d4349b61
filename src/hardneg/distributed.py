"""Multi-process (DDP) helpers: set-up from ``torchrun`` variables and batch gathering.

Recipe for a contrastive loss over the *global* batch (SimCLR set-up, in-batch negatives)::

    ctx = init_distributed()                       # no-op context without torchrun
    model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if cuda else None)
    z1, z2 = model(x1_local), model(x2_local)      # local half-batches
    loss = loss_fn(gather_with_grad(z1), gather_with_grad(z2))   # same value on every rank
    loss.backward()                                 # do NOT divide or multiply by world_size

This gives exactly the gradients of single-process training on the concatenated batch (see
:func:`gather_with_grad` for the argument) for models without batch norm. Batch norm sees the
local batch: :func:`convert_sync_batchnorm` (GPUs) makes it see the global one, and
:func:`shuffle_batch` / :func:`gather_unshuffled` implement MoCo's shuffle-BN for key encoders. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) all
functions are identities, so the same training code runs in one process.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistContext",
    "init_distributed",
    "gather_with_grad",
    "gather_no_grad",
    "all_reduce_mean",
    "shuffle_batch",
    "gather_unshuffled",
    "convert_sync_batchnorm",
    "wrap_ddp",
    "check_sync_bn",
    "barrier",
    "is_main_process",
    "get_rank",
    "get_world_size",
    "cleanup",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) run.

    ``device`` is ``cuda:<local_rank>`` when CUDA is available (and the current CUDA device has
    been set to it), else ``cpu``. ``enabled`` is True only when a process group with more than
    one process is initialised; ``is_main`` is True on rank 0 (log, evaluate, save there).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_main: bool = True
    enabled: bool = False
    backend: str | None = None


def _env_int(name: str, default: int | None = None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank if local_rank < torch.cuda.device_count() else 0)
    return torch.device("cpu")


def _context_from_group(local_rank: int) -> DistContext:
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistContext(rank, world, local_rank, device, rank == 0, world > 1, backend)


def init_distributed(
    backend: str | None = None, *, timeout: timedelta | None = None
) -> DistContext:
    """Join the process group described by ``torchrun``'s environment, or run single-process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. With
    ``WORLD_SIZE`` unset or 1 nothing is initialised and a single-process context is returned
    (device ``cuda`` if available, else ``cpu``). Otherwise ``backend`` defaults to ``"nccl"``
    when CUDA is available and ``"gloo"`` otherwise, the CUDA device is set to ``LOCAL_RANK``,
    and the default process group is initialised (once: a second call returns the same context).
    """
    local_rank = _env_int("LOCAL_RANK", None)
    if dist.is_available() and dist.is_initialized():
        if local_rank is None:
            local_rank = dist.get_rank() % max(torch.cuda.device_count(), 1)
        return _context_from_group(local_rank)

    world_size = _env_int("WORLD_SIZE", 1)
    assert world_size is not None
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1:
        local_rank = local_rank or 0
        return DistContext(0, 1, local_rank, _default_device(local_rank), True, False, None)

    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but torch.distributed is not available")
    missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not; launch with torchrun "
            "(e.g. torchrun --nproc_per_node=2 -m hardneg train ...)"
        )
    rank = _env_int("RANK")
    assert rank is not None
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {rank}")
    if local_rank is None:
        local_rank = rank
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA; use backend='gloo' on CPU")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                "visible; start at most one process per GPU"
            )
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs
    )
    _size_group()  # create the CPU group for row counts now, collectively, not mid-step
    return DistContext(rank, world_size, local_rank, device, rank == 0, True, backend)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op single-process)."""
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group (and the helper group) if one was initialised."""
    global _SIZE_GROUP
    _SIZE_GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """True while a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def finish(*, wait: bool = True) -> None:
    """Leave the process group at the end of a command: wait for every rank (``wait=True``,
    after a run that succeeded), then destroy the group. A process that exits with a live gloo
    group can abort in its teardown ("terminate called without an active exception") while
    another rank still works; a rank that failed must not wait for the others (``wait=False``),
    or it would block until the collective times out."""
    if wait:
        barrier()
    cleanup()


# Row counts are exchanged on the CPU, so that learning them never waits for the GPU: through the
# default group when its backend handles CPU tensors (gloo), otherwise through a gloo group
# created on first use (every rank reaches its first gather at the same point of the step).
_SIZE_GROUP: dist.ProcessGroup | None = None


def _default_group_handles_cpu() -> bool:
    return "gloo" in str(dist.get_backend()).lower()


def _size_group() -> dist.ProcessGroup | None:
    global _SIZE_GROUP
    if _default_group_handles_cpu():
        return None
    if _SIZE_GROUP is None:
        _SIZE_GROUP = dist.new_group(backend="gloo")
    return _SIZE_GROUP


def _gather_sizes(x: Tensor) -> list[int]:
    world = dist.get_world_size()
    local = torch.tensor([x.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=_size_group())
    return [int(s) for s in torch.cat(sizes).tolist()]


def _all_gather_cat(x: Tensor, equal_sizes: bool) -> tuple[Tensor, list[int]]:
    """Concatenate every rank's ``x`` along dim 0 in rank order (no autograd)."""
    world = dist.get_world_size()
    x = x.contiguous()
    sizes = [x.shape[0]] * world if equal_sizes else _gather_sizes(x)
    largest = max(sizes)
    if x.shape[0] < largest:
        pad = x.new_zeros((largest - x.shape[0], *x.shape[1:]))
        send = torch.cat([x, pad], dim=0)
    else:
        send = x
    parts = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(parts, send)
    if any(s != largest for s in sizes):
        parts = [p[:s] for p, s in zip(parts, sizes)]
    return torch.cat(parts, dim=0), sizes


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, equal_sizes: bool) -> Tensor:  # type: ignore[override]
        gathered, sizes = _all_gather_cat(x, equal_sizes)
        rank = dist.get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def gather_with_grad(x: Tensor, *, equal_sizes: bool = False) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0 in rank order, differentiable w.r.t. local ``x``.

    Identity without a multi-process group. Ranks may hold different numbers of rows: the row
    counts are exchanged first, on the CPU (no GPU sync). ``equal_sizes=True`` skips that small
    collective when every rank is known to hold the same number of rows (if they do not, the
    gather fails or, with NCCL, may hang).

    Why the backward pass all-reduces (sums) the incoming gradient and returns the local slice:
    let ``R`` ranks hold ``z_r = f(theta, x_r)`` and every rank compute the *same* global loss
    ``L(Z)`` on ``Z = [z_0; ...; z_{R-1}]``. Single-process training on the concatenated batch
    has ``dL/dtheta = sum_r (dL/dz_r)(dz_r/dtheta)``. On rank ``r`` autograd only reaches
    ``theta`` through its own ``z_r`` (other slices arrive as constants), and the gradient
    arriving at this function is ``G = dL/dZ`` -- identical on every rank, because ``L`` and
    ``Z`` are. Summing over ranks gives ``R * G``; rank ``r`` keeps the rows of ``z_r``, so its
    local parameter gradient is ``R * (dL/dz_r)(dz_r/dtheta)``. DDP then *averages* over ranks:
    ``(1/R) * sum_r R * (dL/dz_r)(dz_r/dtheta) = dL/dtheta`` -- exactly the single-process
    gradient. Hence: compute the loss on the gathered tensors on every rank, wrap the model in
    DDP, and do not rescale the loss by the world size. (Returning the slice *without* the
    all-reduce would give ``dL/dtheta / R``.) The all-reduce also keeps the result right when
    the ranks' losses differ, e.g. each rank averages only its local anchors against global
    negatives: the gradient is then that of the mean of the ranks' losses.

    Caveats for exact equivalence: batch-norm layers see only the local batch unless converted
    with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``; randomness inside the loss must use
    a generator seeded identically on every rank.
    """
    if not _active():
        return x
    return _GatherWithGrad.apply(x, equal_sizes)


def gather_no_grad(x: Tensor, *, equal_sizes: bool = False) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0 in rank order, detached (e.g. MoCo keys)."""
    if not _active():
        return x.detach()
    with torch.no_grad():
        gathered, _ = _all_gather_cat(x.detach(), equal_sizes)
    return gathered


def shuffle_batch(
    x: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """MoCo's shuffle-BN, first half: this rank's share of the global batch, in shuffled order.

    With ``R`` ranks holding ``x_0 .. x_{R-1}`` (``X = [x_0; ...; x_{R-1}]``, ``n`` rows), a
    permutation ``pi`` of ``n`` is drawn and rank ``r`` gets rows ``X[pi[a_r : a_r + n_r]]``
    (``a_r`` = rows of the ranks before ``r``, ``n_r`` its own count), so each rank's
    batch-norm layers see a random mix of every rank's images instead of its own. Returns
    ``(local rows, restore)`` with ``restore = argsort(pi)``; :func:`gather_unshuffled` then puts
    the outputs back in the order of ``X``. Why (MoCo, He et al. 2020, section 3.3): with
    per-rank BN, a query and its key computed from the same local batch share BN statistics, a
    signal the model can use to find the positive instead of learning good features.

    ``pi`` is drawn on every rank (from ``generator`` when given, so that a generator shared by
    the ranks stays in step) and rank 0's is broadcast, so all ranks use the same permutation.
    Without a multi-process group: ``(x, None)``. BN over one whole batch does not depend on the
    order of its rows, so there is nothing to shuffle in one process (MoCo's single-GPU
    emulation, BN in groups of rows and a shuffled key batch, is the MoCo framework's
    ``bn_splits``: :mod:`hardneg.frameworks.split_bn`).
    """
    if not _active():
        return x, None
    with torch.no_grad():
        gathered, sizes = _all_gather_cat(x.detach(), equal_sizes=False)
        n = gathered.shape[0]
        draw_on = generator.device if generator is not None else x.device
        perm = torch.randperm(n, generator=generator, device=draw_on).to(x.device)
        dist.broadcast(perm, src=0)
        start = sum(sizes[: dist.get_rank()])
        local = gathered[perm[start : start + x.shape[0]]]
    return local, torch.argsort(perm)


def gather_unshuffled(y: Tensor, restore: Tensor | None) -> Tensor:
    """MoCo's shuffle-BN, second half: every rank's ``y`` (outputs of the rows that
    :func:`shuffle_batch` gave each rank), gathered in rank order and put back in the order of
    the global batch: ``gather_no_grad(y)[restore]``. Detached; with ``restore=None`` it is
    :func:`gather_no_grad`."""
    gathered = gather_no_grad(y)
    return gathered if restore is None else gathered[restore.to(gathered.device)]


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with its BatchNorm layers turned into :class:`torch.nn.SyncBatchNorm` (batch
    statistics over the global batch) when a multi-process group is active; unchanged otherwise
    (one process already normalises over its whole batch).

    Raises:
        ValueError: ``device`` is not a GPU: torch's SyncBatchNorm refuses CPU tensors in its
            forward pass (checked against torch 2.14), so a CPU / gloo run cannot use it.
    """
    if not _active():
        return module
    check_sync_bn(device)
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def check_sync_bn(device: torch.device) -> None:
    """Raise the error of :func:`convert_sync_batchnorm` early (before data are loaded)."""
    if _active() and device.type not in ("cuda", "xpu", "hpu"):
        raise ValueError(
            f"sync_bn=true needs GPUs, but this run uses device {str(device)!r}: torch's "
            "SyncBatchNorm does not support CPU tensors (gloo); set train.sync_bn=false"
        )


def all_reduce_mean(x: Tensor | float) -> Tensor | float:
    """Mean of ``x`` over ranks (a tensor of the same shape, or a float for a float input).

    Not differentiable; for logging metrics. Identity (a detached copy) without a process group.
    """
    if isinstance(x, bool) or not isinstance(x, (Tensor, int, float)):
        raise ValueError(f"all_reduce_mean expects a tensor or a number, got {type(x).__name__}")
    as_number = not isinstance(x, Tensor)
    if as_number:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if _active() and dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        tensor = torch.tensor(float(x), dtype=torch.float64, device=device)
    else:
        tensor = x.detach().clone()
    if _active():
        if not tensor.is_floating_point():
            tensor = tensor.to(torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return float(tensor.item()) if as_number else tensor


def ddp_buffer_kwargs() -> dict[str, bool]:
    """The keyword that turns off DDP's buffer broadcast before each forward, in this torch's
    spelling: ``forward_sync_buffers=False`` since torch 2.13 (where ``broadcast_buffers`` is
    deprecated and warns on every rank), ``broadcast_buffers=False`` before."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` over ``module`` without the per-forward buffer broadcast.

    The MoCo queue and the memory bank are fed the gathered global batch on every rank, so each
    rank's copy is already the same, and batch-norm statistics stay per rank (or go through
    SyncBatchNorm / shuffle-BN). With ``forward_sync_buffers=False`` the buffers are still
    broadcast once from rank 0 at construction; every rank built them from the same seed (or
    loaded them from the same checkpoint), so that copies equal values.
    """
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        **ddp_buffer_kwargs(),
    )
