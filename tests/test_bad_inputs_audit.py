"""Bad inputs found by the session-17 audit of the public API: each one used to end in a stack
trace from inside torch (or pathlib, pyarrow, numpy), a silent NaN or a silently wrong result.
Every test pins the error type and the part of the message that says what was wrong and what
is allowed."""

from __future__ import annotations

import re

import pytest
import torch

import hardneg


def raises(message: str, error: type[Exception] = ValueError):
    """pytest.raises(error) whose message contains ``message`` literally."""
    return pytest.raises(error, match=re.escape(message))


def z(n: int = 4, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ the loss: features


@pytest.mark.parametrize("name", ["hcl", "unremix", "ring"])
def test_h1_and_h2_of_different_widths_are_named(name):
    """Different widths reached torch.cat ("Sizes of tensors must match") when the standard
    contrast set stacks [h1; h2]."""
    with raises("h1 and h2 must have the same shape, got (4, 5) and (4, 3)"):
        hardneg.create_loss(name)(z(), z(seed=1), h1=z(4, 5), h2=z(4, 3))


@pytest.mark.parametrize("which", ["h1", "h2"])
def test_features_on_another_device_than_the_embeddings_are_named(which):
    """A feature tensor on another device reached the strategies' arithmetic (on a GPU:
    torch's "Expected all tensors to be on the same device"); 'meta' stands in for a second
    device on a CPU-only machine."""
    h = {"h1": z(4, 5), "h2": z(4, 5, seed=1)}
    h[which] = h[which].to("meta")
    with raises(f"z1 and {which} must be on the same device, got cpu and meta"):
        hardneg.create_loss("unremix")(z(), z(seed=2), **h)


def test_pool_features_on_another_device_than_the_queries_are_named():
    loss_fn = hardneg.create_loss("hcl")
    with raises("q and negative_h must be on the same device, got cpu and meta"):
        loss_fn(z(), z(seed=1), z(10), h1=z(4, 5), negative_h=z(10, 5).to("meta"))


# ------------------------------------------------------------------------ evaluation: kNN


def knn_args(**kwargs):
    g = torch.Generator().manual_seed(0)
    args = {
        "train_features": torch.randn(12, 4, generator=g),
        "train_labels": torch.arange(12) % 3,
        "test_features": torch.randn(5, 4, generator=g),
        "test_labels": torch.arange(5) % 3,
    }
    args.update(kwargs)
    return args


def test_knn_refuses_non_finite_features():
    """A NaN train feature ranked its neighbours arbitrarily and an accuracy came back."""
    from hardneg.evaluation import weighted_knn

    bad = knn_args()["train_features"].clone()
    bad[3, 1] = float("nan")
    with raises("train_features contains 1 NaN or Inf value(s) (first in row 3)"):
        weighted_knn(**knn_args(train_features=bad))
    bad = knn_args()["test_features"].clone()
    bad[2, 0] = float("inf")
    with raises("test_features contains 1 NaN or Inf value(s) (first in row 2)"):
        weighted_knn(**knn_args(test_features=bad))


def test_knn_refuses_fractional_labels_and_labels_that_cannot_be_predicted():
    """Float labels were truncated by .long() (0.5 voted for class 0); a test label outside
    [0, num_classes) counted as a miss, so -1 rows lowered the accuracy without a word."""
    from hardneg.evaluation import weighted_knn

    with raises("train_labels must hold integer class ids, got dtype torch.float32"):
        weighted_knn(**knn_args(train_labels=torch.arange(12) % 3 + 0.5))
    with raises("test labels must be in [0, 3) (num_classes = 3), got -1"):
        weighted_knn(**knn_args(test_labels=torch.tensor([0, 1, -1, 2, 0])))
    with raises("test labels must be in [0, 3) (num_classes = 3), got 7"):
        weighted_knn(**knn_args(test_labels=torch.tensor([0, 1, 7, 2, 0])), num_classes=3)


def test_knn_refuses_an_empty_test_set_and_settings_of_the_wrong_type():
    """An empty test set failed in max() of its labels; a float k in topk(); a string
    temperature in a comparison with 0; a fractional chunk_size in range()."""
    from hardneg.evaluation import weighted_knn

    empty = knn_args(test_features=torch.zeros(0, 4), test_labels=torch.zeros(0, dtype=torch.long))
    with raises("test_features must have at least 1 rows, got 0"):
        weighted_knn(**empty)
    with raises("k must be an integer, got 2.5"):
        weighted_knn(**knn_args(), k=2.5)
    with raises("temperature must be a number, got '0.1' (str)"):
        weighted_knn(**knn_args(), temperature="0.1")
    with raises("chunk_size must be an integer, got 2.5"):
        weighted_knn(**knn_args(), chunk_size=2.5)
    with raises("num_classes must be an integer, got 3.5"):
        weighted_knn(**knn_args(), num_classes=3.5)
    with raises("train_features must be a torch.Tensor, got list"):
        weighted_knn(**knn_args(train_features=[[0.0] * 4] * 12))
    # whole numbers written as floats (a YAML 5.0) still work, as before
    assert weighted_knn(**knn_args(), k=5.0, chunk_size=2.0) == weighted_knn(**knn_args(), k=5)


def test_topk_accuracy_refuses_no_cut_off_and_mismatched_labels():
    from hardneg.evaluation import topk_accuracy

    scores = torch.randn(5, 3)
    with raises("ks must be a non-empty tuple of integers >= 1, got ()"):
        topk_accuracy(scores, torch.arange(5) % 3, ks=())
    with raises("ks entries must be in [1, inf), got 0"):
        topk_accuracy(scores, torch.arange(5) % 3, ks=(0,))
    with raises("labels must have shape (5,), got (4,)"):
        topk_accuracy(scores, torch.arange(4) % 3)


# ------------------------------------------------------------------------ evaluation: probe


def probe_args(**kwargs):
    g = torch.Generator().manual_seed(0)
    args = {
        "train_f": torch.randn(12, 4, generator=g),
        "train_y": torch.arange(12) % 3,
        "test_f": torch.randn(6, 4, generator=g),
        "test_y": torch.arange(6) % 3,
        "max_iter": 5,
    }
    args.update(kwargs)
    return args


def test_linear_probe_refuses_non_finite_features():
    """A NaN feature stopped L-BFGS with "value cannot be converted to type float without
    overflow" from inside torch.optim."""
    from hardneg.evaluation import linear_probe

    bad = probe_args()["train_f"].clone()
    bad[5, 2] = float("nan")
    with raises("train_f contains 1 NaN or Inf value(s) (first in row 5)"):
        linear_probe(**probe_args(train_f=bad))


def test_linear_probe_refuses_labels_beyond_num_classes_and_empty_splits():
    """A train label >= num_classes failed inside cross_entropy ("Target 3 is out of bounds");
    a test label beyond it counted as a miss; an empty split failed in min()."""
    from hardneg.evaluation import linear_probe

    with raises("train labels go up to 2 but num_classes=2"):
        linear_probe(**probe_args(), num_classes=2)
    with raises("test labels must be in [0, 3) (num_classes = 3), got -1"):
        linear_probe(**probe_args(test_y=torch.tensor([0, 1, 2, -1, 0, 1])))
    with raises("the probe needs train and test rows, got 12 and 0"):
        linear_probe(**probe_args(test_f=torch.zeros(0, 4), test_y=torch.zeros(0).long()))
    with raises("train_y must hold integer class ids, got dtype torch.float32"):
        linear_probe(**probe_args(train_y=(torch.arange(12) % 3).float()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_decay": float("nan")}, "weight_decay must be finite, got nan"),
        ({"weight_decay": "0.1"}, "weight_decay must be a number, got '0.1' (str)"),
        ({"lr": 0.0}, "lr must be in (0, inf), got 0.0"),
        ({"lr": "1"}, "lr must be a number, got '1' (str)"),
        ({"max_iter": -1}, "max_iter must be in [0, inf), got -1"),
        ({"max_iter": "10"}, "max_iter must be an integer, got '10' (str)"),
        ({"tol": -1.0}, "tol must be in [0, inf), got -1.0"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"device": "tpu"}, "device must be a torch device (cpu, cuda, cuda:1, mps), got 'tpu'"),
        ({"num_classes": 3.5}, "num_classes must be an integer, got 3.5"),
    ],
)
def test_linear_probe_settings_are_checked_before_torch_sees_them(kwargs, message):
    """Each reached torch.optim / manual_seed / torch.device as given: "Invalid learning
    rate", "float division by zero", "manual_seed expected a long", or (a negative max_iter)
    a probe that silently never trained."""
    from hardneg.evaluation import linear_probe

    with raises(message):
        linear_probe(**probe_args(**kwargs))


