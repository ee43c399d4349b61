"""``mine_hard_negatives`` against sentence-transformers' own ``util.mine_hard_negatives`` on
the same tiny local model and data: ``include_positives`` (rankings with the positives in
place, for reranking sets), ``verbose``, and the rows with the top sampler. Tiny local models
only (no hub)."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("sentence_transformers")

from _text_models import sentences, tiny_model  # noqa: E402

from hardneg.mining import mine_hard_negatives  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("bert"))


def texts(n: int = 120, seed: int = 7) -> list[str]:
    out = list(dict.fromkeys(sentences(2 * n, seed=seed)))[:n]
    assert len(out) == n
    return out


def st_rows(data, model, **options) -> list[dict]:
    from sentence_transformers.util import mine_hard_negatives as st_mine

    return [dict(row) for row in st_mine(data, model, verbose=False, **options)]


def ranking(model, query: str, candidates: list[str], skip: set[str]) -> list[str]:
    """``candidates`` by decreasing cosine with ``query`` (float64), without ``skip``."""
    emb = model.encode([query, *candidates], convert_to_tensor=True).double()
    emb = torch.nn.functional.normalize(emb, dim=1)
    cos = (emb[1:] @ emb[0]).tolist()
    order = sorted(range(len(candidates)), key=lambda j: -cos[j])
    return [candidates[j] for j in order if candidates[j] not in skip]


def test_include_positives_ranks_the_positives_in_place_as_sentence_transformers(model):
    """``include_positives`` was refused ("not offered"). With it, each pair's row holds its
    ``num_negatives`` best candidates with its positives among them, as
    sentence-transformers' rows: an anchor with two positives (adjacent rows), a query whose
    text is in the corpus (never its own candidate), a query that is its own positive (its text
    is a candidate), positives missing from the corpus (added), with and without scores."""
    from datasets import Dataset

    t = texts()
    queries, positives, extra = t[:16], t[16:32], t[32:100]
    queries[5] = queries[4]  # an anchor with two positives
    positives[9] = queries[9]  # a query that is its own positive
    for i in (0, 2, 4, 8, 10, 13):  # positives near their query: they rank among its first
        positives[i] = queries[i] + " red"
    corpus = positives[:8] + extra + queries[10:13]  # positives 8..15 left out; 3 queries in
    data = Dataset.from_dict({"anchor": queries, "positive": positives})
    for options in (
        {"num_negatives": 4},
        {"num_negatives": 3, "output_scores": True},
        {"num_negatives": 5, "range_min": 2, "range_max": 12},
    ):
        ours = mine_hard_negatives(data, model, corpus=corpus, include_positives=True, **options)
        theirs = st_rows(data, model, corpus=corpus, include_positives=True, **options)
        assert len(ours) == len(theirs) == 16
        for mine, their in zip(ours, theirs):
            assert set(mine) == set(their)
            assert {k: v for k, v in mine.items() if k != "scores"} == {
                k: v for k, v in their.items() if k != "scores"
            }
            if "scores" in their:
                assert mine["scores"] == pytest.approx(their["scores"], abs=1e-5)
    # against a ranking of the cosines: the positives in place, the query's own text out
    rows = mine_hard_negatives(data, model, corpus=corpus, include_positives=True, num_negatives=6)
    candidates = list(dict.fromkeys(corpus + positives))
    in_place = 0
    for row, q, p in zip(rows, queries, positives):
        own = set() if q in {p, *(pp for qq, pp in zip(queries, positives) if qq == q)} else {q}
        want = ranking(model, q, candidates, own)[:6]
        assert [row[f"negative_{m}"] for m in range(1, 7)] == want
        in_place += p in want
    assert in_place >= 4  # the near positives rank among the first six
    assert {row["positive"] for row in rows[8:]} & {row["negative_1"] for row in rows[8:]}
    assert rows[9]["negative_1"] == queries[9]  # its own text, cosine 1


def test_include_positives_takes_the_n_tuple_format_only(model):
    with pytest.raises(ValueError, match=re.escape("output_format='triplet' cannot hold them")):
        mine_hard_negatives(
            ["a b"], ["c d"], ["e f", "g h"], model=model, include_positives=True,
            output_format="triplet",
        )  # fmt: skip
    with pytest.raises(ValueError, match="include_positives"):
        mine_hard_negatives(["a b"], ["c d"], model=model, include_positives="yes")


def test_the_deprecated_n_tuple_scores_format_names_its_spelling_here(model):
    with pytest.raises(ValueError, match=re.escape("output_format='n-tuple', output_scores=True")):
        mine_hard_negatives(["a b"], ["c d"], model=model, output_format="n-tuple-scores")


def test_without_include_positives_the_rows_are_sentence_transformers_own(model):
    """The default still skips every positive of an anchor, as sentence-transformers does
    (``verbose=False``, sentence-transformers' spelling of quiet, was refused before)."""
    from datasets import Dataset

    t = texts(seed=3)
    data = Dataset.from_dict({"anchor": t[:20], "positive": t[20:40]})
    corpus = t[20:40] + t[40:90]
    for fmt in ("triplet", "n-tuple", "labeled-list"):
        options = {"num_negatives": 3, "output_format": fmt, "range_max": 3}
        ours = mine_hard_negatives(data, model, corpus=corpus, verbose=False, **options)
        assert ours == st_rows(data, model, corpus=corpus, **options)


def test_verbose_prints_a_summary_of_the_run(model, capsys):
    t = texts(60, seed=5)
    rows, stats = mine_hard_negatives(
        t[:10], t[10:20], t[10:60], model=model, num_negatives=2, min_score=0.999,
        return_stats=True, verbose=True,
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert f"mined {stats.rows} rows for 10 pairs from a corpus of 50 texts" in printed
    assert f"mean score: positive {stats.mean_positive_score:.4f}" in printed
    assert f"{stats.short_queries} pairs found fewer than 2 negatives" in printed
    assert stats.short_queries > 0  # min_score 0.999 leaves some pairs short
    mine_hard_negatives(t[:10], t[10:20], t[10:60], model=model)
    assert capsys.readouterr().out == ""  # quiet by default


def test_the_rows_keep_a_dataset_s_column_names_as_sentence_transformers(model):
    """The rows were keyed ``anchor`` / ``positive`` whatever the dataset's columns;
    sentence-transformers keeps the dataset's names (here ``query`` / ``answer``)."""
    from datasets import Dataset

    t = texts(seed=11)
    data = Dataset.from_dict({"query": t[:12], "answer": t[12:24]})
    corpus = t[12:24] + t[24:70]
    for fmt in ("triplet", "n-tuple", "labeled-pair", "labeled-list"):
        options = {"num_negatives": 2, "output_format": fmt, "range_max": 2}
        ours = mine_hard_negatives(
            data, model, corpus=corpus, anchor_column="query", positive_column="answer", **options
        )
        theirs = st_rows(
            data, model, corpus=corpus, anchor_column_name="query", positive_column_name="answer",
            **options,
        )  # fmt: skip
        assert ours == theirs and list(ours[0])[:2] == ["query", "answer"], fmt
