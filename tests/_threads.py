"""Running a fast path over several torch threads in a test: the thread count set for a block
and restored after it (also when the block fails), and Ring's band selection forced to split a
small matrix over 4 threads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hardneg import fastpaths


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """``torch.set_num_threads(count)`` inside the block, the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
