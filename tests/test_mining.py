"""Offline hard-negative mining: chunked top-k, windows, margins, samplers, formats, errors."""

from __future__ import annotations

import json
import re
import zlib

import pytest
import torch
from _same import assert_same

from hardneg.mining import (
    chunked_top_k,
    gumbel_top_k,
    load_rows,
    mine_hard_negatives,
    save_rows,
)
from hardneg.strategies.ring import ring_band


class FakeModel:
    """A deterministic random unit vector per text (no transformer needed)."""

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.calls = 0

    def vector(self, text: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return torch.randn(self.dim, generator=gen)

    def encode(self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False):
        self.calls += 1
        return torch.stack([self.vector(t) for t in texts])


def data(n_queries=12, n_corpus=60):
    queries = [f"query {i}" for i in range(n_queries)]
    positives = [f"doc {i}" for i in range(n_queries)]
    corpus = positives + [f"doc {i}" for i in range(n_queries, n_corpus)]
    return queries, positives, corpus


def scores_of(model, queries, corpus):
    q = torch.nn.functional.normalize(torch.stack([model.vector(t) for t in queries]), dim=1)
    c = torch.nn.functional.normalize(torch.stack([model.vector(t) for t in corpus]), dim=1)
    return q @ c.T


@pytest.mark.parametrize("qc, cc", [(1, 7), (5, 13), (100, 1000)])
def test_chunked_top_k_equals_the_full_matrix(qc, cc):
    gen = torch.Generator().manual_seed(0)
    q, c = torch.randn(11, 8, generator=gen), torch.randn(50, 8, generator=gen)
    exclude = [{i, i + 1} for i in range(11)]
    full = q @ c.T
    for i, e in enumerate(exclude):
        full[i, list(e)] = float("-inf")
    want_s, want_i = full.topk(9, dim=1)
    got_s, got_i = chunked_top_k(
        q, c, 9, exclude=exclude, query_chunk_size=qc, corpus_chunk_size=cc
    )
    torch.testing.assert_close(got_s, want_s)
    assert_same(got_i, want_i)


def test_top_window_matches_brute_force():
    model = FakeModel()
    queries, positives, corpus = data()
    rows = mine_hard_negatives(
        queries,
        positives,
        corpus,
        model=model,
        num_negatives=3,
        range_min=2,
        range_max=10,
        output_format="n-tuple",
        query_chunk_size=5,
        corpus_chunk_size=7,
    )
    s = scores_of(model, queries, corpus)
    for i, row in enumerate(rows):
        s[i, i] = float("-inf")  # the positive
        order = s[i].argsort(descending=True).tolist()
        want = [corpus[j] for j in order[2:5]]
        assert [row[f"negative_{m}"] for m in (1, 2, 3)] == want
        assert row["anchor"] == queries[i] and row["positive"] == positives[i]


@pytest.mark.parametrize("sampling", ["top", "random", "simans", "hcl", "ring", "potential"])
def test_margins_hold_and_positives_never_come_back(sampling):
    model = FakeModel()
    queries, positives, corpus = data()
    corpus = corpus + positives[:3]  # the positive twice in the corpus
    rows = mine_hard_negatives(
        queries,
        positives,
        corpus,
        model=model,
        num_negatives=2,
        sampling=sampling,
        absolute_margin=0.1,
        relative_margin=0.05,
        range_max=40,
    )
    s = scores_of(model, queries, corpus)
    pos = {q: s[i, i].item() for i, q in enumerate(queries)}
    assert rows
    for row in rows:
        i = queries.index(row["anchor"])
        assert row["negative"] != row["positive"]
        neg = s[i, corpus.index(row["negative"])].item()
        assert neg <= pos[row["anchor"]] - 0.1 + 1e-6
        assert neg <= pos[row["anchor"]] - abs(pos[row["anchor"]]) * 0.05 + 1e-6


def test_gumbel_top_k_draws_without_replacement_with_the_given_probabilities():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    log_p = p.log().expand(20000, -1)
    picks = gumbel_top_k(log_p, 2, gen)
    assert (picks[:, 0] != picks[:, 1]).all() and (picks != 3).all()
    first = torch.bincount(picks[:, 0], minlength=4).double() / 20000
    torch.testing.assert_close(first, p.double(), atol=0.015, rtol=0)
    # second pick given first = 0: 0.3 / 0.5
    second = picks[picks[:, 0] == 0, 1]
    assert abs((second == 1).double().mean().item() - 0.6) < 0.03


def test_ring_draws_inside_the_band_and_hcl_with_large_beta_is_top():
    model = FakeModel()
    queries, positives, corpus = data()
    rows = mine_hard_negatives(
        queries,
        positives,
        corpus,
        model=model,
        num_negatives=3,
        sampling="ring",
        range_max=30,
        ring_rho_out=0.5,
        ring_rho_in=0.2,
        output_format="n-tuple",
    )
    lower, upper = ring_band(30, 0.5, 0.2)
    s = scores_of(model, queries, corpus)
    for i, row in enumerate(rows):
        s[i, i] = float("-inf")
        order = s[i].argsort(descending=True).tolist()
        for m in (1, 2, 3):
            rank = order.index(corpus.index(row[f"negative_{m}"]))
            assert lower <= rank < upper
    top = mine_hard_negatives(queries, positives, corpus, model=model, num_negatives=2)
    hcl = mine_hard_negatives(
        queries,
        positives,
        corpus,
        model=model,
        num_negatives=2,
        sampling="hcl",
        hcl_beta=1000.0,
        temperature=0.001,
    )
    assert top == hcl
    random = mine_hard_negatives(
        queries, positives, corpus, model=model, num_negatives=2, sampling="random"
    )
    assert random != top


def test_dataset_input_formats_and_files(tmp_path):
    from datasets import Dataset

    model = FakeModel()
    queries, positives, corpus = data()
    ds = Dataset.from_dict({"query": queries, "answer": positives})
    with pytest.raises(
        ValueError, match=r"expected the layout \(anchor, positive\).*\['query', 'answer'\]"
    ):
        mine_hard_negatives(ds, corpus=corpus, model=model)
    out = mine_hard_negatives(
        ds,
        corpus=corpus,
        model=model,
        anchor_column="query",
        positive_column="answer",
        num_negatives=2,
        output_format="n-tuple",
        as_dataset=True,
    )
    # the dataset's names, as sentence-transformers keeps them
    assert out.column_names == ["query", "answer", "negative_1", "negative_2"]
    assert len(out) == len(queries)
    trip = mine_hard_negatives(queries, positives, corpus, model=model, num_negatives=2)
    assert len(trip) == 2 * len(queries) and set(trip[0]) == {"anchor", "positive", "negative"}
    for suffix in (".jsonl", ".parquet"):
        path = save_rows(out, tmp_path / f"mined{suffix}")
        assert load_rows(path) == out.to_list()


def test_embedding_cache_is_reused(tmp_path):
    model = FakeModel()
    queries, positives, corpus = data()
    first = mine_hard_negatives(
        queries, positives, corpus, model=model, cache_dir=tmp_path, model_key="fake"
    )
    calls = model.calls
    again = mine_hard_negatives(
        queries, positives, corpus, model=model, cache_dir=tmp_path, model_key="fake"
    )
    assert again == first and model.calls == calls and list(tmp_path.glob("emb_*.npy"))


def test_bad_inputs_say_what_is_wrong():
    model = FakeModel()
    queries, positives, corpus = data()
    with pytest.raises(ValueError, match="corpus is empty"):
        mine_hard_negatives(queries, positives, [], model=model)
    with pytest.raises(ValueError, match="larger than the corpus"):
        mine_hard_negatives(queries, positives, corpus[:20], model=model, range_max=20)
    with pytest.raises(ValueError, match="same length"):
        mine_hard_negatives(queries, positives[:-1], corpus, model=model)
    with pytest.raises(ValueError, match="sampling"):
        mine_hard_negatives(queries, positives, corpus, model=model, sampling="hard")
    with pytest.raises(ValueError, match="fewer candidates than num_negatives"):
        mine_hard_negatives(queries, positives, corpus, model=model, num_negatives=5, range_max=3)


@pytest.mark.parametrize(
    "scores, message",
    [
        ({"min_score": 0.9, "max_score": 0.1}, r"min_score \(0.9\) is above max_score \(0.1\)"),
        ({"min_score": float("nan")}, "min_score must be finite, got nan"),
        ({"max_score": float("nan")}, "max_score must be finite, got nan"),
        ({"max_score": "0.5"}, "max_score must be a number"),
    ],
)
def test_score_bounds_that_keep_nothing_are_refused_before_embedding(scores, message):
    """min_score above max_score (or a NaN bound, which no score passes) kept no candidate:
    0 rows and exit 0 after the whole corpus was embedded, with a warning to loosen the
    filters; it is a setting error, named before the model runs."""
    model = FakeModel()
    queries, positives, corpus = data()
    with pytest.raises(ValueError, match=message):
        mine_hard_negatives(queries, positives, corpus, model=model, **scores)
    assert model.calls == 0
    # equal bounds are a legitimate (if narrow) window: no error
    mine_hard_negatives(queries, positives, corpus, model=model, min_score=0.1, max_score=0.1)


def test_short_queries_drop_from_n_tuples_but_keep_triplets():
    model = FakeModel()
    queries, positives, corpus = data()
    rows, stats = mine_hard_negatives(
        queries,
        positives,
        corpus,
        model=model,
        num_negatives=3,
        max_score=0.0,
        output_format="n-tuple",
        return_stats=True,
    )
    assert stats.short_queries > 0 and len(rows) == len(queries) - stats.short_queries


def cli_files(tmp_path, monkeypatch, names=("anchor", "positive")):
    """``data()`` as a pairs file with columns ``names`` and a corpus file, and the CLI's model
    loader returning :class:`FakeModel`: ``(pairs path, corpus path)``."""
    from hardneg.text import models

    queries, positives, corpus = data()
    pairs = tmp_path / "pairs.jsonl"
    rows = (dict(zip(names, pair)) for pair in zip(queries, positives))
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "corpus.txt").write_text("\n".join(corpus) + "\n")
    monkeypatch.setattr(models, "load_sentence_model", lambda name, device=None: FakeModel())
    return pairs, tmp_path / "corpus.txt"


