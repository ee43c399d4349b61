"""Where and how a run executes: device, mixed precision, memory format, data placement, and a
graceful stop on SIGINT / SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor


def device_problem(device: torch.device) -> str | None:
    """Why this machine cannot run on ``device``, in words (None: it can): no device of its
    kind (CUDA, MPS; other kinds are always there), or a CUDA index past
    ``torch.cuda.device_count()`` (``cuda:1`` on a one-GPU machine passed the kind check and
    failed later, with a stack trace, when the first tensor moved there)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available here"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            have = f"cuda:0 to cuda:{count - 1}" if count > 1 else "cuda:0"
            plural = "s" if count != 1 else ""
            return (
                f"this machine has {count} CUDA device{plural}, so the index must be below "
                f"{count}: use {have}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available here"
    return None


def check_device_option(device: str, option: str = "--device") -> None:
    """A ``--device`` value that torch cannot parse (``gpu``, ``cuda:x``) or that this machine
    lacks fails in one line naming ``option`` (torch raises a RuntimeError, shown with a stack
    trace, when the device string is parsed or the first tensor moves there)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"{option} {device!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    problem = device_problem(parsed)
    if problem:
        if not device_available(torch.device(parsed.type)):  # none of its kind at all
            problem += f"; use {option} cpu"
        raise ValueError(f"{option} {device}: {problem}")


def device_available(device: torch.device) -> bool:
    """Whether this machine has ``device`` (:func:`device_problem` finds nothing)."""
    return device_problem(device) is None


def select_device(name: str, dist_device: torch.device | None = None) -> torch.device:
    """``auto``: the distributed context's device, else CUDA, else MPS, else CPU."""
    if name != "auto":
        device = torch.device(name)
        problem = device_problem(device)
        if problem:
            raise ValueError(f"train.device={name!r} but {problem}")
        return device
    if dist_device is not None and dist_device.type != "cpu":
        return dist_device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = full fp32). ``auto`` is bf16 on CUDA GPUs that support it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def use_channels_last(setting: bool | str, device: torch.device, kind: str) -> bool:
    """``auto``: channels-last for image models on CUDA (faster convolutions with tensor cores)."""
    if setting == "auto":
        return device.type == "cuda" and kind == "image"
    return bool(setting) and kind == "image"


def place_inputs(inputs: Tensor, device: torch.device, fraction: float = 0.4) -> Tensor:
    """Move the whole training set to ``device`` once when it takes at most ``fraction`` of the
    free accelerator memory; otherwise keep it in (pinned) host memory and move each batch."""
    if device.type == "cpu":
        return inputs
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if inputs.numel() * inputs.element_size() > fraction * free:
            return inputs.pin_memory()
    return inputs.to(device)


def run_dir_problem(run_dir: str | Path) -> str | None:
    """Why ``run_dir`` cannot hold a run (one line), or ``None`` when it can.

    Checked before any data are loaded: each missing folder of the path is created, a small
    file is written, flushed and removed, and the folders created here are removed again, so a
    folder under a file, on a read-only file system, where we may not write (``/sys``) or on a
    full disk is named at once instead of failing in the middle of the run.
    """
    run_dir = Path(run_dir)
    created: list[Path] = []
    try:
        for folder in [*reversed(run_dir.parents), run_dir]:
            if folder.is_dir():
                continue
            if folder.exists() or folder.is_symlink():
                return f"cannot use the run folder {run_dir}: {folder} is a file, not a folder"
            folder.mkdir()
            created.append(folder)
        probe = run_dir / f".hardneg-write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as fh:
                fh.write(b"\0" * 65536)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as err:
        why = err.strerror or str(err)
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(run_dir) else ""
        return f"cannot write the run folder {run_dir}: {why}{where}"
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return None


class StopSignal:
    """Context manager: the first SIGINT / SIGTERM only sets :attr:`requested` (the loop saves a
    checkpoint at the next step boundary and stops); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        name = signal.Signals(signum).name
        print(
            f"\n{name} received: finishing this step and saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
