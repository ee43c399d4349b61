"""BEIR-format folders (written by the tests): the reader, the retrieval measures against
sentence-transformers' InformationRetrievalEvaluator and hand-computed trec_eval values, and
``hardneg eval`` / ``hardneg mine`` / ``hardneg train`` on a folder."""

from __future__ import annotations

import json
import logging
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hardneg.text.beir import (
    evaluate_beir,
    is_beir_folder,
    load_beir,
    load_beir_splits,
    rank_documents,
    retrieval_scores,
    splits,
)

torch.set_num_threads(1)


def write_beir(
    folder: Path,
    corpus: list[dict],
    queries: list[dict],
    qrels: dict[str, list[tuple[str, str, int]]],
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t{s}" for q, d, s in rows)]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def small_folder(tmp_path: Path) -> Path:
    corpus = [
        {"_id": "d1", "title": "Cats", "text": "the cat sits"},
        {"_id": "d2", "title": "", "text": "a dog runs"},
        {"_id": 3, "text": "birds sing"},  # a numeric id, no title
    ]
    queries = [
        {"_id": "q1", "text": "cat?"},
        {"_id": "q2", "text": "dog?"},
        {"_id": "q3", "text": "x"},
    ]
    qrels = {
        "test": [("q1", "d1", 2), ("q1", "3", 0), ("q2", "d2", 1)],
        "train": [("q3", "3", 1)],
    }
    return write_beir(tmp_path / "beir", corpus, queries, qrels)


def test_a_split_reads_the_judged_queries_and_the_titled_corpus(tmp_path):
    folder = small_folder(tmp_path)
    assert is_beir_folder(folder) and not is_beir_folder(folder / "qrels")
    assert splits(folder) == ["test", "train"]
    data = load_beir(folder, "test")
    assert data.corpus == {"d1": "Cats the cat sits", "d2": "a dog runs", "3": "birds sing"}
    assert data.queries == {"q1": "cat?", "q2": "dog?"}  # q3 is judged in train only
    assert data.qrels == {"q1": {"d1": 2, "3": 0}, "q2": {"d2": 1}}
    # the grade-0 judgement is no pair
    assert data.pairs() == (["cat?", "dog?"], ["Cats the cat sits", "a dog runs"])
    assert load_beir(folder, "train").pairs() == (["x"], ["birds sing"])


def test_judgements_of_unknown_ids_are_dropped_and_counted(tmp_path, caplog):
    folder = small_folder(tmp_path)
    with (folder / "qrels" / "test.tsv").open("a") as f:
        f.write("q9\td1\t1\nq1\td9\t1\nq2\td8\t1\n")
    with caplog.at_level(logging.WARNING, logger="hardneg.text.beir"):
        data = load_beir(folder, "test")
    assert data.qrels == {"q1": {"d1": 2, "3": 0}, "q2": {"d2": 1}}
    text = caplog.text
    assert "1 queries that queries.jsonl does not hold (e.g. 'q9')" in text
    assert "2 documents that corpus.jsonl does not hold (e.g. 'd8')" in text


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "queries.jsonl").unlink(), "has no queries.jsonl: a BEIR folder holds"),
        (lambda f: None, "has no qrels/dev.tsv; its splits: test, train"),
        (
            lambda f: (f / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\nnot json\n'),
            "corpus.jsonl:2: not a JSON object",
        ),
        (
            lambda f: (f / "corpus.jsonl").write_text('{"id": "d1", "text": "a"}\n'),
            "corpus.jsonl:1: no '_id' (keys: 'id', 'text')",
        ),
        (
            lambda f: (f / "queries.jsonl").write_text('{"_id": "q", "text": 5}\n'),
            "queries.jsonl:1: 'text' must be a string, got int",
        ),
        (
            lambda f: (f / "corpus.jsonl").write_text(
                '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n'
            ),
            "corpus.jsonl:2: document id 'd1' is there twice",
        ),
        (
            lambda f: (f / "qrels" / "dev.tsv").write_text("q1\td1\n"),
            "dev.tsv:1: expected query-id<TAB>corpus-id<TAB>integer score (BEIR) or query iteration "
            "document grade (TREC), got 'q1\\td1'",
        ),
        (
            lambda f: (f / "qrels" / "dev.tsv").write_text(
                "query-id\tcorpus-id\tscore\nq1\td1\thigh\n"
            ),
            "dev.tsv:2: expected query-id<TAB>corpus-id<TAB>integer score",
        ),
        (
            lambda f: (f / "qrels" / "dev.tsv").write_text(
                "query-id\tcorpus-id\tscore\nq7\td1\t1\n"
            ),
            "dev.tsv: no judgement of a query and a document the files hold",
        ),
    ],
)
def test_a_malformed_folder_is_named_with_its_file_and_line(tmp_path, damage, message):
    folder = small_folder(tmp_path)
    damage(folder)
    split = "dev" if "dev.tsv" in message else "test"  # the damaged qrels, or a present split
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_beir(folder, split)
    assert message in str(info.value)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="BEIR folder .*nowhere does not exist"):
        load_beir(tmp_path / "nowhere")