def test_cli_mine_writes_the_file(tmp_path, monkeypatch):
    from hardneg import cli

    queries = data()[0]
    pairs, _ = cli_files(tmp_path, monkeypatch, names=("q", "p"))
    out = tmp_path / "mined.parquet"
    argv = [
        "mine",
        "--data",
        str(pairs),
        "--corpus",
        str(tmp_path / "corpus.txt"),
        "--output",
        str(out),
        "--num-negatives",
        "2",
        "--format",
        "n-tuple",
        "--sampling",
        "simans",
    ]
    assert cli.main([*argv[:3], "--anchor-column", "q", "--positive-column", "p", *argv[3:]]) == 0
    rows = load_rows(out)
    assert len(rows) == len(queries) and set(rows[0]) == {
        "anchor",
        "positive",
        "negative_1",
        "negative_2",
    }
    assert cli.main(argv) == 2  # wrong columns: one readable error


def test_cli_include_positives_writes_the_library_s_ranking(tmp_path, monkeypatch):
    from hardneg import cli

    queries, positives, corpus = data()
    pairs, _ = cli_files(tmp_path, monkeypatch)
    out = tmp_path / "ranked.jsonl"
    argv = ["mine", "--data", str(pairs), "--corpus", str(tmp_path / "corpus.txt")]
    argv += ["--num-negatives", "3", "--include-positives", "--output", str(out)]
    assert cli.main(argv) == 0
    want = mine_hard_negatives(
        queries, positives, corpus, model=FakeModel(), num_negatives=3, include_positives=True
    )
    got = load_rows(out)
    assert got == want and len(got) > 0
    assert set(got[0]) == {"anchor", "positive", "negative_1", "negative_2", "negative_3"}
    assert cli.main([*argv[:-2], "--format", "triplet", "--output", str(out)]) == 2


