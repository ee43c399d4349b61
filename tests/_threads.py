"""Running a fast path over several torch threads in a test: the thread count set for a block
and restored after it (also when the block fails), and Ring's band selection forced to split a
small matrix over 4 threads."""

from __future__ import annotations

import torch

from hardneg import fastpaths
from hardneg.augment.image import intra_op_threads


def torch_threads(count: int):
    """``torch.set_num_threads(count)`` inside the block, the previous count after it (the
    library's own :func:`hardneg.augment.image.intra_op_threads` on the CPU)."""
    return intra_op_threads(count, torch.device("cpu"))


def band_over_four_threads(
    monkeypatch, x: torch.Tensor, lower: int, upper: int, thread_min_entries: int
) -> torch.Tensor:
    """``band_indices(x, lower, upper)`` (sorted per row) over 4 threads, on rows taken in
    numpy blocks of 2048 entries (4 rows of 512) with no floor on the rows for the numpy form;
    ``thread_min_entries``: the entries a thread takes at least (``_THREAD_MIN_ENTRIES``), which
    sets the number of chunks."""
    monkeypatch.setattr(fastpaths, "_NUMPY_BLOCK", 2048)
    monkeypatch.setattr(fastpaths, "_BAND_MIN_ROWS", 1)
    monkeypatch.setattr(fastpaths, "_THREAD_MIN_ENTRIES", thread_min_entries)
    with torch_threads(4):
        return fastpaths.band_indices(x, lower, upper).sort(dim=1).values