# ------------------------------------------------------------------------ BEIR evaluation


def beir_folder(tmp_path, *, corpus: bytes | None = None, qrels: bytes | None = None):
    import json

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = "".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(4))
    (folder / "corpus.jsonl").write_bytes(corpus if corpus is not None else docs.encode())
    queries = "".join(json.dumps({"_id": f"q{i}", "text": f"q {i}"}) + "\n" for i in range(2))
    (folder / "queries.jsonl").write_text(queries)
    (folder / "qrels" / "test.tsv").write_bytes(qrels if qrels is not None else b"q0\td0\t1\n")
    return folder


def test_beir_files_that_are_not_utf8_are_named(tmp_path):
    """A bare UnicodeDecodeError ("'utf-8' codec can't decode byte 0xff") named no file."""
    from hardneg.text.beir import load_beir

    folder = beir_folder(tmp_path, corpus=b"\xff\xfe junk\n")
    with raises(
        f"{folder / 'corpus.jsonl'}: not UTF-8 text (invalid start byte); save it as UTF-8"
    ):
        load_beir(folder)
    folder = beir_folder(tmp_path / "b", qrels=b"q0\td0\t1\n\xff\n")
    with raises(f"{folder / 'qrels' / 'test.tsv'}: not UTF-8 text"):
        load_beir(folder)