def test_cli_flag_names_read_as_the_command_line():
    """The library's ``include_positives=True`` / ``output_format='triplet'`` read as the flags
    one types (``--include-positives``, ``--format triplet``), not ``--include-positives=True``."""
    from hardneg.commands.mine import _flag_names

    message = (
        "include_positives=True gives each pair's ranked candidates as one n-tuple row; "
        "output_format='triplet' cannot hold them: use output_format='n-tuple'"
    )
    assert _flag_names(message, ["include_positives", "output_format"]) == (
        "--include-positives gives each pair's ranked candidates as one n-tuple row; "
        "--format triplet cannot hold them: use --format n-tuple"
    )


def test_shard_bounds_cover_the_corpus_once():
    from hardneg.mining import shard_bounds

    for n in (0, 1, 5, 10, 101):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_two_gloo_processes_mine_the_same_negatives_as_one(tmp_path):
    """Each rank embeds and ranks half of the corpus; the merged top-k lists give the rows of
    one process, for every sampling (uneven shards, positives inside and outside the corpus, a
    duplicate of a positive in the corpus)."""
    import socket

    import torch.multiprocessing as mp
    from _mining_gather import SETTINGS, mine_all, run_rank

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = json.loads(json.dumps(mine_all()))
    asked = []
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        asked.append(got.pop("pairs_asked"))
        assert set(got) == set(SETTINGS)
        for name in SETTINGS:
            assert got[name] == single[name], (rank, name)
            assert len(single[name]) >= 12  # the comparison is not vacuous
    # the reranking was shared out: each rank scored about half of one process's pairs
    assert sum(asked) == single["pairs_asked"] and max(asked) < 0.6 * single["pairs_asked"]


def sorted_candidates(rows: int, width: int, seed: int = 0):
    """Queries, descending scores [rows, width], positive scores [rows, 1], survivors."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, width, generator=gen).sort(dim=1, descending=True).values
    positive = scores[:, :1] + 0.2
    keep = torch.rand(rows, width, generator=gen) < 0.8
    queries = torch.nn.functional.normalize(torch.randn(rows, 4, generator=gen), dim=1)
    return queries, scores, positive, keep


def test_hcl_pick_is_gumbel_top_k_of_beta_s_over_t():
    from hardneg.mining import pick_negatives

    q, s, pos, keep = sorted_candidates(50, 12)
    beta, t = 0.7, 0.05
    chosen, used = pick_negatives(
        "hcl", q, s, pos, keep, 3, torch.Generator().manual_seed(5), hcl_beta=beta, temperature=t
    )
    want = gumbel_top_k(
        (beta * s.double() / t).masked_fill(~keep, float("-inf")),
        3,
        torch.Generator().manual_seed(5),
    )
    assert_same(chosen, want)
    assert_same(used, keep)


def test_simans_and_potential_picks_follow_their_kernels_in_law():
    from hardneg.mining import pick_negatives

    n = 40000
    s = torch.tensor([[0.9, 0.7, 0.5, 0.2]]).expand(n, -1)
    pos = torch.full((n, 1), 0.8)
    keep = torch.ones(n, 4, dtype=torch.bool)
    q = torch.nn.functional.normalize(torch.ones(n, 4), dim=1)
    a, b = 8.0, -0.1
    kernel = torch.exp(-a * (s[0].double() - 0.8 - b) ** 2)
    gen = torch.Generator().manual_seed(0)
    chosen, drawn = pick_negatives("simans", q, s, pos, keep, 1, gen, simans_a=a, simans_b=b)
    assert (drawn.sum(1) == 1).all()
    freq = torch.bincount(chosen[:, 0], minlength=4).double() / n
    torch.testing.assert_close(freq, kernel / kernel.sum(), atol=0.01, rtol=0)
    # potential: each candidate kept independently with min(clamp, kernel); kept ones in order
    clamp = 0.6
    gen = torch.Generator().manual_seed(1)
    chosen, kept = pick_negatives(
        "potential", q, s, pos, keep, 4, gen, potential_a=a, potential_b=b, potential_clamp=clamp
    )
    torch.testing.assert_close(kept.double().mean(0), kernel.clamp(max=clamp), atol=0.01, rtol=0)
    first = kept.double().argmax(1)  # the most similar kept candidate comes first
    rows = kept.any(1)
    assert_same(chosen[rows, 0], first[rows])


def test_ring_pick_stays_in_the_band_of_each_querys_survivors():
    from hardneg.mining import pick_negatives

    q, s, pos, keep = sorted_candidates(200, 20, seed=3)
    rho_out, rho_in = 0.6, 0.25
    chosen, band = pick_negatives(
        "ring",
        q,
        s,
        pos,
        keep,
        2,
        torch.Generator().manual_seed(0),
        ring_rho_out=rho_out,
        ring_rho_in=rho_in,
    )
    for i in range(200):
        survivors = keep[i].nonzero().flatten().tolist()  # already in rank order
        m = len(survivors)
        upper = max(1, min(m, int(rho_out * m)))
        lower = min(int(rho_in * upper), upper - 1)
        assert band[i].nonzero().flatten().tolist() == survivors[lower:upper]
        picks = [c for c in chosen[i].tolist() if band[i, c]]
        assert len(picks) == min(2, upper - lower) and len(set(picks)) == len(picks)


def test_the_samplers_call_the_strategy_classes(monkeypatch):
    from hardneg.strategies.importance import ImportanceNegatives
    from hardneg.strategies.potential import PotentialMining
    from hardneg.strategies.ring import RingNegatives
    from hardneg.strategies.simans import SimANSNegatives

    model = FakeModel()
    queries, positives, corpus = data()
    for sampling, cls, method in (
        ("hcl", ImportanceNegatives, "select"),
        ("simans", SimANSNegatives, "select"),
        ("ring", RingNegatives, "select"),
        ("potential", PotentialMining, "log_keep"),
    ):
        calls = []
        original = getattr(cls, method)

        def spy(self, *args, _original=original, _calls=calls, **kwargs):
            _calls.append(type(self).__name__)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, spy)
        rows = mine_hard_negatives(
            queries, positives, corpus, model=model, num_negatives=2, sampling=sampling
        )
        assert calls == [cls.__name__] and rows, sampling


def test_torchrun_cli_writes_the_rows_of_one_process_from_rank_0_only(tmp_path):
    """``python -m torch.distributed.run --nproc_per_node 2 -m hardneg mine`` (gloo, a tiny
    local BERT) writes the file that one process writes, and only rank 0 writes it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _text_models import saved_model_and_pairs

    from hardneg import cli

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    model_dir, pairs, texts = saved_model_and_pairs(tmp_path)
    (tmp_path / "corpus.txt").write_text("\n".join(texts[10:]) + "\n")  # 1..9 are outside
    common = ["--data", str(pairs), "--corpus", str(tmp_path / "corpus.txt")]
    common += ["--model", str(model_dir), "--num-negatives", "3", "--format", "n-tuple"]
    common += ["--sampling", "simans", "--range-max", "12", "--corpus-chunk-size", "7"]
    single = tmp_path / "single.jsonl"
    assert cli.main(["mine", *common, "--output", str(single)]) == 0

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    multi = tmp_path / "multi.jsonl"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    launch += ["-m", "hardneg", "mine", *common, "--output", str(multi)]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert multi.read_text() == single.read_text()
    assert len(load_rows(single)) == 20  # the comparison is not vacuous
    # rank 0 alone saves the rows and reports them
    assert (done.stdout + done.stderr).count("mined ") == 1, done.stdout


