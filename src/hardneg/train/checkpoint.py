"""Crash-safe, code-free checkpoints.

``save_checkpoint`` writes a temporary file next to the target, flushes and ``fsync``s it, then
``os.replace``s it over the target and ``fsync``s the directory: a reader (or a resumed run)
sees either the previous complete checkpoint or the new complete one, never a partial file,
even if the process is killed (``SIGKILL``, power loss after the directory sync) mid-write.

``load_checkpoint`` reads with ``torch.load(weights_only=True, map_location="cpu")``, so a
checkpoint cannot run code when it is opened, and turns the zip/pickle errors of a missing,
truncated, corrupt or unsafe file into one readable ``FileNotFoundError`` / ``ValueError``.
Because of ``weights_only`` the payload may only contain tensors, dicts, lists, tuples and
``int``/``float``/``bool``/``str``/``None`` (plus ``torch.dtype``/``torch.device``/
``torch.Size``); ``save_checkpoint`` checks this up front and names the offending key instead of
writing a file that could not be read back.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import secrets
import socket
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_meta", "validate_payload"]

_SCALARS = (int, float, bool, str, type(None))
_TORCH_ATOMS = (torch.dtype, torch.device)
_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_KEY_TYPES = (str, int)  # int keys: optimizer.state_dict()["state"] is keyed by parameter index
_TMP_SUFFIX = ".tmp"


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _type_name(value: object) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _hint(value: object) -> str:
    module = type(value).__module__
    if module == "numpy" or module.startswith("numpy."):
        if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
            return " (convert it explicitly, e.g. torch.from_numpy(x) or x.tolist())"
        return " (convert it explicitly, e.g. float(x), int(x) or x.item())"
    if isinstance(value, (set, frozenset)):
        return " (convert it explicitly, e.g. sorted(x))"
    if isinstance(value, torch.Tensor):
        return " (tensor subclasses cannot be read back; store a plain tensor, e.g. x.as_subclass(torch.Tensor))"
    if isinstance(value, Path):
        return " (convert it explicitly, e.g. str(x))"
    return " (store only tensors, dicts, lists, tuples, int, float, bool, str and None)"


def validate_payload(payload: object, name: str = "payload") -> None:
    """Raise ``ValueError`` unless ``torch.load(weights_only=True)`` can read ``payload`` back.

    Types are checked exactly (``type(x) is float``, not ``isinstance``): a ``numpy.float64`` is a
    ``float`` subclass that ``torch.save`` pickles as a numpy object, which ``weights_only``
    refuses. Nothing is converted; the error names the key path of the first offending value.
    """
    _validate(payload, name, set())


def _validate(value: object, where: str, active: set[int]) -> None:
    cls = type(value)
    if cls in _SCALARS or cls in _TENSOR_TYPES or isinstance(value, _TORCH_ATOMS):
        return
    if cls in (dict, OrderedDict, list, tuple, torch.Size):
        if id(value) in active:
            raise ValueError(f"{where} contains itself (a reference cycle); cannot save it")
        active.add(id(value))
        try:
            if cls in (dict, OrderedDict):
                for key, item in value.items():  # type: ignore[union-attr]
                    if type(key) not in _KEY_TYPES:
                        raise ValueError(
                            f"{where} has a key {key!r} of type {_type_name(key)}; checkpoint "
                            "dict keys must be str or int so that "
                            "torch.load(weights_only=True) can read them back"
                        )
                    _validate(item, f"{where}[{key!r}]", active)
            else:
                for index, item in enumerate(value):  # type: ignore[arg-type]
                    _validate(item, f"{where}[{index}]", active)
        finally:
            active.discard(id(value))
        return
    raise ValueError(
        f"{where} has type {_type_name(value)}, which torch.load(weights_only=True) cannot read "
        f"back{_hint(value)}"
    )


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep the file
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by writers on this host that were killed mid-write."""
    prefix = _tmp_prefix(path)
    host = _host_tag()
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[len(prefix) : -len(_TMP_SUFFIX)].split(".")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if not _pid_alive(int(parts[1])):
            with contextlib.suppress(OSError):
                entry.unlink()


