"""Checkpoints: round trip, crash safety under SIGKILL, corrupt/unsafe files, meta checks."""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hardneg.train import checkpoint as ckpt_module
from hardneg.train.checkpoint import (
    checkpoint_meta,
    load_checkpoint,
    save_checkpoint,
    validate_payload,
)

META = {"framework": "simclr", "loss": "hcl", "dataset": "mnist1d", "backbone": "cnn1d"}


def _trained_state() -> dict:
    """A realistic trainer payload: model, Adam + SGD state, schedulers, history, meta."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    warmup = torch.optim.lr_scheduler.LinearLR(adam, start_factor=0.1, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=10)
    sched = torch.optim.lr_scheduler.SequentialLR(adam, [warmup, cosine], milestones=[2])
    lam = torch.optim.lr_scheduler.LambdaLR(sgd, lambda e: 0.5**e)
    for _ in range(3):
        loss = model(torch.randn(5, 6)).pow(2).mean()
        adam.zero_grad()
        sgd.zero_grad()
        loss.backward()
        adam.step()
        sgd.step()
        sched.step()
        lam.step()
    return {
        "meta": dict(META),
        "config": {"seed": 0, "loss": {"name": "hcl", "beta": 1.0, "tau_plus": 0.1}},
        "model": model.state_dict(),
        "optimizer": adam.state_dict(),
        "sgd": sgd.state_dict(),
        "scheduler": sched.state_dict(),
        "lambda": lam.state_dict(),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
        "epoch": 3,
        "step": 30,
        "history": [
            {"epoch": 1, "loss": 4.5, "knn_top1": None},
            {"epoch": 2, "loss": float("nan")},
        ],
        "queue": torch.randn(16, 4),
        "misc": (torch.float16, torch.device("cpu"), torch.Size([2, 3]), OrderedDict(a=1)),
    }


def _assert_same(a, b, where="payload"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True))
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


def test_round_trip(tmp_path):
    payload = _trained_state()
    path = tmp_path / "deep" / "nested" / "last.pt"  # parent directories are created
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path, expected_meta=META)
    _assert_same(payload, loaded)
    # the state can be put back into fresh objects
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    model.load_state_dict(loaded["model"])
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    adam.load_state_dict(loaded["optimizer"])
    assert adam.state_dict()["state"][0]["step"] == payload["optimizer"]["state"][0]["step"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporaries left
    # overwriting keeps working
    payload["epoch"] = 4
    save_checkpoint(path, payload)
    assert load_checkpoint(path)["epoch"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


class _SyncSpy:
    """Records, in order, every ``os.fsync`` (what it synced: a file with its size on disk, or a
    directory), ``os.replace`` and ``os.close`` made while a checkpoint is saved."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple] = []
        fsync, replace, close = os.fsync, os.replace, os.close

        def spy_fsync(fd):
            info = os.fstat(fd)
            kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
            self.events.append(("fsync", kind, info.st_ino, info.st_size))
            return fsync(fd)

        def spy_replace(src, dst, *args, **kwargs):
            self.events.append(("replace", Path(src), Path(dst), os.stat(src).st_ino))
            return replace(src, dst, *args, **kwargs)

        def spy_close(fd):
            self.events.append(("close", fd))
            return close(fd)

        monkeypatch.setattr(os, "fsync", spy_fsync)
        monkeypatch.setattr(os, "replace", spy_replace)
        monkeypatch.setattr(os, "close", spy_close)

    def kinds(self) -> list[str]:
        return [
            e[0] if e[0] != "fsync" else f"fsync-{e[1]}" for e in self.events if e[0] != "close"
        ]