class TableModel:
    """Fixed 2-d vectors at given angles from the query direction (cosine = cos(angle))."""

    def __init__(self, cosines: dict[str, float]) -> None:
        self.cosines = cosines

    def encode(self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False):
        rows = []
        for t in texts:
            c = self.cosines[t]
            rows.append(torch.tensor([c, (1 - c * c) ** 0.5], dtype=torch.float64))
        return torch.stack(rows).float()


def test_relative_margin_keeps_negatives_below_a_negative_positive_score():
    """s_pos = -0.2, m = 0.5: the threshold is s_pos - |s_pos| m = -0.3; a candidate at -0.15
    scores above the positive and is no negative (s_pos (1 - m) = -0.1 would keep it)."""
    cosines = {"q": 1.0, "pos": -0.2, "above": -0.15, "below": -0.35, "far": -0.9}
    rows = mine_hard_negatives(
        ["q"],
        ["pos"],
        ["above", "below", "far", "pos"],
        model=TableModel(cosines),
        num_negatives=2,
        relative_margin=0.5,
        range_max=3,
        output_format="n-tuple",
    )
    assert rows == [{"anchor": "q", "positive": "pos", "negative_1": "below", "negative_2": "far"}]


def test_no_positive_of_an_anchor_is_mined_as_a_negative_of_its_other_pairs():
    cosines = {"q": 1.0, "a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.5}
    rows = mine_hard_negatives(
        ["q", "q"],
        ["a", "b"],
        ["a", "b", "c", "d", "e"],
        model=TableModel(cosines),
        num_negatives=2,
        range_max=3,
        output_format="n-tuple",
    )
    want = [
        {"anchor": "q", "positive": p, "negative_1": "c", "negative_2": "d"} for p in ("a", "b")
    ]
    assert rows == want


def test_a_text_repeated_in_the_corpus_is_one_candidate():
    """A corpus holding a text twice (the Lee corpus repeats documents) gave n-tuples with the
    same negative twice and repeated triplets: each copy was its own candidate and took a
    window rank. A repeated text is one candidate, as sentence-transformers deduplicates its
    corpus: the rows equal those of the corpus without the repeats."""
    cosines = {"q": 1.0, "pos": 0.95, "b": 0.9, "c": 0.8, "d": 0.7, "e": 0.6}
    rows = mine_hard_negatives(
        ["q"],
        ["pos"],
        ["pos", "b", "b", "c", "c", "d", "e", "b"],
        model=TableModel(cosines),
        num_negatives=3,
        range_max=3,
        output_format="n-tuple",
    )
    want = {"anchor": "q", "positive": "pos", "negative_1": "b", "negative_2": "c"}
    assert rows == [{**want, "negative_3": "d"}]
    model = FakeModel()
    queries, positives, corpus = data()
    repeated = corpus + corpus[20:40] + corpus[:5]
    for fmt in ("n-tuple", "triplet"):
        kw = {"model": model, "num_negatives": 3, "output_format": fmt, "sampling": "top"}
        got = mine_hard_negatives(queries, positives, repeated, **kw)
        assert got == mine_hard_negatives(queries, positives, corpus, **kw)
        assert len({tuple(r.values()) for r in got}) == len(got)


def test_the_query_s_own_text_in_the_corpus_is_no_negative_and_takes_no_window_rank():
    """Retrieval corpora often hold the queries themselves (score 1 against themselves): the
    query's own rows are skipped like its positives, so the window ``[0, range_max)`` holds
    ``range_max`` other texts (sentence-transformers >= 6.3 masks the query's row as well)."""
    cosines = {"q": 1.0, "a": 0.2, "b": 0.9, "c": 0.8, "d": 0.7, "e": 0.6}
    rows = mine_hard_negatives(
        ["q"],
        ["a"],
        ["q", "a", "b", "c", "d", "e", "q"],
        model=TableModel(cosines),
        num_negatives=2,
        range_max=2,
        output_format="n-tuple",
    )
    assert rows == [{"anchor": "q", "positive": "a", "negative_1": "b", "negative_2": "c"}]


class RecordingModel(FakeModel):
    """FakeModel that records every text it is asked to encode."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__(dim)
        self.texts: list[str] = []

    def encode(self, texts, **kwargs):
        self.texts.extend(texts)
        return super().encode(texts, **kwargs)


def test_an_anchor_with_several_positives_is_embedded_once_and_mined_for_each_pair():
    queries = ["query 0", "query 1", "query 0", "query 0"]
    positives = ["doc 0", "doc 1", "doc 2", "doc 3"]
    corpus = [f"doc {i}" for i in range(40)]
    model = RecordingModel()
    rows = mine_hard_negatives(
        queries, positives, corpus, model=model, num_negatives=2, output_format="n-tuple"
    )
    assert sorted(t for t in model.texts if t.startswith("query")) == ["query 0", "query 1"]
    # every pair still gets its own row; an anchor's positives are never its negatives, and the
    # negatives are the corpus entries most similar to the anchor, computed independently here
    assert [(r["anchor"], r["positive"]) for r in rows] == list(zip(queries, positives))
    sims = scores_of(model, ["query 0", "query 1"], corpus)
    own = {"query 0": {0, 2, 3}, "query 1": {1}}
    for r in rows:
        s = sims[0 if r["anchor"] == "query 0" else 1].clone()
        s[list(own[r["anchor"]])] = float("-inf")
        want = [corpus[j] for j in s.topk(2).indices.tolist()]
        assert [r["negative_1"], r["negative_2"]] == want


class CallRecordingModel(FakeModel):
    """FakeModel that records the texts of each encode call."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__(dim)
        self.batches: list[list[str]] = []

    def encode(self, texts, **kwargs):
        self.batches.append(list(texts))
        return super().encode(texts, **kwargs)


def test_embed_texts_encodes_longest_first_in_bounded_calls_and_keeps_the_input_order(
    monkeypatch,
):
    import hardneg.mining as mining

    monkeypatch.setattr(mining, "ENCODE_BATCHES_PER_CALL", 2)
    texts = [f"text {'x' * ((7 * i) % 11)} {i}" for i in range(23)]
    model = CallRecordingModel()
    out = mining.embed_texts(model, texts, batch_size=3)
    # rows in the input order: each row is its own text's unit vector
    want = torch.nn.functional.normalize(torch.stack([model.vector(t) for t in texts]), dim=1)
    torch.testing.assert_close(out, want)
    # every text once, in calls of at most 2 batches of 3, longest texts first overall
    seen = [t for batch in model.batches for t in batch]
    assert sorted(seen) == sorted(texts)
    assert all(len(batch) <= 6 for batch in model.batches) and len(model.batches) == 4
    lengths = [len(t) for t in seen]
    assert lengths == sorted(lengths, reverse=True)


def test_sampler_settings_are_checked_with_a_clear_error_in_pick_negatives_too():
    from hardneg.mining import SamplerOptions, pick_negatives

    q, s, pos, keep = sorted_candidates(8, 6)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"unknown sampler option\(s\) \['simans_alpha'\]"):
        pick_negatives("simans", q, s, pos, keep, 1, gen, simans_alpha=2.0)
    with pytest.raises(ValueError, match="either as options or as keywords"):
        pick_negatives("hcl", q, s, pos, keep, 1, gen, SamplerOptions(), hcl_beta=2.0)
    with pytest.raises(ValueError, match="temperature"):
        pick_negatives("hcl", q, s, pos, keep, 1, gen, temperature=0.0)
    with pytest.raises(ValueError, match="potential_clamp"):
        SamplerOptions(potential_clamp=1.5)
    # an options object is read as its keywords are: beta = 0 is a uniform draw
    chosen, _ = pick_negatives("hcl", q, s, pos, keep, 2, gen, SamplerOptions(hcl_beta=0.0))
    want = gumbel_top_k(
        torch.zeros_like(s, dtype=torch.float64).masked_fill(~keep, float("-inf")),
        2,
        torch.Generator().manual_seed(0),
    )
    assert_same(chosen, want)


