"""Two processes on CPU (torchrun, gloo): the global batch is split over the ranks, the MoCo
queue is fed with the gathered keys, and only rank 0 writes the run's files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hardneg.train.checkpoint import load_checkpoint


def torchrun(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``hardneg train`` on two CPU processes (gloo) from this checkout's sources."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--standalone", "-m", "hardneg.cli", "train", "--config", "mnist1d_simclr_hcl",
        "data.dataset=digits", "data.subset=64", "model.backbone=digits_cnn",
        "train.batch_size=16", "train.epochs=1", "train.device=cpu", "eval.knn=false",
        *overrides, "--run-dir", str(run_dir), "--no-progress",
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_torchrun_two_processes_train_moco(tmp_path):
    run_dir = tmp_path / "run"
    done = torchrun(run_dir, "framework.name=moco", "framework.queue_size=48")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done:") == 1  # rank 0 only
    assert "broadcast_buffers" not in done.stderr  # no deprecation warning from any rank
    payload = load_checkpoint(run_dir / "checkpoints" / "final.pt")
    assert payload["step"] == 4  # 64 images / global batch 16
    # 4 steps x 16 gathered keys = 64 keys through a queue of 48: the pointer is at 16
    assert int(payload["model"]["queue_ptr"]) == 16
    states = payload["augment_rng"]
    assert states.shape[0] == 2  # one augmentation generator state per rank
    assert not torch.equal(states[0], states[1])  # each rank draws its own augmentations


@pytest.mark.slow
def test_torchrun_sync_bn_on_cpu_stops_with_a_clear_error(tmp_path):
    done = torchrun(tmp_path / "run", "train.sync_bn=true")
    assert done.returncode != 0
    assert "sync_bn=true needs GPUs" in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
