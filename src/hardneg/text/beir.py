"""BEIR-format retrieval data and full-corpus retrieval scores.

The layout of BEIR (Thakur et al., NeurIPS 2021 Datasets and Benchmarks), which MTEB's retrieval
tasks and most retrieval training sets also use, is a folder with::

    corpus.jsonl        {"_id": "d1", "title": "...", "text": "..."} per line (title optional)
    queries.jsonl       {"_id": "q1", "text": "..."} per line
    qrels/<split>.tsv   a header line, then  query-id <TAB> corpus-id <TAB> score  per line
                        (TREC's four columns, query 0 document grade, are read too)

A document's text is ``title + " " + text`` (what BEIR's dense encoders embed), its text alone
without a title. A score is an integer grade; ``> 0`` is relevant (trec_eval's default
relevance level 1). A split holds the queries that have a judgement in its file.

:func:`retrieval_scores` ranks the whole corpus for every query by cosine similarity and reports,
at each cut-off ``k``, the measures BEIR and MTEB report (pytrec_eval's trec_eval measures):

* ``ndcg@k``: ``DCG@k / IDCG@k`` with ``DCG@k = sum_{r<=k} g_r / log2(r + 1)``, the gain ``g`` the
  judged grade (0 unjudged) and ``IDCG@k`` the same over the query's grades sorted descending;
* ``mrr@k``: ``1 / rank`` of the first relevant document, 0 when none is in the top ``k``;
* ``recall@k``: relevant documents in the top ``k`` / relevant documents of the query;
* ``precision@k``: relevant documents in the top ``k`` / ``k``;
* ``map@k``: ``sum_{r<=k, relevant} precision@r / relevant documents of the query`` (trec_eval's
  ``map_cut``; sentence-transformers' ``InformationRetrievalEvaluator`` divides by
  ``min(k, relevant)`` instead, which differs only for a query with more than ``k`` relevant).

Means over the queries with at least one relevant document. As BEIR's ``ignore_identical_ids``
(its default), a document whose id is the query's id is never retrieved (ArguAna, Quora and
CQADupStack keep the query in the corpus). Ties in score keep the corpus order (trec_eval
breaks them by document id).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hardneg._checks import check_embeddings, check_number, utf8_file

log = logging.getLogger(__name__)

DEFAULT_CUTOFFS = (1, 10, 100)
FILES = ("corpus.jsonl", "queries.jsonl")


@dataclass
class BeirData:
    """One split of a BEIR folder.

    Attributes:
        corpus: document id -> text (title and text joined), in file order.
        queries: query id -> text, the queries judged in the split, in file order.
        qrels: query id -> {document id: grade}, every judgement of the split.
    """

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def pairs(self, min_grade: int = 1) -> tuple[list[str], list[str]]:
        """``(query texts, document texts)``: one pair per judgement of grade ``>= min_grade``,
        in the order of the queries, then of their judgements (the rows of ``hardneg mine`` and
        ``hardneg train --modality text``)."""
        anchors, positives = [], []
        for qid, text in self.queries.items():
            for did, grade in self.qrels.get(qid, {}).items():
                if grade >= min_grade:
                    anchors.append(text)
                    positives.append(self.corpus[did])
        return anchors, positives


def is_beir_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding ``corpus.jsonl`` (a BEIR data set)."""
    return Path(path).is_dir() and (Path(path) / "corpus.jsonl").is_file()