def test_retrieval_scores_refuse_non_finite_embeddings():
    """NaN query or document embeddings ranked the corpus arbitrarily and scored it."""
    from hardneg.text.beir import retrieval_scores

    q, d = z(2, 8), z(6, 8, seed=1)
    bad = d.clone()
    bad[4, 0] = float("nan")
    with raises("document chunk 0 contains 1 NaN or Inf value(s) (first in row 4)"):
        retrieval_scores(q, bad, [{0: 1}, {1: 1}])
    with raises("query_embeddings contains 8 NaN or Inf value(s) (first in row 1)"):
        retrieval_scores(torch.stack([q[0], torch.full((8,), float("inf"))]), d, [{0: 1}, {1: 1}])
    with raises("query_embeddings must hold real numbers, got dtype torch.complex64"):
        retrieval_scores(q.to(torch.complex64), d, [{0: 1}, {1: 1}])


def test_retrieval_scores_refuse_mismatched_shapes_and_judged_rows_past_the_corpus():
    """A document dim unlike the queries' failed in a matmul; a judged row past the corpus was
    never retrieved and lowered recall silently; an exclude list of another length failed in
    an IndexError."""
    from hardneg.text.beir import retrieval_scores

    q, d = z(2, 8), z(6, 8, seed=1)
    with raises("the corpus rows from row 0 on have shape (6, 7): rows of the queries' dim 8"):
        retrieval_scores(q, z(6, 7), [{0: 1}, {1: 1}])
    with raises("judgements name document row 9, but the corpus has 6 rows"):
        retrieval_scores(q, d, [{0: 1}, {9: 1}])
    with raises("judgements name document row -1, but the corpus has 6 rows"):
        retrieval_scores(q, d, [{-1: 1}, {1: 1}])
    with raises("exclude must hold one entry per query (2), got 1"):
        retrieval_scores(q, d, [{0: 1}, {1: 1}], exclude=[0])
    with raises("query_embeddings must be 2-D (rows x embedding dim), got shape (8,)"):
        retrieval_scores(q[0], d, [{0: 1}])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cutoffs": (2.5,)}, "cutoffs must be integers >= 1, got [2.5]"),
        ({"cutoffs": ("a",)}, "cutoffs must be integers >= 1, got ['a']"),
        ({"cutoffs": 5}, "cutoffs must be a sequence of integers >= 1, got 5"),
        ({"corpus_chunk_size": 0}, "corpus_chunk_size must be in [1, inf), got 0"),
        ({"query_chunk_size": 0}, "query_chunk_size must be in [1, inf), got 0"),
    ],
)
def test_retrieval_scores_settings_are_checked(kwargs, message):
    """A cut-off of 2.5 was truncated to 2; 'a' and 5 failed in int() / iteration naming no
    setting; a chunk size of 0 failed in range()."""
    from hardneg.text.beir import retrieval_scores

    with raises(message):
        retrieval_scores(z(2, 8), z(6, 8, seed=1), [{0: 1}, {1: 1}], **kwargs)


