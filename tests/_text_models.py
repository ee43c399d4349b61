"""A tiny randomly initialised BERT sentence model, built locally (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (
    "the a cat dog bird fish car bus train road city river tree house door window red blue "
    "green big small fast slow old new runs sits eats sees likes jumps swims reads writes "
    "sings book song music film news game team player ball goal win loses happy sad good bad "
    "day night sun rain snow cold warm"
).split()


def sentences(n: int, seed: int = 0, length: int = 6) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, length))) for _ in range(n)]


def tiny_model(
    directory: Path,
    *,
    seed: int = 0,
    dropout: float = 0.0,
    dim: int = 32,
    words: tuple[str, ...] = WORDS,
    layers: int = 2,
):
    """A ``layers``-layer BERT (hidden ``dim``, vocabulary ``words``) with mean pooling, as a
    ``SentenceTransformer``."""
    import hashlib

    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:  # sentence-transformers >= 6 (the old path warns)
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    tag = "" if words == WORDS else "_" + hashlib.sha1(" ".join(words).encode()).hexdigest()[:8]
    directory = Path(directory) / f"tiny_bert_{seed}_{dim}_{dropout}_{layers}{tag}"
    if not (directory / "config.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
        (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=dim,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * dim,
            max_position_embeddings=64,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    transformer = models.Transformer(str(directory), max_seq_length=32)
    width = getattr(transformer, "get_embedding_dimension", None)
    width = width() if width else transformer.get_word_embedding_dimension()
    pooling = models.Pooling(width, "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def saved_model_and_pairs(directory: Path, pairs: int = 20) -> tuple[Path, Path, list[str]]:
    """A tiny model saved in ``directory / "model"`` and ``pairs`` (anchor, positive) rows of
    distinct sentences in ``directory / "pairs.jsonl"``, each anchor's positive its next
    sentence; returns ``(model folder, pairs file, the sentences)``."""
    import json

    model_dir = Path(directory) / "model"
    tiny_model(Path(directory) / "bert").save(str(model_dir))
    texts = list(dict.fromkeys(sentences(80, seed=5)))
    rows = Path(directory) / "pairs.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"anchor": a, "positive": p}) + "\n"
            for a, p in zip(texts, texts[1 : pairs + 1])
        )
    )
    return model_dir, rows, texts


def distinct_columns(k: int, batch: int, seed: int) -> list[list[str]]:
    """``2 + k`` columns of ``batch`` distinct random sentences (anchor, positive, negatives)."""
    texts = list(dict.fromkeys(sentences(batch * (2 + k) * 3, seed=seed)))[: batch * (2 + k)]
    return [texts[i * batch : (i + 1) * batch] for i in range(2 + k)]


def value_and_grads(model, loss, cols):
    """A loss's value on text columns and every parameter gradient it leaves."""
    model.zero_grad(set_to_none=True)
    value = loss([model.preprocess(c) for c in cols], None)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def assert_same(a, b) -> None:
    """Two ``value_and_grads`` results agree (float32 rounding of the same loss)."""
    import torch

    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) >= 3
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5, msg=name)