def splits(folder: str | Path) -> list[str]:
    """The splits of a BEIR folder: the stems of ``qrels/*.tsv``, sorted."""
    return sorted(p.stem for p in (Path(folder) / "qrels").glob("*.tsv"))


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Read ``split`` of the BEIR folder ``folder`` (see the module doc for the layout).

    A malformed line fails naming its file and line; a judgement of a query or document that the
    files do not hold is dropped with a warning that counts them (public BEIR sets have a few)."""
    return load_beir_splits(folder, [split])[split]


def load_beir_splits(folder: str | Path, names: Sequence[str]) -> dict[str, BeirData]:
    """:func:`load_beir` of each split in ``names`` (split -> data), with one read of
    ``corpus.jsonl`` and ``queries.jsonl`` for all of them (the corpus is most of a folder, and
    ``hardneg train`` reads a training and an evaluation split of the same folder). The splits
    share one corpus dict. Every split's qrels file is looked for before anything is read."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"BEIR folder {folder} does not exist")
    for name in FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} has no {name}: a BEIR folder holds corpus.jsonl, queries.jsonl and "
                "qrels/<split>.tsv"
            )
    names = list(dict.fromkeys(names))
    for split in names:
        if not (folder / "qrels" / f"{split}.tsv").is_file():
            found = splits(folder)
            raise FileNotFoundError(
                f"{folder} has no qrels/{split}.tsv; its splits: {', '.join(found) or 'none'}"
            )
    corpus = {}
    for where, row in _jsonl(folder / "corpus.jsonl"):
        did, text = _field(row, "_id", where), _field(row, "text", where)
        title = row.get("title") or ""
        if not isinstance(title, str):
            raise ValueError(f"{where}: 'title' must be a string, got {type(title).__name__}")
        if did in corpus:
            raise ValueError(f"{where}: document id {did!r} is there twice")
        corpus[did] = f"{title} {text}".strip() if title.strip() else text
    all_queries = {}
    for where, row in _jsonl(folder / "queries.jsonl"):
        qid = _field(row, "_id", where)
        if qid in all_queries:
            raise ValueError(f"{where}: query id {qid!r} is there twice")
        all_queries[qid] = _field(row, "text", where)
    return {
        split: _split(folder / "qrels" / f"{split}.tsv", corpus, all_queries) for split in names
    }


def _split(qrels_file: Path, corpus: dict[str, str], all_queries: dict[str, str]) -> BeirData:
    """The split of ``qrels_file`` over the folder's documents and queries."""
    qrels: dict[str, dict[str, int]] = {}
    unknown_queries, unknown_documents = set(), set()
    for _, (qid, did, grade) in _qrels(qrels_file):
        if qid not in all_queries:
            unknown_queries.add(qid)
        elif did not in corpus:
            unknown_documents.add(did)
        else:
            qrels.setdefault(qid, {})[did] = grade
    for what, ids, file in (
        ("queries", unknown_queries, "queries.jsonl"),
        ("documents", unknown_documents, "corpus.jsonl"),
    ):
        if ids:
            log.warning(
                "%s: dropped the judgements of %d %s that %s does not hold (e.g. %r)",
                qrels_file,
                len(ids),
                what,
                file,
                sorted(ids)[0],
            )
    if not qrels:
        raise ValueError(f"{qrels_file}: no judgement of a query and a document the files hold")
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    return BeirData(corpus, queries, qrels)


def _jsonl(path: Path):
    with path.open(encoding="utf-8") as handle, utf8_file(path):
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not a JSON object ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: not a JSON object, got {type(row).__name__}")
            yield where, row


