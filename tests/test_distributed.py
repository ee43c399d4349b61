"""DDP equivalence: two gloo processes on CPU with half a batch each == one process, full batch.

The test file doubles as the worker script: ``python tests/test_distributed.py --worker OUT``
runs one rank (RANK/WORLD_SIZE/MASTER_* come from the environment, as under torchrun) and writes
the largest differences it measured to ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _same import assert_same
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hardneg
from hardneg import distributed as hd

HALF = 6  # rows per rank; the reference batch has 2 * HALF
UNEVEN = (4, 9)  # rows of rank 0 and rank 1 in the uneven case
TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# worker (one rank)
# ---------------------------------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 8))


def _max_grad_diff(ddp_model: nn.Module, reference: nn.Module) -> float:
    return max(
        float((a.grad - b.grad).abs().max())
        for a, b in zip(ddp_model.parameters(), reference.parameters(), strict=True)
    )


def _check_in_batch_loss(name: str, sizes: tuple[int, int], rank: int) -> dict[str, float]:
    """SimCLR set-up: loss on gathered z1/z2 under DDP vs the loss on the full batch."""
    total = sum(sizes)
    torch.manual_seed(1)
    x1, x2 = torch.randn(total, 10), torch.randn(total, 10)
    loss_fn = hardneg.create_loss(name)

    reference = _model()
    ref_loss = loss_fn(reference(x1), reference(x2))
    ref_loss.backward()

    model = DistributedDataParallel(_model())
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    z1 = model(x1[local])
    z2 = model(x2[local])
    equal = sizes[0] == sizes[1]
    g1 = hd.gather_with_grad(z1, equal_sizes=equal)
    g2 = hd.gather_with_grad(z2)
    loss = loss_fn(g1, g2)
    loss.backward()  # DDP averages the parameter gradients over the two ranks
    with torch.no_grad():
        ref_z1 = reference(x1)
    return {
        "gathered": float((g1.detach() - ref_z1).abs().max()),
        "loss": abs(loss.item() - ref_loss.item()),
        "grad": _max_grad_diff(model.module, reference),
    }


def _check_moco(rank: int) -> dict[str, float]:
    """MoCo: keys gathered without grad; per-rank query loss against a shared queue under DDP."""
    total = 2 * HALF
    torch.manual_seed(2)
    xq, xk = torch.randn(total, 10), torch.randn(total, 10)
    queue = nn.functional.normalize(torch.randn(32, 8), dim=1)
    loss_fn = hardneg.create_loss("hcl")
    key_encoder = _model()

    with torch.no_grad():
        ref_keys = key_encoder(xk)
    reference = _model()
    ref_loss = loss_fn(reference(xq), ref_keys, negatives=queue)
    ref_loss.backward()

    local = slice(rank * HALF, (rank + 1) * HALF)
    with torch.no_grad():
        keys = key_encoder(xk[local])
    all_keys = hd.gather_no_grad(keys)  # what every rank enqueues
    model = DistributedDataParallel(_model())
    # each rank: its own queries vs its own keys and the shared queue (equal-size local means;
    # DDP's average of the local means is the global mean)
    loss = loss_fn(model(xq[local]), keys, negatives=queue)
    loss.backward()
    both = hd.gather_no_grad(all_keys.unsqueeze(0))  # the key batch each rank holds
    return {
        "keys": float((all_keys - ref_keys).abs().max()),
        "keys_same_on_ranks": float((both[0] - both[1]).abs().max()),
        "keys_requires_grad": float(all_keys.requires_grad),
        "loss_mean": abs(float(hd.all_reduce_mean(loss.detach())) - ref_loss.item()),
        "grad": _max_grad_diff(model.module, reference),
    }


def _bn_encoder() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))


def _shares(sizes: tuple[int, ...]) -> list[slice]:
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(a, a + n) for a, n in zip(starts, sizes)]


def _check_shuffle_bn(sizes: tuple[int, int], rank: int) -> dict[str, float]:
    """Shuffle-BN keys on 2 ranks == one process running BN over the same permuted shares."""
    total = sum(sizes)
    torch.manual_seed(3)
    x = torch.randn(total, 10)
    shares = _shares(sizes)
    encoder = _bn_encoder()  # train mode: BN uses the statistics of the rows it is given
    generator = torch.Generator().manual_seed(5)
    shuffled, restore = hd.shuffle_batch(x[shares[rank]], generator)
    with torch.no_grad():
        keys = hd.gather_unshuffled(encoder(shuffled), restore)
    back = hd.gather_unshuffled(shuffled, restore)

    perm = torch.randperm(total, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = torch.cat([encoder(x[perm[share]]) for share in shares])[torch.argsort(perm)]
        unshuffled = torch.cat([encoder(x[share]) for share in shares])
    mine = set(range(total)[shares[rank]])
    from_others = sum(int(i) not in mine for i in perm[shares[rank]])
    both_restore = hd.gather_no_grad(restore[None])
    next_draw = hd.gather_no_grad(torch.rand(1, generator=generator))
    return {
        "rows": float((back - x).abs().max()),  # shuffle then unshuffle: identity on rows
        "shape": float(shuffled.shape[0] != sizes[rank]),
        "keys": float((keys - ref).abs().max()),
        "unshuffled_gap": float((keys - unshuffled).abs().max()),  # other BN batches
        "from_other_rank": float(from_others),
        "restore_same_on_ranks": float((both_restore[0] != both_restore[1]).sum()),
        "generator_in_step": float(next_draw[0] != next_draw[1]),
    }


def _check_moco_shuffle_bn(rank: int) -> dict[str, float]:
    """The MoCo framework with shuffle-BN: its keys and loss against a hand computation."""
    from hardneg.frameworks import MoCo
    from hardneg.models import build_head

    total = 2 * HALF
    torch.manual_seed(6)
    x1, x2 = torch.randn(total, 10), torch.randn(total, 10)
    backbone = _model()
    backbone.out_dim = 8
    head = build_head("simclr", 8, out_dim=4, hidden_dim=6)  # Linear-BN-ReLU-Linear
    loss_fn = hardneg.create_loss("infonce")
    model = MoCo(backbone, head, loss_fn, out_dim=4, queue_size=16, shuffle_bn=True)
    queue = model.queue.clone()
    local = slice(rank * HALF, (rank + 1) * HALF)
    out = model([x1[local], x2[local]], index=torch.arange(HALF), generator=torch.Generator())

    perm = torch.randperm(total, generator=torch.Generator())  # default seed, as passed above
    halves = [slice(0, HALF), slice(HALF, total)]
    with torch.no_grad():
        key_of = lambda v: model.key_head(model.key_backbone(v))  # noqa: E731
        ref_keys = torch.cat([key_of(x2[perm[h]]) for h in halves])[torch.argsort(perm)]
        ref_q = torch.cat([head(backbone(x1[h])) for h in halves])  # queries: per-rank BN
        ref_loss = loss_fn(ref_q, ref_keys, negatives=queue)
    return {
        "keys": float((out.pending["keys"] - ref_keys).abs().max()),
        "loss": abs(out.loss.item() - ref_loss.item()),
    }


def _check_sync_bn_on_cpu() -> dict[str, float]:
    """torch's SyncBatchNorm refuses CPU tensors under a process group; we say so up front."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    results = {}
    for name, call in (
        ("check", lambda: hd.check_sync_bn(torch.device("cpu"))),
        ("convert", lambda: hd.convert_sync_batchnorm(model, torch.device("cpu"))),
        ("torch", lambda: nn.SyncBatchNorm.convert_sync_batchnorm(model)(torch.randn(6, 4))),
    ):
        try:
            call()
            results[name] = "no error"
        except ValueError as err:
            results[name] = str(err)
    return results


