"""Reusable CPU buffers: for the temporaries of one call (:class:`ScratchBuffers`) and for
tensors saved for the backward (:class:`FreeBuffers`).

On the CPU a fresh matrix of a few MB is paged in afresh on every call (the allocator hands freed
large blocks back to the system), which at small batches costs as much as the pass that fills it.
Other devices have a caching allocator and always get fresh tensors; so does any buffer over
``max_bytes`` (for huge batches the page faults are small next to the work, and no memory is
kept). Copies and pickles start empty.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ScratchBuffers:
    """One kept CPU buffer per name, handed out again on every call with the same shape and
    dtype: only for temporaries that die inside the call (never for a tensor saved for the
    backward: the module may be called twice before one backward)."""

    max_bytes = 64 * 2**20  # per buffer (a [2N, 2N] float32 up to N = 2048)

    def __init__(self) -> None:
        self._buffers: dict[str, tuple[Tensor, int]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        too_big = math.prod(shape) * dtype.itemsize > self.max_bytes
        if torch.device(device).type != "cpu" or too_big:
            self._buffers.pop(name, None)
            return torch.empty(shape, dtype=dtype, device=device)
        held = self._buffers.get(name)
        if held is not None:
            buf, refs = held
            if buf.shape == shape and buf.dtype == dtype and self._reusable(buf, refs):
                return buf
        buf = torch.empty(shape, dtype=dtype)
        self._buffers[name] = (buf, self._storage_refs(buf))
        return buf

    def _reusable(self, buf: Tensor, storage_refs: int) -> bool:
        return True

    @staticmethod
    def _storage_refs(buf: Tensor) -> int:
        # private torch API; without it (-1) FreeBuffers never reuses: fresh tensors, as before
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        return -1 if use_count is None else use_count(buf.untyped_storage()._cdata)

    def __deepcopy__(self, memo: dict) -> ScratchBuffers:
        return type(self)()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]


class FreeBuffers(ScratchBuffers):
    """Kept CPU buffers for the ``[A, C]`` matrices of a call that outlive its forward (saved
    for the backward). A buffer is handed out again only when nothing but this pool refers to
    it (its tensor and storage reference counts are back to the pool's own): no result, view or
    tensor saved for a backward that may still run (two calls before one backward,
    ``retain_graph``) ever shares it."""

    def _reusable(self, buf: Tensor, storage_refs: int) -> bool:
        # the tensor itself (saved as is) and its storage (views, detached aliases)
        if storage_refs < 0 or not hasattr(buf, "_use_count"):
            return False
        return buf._use_count() == 1 and self._storage_refs(buf) == storage_refs
