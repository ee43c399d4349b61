"""The mining module's helpers called directly: the cache fingerprint, the candidates' contrast
set, and the row files (jsonl, parquet, csv, txt) with their error messages."""

from __future__ import annotations

import re
import time
import zlib

import pytest
import torch
from test_mining import data as pairs

from hardneg.mining import (
    SamplerOptions,
    candidate_contrast,
    chunked_top_k,
    column_texts,
    embed_texts,
    load_rows,
    mine_hard_negatives,
    model_fingerprint,
    pick_negatives,
    save_rows,
    sharded_top_k,
)


class Encoder:
    """Not a torch module: named by its class alone."""


class Recorder:
    """An encoder that records what each ``encode`` call received: a fixed random vector per
    text (``seed`` tells two recorders apart)."""

    def __init__(self, seed: int = 0, result=None) -> None:
        self.seed, self.result, self.calls = seed, result, []

    def vector(self, text: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1000 + sum(map(ord, text)) + len(text))
        return torch.randn(6, generator=gen)

    # defaults unlike embed_texts' own (sentence-transformers returns numpy unless asked):
    # a setting embed_texts left out would show
    def encode(self, texts, batch_size=32, convert_to_tensor=False, show_progress_bar=True):
        self.calls.append(
            {
                "texts": list(texts),
                "batch_size": batch_size,
                "convert_to_tensor": convert_to_tensor,
                "show_progress_bar": show_progress_bar,
            }
        )
        return (
            self.result if self.result is not None else torch.stack(list(map(self.vector, texts)))
        )


class PromptArgument(Recorder):
    """``encode`` takes ``prompt`` by name."""

    def encode(
        self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False, prompt=None
    ):
        self.calls.append({"texts": list(texts), "prompt": prompt})
        return torch.stack([self.vector((prompt or "") + t) for t in texts])


class AnyKeywords(Recorder):
    """``encode(texts, **kwargs)``, as a wrapper that passes everything on."""

    prompts = {"q": "query: "}

    def encode(self, texts, **kwargs):
        self.calls.append({"texts": list(texts), **kwargs})
        return torch.stack(list(map(self.vector, texts)))


class NoSignature(Recorder):
    """An ``encode`` whose signature cannot be read (as some compiled callables)."""

    def __init__(self) -> None:
        super().__init__()
        outer = self

        class Call:
            __signature__ = "unreadable"  # inspect.signature raises TypeError

            def __call__(self, texts, **kwargs):
                outer.calls.append({"texts": list(texts)})
                return torch.stack(list(map(outer.vector, texts)))

        self.encode = Call()


def test_model_fingerprint_is_the_class_name_then_20_hex_digits_of_the_weights():
    assert model_fingerprint(Encoder()) == "Encoder"
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    key = model_fingerprint(linear)
    assert re.fullmatch(r"Linear-[0-9a-f]{20}", key), key
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(linear.state_dict())
    assert model_fingerprint(twin) == key  # the same weights: the same cache files
    with torch.no_grad():
        twin.bias.add_(1e-3)
    assert model_fingerprint(twin) != key  # a training step: new cache files


def test_candidate_contrast_holds_the_candidates_as_a_contrast_set():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 4, generator=gen)
    scores = torch.rand(3, 5, generator=gen).sort(dim=1, descending=True).values
    positive = scores[:, :1] + 0.1
    keep = torch.rand(3, 5, generator=gen) < 0.7
    t = 0.05
    c = candidate_contrast(queries, scores, positive, keep, t)
    # the documented fields: anchors the queries, logits s / t of the survivors, -inf elsewhere
    assert torch.equal(c.anchors, queries.double())
    want = torch.where(keep, scores.double() / t, torch.tensor(float("-inf"), dtype=torch.float64))
    assert torch.equal(c.negative_logits, want)
    assert torch.equal(c.positive_logits, positive.double() / t)
    assert torch.equal(c.negative_mask, keep)
    assert torch.equal(c.num_negatives, keep.sum(dim=1))
    assert c.temperature == t and isinstance(c.temperature, float)
    # and a well-formed set around them: one positive per query (weight 1), [W, d] columns
    assert c.columns.shape == (5, 4) and c.positives.shape == (3, 1, 4)
    assert torch.equal(c.positive_weight, torch.ones(3, 1, dtype=torch.float64))
    assert c.anchor_columns is None and c.positive_index is None and c.single_positive


