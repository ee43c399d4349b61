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


# ---------------------------------------------------------------------------------------------
# details of the writer and the reader, each against an independent expectation
# ---------------------------------------------------------------------------------------------


def test_the_host_tag_keeps_safe_characters_and_at_most_32_of_them(monkeypatch):
    monkeypatch.setattr(ckpt_module.socket, "gethostname", lambda: "node-7_a.b c/é")
    assert ckpt_module._host_tag() == "node-7_a_b_c__"
    monkeypatch.setattr(ckpt_module.socket, "gethostname", lambda: "Ab9" * 20)
    assert ckpt_module._host_tag() == ("Ab9" * 20)[:32]
    monkeypatch.setattr(ckpt_module.socket, "gethostname", lambda: "")
    assert ckpt_module._host_tag() == "host"


def test_the_temporary_is_named_after_the_target_host_and_process(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    moved = []
    replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: moved.append(Path(src)) or replace(src, dst)
    )
    save_checkpoint(path, {"epoch": 1})
    monkeypatch.undo()
    (src,) = moved
    pattern = (
        rf"\.last\.pt\.{re.escape(ckpt_module._host_tag())}\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp"
    )
    assert src.parent == tmp_path and re.fullmatch(pattern, src.name)


def test_a_new_checkpoint_gets_the_usual_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "last.pt").st_mode) == 0o644


def test_an_existing_temporary_of_the_same_name_is_never_overwritten(tmp_path, monkeypatch):
    """The temporary is created exclusively: a name collision fails instead of writing into
    another writer's file."""
    monkeypatch.setattr(ckpt_module.secrets, "token_hex", lambda n: "abcd1234")
    host, pid = ckpt_module._host_tag(), os.getpid()
    other = tmp_path / f".last.pt.{host}.{pid}.abcd1234.tmp"
    other.write_bytes(b"someone else's bytes")
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert other.read_bytes() == b"someone else's bytes"
    assert not (tmp_path / "last.pt").exists()


def test_the_directory_is_opened_read_only_as_a_directory(tmp_path, monkeypatch):
    real_open = os.open
    flags = []

    def spy_open(target, flag, *args, **kwargs):
        if Path(target) == tmp_path:
            flags.append(flag)
        return real_open(target, flag, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    monkeypatch.undo()
    assert flags == [os.O_RDONLY | os.O_DIRECTORY]


def _fail_save_with(monkeypatch, error):
    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")
        raise error

    monkeypatch.setattr(ckpt_module.torch, "save", failing_save)


def test_a_full_disk_reported_by_torch_is_raised_as_the_os_error_naming_the_checkpoint(
    tmp_path, monkeypatch
):
    import errno

    path = tmp_path / "last.pt"
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    try:  # torch wraps the failed write of its file object in a RuntimeError
        try:
            raise disk_full
        except OSError as inner:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from inner
    except RuntimeError as wrapped:
        error = wrapped
    _fail_save_with(monkeypatch, error)
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"epoch": 1})
    assert type(info.value) is OSError and info.value.errno == errno.ENOSPC
    assert info.value.strerror == "No space left on device" and info.value.filename == str(path)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []


def test_a_runtime_error_without_an_os_error_behind_it_is_raised_as_it_is(tmp_path, monkeypatch):
    error = RuntimeError("torch could not pickle this")
    _fail_save_with(monkeypatch, error)
    with pytest.raises(RuntimeError) as info:
        save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert info.value is error
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_without_errno_keeps_its_message(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    _fail_save_with(monkeypatch, OSError("disk full"))
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"epoch": 1})
    assert info.value.errno is None and info.value.strerror == "disk full"
    assert info.value.filename == str(path)


