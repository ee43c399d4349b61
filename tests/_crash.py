"""Stop a training run at a chosen step, as a crash or a SIGINT would (the resume tests)."""

from __future__ import annotations

import hardneg.train.trainer as trainer


class CrashAt:
    """Replaces ``step_health`` so that step ``at`` fails (as a crash or a SIGINT would)."""

    def __init__(self, monkeypatch, at: int, action) -> None:
        self.calls, self.at, self.action = 0, at, action
        self.original = trainer.step_health
        monkeypatch.setattr(trainer, "step_health", self)

    def __call__(self, out):
        if self.calls == self.at:
            self.action()
        self.calls += 1
        return self.original(out)


def boom():
    raise RuntimeError("simulated crash")


class NonFiniteAt:
    """Replaces ``step_health`` so that its call ``at`` (counted from 0) reports a non-finite
    loss, as a NaN step would (the ``train.nonfinite=skip`` tests)."""

    def __init__(self, monkeypatch, at: int) -> None:
        self.calls, self.at = 0, at
        self.original = trainer.step_health
        monkeypatch.setattr(trainer, "step_health", self)

    def __call__(self, out):
        value, finite = self.original(out)
        self.calls += 1
        return (float("nan"), False) if self.calls == self.at + 1 else (value, finite)