def _worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    ctx = hd.init_distributed()  # backend chosen automatically: gloo (no CUDA in the workers)
    assert ctx.enabled and ctx.world_size == 2 and ctx.backend == "gloo", ctx
    assert ctx.rank == int(os.environ["RANK"]) and ctx.is_main == (ctx.rank == 0)
    assert ctx.device == torch.device("cpu")
    assert hd.init_distributed() == ctx  # idempotent
    assert hd.is_main_process() == (ctx.rank == 0) and hd.get_world_size() == 2
    results: dict[str, float] = {}
    for name in ("hcl", "infonce"):
        for key, value in _check_in_batch_loss(name, (HALF, HALF), ctx.rank).items():
            results[f"{name}/{key}"] = value
    for key, value in _check_in_batch_loss("hcl", UNEVEN, ctx.rank).items():
        results[f"hcl_uneven/{key}"] = value
    # the path used under NCCL: row counts go through a separate gloo group
    hd._default_group_handles_cpu = lambda: False
    for key, value in _check_in_batch_loss("hcl", UNEVEN, ctx.rank).items():
        results[f"hcl_uneven_side_group/{key}"] = value
    assert hd._SIZE_GROUP is not None
    for key, value in _check_moco(ctx.rank).items():
        results[f"moco/{key}"] = value
    for sizes, tag in (((HALF, HALF), "shuffle_bn"), (UNEVEN, "shuffle_bn_uneven")):
        for key, value in _check_shuffle_bn(sizes, ctx.rank).items():
            results[f"{tag}/{key}"] = value
    for key, value in _check_moco_shuffle_bn(ctx.rank).items():
        results[f"moco_shuffle_bn/{key}"] = value
    for key, value in _check_sync_bn_on_cpu().items():
        results[f"sync_bn_cpu/{key}"] = value
    results["all_reduce_mean"] = abs(hd.all_reduce_mean(float(ctx.rank + 1)) - 1.5)
    mean_tensor = hd.all_reduce_mean(torch.tensor([ctx.rank, 2 * ctx.rank]))
    results["all_reduce_mean_tensor"] = float((mean_tensor - torch.tensor([0.5, 1.0])).abs().max())
    hd.barrier()
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(results))
    hd.cleanup()


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out_dir: Path, timeout: float = 120.0) -> list[tuple[int, str]]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            CUDA_VISIBLE_DEVICES="",
            OMP_NUM_THREADS="1",
        )
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(out_dir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict[str, Any]]:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    for attempt in range(2):  # the free port can be taken between probing and binding
        out_dir = tmp_path_factory.mktemp(f"ddp{attempt}")
        outputs = _launch(out_dir)
        if all(code == 0 for code, _ in outputs):
            return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
        logs = "\n".join(
            f"--- rank {r} (exit {c}) ---\n{o[-4000:]}" for r, (c, o) in enumerate(outputs)
        )
        if "address already in use" not in logs.lower():
            break
    pytest.fail(f"distributed workers failed:\n{logs}")


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["hcl", "infonce", "hcl_uneven", "hcl_uneven_side_group"])
def test_gathered_loss_under_ddp_equals_single_process(two_rank_results, loss_name):
    for rank, results in enumerate(two_rank_results):
        for key in ("gathered", "loss", "grad"):
            value = results[f"{loss_name}/{key}"]
            assert value < TOL, f"rank {rank}: {loss_name} {key} differs by {value}"