def test_an_interrupted_save_removes_its_temporary_and_is_re_raised(tmp_path, monkeypatch):
    _fail_save_with(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert list(tmp_path.iterdir()) == []


def test_the_os_error_behind_follows_causes_and_contexts_and_stops_on_a_cycle():
    disk = OSError(28, "No space left on device")
    middle = ValueError("middle")
    middle.__context__ = disk
    top = RuntimeError("top")
    top.__cause__ = middle
    assert ckpt_module._os_error_behind(top) is disk
    assert ckpt_module._os_error_behind(disk) is disk
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a  # a cycle without an OSError
    assert ckpt_module._os_error_behind(a) is None


def test_the_first_line_of_an_error_drops_colours_and_the_rest():
    error = RuntimeError("\x1b[31mbad\x1b[0m file\nsecond line\n")
    assert ckpt_module._first_line(error) == "RuntimeError: bad file"
    assert ckpt_module._first_line(EOFError()) == "EOFError"
    assert ckpt_module._first_line(ValueError("  \n ")) == "ValueError"  # blank message


def test_stale_temporaries_are_recognised_only_by_their_exact_name(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, pid = ckpt_module._host_tag(), dead.pid
    kept = [
        f".last.pt.other-host.{pid}.deadbeef.tmp",  # another host: its pid means nothing here
        f".last.pt.{host}.x{pid}.deadbeef.tmp",  # not a pid
        f".last.pt.{host}.{pid}.dead.beef.tmp",  # four fields
        f".last.pt.{host}.{pid}.tmp",  # two fields
        f".last.pt.{host}.{pid}.deadbeef.part",  # not a temporary
        f".last.pt.{host}.{pid}.deadbeefXpart",  # not a temporary (3 fields if cut at -4)
        f"last.pt.{host}.{pid}.deadbeef.tmp",  # not hidden
    ]
    for name in kept:
        (tmp_path / name).write_bytes(b"x")
    removed = tmp_path / f".last.pt.{host}.{pid}.deadbeef.tmp"
    removed.write_bytes(b"x")
    listing = Path.iterdir  # every other entry first: a non-match does not end the scan

    def others_first(self):
        return iter(sorted(listing(self), key=lambda p: p == removed))

    monkeypatch.setattr(Path, "iterdir", others_first)
    save_checkpoint(path, {"epoch": 1})
    monkeypatch.undo()
    assert not removed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "last.pt"])


def test_a_temporary_that_cannot_be_removed_or_a_missing_directory_is_not_an_error(
    tmp_path, monkeypatch
):
    ckpt_module._remove_stale_temporaries(tmp_path / "missing" / "last.pt")  # nothing to list
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.pt.{ckpt_module._host_tag()}.{dead.pid}.deadbeef.tmp"
    stale.write_bytes(b"x")

    def refuse(self, *args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(Path, "unlink", refuse)
    ckpt_module._remove_stale_temporaries(tmp_path / "last.pt")
    monkeypatch.undo()
    assert stale.exists()


@pytest.mark.parametrize(
    ("error", "alive"),
    [(None, True), (ProcessLookupError(), False), (PermissionError(), True), (OSError(), True)],
)
def test_a_writer_counts_as_alive_unless_its_process_is_known_to_be_gone(monkeypatch, error, alive):
    calls = []

    def fake_kill(pid, sig):
        calls.append((pid, sig))
        if error is not None:
            raise error

    monkeypatch.setattr(ckpt_module.os, "kill", fake_kill)
    assert ckpt_module._pid_alive(12345) is alive
    assert calls == [(12345, 0)]  # signal 0: only asks whether the process exists
    assert ckpt_module._pid_alive(os.getpid()) is True and len(calls) == 1  # itself: no call


def _zip_with_crc_zero(path: Path, member_suffix: str) -> None:
    """Set the stored CRC-32 of the member ending with ``member_suffix`` to 0 (local header and
    central directory), as a writer that does not compute CRCs would."""
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith(member_suffix)]
        crc = info.CRC.to_bytes(4, "little")
    assert crc != b"\0\0\0\0" and data.count(crc) == 2
    data = data.replace(crc, b"\0\0\0\0")
    path.write_bytes(bytes(data))


def test_members_without_a_stored_crc_are_not_checked(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.arange(1000.0), "epoch": 3})
    _zip_with_crc_zero(path, "data/0")
    loaded = load_checkpoint(path)  # the CRC of 0 is skipped, not compared
    assert torch.equal(loaded["w"], torch.arange(1000.0)) and loaded["epoch"] == 3


def test_verify_false_skips_the_crc_check(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.zeros(20_000), "epoch": 3})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = b"\x01\x02\x03\x04"
    path.write_bytes(bytes(data))
    assert load_checkpoint(path, verify=False)["epoch"] == 3


