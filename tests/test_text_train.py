"""``hardneg train --modality text``: a tiny local BERT trained on rows the test writes."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")

from _text_models import sentences, tiny_model  # noqa: E402

from hardneg.cli import main  # noqa: E402
from hardneg.text.train import TextTrainConfig, split_rows  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny sentence model and 40 (anchor, positive, negative) rows of distinct texts."""
    root = tmp_path_factory.mktemp("text_train")
    model_dir = root / "model"
    tiny_model(root, seed=0).save(str(model_dir))
    texts = list(dict.fromkeys(sentences(400, seed=5)))[:120]
    rows = [
        {"anchor": texts[i], "positive": texts[40 + i], "negative": texts[80 + i]}
        for i in range(40)
    ]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data, rows


def run(*argv) -> int:
    return main(["train", "--modality", "text", "--no-progress", *map(str, argv)])


def test_trains_saves_and_scores_the_held_out_rows(tmp_path, setup):
    from sentence_transformers import SentenceTransformer

    model_dir, data, rows = setup
    out = tmp_path / "run"
    code = run(
        f"data={data}",
        f"model={model_dir}",
        "strategy=hcl",
        "hcl.beta=0.5",
        "max_steps=3",
        "batch_size=8",
        "lr=1e-3",
        "dev_fraction=0.25",
        "threads=1",
        "--run-dir",
        out,
    )
    assert code == 0
    trained, base = SentenceTransformer(str(out / "model")), SentenceTransformer(str(model_dir))
    changed = [
        not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters(), strict=True)
    ]
    assert any(changed)
    with (out / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert [int(h["step"]) for h in history] == [1, 2, 3]
    assert all(math.isfinite(float(h["loss"])) and float(h["loss"]) > 0 for h in history)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["train_rows"] == 30 and metrics["dev_rows"] == 10
    config = json.loads((out / "config.json").read_text())
    assert config["strategy"] == "hcl" and config["strategy_hparams"] == {"beta": 0.5}

    # the held-out score, recomputed by a loop over the queries with the saved model
    _, dev = split_rows(len(rows), 0.25, 0)
    anchors = [rows[i]["anchor"] for i in dev]
    cands = [rows[i][c] for c in ("positive", "negative") for i in dev]
    q = trained.encode(anchors, convert_to_tensor=True)
    c = trained.encode(cands, convert_to_tensor=True)
    reciprocal = []
    for j in range(len(dev)):
        sims = torch.nn.functional.cosine_similarity(q[j : j + 1], c, dim=1)
        rank = 1 + int((sims > sims[j]).sum())  # candidate j is query j's positive
        reciprocal.append(1.0 / rank if rank <= 10 else 0.0)
    assert metrics["dev_mrr_after"] == pytest.approx(float(np.mean(reciprocal)), abs=1e-5)
    assert 0.0 <= metrics["dev_mrr_before"] <= 1.0
    # the model card names the loss and its settings
    card = (out / "model" / "README.md").read_text()
    assert "HardNegativeLoss" in card and '"beta": 0.5' in card


def test_split_rows_is_disjoint_and_seeded():
    train, dev = split_rows(50, 0.2, seed=3)
    assert len(dev) == 10 and len(train) == 40
    assert sorted({*train.tolist(), *dev.tolist()}) == list(range(50))
    assert split_rows(50, 0.2, seed=3)[1].tolist() == dev.tolist()
    assert split_rows(50, 0.2, seed=4)[1].tolist() != dev.tolist()
    assert len(split_rows(50, 0.0, seed=3)[1]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["strategy=hcl"], "data=FILE is required"),
        (["data=x.jsonl", "epoch=2"], "expected key=value with key one of"),
        (["data=x.jsonl", "batch_size=many"], "batch_size takes an integer"),
        (["data=x.jsonl", "symmetric=maybe"], "symmetric takes true or false"),
        (["data=x.jsonl", "strategy=hlc"], "hcl"),
        (["data=x.jsonl", "dev_fraction=0.9"], "dev_fraction"),
        (["data=x.jsonl", "max_steps=0"], "max_steps"),
        (["data=x.jsonl", "guide_margin_strategy=cosine"], "guide_margin_strategy"),
        (["data=x.jsonl", "directions=doc_to_query"], "must include 'query_to_doc'"),
        (["data=x.jsonl", "directions=query_to_doc,qury_to_query"], "'query_to_query'"),
        (["data=x.jsonl", "partition_mode=both"], "partition_mode must be one of"),
        (
            ["data=x.jsonl", "contrast_positives=true", "directions=query_to_doc,doc_to_doc"],
            "give one of them",
        ),
        (["data=x.jsonl", "hcl.beta=2"], "strategy=infonce"),
        (["data=x.jsonl", "--config", "mnist1d_simclr_hcl"], "--config does not apply"),
    ],
)
def test_bad_settings_say_what_is_wrong(argv, message, capsys):
    assert run(*argv) == 2
    assert message in capsys.readouterr().err


