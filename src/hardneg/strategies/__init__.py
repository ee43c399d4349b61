"""Strategies: a contrast set -> weights or a selection of negatives (and positives).

Each strategy is one file that registers itself (:func:`hardneg.registry.register_strategy`);
importing this package registers the built-ins, in this order.
"""

from hardneg.strategies.base import (
    Selection,
    StepContext,
    Strategy,
    normalised_log_weights,
)

from hardneg.strategies.uniform import DebiasedNegatives, UniformNegatives  # isort: skip
from hardneg.strategies.importance import ImportanceNegatives  # isort: skip
from hardneg.strategies.ring import RingNegatives, ring_band  # isort: skip
from hardneg.strategies.unremix import UnReMixNegatives  # isort: skip
from hardneg.strategies.potential import PotentialMining  # isort: skip
from hardneg.strategies.positive_aware import PositiveAwareFilter  # isort: skip
from hardneg.strategies.simans import SimANSNegatives  # isort: skip
from hardneg.strategies.hardness import HardnessWeighting  # isort: skip
from hardneg.strategies.mochi import HardNegativeMixing  # isort: skip
from hardneg.strategies.false_negatives import FalseNegativeCancellation  # isort: skip

__all__ = [
    "DebiasedNegatives",
    "FalseNegativeCancellation",
    "HardNegativeMixing",
    "HardnessWeighting",
    "PositiveAwareFilter",
    "SimANSNegatives",
    "ImportanceNegatives",
    "PotentialMining",
    "RingNegatives",
    "Selection",
    "StepContext",
    "Strategy",
    "UniformNegatives",
    "UnReMixNegatives",
    "normalised_log_weights",
    "ring_band",
]