def _field(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise ValueError(f"{where}: no {key!r} (keys: {', '.join(map(repr, row)) or 'none'})")
    value = row[key]
    if key == "_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # some sets write numeric ids; the qrels read them as text
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _qrels(path: Path):
    """``(where, (query id, document id, grade))`` per judgement: BEIR's three tab-separated
    columns (after an optional header), or TREC's four (``query iteration document grade``,
    tabs or spaces, as MS MARCO's and TREC's qrels files are written; the iteration is
    ignored)."""
    with path.open(encoding="utf-8") as handle, utf8_file(path):
        for number, line in enumerate(handle, start=1):
            where = f"{path}:{number}"
            fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            if not "".join(fields).strip():
                continue
            if number == 1 and len(fields) == 3 and not _is_integer(fields[2]):
                continue  # the header (query-id, corpus-id, score)
            if len(fields) == 4 and _is_integer(fields[3]):
                yield where, (fields[0], fields[2], int(fields[3]))
            elif len(fields) == 3 and _is_integer(fields[2]):
                yield where, (fields[0], fields[1], int(fields[2]))
            else:
                raise ValueError(
                    f"{where}: expected query-id<TAB>corpus-id<TAB>integer score (BEIR) or "
                    f"query iteration document grade (TREC), got {line.rstrip()!r}"
                )


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def rank_documents(
    query_embeddings: torch.Tensor | np.ndarray,
    document_chunks: Iterable[torch.Tensor | np.ndarray],
    depth: int,
    *,
    exclude: Sequence[int | None] | None = None,
    query_chunk_size: int = 1024,
) -> torch.Tensor:
    """``[Q, depth]`` rows of the ``depth`` documents most cosine-similar to each query, best
    first (``-1`` past the end of a corpus smaller than ``depth``). The documents come as
    consecutive chunks of embeddings (rows numbered across the chunks), each merged into a
    running top-``depth`` and then dropped, so a corpus never has to be held at once: memory is
    one chunk, ``query_chunk_size`` x its rows of scores, and ``Q x depth``. ``exclude[q]``: a
    row query ``q`` never gets (its own id), or None. Ties keep the lower row first
    (:func:`hardneg.mining.merge_top_k`, the running top-k that mining ranks with too)."""
    from hardneg.mining import merge_top_k

    depth = int(check_number("depth", depth, low=0, integer=True))
    q = torch.nn.functional.normalize(_embeddings("query_embeddings", query_embeddings), dim=1)
    unit = (
        torch.nn.functional.normalize(_embeddings(f"document chunk {i}", c), dim=1)
        for i, c in enumerate(document_chunks)
    )
    if exclude is not None and len(exclude) != q.shape[0]:
        raise ValueError(
            f"exclude must hold one entry per query ({q.shape[0]}), got {len(exclude)}"
        )
    for e in exclude or ():
        if e is not None and (isinstance(e, bool) or not isinstance(e, (int, np.integer))):
            raise ValueError(f"exclude holds document rows (int) or None, got {e!r}")
    skip = None if exclude is None else [set() if e is None else {int(e)} for e in exclude]
    scores, rows = merge_top_k(
        q, unit, depth, exclude=skip, query_chunk_size=query_chunk_size, stable=True
    )
    return rows.masked_fill(torch.isinf(scores), -1)


def _embeddings(name: str, x: object) -> torch.Tensor:
    """``x`` as a float32 ``[rows, dim]`` tensor of finite values (integer embeddings, such as
    quantised ones, are taken); a NaN row ranked the corpus arbitrarily, without a word."""
    t = torch.as_tensor(x)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return check_embeddings(name, t.float(), min_rows=0)


def retrieval_scores(
    query_embeddings: torch.Tensor | np.ndarray,
    document_embeddings: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
    judgements: Sequence[dict[int, int]],
    *,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    exclude: Sequence[int | None] | None = None,
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 16384,
) -> dict[str, float]:
    """Full-corpus retrieval measures (module doc) of ``query_embeddings [Q, d]`` against the
    documents by cosine: ``document_embeddings`` ``[C, d]``, or an iterable of consecutive
    chunks of them (:func:`rank_documents`); ``judgements[q]`` maps a document's row to its
    grade; ``exclude[q]``: a row query ``q`` never retrieves (its own id), or None. Keys
    ``ndcg@k``, ``mrr@k``, ``recall@k``, ``precision@k``, ``map@k`` per cut-off, and
    ``queries`` (those scored: with a relevant document) and ``documents``."""
    query_embeddings = _embeddings("query_embeddings", query_embeddings)  # [Q, d] before len()
    if len(judgements) != len(query_embeddings):
        raise ValueError(f"{len(query_embeddings)} queries but {len(judgements)} judgement lists")
    # int() truncated 2.5 to a cut-off of 2 and failed on 'a' naming no setting
    if isinstance(cutoffs, (str, bytes)) or not isinstance(cutoffs, Iterable):
        raise ValueError(f"cutoffs must be a sequence of integers >= 1, got {cutoffs!r}")
    given = list(cutoffs)
    if not given or any(
        isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in given
    ):
        raise ValueError(f"cutoffs must be integers >= 1, got {given}")
    cutoffs = sorted({int(k) for k in given})
    check_number("corpus_chunk_size", corpus_chunk_size, low=1, integer=True)
    if isinstance(document_embeddings, (torch.Tensor, np.ndarray)):
        whole = document_embeddings
        document_embeddings = (
            whole[i : i + corpus_chunk_size] for i in range(0, len(whole), corpus_chunk_size)
        )
    counted = _Counted(document_embeddings)
    ranking = rank_documents(
        query_embeddings, counted, cutoffs[-1], exclude=exclude, query_chunk_size=query_chunk_size
    )
    # a judged row past the corpus can never be retrieved: it lowered recall without a word
    rows = [d for grades in judgements for d in grades]
    if rows and (min(rows) < 0 or max(rows) >= counted.rows):
        bad = min(rows) if min(rows) < 0 else max(rows)
        raise ValueError(
            f"judgements name document row {bad}, but the corpus has {counted.rows} rows"
        )
    sums = {f"{name}@{k}": 0.0 for k in cutoffs for name in _MEASURES}
    scored = 0
    for ranked, grades in zip(ranking.tolist(), judgements):
        relevant = sum(g > 0 for g in grades.values())
        if relevant == 0:
            continue
        scored += 1
        gains = np.array([grades.get(d, 0) if d >= 0 else 0 for d in ranked], dtype=np.float64)
        ideal = np.sort(np.array([g for g in grades.values() if g > 0], dtype=np.float64))[::-1]
        for k in cutoffs:
            for name, measure in _MEASURES.items():
                sums[f"{name}@{k}"] += measure(gains[:k], ideal, relevant, k)
    if scored == 0:
        raise ValueError("no query has a relevant document (a grade > 0) to score")
    out = {key: value / scored for key, value in sums.items()}
    return {**out, "queries": scored, "documents": counted.rows}


class _Counted:
    """Iterates the document chunks and counts their rows."""

    def __init__(self, chunks: Iterable) -> None:
        self.chunks, self.rows = chunks, 0

    def __iter__(self):
        for chunk in self.chunks:
            self.rows += len(chunk)
            yield chunk


def _discounts(n: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, n + 2))