def test_save_rows_makes_the_folders_and_writes_utf8_text(tmp_path):
    path = save_rows([{"anchor": "café ☕", "n": 1}], tmp_path / "new" / "folder" / "rows.jsonl")
    # the text as written, readable in any editor (no \u escapes)
    assert path.read_text(encoding="utf-8") == '{"anchor": "café ☕", "n": 1}\n'
    assert load_rows(path) == [{"anchor": "café ☕", "n": 1}]


def test_load_rows_reads_a_csv_with_a_line_break_inside_a_quoted_field(tmp_path):
    path = tmp_path / "rows.csv"
    # the csv module's own line handling (newline=""): the \r\n inside the quotes is kept
    path.write_bytes('anchor,positive\r\n"two\r\nlines",café\r\nq,p\r\n'.encode())
    assert load_rows(path) == [
        {"anchor": "two\r\nlines", "positive": "café"},
        {"anchor": "q", "positive": "p"},
    ]


def test_a_jsonl_skips_blank_lines_anywhere_and_names_a_line_that_is_no_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": "x"}\n\n   \n{"a": "y"}\n', encoding="utf-8")
    assert load_rows(path) == [{"a": "x"}, {"a": "y"}]
    path.write_text('{"a": "x"}\n[1, 2]\n', encoding="utf-8")
    message = f"{path}, line 2: expected a JSON object with named columns, got a list"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        load_rows(path)


def test_the_row_files_refusals_carry_their_exact_message(tmp_path):
    with pytest.raises(
        ValueError, match=re.escape("output must end in .jsonl or .parquet, got 'rows.csv'")
    ):
        save_rows([{"a": "x"}], tmp_path / "rows.csv")
    missing = tmp_path / "none.jsonl"
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"no such file: {missing}") + "$"):
        load_rows(missing)
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(
        ValueError,
        match="^" + re.escape("input must be .jsonl, .parquet, .csv or .txt, got 'rows.tsv'") + "$",
    ):
        load_rows(tsv)


def test_column_texts_names_the_row_and_the_option_only_when_there_is_one():
    rows = [{"anchor": "x"}, {"query": "y"}]
    plain = "in.jsonl, row 2: has no column 'anchor' (every row needs a text there; its columns: ['query'])"
    with pytest.raises(ValueError, match="^" + re.escape(plain) + "$"):
        column_texts(rows, "anchor", "in.jsonl")
    hinted = plain[:-1] + "; set --anchor-column for another name)"
    with pytest.raises(ValueError, match="^" + re.escape(hinted) + "$"):
        column_texts(rows, "anchor", "in.jsonl", "--anchor-column")
    assert column_texts(rows[:1], "anchor", "in.jsonl") == ["x"]


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_embed_texts_passes_its_settings_to_encode_and_returns_unit_rows_in_input_order():
    model = Recorder()
    texts = ["a", "ccc", "bb"]
    out = embed_texts(model, texts)
    # longest first within the call; batch_size 64 by default; a tensor, no progress bar
    assert model.calls == [
        {
            "texts": ["ccc", "bb", "a"],
            "batch_size": 64,
            "convert_to_tensor": True,
            "show_progress_bar": False,
        }
    ]
    torch.testing.assert_close(out, unit_rows(torch.stack(list(map(model.vector, texts)))))
    embed_texts(model, texts, batch_size=2)
    assert model.calls[-1]["batch_size"] == 2
    # no texts: no rows (and no call), still a [rows, dim] matrix
    empty = embed_texts(model, [])
    assert empty.dim() == 2 and empty.shape[0] == 0 and len(model.calls) == 2


def test_embed_texts_refuses_an_encoder_output_that_is_not_a_matrix():
    for result, got in ((torch.ones(3), "Tensor (3,)"), ([[1.0]], "list ()")):
        message = f"model.encode must return a [batch, dim] embedding tensor, got {got}"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            embed_texts(Recorder(result=result), ["a", "b", "c"])