def test_the_default_window_fits_a_corpus_smaller_than_30_candidates():
    """With the defaults, a small data set mines out of the box: the default ``range_max``
    (30) is capped by the candidates a query can have (the corpus less its own text and its
    positives), not by the corpus size, which left no room for the skipped rows."""
    model = FakeModel()
    queries, positives, _ = data(n_queries=12)
    # the corpus defaults to the positives: 12 texts, one of them each query's positive
    rows = mine_hard_negatives(
        queries, positives, model=model, num_negatives=3, output_format="n-tuple"
    )
    s = scores_of(model, queries, positives)
    assert len(rows) == len(queries)
    for i, row in enumerate(rows):
        others = [j for j in s[i].argsort(descending=True).tolist() if j != i]
        assert [row[f"negative_{m}"] for m in (1, 2, 3)] == [positives[j] for j in others[:3]]


def test_a_corpus_too_small_for_the_window_or_the_count_says_how_large_it_may_be():
    model = FakeModel()
    queries, positives, corpus = data(n_queries=12, n_corpus=20)
    # 20 texts, one positive per query: 19 candidates per query
    with pytest.raises(ValueError, match="lower range_max to at most 19"):
        mine_hard_negatives(queries, positives, corpus, model=model, range_max=20)
    assert mine_hard_negatives(queries, positives, corpus, model=model, range_max=19)
    with pytest.raises(ValueError, match="at most 0 candidates are left, fewer than num_neg"):
        mine_hard_negatives(["q"], ["p"], model=model)  # the corpus is the positive alone


