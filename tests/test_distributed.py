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

import pytest
import torch
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
def two_rank_results(tmp_path_factory) -> list[dict[str, float]]:
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
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert hd.all_reduce_mean(2.5) == 2.5
    assert torch.equal(hd.all_reduce_mean(x), x.detach())
    assert hd.is_main_process() and hd.get_rank() == 0 and hd.get_world_size() == 1
    hd.barrier()
    hd.cleanup()


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