def _fsync_directory(directory: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support syncing a directory
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` to ``path`` (parent directories are created).

    The bytes go to ``.<name>.<host>.<pid>.<random>.tmp`` in the same directory, are flushed and
    ``fsync``ed, and the file is ``os.replace``d over ``path``; then the directory is ``fsync``ed
    so the rename itself is durable. Temporaries of writers on this host that were killed mid-way
    are removed on the next save. ``payload`` is validated first (see :func:`validate_payload`):
    a ``ValueError`` names the offending key and nothing is written.
    """
    path = Path(path)
    if not isinstance(payload, dict):
        raise ValueError(f"a checkpoint payload must be a dict, got {_type_name(payload)}")
    validate_payload(payload)
    if path.is_dir():
        raise ValueError(f"checkpoint path {path} is a directory; give a file name such as last.pt")
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = directory / (
        f"{_tmp_prefix(path)}{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                torch.save(payload, handle)
            except RuntimeError as err:
                # torch reports a failed write into the file object (a full disk) as an
                # "enforce fail ... unexpected pos" error: raise the OSError behind it
                cause = _os_error_behind(err)
                if cause is not None:
                    raise cause from None
                handle.flush()  # a write still buffered fails here with its OSError
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # one line naming the checkpoint and the cause, not torch's message about zip offsets
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _os_error_behind(err: BaseException) -> OSError | None:
    """The first ``OSError`` in the chain of causes / contexts of ``err`` (``None`` if none)."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        if isinstance(node, OSError):
            return node
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)  # torch colours parts of its messages
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _check_zip_integrity(path: Path) -> None:
    """Verify the CRC-32 of every member of a zip-format checkpoint.

    ``torch.load`` does not check CRCs, so flipped bytes inside tensor data would load silently.
    Members whose stored CRC is 0 are skipped (torch can be configured not to compute CRCs).
    """
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0 or info.file_size == 0:
                continue
            with archive.open(info) as member:  # raises BadZipFile on a CRC mismatch at EOF
                while member.read(1 << 24):
                    pass


def _is_weights_only_refusal(error: BaseException) -> bool:
    return isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower()


def load_checkpoint(
    path: str | os.PathLike[str],
    expected_meta: Mapping[str, Any] | None = None,
    *,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` without executing any code from it.

    Args:
        path: the checkpoint file.
        expected_meta: when given, ``payload["meta"]`` must equal it key for key; otherwise a
            ``ValueError`` lists every differing key with its stored and expected value.
        map_location: where tensors are placed (default CPU; move them where they are needed).
        verify: check the CRC-32 of every archive member first (catches corruption that
            ``torch.load`` would not notice; costs one extra read of the file).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated or corrupt, contains objects that ``weights_only``
            refuses (a pickle that would run code), is not a checkpoint dict, or its meta differs
            from ``expected_meta``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file")
    if verify and zipfile.is_zipfile(path):
        try:
            _check_zip_integrity(path)
        except PermissionError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as error:
            raise ValueError(
                f"checkpoint {path} is truncated or corrupt ({_first_line(error)})"
            ) from None
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (PermissionError, MemoryError):
        raise
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, OSError, ...
        if _is_weights_only_refusal(error):
            found = re.search(r"GLOBAL\s+([\w.]+)", str(error))
            detail = f" (it references {found.group(1)})" if found else ""
            raise ValueError(
                f"checkpoint {path} contains objects that torch.load(weights_only=True) refuses "
                f"to load{detail}: unpickling them could run code. hardneg only writes tensors "
                "and plain containers, so this file was not written by hardneg or was tampered "
                "with. It was not loaded"
            ) from None
        raise ValueError(
            f"checkpoint {path} is truncated or corrupt ({_first_line(error)})"
        ) from None
    if not isinstance(payload, dict):
        raise ValueError(
            f"checkpoint {path} does not contain a checkpoint dict (found {_type_name(payload)})"
        )
    if expected_meta is not None:
        check_meta(payload, expected_meta, path=path)
    return payload


# ----------------------------------------------------------------------------------------------
# meta
# ----------------------------------------------------------------------------------------------

_MISSING = object()


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def meta_differences(
    stored: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """One line per key whose value differs between ``stored`` and ``expected`` meta; a key
    whose two values are both mappings (``loss_params``) gives one line per differing entry,
    ``loss_params['beta']``, not both whole mappings (a dozen entries each, the one that
    differs hard to find)."""
    lines = []
    for name in list(expected) + [k for k in stored if k not in expected]:
        have = stored.get(name, _MISSING)
        want = expected.get(name, _MISSING)
        if have is not _MISSING and want is not _MISSING and _same(have, want):
            continue
        key = f"{prefix}[{name!r}]" if prefix else str(name)
        if isinstance(have, Mapping) and isinstance(want, Mapping):
            lines += meta_differences(have, want, key)
            continue
        named = key if prefix else repr(name)  # 'dataset', loss_params['beta']
        if have is _MISSING:
            lines.append(f"checkpoint has no {named}, this run uses {key}={want!r}")
        elif want is _MISSING:
            lines.append(f"checkpoint was trained with {key}={have!r}, this run sets no {named}")
        else:
            lines.append(
                f"checkpoint was trained with {key}={have!r}, this run uses {key}={want!r}"
            )
    return lines


def check_meta(
    payload: Mapping[str, Any], expected_meta: Mapping[str, Any], *, path: object = "<payload>"
) -> None:
    """Raise ``ValueError`` listing every key where ``payload["meta"]`` differs from expected."""
    stored = payload.get("meta", _MISSING)
    if not isinstance(stored, Mapping):
        found = "no 'meta' entry" if stored is _MISSING else f"'meta' of type {_type_name(stored)}"
        raise ValueError(
            f"checkpoint {path} has {found}; cannot check that it matches this run "
            f"(expected meta {dict(expected_meta)!r})"
        )
    lines = meta_differences(stored, expected_meta)
    if lines:
        raise ValueError(f"checkpoint {path} does not match this run:\n  " + "\n  ".join(lines))


def checkpoint_meta(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The identity of a run, from its resolved config, for ``payload["meta"]``.

    ``framework``, ``loss``, ``dataset``, ``backbone``, ``head`` and ``out_dim`` are taken from
    the config sections ``framework.name``, ``loss.name``, ``data.dataset``, ``model.backbone``,
    ``model.head`` and ``model.out_dim``; a missing entry becomes ``None``. Accepts a dict or an
    object with ``to_dict()`` / a dataclass.
    """
    if not isinstance(config, Mapping):
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        else:
            import dataclasses

            if dataclasses.is_dataclass(config) and not isinstance(config, type):
                config = dataclasses.asdict(config)
            else:
                raise ValueError(f"config must be a dict or a dataclass, got {_type_name(config)}")

    def get(section: str, key: str) -> Any:
        part = config.get(section)
        if isinstance(part, Mapping):
            return part.get(key)
        return getattr(part, key, None)

    return {
        "framework": get("framework", "name"),
        "loss": get("loss", "name"),
        "dataset": get("data", "dataset"),
        "backbone": get("model", "backbone"),
        "head": get("model", "head"),
        "out_dim": get("model", "out_dim"),
    }