def _ndcg(gains: np.ndarray, ideal: np.ndarray, relevant: int, k: int) -> float:
    best = ideal[:k]
    return float((gains * _discounts(gains.size)).sum() / (best * _discounts(best.size)).sum())


def _mrr(gains: np.ndarray, ideal: np.ndarray, relevant: int, k: int) -> float:
    hits = np.flatnonzero(gains > 0)
    return 1.0 / (hits[0] + 1) if hits.size else 0.0


def _recall(gains: np.ndarray, ideal: np.ndarray, relevant: int, k: int) -> float:
    return float((gains > 0).sum() / relevant)


def _precision(gains: np.ndarray, ideal: np.ndarray, relevant: int, k: int) -> float:
    return float((gains > 0).sum() / k)


def _map(gains: np.ndarray, ideal: np.ndarray, relevant: int, k: int) -> float:
    hits = gains > 0
    precision_at = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision_at[hits].sum() / relevant)


_MEASURES: dict[str, Callable[[np.ndarray, np.ndarray, int, int], float]] = {
    "ndcg": _ndcg,
    "mrr": _mrr,
    "recall": _recall,
    "precision": _precision,
    "map": _map,
}


def evaluate_beir(
    encode: Callable[..., np.ndarray],
    data: BeirData,
    *,
    prompts: tuple[str | None, str | None] = (None, None),
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    ignore_identical_ids: bool = True,
    corpus_chunk_size: int = 50_000,
) -> dict[str, float]:
    """:func:`retrieval_scores` of a sentence encoder on a BEIR split: ``encode(texts, prompt)``
    embeds the queries with ``prompts[0]`` and the corpus with ``prompts[1]``
    (:func:`hardneg.text.train.sentence_encoder`), ``corpus_chunk_size`` documents at a time,
    each chunk ranked and dropped (as sentence-transformers' ``InformationRetrievalEvaluator``:
    a corpus of millions is never embedded whole)."""
    if not isinstance(data, BeirData):
        raise ValueError(f"data must be a BeirData (load_beir(folder)), got {type(data).__name__}")
    # a bare string was indexed as a pair: "query: " embedded the queries with "q", the corpus
    # with "u"
    if (
        not isinstance(prompts, (tuple, list))
        or len(prompts) != 2
        or not all(p is None or isinstance(p, str) for p in prompts)
    ):
        raise ValueError(
            f"prompts must be a pair (query prompt, corpus prompt) of strings or None, got {prompts!r}"
        )
    doc_ids = list(data.corpus)
    row = {did: j for j, did in enumerate(doc_ids)}
    query_ids = list(data.queries)
    judgements = [{row[d]: g for d, g in data.qrels[qid].items()} for qid in query_ids]
    exclude = [row.get(qid) for qid in query_ids] if ignore_identical_ids else None
    queries = encode([data.queries[qid] for qid in query_ids], prompts[0])
    check_number("corpus_chunk_size", corpus_chunk_size, low=1, integer=True)
    documents = (
        encode([data.corpus[did] for did in doc_ids[i : i + corpus_chunk_size]], prompts[1])
        for i in range(0, len(doc_ids), corpus_chunk_size)
    )
    return retrieval_scores(queries, documents, judgements, cutoffs=cutoffs, exclude=exclude)