def test_the_refusal_names_the_global_the_pickle_references(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit(tmp_path / "pwned")}, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert str(info.value) == (
        f"checkpoint {path} contains objects that torch.load(weights_only=True) refuses to load "
        "(it references posix.mkdir): unpickling them could run code. hardneg only writes "
        "tensors and plain containers, so this file was not written by hardneg or was tampered "
        "with. It was not loaded"
    )


def test_loading_errors_name_the_file_exactly(tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path} does not exist"
    with pytest.raises(ValueError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"checkpoint {tmp_path} is a directory, not a checkpoint file"
    with pytest.raises(ValueError) as info:
        save_checkpoint(tmp_path, {"a": 1})
    assert str(info.value) == (
        f"checkpoint path {tmp_path} is a directory; give a file name such as last.pt"
    )
    with pytest.raises(ValueError) as info:
        save_checkpoint(path, [1])  # type: ignore[arg-type]
    assert str(info.value) == "a checkpoint payload must be a dict, got list"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path} does not contain a checkpoint dict (found list)"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 40)  # a zip header and nothing after it
    with pytest.raises(ValueError, match=r"^checkpoint \S+ is truncated or corrupt \(\w+: "):
        load_checkpoint(path)


def test_a_tensor_key_names_the_key_and_its_type():
    with pytest.raises(ValueError) as info:
        validate_payload({"model": {1.5: 1}})
    assert str(info.value) == (
        "payload['model'] has a key 1.5 of type float; checkpoint dict keys must be str or int "
        "so that torch.load(weights_only=True) can read them back"
    )
    with pytest.raises(ValueError) as info:
        validate_payload({"a": [1, (2, {"b": np.float32(1)})]}, name="state")
    assert str(info.value).startswith("state['a'][1][1]['b'] has type numpy.float32, ")
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError) as info:
        validate_payload({"x": cyclic})
    # named where the list is met again inside itself
    assert str(info.value) == "payload['x'][0] contains itself (a reference cycle); cannot save it"


def test_every_readable_type_is_accepted_and_read_back(tmp_path):
    payload = {
        1: "int key",
        "scalars": [1, 1.5, True, "s", None],
        "atoms": (torch.float16, torch.device("cpu"), torch.Size([2, 3])),
        "tensors": [torch.zeros(2), nn.Parameter(torch.ones(2))],
        "ordered": OrderedDict(b=1, a=2),
        "numpy_tensor": torch.from_numpy(np.arange(3)),
    }
    validate_payload(payload)
    save_checkpoint(tmp_path / "last.pt", payload)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded[1] == "int key" and loaded["scalars"] == [1, 1.5, True, "s", None]
    assert loaded["atoms"] == (torch.float16, torch.device("cpu"), torch.Size([2, 3]))
    assert list(loaded["ordered"]) == ["b", "a"]


def test_numpy_scalars_of_zero_dimensions_get_the_scalar_hint():
    with pytest.raises(ValueError, match=r"e\.g\. float\(x\), int\(x\) or x\.item\(\)\)$"):
        validate_payload({"x": np.array(1.0)})
    with pytest.raises(ValueError, match=r"torch\.from_numpy\(x\) or x\.tolist\(\)\)$"):
        validate_payload({"x": np.zeros((1,))})
    with pytest.raises(ValueError, match=r"x\.as_subclass\(torch\.Tensor\)\)$"):
        validate_payload({"x": torch.zeros(2).as_subclass(_TensorSubclass)})
    with pytest.raises(ValueError, match=r"e\.g\. sorted\(x\)\)$"):
        validate_payload({"x": {1}})


class _TensorSubclass(torch.Tensor):
    pass