@pytest.mark.slow
def test_moco_keys_gathered_without_grad(two_rank_results):
    for rank, results in enumerate(two_rank_results):
        assert results["moco/keys"] < TOL, rank
        assert results["moco/keys_same_on_ranks"] == 0.0, rank
        assert results["moco/keys_requires_grad"] == 0.0, rank
        assert results["moco/loss_mean"] < TOL, rank
        assert results["moco/grad"] < TOL, rank


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["shuffle_bn", "shuffle_bn_uneven"])
def test_shuffle_bn_keys_equal_one_process_with_the_same_bn_batches(two_rank_results, tag):
    for rank, results in enumerate(two_rank_results):
        assert results[f"{tag}/rows"] == 0.0, rank  # shuffle + unshuffle is the identity
        assert results[f"{tag}/shape"] == 0.0, rank  # each rank keeps its row count
        assert results[f"{tag}/keys"] < TOL, rank
        # the momentum encoder saw other BN batches than the ranks' own rows
        assert results[f"{tag}/unshuffled_gap"] > 1e-3, rank
        assert results[f"{tag}/restore_same_on_ranks"] == 0.0, rank
        assert results[f"{tag}/generator_in_step"] == 0.0, rank
    assert sum(r[f"{tag}/from_other_rank"] for r in two_rank_results) > 0


@pytest.mark.slow
def test_moco_shuffle_bn_keys_and_loss(two_rank_results):
    for rank, results in enumerate(two_rank_results):
        assert results["moco_shuffle_bn/keys"] < TOL, rank
        assert results["moco_shuffle_bn/loss"] < TOL, rank


@pytest.mark.slow
def test_sync_bn_on_cpu_is_refused_with_a_clear_error(two_rank_results):
    for results in two_rank_results:
        for key in ("check", "convert"):
            assert "sync_bn=true needs GPUs" in results[f"sync_bn_cpu/{key}"]
            assert "set train.sync_bn=false" in results[f"sync_bn_cpu/{key}"]
        # why: torch itself rejects CPU input (if this fails, torch now supports CPU SyncBN and
        # hardneg.distributed.check_sync_bn can allow it)
        assert "expected input tensor to be on GPU" in results["sync_bn_cpu/torch"]


@pytest.mark.slow
def test_all_reduce_mean(two_rank_results):
    for results in two_rank_results:
        assert results["all_reduce_mean"] < 1e-12
        assert results["all_reduce_mean_tensor"] < 1e-12


# ---------------------------------------------------------------------------------------------
# single process (no torchrun)
# ---------------------------------------------------------------------------------------------