def test_the_file_is_synced_before_the_rename_and_the_directory_after_it(tmp_path, monkeypatch):
    """Durability (not only atomicity): the temporary's bytes reach the disk (flushed, then
    ``fsync``) before ``os.replace`` puts it in place, and the directory entry of the rename is
    made durable by an ``fsync`` of the directory after it."""
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"epoch": 0})  # the directory exists and holds an older checkpoint
    spy = _SyncSpy(monkeypatch)
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(3001.0)})  # not a multiple of a page
    monkeypatch.undo()
    assert spy.kinds() == ["fsync-file", "replace", "fsync-dir"]
    (_, _, file_inode, synced_size), (_, src, dst, moved_inode), (_, _, dir_inode, _) = [
        e for e in spy.events if e[0] != "close"
    ]
    assert file_inode == moved_inode == os.stat(path).st_ino  # the synced file is the one moved
    assert synced_size == os.stat(path).st_size  # every byte was flushed before the sync
    assert src.parent == dst.parent == path.parent and dst == path and src != path
    assert dir_inode == os.stat(path.parent).st_ino  # the directory that holds the new entry
    assert load_checkpoint(path)["epoch"] == 1


def test_a_directory_that_cannot_be_synced_does_not_fail_the_save(tmp_path, monkeypatch):
    """Some file systems refuse ``fsync`` on a directory: the save still succeeds, and the
    directory's descriptor is closed all the same."""
    path = tmp_path / "last.pt"
    fsync = os.fsync
    closed, opened = [], []

    def no_directory_sync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            opened.append(fd)
            raise OSError("fsync not supported on directories here")
        return fsync(fd)

    close = os.close

    def spy_close(fd):
        closed.append(fd)
        return close(fd)

    monkeypatch.setattr(os, "fsync", no_directory_sync)
    monkeypatch.setattr(os, "close", spy_close)
    save_checkpoint(path, {"epoch": 3})
    monkeypatch.undo()
    assert len(opened) == 1 and opened[0] in closed
    assert load_checkpoint(path)["epoch"] == 3


def test_a_directory_that_cannot_be_opened_does_not_fail_the_save(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    real_open = os.open
    refused = []

    def no_directory_open(target, flags, *args, **kwargs):
        if Path(target) == tmp_path:
            refused.append(flags)
            raise PermissionError("cannot open a directory here")
        return real_open(target, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_directory_open)
    save_checkpoint(path, {"epoch": 4})
    monkeypatch.undo()
    assert len(refused) == 1 and not refused[0] & (os.O_WRONLY | os.O_RDWR)
    assert load_checkpoint(path)["epoch"] == 4


def test_cuda_tensors_load_on_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    path = tmp_path / "gpu.pt"
    save_checkpoint(path, {"x": torch.arange(4.0, device="cuda")})
    assert load_checkpoint(path)["x"].device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# payload validation
# ---------------------------------------------------------------------------------------------


class _Custom:
    pass


UNLOADABLE = [
    (np.float64(1.5), "numpy.float64"),
    (np.int64(3), "numpy.int64"),
    (np.ones(3), "numpy.ndarray"),
    (_Custom(), "_Custom"),
    (Path("x"), "Path"),
    (frozenset([1]), "frozenset"),
]
# the full message of each: where, the exact type, and how to convert it
MESSAGES = {
    "numpy.float64": "numpy.float64, {tail} (convert it explicitly, e.g. float(x), int(x) or x.item())",
    "numpy.int64": "numpy.int64, {tail} (convert it explicitly, e.g. float(x), int(x) or x.item())",
    "numpy.ndarray": "numpy.ndarray, {tail} (convert it explicitly, e.g. torch.from_numpy(x) or x.tolist())",
    "_Custom": f"{_Custom.__module__}._Custom, {{tail}} (store only tensors, dicts, lists, tuples, int, float, bool, str and None)",
    "Path": f"pathlib.{type(Path('x')).__qualname__}, {{tail}} (convert it explicitly, e.g. str(x))",
    "frozenset": "frozenset, {tail} (convert it explicitly, e.g. sorted(x))",
}


@pytest.mark.parametrize(("value", "type_name"), UNLOADABLE, ids=[t for _, t in UNLOADABLE])
def test_unloadable_value_is_refused_with_its_key_path(tmp_path, value, type_name):
    # sanity: torch really cannot read these back with weights_only=True
    buffer = io.BytesIO()
    torch.save({"v": value}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)

    path = tmp_path / "bad.pt"
    payload = {"history": [{"epoch": 1}, {"epoch": 2, "loss": value}]}
    with pytest.raises(ValueError, match=r"payload\['history'\]\[1\]\['loss'\]") as info:
        save_checkpoint(path, payload)
    tail = "which torch.load(weights_only=True) cannot read back"
    expected = "payload['history'][1]['loss'] has type " + MESSAGES[type_name].format(tail=tail)
    assert str(info.value) == expected
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "payload",
    [
        {"model": {torch.zeros(1): 1}},  # tensor key
        {"s": {1, 2}},  # sets are not readable by every supported torch version
        {"t": torch.nn.Linear(2, 2)},  # a module instead of its state_dict
        {"f": lambda: 1},
    ],
    ids=["tensor-key", "set", "module", "function"],
)
def test_other_unsupported_values_are_refused(tmp_path, payload):
    with pytest.raises(ValueError, match=r"payload\["):
        save_checkpoint(tmp_path / "bad.pt", payload)
    assert list(tmp_path.iterdir()) == []