def test_meta_values_are_compared_by_value_type_and_shape():
    same = ckpt_module._same
    assert same(torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert not same(torch.tensor([1, 2]), torch.tensor([1, 3]))
    assert not same(torch.tensor([1, 2]), torch.tensor([[1, 2]]))  # equal values, other shape
    assert not same(torch.tensor([1]), [1]) and not same([1], torch.tensor([1]))
    assert not same(torch.tensor(1), 1) and not same(1, torch.tensor(1))  # 0-dim == int is True
    assert not same({"a": 1}, 1) and not same(1, {"a": 1})
    assert not same([1], 1) and not same(1, [1]) and not same((1,), "a")
    assert same({"a": [1, 2.0]}, {"a": (1, 2.0)}) and not same({"a": 1}, {"a": 1, "b": 2})
    assert not same({"a": 1}, {"a": 2}) and not same({"a": 1}, {"b": 1})
    assert not same([1, 2], [1, 2, 3]) and not same([1, 2], [1, 3])
    assert same(float("nan"), float("nan")) and not same(float("nan"), 1.0)
    assert not same(True, 1) and not same(1, True) and same(True, True) and same(1, 1.0)

    class Unequal:
        def __eq__(self, other):
            raise TypeError("cannot compare")

    assert not same(Unequal(), 1)


def test_meta_differences_list_expected_keys_first_then_stored_only_keys():
    stored = {"loss": "hcl", "extra": 1, "framework": "moco"}
    expected = {"framework": "moco", "loss": "ring", "dataset": "cifar10"}
    assert ckpt_module.meta_differences(stored, expected) == [
        "checkpoint was trained with loss='hcl', this run uses loss='ring'",
        "checkpoint has no 'dataset', this run uses dataset='cifar10'",
        "checkpoint was trained with extra=1, this run sets no 'extra'",
    ]
    assert ckpt_module.meta_differences({"a": None}, {"a": None}) == []


def test_meta_differences_name_the_entries_of_a_mapping_that_differ():
    # `--resume RUN loss.beta=2` listed both whole loss_params dicts, the difference buried
    stored = {"loss": "hcl", "loss_params": {"temperature": 0.5, "beta": 1.0, "anneal": None}}
    expected = {"loss": "hcl", "loss_params": {"temperature": 0.5, "beta": 2.0, "tau": 0.1}}
    assert ckpt_module.meta_differences(stored, expected) == [
        "checkpoint was trained with loss_params['beta']=1.0, this run uses loss_params['beta']=2.0",
        "checkpoint has no loss_params['tau'], this run uses loss_params['tau']=0.1",
        "checkpoint was trained with loss_params['anneal']=None, this run sets no loss_params['anneal']",
    ]
    assert ckpt_module.meta_differences({"p": {"a": 1}}, {"p": 3}) == [
        "checkpoint was trained with p={'a': 1}, this run uses p=3"
    ]


def test_a_meta_mismatch_message_is_one_line_per_key():
    with pytest.raises(ValueError) as info:
        ckpt_module.check_meta({"meta": {"a": 1, "b": 2}}, {"a": 2, "b": 3}, path="run/last.pt")
    assert str(info.value) == (
        "checkpoint run/last.pt does not match this run:\n"
        "  checkpoint was trained with a=1, this run uses a=2\n"
        "  checkpoint was trained with b=2, this run uses b=3"
    )
    ckpt_module.check_meta({"meta": {"a": 1}}, {"a": 1})  # equal: no error
    with pytest.raises(ValueError) as info:
        ckpt_module.check_meta({"meta": [1]}, {"a": 1})
    assert str(info.value) == (
        "checkpoint <payload> has 'meta' of type list; cannot check that it matches this run "
        "(expected meta {'a': 1})"
    )
    with pytest.raises(ValueError) as info:
        ckpt_module.check_meta({}, {"a": 1}, path="x.pt")
    assert str(info.value).startswith("checkpoint x.pt has no 'meta' entry; cannot check")


def test_checkpoint_meta_reads_dataclasses_objects_with_to_dict_and_attribute_sections():
    import dataclasses
    from types import SimpleNamespace

    @dataclasses.dataclass
    class Model:
        backbone: str = "resnet18"
        head: str = "mlp"
        out_dim: int = 64

    @dataclasses.dataclass
    class Config:
        model: Model = dataclasses.field(default_factory=Model)
        loss: dict = dataclasses.field(default_factory=lambda: {"name": "ring"})

    expected = {
        "framework": None,
        "loss": "ring",
        "dataset": None,
        "backbone": "resnet18",
        "head": "mlp",
        "out_dim": 64,
    }
    assert checkpoint_meta(Config()) == expected

    class WithToDict:
        def to_dict(self):
            return {"framework": SimpleNamespace(name="moco"), "data": {"dataset": "stl10"}}

    meta = checkpoint_meta(WithToDict())
    assert meta["framework"] == "moco" and meta["dataset"] == "stl10" and meta["loss"] is None
    with pytest.raises(ValueError) as info:
        checkpoint_meta(Config)  # the class, not an instance
    assert str(info.value) == "config must be a dict or a dataclass, got type"
    with pytest.raises(ValueError, match="got int"):
        checkpoint_meta(3)


def test_tensors_are_placed_where_map_location_says(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.arange(3.0)})
    assert load_checkpoint(path)["w"].device.type == "cpu"
    assert load_checkpoint(path, map_location="meta")["w"].device.type == "meta"