def count_reads(monkeypatch) -> list[str]:
    """A spy on the folder's line reader: the name of each jsonl file read, in order."""
    from hardneg.text import beir

    read, names = beir._jsonl, []

    def spy(path):
        names.append(Path(path).name)
        return read(path)

    monkeypatch.setattr(beir, "_jsonl", spy)
    return names


SMALL_CORPUS = {"d1": "Cats the cat sits", "d2": "a dog runs", "3": "birds sing"}


def test_two_splits_of_a_folder_read_its_corpus_and_queries_once(tmp_path, monkeypatch):
    folder = small_folder(tmp_path)
    reads = count_reads(monkeypatch)
    both = load_beir_splits(folder, ["train", "test", "train"])
    assert reads == ["corpus.jsonl", "queries.jsonl"]
    assert list(both) == ["train", "test"]
    # the small folder's splits, written out (not load_beir's output)
    assert both["test"].corpus == both["train"].corpus == SMALL_CORPUS
    assert both["test"].queries == {"q1": "cat?", "q2": "dog?"}
    assert both["test"].qrels == {"q1": {"d1": 2, "3": 0}, "q2": {"d2": 1}}
    assert both["train"].queries == {"q3": "x"} and both["train"].qrels == {"q3": {"3": 1}}
    # a split that is not there fails before the corpus is read
    reads.clear()
    with pytest.raises(FileNotFoundError, match="has no qrels/dev.tsv; its splits: test, train"):
        load_beir_splits(folder, ["train", "dev"])
    assert reads == []