def test_evaluate_beir_refuses_a_bare_prompt_string(tmp_path):
    """prompts="query: " was indexed as a pair: the queries got the prompt "q", the corpus
    "u", and a score came back."""
    from hardneg.text.beir import evaluate_beir, load_beir

    data = load_beir(beir_folder(tmp_path))
    seen = []

    def encode(texts, prompt):
        seen.append(prompt)
        return torch.randn(len(texts), 8)

    with raises("prompts must be a pair (query prompt, corpus prompt) of strings or None"):
        evaluate_beir(encode, data, prompts="query: ")
    assert seen == []  # refused before anything is embedded
    with raises("data must be a BeirData (load_beir(folder)), got dict"):
        evaluate_beir(encode, {"corpus": {}})


# ------------------------------------------------------------------------ mining


class FakeEncoder:
    """``encode`` gives each text a fixed random row; ``broken`` spoils the output."""

    def __init__(self, broken: str = "") -> None:
        self.broken = broken

    def encode(self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False):
        import zlib

        rows = [
            torch.randn(8, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
            for t in texts
        ]
        x = torch.stack(rows)
        if self.broken == "nan":
            x[-1, 0] = float("nan")
        elif self.broken == "short":
            x = x[:-1]
        elif self.broken == "complex":
            x = x.to(torch.complex64)
        elif self.broken == "no_columns":
            x = x[:, :0]
        return x


QUERIES = [f"query {i}" for i in range(6)]
POSITIVES = [f"positive {i}" for i in range(6)]
CORPUS = [f"doc {i}" for i in range(20)]


def mine(**kwargs):
    from hardneg.mining import mine_hard_negatives

    args = {
        "queries": QUERIES,
        "positives": POSITIVES,
        "corpus": CORPUS,
        "model": FakeEncoder(),
        "num_negatives": 2,
    }
    args.update(kwargs)
    return mine_hard_negatives(**args)


def test_mining_refuses_an_encoder_that_returns_nan_or_the_wrong_rows():
    """A NaN embedding was mined as a candidate without a word; a missing row failed in an
    index_put ("shape mismatch: value tensor of shape [25, 8]"); complex or zero-width rows
    ranked silently."""
    with raises("model.encode returned NaN or Inf in the embedding of"):
        mine(model=FakeEncoder("nan"))
    with raises("model.encode returned a (19, 8) torch.float32 tensor for 20 texts"):
        mine(model=FakeEncoder("short"))
    with raises("torch.complex64 tensor for 20 texts: one real embedding row of dim >= 1"):
        mine(model=FakeEncoder("complex"))
    with raises("model.encode returned a (20, 0) torch.float32 tensor for 20 texts"):
        mine(model=FakeEncoder("no_columns"))
    assert len(mine()) == 12  # the working encoder: 2 negatives for each of the 6 queries


def test_mining_refuses_a_bare_string_for_a_list_of_texts():
    """list("abc") mined for the queries "a", "b" and "c" and returned rows."""
    with raises("queries must be a list of texts, got one string ('query')"):
        mine(queries="query", positives="p")
    with raises("corpus must be a list of texts, got one string ('doc 1 doc 2')"):
        mine(corpus="doc 1 doc 2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": "a"}, "seed must be an integer, got 'a' (str)"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        (
            {"seed": 2**70},
            "seed must be in [-9.22337e+18, 1.84467e+19], got 1180591620717411303424",
        ),
        ({"as_dataset": "yes"}, "as_dataset must be True or False, got 'yes'"),
        ({"return_stats": 1}, "return_stats must be True or False, got 1"),
    ],
)
def test_mining_settings_are_checked_before_anything_is_embedded(kwargs, message):
    """A string seed failed in int() naming no setting, 1.5 was read as 1, 2**70 overflowed
    in manual_seed; a truthy string gave a Dataset, 1 a (rows, stats) pair."""
    with raises(message):
        mine(**kwargs)