@pytest.mark.parametrize("stage", ["verify", "load"])
@pytest.mark.parametrize("error", [PermissionError("no access"), MemoryError()])
def test_permission_and_memory_errors_are_not_reported_as_corruption(
    tmp_path, monkeypatch, stage, error
):
    """A file that cannot be read now, or a machine out of memory, is not a corrupt checkpoint:
    the error goes through as it is (a MemoryError while verifying is not caught either)."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.arange(3.0)})

    def fail(*args, **kwargs):
        raise error

    if stage == "verify":
        monkeypatch.setattr(ckpt_module, "_check_zip_integrity", fail)
    else:
        monkeypatch.setattr(ckpt_module.torch, "load", fail)
    with pytest.raises(type(error)) as info:
        load_checkpoint(path)
    assert info.value is error


def test_numpy_types_of_numpy_submodules_get_the_numpy_hint():
    masked = np.ma.masked_array([1.0, 2.0])
    assert type(masked).__module__.startswith("numpy.")
    with pytest.raises(ValueError, match=r"e\.g\. torch\.from_numpy\(x\) or x\.tolist\(\)\)$"):
        validate_payload({"x": masked})


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_temporary_that_cannot_be_removed_after_a_failure_does_not_hide_the_failure(
    tmp_path, monkeypatch, error
):
    _fail_save_with(monkeypatch, error)

    def refuse(*args, **kwargs):
        raise PermissionError("cannot remove")

    monkeypatch.setattr(ckpt_module.os, "unlink", refuse)
    with pytest.raises(type(error)) as info:
        save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert "disk full" in str(info.value) or isinstance(info.value, KeyboardInterrupt)


def _member_data_offset(path: Path, suffix: str) -> tuple[int, int]:
    """Offset and size of the stored bytes of the zip member ending with ``suffix``."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith(suffix)]
    data = path.read_bytes()
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def test_a_corrupt_one_byte_member_is_detected(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"b": torch.tensor([7], dtype=torch.uint8)})
    offset, size = _member_data_offset(path, "data/0")
    assert size == 1
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert int(torch.load(path, weights_only=True)["b"]) == 7 ^ 0xFF  # torch alone: silently wrong
    with pytest.raises(
        ValueError,
        match=r"is truncated or corrupt \(BadZipFile: Bad CRC-32 for file '\S*data/0'\)$",
    ):
        load_checkpoint(path)


def test_a_member_without_a_crc_does_not_end_the_check_of_the_others(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.zeros(20_000), "epoch": 3})
    _zip_with_crc_zero(path, "data.pkl")  # the first member: skipped, not the end of the scan
    offset, size = _member_data_offset(path, "data/0")
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(path)


def _message_when_torch_load_raises(tmp_path, monkeypatch, error: Exception) -> tuple[str, str]:
    """``(path, message)``: the ValueError that ``load_checkpoint`` of a valid file gives when
    ``torch.load`` itself raises ``error``."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt_module.torch, "load", fail)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    return str(path), str(info.value)


def test_an_unpickling_error_that_is_not_a_refusal_is_reported_as_corruption(tmp_path, monkeypatch):
    error = pickle.UnpicklingError("invalid load key, 'x'.")
    path, message = _message_when_torch_load_raises(tmp_path, monkeypatch, error)
    assert message == (
        f"checkpoint {path} is truncated or corrupt (UnpicklingError: invalid load key, 'x'.)"
    )


def test_a_refusal_that_names_no_global_gets_no_detail(tmp_path, monkeypatch):
    error = pickle.UnpicklingError("Weights only load failed. Unsupported operand 149")
    path, message = _message_when_torch_load_raises(tmp_path, monkeypatch, error)
    assert message.startswith(
        f"checkpoint {path} contains objects that torch.load(weights_only=True) refuses to "
        "load: unpickling them could run code."
    )
