"""Create losses by name, as timm creates models: ``hardneg.create_loss("hcl", beta=1.0)``.

Every registered name is a :class:`~hardneg.strategies.Strategy` class, registered in its own
file with :func:`register_strategy`. A loss is that strategy plugged into
:class:`~hardneg.losses.ContrastiveLoss`; its hyper-parameters are

* the loss-level settings (the keyword-only parameters of ``ContrastiveLoss.__init__``:
  ``temperature``, ``tau_plus``, ``objective``, ...) with the strategy's ``loss_defaults``, and
* the strategy's own (the keyword-only parameters of its ``__init__``).

Both are read from the signatures, so a default is written once. ``list_losses()``, ``hardneg
losses``, config validation, ``compare`` and ``demo`` enumerate this registry; nothing else
lists the strategies. An unknown name or keyword fails with the closest valid one.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hardneg._checks import closest_hint

if TYPE_CHECKING:  # the strategies import this module to register themselves
    from hardneg.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}
_DOCS: dict[str, object] = {"ready": False, "create_loss": None, "classes": {}}


def register_strategy(name: str, *, summary: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a :class:`Strategy` subclass under ``name``."""

    def wrap(cls: type) -> type:
        from hardneg.strategies.base import Strategy

        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ValueError(
                f"register_strategy({name!r}) expects a Strategy subclass, got {cls!r}"
            )
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"a strategy name must be lower_snake_case, got {name!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a loss named {name!r} is already registered")
        _check_signature(cls)
        _REGISTRY[name] = cls
        cls.name = name
        if summary is not None:
            cls.summary = summary
        if _DOCS["ready"]:  # a plug-in registered after import: its help appears too
            try:
                refresh_docs()
            except Exception:
                # a refused plug-in (loss_defaults naming an unknown setting) must not stay
                # registered: every later registration refreshes the help and would fail on it
                del _REGISTRY[name]
                refresh_docs()
                raise
        return cls

    return wrap


register_loss = register_strategy  # the older name


def unregister_strategy(name: str) -> None:
    """Remove ``name`` from the registry (for tests and plug-in reloading)."""
    _REGISTRY.pop(name, None)


def _check_signature(cls: type[Strategy]) -> None:
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise ValueError(
                f"{cls.__name__}.__init__ must take only keyword-only hyper-parameters "
                f"(def __init__(self, *, ...)); {p.name!r} is not"
            )
        if p.default is inspect.Parameter.empty:
            raise ValueError(f"{cls.__name__}.__init__: hyper-parameter {p.name!r} needs a default")


