"""Seeding, and capturing / restoring every random number generator a training run uses.

``capture_rng_state`` returns only tensors, lists, ints, floats, strings and ``None`` (numpy's
state tuple and Python's ``random`` state are converted explicitly), so the result can go into a
checkpoint that is read back with ``torch.load(weights_only=True)``::

    state = capture_rng_state({"augment": aug_generator})
    save_checkpoint(path, {..., "rng": state})
    ...
    restore_rng_state(load_checkpoint(path)["rng"], {"augment": aug_generator})

CUDA states are captured only when CUDA has been initialised in this process (before that the
CUDA generators hold nothing but the seed given to :func:`seed_everything`), so capturing never
creates a CUDA context. In a distributed run each process has its own generators: a checkpoint
written by rank 0 holds rank 0's state.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "capture_rng_state", "restore_rng_state"]

_FORMAT = 1


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: an integer in ``[0, 2**32 - 1]`` (numpy's range).
        deterministic: also ask torch for deterministic algorithms (cuDNN deterministic, no
            benchmark autotuning, ``torch.use_deterministic_algorithms(True, warn_only=True)``);
            slower, and still not bitwise identical across GPU models.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32 - 1], got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily if CUDA is not initialised)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "version": int(version),
        "state": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": None if gauss_next is None else float(gauss_next),
    }


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot of all random number generators, safe for ``torch.load(weights_only=True)``.

    Args:
        generators: extra named ``torch.Generator`` objects (e.g. the augmentation generator),
            captured under their names.

    Returns:
        ``{"format", "python", "numpy", "torch", "cuda", "generators"}`` where ``cuda`` is a list
        with one state tensor per visible device, or ``None`` if CUDA is not initialised.
    """
    named: dict[str, torch.Tensor] = {}
    for name, generator in (generators or {}).items():
        if not isinstance(name, str):
            raise ValueError(f"generator names must be strings, got {name!r}")
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generators[{name!r}] must be a torch.Generator, got {type(generator).__name__}"
            )
        named[name] = generator.get_state().clone()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "format": _FORMAT,
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "generators": named,
    }


def _require(state: Mapping[str, Any], key: str) -> Any:
    if key not in state:
        raise ValueError(
            f"RNG state has no {key!r} entry (keys: {sorted(state)}); "
            "it was not produced by capture_rng_state"
        )
    return state[key]


def _as_byte_tensor(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"RNG state {where} must be a tensor, got {type(value).__name__}")
    return value.detach().to(device="cpu", dtype=torch.uint8).contiguous().clone()


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Put every generator back into the state recorded by :func:`capture_rng_state`.

    Every generator in ``generators`` must have been captured (``ValueError`` otherwise); captured
    generators that are not passed are ignored. CUDA states are restored for the devices present
    (a warning is given if the checkpoint has CUDA states but this process has no CUDA).
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"RNG state must be a dict, got {type(state).__name__}")
    fmt = state.get("format", _FORMAT)
    if fmt != _FORMAT:
        raise ValueError(f"unsupported RNG state format {fmt!r} (this version reads {_FORMAT})")
    python = _require(state, "python")
    numpy_state = _require(state, "numpy")
    torch_state = _require(state, "torch")
    named = state.get("generators") or {}
    for name, generator in (generators or {}).items():
        if name not in named:
            raise ValueError(
                f"RNG state has no generator named {name!r} (captured: {sorted(named)}); "
                "cannot restore it"
            )
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generators[{name!r}] must be a torch.Generator, got {type(generator).__name__}"
            )

    internal = tuple(int(v) for v in torch.as_tensor(python["state"]).tolist())
    gauss = python.get("gauss_next")
    random.setstate((int(python["version"]), internal, None if gauss is None else float(gauss)))

    keys = torch.as_tensor(numpy_state["keys"]).cpu().numpy().astype(np.uint32)
    np.random.set_state(
        (
            str(numpy_state["bit_generator"]),
            keys,
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )

    torch.set_rng_state(_as_byte_tensor(torch_state, "'torch'"))

    cuda = state.get("cuda")
    if cuda:
        if torch.cuda.is_available():
            for index, device_state in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(_as_byte_tensor(device_state, f"'cuda'[{index}]"), index)
        else:
            warnings.warn(
                "the RNG state includes CUDA generator states but CUDA is not available here; "
                "they are not restored",
                RuntimeWarning,
                stacklevel=2,
            )

    for name, generator in (generators or {}).items():
        generator.set_state(_as_byte_tensor(named[name], f"generators[{name!r}]"))