@pytest.mark.parametrize("same", [True, False])
def test_train_reads_a_folder_named_by_data_and_eval_data_once(tmp_path, monkeypatch, same):
    """``hardneg train data=F eval_data=F`` read F's corpus twice (once per split)."""
    from hardneg.text.train import (
        TextTrainConfig,
        evaluation_folder,
        shared_beir_splits,
        training_columns,
    )

    folder = small_folder(tmp_path)
    other = folder if same else write_beir(
        tmp_path / "copy", [{"_id": "d1", "text": "the cat sits"}], [{"_id": "q1", "text": "c"}],
        {"test": [("q1", "d1", 1)]},
    )  # fmt: skip
    # the same folder in another spelling still counts as the same
    spelled = folder / ".." / folder.name if same else other
    cfg = TextTrainConfig(data=str(folder), eval_data=str(spelled))
    reads = count_reads(monkeypatch)
    train_split, eval_split = shared_beir_splits(cfg)
    names, columns = training_columns(cfg, train_split)
    beir = evaluation_folder(cfg, eval_split)
    assert reads.count("corpus.jsonl") == (1 if same else 2)
    assert names == ["anchor", "positive"] and columns == [["x"], ["birds sing"]]
    if same:
        assert beir.corpus == SMALL_CORPUS and beir.qrels == {
            "q1": {"d1": 2, "3": 0},
            "q2": {"d2": 1},
        }
    else:
        assert beir.corpus == {"d1": "the cat sits"} and beir.qrels == {"q1": {"d1": 1}}


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def test_the_measures_equal_hand_computed_trec_eval_values_with_graded_judgements():
    # one query at angle 0; documents at growing angles rank d0, d1, d2, d3, d4
    query = torch.tensor([unit(0.0)])
    documents = torch.tensor([unit(0.1 * (j + 1)) for j in range(5)])
    grades = {0: 0, 1: 2, 3: 1, 4: 3}  # d0 judged not relevant; d4 the best, ranked last
    out = retrieval_scores(query, documents, [grades], cutoffs=(1, 2, 4))
    dcg = lambda gains: sum(g / math.log2(r + 2) for r, g in enumerate(gains))  # noqa: E731
    assert out["ndcg@4"] == pytest.approx(dcg([0, 2, 0, 1]) / dcg([3, 2, 1]))
    assert out["ndcg@2"] == pytest.approx(dcg([0, 2]) / dcg([3, 2]))
    assert out["ndcg@1"] == 0.0
    assert out["mrr@1"] == 0.0 and out["mrr@2"] == out["mrr@4"] == 0.5
    assert out["recall@2"] == pytest.approx(1 / 3) and out["recall@4"] == pytest.approx(2 / 3)
    assert out["precision@4"] == 0.5 and out["precision@2"] == 0.5
    # map_cut: (1/2 + 2/4) over the query's 3 relevant documents (not over min(k, 3))
    assert out["map@4"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert out["map@2"] == pytest.approx((1 / 2) / 3)  # 3 relevant, more than k = 2
    assert out["queries"] == 1 and out["documents"] == 5


def test_a_query_without_a_relevant_document_is_not_scored():
    query = torch.tensor([unit(0.0), unit(1.0)])
    documents = torch.tensor([unit(0.0), unit(1.0)])
    out = retrieval_scores(query, documents, [{0: 1}, {1: 0}], cutoffs=(1,))
    assert out["queries"] == 1 and out["mrr@1"] == 1.0
    with pytest.raises(ValueError, match="no query has a relevant document"):
        retrieval_scores(query, documents, [{0: 0}, {}], cutoffs=(1,))
    with pytest.raises(ValueError, match="cutoffs must be integers >= 1"):
        retrieval_scores(query, documents, [{0: 1}, {}], cutoffs=(0,))


def test_a_document_with_the_query_id_is_not_retrieved_as_beir_ignores_identical_ids(tmp_path):
    corpus = [{"_id": "a", "text": "red car"}, {"_id": "b", "text": "blue car"}]
    queries = [{"_id": "a", "text": "red car"}]
    folder = write_beir(tmp_path / "dup", corpus, queries, {"test": [("a", "b", 1)]})
    data = load_beir(folder, "test")

    def encode(texts, prompt=None):  # "red car" and its own copy are identical
        return np.array([[1.0, 0.0] if t == "red car" else [0.6, 0.8] for t in texts])

    assert evaluate_beir(encode, data, cutoffs=(1,))["mrr@1"] == 1.0
    assert evaluate_beir(encode, data, cutoffs=(1,), ignore_identical_ids=False)["mrr@1"] == 0.0


@pytest.fixture(scope="module")
def model_and_folder(tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    from _text_models import sentences, tiny_model

    root = tmp_path_factory.mktemp("beir")
    model_dir = root / "model"
    tiny_model(root, seed=0).save(str(model_dir))
    texts = list(dict.fromkeys(sentences(600, seed=11)))
    docs, query_texts = texts[:150], texts[150:190]
    rng = np.random.default_rng(0)
    corpus = [{"_id": f"d{j}", "title": "", "text": t} for j, t in enumerate(docs)]
    queries = [{"_id": f"q{i}", "text": t} for i, t in enumerate(query_texts)]
    test, train = [], []
    for i in range(len(queries)):
        for j in rng.choice(len(docs), size=int(rng.integers(1, 4)), replace=False):
            (test if i < 30 else train).append((f"q{i}", f"d{j}", 1))
    folder = write_beir(root / "data", corpus, queries, {"test": test, "train": train})
    return model_dir, folder


def test_binary_measures_equal_sentence_transformers_information_retrieval_evaluator(
    model_and_folder,
):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    from hardneg.text.train import sentence_encoder

    model_dir, folder = model_and_folder
    model = SentenceTransformer(str(model_dir), device="cpu")
    data = load_beir(folder, "test")
    ours = evaluate_beir(sentence_encoder(model), data, cutoffs=(1, 10, 100))
    relevant = {q: {d for d, g in judged.items() if g > 0} for q, judged in data.qrels.items()}
    evaluator = InformationRetrievalEvaluator(
        data.queries, data.corpus, relevant, mrr_at_k=[1, 10], ndcg_at_k=[10, 100],
        precision_recall_at_k=[1, 10, 100], map_at_k=[10, 100], accuracy_at_k=[1], name="t",
        write_csv=False,
    )  # fmt: skip
    theirs = evaluator(model)
    for ours_key, their_key in [
        ("mrr@10", "t_cosine_mrr@10"),
        ("mrr@1", "t_cosine_accuracy@1"),
        ("ndcg@10", "t_cosine_ndcg@10"),
        ("ndcg@100", "t_cosine_ndcg@100"),
        ("recall@10", "t_cosine_recall@10"),
        ("recall@100", "t_cosine_recall@100"),
        ("precision@10", "t_cosine_precision@10"),
        ("map@100", "t_cosine_map@100"),  # at most 3 relevant < 100: both divide by it
        ("map@10", "t_cosine_map@10"),
    ]:
        assert ours[ours_key] == pytest.approx(theirs[their_key], abs=1e-6), ours_key
    assert 0.0 < ours["ndcg@10"] < 1.0 and ours["queries"] == 30


def test_eval_mine_and_train_read_a_beir_folder(model_and_folder, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from hardneg.cli import main
    from hardneg.mining import load_rows
    from hardneg.text.train import sentence_encoder

    model_dir, folder = model_and_folder
    # eval: the measures of evaluate_beir on the split asked for
    assert (
        main(["eval", "--modality", "text", str(model_dir), "--data", str(folder), "--json"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    model = SentenceTransformer(str(model_dir), device="cpu")
    expected = evaluate_beir(sentence_encoder(model), load_beir(folder, "test"))
    assert printed["split"] == "test"
    for key in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
        assert printed[key] == pytest.approx(expected[key], abs=1e-6)
    assert main(["eval", "--modality", "text", str(model_dir), "--data", str(folder)]) == 0
    line = capsys.readouterr().out
    assert "(test: 30 queries, 150 documents)" in line
    assert f"nDCG@10 {expected['ndcg@10']:.4f}, MRR@10 {expected['mrr@10']:.4f}" in line

    # mine: pairs of the train split, negatives from the whole corpus, never a judged positive
    out = tmp_path / "mined.jsonl"
    code = main(["mine", "--data", str(folder), "--split", "train", "--model", str(model_dir),
                 "--num-negatives", "2", "--format", "n-tuple", "--output", str(out)])  # fmt: skip
    assert code == 0
    rows = load_rows(out)
    train = load_beir(folder, "train")
    positives_of: dict[str, set[str]] = {}
    for anchor, positive in zip(*train.pairs()):
        positives_of.setdefault(anchor, set()).add(positive)
    assert len(rows) == len(train.pairs()[0])
    all_positives = {p for ps in positives_of.values() for p in ps}
    negatives = [row[key] for row in rows for key in ("negative_1", "negative_2")]
    assert not any(n in positives_of[row["anchor"]] for row in rows for n in
                   (row["negative_1"], row["negative_2"]))  # fmt: skip
    assert any(n not in all_positives for n in negatives)  # the corpus, not only the positives
    code = main(["mine", "--data", str(folder), "--corpus", str(out), "--model", str(model_dir),
                 "--output", str(tmp_path / "x.jsonl")])  # fmt: skip
    assert code == 2
    assert (
        "--corpus is for files of rows; the BEIR folder's corpus.jsonl" in capsys.readouterr().err
    )


def test_train_reads_the_pairs_of_a_beir_split(model_and_folder, tmp_path, capsys):
    from hardneg.cli import main

    model_dir, folder = model_and_folder
    out = tmp_path / "run"
    args = ["train", "--modality", "text", "--no-progress", f"data={folder}", "split=test",
            f"model={model_dir}", "max_steps=2", "batch_size=8", "dev_fraction=0.25",
            "threads=1", "--run-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    pairs = len(load_beir(folder, "test").pairs()[0])  # every test judgement has grade 1
    assert metrics["train_rows"] + metrics["dev_rows"] == pairs
    assert metrics["dev_rows"] == round(0.25 * pairs)
    # what the docs list, and no empty trainer/ folder of the Trainer's output_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "history.csv", "metrics.json", "model",
    ]  # fmt: skip
    # a file of rows takes no split; a folder takes no columns
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"anchor": "a b", "positive": "c d"}) + "\n")
    capsys.readouterr()
    bad = ["train", "--modality", "text", f"data={rows}", "split=test", f"model={model_dir}"]
    assert main(bad) == 2
    assert "split= names a qrels split of a BEIR folder" in capsys.readouterr().err
    bad = ["train", "--modality", "text", f"data={folder}", "columns=a,b", f"model={model_dir}"]
    assert main(bad) == 2
    assert "columns= is for a file of rows" in capsys.readouterr().err


def test_train_scores_a_beir_split_before_and_after_training(
    model_and_folder, tmp_path, capsys, monkeypatch
):
    from sentence_transformers import SentenceTransformer

    from hardneg.cli import main
    from hardneg.text.train import sentence_encoder

    model_dir, folder = model_and_folder
    out = tmp_path / "run"
    reads = count_reads(monkeypatch)
    args = ["train", "--modality", "text", "--no-progress", f"data={folder}", f"eval_data={folder}",
            f"model={model_dir}", "max_steps=2", "batch_size=8", "lr=1e-3", "threads=1",
            "--run-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    assert reads == ["corpus.jsonl", "queries.jsonl"]  # one read for the train and test splits
    metrics = json.loads((out / "metrics.json").read_text())
    test = load_beir(folder, "test")
    before = evaluate_beir(sentence_encoder(SentenceTransformer(str(model_dir))), test)
    after = evaluate_beir(sentence_encoder(SentenceTransformer(str(out / "model"))), test)
    assert metrics["beir_queries"] == 30 and metrics["beir_documents"] == 150
    for key in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
        assert metrics[f"beir_{key}_before"] == pytest.approx(before[key], abs=1e-6)
        assert metrics[f"beir_{key}_after"] == pytest.approx(after[key], abs=1e-6)
    assert metrics["beir_ndcg@10_before"] != metrics["beir_ndcg@10_after"]  # lr 1e-3 moved it
    printed = capsys.readouterr().out
    assert "(test) before training: nDCG@10" in printed
    before, after = metrics["beir_ndcg@10_before"], metrics["beir_ndcg@10_after"]
    assert f"eval_data nDCG@10 {before:.3f} -> {after:.3f})" in printed  # the closing line
    bad = [
        "train",
        "--modality",
        "text",
        f"data={folder}",
        "eval_data=rows.jsonl",
        f"model={model_dir}",
    ]
    assert main(bad) == 2
    assert "eval_data= takes a BEIR folder" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [1, 3, 7, 40])
def test_ranking_by_chunks_equals_a_full_sort(chunk):
    gen = torch.Generator().manual_seed(0)
    queries, documents = torch.randn(9, 5, generator=gen), torch.randn(23, 5, generator=gen)
    documents[5] = documents[4] * 2.0  # a tie in cosine: the lower row first
    exclude = [None, 3, None, 0, 22, None, 4, None, 1]
    ranked = rank_documents(
        queries, (documents[i : i + chunk] for i in range(0, 23, chunk)), 25, exclude=exclude,
        query_chunk_size=4,
    )  # fmt: skip
    cos = (
        torch.nn.functional.normalize(queries, dim=1)
        @ torch.nn.functional.normalize(documents, dim=1).T
    )
    for i in range(9):
        order = sorted(range(23), key=lambda j: (-cos[i, j].item(), j))
        order = [j for j in order if j != exclude[i]]
        assert ranked[i].tolist() == order + [-1] * (25 - len(order))


def test_evaluate_beir_embeds_the_corpus_chunk_by_chunk(tmp_path):
    corpus = [{"_id": f"d{j}", "text": f"doc {j}"} for j in range(20)]
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(6)]
    qrels = {"test": [(f"q{i}", f"d{(3 * i) % 20}", 1 + i % 2) for i in range(6)]}
    data = load_beir(write_beir(tmp_path / "b", corpus, queries, qrels), "test")
    calls = []

    def encode(texts, prompt=None):
        calls.append(len(texts))
        rng = [np.random.default_rng(zlib.crc32(t.encode())) for t in texts]
        return np.stack([r.normal(size=4) for r in rng])

    chunked = evaluate_beir(encode, data, corpus_chunk_size=6)
    assert calls == [6, 6, 6, 6, 2]  # the queries, then the corpus in chunks of 6
    calls.clear()
    whole = evaluate_beir(encode, data)
    assert calls == [6, 20] and chunked == whole
    with pytest.raises(ValueError, match="corpus_chunk_size"):
        evaluate_beir(encode, data, corpus_chunk_size=0)


def test_trec_qrels_with_four_columns_are_read_as_beir_s_three(tmp_path):
    folder = small_folder(tmp_path)
    # TREC / MS MARCO: query iteration document grade, spaces or tabs, no header
    (folder / "qrels" / "trec.tsv").write_text("q1 0 d1 2\nq1\t0\t3\t0\n\nq2 Q0 d2 1\n")
    assert load_beir(folder, "trec").qrels == load_beir(folder, "test").qrels


def tie_order(row: list[float], k: int) -> list[int]:
    """The ``k`` best columns of ``row``: descending, equal scores lower column first (plain
    Python; -inf last, in column order too)."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]


@pytest.mark.parametrize("k", [1, 4, 9, 30])
def test_stable_top_k_keeps_a_full_stable_sort_s_order_among_many_ties(k):
    """``stable_top_k`` (topk, then only the tied rows sorted) replaced a full stable sort of
    every merge; scores of four values and -inf tie almost everywhere, and at the k-th place."""
    from hardneg.mining import stable_top_k

    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (40, 30), generator=gen).double()
    scores[torch.rand(40, 30, generator=gen) < 0.3] = float("-inf")
    scores[5] = float("-inf")  # a row of -inf only
    scores[6] = torch.arange(30.0)  # no tie at all
    scores[7, :] = 1.0
    picked = stable_top_k(scores, k)
    assert [picked[i].tolist() for i in range(40)] == [
        tie_order(scores[i].tolist(), k) for i in range(40)
    ]
    # NaN ranks first in torch's descending sort, and topk picks among NaNs in no promised
    # order: such a row is sorted whole, as before
    scores[8, ::2] = float("nan")
    want = torch.sort(scores[8], descending=True, stable=True).indices[:k]
    assert stable_top_k(scores, k)[8].tolist() == want.tolist()


@pytest.mark.parametrize("chunk", [2, 5, 30])
def test_the_stable_merge_ranks_many_ties_as_one_full_sort(chunk):
    """``merge_top_k(stable=True)`` over chunks, with ties across and within chunks and
    excluded rows, against one ranking of the whole score matrix in plain Python."""
    from hardneg.mining import merge_top_k

    gen = torch.Generator().manual_seed(chunk)
    # small integers: exact dot products in any blocking, many of them equal
    documents = torch.randint(-2, 3, (30, 4), generator=gen).float()
    queries = torch.randint(-2, 3, (7, 4), generator=gen).float()
    exclude = [{0, 4}, set(), {29}, {1, 2, 3}, set(), {10}, set()]
    scores, rows = merge_top_k(
        queries, (documents[i : i + chunk] for i in range(0, 30, chunk)), 12, exclude=exclude,
        query_chunk_size=3, stable=True,
    )  # fmt: skip
    full = (queries @ documents.T).tolist()
    for i in range(7):
        row = [float("-inf") if j in exclude[i] else s for j, s in enumerate(full[i])]
        assert rows[i].tolist() == tie_order(row, 12)
        assert scores[i].tolist() == [row[j] for j in tie_order(row, 12)]
