"""Negative strategies: per-anchor scores -> weights or a selection of negatives."""

from hardneg.strategies.base import (
    NegativeSelection,
    NegativeStrategy,
    StrategyInputs,
    normalised_log_weights,
)
from hardneg.strategies.importance import ImportanceNegatives
from hardneg.strategies.ring import RingNegatives, ring_band
from hardneg.strategies.uniform import UniformNegatives
from hardneg.strategies.unremix import UnReMixNegatives

__all__ = [
    "ImportanceNegatives",
    "NegativeSelection",
    "NegativeStrategy",
    "RingNegatives",
    "StrategyInputs",
    "UniformNegatives",
    "UnReMixNegatives",
    "normalised_log_weights",
    "ring_band",
]