def test_an_anchor_with_many_positives_limits_only_its_own_candidates():
    """The candidates a query can have were counted for the query with the most positives: one
    anchor listed with 15 positives in a corpus of 30 refused num_negatives = 20 for every
    query ("at most 15 candidates are left") and capped everyone's default window at 15. Now
    each query has its own count: the others mine as they do without that anchor, and the
    anchor itself gets the 15 texts it has left (short: triplets, no n-tuple)."""
    model = FakeModel()
    queries, positives, corpus = data(n_queries=12, n_corpus=30)
    many = [f"doc {j}" for j in range(12, 26)]  # query 0's extra positives
    kw = {"model": model, "num_negatives": 20}
    q_all, p_all = queries + ["query 0"] * len(many), positives + many
    for fmt in ("n-tuple", "triplet"):
        got = mine_hard_negatives(q_all, p_all, corpus, output_format=fmt, **kw)
        alone = mine_hard_negatives(queries[1:], positives[1:], corpus, output_format=fmt, **kw)
        assert [r for r in got if r["anchor"] != "query 0"] == alone
        mine = [r for r in got if r["anchor"] == "query 0"]
        if fmt == "n-tuple":
            assert mine == []
        else:  # each of its 15 pairs: the 15 corpus texts that are none of its positives
            left = {f"doc {j}" for j in range(1, 12)} | {f"doc {j}" for j in range(26, 30)}
            assert len(mine) == 15 * 15 and {r["negative"] for r in mine} == left
    with pytest.raises(ValueError, match="at most 29 candidates"):  # no query can give 30
        mine_hard_negatives(q_all, p_all, corpus, model=model, num_negatives=30)


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"anchor": "a", "positive": "b"}', '{"anchor": "c"}'],
            "row 2: has no column 'positive'",
        ),
        (
            ['{"anchor": "a", "positive": "b"}', '{"anchor": "c", "positive": null}'],
            "row 2: has null",
        ),
        (['{"anchor": "a", "positive": "b"}', '{"anchor": 3, "positive": "d"}'], "row 2: has int"),
        (['{"anchor": "a", "positive": "b"}', "{bad json"], "line 2: not valid JSON"),
        (['{"anchor": "a", "positive": "b"}', '["c", "d"]'], "line 2: expected a JSON object"),
    ],
)
def test_cli_mine_names_the_file_and_row_of_a_bad_input_row(
    tmp_path, monkeypatch, capsys, lines, message
):
    from hardneg import cli
    from hardneg.text import models

    monkeypatch.setattr(models, "load_sentence_model", lambda name, device=None: FakeModel())
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n\n")  # a blank last line is no row
    argv = ["mine", "--data", str(pairs), "--output", str(tmp_path / "out.jsonl")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hardneg mine: error: {pairs}, ") and message in err
    assert "Traceback" not in err and not (tmp_path / "out.jsonl").exists()


def test_cli_mine_refuses_an_output_format_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from hardneg import cli
    from hardneg.text import models

    def no_model(name, device=None):
        raise AssertionError("the model was loaded before the output name was checked")

    monkeypatch.setattr(models, "load_sentence_model", no_model)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n")
    assert cli.main(["mine", "--data", str(pairs), "--output", str(tmp_path / "o.csv")]) == 2
    assert "--output must end in .jsonl or .parquet, got" in capsys.readouterr().err
    under_a_file = str(pairs / "o.jsonl")  # a folder we cannot write: checked first too
    assert cli.main(["mine", "--data", str(pairs), "--output", under_a_file]) == 2
    assert f"{pairs} is a file, not a folder" in capsys.readouterr().err
    # an output name that is a folder failed with "Is a directory" only after the mining
    folder = tmp_path / "mined.jsonl"
    folder.mkdir()
    assert cli.main(["mine", "--data", str(pairs), "--output", str(folder)]) == 2
    assert f"--output {folder} is a folder; give a file name" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["batch_size", "query_chunk_size", "corpus_chunk_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_a_size_below_one_is_refused_not_an_empty_result(name, value):
    """0 was a bare ``range() arg 3`` error; -1 embedded or ranked nothing: no rows, exit 0."""
    model = FakeModel()
    queries, positives, corpus = data()
    with pytest.raises(ValueError, match=rf"{name} must be in \[1, inf\), got {value}"):
        mine_hard_negatives(queries, positives, corpus, model=model, **{name: value})


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "--device cuda: CUDA is not available here; use --device cpu"),
        ("gpu", "is not a torch device"),
    ],
)
def test_cli_mine_names_a_device_it_cannot_use(tmp_path, monkeypatch, capsys, device, message):
    from hardneg import cli
    from hardneg.text import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "load_sentence_model", lambda name, device=None: FakeModel())
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n")
    argv = ["mine", "--data", str(pairs), "--output", str(tmp_path / "o.jsonl")]
    assert cli.main([*argv, "--device", device]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_mine_help_gives_the_default_of_every_option_that_has_one():
    import argparse

    from hardneg.commands import mine as mine_command

    parser = argparse.ArgumentParser()
    mine_command.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    defaults = vars(parser.parse_args(["--data", "d.jsonl", "--output", "o.jsonl"]))
    for action in parser._actions:
        value = defaults.get(action.dest)
        if action.option_strings and value is not None and action.dest not in ("data", "output"):
            assert f"default: {value}" in text, f"{action.option_strings[0]}: no default in --help"


def test_a_txt_corpus_skips_blank_lines_and_a_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("A fire burns near the town.\n   \n\t\n  The cat sat on the mat. \n\n")
    assert load_rows(path) == [
        {"text": "A fire burns near the town."},
        {"text": "The cat sat on the mat."},
    ]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{latin}: not UTF-8 text")):
        load_rows(latin)


def test_cli_mine_warns_with_what_to_loosen_when_no_row_is_mined(tmp_path, monkeypatch, capsys):
    """A ring band too narrow for a tiny corpus mines nothing: exit 0 (a legitimate outcome), a
    warning naming the options to loosen; a run that mines rows prints no warning."""
    from hardneg import cli
    from hardneg.text import models

    queries, positives, _ = data()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"anchor": q, "positive": p}) + "\n"
            for q, p in zip(queries[:3], positives[:3])
        )
    )
    monkeypatch.setattr(models, "load_sentence_model", lambda name, device=None: FakeModel())
    base = ["mine", "--data", str(pairs), "--format", "n-tuple"]
    out = tmp_path / "ring.jsonl"
    argv = [*base, "--output", str(out), "--sampling", "ring", "--num-negatives", "2"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert load_rows(out) == [] and "no row was written" in err
    assert "--ring-rho-out (now 0.5)" in err and "--num-negatives (now 2)" in err
    out = tmp_path / "top.jsonl"
    assert cli.main([*base, "--output", str(out), "--num-negatives", "1"]) == 0
    assert load_rows(out) and "no row was written" not in capsys.readouterr().err


def test_cli_mine_checks_its_settings_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A wrong setting fails in one line without loading the model; a valid run loads it once,
    and a rerun whose embeddings are all cached never loads it."""
    from hardneg import cli
    from hardneg.text import models

    queries, positives, corpus = data()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"anchor": q, "positive": p}) + "\n" for q, p in zip(queries, positives))
    )
    (tmp_path / "corpus.txt").write_text("\n".join(corpus) + "\n")
    loads = []

    def load(name, device=None):
        loads.append(name)
        return FakeModel()

    monkeypatch.setattr(models, "load_sentence_model", load)
    base = ["mine", "--data", str(pairs), "--corpus", str(tmp_path / "corpus.txt")]
    base += ["--cache-dir", str(tmp_path / "cache")]
    bad = [
        ["--num-negatives", "0"],
        ["--range-min", "5", "--range-max", "3"],
        ["--sampling", "ring", "--ring-rho-out", "1.5"],
    ]
    for extra in bad:
        assert cli.main([*base, "--output", str(tmp_path / "bad.jsonl"), *extra]) == 2
        assert "Traceback" not in capsys.readouterr().err
    assert loads == []
    out = tmp_path / "good.jsonl"
    assert cli.main([*base, "--output", str(out), "--num-negatives", "2"]) == 0
    assert len(loads) == 1
    assert load_rows(out)
    assert cli.main([*base, "--output", str(tmp_path / "again.jsonl"), "--num-negatives", "2"]) == 0
    assert len(loads) == 1  # every embedding came from the cache


def test_pick_negatives_refuses_an_unknown_sampling_name():
    from hardneg.mining import pick_negatives

    scores = torch.rand(2, 5).sort(dim=1, descending=True).values
    keep = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="sampling"):
        pick_negatives(
            "potentail", torch.randn(2, 4), scores, scores[:, :1] + 1, keep, 2, torch.Generator()
        )


class ModuleModel(torch.nn.Module):
    """A torch encoder with ``encode``: a fixed random code per text times a trainable matrix
    (what a fine-tuned SentenceTransformer is to the cache: the same class, new weights)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(
                torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
            )
        self.calls = 0

    def encode(self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False):
        self.calls += 1
        return self.proj(torch.stack([FakeModel().vector(t) for t in texts]))


def test_the_embedding_cache_does_not_serve_another_model_s_embeddings(tmp_path):
    """Without ``model_key`` the cache key was the model's class name, so re-mining with the
    fine-tuned model (iterative hard-negative mining) in the same cache_dir read the first
    model's embeddings back and mined the old negatives. The key now follows the weights:
    unchanged weights hit the cache, new weights embed again and mine what an uncached run
    mines."""
    queries, positives, corpus = data()
    kw = {"num_negatives": 3, "output_format": "n-tuple", "cache_dir": tmp_path}
    model = ModuleModel(seed=0)
    first = mine_hard_negatives(queries, positives, corpus, model=model, **kw)
    calls = model.calls
    assert mine_hard_negatives(queries, positives, corpus, model=model, **kw) == first
    assert model.calls == calls  # same weights: every embedding from the cache
    with torch.no_grad():  # a training step
        model.proj.weight.copy_(ModuleModel(seed=1).proj.weight)
    again = mine_hard_negatives(queries, positives, corpus, model=model, **kw)
    assert model.calls > calls
    uncached = {k: v for k, v in kw.items() if k != "cache_dir"}
    assert again == mine_hard_negatives(queries, positives, corpus, model=model, **uncached)
    assert again != first


def test_cli_mine_cache_follows_a_model_directory_saved_again(tmp_path, monkeypatch):
    """``hardneg mine --model DIR --cache-dir C`` keyed the cache by the path: a model trained
    and saved to the same folder was never loaded again and its old embeddings were mined. The
    key now includes the folder's files (names, sizes, modification times), so a re-saved model
    is loaded and embedded, and an unchanged one still never loads."""
    import os

    from hardneg import cli
    from hardneg.text import models

    queries, positives, corpus = data()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"anchor": q, "positive": p}) + "\n" for q, p in zip(queries, positives))
    )
    model_dir = tmp_path / "model"
    (model_dir / "1_Pooling").mkdir(parents=True)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"first weights")
    (model_dir / "1_Pooling" / "config.json").write_text("{}")
    loads = []

    def load(name, device=None):
        loads.append(name)
        return FakeModel()

    monkeypatch.setattr(models, "load_sentence_model", load)
    argv = ["mine", "--data", str(pairs), "--model", str(model_dir)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "o.jsonl")]
    assert cli.main(argv) == 0 and len(loads) == 1
    assert cli.main(argv) == 0 and len(loads) == 1  # unchanged: all from the cache
    weights.write_bytes(b"weights after training")  # saved again, same folder
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cli.main(argv) == 0 and len(loads) == 2


