"""Create losses by name, as timm creates models: ``hardneg.create_loss("hcl", beta=1.0)``.

Each entry is a factory whose keyword arguments, with their defaults from ``docs/methods.md``,
are the loss's hyper-parameters; an unknown name or keyword fails with the closest valid one.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a loss factory under ``name``."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"a loss named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_losses() -> list[str]:
    """Names accepted by :func:`create_loss`."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def loss_hparams(name: str) -> dict[str, object]:
    """The hyper-parameters of loss ``name`` with their defaults."""
    factory = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def create_loss(name: str, **hparams: object) -> nn.Module:
    """Build the loss registered as ``name`` (see :func:`list_losses`) with ``hparams``."""
    factory = _lookup(name)
    allowed = loss_hparams(name)
    for key in hparams:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown hyper-parameter {key!r} for loss {name!r}{hint} "
                f"Allowed: {', '.join(sorted(allowed))}"
            )
    return factory(**hparams)


def _lookup(name: str) -> Callable[..., nn.Module]:
    _ensure_builtins()
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown loss name {name!r}{hint}; allowed: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def _ensure_builtins() -> None:
    # importing the module registers the built-in losses exactly once
    import hardneg.losses.builtin  # noqa: F401
