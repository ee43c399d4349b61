"""Training: the trainer (:mod:`hardneg.train.trainer`), crash-safe checkpoints
(:mod:`hardneg.train.checkpoint`) and RNG state (:mod:`hardneg.train.rng`).

``train``, ``load_backbone`` and the result / error types are imported on first use, so that
``import hardneg.train.checkpoint`` stays light (no data, model or TensorBoard imports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hardneg.train.trainer import (
        NonFiniteError,
        TrainingInterrupted,
        TrainResult,
        load_backbone,
        train,
    )

__all__ = ["NonFiniteError", "TrainResult", "TrainingInterrupted", "load_backbone", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hardneg.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hardneg.train' has no attribute {name!r}")