def test_output_scores_are_the_model_s_cosines_positive_first():
    model = FakeModel()
    queries, positives, corpus = data()
    s = scores_of(model, queries, corpus)
    kwargs = dict(model=model, num_negatives=3, output_scores=True)
    tuples = mine_hard_negatives(queries, positives, corpus, output_format="n-tuple", **kwargs)
    triplets = mine_hard_negatives(queries, positives, corpus, output_format="triplet", **kwargs)
    assert len(tuples) == len(queries) and len(triplets) == 3 * len(queries)
    for row in tuples:
        i = queries.index(row["anchor"])
        docs = [row["positive"], *(row[f"negative_{m}"] for m in (1, 2, 3))]
        want = [float(s[i, corpus.index(d)]) for d in docs]
        assert row["scores"] == pytest.approx(want, abs=1e-5)
        assert want[1] >= want[2] >= want[3]  # the negatives in decreasing score
    for row in triplets:
        i = queries.index(row["anchor"])
        want = [float(s[i, corpus.index(row[c])]) for c in ("positive", "negative")]
        assert row["scores"] == pytest.approx(want, abs=1e-5)
    plain = mine_hard_negatives(queries, positives, corpus, model=model, num_negatives=3)
    assert "scores" not in plain[0]


@pytest.mark.parametrize("scores", [False, True])
def test_labeled_formats_list_each_anchor_s_positives_then_its_mined_negatives(scores):
    model = FakeModel()
    queries, positives, corpus = data()
    # anchor 0 twice: its two positives are both positives (label 1), never negatives
    queries, positives = [*queries, queries[0]], [*positives, positives[5]]
    kwargs = dict(model=model, num_negatives=2, output_scores=scores)
    triplets = mine_hard_negatives(queries, positives, corpus, **{**kwargs, "output_scores": False})
    mined: dict[str, list[str]] = {}
    for row in triplets:
        mined.setdefault(row["anchor"], [])
        if row["negative"] not in mined[row["anchor"]]:
            mined[row["anchor"]].append(row["negative"])
    own: dict[str, list[str]] = {}
    for q, p in zip(queries, positives):
        own.setdefault(q, []).append(p)
    s = scores_of(model, list(own), corpus)
    anchors = list(own)

    def value(anchor, doc, label):
        return float(s[anchors.index(anchor), corpus.index(doc)]) if scores else label

    lists = mine_hard_negatives(queries, positives, corpus, output_format="labeled-list", **kwargs)
    assert [r["anchor"] for r in lists] == anchors
    key = "scores" if scores else "labels"
    for row in lists:
        a = row["anchor"]
        assert row["positive"] == own[a] + mined[a]
        want = [value(a, d, 1) for d in own[a]] + [value(a, d, 0) for d in mined[a]]
        assert row[key] == pytest.approx(want, abs=1e-5)
    pairs = mine_hard_negatives(queries, positives, corpus, output_format="labeled-pair", **kwargs)
    key = "score" if scores else "label"
    want_pairs = [
        (a, d, value(a, d, label))
        for a in anchors
        for d, label in [*((d, 1) for d in own[a]), *((d, 0) for d in mined[a])]
    ]
    got = [(r["anchor"], r["positive"], r[key]) for r in pairs]
    assert [g[:2] for g in got] == [w[:2] for w in want_pairs]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want_pairs], abs=1e-5)
    assert len(own[queries[0]]) == 2 and set(own[queries[0]]).isdisjoint(mined[queries[0]])


