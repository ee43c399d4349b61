"""The random-byte draws of ``hardneg.fastpaths`` against their specification.

``tests/test_fastpaths.py`` checks that the chunked and numpy forms of the draws give the draws
of the whole-array form; here each piece is checked against a restatement of what it must
draw, written without the module's helpers:

* :class:`fastpaths._ByteStream`: on the CPU the bytes of numpy ``PCG64`` words seeded by two
  int64 words of the generator; in the accelerator form (forced on the CPU) the bytes of the
  generator's own int64 words; pieces of any size continue one stream;
* the tie rule: a byte equal to its threshold keeps with probability ``256 p - floor(256 p)``
  by one float32 uniform per tie, in the order of the bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hardneg import fastpaths

SIZES = [5, 1, 8, 13, 0, 3, 4000, 7, 250, 16, 2, 6]


def pcg_bytes(seed: int, total: int) -> tuple[np.ndarray, torch.Generator]:
    """The CPU stream's bytes by its definition: ``PCG64(SeedSequence(two int64 words of the
    generator, taken mod 2^64))``'s 64-bit words, little-endian bytes in order. Returns the
    bytes and the generator advanced by the two seed words."""
    g = torch.Generator().manual_seed(seed)
    words = torch.empty(2, dtype=torch.int64).random_(-(2**63), None, generator=g).tolist()
    bits = np.random.PCG64(np.random.SeedSequence([w % 2**64 for w in words]))
    raw = bits.random_raw(-(-total // 8)).astype("<u8")
    return raw.view(np.uint8)[:total], g


def word_bytes(seed: int, total: int) -> tuple[torch.Tensor, torch.Generator]:
    """The accelerator form's bytes by its definition: the generator's int64 words over the
    full 64-bit range (``random_(-2^63, None)``), their bytes in order. Returns the bytes and
    the generator advanced by the words."""
    g = torch.Generator().manual_seed(seed)
    words = torch.empty(-(-total // 8), dtype=torch.int64).random_(-(2**63), None, generator=g)
    return words.view(torch.uint8)[:total], g


@pytest.mark.parametrize("first", [0, 16, 1 << 14], ids=["empty", "small", "large"])
def test_the_cpu_stream_cuts_pcg64_words_seeded_by_two_generator_words(first):
    """Pieces taken by ``take`` and ``take_np`` (each size, aligned to the 8-byte words or not,
    a first buffer smaller or larger than the pieces) are the consecutive bytes of the PCG64
    words; the generator moves on by the two seed words only."""
    want, after = pcg_bytes(3, sum(SIZES))
    g = torch.Generator().manual_seed(3)
    stream = fastpaths._ByteStream(g, "cpu", first)
    pieces = []
    for i, size in enumerate(SIZES):
        piece = stream.take(size) if i % 2 else torch.from_numpy(stream.take_np(size))
        assert piece.dtype == torch.uint8 and piece.shape == (size,)
        pieces.append(piece.clone())
    assert np.array_equal(torch.cat(pieces).numpy(), want)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=after))
    got = fastpaths.random_bytes((3, 7), torch.Generator().manual_seed(3), "cpu")
    assert np.array_equal(got.reshape(-1).numpy(), want[:21])


@pytest.mark.parametrize("first", [0, 16, 1 << 14], ids=["empty", "small", "large"])
def test_the_accelerator_stream_cuts_the_generators_own_words(monkeypatch, first):
    """The form a CUDA stream takes (forced on the CPU through ``_numpy_words``): pieces of any
    size are the consecutive bytes of the generator's int64 words, drawn as they are needed
    (the generator ends where one draw of all the words leaves it)."""
    monkeypatch.setattr(fastpaths, "_numpy_words", lambda device: False)
    want, after = word_bytes(5, sum(SIZES))
    g = torch.Generator().manual_seed(5)
    stream = fastpaths._ByteStream(g, "cpu", first)
    assert stream.bits is None and isinstance(stream.words, torch.Tensor)
    pieces = []
    for size in SIZES:
        piece = stream.take(size)
        assert piece.dtype == torch.uint8 and piece.shape == (size,)
        pieces.append(piece.clone())
    assert torch.equal(torch.cat(pieces), want)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=after))
    got = fastpaths.random_bytes((3, 7), torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(got.reshape(-1), want[:21])


def both_forms(monkeypatch, draw):
    """``draw()`` in the numpy form (the CPU's) and in the torch form (``_CPU_NUMPY`` off, the
    form an accelerator takes), for the same seeds."""
    fast = draw()
    monkeypatch.setattr(fastpaths, "_CPU_NUMPY", False)
    plain = draw()
    monkeypatch.setattr(fastpaths, "_CPU_NUMPY", True)
    return fast, plain


@pytest.mark.parametrize("top", [255, 256])
def test_binomial_counts_of_certain_cells_are_the_trials_in_the_narrowest_type(monkeypatch, top):
    """``p = 1`` keeps every trial (the byte 255 ties, and a tie keeps with probability
    ``256 - 255 = 1``): the counts are the trials, ``uint8`` up to 255 trials, ``int32`` past;
    the same in both forms and for ``layer_draws``."""
    a = 5
    trials = torch.tensor([top, 0, 3, 1, top - 7])
    need = torch.full((len(trials), a), 255, dtype=torch.uint8)

    def draw():
        by_column = fastpaths.binomial_draws(
            need,
            trials,
            lambda column, anchor: torch.full(column.shape, 256.0, dtype=torch.float64),
            torch.Generator().manual_seed(2),
        )
        order = torch.argsort(trials, descending=True, stable=True)  # layer_draws' column order
        by_layer = fastpaths.layer_draws(
            need.T.contiguous(),
            trials[order],
            lambda r, c: torch.full(r.shape, 256.0, dtype=torch.float64),
            torch.Generator().manual_seed(2),
        )
        return by_column, by_layer[:, torch.argsort(order)].T

    want_type = torch.uint8 if top <= 255 else torch.int32
    for got in [*both_forms(monkeypatch, draw)]:
        for counts in got:
            assert counts.dtype == want_type
            assert torch.equal(counts.long(), trials.unsqueeze(1).expand(-1, a))


def test_no_columns_draw_an_empty_count(monkeypatch):
    """``C = 0``: ``[0, A]`` ``uint8`` counts in both forms (``binomial_draws``), ``[A, 0]`` for
    ``layer_draws``."""
    need = torch.zeros(0, 4, dtype=torch.uint8)
    trials = torch.zeros(0, dtype=torch.long)

    def draw():
        return (
            fastpaths.binomial_draws(need, trials, None, torch.Generator().manual_seed(1)),
            fastpaths.layer_draws(need.T, trials, None, torch.Generator().manual_seed(1)),
        )

    for by_column, by_layer in both_forms(monkeypatch, draw):
        assert by_column.shape == (0, 4) and by_column.dtype == torch.uint8
        assert by_layer.shape == (4, 0) and by_layer.dtype == torch.uint8


@pytest.mark.parametrize(
    ("a", "trials"),
    [(4, []), (4, [0, 0, 0]), (0, [2, 1])],
    ids=["no-columns", "no-trials", "no-anchors"],
)
def test_numpy_layer_draws_with_nothing_to_draw_are_zeros_without_a_byte(a, trials):
    """``_layer_draws_np`` called directly (``layer_draws`` returns before it in these cases):
    no column, columns of no trial, or no anchor give ``[A, C]`` ``uint8`` zeros and read
    nothing (no stream, no generator, no ``p256_at`` is given)."""
    trials = np.array(trials, dtype=np.int64)
    need = np.zeros((a, len(trials)), dtype=np.uint8)
    counts = fastpaths._layer_draws_np(need, trials, None, None, None, None)
    assert counts.shape == (a, len(trials)) and counts.dtype == np.uint8
    assert not counts.any()


@pytest.mark.parametrize("top", [3, 300], ids=["uint8", "int32"])
def test_no_anchors_draw_an_empty_count_in_both_forms(monkeypatch, top):
    """``A = 0`` under ``C = 3`` columns with trials: ``[3, 0]`` counts (``binomial_draws``;
    ``binomial_bytes`` of a ``[0, 3]`` ``p`` gives ``[0, 3]``), ``[0, 3]`` for ``layer_draws``,
    in the type of the most trials, the same in both forms, and the generator left where the
    torch form leaves it (its next uniforms equal)."""
    trials = torch.tensor([top, 0, 2])
    layered = torch.tensor([top, 2, 1])  # layer_draws: non-increasing, >= 1

    def draw():
        out = []
        for call in (
            lambda g: fastpaths.binomial_draws(
                torch.zeros(3, 0, dtype=torch.uint8), trials, None, g
            ),
            lambda g: fastpaths.binomial_bytes(torch.rand(0, 3), trials, g),
            lambda g: fastpaths.layer_draws(torch.zeros(0, 3, dtype=torch.uint8), layered, None, g),
        ):
            g = torch.Generator().manual_seed(4)
            out.append((call(g), torch.rand(3, generator=g)))
        return out

    fast, plain = both_forms(monkeypatch, draw)
    want_type = torch.uint8 if top <= 255 else torch.int32
    shapes = [(3, 0), (0, 3), (0, 3)]
    types = [want_type, torch.float32, want_type]  # binomial_bytes: p's dtype
    for (got, after), (twin, twin_after), shape, dtype in zip(fast, plain, shapes, types):
        assert got.shape == twin.shape == shape
        assert got.dtype == twin.dtype == dtype
        assert torch.equal(after, twin_after)


@pytest.mark.parametrize(
    ("c", "a", "most", "chunk"),
    [(50, 1, 3, None), (6, 2, 40, None), (7, 3, 0, None), (9, 37, 1, 64)],
    ids=["one-anchor", "few-anchors", "no-trials", "one-row-chunks"],
)
def test_numpy_binomial_draws_of_narrow_thresholds_equal_the_torch_form(
    monkeypatch, c, a, most, chunk
):
    """Shapes the loss steps never make: one or two anchors under many columns (a chunk of
    more rows than bytes per row), columns that all have 0 trials, chunks of one row of bytes
    (64-byte chunks, 37 anchors, at most 1 trial); ties at every threshold (``p`` a multiple
    of 1/256 plus a half): the numpy form's counts are the torch form's for the same seed, and
    within ``[0, trials]``."""
    if chunk is not None:
        monkeypatch.setattr(fastpaths, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(c * a + most)
    p = (torch.randint(0, 256, (c, a), generator=g).double() + 0.5) / 256
    need = (p * 256).floor().to(torch.uint8)
    trials = torch.randint(0, most + 1, (c,), generator=g)

    def draw():
        return fastpaths.binomial_draws(
            need,
            trials,
            lambda column, anchor: p[column, anchor] * 256,
            torch.Generator().manual_seed(9),
        )

    fast, plain = both_forms(monkeypatch, draw)
    assert fast.shape == (c, a) and fast.dtype == plain.dtype == torch.uint8
    assert torch.equal(fast, plain)
    assert bool((fast.long() <= trials.unsqueeze(1)).all())
    if most:
        assert int(fast.sum()) > 0


def layers_by_definition(need, trials, p256, skip, seed):
    """``layer_draws`` re-stated entry by entry: layer ``r`` is one byte per anchor and column
    with more than ``r`` trials, row-major, from the CPU stream's bytes; a byte below its
    threshold keeps, a tie (not skipped in layer 0) waits for its uniform; then one float32
    uniform per tie, in the order met, keeps where ``u < 256 p - need``."""
    a, c = need.shape
    top = int(trials.max())
    widths = [int((trials > r).sum()) for r in range(top)]
    byte, g = pcg_bytes(seed, a * sum(widths))
    counts = torch.zeros(a, c, dtype=torch.int64)
    ties, at = [], 0
    for r, w in enumerate(widths):
        for i in range(a):
            for j in range(w):
                v, n = int(byte[at]), int(need[i, j])
                at += 1
                if r == 0 and skip is not None and bool(skip[i, j]):
                    continue
                counts[i, j] += int(v < n)
                if v == n:
                    ties.append((i, j))
    u = torch.rand(len(ties), generator=g).double()
    for (i, j), uu in zip(ties, u.tolist()):
        counts[i, j] += int(uu < float(p256[i, j]) - int(need[i, j]))
    return counts


@pytest.mark.parametrize("chunk", [4, 16, 1 << 20], ids=["wide-rows", "row-blocks", "one-block"])
def test_layer_draws_of_many_ties_follow_their_definition(monkeypatch, chunk):
    """Layer 0's thresholds are its own bytes (read from the stream's definition) but for a
    few entries one above or below: nearly every entry of layer 0 ties, so the first-layer
    skips, the tie order and the tie rule show in the counts. Both forms, with blocks of rows
    (``_CHUNK`` 16: two rows of 7; 4: one row wider than a chunk) or one block, give the
    counts of the entry-by-entry definition."""
    monkeypatch.setattr(fastpaths, "_CHUNK", chunk)
    a, trials = 9, torch.tensor([4, 3, 3, 2, 1, 1, 1])
    c = len(trials)
    byte, _ = pcg_bytes(6, a * c)
    need = torch.from_numpy(byte.copy()).view(a, c).long()
    g = torch.Generator().manual_seed(12)
    moved = torch.rand(a, c, generator=g) < 0.2  # these entries one above or below their byte
    need = (need + torch.randint(-1, 2, (a, c), generator=g) * moved).clamp(0, 255).to(torch.uint8)
    p256 = need.double() + torch.rand(a, c, generator=g, dtype=torch.float64)
    skip = torch.rand(a, c, generator=g) < 0.4
    want = layers_by_definition(need, trials, p256, skip, 6)

    def draw():
        return fastpaths.layer_draws(
            need,
            trials,
            lambda r, c: p256[r, c],
            torch.Generator().manual_seed(6),
            skip_first=skip,
        )

    for got in both_forms(monkeypatch, draw):
        assert got.dtype == torch.uint8 and torch.equal(got.long(), want)
    assert int(want.sum()) > 0


def test_a_tie_keeps_exactly_when_its_uniform_is_below_the_fraction_of_256p(monkeypatch):
    """Every byte ties (its threshold is the byte drawn, read from the stream's definition),
    and ``256 p`` is the byte plus the tie's own float32 uniform (the generator's next uniforms
    after the stream's seed words), plus ``2^-40`` on every other entry: a tie keeps only where
    ``u < 256 p - floor(256 p)``, i.e. on those entries (``u <= ...`` would keep them all). The
    same rule in ``bernoulli_draws``, ``binomial_draws`` (one trial per column, one anchor) and
    ``layer_draws``, in both forms."""
    n = 12
    byte, after = pcg_bytes(7, n)
    u = torch.rand(n, generator=after).double()
    need = torch.from_numpy(byte.copy())
    p256 = need.double() + u + torch.tensor([0.0, 2.0**-40]).repeat(n // 2)
    want = torch.tensor([0, 1]).repeat(n // 2)
    ones = torch.ones(n, dtype=torch.long)

    def draw():
        return (
            fastpaths.bernoulli_draws(need, lambda at: p256[at], torch.Generator().manual_seed(7)),
            fastpaths.binomial_draws(
                need.view(n, 1), ones, lambda c, a: p256[c], torch.Generator().manual_seed(7)
            )[:, 0],
            fastpaths.layer_draws(
                need.view(1, n), ones, lambda r, c: p256[c], torch.Generator().manual_seed(7)
            )[0],
        )

    for got in both_forms(monkeypatch, draw):
        for kept in got:
            assert torch.equal(kept.long(), want)


@pytest.mark.parametrize(
    "values, sizes, rows",
    [
        ([0, 1, 3, 4], [2, 5, 4, 3], 7),  # groups split over chunks, the rest of one smaller
        ([2, 9], [6, 2], 5),  # a column of more rows than a chunk holds: a chunk of its own
        ([1, 2], [10, 10], 64),  # everything in one chunk
        ([0], [4], 3),  # only columns of no trial: no row
        ([5], [7], 10),  # one group over several chunks of two columns
    ],
)
def test_binomial_chunks_pack_the_sorted_columns_greedily(values, sizes, rows):
    """``_chunks`` (the chunks of ``binomial_draws``) against its rule, re-stated column by
    column: the columns in order, each once with its trials ``m`` and ``m`` rows; each chunk's
    runs consecutive from its first row, the chunks' rows consecutive; a chunk holds at most
    ``rows`` rows unless it is one column; a chunk ends only when its next column would not fit
    (greedy: no chunk smaller than it needs to be)."""
    trials = [m for m, size in zip(values, sizes) for _ in range(size)]  # each column's m
    chunks = list(fastpaths._chunks(values, sizes, rows))
    seen, next_row = [], 0
    for number, ((first_row, end_row), runs) in enumerate(chunks):
        assert first_row == next_row and runs
        at = 0
        for m, c0, c1, r0 in runs:
            assert c0 == len(seen) and c1 > c0 and r0 == at
            seen.extend([m] * (c1 - c0))
            at += (c1 - c0) * m
        assert end_row - first_row == at
        assert at <= rows or sum(c1 - c0 for _, c0, c1, _ in runs) == 1
        if number + 1 < len(chunks):  # the next column did not fit
            assert at + trials[len(seen)] > rows
        next_row = end_row
    assert seen == trials