def test_one_column_and_too_few_rows_are_refused(tmp_path, setup, capsys):
    model_dir, _, rows = setup
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"anchor": r["anchor"]}) + "\n" for r in rows))
    assert run(f"data={one}", f"model={model_dir}", "--run-dir", tmp_path / "a") == 2
    assert "an anchor and a positive column" in capsys.readouterr().err
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert run(f"data={few}", f"model={model_dir}", "--run-dir", tmp_path / "b") == 2
    assert "dev_fraction" in capsys.readouterr().err


def test_a_folder_with_a_trained_model_is_not_overwritten(tmp_path, setup, capsys):
    model_dir, data, _ = setup
    (tmp_path / "run" / "model").mkdir(parents=True)
    assert run(f"data={data}", f"model={model_dir}", "--run-dir", tmp_path / "run") == 2
    assert "already holds a trained model" in capsys.readouterr().err


def test_settings_parse_from_key_value_items():
    cfg = TextTrainConfig.with_overrides(
        ["data=rows.parquet", "epochs=2", "symmetric=yes", "guide=none", "columns=q,d,n"]
    )
    assert (cfg.epochs, cfg.symmetric, cfg.guide, cfg.columns) == (2.0, True, None, "q,d,n")


def test_directions_reach_the_loss(tmp_path, setup):
    model_dir, data, _ = setup
    out = tmp_path / "run"
    argv = [f"data={data}", f"model={model_dir}", "directions=query_to_doc,doc_to_doc"]
    argv += ["max_steps=1", "batch_size=8", "dev_fraction=0"]
    assert run(*argv, "--run-dir", out) == 0
    card = (out / "model" / "README.md").read_text()
    assert '"directions": [' in card and '"doc_to_doc"' in card
    assert '"partition_mode": "joint"' in card
    out = tmp_path / "gist"
    argv = [f"data={data}", f"model={model_dir}", "contrast_anchors=true", "contrast_positives=1"]
    argv += ["max_steps=1", "batch_size=8", "dev_fraction=0"]
    assert run(*argv, "--run-dir", out) == 0
    card = (out / "model" / "README.md").read_text()
    assert '"query_to_query"' in card and '"contrast_positives": true' in card


def test_a_guide_and_the_cached_form_reach_the_loss(tmp_path, setup):
    model_dir, data, _ = setup
    out = tmp_path / "run"
    argv = [f"data={data}", f"model={model_dir}", f"guide={model_dir}", "guide_margin=0.05"]
    argv += ["mini_batch_size=4", "max_steps=1", "batch_size=8", "dev_fraction=0"]
    assert run(*argv, "--run-dir", out) == 0
    card = (out / "model" / "README.md").read_text()
    assert "CachedHardNegativeLoss" in card and '"guide_margin": 0.05' in card
    assert "solatorio2024gistembed" in card
    assert "dev_mrr_after" not in json.loads((out / "metrics.json").read_text())


def test_prompts_reach_the_held_out_score(tmp_path, setup):
    from sentence_transformers import SentenceTransformer

    model_dir, data, rows = setup
    out = tmp_path / "run"
    argv = [f"data={data}", f"model={model_dir}", "query_prompt=the ", "document_prompt=a "]
    assert run(*argv, "max_steps=1", "batch_size=8", "dev_fraction=0.25", "--run-dir", out) == 0
    base = SentenceTransformer(str(model_dir))
    _, dev = split_rows(len(rows), 0.25, 0)

    def mrr(query_prefix, doc_prefix):  # a loop over the queries, prompts written out
        q = base.encode([query_prefix + rows[i]["anchor"] for i in dev], convert_to_tensor=True)
        docs = [doc_prefix + rows[i][c] for c in ("positive", "negative") for i in dev]
        c = base.encode(docs, convert_to_tensor=True)
        values = []
        for j in range(len(dev)):
            sims = torch.nn.functional.cosine_similarity(q[j : j + 1], c, dim=1)
            rank = 1 + int((sims > sims[j]).sum())
            values.append(1.0 / rank if rank <= 10 else 0.0)
        return float(np.mean(values))

    before = json.loads((out / "metrics.json").read_text())["dev_mrr_before"]
    assert before == pytest.approx(mrr("the ", "a "), abs=1e-5)
    assert mrr("the ", "a ") != pytest.approx(mrr("", ""), abs=1e-6)  # the prompts matter


