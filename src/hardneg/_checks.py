"""Argument and tensor validation that fails early with a message a user can act on.

Every error names the parameter, the value it got and what is allowed, so that a typo in a
config surfaces as one readable line instead of a stack trace from deep inside torch.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
from collections.abc import Iterator
from os import PathLike

import torch
from torch import Tensor


def closest_hint(value: object, choices: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``value``, or ``""``."""
    close = difflib.get_close_matches(str(value), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> float:
    """Return ``value`` as a float (or int) after checking its type and range. Any real number
    counts (numpy's scalars too: a sweep's np.float32); booleans (numpy's are no
    numbers.Real) do not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if integer and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        # an infinite end is always open: "[0, inf)", never "[0, inf]"
        left = "[" if low_inclusive and low is not None else "("
        right = "]" if high_inclusive and high is not None else ")"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")
    return int(value) if integer else float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def check_embeddings(name: str, x: object, *, min_rows: int = 1) -> Tensor:
    """A 2-D floating tensor of finite values with at least ``min_rows`` rows."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows x embedding dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} rows, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(x.shape)}")
    # one read of x: a NaN or an infinity makes the sum non-finite, and a float64 sum of finite
    # float32 / half entries cannot overflow, so a finite sum proves every entry finite
    # (float64 entries near its largest value may overflow it: then the exact pass decides)
    if math.isfinite(float(x.detach().sum(dtype=torch.float64))):
        return x
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        row = int((~finite).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"{name} contains {bad} NaN or Inf value(s) (first in row {row}); "
            "only finite embeddings are allowed"
        )
    return x


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_labels(name: str, labels: object, rows: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of integer class ids, got {type(labels).__name__}"
        )
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    return labels


def check_index(name: str, index: object, rows: int, size: int) -> Tensor:
    """A ``[rows]`` integer tensor of positions in ``[0, size)``."""
    if not isinstance(index, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of integer positions, got {type(index).__name__}"
        )
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer positions, got dtype {index.dtype}")
    if index.shape != (rows,):
        raise ValueError(
            f"{name} must have shape ({rows},) (one entry per query), got {tuple(index.shape)}"
        )
    if rows and not bool(((index >= 0) & (index < size)).all()):
        bad = index[(index < 0) | (index >= size)][0]
        raise ValueError(f"{name} must hold positions in [0, {size}) of the pool, got {int(bad)}")
    return index


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


@contextlib.contextmanager
def utf8_file(path: str | PathLike) -> Iterator[None]:
    """Reading ``path`` inside: a file that is not UTF-8 fails naming it (a bare
    ``UnicodeDecodeError`` named none)."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason}); save it as UTF-8") from None