def test_cli_mine_takes_the_labeled_formats_and_output_scores():
    import argparse

    from hardneg.commands import mine as mine_command

    parser = argparse.ArgumentParser()
    mine_command.add_arguments(parser)
    args = parser.parse_args(
        ["--data", "d.jsonl", "--output", "o.jsonl", "--format", "labeled-list", "--output-scores"]
    )
    assert args.output_format == "labeled-list" and args.output_scores is True
    args = parser.parse_args(
        ["--data", "d.jsonl", "--output", "o.jsonl", "--query-prompt", "query: "]
        + ["--corpus-prompt-name", "document"]
    )
    assert (args.query_prompt, args.corpus_prompt_name) == ("query: ", "document")


class PromptModel(FakeModel):
    """``encode`` takes ``prompt`` / ``prompt_name`` as a SentenceTransformer does: the vector of
    the prompted text."""

    prompts = {"query": "query: ", "doc": "passage: "}

    def encode(
        self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False, **kwargs
    ):
        prompt = kwargs.get("prompt") or self.prompts.get(kwargs.get("prompt_name"), "")
        return torch.stack([self.vector(prompt + t) for t in texts])


@pytest.mark.parametrize("model_class", [FakeModel, PromptModel])
def test_prompts_embed_queries_and_corpus_with_their_own_prefix(model_class, tmp_path):
    model = model_class()
    queries, positives, corpus = data()
    kwargs = dict(model=model, num_negatives=2, output_format="n-tuple", output_scores=True)
    rows = mine_hard_negatives(
        queries,
        positives,
        corpus,
        query_prompt="query: ",
        corpus_prompt="passage: ",
        cache_dir=tmp_path,
        **kwargs,
    )
    s = scores_of(model, [f"query: {q}" for q in queries], [f"passage: {c}" for c in corpus])
    for i, row in enumerate(rows):
        docs = [row["positive"], row["negative_1"], row["negative_2"]]
        want = [float(s[i, corpus.index(d)]) for d in docs]
        assert row["scores"] == pytest.approx(want, abs=1e-5)
        s[i, i] = float("-inf")
        top = [corpus[j] for j in s[i].argsort(descending=True)[:2].tolist()]
        assert docs[1:] == top
    # the cache holds the prompted embeddings apart from the plain ones
    plain = mine_hard_negatives(queries, positives, corpus, cache_dir=tmp_path, **kwargs)
    assert plain[0]["scores"] != rows[0]["scores"]


def test_prompt_names_come_from_the_model_s_prompts():
    model = PromptModel()
    queries, positives, corpus = data()
    kwargs = dict(model=model, num_negatives=2, output_format="n-tuple", output_scores=True)
    named = mine_hard_negatives(
        queries, positives, corpus, query_prompt_name="query", corpus_prompt_name="doc", **kwargs
    )
    texts = mine_hard_negatives(
        queries, positives, corpus, query_prompt="query: ", corpus_prompt="passage: ", **kwargs
    )
    assert named == texts
    with pytest.raises(ValueError, match="not one of the model's prompts .*'query', 'doc'"):
        mine_hard_negatives(queries, positives, corpus, query_prompt_name="qry", **kwargs)
    with pytest.raises(ValueError, match="the model has no prompts"):
        mine_hard_negatives(
            queries, positives, corpus, **{**kwargs, "model": FakeModel()}, query_prompt_name="q"
        )
    with pytest.raises(ValueError, match="query_prompt or query_prompt_name, not both"):
        mine_hard_negatives(
            queries, positives, corpus, query_prompt="q: ", query_prompt_name="query", **kwargs
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-negatives", "0"], "--num-negatives must be in [1, inf), got 0"),
        (["--range-min", "5"], "--range-max (2) must be larger than --range-min (5)"),
    ],
)
def test_cli_mine_names_a_bad_option_by_its_flag(tmp_path, monkeypatch, capsys, options, message):
    # the library's keyword names came through: "num_negatives must be in [1, inf)"
    from hardneg import cli
    from hardneg.text import models

    monkeypatch.setattr(models, "load_sentence_model", lambda name, device=None: FakeModel())
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"anchor": f"q{i}", "positive": f"p{i}"} for i in range(3)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["mine", "--data", str(pairs), "--output", str(tmp_path / "out.jsonl"), *options]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"hardneg mine: error: {message}\n"