def test_non_dict_payload_and_cycles_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must be a dict"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])  # type: ignore[arg-type]
    cyclic: dict = {"a": []}
    cyclic["a"].append(cyclic)
    with pytest.raises(ValueError, match="cycle"):
        validate_payload(cyclic)
    shared = [1, 2]
    validate_payload({"a": shared, "b": shared})  # shared (non-cyclic) references are fine


def test_failed_write_keeps_previous_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 partial bytes")
        else:
            f.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    path = tmp_path / "last.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = ckpt_module._host_tag()
    stale = tmp_path / f".last.pt.{host}.{dead.pid}.deadbeef.tmp"
    live = tmp_path / f".last.pt.{host}.{os.getpid()}.cafebabe.tmp"  # a live writer's file
    other = tmp_path / ".other.pt.x.1.y.tmp"
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    save_checkpoint(path, {"epoch": 1})
    assert not stale.exists()
    assert live.exists() and other.exists()


# ---------------------------------------------------------------------------------------------
# crash safety: SIGKILL while writing
# ---------------------------------------------------------------------------------------------

# A long-lived writer: imports torch once, then for every round number read from stdin forks a
# grandchild that saves a large checkpoint to PATH in a loop until it is SIGKILLed by the test.
_WRITER = textwrap.dedent(
    """
    import os, sys
    import torch
    from hardneg.train.checkpoint import save_checkpoint

    path, numel = sys.argv[1], int(sys.argv[2])
    blob = torch.arange(numel, dtype=torch.float32)
    print("ready", flush=True)
    for line in sys.stdin:
        round_ = int(line)
        pid = os.fork()
        if pid == 0:
            try:
                step = 0
                while True:
                    step += 1
                    save_checkpoint(path, {"round": round_, "step": step, "blob": blob})
            finally:
                os._exit(1)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL (POSIX)")
def test_sigkill_while_writing_leaves_last_complete_checkpoint(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    numel = 4_000_000  # 16 MB: each save takes tens of milliseconds
    save_checkpoint(
        path, {"round": -1, "step": 0, "blob": torch.arange(numel, dtype=torch.float32)}
    )
    expected_blob = torch.arange(numel, dtype=torch.float32)

    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(numel)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    rng = random.Random(1234)
    completed_rounds = set()
    try:
        assert writer.stdout.readline().strip() == "ready"
        for round_ in range(6):
            writer.stdin.write(f"{round_}\n")
            writer.stdin.flush()
            child = int(writer.stdout.readline())
            # wait until the child has replaced the file at least once in half of the rounds,
            # then kill it at a random moment (almost always in the middle of a write)
            deadline = time.monotonic() + 20
            if round_ % 2 == 0:
                while time.monotonic() < deadline:
                    try:
                        if load_checkpoint(path, verify=False)["round"] == round_:
                            break
                    except ValueError:
                        pass
                    time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(child, signal.SIGKILL)
            assert writer.stdout.readline().strip() == "reaped"

            payload = load_checkpoint(path)  # must be a complete checkpoint, never a partial one
            assert payload["round"] <= round_
            assert torch.equal(payload["blob"], expected_blob)
            completed_rounds.add(payload["round"])
            names = [p.name for p in path.parent.iterdir()]
            assert "last.pt" in names
            assert all(n == "last.pt" or n.startswith(".last.pt.") for n in names), names
    finally:
        writer.kill()
        writer.wait(timeout=10)
        writer.stdin.close()
        writer.stdout.close()
    assert len(completed_rounds - {-1}) >= 3, completed_rounds  # the writes really happened
    # the next save removes the temporaries the killed writers left behind
    save_checkpoint(path, {"round": 99, "step": 0, "blob": expected_blob})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert load_checkpoint(path)["round"] == 99


# ---------------------------------------------------------------------------------------------
# loading: missing, truncated, corrupt, unsafe
# ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "last.pt"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_checkpoint(path)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="directory"):
        save_checkpoint(tmp_path, {"a": 1})


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.9, 0.999])
def test_truncated_file_gives_clear_error(tmp_path, keep):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.randn(20_000), "epoch": 3})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"checkpoint .*last\.pt is truncated or corrupt \("):
        load_checkpoint(path)


def test_corrupted_tensor_bytes_are_detected(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.zeros(20_000), "epoch": 3})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the tensor data, which torch.load does not check
    data[middle : middle + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    silently_wrong = torch.load(path, weights_only=True)["w"]  # torch alone does not notice
    assert not torch.equal(silently_wrong, torch.zeros(20_000))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_garbage_file_gives_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    # one line: the error's type and the first line of its message, in parentheses
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert re.fullmatch(
        r"checkpoint \S+ is truncated or corrupt \(\w+(Error|Exception): .+\)", message
    )


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="does not contain a checkpoint dict"):
        load_checkpoint(path)


class _Exploit:
    """Unpickling this calls os.mkdir(marker): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_cannot_run_code(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"meta": dict(META), "model": _Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    with pytest.raises(ValueError, match="refuses to load") as info:
        load_checkpoint(path, expected_meta=META)
    assert str(path) in str(info.value)
    assert "mkdir" in str(info.value)  # names what the pickle wanted to call
    assert "weights_only=False" not in str(info.value)  # no advice to bypass the check
    assert not marker.exists()
    # the file really is an exploit: an unsafe load would have run its code
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)
    assert marker.is_dir()


# ---------------------------------------------------------------------------------------------
# meta
# ---------------------------------------------------------------------------------------------


def test_meta_mismatch_lists_every_differing_key(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"meta": dict(META), "epoch": 1})
    load_checkpoint(path, expected_meta=dict(META))  # equal: fine
    expected = dict(META, loss="ring", dataset="cifar10", out_dim=128)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, expected_meta=expected)
    message = str(info.value)
    assert "checkpoint was trained with loss='hcl', this run uses loss='ring'" in message
    assert (
        "checkpoint was trained with dataset='mnist1d', this run uses dataset='cifar10'" in message
    )
    assert "out_dim" in message
    assert "framework" not in message and "backbone" not in message  # equal keys are not listed
    assert str(path) in message

    fewer = {k: v for k, v in META.items() if k != "backbone"}
    with pytest.raises(ValueError, match="backbone='cnn1d', this run sets no 'backbone'"):
        load_checkpoint(path, expected_meta=fewer)


def test_meta_missing_from_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    assert load_checkpoint(path)["epoch"] == 1
    with pytest.raises(ValueError, match="no 'meta' entry"):
        load_checkpoint(path, expected_meta=META)


def test_checkpoint_meta_from_config():
    config = {
        "seed": 0,
        "data": {"dataset": "mnist1d"},
        "model": {"backbone": "cnn1d", "head": "simclr", "out_dim": 128},
        "framework": {"name": "simclr"},
        "loss": {"name": "hcl", "beta": 1.0},
    }
    meta = checkpoint_meta(config)
    assert meta == {
        "framework": "simclr",
        "loss": "hcl",
        "dataset": "mnist1d",
        "backbone": "cnn1d",
        "head": "simclr",
        "out_dim": 128,
    }
    validate_payload({"meta": meta})
