"""Exact sampling laws that the draw tests compare frequencies against."""

from __future__ import annotations

import itertools


def inclusion_probabilities(p: list[float], k: int) -> list[float]:
    """Exact probability that each item is among ``k`` sequential draws without replacement
    with probabilities ``p`` (every ordered draw enumerated: small ``len(p)`` only)."""
    out = [0.0] * len(p)
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        for i in order:
            out[i] += prob
    return out