def test_embed_texts_cache_makes_its_folder_and_tells_encoders_apart(tmp_path):
    cache = tmp_path / "new" / "cache"
    first = embed_texts(Recorder(seed=1), ["a", "bb"], cache_dir=cache)
    (path,) = cache.glob("*.npy")
    assert re.fullmatch(r"emb_[0-9a-f]{20}\.npy", path.name), path.name
    again = Recorder(seed=1)
    torch.testing.assert_close(embed_texts(again, ["a", "bb"], cache_dir=cache), first)
    assert again.calls == []  # read back from the cache

    class Other(Recorder):
        pass

    # without a model_key the class names the encoder: another class embeds again
    other = Other(seed=2)
    got = embed_texts(other, ["a", "bb"], cache_dir=cache)
    assert len(other.calls) == 1
    torch.testing.assert_close(got, unit_rows(torch.stack([other.vector("a"), other.vector("bb")])))


def test_a_prompt_goes_to_encode_when_it_takes_one_and_before_each_text_otherwise():
    named = PromptArgument()
    embed_texts(named, ["a", "b"], prompt="query: ")
    assert named.calls == [{"texts": ["a", "b"], "prompt": "query: "}]
    anything = AnyKeywords()
    embed_texts(anything, ["a"], prompt="query: ")
    assert anything.calls[-1]["texts"] == ["a"] and anything.calls[-1]["prompt"] == "query: "
    embed_texts(anything, ["a"], prompt_name="q")
    assert anything.calls[-1]["texts"] == ["a"] and anything.calls[-1]["prompt_name"] == "q"
    for model in (Recorder(), NoSignature()):
        embed_texts(model, ["a", "b"], prompt="query: ")
        assert model.calls[-1]["texts"] == ["query: a", "query: b"]


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        (
            Recorder(),
            {"prompt": "q: ", "prompt_name": "q"},
            "give a prompt or a prompt name, not both",
        ),
        (
            PromptArgument(),
            {"prompt_name": "q"},
            "prompt name 'q': the model has no prompts (a SentenceTransformer saved with "
            "prompts={...} has); give the prompt text itself instead",
        ),
        (
            # prompts, but an encode that cannot take a prompt name
            type("PromptsOnly", (Recorder,), {"prompts": {"q": "query: "}})(),
            {"prompt_name": "q"},
            "prompt name 'q': the model has no prompts (a SentenceTransformer saved with "
            "prompts={...} has); give the prompt text itself instead",
        ),
        (
            type("EmptyPrompts", (AnyKeywords,), {"prompts": {}})(),
            {"prompt_name": "q"},
            "prompt name 'q' is not one of the model's prompts (none)",
        ),
    ],
)
def test_prompt_refusals_carry_their_exact_message(model, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        embed_texts(model, ["a"], **kwargs)


def test_sharded_top_k_in_one_process_returns_global_indices_and_pads_a_small_shard():
    gen = torch.Generator().manual_seed(4)
    queries, corpus = torch.randn(5, 3, generator=gen), torch.randn(12, 3, generator=gen)
    offset, shard = 5, corpus[5:]  # rows [5, 12) of the corpus: 7 rows
    exclude = [{0, 6}, {5, 11}, set(), {7}, {6, 7, 8}]  # global rows (0 lies outside the shard)
    scores, index = sharded_top_k(queries, shard, offset, 9, exclude=exclude)
    # the 7 shard rows ranked by a plain sort, excluded rows at -inf; then -inf / -1 padding
    for i in range(5):
        row = [
            (float(queries[i] @ corpus[j]) if j not in exclude[i] else float("-inf"), j)
            for j in range(offset, 12)
        ]
        row.sort(key=lambda x: -x[0])
        finite = [(s, j) for s, j in row if s > float("-inf")]
        assert index[i, : len(finite)].tolist() == [j for _, j in finite]
        torch.testing.assert_close(scores[i, : len(finite)], torch.tensor([s for s, _ in finite]))
        assert scores[i, 7:].tolist() == [float("-inf")] * 2
        assert index[i, 7:].tolist() == [-1, -1]
    # one neighbour; no exclusions (the loss's top-k without them)
    s1, i1 = sharded_top_k(queries, shard, offset, 1)
    s_all, i_all = chunked_top_k(queries, shard, 1)
    assert torch.equal(i1, i_all + offset) and torch.equal(s1, s_all)


# --- mine_hard_negatives: its defaults, its settings' path to the sampler, its refusals -----------
class Texts:
    """A deterministic random vector per text (as test_mining's FakeModel), recording the
    batch size each encode call received."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def vector(self, text: str) -> torch.Tensor:
        return torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(text.encode())))

    def encode(self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False):
        self.batch_sizes.append(batch_size)
        return torch.stack([self.vector(t) for t in texts])


def ranked_candidates(model, query, corpus, skip):
    """The corpus texts by decreasing cosine with ``query``, without ``skip``."""
    q = torch.nn.functional.normalize(model.vector(query), dim=0)
    cos = {t: float(q @ torch.nn.functional.normalize(model.vector(t), dim=0)) for t in corpus}
    return sorted((t for t in corpus if t not in skip), key=lambda t: -cos[t])


def test_mine_defaults_one_top_negative_per_pair_batches_of_64_and_seed_0():
    model = Texts()
    queries, positives, corpus = pairs()
    rows = mine_hard_negatives(queries, positives, corpus, model=model)
    assert set(model.batch_sizes) == {64}
    assert [r["negative"] for r in rows] == [
        ranked_candidates(model, q, corpus, {p})[0] for q, p in zip(queries, positives)
    ]
    drawn = mine_hard_negatives(queries, positives, corpus, model=model, sampling="random")
    seeded = [
        mine_hard_negatives(queries, positives, corpus, model=model, sampling="random", seed=s)
        for s in (0, 1)
    ]
    assert drawn == seeded[0] and drawn != seeded[1]


def test_positives_outside_the_corpus_are_embedded_and_never_candidates():
    model = Texts()
    queries, positives, corpus = pairs()
    rows = mine_hard_negatives(
        queries, positives, corpus[12:], model=model, output_format="n-tuple", num_negatives=2
    )
    for q, row in zip(queries, rows):
        assert [row["negative_1"], row["negative_2"]] == ranked_candidates(
            model, q, corpus[12:], ()
        )[:2]


def test_the_default_window_is_30_candidates_or_3_per_negative():
    model = Texts()
    queries, positives, corpus = pairs(12, 70)
    for num_negatives, window in ((10, 30), (11, 33)):
        rows = mine_hard_negatives(
            queries, positives, corpus, model=model, sampling="random",
            num_negatives=num_negatives, output_format="n-tuple",
        )  # fmt: skip
        ranks = set()
        for q, p, row in zip(queries, positives, rows):
            order = ranked_candidates(model, q, corpus, {p})
            ranks |= {order.index(row[f"negative_{m + 1}"]) for m in range(num_negatives)}
        # uniform draws of 10 (11) among the window: over 12 queries its last rank comes up
        assert max(ranks) == window - 1, (num_negatives, sorted(ranks))


def test_every_sampler_setting_reaches_the_sampler(monkeypatch):
    from hardneg import mining

    given = dict(
        simans_a=2.0, simans_b=0.1, hcl_beta=3.0, temperature=0.2, ring_rho_out=0.7,
        ring_rho_in=0.2, potential_a=0.8, potential_b=0.05, potential_clamp=0.9,
    )  # fmt: skip
    seen = []
    original = mining.pick_negatives

    def spy(*args, **kwargs):
        seen.append(args[7])  # the options, the one positional argument after the generator
        return original(*args, **kwargs)

    monkeypatch.setattr(mining, "pick_negatives", spy)
    queries, positives, corpus = pairs()
    mine_hard_negatives(queries, positives, corpus, model=Texts(), sampling="ring", **given)
    assert seen == [mining.SamplerOptions(**given)]


class Columns:
    """Anything with column_names is taken for a dataset."""

    column_names = ["anchor", "positive"]


QUERIES, POSITIVES, CORPUS = pairs(4, 24)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((Columns(), POSITIVES), {}, "give either a dataset or queries and positives, not both"),
        ((["a", 3, None], POSITIVES), {}, "queries must hold strings; entry 1 is int"),
        ((QUERIES, None), {}, "positives is required"),
        ((QUERIES, [*POSITIVES[:3], 4.0]), {}, "positives must hold strings; entry 3 is float"),
        (([], []), {}, "no queries to mine for"),
        ((QUERIES, POSITIVES, ["a", 2]), {}, "corpus must hold strings; entry 1 is int"),
        ((QUERIES, POSITIVES, []), {}, "the corpus is empty"),
        ((), {"num_negatives": 1.5}, "num_negatives must be an integer, got 1.5"),
        ((), {"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
        ((), {"query_chunk_size": 1.5}, "query_chunk_size must be an integer, got 1.5"),
        (
            (),
            {"output_format": "x"},
            "output_format must be one of 'triplet', 'n-tuple', 'labeled-pair', 'labeled-list', got 'x'",
        ),
        ((), {"output_scores": 1}, "output_scores must be True or False, got 1"),
        ((), {"query_prompt": 3}, "query_prompt must be a string, got int"),
        ((), {"query_prompt_name": 3}, "query_prompt_name must be a string, got int"),
        ((), {"corpus_prompt": 3}, "corpus_prompt must be a string, got int"),
        ((), {"corpus_prompt_name": 3}, "corpus_prompt_name must be a string, got int"),
        (
            (),
            {"corpus_prompt": "a", "corpus_prompt_name": "b"},
            "give corpus_prompt or corpus_prompt_name, not both",
        ),
        (
            (),
            {"sampling": "hard"},
            "sampling must be one of 'top', 'random', 'simans', 'hcl', 'ring', 'potential', got 'hard'",
        ),
        ((), {"range_min": -1}, "range_min must be in [0, inf), got -1"),
        ((), {"range_min": 1.5}, "range_min must be an integer, got 1.5"),
        ((), {"range_max": 0}, "range_max must be in [1, inf), got 0"),
        ((), {"range_max": 2.5}, "range_max must be an integer, got 2.5"),
        ((), {"range_min": 3, "range_max": 3}, "range_max (3) must be larger than range_min (3)"),
        (
            (),
            {"range_min": 2, "range_max": 3, "num_negatives": 2},
            "the window [range_min, range_max) = [2, 3) holds fewer candidates than num_negatives = 2",
        ),
        ((), {"absolute_margin": -0.1}, "absolute_margin must be in [0, inf), got -0.1"),
        ((), {"relative_margin": -0.1}, "relative_margin must be in [0, inf), got -0.1"),
        (
            (),
            {"min_score": 0.9, "max_score": 0.1},
            "min_score (0.9) is above max_score (0.1): no score can pass both; min_score must be <= max_score",
        ),
    ],
)
def test_mining_refusals_carry_their_exact_message(args, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        mine_hard_negatives(*(args or (QUERIES, POSITIVES, CORPUS)), model=Texts(), **kwargs)


def test_a_window_of_one_rank_mines_the_top_candidate():
    model = Texts()
    rows = mine_hard_negatives(QUERIES, POSITIVES, CORPUS, model=model, range_max=1)
    assert [r["negative"] for r in rows] == [
        ranked_candidates(model, q, CORPUS, {p})[0] for q, p in zip(QUERIES, POSITIVES)
    ]


def test_the_stats_time_each_stage_and_average_the_mined_scores():
    model = Texts()
    before = time.perf_counter()
    rows, stats = mine_hard_negatives(
        QUERIES, POSITIVES, CORPUS, model=model, num_negatives=2, output_scores=True,
        output_format="n-tuple", return_stats=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - before
    # stage durations: each within the call (not a clock reading), no other key
    assert set(stats.seconds) == {"embed", "top_k", "select"}
    assert all(0.0 <= v <= elapsed for v in stats.seconds.values()), stats.seconds
    negatives = [s for r in rows for s in r["scores"][1:]]
    assert stats.mean_negative_score == pytest.approx(sum(negatives) / len(negatives), abs=1e-6)
    assert stats.mean_positive_score == pytest.approx(
        sum(r["scores"][0] for r in rows) / len(rows), abs=1e-6
    )


class Twins(Texts):
    """``'copy of X'`` embeds exactly as ``X``: a candidate scoring exactly as a positive."""

    def vector(self, text: str) -> torch.Tensor:
        return super().vector(text.removeprefix("copy of "))


def test_score_bounds_and_margins_are_inclusive():
    model = Twins()
    queries, positives, corpus = pairs(4, 24)
    corpus = [*corpus, *(f"copy of {p}" for p in positives)]
    kwargs = dict(model=model, num_negatives=1, output_scores=True)
    # margin 0 keeps the twin of the positive (s = s_pos exactly): it is every query's top
    for margin in ("absolute_margin", "relative_margin"):
        rows = mine_hard_negatives(queries, positives, corpus, **kwargs, **{margin: 0.0})
        assert [r["negative"] for r in rows] == [f"copy of {p}" for p in positives], margin
    # a bound equal to a candidate's score keeps that candidate (one pair per call, so that
    # every call computes the same float32 scores)
    for q, p in zip(queries, positives):
        (row,) = mine_hard_negatives([q], [p], corpus, **kwargs)
        s = row["scores"][1]
        (at_max,) = mine_hard_negatives([q], [p], corpus, max_score=s, **kwargs)
        (at_min,) = mine_hard_negatives([q], [p], corpus, min_score=s, **kwargs)
        assert at_max["negative"] == at_min["negative"] == row["negative"]


@pytest.mark.parametrize("bound", [{"max_score": 1.0}, {"absolute_margin": 0.0}])
def test_a_bound_never_brings_back_an_excluded_row(bound):
    # anchor 'q' is listed with 4 positives, 'r' with 1: the window (5 ranks, what 'r' can
    # have) holds 'q''s 2 candidates and 3 excluded rows (-inf), which no bound may keep
    corpus = ["p0", "p1", "p2", "p3", "x", "y"]
    queries, positives = ["q"] * 4 + ["r"], ["p0", "p1", "p2", "p3", "x"]
    rows = mine_hard_negatives(queries, positives, corpus, model=Texts(), num_negatives=3, **bound)
    of_q = [r for r in rows if r["anchor"] == "q"]
    assert of_q and {r["negative"] for r in of_q} <= {"x", "y"}


def test_positives_outside_the_corpus_are_embedded_with_the_corpus_prompt():
    model = Texts()
    queries, positives, corpus = pairs()
    rows = mine_hard_negatives(
        queries, positives, corpus[12:], model=model, corpus_prompt="passage: ",
        output_scores=True,
    )  # fmt: skip
    for q, p, row in zip(queries, positives, rows):
        want = torch.nn.functional.cosine_similarity(
            model.vector(q), model.vector("passage: " + p), dim=0
        )
        assert row["scores"][0] == pytest.approx(float(want), abs=1e-5)


def test_sampler_options_refuse_what_no_strategy_class_checks_with_the_exact_message():
    for kwargs, message in [
        ({"temperature": 0.0}, "temperature must be in (0, inf), got 0.0"),
        ({"potential_a": -1.0}, "potential_a must be in [0, inf), got -1.0"),
        ({"potential_clamp": 0.0}, "potential_clamp must be in (0, 1], got 0.0"),
        ({"potential_clamp": -0.5}, "potential_clamp must be in (0, 1], got -0.5"),
    ]:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            SamplerOptions(**kwargs)
    assert SamplerOptions(potential_a=0.0, potential_clamp=1.0).potential_clamp == 1.0


def test_pick_negatives_refusals_carry_their_exact_message():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 4, generator=gen).sort(dim=1, descending=True).values
    args = (torch.randn(2, 3), scores, scores[:, :1], torch.ones(2, 4, dtype=torch.bool), 1, gen)
    both = "give the sampler settings either as options or as keywords, not both"
    with pytest.raises(ValueError, match="^" + re.escape(both) + "$"):
        pick_negatives("top", *args, SamplerOptions(), simans_a=2.0)
    name = (
        "sampling must be one of 'top', 'random', 'simans', 'hcl', 'ring', 'potential', got 'hard'"
    )
    with pytest.raises(ValueError, match="^" + re.escape(name) + "$"):
        pick_negatives("hard", *args)
    with pytest.raises(
        ValueError, match="^" + re.escape("k = 5 is larger than the corpus (4 entries)") + "$"
    ):
        chunked_top_k(torch.randn(2, 3), torch.randn(4, 3), 5)


@pytest.mark.parametrize("sampling", ["random", "simans", "hcl", "ring", "potential"])
def test_every_draw_comes_from_the_seed_alone(sampling):
    # the global generator moved between the calls: the same seed, the same rows
    queries, positives, corpus = pairs()
    kwargs = dict(model=Texts(), sampling=sampling, num_negatives=3, seed=7)
    torch.manual_seed(0)
    first = mine_hard_negatives(queries, positives, corpus, **kwargs)
    torch.manual_seed(1)
    torch.rand(100)
    assert mine_hard_negatives(queries, positives, corpus, **kwargs) == first


def test_a_min_score_above_every_candidate_mines_nothing():
    model = Texts()
    q, p = QUERIES[:1], POSITIVES[:1]
    (row,) = mine_hard_negatives(q, p, CORPUS, model=model, output_scores=True)
    above = row["scores"][1] + 1e-3  # the top candidate's score, and a little more
    assert mine_hard_negatives(q, p, CORPUS, model=model, min_score=above) == []
