"""Mining with a cross-encoder reranking the embedding model's candidates: checked against a
re-statement of the rule (embedding top range_max, reranked, window, margins on the reranker's
scores) with a deterministic fake reranker, and through ``hardneg mine --cross-encoder`` with a
tiny local ``CrossEncoder``."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from test_mining import FakeModel, data, scores_of

from hardneg.mining import load_rows, mine_hard_negatives


class FakeReranker:
    """A fixed score in [0, 1) per (query, text) pair; counts the pairs it is asked."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    @staticmethod
    def score(query: str, text: str) -> float:
        return (zlib.crc32(f"{query}|{text}".encode()) % 10_000) / 10_000

    def predict(self, pairs, batch_size=32, show_progress_bar=False):
        self.pairs.extend(pairs)
        return [self.score(q, t) for q, t in pairs]


def expected_negatives(model, queries, positives, corpus, range_min, range_max, count, margin):
    """The rule restated: per query, the embedding model's range_max best corpus texts (its
    positive left out), ordered by the reranker, its range_min best skipped, those within the
    margin below the reranked positive kept, the first ``count`` taken."""
    s = scores_of(model, queries, corpus)
    out = []
    for i, (query, positive) in enumerate(zip(queries, positives)):
        order = [j for j in s[i].argsort(descending=True).tolist() if corpus[j] != positive]
        pool = [corpus[j] for j in order[:range_max]]
        ranked = sorted(pool, key=lambda t: -FakeReranker.score(query, t))[range_min:]
        top = FakeReranker.score(query, positive)
        kept = [t for t in ranked if margin is None or FakeReranker.score(query, t) <= top - margin]
        out.append(kept[:count])
    return out


@pytest.mark.parametrize("range_min, margin", [(0, None), (2, None), (0, 0.05)])
def test_the_reranker_orders_the_embedding_models_candidates(range_min, margin):
    model, reranker = FakeModel(), FakeReranker()
    queries, positives, corpus = data()
    rows = mine_hard_negatives(
        queries, positives, corpus, model=model, cross_encoder=reranker, num_negatives=3,
        range_min=range_min, range_max=12, absolute_margin=margin, output_format="triplet",
        output_scores=True,
    )  # fmt: skip
    want = expected_negatives(model, queries, positives, corpus, range_min, 12, 3, margin)
    got: dict[str, list[str]] = {}
    for row in rows:
        got.setdefault(row["anchor"], []).append(row["negative"])
        q = row["anchor"]
        # the scores written are the reranker's, positive first
        assert row["scores"] == pytest.approx(
            [FakeReranker.score(q, row["positive"]), FakeReranker.score(q, row["negative"])]
        )
    assert [got.get(q, []) for q in queries] == want
    # without the reranker the same call picks by cosine: another choice on these data
    plain = mine_hard_negatives(
        queries, positives, corpus, model=model, num_negatives=3, range_min=range_min,
        range_max=12, absolute_margin=margin,
    )  # fmt: skip
    assert [r["negative"] for r in plain] != [r["negative"] for r in rows]


def test_a_query_with_two_positives_is_reranked_once_and_neither_positive_is_its_negative():
    model, reranker = FakeModel(), FakeReranker()
    queries, positives, corpus = data()
    queries, positives = [*queries, queries[0]], [*positives, positives[1]]
    rows = mine_hard_negatives(
        queries, positives, corpus, model=model, cross_encoder=reranker, num_negatives=2,
        range_max=10, output_format="n-tuple",
    )  # fmt: skip
    first = [r for r in rows if r["anchor"] == queries[0]]
    assert len(first) == 2 and first[0]["negative_1"] == first[1]["negative_1"]
    for row in first:
        assert {row["negative_1"], row["negative_2"]}.isdisjoint({positives[0], positives[1]})
    candidate_pairs = reranker.pairs[: -len(queries)]  # then one pair per (query, positive)
    assert len(candidate_pairs) == len(set(candidate_pairs)) == 10 * (len(queries) - 1)
    assert reranker.pairs[-len(queries) :] == list(zip(queries, positives))


class Broken:
    def __init__(self, result) -> None:
        self.result = result

    def predict(self, pairs, **kwargs):
        return self.result(len(pairs))


@pytest.mark.parametrize(
    "reranker, message",
    [
        (object(), "cross_encoder must have a predict"),
        (Broken(lambda n: torch.zeros(n, 2)), r"scores of shape \(\d+, 2\) for \d+ pairs"),
        (Broken(lambda n: [float("nan")] * n), "a NaN or infinite score"),
    ],
)
def test_a_reranker_that_gives_no_single_finite_score_per_pair_is_named(reranker, message):
    queries, positives, corpus = data()
    with pytest.raises(ValueError, match=message):
        mine_hard_negatives(queries, positives, corpus, model=FakeModel(), cross_encoder=reranker)


def tiny_cross_encoder(directory):
    """A two-layer BERT with one output (a reranker), saved as a ``CrossEncoder``."""
    from _text_models import WORDS
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=1,
                        max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(3)
    BertForSequenceClassification(config).save_pretrained(directory / "hf")
    tokenizer.save_pretrained(directory / "hf")
    reranker = CrossEncoder(str(directory / "hf"), device="cpu")
    reranker.save(str(directory / "model"))
    return directory / "model"


def test_cli_mine_reranks_with_a_local_cross_encoder(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    from _text_models import sentences, tiny_model
    from sentence_transformers import CrossEncoder

    from hardneg.cli import main

    model_dir = tmp_path / "embedder"
    tiny_model(tmp_path, seed=1).save(str(model_dir))
    reranker_dir = tiny_cross_encoder(tmp_path / "reranker")
    texts = list(dict.fromkeys(sentences(300, seed=4)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"anchor": texts[i], "positive": texts[20 + i]}) + "\n" for i in range(20)
        )
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts[20:120]) + "\n")
    out = tmp_path / "mined.jsonl"
    code = main(["mine", "--data", str(pairs), "--corpus", str(corpus), "--model", str(model_dir),
                 "--cross-encoder", str(reranker_dir), "--num-negatives", "2", "--range-max", "8",
                 "--format", "n-tuple", "--output-scores", "--output", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = load_rows(out)
    assert len(rows) == 20
    reranker = CrossEncoder(str(reranker_dir), device="cpu")
    for row in rows:
        docs = [row["positive"], row["negative_1"], row["negative_2"]]
        want = reranker.predict([(row["anchor"], d) for d in docs])
        assert row["scores"] == pytest.approx([float(w) for w in want], abs=1e-5)
        assert row["scores"][1] >= row["scores"][2]  # the reranker's order
    assert "rescore" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--model", "--cross-encoder"])
def test_cli_mine_refuses_a_model_path_that_is_missing_before_reading_the_data(
    tmp_path, monkeypatch, capsys, option
):
    import hardneg.text.models as models
    from hardneg.cli import main

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "_load", never)
    missing = tmp_path / "no-such-model"
    argv = ["mine", "--data", str(tmp_path / "not-read.jsonl"), option, str(missing),
            "--output", str(tmp_path / "o.jsonl")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"model {str(missing)!r} is written as a path but that is missing" in err
    (tmp_path / "a-file").write_text("x")
    argv[argv.index(str(missing))] = str(tmp_path / "a-file")
    assert main(argv) == 2
    assert "is written as a path but that is a file, not a folder" in capsys.readouterr().err