def test_top_k_merges_check_k_sizes_and_dims():
    """Each failed inside torch or range(): a negative k ("negative dimension -1"), a corpus
    of another dim (a matmul), chunk sizes of 0, an exclude list of another length."""
    from hardneg.mining import chunked_top_k, merge_top_k

    q, c = z(3, 8), z(10, 8, seed=1)
    with raises("k must be in [0, inf), got -1"):
        merge_top_k(q, [c], -1)
    with raises("k must be an integer, got 2.5"):
        merge_top_k(q, [c], 2.5)
    with raises("k must be an integer, got '2' (str)"):  # (compared with the corpus size first)
        chunked_top_k(q, c, "2")
    with raises("the corpus rows from row 4 on have shape (6, 7): rows of the queries' dim 8"):
        merge_top_k(q, [c[:4], z(6, 7)], 2)
    with raises("corpus_chunk_size must be in [1, inf), got 0"):
        chunked_top_k(q, c, 2, corpus_chunk_size=0)
    with raises("query_chunk_size must be in [1, inf), got 0"):
        chunked_top_k(q, c, 2, query_chunk_size=0)
    with raises("exclude must hold one set of rows per query (3), got 1"):
        chunked_top_k(q, c, 2, exclude=[{0}])
    # a float64 corpus beside float32 queries is ranked, not refused (it failed in a matmul)
    scores, rows = chunked_top_k(q, c.double(), 2)
    expected = (q.double() @ c.double().T).topk(2, dim=1)
    torch.testing.assert_close(scores.double(), expected.values, rtol=1e-6, atol=1e-6)
    assert torch.equal(rows, expected.indices)


# ------------------------------------------------------------------------ contrast builders


def test_guided_false_negatives_checks_its_margin_and_guide_embeddings():
    """A string margin failed in a tensor subtraction; a NaN margin masked nothing (every
    comparison with NaN is False) and the loss ran as if no guide were given; a list or a
    complex guide failed inside torch."""
    from hardneg.contrast import guided_false_negatives

    a, c = z(3, 8), z(9, 8, seed=1)
    with raises("margin must be finite, got nan"):
        guided_false_negatives(a, c, margin=float("nan"))
    with raises("margin must be a number, got '0.1' (str)"):
        guided_false_negatives(a, c, margin="0.1")
    with raises("the guide's anchors must be a real-valued torch.Tensor, got list"):
        guided_false_negatives(a.tolist(), c)
    with raises(
        "the guide's candidates must be a real-valued torch.Tensor, got dtype torch.complex64"
    ):
        guided_false_negatives(a, c.to(torch.complex64))
    # a margin given as an int still works (the config's guide_margin: 0)
    assert torch.equal(guided_false_negatives(a, c, margin=0), guided_false_negatives(a, c))


# ------------------------------------------------------------------------ graph data


def test_tu_attributes_that_are_nan_or_inf_are_named(tmp_path):
    """float() reads 'nan' and 'inf': the graphs loaded with NaN node features and every loss
    on them was NaN."""
    from hardneg.graph.data import load_tu

    raw = tmp_path / "BAD" / "raw"
    raw.mkdir(parents=True)
    files = {
        "A": "1, 2\n2, 1\n3, 4\n4, 3\n",
        "graph_indicator": "1\n1\n2\n2\n",
        "graph_labels": "0\n1\n",
        "node_attributes": "0.5, 1\n0.1, nan\n2, 3\n1, 1\n",
    }
    for part, text in files.items():
        (raw / f"BAD_{part}.txt").write_text(text)
    with raises(
        f"{raw / 'BAD_node_attributes.txt'}: line 2: expected finite numbers, got '0.1, nan'"
    ):
        load_tu(tmp_path, "BAD", cache_dir=tmp_path / "cache")
    (raw / "BAD_node_attributes.txt").write_text("0.5, 1\n0.1, 2\n2, 3\n1, 1\n")
    (raw / "BAD_edge_attributes.txt").write_text("1\n-inf\n1\n1\n")
    with raises(f"{raw / 'BAD_edge_attributes.txt'}: line 2: expected finite numbers, got '-inf'"):
        load_tu(tmp_path, "BAD", cache_dir=tmp_path / "cache")
    (raw / "BAD_edge_attributes.txt").write_text("1\n-1.5\n1\n1\n")
    assert load_tu(tmp_path, "BAD", cache_dir=tmp_path / "cache").num_features == 2