def _clear_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_a_no_op(monkeypatch):
    _clear_env(monkeypatch)
    ctx = hd.init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.enabled) == (
        0,
        1,
        0,
        True,
        False,
    )
    assert ctx.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not torch.distributed.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert hd.gather_with_grad(x) is x
    gathered = hd.gather_no_grad(x)
    assert_same(gathered, x.detach())
    assert not gathered.requires_grad
    assert hd.all_reduce_mean(2.5) == 2.5
    assert_same(hd.all_reduce_mean(x), x.detach())
    assert hd.is_main_process() and hd.get_rank() == 0 and hd.get_world_size() == 1
    hd.barrier()
    hd.cleanup()


def test_shuffle_bn_and_sync_bn_helpers_in_one_process(monkeypatch):
    _clear_env(monkeypatch)
    x = torch.randn(5, 3, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    shuffled, restore = hd.shuffle_batch(x, generator)
    assert shuffled is x and restore is None  # nothing to shuffle: BN sees the whole batch
    assert torch.equal(generator.get_state(), state)  # and nothing is drawn
    back = hd.gather_unshuffled(x, None)
    assert_same(back, x.detach())
    assert not back.requires_grad
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert hd.convert_sync_batchnorm(model, torch.device("cpu")) is model  # one process: no-op
    assert isinstance(model[1], nn.BatchNorm1d)
    hd.check_sync_bn(torch.device("cpu"))  # no process group: nothing to refuse


def test_sync_bn_conversion_keeps_the_state_dict(monkeypatch):
    # pretend a process group is active: conversion itself needs none, and no CUDA either
    monkeypatch.setattr(hd, "_active", lambda: True)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    keys = set(model.state_dict())
    converted = hd.convert_sync_batchnorm(model, torch.device("cuda", 0))
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert set(converted.state_dict()) == keys  # checkpoints load with or without sync_bn
    with pytest.raises(ValueError, match="sync_bn=true needs GPUs, but this run uses device 'cpu'"):
        hd.convert_sync_batchnorm(nn.BatchNorm1d(4), torch.device("cpu"))


def test_world_size_one_from_torchrun_is_single_process(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not hd.init_distributed().enabled


def test_incomplete_torchrun_environment_is_reported(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT are not; launch with torchrun"):
        hd.init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE=2\)"):
        hd.init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        hd.init_distributed()


def test_nccl_without_cuda_is_reported(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    _clear_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="nccl"):
        hd.init_distributed(backend="nccl")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(Path(sys.argv[2]))


def test_wrap_ddp_turns_off_buffer_syncs_without_a_deprecation_warning(tmp_path):
    """torch >= 2.13 deprecates ``broadcast_buffers`` with a FutureWarning that every torchrun
    rank printed; the trainer's wrapper uses the current spelling (one-process gloo group)."""
    import warnings

    from torch import distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        module = nn.BatchNorm1d(4)  # has buffers
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning fails the test
            model = hd.wrap_ddp(module, torch.device("cpu"))
        assert model.module is module and not model.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()
    kwargs = hd.ddp_buffer_kwargs()
    assert list(kwargs.values()) == [False]
    params = __import__("inspect").signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        assert kwargs == {"forward_sync_buffers": False}


def _one_rank_group(tmp_path) -> None:
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)


@pytest.mark.parametrize("fails", [False, True])
def test_the_command_line_leaves_the_process_group_its_command_joined(tmp_path, monkeypatch, fails):
    """A process that exits with a live gloo group can abort in the group's teardown (rank 1 of
    ``torchrun ... hardneg mine``: "terminate called without an active exception"): the command
    line destroys the group its command created, after success and after a user error alike."""
    from hardneg import cli
    from hardneg.commands import losses

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    waited = []
    monkeypatch.setattr(hd, "barrier", lambda: waited.append(True))

    def run(args):
        _one_rank_group(tmp_path)
        if fails:
            raise ValueError("bad input")
        return 0

    monkeypatch.setattr(losses, "run", run)
    try:
        assert cli.main(["losses"]) == (2 if fails else 0)
        assert not torch.distributed.is_initialized()
        # a rank that failed does not wait for the others at a barrier
        assert waited == ([] if fails else [True])
    finally:
        hd.cleanup()


def test_the_command_line_keeps_a_process_group_it_did_not_create(tmp_path, monkeypatch):
    from hardneg import cli
    from hardneg.commands import losses

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    monkeypatch.setattr(losses, "run", lambda args: 0)
    _one_rank_group(tmp_path)
    try:
        assert cli.main(["losses"]) == 0
        assert torch.distributed.is_initialized()  # the caller's group is the caller's to end
    finally:
        hd.cleanup()
