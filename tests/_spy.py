"""Record what a module-level function returns while a test runs."""

from __future__ import annotations

import pytest
import torch


def record_returns(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str
) -> list[torch.Tensor]:
    """Wrap ``module.name`` so that every tensor it returns is cloned into the returned list
    (the function itself may hand out a buffer that a later call overwrites)."""
    kept: list[torch.Tensor] = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        kept.append(out.clone())
        return out

    monkeypatch.setattr(module, name, spy)
    return kept
