"""``assert_same``: two tensors equal in value, dtype and shape.

``torch.equal`` compares values after type promotion (torch 2.14: ``torch.equal(x.double(),
x.float())`` and ``torch.equal(i.int(), i.long())`` are True), so alone it says nothing about
the dtype a path hands back: an int32 index (``gather`` needs int64), a uint8 mask (indexes
positions, not entries) or a float32 result of float64 inputs would pass it.
"""

from __future__ import annotations

import torch


def assert_same(got: torch.Tensor, want: torch.Tensor, what: object = "") -> None:
    """``got`` has ``want``'s dtype, shape and device and exactly its values (NaN nowhere)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, want {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    assert got.device == want.device, f"{what}: device {got.device}, want {want.device}"
    assert torch.equal(got, want), f"{what}: values differ"
