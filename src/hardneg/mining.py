"""Offline hard-negative mining for retrieval data: ``(query, positive)`` pairs and a corpus in,
``(anchor, positive, negative_1..k)`` rows out.

Pipeline (:func:`mine_hard_negatives`):

1. **Embed** the corpus, queries and positives in batches of ``batch_size`` (L2-normalised),
   optionally cached on disk (``cache_dir``: one ``.npy`` per text list and model, memory-mapped
   when read back).
2. **Top-k in chunks**: ``query_chunk_size x corpus_chunk_size`` score blocks, each merged into a
   running top-``K`` per query; the full ``queries x corpus`` matrix never exists, so peak
   memory is bounded by the chunk sizes and ``K``. Corpus entries whose text equals the query's
   positive are skipped.
3. **Window and filters** on the ranked candidates (ranks count from 0 = most similar, the
   positive excluded): ranks ``[range_min, range_max)``; ``min_score``/``max_score``; the
   positive-aware margins of NV-Retriever (Moreira et al. 2024): ``absolute_margin`` keeps
   ``s <= s_pos - m`` (TopK-MarginPos), ``relative_margin`` keeps ``s <= s_pos (1 - m)``
   (TopK-PercPos; 0.05 = "95%").
4. **Sampling** ``num_negatives`` among the survivors, without replacement by Gumbel top-k in
   log space (``argtop_k(log p + Gumbel)`` draws without replacement with probabilities ``∝ p``):

   * ``top``: the most similar survivors;
   * ``random``: uniform;
   * ``simans``: SimANS (Zhou et al., EMNLP 2022), ``log p = -a (s - s_pos - b)^2``;
   * ``hcl``: HCL's importance weights (Robinson et al., ICLR 2021), ``log p = beta s / t``;
   * ``ring``: Ring's band (Wu et al., ICLR 2021): the survivors ranked by similarity, ranks
     ``[int(rho_in U), U)`` with ``U = int(rho_out M)`` (:func:`hardneg.strategies.ring.ring_band`),
     uniform inside the band.

Queries with fewer than ``num_negatives`` survivors yield fewer triplets, and no n-tuple row.
Rows come back as a list of dicts in sentence-transformers' formats (``triplet``: ``anchor,
positive, negative``; ``n-tuple``: ``anchor, positive, negative_1..k``), or as a
``datasets.Dataset`` (``as_dataset=True``); :func:`save_rows` writes jsonl or parquet.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hardneg._checks import check_choice, check_number
from hardneg.strategies.ring import ring_band

SAMPLING = ("top", "random", "simans", "hcl", "ring")
FORMATS = ("triplet", "n-tuple")


@dataclass
class MiningStats:
    """What happened during one mining run."""

    queries: int = 0
    corpus: int = 0
    rows: int = 0
    short_queries: int = 0  # queries with fewer than num_negatives survivors
    seconds: dict[str, float] = field(default_factory=dict)
    mean_positive_score: float = float("nan")
    mean_negative_score: float = float("nan")


def _texts(name: str, values: object) -> list[str]:
    if values is None:
        raise ValueError(f"{name} is required")
    out = list(values)  # type: ignore[arg-type]
    bad = [i for i, v in enumerate(out) if not isinstance(v, str)]
    if bad:
        raise ValueError(
            f"{name} must hold strings; entry {bad[0]} is {type(out[bad[0]]).__name__}"
        )
    return out


def _from_dataset(data: Any, anchor_column: str, positive_column: str) -> tuple[list, list]:
    columns = list(getattr(data, "column_names", []) or [])
    missing = [c for c in (anchor_column, positive_column) if c not in columns]
    if missing:
        raise ValueError(
            f"expected the layout ({anchor_column}, {positive_column}) (columns "
            f"{anchor_column!r} and {positive_column!r}); the dataset has columns {columns} "
            f"(missing {missing}; set anchor_column / positive_column)"
        )
    return list(data[anchor_column]), list(data[positive_column])


def embed_texts(
    model: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    model_key: str | None = None,
) -> Tensor:
    """``[n, d]`` L2-normalised float32 embeddings, in batches; cached as ``.npy`` if asked."""
    path = None
    if cache_dir is not None:
        key = hashlib.sha1()
        key.update((model_key or type(model).__name__).encode())
        for t in texts:
            key.update(t.encode())
            key.update(b"\x00")
        path = Path(cache_dir) / f"emb_{key.hexdigest()[:20]}.npy"
        if path.exists():
            return torch.from_numpy(np.load(path, mmap_mode="r").copy())
    parts = []
    for start in range(0, len(texts), batch_size):
        with torch.no_grad():
            emb = model.encode(
                list(texts[start : start + batch_size]),
                batch_size=batch_size,
                convert_to_tensor=True,
                show_progress_bar=False,
            )
        if not isinstance(emb, Tensor) or emb.dim() != 2:
            raise ValueError(
                "model.encode must return a [batch, dim] embedding tensor, got "
                f"{type(emb).__name__} {tuple(getattr(emb, 'shape', ()))}"
            )
        parts.append(torch.nn.functional.normalize(emb.float().cpu(), dim=-1))
    if not parts:
        return torch.zeros(0, 1)
    out = torch.cat(parts)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out.numpy())
    return out


def chunked_top_k(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    *,
    exclude: list[set[int]] | None = None,
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 16384,
) -> tuple[Tensor, Tensor]:
    """``(scores [Q, k], indices [Q, k])`` of the ``k`` most similar corpus rows per query (dot
    products), descending, never holding more than ``query_chunk x (k + corpus_chunk)`` scores.
    ``exclude[i]``: corpus rows never returned for query ``i`` (its positives)."""
    if k > corpus.shape[0]:
        raise ValueError(f"k = {k} is larger than the corpus ({corpus.shape[0]} entries)")
    all_scores, all_index = [], []
    for qs in range(0, queries.shape[0], query_chunk_size):
        q = queries[qs : qs + query_chunk_size]
        best = torch.full((q.shape[0], k), float("-inf"))
        best_index = torch.full((q.shape[0], k), -1, dtype=torch.long)
        for cs in range(0, corpus.shape[0], corpus_chunk_size):
            c = torch.as_tensor(corpus[cs : cs + corpus_chunk_size])
            scores = q @ c.T
            if exclude is not None:
                for row in range(q.shape[0]):
                    cols = [j - cs for j in exclude[qs + row] if cs <= j < cs + c.shape[0]]
                    if cols:
                        scores[row, cols] = float("-inf")
            index = torch.arange(cs, cs + c.shape[0]).expand(q.shape[0], -1)
            merged = torch.cat([best, scores], dim=1)
            merged_index = torch.cat([best_index, index], dim=1)
            best, pos = merged.topk(k, dim=1)
            best_index = merged_index.gather(1, pos)
        all_scores.append(best)
        all_index.append(best_index)
    return torch.cat(all_scores), torch.cat(all_index)


def gumbel_top_k(log_p: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``[Q, k]`` column indices drawn without replacement with probabilities ``∝ exp(log_p)``
    per row (Gumbel top-k); ``-inf`` entries are drawn only after every finite one."""
    u = torch.rand(log_p.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    keys = log_p.double() - torch.log(-torch.log(u))
    return keys.topk(k, dim=1).indices


def mine_hard_negatives(
    queries: Sequence[str] | Any,
    positives: Sequence[str] | None = None,
    corpus: Sequence[str] | None = None,
    *,
    model: Any,
    num_negatives: int = 1,
    output_format: str = "triplet",
    sampling: str = "top",
    range_min: int = 0,
    range_max: int | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    simans_a: float = 1.0,
    simans_b: float = 0.0,
    hcl_beta: float = 1.0,
    temperature: float = 0.05,
    ring_rho_out: float = 0.5,
    ring_rho_in: float = 0.1,
    batch_size: int = 64,
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 16384,
    cache_dir: str | Path | None = None,
    model_key: str | None = None,
    anchor_column: str = "anchor",
    positive_column: str = "positive",
    seed: int = 0,
    as_dataset: bool = False,
    return_stats: bool = False,
) -> Any:
    """Mine ``num_negatives`` hard negatives per ``(query, positive)`` pair (see module doc).

    Args:
        queries: query texts, or a ``datasets.Dataset`` with ``anchor_column`` and
            ``positive_column`` (then ``positives`` must be None).
        positives: one positive text per query.
        corpus: candidate texts (default: the distinct positives, as sentence-transformers does).
        model: anything with ``encode(texts, batch_size=..., convert_to_tensor=True)``.
        num_negatives: negatives per query.
        output_format: ``'triplet'`` (one row per negative) or ``'n-tuple'`` (one row per query).
        sampling: ``'top'``, ``'random'``, ``'simans'``, ``'hcl'`` or ``'ring'``.
        range_min, range_max: rank window ``[range_min, range_max)`` of the candidates
            (default ``range_max = range_min + max(30, 3 num_negatives)``, capped by the corpus).
        min_score, max_score: keep candidates with ``min_score <= s <= max_score``.
        absolute_margin: keep ``s <= s_pos - absolute_margin`` (TopK-MarginPos).
        relative_margin: keep ``s <= s_pos (1 - relative_margin)`` (TopK-PercPos).
        simans_a, simans_b: SimANS kernel ``exp(-a (s - s_pos - b)^2)``.
        hcl_beta, temperature: HCL weights ``exp(beta s / t)``.
        ring_rho_out, ring_rho_in: Ring's band over the surviving candidates.
        batch_size: encoder batch.
        query_chunk_size, corpus_chunk_size: score block of the top-k.
        cache_dir: cache embeddings here (``model_key`` names the model in the cache key).
        anchor_column, positive_column: column names of a dataset input.
        seed: seed of the sampling.
        as_dataset: return a ``datasets.Dataset`` instead of a list of dicts.
        return_stats: also return :class:`MiningStats`.
    """
    stats = MiningStats()
    t0 = time.perf_counter()
    if hasattr(queries, "column_names"):
        if positives is not None:
            raise ValueError("give either a dataset or queries and positives, not both")
        queries, positives = _from_dataset(queries, anchor_column, positive_column)
    q_texts = _texts("queries", queries)
    p_texts = _texts("positives", positives)
    if len(q_texts) != len(p_texts):
        raise ValueError(
            f"queries and positives must have the same length, got {len(q_texts)} and {len(p_texts)}"
        )
    if not q_texts:
        raise ValueError("no queries to mine for")
    c_texts = list(dict.fromkeys(p_texts)) if corpus is None else _texts("corpus", corpus)
    if not c_texts:
        raise ValueError("the corpus is empty")
    num_negatives = int(check_number("num_negatives", num_negatives, low=1, integer=True))
    check_choice("output_format", output_format, FORMATS)
    check_choice("sampling", sampling, SAMPLING)
    range_min = int(check_number("range_min", range_min, low=0, integer=True))
    if range_max is None:
        range_max = range_min + max(30, 3 * num_negatives)
        range_max = min(range_max, len(c_texts))
    range_max = int(check_number("range_max", range_max, low=1, integer=True))
    if range_max <= range_min:
        raise ValueError(f"range_max ({range_max}) must be larger than range_min ({range_min})")
    if range_max - range_min < num_negatives:
        raise ValueError(
            f"the window [range_min, range_max) = [{range_min}, {range_max}) holds fewer "
            f"candidates than num_negatives = {num_negatives}"
        )
    for name, value in (("absolute_margin", absolute_margin), ("relative_margin", relative_margin)):
        if value is not None:
            check_number(name, value, low=0.0)
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    stats.queries, stats.corpus = len(q_texts), len(c_texts)

    # positives are never negatives of their query: skip corpus rows with the same text
    where: dict[str, list[int]] = {}
    for j, text in enumerate(c_texts):
        where.setdefault(text, []).append(j)
    exclude = [set(where.get(p, ())) for p in p_texts]
    extra = max(len(e) for e in exclude)
    k = range_max + extra
    if k > len(c_texts):
        raise ValueError(
            f"k = range_max + positives in the corpus = {k} is larger than the corpus "
            f"({len(c_texts)} entries); lower range_max"
        )

    emb = {
        name: embed_texts(
            model, texts, batch_size=batch_size, cache_dir=cache_dir, model_key=model_key
        )
        for name, texts in (("corpus", c_texts), ("queries", q_texts))
    }
    # positives already in the corpus reuse its embeddings; only the others are embedded
    missing = list(dict.fromkeys(p for p in p_texts if p not in where))
    more = embed_texts(
        model, missing, batch_size=batch_size, cache_dir=cache_dir, model_key=model_key
    )
    row_of = {t: emb["corpus"][where[t][0]] for t in set(p_texts) if t in where}
    row_of.update({t: more[i] for i, t in enumerate(missing)})
    emb["positives"] = torch.stack([row_of[p] for p in p_texts])
    stats.seconds["embed"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores, index = chunked_top_k(
        emb["queries"],
        emb["corpus"],
        k,
        exclude=exclude,
        query_chunk_size=query_chunk_size,
        corpus_chunk_size=corpus_chunk_size,
    )
    stats.seconds["top_k"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    # the positive's own rows were set to -inf, so they rank last: the window is [min, max)
    scores, index = scores[:, range_min:range_max], index[:, range_min:range_max]
    pos = (emb["queries"] * emb["positives"]).sum(dim=1, keepdim=True)
    keep = torch.isfinite(scores)
    if min_score is not None:
        keep &= scores >= min_score
    if max_score is not None:
        keep &= scores <= max_score
    if absolute_margin is not None:
        keep &= scores <= pos - absolute_margin
    if relative_margin is not None:
        keep &= scores <= pos * (1 - relative_margin)

    gen = torch.Generator().manual_seed(int(seed))
    if sampling == "top":
        log_p = -torch.arange(scores.shape[1], dtype=torch.float64).expand_as(scores) * 1e6
        chosen = log_p.masked_fill(~keep, float("-inf")).topk(num_negatives, dim=1).indices
    else:
        if sampling == "random":
            log_p = torch.zeros_like(scores, dtype=torch.float64)
        elif sampling == "simans":
            log_p = -simans_a * (scores.double() - pos.double() - simans_b) ** 2
        elif sampling == "hcl":
            log_p = hcl_beta * scores.double() / temperature
        else:  # ring: the band of ranks among each query's survivors
            survivors = keep.long()
            rank = survivors.cumsum(dim=1) - 1  # rank among survivors (scores are sorted)
            count = survivors.sum(dim=1)
            band = torch.zeros_like(keep)
            for i in range(scores.shape[0]):
                m = int(count[i])
                if m == 0:
                    continue
                lower, upper = ring_band(m, ring_rho_out, ring_rho_in)
                band[i] = keep[i] & (rank[i] >= lower) & (rank[i] < upper)
            keep = band
            log_p = torch.zeros_like(scores, dtype=torch.float64)
        chosen = gumbel_top_k(log_p.masked_fill(~keep, float("-inf")), num_negatives, gen)
    valid = keep.gather(1, chosen)
    chosen_scores = scores.gather(1, chosen)
    chosen_index = index.gather(1, chosen)

    rows: list[dict[str, str]] = []
    neg_scores = []
    for i in range(len(q_texts)):
        picks = [
            (float(chosen_scores[i, m]), int(chosen_index[i, m]))
            for m in range(num_negatives)
            if bool(valid[i, m])
        ]
        picks.sort(key=lambda x: -x[0])
        if len(picks) < num_negatives:
            stats.short_queries += 1
        neg_scores.extend(s for s, _ in picks)
        if output_format == "triplet":
            for _, j in picks:
                rows.append({"anchor": q_texts[i], "positive": p_texts[i], "negative": c_texts[j]})
        elif len(picks) == num_negatives:
            row = {"anchor": q_texts[i], "positive": p_texts[i]}
            row.update({f"negative_{m + 1}": c_texts[j] for m, (_, j) in enumerate(picks)})
            rows.append(row)
    stats.rows = len(rows)
    stats.mean_positive_score = float(pos.mean())
    stats.mean_negative_score = float(np.mean(neg_scores)) if neg_scores else math.nan
    stats.seconds["select"] = time.perf_counter() - t2
    out: Any = rows
    if as_dataset:
        from datasets import Dataset

        out = Dataset.from_list(rows)
    return (out, stats) if return_stats else out


def save_rows(rows: Any, path: str | Path) -> Path:
    """Write mined rows (list of dicts or a ``datasets.Dataset``) as ``.jsonl`` or ``.parquet``."""
    path = Path(path)
    records = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise ValueError(f"output must end in .jsonl or .parquet, got {path.name!r}")
    return path


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read ``.jsonl``, ``.parquet`` or ``.csv`` rows (inputs of ``hardneg mine``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".txt":
        return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line]
    raise ValueError(f"input must be .jsonl, .parquet, .csv or .txt, got {path.name!r}")
