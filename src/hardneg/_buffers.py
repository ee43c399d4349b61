"""Reusable CPU buffers for tensors saved for the backward (see :class:`FreeBuffers`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class FreeBuffers:
    """Reusable CPU buffers for the ``[A, C]`` matrices of a call that outlive its forward
    (saved for the backward). On the CPU a fresh matrix of a few MB is paged in afresh on every
    call (the allocator hands freed large blocks back to the system), which at small ``A`` costs
    as much as the pass that fills it. A buffer is handed out again only
    when nothing but this pool refers to it (its tensor and storage reference counts are back
    to the pool's own): no result, view or tensor saved for a backward that may still run (two
    calls before one backward, ``retain_graph``) ever shares it. Copies and pickles start
    empty; a buffer over ``max_bytes`` is never kept."""

    max_bytes = 64 * 2**20

    def __init__(self) -> None:
        self._buffers: dict[str, tuple[Tensor, int]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        too_big = math.prod(shape) * dtype.itemsize > self.max_bytes
        if torch.device(device).type != "cpu" or too_big:
            self._buffers.pop(name, None)
            return torch.empty(shape, dtype=dtype, device=device)
        held = self._buffers.get(name)
        if held is not None:
            buf, storage_refs = held
            if buf.shape == shape and buf.dtype == dtype and self._free(buf, storage_refs):
                return buf
        buf = torch.empty(shape, dtype=dtype)
        self._buffers[name] = (buf, self._storage_refs(buf))
        return buf

    @staticmethod
    def _storage_refs(buf: Tensor) -> int:
        # private torch API; without it (-1) no buffer is ever reused: fresh tensors, as before
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        return -1 if use_count is None else use_count(buf.untyped_storage()._cdata)

    @classmethod
    def _free(cls, buf: Tensor, storage_refs: int) -> bool:
        # the tensor itself (saved as is) and its storage (views, detached aliases)
        if storage_refs < 0 or not hasattr(buf, "_use_count"):
            return False
        return buf._use_count() == 1 and cls._storage_refs(buf) == storage_refs

    def __deepcopy__(self, memo: dict) -> FreeBuffers:
        return FreeBuffers()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._buffers = {}