def strategy_class(name: str) -> type[Strategy]:
    """The class registered as ``name``."""
    _ensure_builtins()
    if not isinstance(name, str) or name not in _REGISTRY:
        # compared as registered names are written: a paper's "HCL" or "Positive-Aware" too
        key = str(name).lower().replace("-", "_").replace(" ", "_")
        hint = closest_hint(key, list(_REGISTRY))  # (an exact match is the closest)
        raise ValueError(f"unknown loss name {name!r}{hint}; allowed: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def list_losses() -> list[str]:
    """Names accepted by :func:`create_loss`, in registration order (built-ins first)."""
    _ensure_builtins()
    return list(_REGISTRY)


def loss_settings(name: str) -> dict[str, Any]:
    """The loss-level settings of loss ``name`` with their defaults."""
    from hardneg.losses.contrastive import ContrastiveLoss

    cls = strategy_class(name)
    out = {
        p.name: p.default
        for p in inspect.signature(ContrastiveLoss.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    if not cls.supports_debiasing:
        out.pop("tau_plus")
    for key, value in cls.loss_defaults.items():
        if key not in out:
            raise ValueError(f"{cls.__name__}.loss_defaults names an unknown setting {key!r}")
        out[key] = value
    return out


def loss_hparams(name: str) -> dict[str, Any]:
    """Every hyper-parameter of loss ``name`` (loss-level settings, then the strategy's)."""
    cls = strategy_class(name)
    out = loss_settings(name)
    out.update(cls.hparam_defaults())
    return out


def create_loss(name: str, **hparams: Any):
    """Build the loss registered as ``name`` (see :func:`list_losses`) with ``hparams``.

    Run ``hardneg losses NAME`` (or ``help(hardneg.strategies.<Class>)``) for the meaning of
    each hyper-parameter; :func:`describe_loss` returns the same text.
    """
    from hardneg.losses.contrastive import ContrastiveLoss

    cls = strategy_class(name)
    settings = loss_settings(name)
    strategy_keys = set(cls.hparam_names())
    for key in hparams:
        if key not in settings and key not in strategy_keys:
            allowed = sorted(settings) + sorted(strategy_keys)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            extra = ""
            if key == "tau_plus":
                extra = f" ({name} selects negatives: the debiased estimator does not apply)"
            if key == "scale" and "temperature" in settings:
                # sentence-transformers' losses take scale = 1 / temperature
                value = hparams[key]
                as_t = (
                    f"temperature={1 / value:g}"
                    if isinstance(value, (int, float)) and value > 0
                    else "temperature=1/scale"
                )
                extra = f" (logits are cos / temperature: sentence-transformers' scale={value!r} is {as_t})"
            message = f"unknown hyper-parameter {key!r} for loss {name!r}{hint}{extra}"
            end = " " if message.endswith("?") else ". "  # no "?." after a suggestion
            raise ValueError(f"{message}{end}Allowed: {', '.join(allowed)}")
    strategy = cls(**{k: v for k, v in hparams.items() if k in strategy_keys})
    loss_kw = {**settings, **{k: v for k, v in hparams.items() if k in settings}}
    return ContrastiveLoss(strategy, **loss_kw)


def describe_loss(name: str) -> str:
    """A help text for loss ``name``: summary, then every hyper-parameter with its default and
    meaning (read from the docstrings' ``Args:`` sections of the strategy and of the loss)."""
    from hardneg.losses.contrastive import ContrastiveLoss

    cls = strategy_class(name)
    meanings = {**_arg_docs(ContrastiveLoss), **_arg_docs(cls)}
    doc = inspect.getdoc(cls) or ""
    first = cls.summary or (doc.splitlines()[0] if doc else name)
    lines = [f"{name}: {first}", "", "hyper-parameters (default: meaning):"]
    for key, default in loss_hparams(name).items():
        lines.append(f"  {key}={default!r}: {meanings.get(key, '')}".rstrip(": ").rstrip())
    return "\n".join(lines)


def refresh_docs() -> None:
    """Write the registry's help into ``create_loss.__doc__`` and each strategy class's
    docstring: every loss with every hyper-parameter, its default and its meaning, generated
    from the signatures and ``Args:`` sections (``help(hardneg.create_loss)``)."""
    if _DOCS["create_loss"] is None:
        _DOCS["create_loss"] = create_loss.__doc__ or ""
    parts = [str(_DOCS["create_loss"]).rstrip(), "", "Registered losses:", ""]
    classes: dict = _DOCS["classes"]  # type: ignore[assignment]
    for name, cls in _REGISTRY.items():
        text = describe_loss(name)
        parts.append(text)
        parts.append("")
        base = classes.setdefault(cls, cls.__doc__ or "")
        cls.__doc__ = f"{base.rstrip()}\n\n{text}\n"
    create_loss.__doc__ = "\n".join(parts)
    _DOCS["ready"] = True


def _arg_docs(cls: type) -> dict[str, str]:
    """``{name: meaning}`` from the ``Args:`` section of a class docstring."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    in_args = False
    current: list[str] = []
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):
            break
        m = re.match(r"^ {4}([\w, ]+):\s*(.*)$", line)
        if m:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                out[n] = m.group(2).strip()
        elif line.strip() and current:
            for n in current:
                out[n] = (out[n] + " " + line.strip()).strip()
    return out


def _ensure_builtins() -> None:
    # importing the package registers the built-in strategies exactly once, in its order
    import hardneg.strategies  # noqa: F401