def test_column_prompts_put_the_query_prompt_on_anchors_only():
    from hardneg.text.train import _column_prompts

    keys = ["anchor", "positive", "negative_1"]
    assert _column_prompts(keys, "q: ", "d: ") == {
        "anchor": "q: ",
        "positive": "d: ",
        "negative_1": "d: ",
    }
    assert _column_prompts(keys, None, "d: ") == {"positive": "d: ", "negative_1": "d: "}
    assert _column_prompts(keys, None, None) is None
    cfg = TextTrainConfig.with_overrides(["data=x.jsonl", "query_prompt=query: "])
    assert cfg.query_prompt == "query: "


def test_matryoshka_dims_wrap_the_loss(tmp_path, setup, capsys):
    model_dir, data, _ = setup
    out = tmp_path / "run"
    argv = [f"data={data}", f"model={model_dir}", "matryoshka_dims=32,16,8", "max_steps=1"]
    assert run(*argv, "batch_size=8", "dev_fraction=0", "--run-dir", out) == 0
    card = (out / "model" / "README.md").read_text()
    assert "MatryoshkaLoss" in card and "HardNegativeLoss" in card
    assert run(*argv[:2], "matryoshka_dims=64,8", "--run-dir", tmp_path / "b") == 2
    assert "the model's embeddings have 32 dims" in capsys.readouterr().err
    assert run(*argv[:2], "matryoshka_dims=32,x", "--run-dir", tmp_path / "c") == 2
    assert "comma-separated positive integers" in capsys.readouterr().err


def test_retrieval_metrics_on_a_hand_made_ranking():
    from hardneg.text.train import retrieval_metrics

    sims = np.array(
        [
            [0.9, 0.8, 0.1, 0.5],  # relevant {1}: rank 2
            [0.2, 0.3, 0.9, 0.1],  # relevant {0, 3}: ranks 3 and 4 (first hit at 3)
            [0.5, 0.5, 0.1, 0.0],  # relevant {1}: tied with 0, ranked first
        ]
    )
    got = retrieval_metrics(sims, [{1}, {0, 3}, {1}])
    log2 = math.log2
    ndcg = [
        (1 / log2(3)) / 1.0,
        (1 / log2(4) + 1 / log2(5)) / (1 / log2(2) + 1 / log2(3)),
        1.0,
    ]
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert got["recall_1"] == pytest.approx(100 / 3)
    assert got["recall_10"] == pytest.approx(100.0)
    assert got["ndcg_10"] == pytest.approx(sum(ndcg) / 3)
    # a relevant document below rank 10 counts for nothing
    far = np.linspace(1.0, 0.0, 12)[None, :]
    assert retrieval_metrics(far, [{11}]) == {
        "mrr": 0.0,
        "recall_1": 0.0,
        "recall_10": 0.0,
        "ndcg_10": 0.0,
    }


def test_eval_scores_a_sentence_model_on_rows(tmp_path, setup, capsys):
    from sentence_transformers import SentenceTransformer

    from hardneg.text.train import retrieval_metrics

    model_dir, data, rows = setup
    code = main(["eval", str(model_dir), "--modality", "text", "--data", str(data), "--json"])
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    model = SentenceTransformer(str(model_dir))
    q = model.encode([r["anchor"] for r in rows])
    docs = [r["positive"] for r in rows] + [r["negative"] for r in rows]
    c = model.encode(docs)
    q, c = q / np.linalg.norm(q, axis=1)[:, None], c / np.linalg.norm(c, axis=1)[:, None]
    want = retrieval_metrics(q @ c.T, [{i} for i in range(len(rows))])
    for key in ("mrr", "ndcg_10", "recall_1", "recall_10"):
        assert got[key] == pytest.approx(want[key], abs=1e-6)
    assert main(["eval", str(model_dir), "--data", str(data)]) == 2
    assert "--data belongs to --modality text" in capsys.readouterr().err


def test_the_progress_bar_is_drawn_only_on_a_terminal(tmp_path, setup, capsys):
    # `--no-progress` says a bar is drawn only when stderr is a terminal (as image training
    # does); the Trainer's bar written into a log file or a pipe is one line per refresh.
    # (transformers' own bars, loading and writing the weights, are not the training's.)
    model_dir, data, _ = setup
    argv = ["train", "--modality", "text", f"data={data}", f"model={model_dir}", "max_steps=2"]
    argv += ["batch_size=8", "dev_fraction=0", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 0  # no --no-progress; capsys's stderr is not a terminal
    err = capsys.readouterr().err
    assert not re.search(r"\b[0-2]/2 \[", err), err[-500:]  # the bar of the 2 training steps
