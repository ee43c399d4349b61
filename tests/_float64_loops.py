"""Small helpers of the float64 loop oracles in the strategy tests (test_hardness,
test_positive_aware_filter): seeded float64 embeddings, a scalar log-sum-exp and a cosine."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def z(n, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def cos(x, y):
    return float(F.normalize(x, dim=-1) @ F.normalize(y, dim=-1))