# ------------------------------------------------------------------------ configs and the CLI


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    """A bare "'utf-8' codec can't decode byte 0xff" named no file, from the loader and from
    the command line (whose graph-config sniffing read the file first)."""
    from hardneg.cli import main
    from hardneg.config import load_config

    path = tmp_path / "config.yaml"
    path.write_bytes(b"train:\n  epochs: 1\n\xff\xfe\n")
    with raises(f"{path}: not UTF-8 text (invalid start byte); save it as UTF-8"):
        load_config(path)
    assert main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"hardneg train: error: {path}: not UTF-8 text (invalid start byte)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("percent", [95, 1.5, -0.1])
def test_positive_aware_percent_must_be_a_fraction(percent):
    """percent=95 (meant as 95 %) kept every negative whose score is below 95 times the
    positive's: the filter silently did nothing, as a loss and as a filter in front of one."""
    message = f"percent must be a fraction in [0, 1] (0.95 keeps negatives up to 95% of the positive's score), got {percent!r}"
    with raises(message):
        hardneg.create_loss("positive_aware", percent=percent)
    with raises(message):
        hardneg.create_loss("hcl", filter="positive_aware", filter_options={"percent": percent})
    # the ends are fractions: 1 drops only negatives above the positive, 0 those above 0
    for edge in (0, 1.0):
        loss = hardneg.create_loss("positive_aware", percent=edge)(z(), z(seed=1))
        assert torch.isfinite(loss)


def cli_error(capsys, argv: list[str]) -> str:
    """The one error line of ``hardneg ARGV`` (exit status 2, no traceback)."""
    from hardneg.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_mine_names_a_folder_that_is_not_a_beir_folder(tmp_path, capsys):
    """The message was "input must be .jsonl, .parquet, .csv or .txt, got 'data'", and with
    --split "<folder> is a file"."""
    folder = tmp_path / "data"
    folder.mkdir()
    out = str(tmp_path / "out.jsonl")
    expected = (
        f"hardneg mine: error: --data {folder} is a folder without corpus.jsonl: give a rows "
        "file (.jsonl, .parquet, .csv) or a BEIR folder"
    )
    assert cli_error(capsys, ["mine", "--data", str(folder), "--output", out]).startswith(expected)
    line = cli_error(capsys, ["mine", "--data", str(folder), "--output", out, "--split", "dev"])
    assert line.startswith(expected)


def test_compare_refuses_a_negative_tsne_count_before_training(tmp_path, capsys):
    """--tsne-points -5 trained every run and quietly drew no t-SNE, as 0 does."""
    out = tmp_path / "cmp"
    line = cli_error(
        capsys,
        ["compare", "--out", str(out), "--strategies", "infonce", "--tsne-points", "-5"],
    )
    assert line == "hardneg compare: error: --tsne-points must be >= 0 (0 = no t-SNE), got -5"
    assert not out.exists()


def test_graph_scoring_refuses_a_single_class_before_training():
    """A data set whose graphs all share one label trained in full, then failed inside
    scikit-learn's SVM ("The number of classes has to be greater than one")."""
    import numpy as np

    from hardneg.graph.evaluate import check_scorable, evaluate_embeddings

    labels = np.full(12, 3)
    with raises("'TOY': every graph has the label [3]: scoring classifies graphs"):
        check_scorable(labels, "'TOY'")
    with raises("the labels hold a single class: scoring needs at least two classes"):
        evaluate_embeddings(np.random.default_rng(0).normal(size=(12, 4)), labels, folds=3)
    check_scorable(np.array([0, 0, 1, 1]))  # two classes of two graphs: scorable


def test_potential_takes_ids_on_another_device_than_the_embeddings():
    """The contrast builders move ids to the logits' device; potential's own in-batch mask
    compared them where they were (GPU embeddings with host ids: "Expected all tensors to be
    on the same device"). 'meta' embeddings stand in for the GPU on a CPU-only machine (the
    input checks read values, so they are off); every other loss already took them."""
    meta = [torch.empty(6, 8, device="meta") for _ in range(2)]
    ids = torch.tensor([0, 1, 2, 3, 0, 5])
    for name in ("infonce", "hcl"):
        loss = hardneg.create_loss(name, check_inputs=False)(*meta, ids=ids)
        assert loss.device.type == "meta" and loss.dim() == 0
    try:  # the device mismatch was a RuntimeError at the mask; past it, torch has no meta
        # kernel for bincount, which the mined blocks use (a GPU has one)
        hardneg.create_loss("potential", check_inputs=False)(*meta, ids=ids)
    except NotImplementedError as err:
        assert "aten::bincount" in str(err) and "Meta" in str(err)
